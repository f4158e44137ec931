#!/usr/bin/env python3
"""How well smart.py's measurement designs cope with drift, harm and long horizons (issue 8).

A simulation on a virtual clock (no server, no sleeping) that replays the schedules of
smart.Trial faithfully and takes every decision with smart's own pieces:

  A  sequential               baseline for H s, a cool-down, the variant for H s, one
                              fixed-horizon verdict (Trial.run_sequential, EARLY_STOP=no)
  B  switchback               BLOCKS pairs in the order smart.balanced_orders draws from a seeded
                              random.Random, a warm-up after every switch (measured, not judged),
                              one verdict at the end (Trial.run_switchback, EARLY_STOP=no)
  C  switchback + seq. stop   B with a smart.Look after each pair from pair 3 on (EARLY_STOP=yes)
  D  sequential + seq. stop   A with a smart.Look every Trial.look_every(H) s (EARLY_STOP=yes)

In every design a guard (smart.Guard.check, on a 0.5 s grid as Guard.tripped) is fed every row
of the variant from its apply; its reference is the baseline rows so far, as Trial's is.

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
the peeking check (--full: every cell at --reps).  About 80 s on 2 idle cores.

Stdlib only.  Prints keep rates per scenario x design, seconds a harmful variant stayed applied,
false/true keeps and time to a verdict per design, then PASS/FAIL lines for the acceptance of
issue 8; exits 1 on any FAIL.

    python3 bench/design_quality.py [--reps N] [--horizon SECONDS] [--seed S] [--jobs J]
                                    [--blocks N] [--warmup SECONDS] [--full]
"""

from __future__ import annotations

import argparse
import bisect
import math
import os
import random
import statistics
import sys
import time
import types
from concurrent.futures import ProcessPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import smart  # noqa: E402  (the repo root, not an installed copy)

RATE = 20.0                 # requests per second (open loop)
SIGMA = 0.25                # lognormal noise of every latency
TIMEOUT_MS = 5000.0         # the Prober's default timeout: a request past it is a row with code 0
GUARD_EVERY = 0.5           # Guard.tripped checks at most twice a second
FIRST_LOOK_PAIR = 3         # Trial.switchback_variant looks from the 3rd pair on
TWO_PI = 2.0 * math.pi
VERIFY_EVERY = 16           # every Nth guard poll that the prefilter skips is also run through Guard.check

MAX_DRIFT_KEEP_PCT = 1.0    # switchback must revert a drifting no-op in >= 99% of repetitions
MAX_HARM_SECONDS = 10.0     # a harmful variant is reverted within 10 s of its apply
MAX_NOCHANGE_KEEP_PCT = 1.0
MAX_VERDICT_FRACTION = 0.5


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


###### The simulated target and prober ######

class Config:
    """The schedule's settings: smart's defaults, with BASELINE_SECONDS = EXPERIMENT_SECONDS = horizon."""

    def __init__(self, horizon, settings=None):
        settings = dict(settings or smart.load_settings(None, environ={}))
        self.settings = settings
        self.horizon = float(horizon)
        self.cooldown = float(settings["COOLDOWN_SECONDS"])
        self.warmup = float(settings["WARMUP_SECONDS"])
        self.pairs = int(settings["BLOCKS"])
        trial = types.SimpleNamespace(settings=settings)
        self.look_every = smart.Trial.look_every(trial, self.horizon)   # Trial's own rule

    def run_length(self, design):
        """Nominal run length (s) of one variant's run, without early stops."""
        if design == "sequential":
            return 2 * self.horizon + self.cooldown
        return self.warmup + self.pairs * 2 * (self.warmup + self.horizon / self.pairs)


class ReferenceView:
    """What Guard.check reads of its reference Arm, with the latencies sorted once."""

    def __init__(self, arm):
        self.latencies = sorted(arm.latencies)
        self.errors, self.total = arm.errors, arm.total

    @property
    def ok(self):
        return len(self.latencies)


class SimGuard(smart.Guard):
    """smart.Guard on a virtual clock; latencies kept sorted so a check costs no sort.

    poll() runs Guard.check whenever a cheap prefilter (the same two conditions on the sorted
    lists) says it could trip, and on every VERIFY_EVERY-th skipped poll as a cross-check; a
    disagreement is counted (and reported as a FAIL), so the trips are Guard.check's own.
    """

    def __init__(self, reference_arm, thresholds, start):
        super().__init__(ReferenceView(reference_arm), thresholds)
        self.start = start
        self.next = start              # Guard.checked starts at 0: the first tripped() checks at once
        self.skipped = 0
        self.mismatches = 0
        reference = self.reference
        self.base_rate = reference.errors / reference.total if reference.total else 0.0
        self.limit = (smart.GUARD_FACTOR * smart.percentile(reference.latencies, 99)
                      if reference.ok >= smart.GUARD_MIN_ROWS else None)

    def add(self, latency_ms, code):
        self.total += 1
        if code == 0 or code >= 500:
            self.errors += 1
        else:
            bisect.insort(self.latencies, latency_ms)

    def _could_trip(self):
        if self.total < smart.GUARD_MIN_ROWS:
            return False
        bound = smart.wilson_lower(self.errors, self.total, smart.GUARD_CONFIDENCE)
        if bound > self.base_rate + self.thresholds.max_err_delta_pct / 100:
            return True
        return (self.limit is not None and len(self.latencies) >= smart.GUARD_MIN_ROWS
                and smart.percentile(self.latencies, 50) > self.limit)

    def poll(self, at):
        self.next += GUARD_EVERY
        if self._could_trip():
            self.reason = self.check(at - self.start)
            if self.reason is None:
                self.mismatches += 1
        else:
            self.skipped += 1
            if self.skipped % VERIFY_EVERY == 0 and self.check(at - self.start) is not None:
                self.mismatches += 1
        return self.reason


class SimLook:
    """smart.Look on a virtual clock: decide() at look_start + k * every, as Look.due does."""

    def __init__(self, base, var, thresholds, horizon, every, start):
        self.look = smart.Look(base, var, thresholds, horizon, every)
        self.horizon, self.every, self.start = horizon, every, start
        self.next = start + every
        self.count = 0

    def poll(self, at):
        self.next = at + self.every
        self.count += 1
        return self.look.decide(min(1.0, (at - self.start) / self.horizon))


class Sim:
    """A target whose latency follows a scenario, and an open-loop prober on a virtual clock."""

    def __init__(self, scenario, rng, run_length):
        self.level = scenario
        self.rng = rng
        self.run_length = run_length
        self.now = 0.0
        self.applied = False

    def normals(self, count):
        """count standard normal deviates (Box-Muller on the scenario's seeded stream)."""
        rand, log, sqrt, cos, sin = self.rng.random, math.log, math.sqrt, math.cos, math.sin
        out = []
        for _ in range((count + 1) // 2):
            radius, angle = sqrt(-2.0 * log(1.0 - rand())), TWO_PI * rand()
            out.append(radius * cos(angle))
            out.append(radius * sin(angle))
        return out[:count]

    def rows(self, start, end):
        """(done, due, latency_ms, code) of the requests due in [start, end), in completion order."""
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
            out.append((due + latency / 1000.0, due, latency, code))
        out.sort()
        return out

    def window(self, seconds, sinks, guard=None, look=None):
        """Measure for `seconds` from now, as Trial.measure + Prober do; returns 'guard', 'look' or None.

        sinks: (arm, block) pairs every row goes to (Arm.add with the row's due time as `at`).
        The guard polls on its 0.5 s grid and the look on its own, both seeing the rows completed
        so far; either one stopping ends the window at once (in-flight requests are dropped).
        Otherwise the window lasts until its last request has completed.
        """
        start = self.now
        rows = self.rows(start, start + seconds)
        finish = max(start + seconds, rows[-1][0] if rows else start)
        dones = [row[0] for row in rows]
        index = 0

        def feed(upto):
            nonlocal index
            for _, due, latency, code in rows[index:upto]:
                for arm, block in sinks:
                    arm.add(latency, code, block, due)
                if guard is not None:
                    guard.add(latency, code)
            index = upto

        while True:
            at = min(guard.next if guard is not None else math.inf, look.next if look is not None else math.inf)
            if at > finish:
                break
            feed(bisect.bisect_left(dones, at, index))
            if guard is not None and guard.next <= at and guard.poll(at):
                self.now = at
                return "guard"
            if look is not None and look.next <= at and look.poll(at) is not None:
                self.now = at
                return "look"
        feed(len(rows))
        self.now = finish
        return None


###### The designs (Trial.sequential_variant and Trial.switchback_variant on the virtual clock) ######

class Outcome:
    __slots__ = ("decision", "aborted", "applied_max", "fraction", "early", "looks", "mismatches")

    def __init__(self):
        self.decision, self.aborted, self.applied_max = None, False, 0.0
        self.fraction, self.early, self.looks, self.mismatches = 1.0, False, 0, 0


def run_sequential(sim, cfg, thresholds, early, outcome):
    H = cfg.horizon
    baseline = smart.Arm()
    sim.window(H, [(baseline, None)])
    guard = SimGuard(baseline, thresholds, sim.now)       # Guard(baseline) is made before the apply
    sim.applied, applied_at = True, sim.now
    try:
        stop = sim.window(cfg.cooldown, [(smart.Arm(), None)], guard=guard)
        if stop == "guard":
            outcome.decision, outcome.aborted = "revert", True
            outcome.fraction = 0.0
            return
        arm = smart.Arm()
        look = SimLook(baseline, arm, thresholds, H, cfg.look_every, sim.now) if early else None
        measuring_from = sim.now
        stop = sim.window(H, [(arm, None)], guard=guard, look=look)
        outcome.looks = look.count if look else 0
        if stop == "guard":
            outcome.decision, outcome.aborted = "revert", True
            outcome.fraction = (sim.now - measuring_from) / H
            return
        if stop == "look":
            result, outcome.fraction, outcome.early = look.look.result, look.look.fraction, True
        else:
            result = smart.verdict(baseline, arm, thresholds, fraction=1.0 if early else None)
        outcome.decision = result.decision
    finally:
        outcome.mismatches += guard.mismatches
        if outcome.decision == "keep":
            outcome.applied_max = math.inf
        else:
            outcome.applied_max = max(outcome.applied_max, sim.now - applied_at)
            sim.applied = False


def run_switchback(sim, cfg, thresholds, early, outcome, order_rng):
    pairs, warmup = cfg.pairs, cfg.warmup
    reference = smart.Arm()
    sim.window(warmup, [(reference, None)])              # the run's first baseline warm-up
    baseline, arm = smart.Arm(), smart.Arm()
    orders = smart.balanced_orders(order_rng, pairs)
    block_seconds = base_seconds = cfg.horizon / pairs
    for index, variant_first in enumerate(orders):
        block = index + 1
        for is_variant in (variant_first, not variant_first):
            if is_variant:
                guard = SimGuard(reference, thresholds, sim.now)
                sim.applied, applied_at = True, sim.now
                stop = sim.window(warmup, [(smart.Arm(), block)], guard=guard)
                if stop is None:
                    stop = sim.window(block_seconds, [(arm, block)], guard=guard)
                outcome.mismatches += guard.mismatches
                outcome.applied_max = max(outcome.applied_max, sim.now - applied_at)
                if stop == "guard":
                    sim.applied = False
                    outcome.decision, outcome.aborted = "revert", True
                    outcome.fraction = index / pairs
                    return
            else:
                sim.applied = False
                sim.window(warmup, [(reference, block)])
                sim.window(base_seconds, [(baseline, block), (reference, block)])
        if early and FIRST_LOOK_PAIR <= index + 1 < pairs:
            outcome.looks += 1
            result = smart.Look(baseline, arm, thresholds, 1, 1).decide((index + 1) / pairs)
            if result is not None:
                outcome.decision, outcome.fraction, outcome.early = result.decision, (index + 1) / pairs, True
                break
    else:
        outcome.decision = smart.verdict(baseline, arm, thresholds, fraction=1.0 if early else None).decision
    if outcome.decision == "keep":
        outcome.applied_max = math.inf
    sim.applied = False


def simulate(task):
    """One cell chunk: (scenario index, design key, first rep, reps, seed, horizon, settings, naive)."""
    s_index, design_key, first, reps, seed, horizon, overrides, naive = task
    settings = smart.load_settings(None, environ={}, overrides=overrides)
    cfg = Config(horizon, settings)
    thresholds = smart.Thresholds(settings)
    _, level, _, _, _ = SCENARIOS[s_index]
    _, layout, early = DESIGNS[design_key]
    restore = None
    if naive:          # the peeking strawman: every look at the fixed-horizon alpha
        restore = smart.sequential_alpha
        smart.sequential_alpha = lambda confidence, fraction: 1 - confidence
    try:
        results = []
        for rep in range(first, first + reps):
            rng = random.Random(f"{seed}:{s_index}:{design_key}:{rep}:{naive}:{overrides}")
            sim = Sim(level, rng, cfg.run_length(layout))
            outcome = Outcome()
            if layout == "sequential":
                run_sequential(sim, cfg, thresholds, early, outcome)
            else:
                run_switchback(sim, cfg, thresholds, early, outcome, random.Random(rng.getrandbits(32)))
            results.append((outcome.decision, outcome.aborted, outcome.applied_max, outcome.fraction,
                            outcome.early, outcome.looks, outcome.mismatches))
        return (s_index, design_key, naive, overrides, results)
    finally:
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
          f"look every {cfg.look_every:g} s (sequential), after each pair from pair {FIRST_LOOK_PAIR} (switchback); "
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

    mismatches = sum(r[6] for rows in results.values() for r in rows)

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
          f"{cfg.look_every:g} s, median {looks:g} looks):")
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
    peek_kept = sum(r[0] == "keep" for r in peek_rows[False])
    chance = smart.binomial_sf(peek_kept, len(peek_rows[False]), MAX_NOCHANGE_KEEP_PCT / 100)
    check(chance >= 0.05,
          f"looking every {cfg.look_every:g} s at smart.sequential_alpha keeps a no-change variant in "
          f"{peek_rate[False]:.1f}% with only the significance rule, not above {MAX_NOCHANGE_KEEP_PCT:g}% "
          f"(P(>= {peek_kept} keeps | {MAX_NOCHANGE_KEEP_PCT:g}%) = {chance:.2f} >= 0.05; the fixed alpha at "
          f"every look keeps {peek_rate[True]:.1f}%)")
    check(mismatches == 0, f"the simulation's guard prefilter agreed with smart.Guard.check ({mismatches} "
                           "disagreements)")
    print(f"elapsed {time.perf_counter() - started:.1f} s")
    return 0 if all(checks) else 1


if __name__ == "__main__":
    sys.exit(main())
