#!/usr/bin/env python3
"""How well smart.py's measurement designs cope with drift, harm and long horizons (issue 8).

A simulation on a virtual clock (no server, no sleeping) that runs the product's own smart.Trial
-- its schedules, guard, looks, switching and records -- against a simulated target:

  A  sequential               baseline for H s, a cool-down, the variant for H s, one
                              fixed-horizon verdict (DESIGN=sequential, EARLY_STOP=no)
  B  switchback               BLOCKS pairs in a balanced random order, a warm-up after every
                              switch (measured, not judged), one verdict at the end
                              (DESIGN=switchback, EARLY_STOP=no)
  C  switchback + seq. stop   B with the sequential stop's looks (EARLY_STOP=yes)
  D  sequential + seq. stop   A with a look every few seconds (EARLY_STOP=yes)

What is simulated: the clock (smart.Trial, Guard and Look take it as a seam), the target (the
experiment's apply and revert commands reach it through the run's one door to commands,
smart.Commands, whose runner is a seam) and the rows (smart.Measurer.collect, replaced by
SimMeasurer); everything else is the product's own code, run in a scratch home on /dev/shm.

Requests are due at a fixed rate (open loop, as the Prober's rate shape); each has a latency
drawn lognormally (sigma 0.25) around the scenario's level at that moment and fails with the
scenario's error probability; a row reaches the arms, the guard and the looks when it
completes (due + latency).  Drift is a function of the time since the run started, over the
design's nominal run length (what the schedule takes without an early stop).

Time to a verdict is the fraction of the fixed horizon at which the verdict came (the look's
`fraction`, as smart records it; 1 without an early stop).  False keeps count the should-revert
scenarios (no change, drifts, step, small gain, harmful); true keeps the gains.  The sequential
stop's false keeps are judged on the no-effect scenarios for C, and on the flat no-change one for
D (an A-then-B design is confounded by drift whatever its stopping rule; the table shows it).  A
peeking check runs D with IMPROVE_PCT=0, where only the significance rule guards a no-op, once with
smart.sequential_alpha and once with the fixed alpha at every look.

Reps: --reps (200) for every cell the acceptance rests on (no-effect and harmful scenarios, and
every C/D cell); a quarter of it for the gain / small-gain cells of A and B; half of it per arm of
the peeking check (--full: every cell at --reps).

Stdlib only.  Prints keep rates per scenario x design, seconds a harmful variant stayed applied,
false/true keeps and time to a verdict per design, then PASS/FAIL lines for the acceptance of
issue 8; exits 1 on any FAIL.

    python3 bench/design_quality.py [--reps N] [--horizon SECONDS] [--seed S] [--jobs J]
                                    [--blocks N] [--warmup SECONDS] [--full]
"""

from __future__ import annotations

import argparse
import math
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import smart  # noqa: E402  (the repo root, not an installed copy)

RATE = 20.0                 # requests per second (open loop)
SIGMA = 0.25                # lognormal noise of every latency
TIMEOUT_MS = 5000.0         # the Prober's default timeout: a request past it is a row with code 0
TWO_PI = 2.0 * math.pi

MAX_DRIFT_KEEP_PCT = 1.0    # switchback must revert a drifting no-op in >= 99% of repetitions
MAX_HARM_SECONDS = 10.0     # a harmful variant is reverted within 10 s of its apply
MAX_NOCHANGE_KEEP_PCT = 1.0
MAX_VERDICT_FRACTION = 0.5
MAX_BIG_GAIN_PAIRS = 3        # a gain of 50% or more is kept (switchback + stop) within this many block pairs ...
MAX_BIG_GAIN_WALL = 1 / 3     # ... and within this share of the run's full wall time, warm-ups included


###### Scenarios: level (ms), error probability and added stall (ms) at run time u in [0, 1] ######

def drift_down(u, applied):
    return 30.0 - 15.0 * u, 0.0, 0.0


def drift_up(u, applied):
    return 15.0 + 15.0 * u, 0.0, 0.0


def step_up(u, applied):
    return 20.0 * (1.4 if u >= 0.5 else 1.0), 0.0, 0.0


def no_change(u, applied):
    return 20.0, 0.0, 0.0


def small_gain(u, applied):
    return 20.0 * (0.95 if applied else 1.0), 0.0, 0.0


def large_gain(u, applied):
    return (0.3 if applied else 25.0), 0.0, 0.0


def half_gain(u, applied):
    return 20.0 * (0.5 if applied else 1.0), 0.0, 0.0


def real_gain(u, applied):
    return 20.0 * (0.75 if applied else 1.0), 0.0, 0.0


def harm_5xx(u, applied):
    return 20.0, (0.5 if applied else 0.0), 0.0


def harm_stall(u, applied):
    return 20.0, 0.0, (1000.0 if applied else 0.0)


# name, level function, truth (keep/revert), kind (gain / nogain / harm), no effect at all
SCENARIOS = [
    ("no change", no_change, "revert", "nogain", True),
    ("drift down 30->15 ms", drift_down, "revert", "nogain", True),
    ("drift up 15->30 ms", drift_up, "revert", "nogain", True),
    ("step +40% mid-run", step_up, "revert", "nogain", True),
    ("small gain 5%", small_gain, "revert", "nogain", False),
    ("large gain 25->0.3 ms", large_gain, "keep", "gain", False),
    ("gain 50%", half_gain, "keep", "gain", False),
    ("real gain 25%", real_gain, "keep", "gain", False),
    ("harmful 50% 5xx", harm_5xx, "revert", "harm", False),
    ("harmful +1 s stall", harm_stall, "revert", "harm", False),
]

DESIGNS = {
    "A": ("sequential", "sequential", False),
    "B": ("switchback", "switchback", False),
    "C": ("switchback+stop", "switchback", True),
    "D": ("sequential+stop", "sequential", True),
}


###### The simulated target, and the product's own Trial driven against it ######

class Config:
    """The run's settings: smart's defaults, with BASELINE_SECONDS = EXPERIMENT_SECONDS = horizon."""

    def __init__(self, horizon, settings=None):
        self.settings = dict(settings or smart.load_settings(None, environ={}))
        self.horizon = float(horizon)
        self.warmup = float(self.settings["WARMUP_SECONDS"])
        self.pairs = int(self.settings["BLOCKS"])
        self.cooldown = float(self.settings["COOLDOWN_SECONDS"])

    def for_design(self, layout, early):
        """The settings a run of this design gets (smart.load_settings validates them)."""
        return smart.load_settings(None, environ={}, overrides=dict(
            self.settings, DESIGN=layout, EARLY_STOP="yes" if early else "no",
            BASELINE_SECONDS=self.horizon, EXPERIMENT_SECONDS=self.horizon))

    def run_length(self, design):
        """Nominal run length (s) of one variant's run, without early stops."""
        if design == "sequential":
            return 2 * self.horizon + self.cooldown
        return self.warmup + self.pairs * 2 * (self.warmup + self.horizon / self.pairs)


class SimTarget:
    """A target whose latency follows a scenario on a virtual clock, switched by the run's own commands."""

    def __init__(self, scenario, rng, run_length):
        self.level = scenario
        self.rng = rng
        self.run_length = run_length
        self.now = 0.0
        self.applied = False
        self.applied_at = None
        self.applied_max = 0.0          # the longest the variant stayed applied before a revert

    def clock(self):
        return self.now

    def run_command(self, command, cwd, timeout, env=None, should_stop=None, stdout_only=False):
        """smart.run_command's stand-in: the experiment's apply and revert switch the target."""
        if command == "apply variant" and not self.applied:
            self.applied, self.applied_at = True, self.now
        elif command == "revert" and self.applied:
            self.applied = False
            self.applied_max = max(self.applied_max, self.now - self.applied_at)
        return smart.CommandResult(command, 0, "", 0.0, False)

    def normals(self, count):
        """count standard normal deviates (Box-Muller on the scenario's seeded stream)."""
        rand, log, sqrt, cos, sin = self.rng.random, math.log, math.sqrt, math.cos, math.sin
        out = []
        for _ in range((count + 1) // 2):
            radius, angle = sqrt(-2.0 * log(1.0 - rand())), TWO_PI * rand()
            out.append(radius * cos(angle))
            out.append(radius * sin(angle))
        return out[:count]

    def requests(self, start, end):
        """(due, done, latency_ms, code) of the requests due in [start, end) at RATE, open loop."""
        rand, level, exp, length, applied = self.rng.random, self.level, math.exp, self.run_length, self.applied
        out = []
        count = max(0, math.ceil((end - start) * RATE - 1e-9))
        for k, z in enumerate(self.normals(count)):
            due = start + k / RATE
            mean, p_err, stall = level(min(1.0, due / length), applied)
            latency = mean * exp(SIGMA * z) + stall
            code = 503 if p_err and rand() < p_err else 200
            if latency >= TIMEOUT_MS:
                latency, code = TIMEOUT_MS, 0
            out.append((due, due + latency / 1000.0, float(f"{latency:.3f}"), code))
        return out


class SimMeasurer(smart.Measurer):
    """smart.Measurer with collect() replaced: the rows come from the SimTarget, on its virtual clock.

    As the Prober does, it asks should_stop() at every send and every completed row (the guard and
    the looks pace themselves by the clock), and once stopped drops what is still in flight; else a
    window lasts until its last request has completed.
    """

    def __init__(self, record, experiment, schedule, stop, target):
        super().__init__(record, experiment, schedule, stop, wall=lambda: target.now)
        self.target = target

    def collect(self, path, seconds, block, on_row, should_stop, variant):
        target = self.target
        start = target.now
        requests = target.requests(start, start + seconds)
        events = sorted([(due, 1, None) for due, _, _, _ in requests]
                        + [(done, 0, (latency, code, due)) for due, done, latency, code in requests])
        for at, _, row in events:
            target.now = max(target.now, at)
            if row is not None:
                on_row(row[0], row[1], row[2])
            if should_stop():
                return
        target.now = max(target.now, start + seconds)


class Outcome:
    __slots__ = ("decision", "aborted", "applied_max", "fraction", "early", "looks", "wall")


def run_trial(settings, scenario, rng, run_length, home, run_id):
    """One run of one variant through smart.Trial, against a SimTarget; its Outcome."""
    target = SimTarget(scenario, rng, run_length)
    experiment = smart.Experiment(home.root, {
        "id": "sim", "variants": [{"name": "baseline", "apply": "apply baseline"},
                                  {"name": "variant", "apply": "apply variant"}],
        "revert": "revert", "target_url": "http://sim.invalid/"})
    log = smart.Log(open(os.devnull, "w", encoding="utf-8"))
    record = smart.RunRecord.open(home, log, smart.Commands(log, 60.0, target.run_command), experiment)
    record.run_id = run_id                       # the switchback order's seed comes from the run id
    stop = smart.StopFlag()
    schedule = smart.Schedule.of(experiment, settings)
    trial = smart.Trial(record, experiment, schedule, smart.Thresholds(settings), settings["VERIFY_SECONDS"],
                        smart.Switcher(record, experiment, stop), SimMeasurer(record, experiment, schedule, stop, target),
                        stop, clock=target.clock)
    looks = LookCounter()
    try:
        with looks:
            trial.run()
    finally:
        record.close()
        log.out.close()
        shutil.rmtree(record.run_dir)
    variant = record.state["variants"][-1]
    verdict = variant["verdict"] or {}
    outcome = Outcome()
    outcome.decision = variant["decision"]
    outcome.aborted = bool(variant["stopped_early"]) and variant["stopped_early"].startswith("guardrail")
    outcome.applied_max = math.inf if outcome.decision == "keep" else target.applied_max
    outcome.early = verdict.get("fraction") is not None and verdict["fraction"] < 1
    outcome.fraction = verdict["fraction"] if outcome.early else 1.0
    if outcome.aborted:
        outcome.fraction = min(1.0, target.applied_max / run_length)
    outcome.looks = looks.count
    outcome.wall = target.now / run_length       # the share of the run's full length (warm-ups and all) it took
    return outcome


class LookCounter:
    """Counts the sequential stop's looks (calls of smart.decisive) while it is entered."""

    def __init__(self):
        self.count = 0
        self.original = smart.decisive

    def __enter__(self):
        def counted(*args, **kwargs):
            self.count += 1
            return self.original(*args, **kwargs)
        smart.decisive = counted

    def __exit__(self, *exc):
        smart.decisive = self.original


def simulate(task):
    """One cell chunk: (scenario index, design key, first rep, reps, seed, horizon, settings, naive)."""
    s_index, design_key, first, reps, seed, horizon, overrides, naive = task
    cfg = Config(horizon, smart.load_settings(None, environ={}, overrides=overrides))
    _, level, _, _, _ = SCENARIOS[s_index]
    _, layout, early = DESIGNS[design_key]
    settings = cfg.for_design(layout, early)
    restore = None
    if naive:          # the peeking strawman: every look at the fixed-horizon alpha
        restore = smart.sequential_alpha
        smart.sequential_alpha = lambda confidence, fraction: 1 - confidence
    scratch = tempfile.mkdtemp(prefix="design-quality-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    try:
        home = smart.Home(scratch)
        results = []
        for rep in range(first, first + reps):
            rng = random.Random(f"{seed}:{s_index}:{design_key}:{rep}:{naive}:{overrides}")
            run_id = time.strftime("%Y%m%dT%H%M%S", time.gmtime(rng.randrange(1_000_000_000, 2_000_000_000)))
            outcome = run_trial(settings, level, rng, cfg.run_length(layout), home, run_id)
            results.append((outcome.decision, outcome.aborted, outcome.applied_max, outcome.fraction,
                            outcome.early, outcome.looks, outcome.wall))
        return (s_index, design_key, naive, overrides, results)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if restore is not None:
            smart.sequential_alpha = restore


###### Report ######

def pct(count, total):
    return 100.0 * count / total if total else float("nan")


def fmt_seconds(value):
    return "kept!" if math.isinf(value) else f"{value:.1f}"


def chunks(reps, size):
    first = 0
    while first < reps:
        yield first, min(size, reps - first)
        first += size


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=200,
                        help="repetitions per scenario x design (default 200; the cells the acceptance does "
                             "not rest on run a quarter of it, the peeking check half)")
    parser.add_argument("--horizon", type=float, default=300.0,
                        help="BASELINE_SECONDS = EXPERIMENT_SECONDS, seconds per arm (default 300)")
    parser.add_argument("--seed", type=int, default=20261208)
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="worker processes")
    parser.add_argument("--full", action="store_true", help="every cell at --reps (slower)")
    parser.add_argument("--blocks", type=int, default=None, help="BLOCKS (switchback pairs; default smart's)")
    parser.add_argument("--warmup", type=float, default=None, help="WARMUP_SECONDS (default smart's)")
    args = parser.parse_args(argv)
    if args.reps < 1 or args.horizon <= 0:
        parser.error("--reps and --horizon must be positive")
    base = {key: value for key, value in (("BLOCKS", args.blocks), ("WARMUP_SECONDS", args.warmup))
            if value is not None}

    started = time.perf_counter()
    cfg = Config(args.horizon, smart.load_settings(None, environ={}, overrides=base))
    thresholds = smart.Thresholds(cfg.settings)
    look_every = smart.Schedule.of(smart.Experiment("/", {"variants": [{"name": "baseline"}]}),
                                   cfg.for_design("sequential", True)).look_every(cfg.horizon)
    light = args.reps if args.full else max(1, args.reps // 4)
    peek_reps = args.reps if args.full else max(1, args.reps // 2)

    def reps_for(s_index, design_key):
        name, _, truth, kind, no_effect = SCENARIOS[s_index]
        if kind == "harm" or no_effect:
            return args.reps                  # the acceptance rests on these
        if design_key in ("C", "D"):
            return args.reps                  # time to a verdict over gain and no-gain scenarios
        return light

    tasks = []
    for s_index in range(len(SCENARIOS)):
        for key in DESIGNS:
            for first, count in chunks(reps_for(s_index, key), 25):
                tasks.append((s_index, key, first, count, args.seed, args.horizon, base or None, False))
    # The peeking check: with IMPROVE_PCT=0 only the significance rule guards a no-change variant;
    # D looking every few seconds at smart's sequential alpha, and at the fixed alpha (naive).
    peek = dict(base, IMPROVE_PCT=0)
    peek_key = tuple(sorted(peek.items()))
    for naive in (False, True):
        for first, count in chunks(peek_reps, 10):
            tasks.append((0, "D", first, count, args.seed, args.horizon, peek, naive))

    print(f"design_quality: horizon {args.horizon:g} s per arm, {RATE:g} requests/s, lognormal sigma {SIGMA}, "
          f"seed {args.seed}, {args.jobs} jobs")
    print(f"  smart defaults: BLOCKS={cfg.pairs} WARMUP_SECONDS={cfg.warmup:g} COOLDOWN_SECONDS={cfg.cooldown:g} "
          f"look every {look_every:g} s (sequential), after each pair from pair {smart.FIRST_LOOK_PAIR} (switchback); "
          f"IMPROVE_PCT={thresholds.improve_pct:g} CONFIDENCE={thresholds.confidence:g}")
    print(f"  reps: {args.reps} for no-effect and harmful scenarios and for C/D everywhere, "
          f"{light} for gain/small-gain cells of A/B, {peek_reps} per arm of the peeking check")

    results = {}
    tasks.sort(key=lambda t: -t[3])
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for s_index, key, naive, overrides, rows in pool.map(simulate, tasks):
            tag = (s_index, key, naive, None if overrides is None else tuple(sorted(overrides.items())))
            results.setdefault(tag, []).extend(rows)

    def cell(s_index, key):
        return results[(s_index, key, False, tuple(sorted(base.items())) if base else None)]


    # -- per scenario x design --
    print()
    head = f"{'scenario':<24} {'truth':<6}" + "".join(f" | {k}:{DESIGNS[k][0]:<16}" for k in DESIGNS)
    print(head)
    print(f"{'':<24} {'':<6}" + " | keep%  stop@   early%  " * len(DESIGNS))
    print("-" * len(head))
    for s_index, (name, _, truth, kind, _) in enumerate(SCENARIOS):
        line = f"{name:<24} {truth:<6}"
        for key in DESIGNS:
            rows = cell(s_index, key)
            keep = pct(sum(r[0] == "keep" for r in rows), len(rows))
            if kind == "harm":
                applied = sorted(r[2] for r in rows)
                extra = f"{fmt_seconds(statistics.median(applied)):>5}/{fmt_seconds(applied[-1]):<5}s"
                line += f" | {keep:5.1f} {extra:<12}"
            else:
                stop = statistics.median(r[3] for r in rows)
                early = pct(sum(r[4] for r in rows), len(rows))
                line += f" | {keep:5.1f} {stop:5.2f} {early:5.0f}%  "
        print(line + f"   (n={len(cell(s_index, 'A'))}/{len(cell(s_index, 'B'))}/{len(cell(s_index, 'C'))}"
                     f"/{len(cell(s_index, 'D'))})")
    print("  keep% = share of repetitions that kept the variant; stop@ = median time to the verdict as a fraction "
          "of the fixed horizon (the look's fraction; 1 = no early stop); early% = stopped before the horizon;")
    print("  harmful rows: median/max seconds from the variant's apply to its revert (abort by the guard)")

    # -- per design --
    print()
    summary = {}
    for key, (label, _, _) in DESIGNS.items():
        false_keep = [0, 0]
        true_keep = [0, 0]
        fractions = []
        aborts_benign = [0, 0]
        for s_index, (name, _, truth, kind, _) in enumerate(SCENARIOS):
            rows = cell(s_index, key)
            kept = sum(r[0] == "keep" for r in rows)
            tally = true_keep if truth == "keep" else false_keep
            tally[0] += kept
            tally[1] += len(rows)
            if kind != "harm":
                fractions.extend(r[3] for r in rows)
                aborts_benign[0] += sum(r[1] for r in rows)
                aborts_benign[1] += len(rows)
        summary[key] = statistics.median(fractions)
        print(f"{key} {label:<16} false keeps {false_keep[0]}/{false_keep[1]} = {pct(*false_keep):5.2f}%   "
              f"true keeps {true_keep[0]}/{true_keep[1]} = {pct(*true_keep):6.2f}%   "
              f"median time to verdict {summary[key]:.2f} x horizon   "
              f"guard aborts of benign variants {aborts_benign[0]}/{aborts_benign[1]}")

    # -- the peeking check --
    print()
    peek_rows = {naive: results[(0, "D", naive, peek_key)] for naive in (False, True)}
    peek_rate = {naive: pct(sum(r[0] == "keep" for r in rows), len(rows)) for naive, rows in peek_rows.items()}
    looks = statistics.median(r[5] for r in peek_rows[False])
    print(f"peeking check (no change, IMPROVE_PCT=0 so only the significance rule guards; D looks every "
          f"{look_every:g} s, median {looks:g} looks):")
    print(f"  smart.sequential_alpha: false keeps {peek_rate[False]:.1f}% of {len(peek_rows[False])}   "
          f"fixed alpha {1 - thresholds.confidence:g} at every look: {peek_rate[True]:.1f}% of {len(peek_rows[True])}")

    # -- acceptance --
    print()
    checks = []

    def check(ok, text):
        checks.append(ok)
        print(f"{'PASS' if ok else 'FAIL'}: {text}")

    names = [s[0] for s in SCENARIOS]
    for drift in ("drift down 30->15 ms", "drift up 15->30 ms"):
        s_index = names.index(drift)
        original = pct(sum(r[0] == "keep" for r in cell(s_index, "A")), len(cell(s_index, "A")))
        for key in ("B", "C"):
            rows = cell(s_index, key)
            reverted = pct(sum(r[0] != "keep" for r in rows), len(rows))
            check(reverted >= 100 - MAX_DRIFT_KEEP_PCT,
                  f"{key} {DESIGNS[key][0]} reverts the no-op on '{drift}' in {reverted:.1f}% of {len(rows)} "
                  f"(>= {100 - MAX_DRIFT_KEEP_PCT:g}%); the original flow (A) keeps it in {original:.1f}%")
    for s_index, (name, _, _, kind, _) in enumerate(SCENARIOS):
        if kind != "harm":
            continue
        worst = max(r[2] for key in DESIGNS for r in cell(s_index, key))
        check(worst <= MAX_HARM_SECONDS,
              f"'{name}' reverted within {fmt_seconds(worst)} s of its apply at worst over every design and "
              f"repetition (<= {MAX_HARM_SECONDS:g} s), with a horizon of {args.horizon:g} s")
    for key in ("C", "D"):
        label = DESIGNS[key][0]
        pool = [i for i, s in enumerate(SCENARIOS) if s[4]]
        if key == "D":
            pool = [names.index("no change")]   # A-then-B confounds drift whatever the stopping rule
        kept = sum(r[0] == "keep" for i in pool for r in cell(i, key))
        total = sum(len(cell(i, key)) for i in pool)
        check(pct(kept, total) <= MAX_NOCHANGE_KEEP_PCT,
              f"{key} {label}: false keeps on no-change scenarios ({', '.join(names[i] for i in pool)}) "
              f"{kept}/{total} = {pct(kept, total):.2f}% (<= {MAX_NOCHANGE_KEEP_PCT:g}%)")
        check(summary[key] <= MAX_VERDICT_FRACTION,
              f"{key} {label}: median time to a verdict over gain and no-gain scenarios {summary[key]:.2f} x the "
              f"fixed horizon (<= {MAX_VERDICT_FRACTION:g})")
    big = [names.index(name) for name in ("large gain 25->0.3 ms", "gain 50%")]
    for s_index in big:
        rows = cell(s_index, "C")
        quick = sum(r[0] == "keep" and r[3] <= MAX_BIG_GAIN_PAIRS / cfg.pairs + 1e-9 for r in rows)
        walls = sorted(r[6] for r in rows if r[0] == "keep")
        wall = statistics.median(walls) if walls else math.inf
        check(pct(quick, len(rows)) >= 99.0 and wall <= MAX_BIG_GAIN_WALL,
              f"C switchback+stop keeps '{names[s_index]}' within {MAX_BIG_GAIN_PAIRS} block pairs in "
              f"{pct(quick, len(rows)):.1f}% of {len(rows)} (>= 99%), median {wall:.2f} of the run's full wall "
              f"time (<= {MAX_BIG_GAIN_WALL:.2f}; slowest {walls[-1] if walls else math.inf:.2f})")
    peek_kept = sum(r[0] == "keep" for r in peek_rows[False])
    chance = smart.binomial_sf(peek_kept, len(peek_rows[False]), MAX_NOCHANGE_KEEP_PCT / 100)
    check(chance >= 0.05,
          f"looking every {look_every:g} s at smart.sequential_alpha keeps a no-change variant in "
          f"{peek_rate[False]:.1f}% with only the significance rule, not above {MAX_NOCHANGE_KEEP_PCT:g}% "
          f"(P(>= {peek_kept} keeps | {MAX_NOCHANGE_KEEP_PCT:g}%) = {chance:.2f} >= 0.05; the fixed alpha at "
          f"every look keeps {peek_rate[True]:.1f}%)")
    print(f"elapsed {time.perf_counter() - started:.1f} s")
    return 0 if all(checks) else 1


if __name__ == "__main__":
    sys.exit(main())
