#!/usr/bin/env python3
"""What a sweep's line search saves against trying every value, at equal error rates (issue 17).

A simulation on a virtual clock, as bench/design_quality.py's (whose SimTarget, SimMeasurer and
settings it reuses): the product's own smart.Trial walks a sweep of 8 values of one knob under
the default design (switchback, sequential stop), on a simulated target whose latency is the
baseline's 20 ms times the value's factor.  Two strategies, run on the same seeds:

  line search     smart as shipped: the values in ascending order, stopping at the first value
                  whose improvement's upper bound is below the best value's improvement
  every value     the same walk with that stop turned off (Trial.worse_than_best answers None)

For each knob shape it prints the box-minutes a run took (the simulated clock, warm-ups and
switches included), the values tried, how often the best value was kept, and the keeps of a value
that does not truly beat the baseline by IMPROVE_PCT ("false keeps"); then the totals and
PASS/FAIL lines: the line search must save box-minutes over the shapes and keep no more falsely.

    python3 bench/sweep_cost.py [--reps N] [--horizon SECONDS] [--jobs J] [--seed S]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import smart  # noqa: E402  (the repo root, not an installed copy)
from design_quality import Config, SimMeasurer, SimTarget  # noqa: E402

BASE_MS = 20.0
VALUES = list(range(1, 9))

# name: the latency factor of each value 1..8 against the baseline (1.0: no change)
SHAPES = {
    "peak at 3":           [1.30, 1.00, 0.70, 0.80, 0.95, 1.10, 1.25, 1.40],
    "peak at 6":           [1.20, 1.10, 1.00, 0.90, 0.80, 0.70, 0.85, 1.00],
    "plateau 3-5":         [1.20, 0.95, 0.80, 0.80, 0.80, 0.95, 1.10, 1.30],
    "better to the end":   [1.00, 0.97, 0.93, 0.90, 0.86, 0.82, 0.78, 0.75],
    "harm past 4":         [1.00, 0.85, 0.75, 0.75, 1.60, 2.50, 4.00, 6.00],
    "no effect":           [1.00] * 8,
    "small effects only":  [1.04, 1.02, 0.97, 0.95, 0.96, 1.00, 1.03, 1.05],
}


class KnobTarget(SimTarget):
    """design_quality's SimTarget whose latency depends on the knob's value the helper set."""

    def __init__(self, factors, rng, run_length):
        super().__init__(lambda u, applied: (BASE_MS * (factors[applied - 1] if applied else 1.0), 0.0, 0.0),
                         rng, run_length)

    def run_command(self, command, cwd, timeout, env=None, should_stop=None, stdout_only=False):
        words = command.split()
        if words[1:3] == ["set", "knob"]:
            self.applied = int(words[3])
        elif words[1:2] == ["reset"]:
            self.applied = False
        return smart.CommandResult(command, 0, "", 0.0, False)


def run_sweep(settings, factors, rng, home, run_id, every_value):
    """One run of the sweep through smart.Trial; (kept value or None, values tried, seconds)."""
    cfg_length = settings["WARMUP_SECONDS"] + settings["BLOCKS"] * 2 * (
        settings["WARMUP_SECONDS"] + settings["EXPERIMENT_SECONDS"] / settings["BLOCKS"])
    target = KnobTarget(factors, rng, cfg_length * len(VALUES))
    experiment = smart.Experiment(home.root, {
        "id": "sweep", "helper": "sim", "target_url": "http://sim.invalid/",
        "sweep": {"name": "knob", "set": "knob", "values": VALUES}}, dict(settings, HELPER_COMMAND=""))
    log = smart.Log(open(os.devnull, "w", encoding="utf-8"))
    record = smart.RunRecord.open(home, log, smart.Commands(log, 60.0, target.run_command), experiment)
    record.run_id = run_id
    stop = smart.StopFlag()
    schedule = smart.Schedule.of(experiment, settings)
    trial = smart.Trial(record, experiment, schedule, smart.Thresholds(settings), settings["VERIFY_SECONDS"],
                        smart.Switcher(record, experiment, stop), SimMeasurer(record, experiment, schedule, stop, target),
                        stop, clock=target.clock)
    original = smart.Trial.worse_than_best
    if every_value:
        smart.Trial.worse_than_best = lambda self, record, best: None
    try:
        trial.run()
    finally:
        smart.Trial.worse_than_best = original
        record.close()
        log.out.close()
        shutil.rmtree(record.run_dir)
    kept = record.state["kept_variant"]
    return (None if kept is None else int(kept.split("_")[1]), len(record.state["variants"]), target.now)


def simulate(task):
    shape, every_value, first, reps, seed, horizon = task
    settings = Config(horizon).for_design("switchback", True)
    scratch = tempfile.mkdtemp(prefix="sweep-cost-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    try:
        home = smart.Home(scratch)
        rows = []
        for rep in range(first, first + reps):
            rng = random.Random(f"{seed}:{shape}:{rep}")         # the same seed for both strategies
            run_id = time.strftime("%Y%m%dT%H%M%S", time.gmtime(rng.randrange(1_000_000_000, 2_000_000_000)))
            rows.append(run_sweep(settings, SHAPES[shape], rng, home, run_id, every_value))
        return shape, every_value, rows
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=100, help="runs per shape and strategy (default 100)")
    parser.add_argument("--horizon", type=float, default=300.0,
                        help="BASELINE_SECONDS = EXPERIMENT_SECONDS per value (default 300, smart's)")
    parser.add_argument("--seed", type=int, default=20261201)
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    settings = Config(args.horizon).for_design("switchback", True)
    bar = 1 - settings["IMPROVE_PCT"] / 100
    print(f"sweep_cost: {len(VALUES)} values per sweep, baseline {BASE_MS:g} ms, horizon {args.horizon:g} s per "
          f"value, switchback BLOCKS={settings['BLOCKS']} WARMUP_SECONDS={settings['WARMUP_SECONDS']:g} with the "
          f"sequential stop, IMPROVE_PCT={settings['IMPROVE_PCT']:g} CONFIDENCE={settings['CONFIDENCE']:g}, "
          f"{args.reps} runs per cell, {args.jobs} jobs")
    tasks = [(shape, every, first, min(10, args.reps - first), args.seed, args.horizon)
             for shape in SHAPES for every in (False, True) for first in range(0, args.reps, 10)]
    results = {}
    started = time.perf_counter()
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for shape, every, rows in pool.map(simulate, tasks):
            results.setdefault((shape, every), []).extend(rows)

    print()
    print(f"{'shape':<20} {'strategy':<12} {'box-min':>8} {'values':>7} {'best kept':>10} {'false keeps':>12}"
          f"  kept values")
    totals = {False: [0.0, 0, 0], True: [0.0, 0, 0]}       # minutes, false keeps, runs
    for shape, factors in SHAPES.items():
        best = min(range(len(factors)), key=lambda i: factors[i]) + 1
        has_gain = factors[best - 1] <= bar
        for every in (False, True):
            rows = results[(shape, every)]
            minutes = statistics.fmean(r[2] for r in rows) / 60
            tried = statistics.fmean(r[1] for r in rows)
            false = sum(1 for kept, _, _ in rows if kept is not None and factors[kept - 1] > bar)
            right = sum(1 for kept, _, _ in rows if kept is not None and factors[kept - 1] == factors[best - 1])
            kept_counts = {}
            for kept, _, _ in rows:
                kept_counts[kept] = kept_counts.get(kept, 0) + 1
            totals[every][0] += minutes
            totals[every][1] += false
            totals[every][2] += len(rows)
            shown = " ".join(f"{'-' if k is None else k}:{n}" for k, n in sorted(kept_counts.items(),
                                                                                 key=lambda kv: (kv[0] is None, kv[0] or 0)))
            print(f"{shape:<20} {'every value' if every else 'line search':<12} {minutes:8.1f} {tried:7.2f} "
                  f"{(f'{100 * right / len(rows):.0f}%' if has_gain else 'n/a'):>10} {false:>5}/{len(rows):<6}  {shown}")
    print()
    line, every = totals[False], totals[True]
    print(f"total box-minutes per run over the shapes: line search {line[0]:.1f}, every value {every[0]:.1f}; "
          f"the line search takes {line[0] / every[0]:.2f}x as long ({every[0] - line[0]:.1f} box-minutes saved "
          f"per {len(SHAPES)} runs)")
    print(f"false keeps: line search {line[1]}/{line[2]} = {100 * line[1] / line[2]:.2f}%, every value "
          f"{every[1]}/{every[2]} = {100 * every[1] / every[2]:.2f}%")
    print(f"(simulated in {time.perf_counter() - started:.0f} s)")
    checks = [(line[0] < every[0], "the line search takes fewer box-minutes than trying every value"),
              (line[1] <= every[1], "the line search keeps falsely no more often than trying every value")]
    for ok, text in checks:
        print(f"{'PASS' if ok else 'FAIL'}: {text}")
    return 0 if all(ok for ok, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
