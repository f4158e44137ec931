#!/usr/bin/env python3
"""How many bytes one run keeps in var/runs, before and after smart.py compresses its CSVs.

Writes the measurement CSVs a run of experiments/001_nginx_workers leaves at the default settings
(DESIGN=switchback, BLOCKS=12, WARMUP_SECONDS=5, BASELINE_SECONDS=EXPERIMENT_SECONDS=300, two
variants, open loop at 100 requests/s: 144,500 rows in baseline.csv, VARIANT.csv and the warm-up
files), row for row in the prober's own format (smart._iso_millis timestamps, 3-decimal latencies
around 0.3 ms, a block column), then runs smart.compress_measurements on the folder as a run's end
does.  Prints the bytes before and after, the ratio, the time it took, and what KEEP_RUNS=200 runs
take next to the original design's budget of about 1 MB per run.

Stdlib only.  Exits 1 when the compressed run is over 1.5 MB (the original budget, with slack).

    python3 bench/disk_per_run.py [--rate R] [--seed S]
"""

from __future__ import annotations

import argparse
import math
import os
import random
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import smart  # noqa: E402  (the repo root, not an installed copy)

MAX_RUN_MB = 1.5


def write_run(run_dir, rate, rng, settings):
    """The CSVs of one switchback run of two variants; the rows written."""
    pairs, warm, horizon = settings["BLOCKS"], settings["WARMUP_SECONDS"], settings["BASELINE_SECONDS"]
    now = 1764274326.0
    files = {}

    def measure(name, seconds, block):
        nonlocal now
        path = os.path.join(run_dir, f"{name}.csv")
        if path not in files:
            files[path] = open(path, "w", encoding="utf-8", newline="")
            files[path].write("timestamp,latency_ms,response_code,block\n")
        handle = files[path]
        for k in range(round(seconds * rate)):
            latency = rng.lognormvariate(math.log(0.3), 0.3)
            handle.write(f"{smart._iso_millis(now + k / rate)},{latency:.3f},200,{block}\n")
        now += seconds
        return round(seconds * rate)

    rows = measure("baseline_warmup", warm, 0)
    block = 0
    for variant in ("workers_auto", "workers_2"):
        for _ in range(pairs):
            block += 1
            rows += measure(f"{variant}_warmup", warm, block) + measure(variant, horizon / pairs, block)
            rows += measure("baseline_warmup", warm, block) + measure("baseline", horizon / pairs, block)
    for handle in files.values():
        handle.close()
    return rows


def folder_bytes(path):
    return sum(os.lstat(os.path.join(path, name)).st_size for name in os.listdir(path))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=100.0, help="requests per second (100, five times what 001 probes at: a busy experiment)")
    parser.add_argument("--seed", type=int, default=20261201)
    args = parser.parse_args(argv)
    settings = smart.load_settings(None, environ={})
    run_dir = tempfile.mkdtemp(prefix="disk-per-run-")
    try:
        rows = write_run(run_dir, args.rate, random.Random(args.seed), settings)
        before = folder_bytes(run_dir)
        started = time.perf_counter()
        smart.compress_measurements(run_dir)
        took = time.perf_counter() - started
        after = folder_bytes(run_dir)
        readable = smart.read_measurements(os.path.join(run_dir, "baseline.csv")).total
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    mb = 1024 * 1024
    print(f"disk_per_run: one default run of 001_nginx_workers, {rows:,} rows at {args.rate:g} requests/s")
    print(f"  CSVs as written      {before / mb:7.2f} MB")
    print(f"  after the run's end  {after / mb:7.2f} MB   ({before / after:.1f}x smaller, compressed in {took:.2f} s)")
    print(f"  KEEP_RUNS={settings['KEEP_RUNS']} runs: {settings['KEEP_RUNS'] * before / 1024 ** 3:.2f} GB uncompressed, "
          f"{settings['KEEP_RUNS'] * after / 1024 ** 3:.2f} GB compressed (the original design budgets about 1 MB a run)")
    print(f"  decide reads the compressed baseline back: {readable:,} rows")
    if after / mb > MAX_RUN_MB:
        print(f"FAIL: a compressed run takes {after / mb:.2f} MB (bound {MAX_RUN_MB:g} MB)")
        return 1
    print(f"PASS: a compressed run takes <= {MAX_RUN_MB:g} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
