#!/usr/bin/env python3
"""How often smart.py's verdict keeps a variant it should keep, and reverts one it should revert.

Generates baseline/variant sample pairs whose truth is known (seeded random.Random), runs
smart.verdict with the default thresholds on each, and runs the naive rule of the original design
(keep iff p50 improvement >= 10% and error-rate delta <= 1 point) on the same data for comparison.

Stdlib only.  Prints a table and totals; exits 1 when smart misses an acceptance bound:
false keeps over all should-revert scenarios <= 1%, true keeps over all should-keep ones >= 95%.

    python3 bench/decide_quality.py [--reps N] [--seed S]
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import smart  # noqa: E402  (the repo root, not an installed copy)

MAX_FALSE_KEEP_PCT = 1.0
MIN_TRUE_KEEP_PCT = 95.0


###### Latency distributions (ms) ######

def lognormal(rng: random.Random) -> float:
    """Lognormal around 20 ms, sigma 0.25."""
    return rng.lognormvariate(math.log(20.0), 0.25)


def heavy_tailed(rng: random.Random) -> float:
    """The lognormal body, with 2% of requests from a Pareto tail (alpha 1.5, from 50 ms)."""
    if rng.random() < 0.02:
        return 50.0 * rng.paretovariate(1.5)
    return rng.lognormvariate(math.log(20.0), 0.25)


def bimodal(rng: random.Random) -> float:
    """80% around 10 ms (a cache hit), 20% around 40 ms (a miss); each lognormal, sigma 0.15."""
    if rng.random() < 0.8:
        return rng.lognormvariate(math.log(10.0), 0.15)
    return rng.lognormvariate(math.log(40.0), 0.15)


DISTRIBUTIONS = {"lognormal": lognormal, "heavy-tail": heavy_tailed, "bimodal": bimodal}


###### Scenarios ######

class Scenario:
    """One way a variant can differ from its baseline, with the right answer."""

    def __init__(self, name, truth, n, factor=1.0, error_frac=0.0, error_code=503, slow_frac=0.0,
                 slow_factor=10.0):
        self.name, self.truth, self.n = name, truth, n
        self.factor = factor            # every variant latency multiplied by this
        self.error_frac = error_frac    # exactly this share of variant rows fail with error_code
        self.error_code = error_code
        self.slow_frac = slow_frac      # the slowest share of the variant's successes made slow_factor x slower
        self.slow_factor = slow_factor


SCENARIOS = [
    Scenario("A/A no change, n=60", "revert", 60),
    Scenario("A/A no change, n=300", "revert", 300),
    Scenario("5% gain (below bar), n=300", "revert", 300, factor=0.95),
    Scenario("20% regression, n=300", "revert", 300, factor=1.20),
    Scenario("25% faster + 3% 5xx, n=300", "revert", 300, factor=0.75, error_frac=0.03, error_code=503),
    Scenario("25% faster + 3% timeouts, n=300", "revert", 300, factor=0.75, error_frac=0.03, error_code=0),
    Scenario("25% faster p50, slowest 3% 10x, n=300", "revert", 300, factor=0.75, slow_frac=0.03),
    Scenario("too few: 25% gain, n=12", "revert", 12, factor=0.75),
    Scenario("25% gain, n=60", "keep", 60, factor=0.75),
    Scenario("25% gain, n=300", "keep", 300, factor=0.75),
    Scenario("40% gain, n=300", "keep", 300, factor=0.60),
]


def rows(rng, draw, n, factor=1.0, error_frac=0.0, error_code=503, slow_frac=0.0, slow_factor=10.0):
    """n (latency_ms, code) rows; latencies rounded to 3 decimals as the CSV writes them."""
    latencies = [draw(rng) * factor for _ in range(n)]
    slow = round(slow_frac * n)
    if slow:
        order = sorted(range(n), key=latencies.__getitem__)
        for i in order[n - slow:]:
            latencies[i] *= slow_factor
    codes = [200] * n
    for i in rng.sample(range(n), round(error_frac * n)):
        codes[i] = error_code
    return [(round(latency, 3), code) for latency, code in zip(latencies, codes)]


def generate(rng, scenario, draw):
    """(baseline rows, variant rows) for one repetition of a scenario."""
    base = rows(rng, draw, scenario.n)
    var = rows(rng, draw, scenario.n, scenario.factor, scenario.error_frac, scenario.error_code,
               scenario.slow_frac, scenario.slow_factor)
    return base, var


###### The two rules ######

def smart_keeps(base_rows, var_rows, thresholds) -> bool:
    base, var = smart.Arm(), smart.Arm()
    for latency, code in base_rows:
        base.add(latency, code)
    for latency, code in var_rows:
        var.add(latency, code)
    return smart.verdict(base, var, thresholds).decision == "keep"


def nearest_rank_p50(sorted_values):
    n = len(sorted_values)
    if n == 0:
        return None
    return sorted_values[min(n, max(1, math.ceil(50 * n / 100 - 1e-9))) - 1]


def naive_keeps(base_rows, var_rows, improve_pct=10.0, max_err_delta=1.0) -> bool:
    """The original design's rule: p50 improvement >= 10% and error rate up by <= 1 point."""
    def figures(arm_rows):
        ok = sorted(latency for latency, code in arm_rows if 0 < code < 500)
        err_pct = 100.0 * (len(arm_rows) - len(ok)) / len(arm_rows) if arm_rows else 0.0
        return nearest_rank_p50(ok), err_pct
    base_p50, base_err = figures(base_rows)
    var_p50, var_err = figures(var_rows)
    if not base_p50 or var_p50 is None:
        return False
    improve = (base_p50 - var_p50) / base_p50 * 100
    return improve >= improve_pct and var_err - base_err <= max_err_delta


###### Main ######

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=200, help="repetitions per scenario and distribution")
    parser.add_argument("--seed", type=int, default=20261127)
    args = parser.parse_args(argv)
    if args.reps < 1:
        parser.error("--reps must be at least 1")

    thresholds = smart.Thresholds(smart.load_settings(None, environ={}))
    started = time.perf_counter()
    counts = {("smart", truth): [0, 0] for truth in ("keep", "revert")}
    counts.update({("naive", truth): [0, 0] for truth in ("keep", "revert")})

    print(f"decide_quality: {args.reps} reps per cell, seed {args.seed}, default thresholds "
          f"(IMPROVE_PCT={thresholds.improve_pct:g} CONFIDENCE={thresholds.confidence:g} "
          f"MIN_SAMPLES={thresholds.min_samples} MAX_ERR_DELTA_PCT={thresholds.max_err_delta_pct:g} "
          f"MAX_TAIL_REGRESS_PCT={thresholds.max_tail_regress_pct:g})")
    header = f"{'scenario':<40} {'distribution':<11} {'truth':<6} {'smart keep%':>11} {'naive keep%':>11}"
    print(header)
    print("-" * len(header))
    for index, scenario in enumerate(SCENARIOS):
        for dist_index, (dist_name, draw) in enumerate(DISTRIBUTIONS.items()):
            # One stream per cell, so adding a scenario does not change the others' data.
            rng = random.Random(f"{args.seed}:{index}:{dist_index}")
            smart_kept = naive_kept = 0
            for _ in range(args.reps):
                base_rows, var_rows = generate(rng, scenario, draw)
                smart_kept += smart_keeps(base_rows, var_rows, thresholds)
                naive_kept += naive_keeps(base_rows, var_rows)
            for rule, kept in (("smart", smart_kept), ("naive", naive_kept)):
                tally = counts[(rule, scenario.truth)]
                tally[0] += kept
                tally[1] += args.reps
            print(f"{scenario.name:<40} {dist_name:<11} {scenario.truth:<6} "
                  f"{100.0 * smart_kept / args.reps:>10.1f}% {100.0 * naive_kept / args.reps:>10.1f}%")

    print()
    results = {}
    for rule in ("smart", "naive"):
        kept_bad, total_bad = counts[(rule, "revert")]
        kept_good, total_good = counts[(rule, "keep")]
        results[rule] = (100.0 * kept_bad / total_bad, 100.0 * kept_good / total_good)
        print(f"{rule:<6} false keeps (should-revert): {kept_bad}/{total_bad} = {results[rule][0]:.2f}%   "
              f"true keeps (should-keep): {kept_good}/{total_good} = {results[rule][1]:.2f}%")
    print(f"elapsed {time.perf_counter() - started:.1f} s")

    false_keep, true_keep = results["smart"]
    missed = []
    if false_keep > MAX_FALSE_KEEP_PCT:
        missed.append(f"smart false-keep rate {false_keep:.2f}% > {MAX_FALSE_KEEP_PCT:g}%")
    if true_keep < MIN_TRUE_KEEP_PCT:
        missed.append(f"smart true-keep rate {true_keep:.2f}% < {MIN_TRUE_KEEP_PCT:g}%")
    if missed:
        for line in missed:
            print(f"FAIL: {line}")
        return 1
    print(f"PASS: smart false keeps <= {MAX_FALSE_KEEP_PCT:g}%, true keeps >= {MIN_TRUE_KEEP_PCT:g}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
