#!/usr/bin/env python3
"""A minimal stdlib decide, the yardstick for bench/decide_speed.py: how fast can plain Python go?

csv.reader, float(latency), int(code); successful latencies kept in a list, sorted per arm; keep iff
the nearest-rank p50 improved >= 10% and the error rate rose <= 1 point.  No validation, no
statistics beyond that.

    python3 bench/reference_decide.py BASELINE.csv VARIANT.csv
"""

import csv
import math
import sys


def read(path):
    """(sorted successful latencies, error count, row count) of one measurement CSV."""
    latencies = []
    append = latencies.append
    errors = total = 0
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        for row in reader:
            if row[0] == "timestamp":
                continue
            latency = float(row[1])
            code = int(row[2])
            total += 1
            if 0 < code < 500:
                append(latency)
            else:
                errors += 1
    latencies.sort()
    return latencies, errors, total


def p50(sorted_values):
    n = len(sorted_values)
    return sorted_values[min(n, max(1, math.ceil(50 * n / 100 - 1e-9))) - 1] if n else None


def main(argv):
    base, base_errors, base_total = read(argv[1])
    var, var_errors, var_total = read(argv[2])
    base_p50, var_p50 = p50(base), p50(var)
    improve = (base_p50 - var_p50) / base_p50 * 100 if base_p50 and var_p50 is not None else -math.inf
    err_delta = 100.0 * (var_errors / max(var_total, 1) - base_errors / max(base_total, 1))
    print("keep" if improve >= 10.0 and err_delta <= 1.0 else "revert")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
