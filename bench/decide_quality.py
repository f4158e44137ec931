#!/usr/bin/env python3
"""How often smart.py's verdict keeps a variant it should keep, and reverts one it should revert.

Generates baseline/variant sample pairs whose truth is known (seeded random.Random), runs
smart.verdict with the default thresholds on each, and runs the naive rule of the original design
(keep iff p50 improvement >= 10% and error-rate delta <= 1 point) on the same data for comparison.

The scenarios include harm beside a gain (issue 15): a faster variant with 3 points more 5xx or
timeouts (each request failing at random, so some repetitions show only a few), with 3% of its
requests ten times slower than the baseline's p99, and a cache whose hits got faster but that
misses twice as often.  Four kinds of traffic: lognormal, a Pareto tail, a bimodal cache, and
"a few percent ten times slower" in both arms.

Besides false and true keeps it counts how often rules 4 and 5 (errors, tail) fire where there is
no harm: on no-change and gain scenarios they should not, more than 1% of the time.  Two
no-change scenarios with 1% background errors in both arms are shown apart: at 300 requests per
arm an error-rate rise cannot be told from that noise, and rule 4 gives harm no benefit of the
doubt (docs/SPEC.md "The decision").

Stdlib only.  Prints a table and totals; exits 1 when smart misses an acceptance bound:
false keeps over all should-revert scenarios <= 0.5%, true keeps over all should-keep ones >= 98%,
the harms issue 15 bounds (3 points more 5xx or timeouts, 3% of requests at 10 x the baseline's
p99) each reverted >= 99.5%, rules 4/5 firing on clean no-change or gain traffic <= 1%.

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

MAX_FALSE_KEEP_PCT = 0.5
MIN_TRUE_KEEP_PCT = 98.0
MIN_HARM_REVERT_PCT = 99.5
MAX_HARM_RULE_ON_CLEAN_PCT = 1.0


###### Traffic (latency in ms; each function draws one request, hit=False asks for a cache miss) ######

def lognormal(rng: random.Random, factor=1.0, miss=None) -> float:
    """Lognormal around 20 ms, sigma 0.25."""
    return rng.lognormvariate(math.log(20.0), 0.25) * factor


def heavy_tailed(rng: random.Random, factor=1.0, miss=None) -> float:
    """The lognormal body, with 2% of requests from a Pareto tail (alpha 1.5, from 50 ms)."""
    if rng.random() < 0.02:
        return 50.0 * rng.paretovariate(1.5) * factor
    return rng.lognormvariate(math.log(20.0), 0.25) * factor


def bimodal(rng: random.Random, factor=1.0, miss=None) -> float:
    """A cache: 80% hits around 10 ms, 20% misses around 40 ms (each lognormal, sigma 0.15); a
    variant's factor speeds up the hits, `miss` changes how often it misses."""
    if rng.random() < (0.2 if miss is None else miss):
        return rng.lognormvariate(math.log(40.0), 0.15)
    return rng.lognormvariate(math.log(10.0), 0.15) * factor


def slow_few(rng: random.Random, factor=1.0, miss=None) -> float:
    """A few percent ten times slower: 3% of requests around 200 ms, the rest around 20 ms; a variant's
    factor speeds up the fast part only (the slow requests wait on something else)."""
    if rng.random() < 0.03:
        return rng.lognormvariate(math.log(200.0), 0.25)
    return rng.lognormvariate(math.log(20.0), 0.25) * factor


DISTRIBUTIONS = {"lognormal": lognormal, "heavy-tail": heavy_tailed, "bimodal": bimodal, "3%-10x": slow_few}


###### Scenarios ######

class Scenario:
    """One way a variant can differ from its baseline, with the right answer.

    kind: "no change" and "gain" must not trip rules 4 and 5; "harm" must be reverted; "regression"
    (slower all over) and "noisy" (background errors in both arms) are shown, not held to either.
    """

    def __init__(self, name, truth, n, kind, factor=1.0, error_frac=0.0, error_code=503, error_random=False,
                 slow_frac=0.0, slow_random=False, slow_of_p99=False, miss=None, base_errors=0.0,
                 only=None, bound=False):
        self.name, self.truth, self.n, self.kind = name, truth, n, kind
        self.factor = factor              # variant latencies multiplied by this
        self.error_frac = error_frac      # this share of variant rows fail with error_code ...
        self.error_code = error_code
        self.error_random = error_random  # ... each at random (else exactly that many)
        self.slow_frac = slow_frac        # this share of the variant made 10x slower: its slowest, or at random ...
        self.slow_random = slow_random
        self.slow_of_p99 = slow_of_p99    # ... at 10 x the baseline's p99 rather than 10 x their own
        self.miss = miss                  # the variant's miss share (the bimodal cache)
        self.base_errors = base_errors    # both arms: this share of requests fail at random
        self.only = only                  # the traffic kinds it applies to (None: all)
        self.bound = bound                # a harm issue 15 bounds: reverted in >= MIN_HARM_REVERT_PCT of repetitions


SCENARIOS = [
    Scenario("A/A no change, n=60", "revert", 60, "no change"),
    Scenario("A/A no change, n=300", "revert", 300, "no change"),
    Scenario("A/A, 1% errors in both, n=300", "revert", 300, "noisy", base_errors=0.01),
    Scenario("A/A, 1% errors in both, n=3000", "revert", 3000, "noisy", base_errors=0.01),
    Scenario("5% gain (below bar), n=300", "revert", 300, "no change", factor=0.95),
    Scenario("20% regression, n=300", "revert", 300, "regression", factor=1.20),
    Scenario("25% faster + 3% 5xx, n=300", "revert", 300, "harm", factor=0.75, error_frac=0.03),
    Scenario("30% faster + 3% random 5xx, n=300", "revert", 300, "harm", factor=0.70, error_frac=0.03,
             error_random=True, bound=True),
    Scenario("25% faster + 3% random timeouts, n=300", "revert", 300, "harm", factor=0.75, error_frac=0.03,
             error_code=0, error_random=True, bound=True),
    Scenario("25% faster p50, slowest 3% 10x, n=300", "revert", 300, "harm", factor=0.75, slow_frac=0.03),
    Scenario("20% faster, 3% at 10x base p99, n=300", "revert", 300, "harm", factor=0.80, slow_frac=0.03,
             slow_random=True, slow_of_p99=True, bound=True),
    Scenario("hits 30% faster, misses 20%->40%, n=300", "revert", 300, "harm", factor=0.70, miss=0.40,
             only=("bimodal",)),
    Scenario("too few: 25% gain, n=12", "revert", 12, "gain", factor=0.75),
    Scenario("25% gain, n=60", "keep", 60, "gain", factor=0.75),
    Scenario("25% gain, n=300", "keep", 300, "gain", factor=0.75),
    Scenario("30% gain, n=300", "keep", 300, "gain", factor=0.70),
    Scenario("40% gain, n=300", "keep", 300, "gain", factor=0.60),
]


def rows(rng, draw, n, scenario=None, base_p99=None, background=0.0):
    """n (latency_ms, code) rows of the baseline, or of the scenario's variant; `background` is the
    share of requests failing at random in either arm.  Latencies rounded to 3 decimals as the CSV writes them."""
    s = scenario
    variant = s is not None
    latencies = [draw(rng, s.factor if variant else 1.0, s.miss if variant else None) for _ in range(n)]
    if variant and s.slow_frac:
        if s.slow_random:
            slow = [i for i in range(n) if rng.random() < s.slow_frac]
        else:
            slow = sorted(range(n), key=latencies.__getitem__)[n - round(s.slow_frac * n):]
        for i in slow:
            latencies[i] = (10 * base_p99 * rng.lognormvariate(0, 0.1) if s.slow_of_p99 else latencies[i] * 10)
    codes = [200] * n
    if variant and s.error_frac:
        failing = ([i for i in range(n) if rng.random() < s.error_frac] if s.error_random
                   else rng.sample(range(n), round(s.error_frac * n)))
        for i in failing:
            codes[i] = s.error_code
    for i in range(n):
        if background and rng.random() < background:
            codes[i] = 503
    return [(round(latency, 3), code) for latency, code in zip(latencies, codes)]


def generate(rng, scenario, draw):
    """(baseline rows, variant rows) for one repetition of a scenario."""
    base = rows(rng, draw, scenario.n, background=scenario.base_errors)
    ok = sorted(latency for latency, code in base if code == 200)
    var = rows(rng, draw, scenario.n, scenario, smart.percentile(ok, 99), scenario.base_errors)
    return base, var


###### The two rules ######

def smart_verdict(base_rows, var_rows, thresholds):
    base, var = smart.Arm(), smart.Arm()
    for latency, code in base_rows:
        base.add(latency, code)
    for latency, code in var_rows:
        var.add(latency, code)
    return smart.verdict(base, var, thresholds)


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
    parser.add_argument("--reps", type=int, default=1000, help="repetitions per scenario and traffic kind")
    parser.add_argument("--seed", type=int, default=20261127)
    args = parser.parse_args(argv)
    if args.reps < 1:
        parser.error("--reps must be at least 1")

    thresholds = smart.Thresholds(smart.load_settings(None, environ={}))
    started = time.perf_counter()
    counts = {(rule, truth): [0, 0] for rule in ("smart", "naive") for truth in ("keep", "revert")}
    harm_rule_on_clean = [0, 0]
    missed = []

    print(f"decide_quality: {args.reps} reps per cell, seed {args.seed}, default thresholds "
          f"(IMPROVE_PCT={thresholds.improve_pct:g} CONFIDENCE={thresholds.confidence:g} "
          f"MIN_SAMPLES={thresholds.min_samples} MAX_ERR_DELTA_PCT={thresholds.max_err_delta_pct:g} "
          f"MAX_TAIL_REGRESS_PCT={thresholds.max_tail_regress_pct:g})")
    header = (f"{'scenario':<42} {'traffic':<10} {'truth':<6} {'smart keep%':>11} {'naive keep%':>11} "
              f"{'rule 4/5 fired%':>15}")
    print(header)
    print("-" * len(header))
    for index, scenario in enumerate(SCENARIOS):
        for dist_index, (dist_name, draw) in enumerate(DISTRIBUTIONS.items()):
            if scenario.only and dist_name not in scenario.only:
                continue
            # One stream per cell, so adding a scenario does not change the others' data.
            rng = random.Random(f"{args.seed}:{index}:{dist_index}")
            smart_kept = naive_kept = harm_rules = 0
            for _ in range(args.reps):
                base_rows, var_rows = generate(rng, scenario, draw)
                result = smart_verdict(base_rows, var_rows, thresholds)
                smart_kept += result.decision == "keep"
                harm_rules += bool({"errors", "tail"} & set(result.failed_rules))
                naive_kept += naive_keeps(base_rows, var_rows)
            if scenario.kind != "noisy":
                for rule, kept in (("smart", smart_kept), ("naive", naive_kept)):
                    tally = counts[(rule, scenario.truth)]
                    tally[0] += kept
                    tally[1] += args.reps
            if scenario.kind in ("no change", "gain") and scenario.n >= thresholds.min_samples:
                harm_rule_on_clean[0] += harm_rules
                harm_rule_on_clean[1] += args.reps
            fired = 100.0 * harm_rules / args.reps
            if scenario.bound and 100 - 100.0 * smart_kept / args.reps < MIN_HARM_REVERT_PCT:
                missed.append(f"'{scenario.name}' on {dist_name} reverted only "
                              f"{100 - 100.0 * smart_kept / args.reps:.2f}% (>= {MIN_HARM_REVERT_PCT:g}%)")
            print(f"{scenario.name:<42} {dist_name:<10} {scenario.truth:<6} "
                  f"{100.0 * smart_kept / args.reps:>10.1f}% {100.0 * naive_kept / args.reps:>10.1f}% "
                  f"{fired:>14.1f}%" + ("   (background errors: shown apart)" if scenario.kind == "noisy" else ""))

    print()
    results = {}
    for rule in ("smart", "naive"):
        kept_bad, total_bad = counts[(rule, "revert")]
        kept_good, total_good = counts[(rule, "keep")]
        results[rule] = (100.0 * kept_bad / total_bad, 100.0 * kept_good / total_good)
        print(f"{rule:<6} false keeps (should-revert): {kept_bad}/{total_bad} = {results[rule][0]:.2f}%   "
              f"true keeps (should-keep): {kept_good}/{total_good} = {results[rule][1]:.2f}%")
    clean = 100.0 * harm_rule_on_clean[0] / harm_rule_on_clean[1]
    print(f"rules 4/5 fired on no-change and gain traffic without background errors: "
          f"{harm_rule_on_clean[0]}/{harm_rule_on_clean[1]} = {clean:.2f}%")
    print(f"elapsed {time.perf_counter() - started:.1f} s")

    false_keep, true_keep = results["smart"]
    if false_keep > MAX_FALSE_KEEP_PCT:
        missed.append(f"smart false-keep rate {false_keep:.2f}% > {MAX_FALSE_KEEP_PCT:g}%")
    if true_keep < MIN_TRUE_KEEP_PCT:
        missed.append(f"smart true-keep rate {true_keep:.2f}% < {MIN_TRUE_KEEP_PCT:g}%")
    if clean > MAX_HARM_RULE_ON_CLEAN_PCT:
        missed.append(f"rules 4/5 fired on clean traffic {clean:.2f}% > {MAX_HARM_RULE_ON_CLEAN_PCT:g}%")
    for line in missed:
        print(f"FAIL: {line}")
    if missed:
        return 1
    print(f"PASS: smart false keeps <= {MAX_FALSE_KEEP_PCT:g}%, true keeps >= {MIN_TRUE_KEEP_PCT:g}%, the bound "
          f"harms reverted >= {MIN_HARM_REVERT_PCT:g}%, rules 4/5 on clean traffic <= {MAX_HARM_RULE_ON_CLEAN_PCT:g}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
