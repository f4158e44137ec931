"""The decision (SPEC.md "The decision"): smart.verdict on Arms, rule by rule at its boundary."""

import math
import os
import sys
import random
import tempfile
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from helpers import import_smart, rows_from, write_csv

smart = import_smart()

DEFAULTS = smart.load_settings(None, environ={})


def thresholds(**changes):
    settings = dict(DEFAULTS)
    settings.update({key.upper(): value for key, value in changes.items()})
    return smart.Thresholds(settings)


def arm(latencies, codes=None, blocks=None):
    result = smart.Arm()
    for i, latency in enumerate(latencies):
        result.add(latency, 200 if codes is None else codes[i], None if blocks is None else blocks[i])
    return result


def spread(center, n, step):
    """n distinct values center + (i - n//2) * step: the nearest-rank p50 of an odd n is `center`."""
    return [center + (i - n // 2) * step for i in range(n)]


def decide(base, var, **changes):
    return smart.verdict(base, var, thresholds(**changes))


class MinSamplesTests(unittest.TestCase):
    """Rule 1: both arms need MIN_SAMPLES successful samples."""

    def test_exactly_min_samples_keeps(self):
        result = decide(arm(range(100, 130)), arm(range(50, 80)))
        self.assertEqual(result.decision, "keep", result.reason)
        self.assertEqual(result.failed_rules, [])

    def test_one_short_in_variant_reverts(self):
        result = decide(arm(range(100, 130)), arm(range(50, 79)))
        self.assertEqual(result.decision, "revert")
        self.assertEqual(result.failed_rules, ["samples"])
        self.assertIn("insufficient data", result.reason)

    def test_one_short_in_baseline_reverts(self):
        result = decide(arm(range(100, 129)), arm(range(50, 80)))
        self.assertEqual(result.failed_rules, ["samples"])

    def test_errors_do_not_count_as_samples(self):
        # 30 rows in the variant, one of them an error: 29 successful samples.
        codes = [200] * 29 + [502]
        result = decide(arm(range(100, 130)), arm(range(50, 80), codes))
        self.assertEqual(result.decision, "revert")
        self.assertEqual(result.failed_rules, ["samples"])

    def test_min_samples_setting_is_used(self):
        base, var = arm(range(100, 110)), arm(range(50, 60))
        self.assertEqual(decide(base, var, min_samples=10).decision, "keep")
        self.assertEqual(decide(base, var, min_samples=11).failed_rules, ["samples"])

    def test_empty_arms_revert_without_exception(self):
        result = decide(smart.Arm(), smart.Arm())
        self.assertEqual(result.decision, "revert")
        self.assertEqual(result.failed_rules, ["samples"])
        self.assertFalse(result.borderline)


class ImprovementTests(unittest.TestCase):
    """Rule 2: (base_p50 - var_p50) / base_p50 * 100 >= IMPROVE_PCT."""

    def test_exactly_at_bar_keeps(self):
        base = arm(spread(100.0, 101, 0.1))          # p50 100.0
        var = arm(spread(90.0, 101, 0.1))            # p50 90.0: exactly 10%
        result = decide(base, var)
        self.assertEqual(result.baseline["p50_ms"], 100.0)
        self.assertEqual(result.variant["p50_ms"], 90.0)
        self.assertEqual(result.decision, "keep", result.reason)
        self.assertEqual(result.improve_pct, 10.0)

    def test_just_under_bar_reverts(self):
        base = arm(spread(100.0, 101, 0.1))
        var = arm(spread(90.001, 101, 0.1))          # 9.999%
        result = decide(base, var)
        self.assertEqual(result.decision, "revert")
        self.assertEqual(result.failed_rules, ["improvement"])
        self.assertIn("p50 improved only", result.reason)

    def test_custom_bar(self):
        base = arm(spread(100.0, 101, 0.1))
        var = arm(spread(80.0, 101, 0.1))
        self.assertEqual(decide(base, var, improve_pct=20.0).decision, "keep")
        self.assertEqual(decide(base, var, improve_pct=20.5).failed_rules, ["improvement"])

    def test_slower_variant_reverts(self):
        result = decide(arm(spread(100.0, 101, 0.1)), arm(spread(110.0, 101, 0.1)))
        self.assertEqual(result.decision, "revert")
        self.assertIn("improvement", result.failed_rules)
        self.assertIn("significance", result.failed_rules)
        self.assertLess(result.improve_pct, 0)


class SignificanceTests(unittest.TestCase):
    """Rule 3: a rank test, not a bare comparison of two medians."""

    def noisy(self):
        # Seed chosen so that 30 + 30 lognormal(sigma 0.9) samples, variant x0.8, show a big p50
        # gap by chance but no significant shift.
        rng = random.Random(14)
        base = arm([rng.lognormvariate(4.6, 0.9) for _ in range(30)])
        var = arm([rng.lognormvariate(4.6, 0.9) * 0.8 for _ in range(30)])
        return base, var

    def test_big_p50_gap_on_small_noisy_sample_reverts(self):
        result = decide(*self.noisy())
        self.assertGreaterEqual(result.improve_pct, 25.0)          # the precondition: a big gap
        self.assertGreater(result.p_value, 0.01)
        self.assertEqual(result.decision, "revert")
        self.assertEqual(result.failed_rules, ["significance"])
        self.assertIn("not significant", result.reason)

    def test_significance_alone_is_borderline(self):
        result = decide(*self.noisy())
        self.assertTrue(result.borderline)

    def test_lower_confidence_can_keep_the_same_data(self):
        base, var = self.noisy()
        loose = decide(base, var, confidence=0.5)
        self.assertLessEqual(loose.p_value, 0.5)
        self.assertEqual(loose.decision, "keep", loose.reason)

    def test_p_value_against_one_minus_confidence(self):
        # 5 vs 5 fully separated: exact p = 1 / C(10, 5) = 1/252 = 0.003968...
        base, var = arm([100, 101, 102, 103, 104]), arm([50, 51, 52, 53, 54])
        under = decide(base, var, min_samples=5, confidence=0.996)     # needs p <= 0.004
        over = decide(base, var, min_samples=5, confidence=0.9961)     # needs p <= 0.0039
        self.assertAlmostEqual(under.p_value, 1 / 252, delta=1e-8)    # reported to 6 significant digits
        self.assertEqual(under.decision, "keep", under.reason)
        self.assertEqual(over.failed_rules, ["significance"])


class ErrorRateTests(unittest.TestCase):
    """Rule 4: a variant with errors keeps only when the upper end of a one-sided 80% interval for its
    error-rate rise (Newcombe's hybrid score interval) is at most MAX_ERR_DELTA_PCT points."""

    BASE = spread(100.0, 1001, 0.01)
    VAR = spread(80.0, 1001, 0.01)

    def with_errors(self, values, errors, code=503):
        return arm(values + [5.0] * errors, [200] * len(values) + [code] * errors)

    def test_a_rise_whose_bound_is_within_the_limit_keeps(self):
        base = arm(self.BASE[:1000])
        var = self.with_errors(self.VAR[:995], 5)               # 0.5%: bound 0.77 points
        result = decide(base, var)
        self.assertEqual(result.err_delta_pct, 0.5)
        self.assertLess(result.err_rise_bound_pct, 1.0)
        self.assertEqual(result.decision, "keep", result.reason)

    def test_a_rise_at_the_old_point_limit_reverts_for_its_bound(self):
        # 1.0 point observed met the old point rule; the rise could well be more than 1 point
        base = arm(self.BASE[:1000])
        var = self.with_errors(self.VAR[:990], 10)
        result = decide(base, var)
        self.assertEqual(result.err_delta_pct, 1.0)
        self.assertGreater(result.err_rise_bound_pct, 1.0)
        self.assertEqual(result.decision, "revert")
        self.assertEqual(result.failed_rules, ["errors"])
        self.assertIn("error rate rose", result.reason)

    def test_two_errors_in_300_against_a_clean_baseline_revert(self):
        # 3% more 5xx at 300 requests per arm shows as few as two: the burden of proof is the variant's
        base, var = arm(self.BASE[:300]), self.with_errors(self.VAR[:298], 2)
        self.assertEqual(decide(base, var).failed_rules, ["errors"])
        self.assertEqual(decide(base, self.with_errors(self.VAR[:299], 1)).decision, "keep")

    def test_no_variant_errors_never_breaks_the_rule_however_few_requests(self):
        result = decide(arm(self.BASE[:30]), arm(self.VAR[:30]))
        self.assertIsNone(result.err_rise_bound_pct)
        self.assertNotIn("errors", result.failed_rules)

    def test_rise_is_relative_to_baseline_errors(self):
        base = self.with_errors(self.BASE[:980], 20)            # 2.0%
        var = self.with_errors(self.VAR[:978], 22)              # 2.2%: +0.2 point
        self.assertEqual(decide(base, var).decision, "keep")
        self.assertEqual(decide(arm(self.BASE[:1000]), var).failed_rules, ["errors"])

    def test_fewer_errors_than_baseline_is_fine(self):
        base = self.with_errors(self.BASE[:900], 100)
        var = arm(self.VAR[:1000])
        result = decide(base, var)
        self.assertEqual(result.decision, "keep", result.reason)
        self.assertLess(result.err_delta_pct, 0)

    def test_code_zero_counts_as_error(self):
        base = arm(self.BASE[:1000])
        var = self.with_errors(self.VAR[:980], 20, code=0)       # timeouts: 2.0%
        result = decide(base, var)
        self.assertEqual(result.failed_rules, ["errors"])


class TailTests(unittest.TestCase):
    """Rule 5: the p99 regresses by no more than MAX_TAIL_REGRESS_PCT (it counts as regressed when more
    than 1% of the variant's requests are slower than 1.25 x the baseline's median-unbiased p99, at
    99.5%); no percentile of the upper half lies that far above the baseline's where the variant's
    distribution is significantly above it (one-sided Kolmogorov-Smirnov at 99.5%); at most one extra
    request is slower than 8 x the baseline's p99, and few enough beyond the baseline's slowest."""

    @staticmethod
    def arms(var_p99):
        # 100 rows each: nearest-rank p99 is the 99th value.
        base = [50 + k * 0.25 for k in range(98)] + [100.0, 200.0]
        var = [30 + k * 0.25 for k in range(98)] + [var_p99, 130.0]
        return arm(base), arm(var)

    def test_regress_exactly_at_limit_keeps(self):
        result = decide(*self.arms(125.0))
        self.assertEqual(result.baseline["p99_ms"], 100.0)
        self.assertEqual(result.variant["p99_ms"], 125.0)
        self.assertEqual(result.p99_regress_pct, 25.0)
        self.assertEqual(result.decision, "keep", result.reason)

    def test_regress_just_over_limit_reverts(self):
        # At 100 requests the baseline's median-unbiased p99 is its slowest, 101 ms; six variant requests
        # over 1.25 x that: P(X >= 6 | 100, 1%) = 0.0005 <= 0.005.
        base = [50 + k * 0.25 for k in range(98)] + [100.0, 101.0]
        var = [30 + k * 0.25 for k in range(94)] + [127.0] * 6
        result = decide(arm(base), arm(var))
        self.assertEqual(result.decision, "revert")
        self.assertEqual(result.failed_rules, ["tail"])
        self.assertIn("p99", result.reason)
        four = [30 + k * 0.25 for k in range(96)] + [127.0] * 4    # P = 0.018: heavy tails do that
        self.assertEqual(decide(arm(base), arm(four)).decision, "keep")

    def test_two_requests_beyond_8_times_the_baselines_p99_revert(self):
        base = [50 + k * 0.25 for k in range(98)] + [100.0, 200.0]
        for slow, decision in ((1, "keep"), (2, "revert")):
            var = [30 + k * 0.25 for k in range(100 - slow)] + [801.0] * slow
            result = decide(arm(base), arm(var))
            self.assertEqual(result.decision, decision, result.reason)
            self.assertEqual(result.outliers["variant"], slow)
        self.assertIn("8 x the baseline's p99", result.reason)

    def test_a_cache_that_misses_more_often_regresses_the_upper_half(self):
        # hits 30% faster, but 40% misses instead of 20%: p50 improves, p99 does not move, p80 does
        rng = random.Random(7)
        base = [rng.lognormvariate(math.log(10 if i % 5 else 40), 0.1) for i in range(500)]
        var = [rng.lognormvariate(math.log(7 if i % 5 > 1 else 40), 0.1) for i in range(500)]
        result = decide(arm(base), arm(var))
        self.assertGreaterEqual(result.improve_pct, 10.0)
        self.assertEqual(result.failed_rules, ["tail"])
        self.assertIn("p80 regressed", result.reason)
        self.assertIn("Kolmogorov-Smirnov", result.reason)

    def test_one_slow_request_over_limit_is_noise(self):
        # p99 over the bound on the strength of two requests of 100 (P = 0.26): not a regression.
        result = decide(*self.arms(125.01))
        self.assertGreater(result.p99_regress_pct, 25.0)
        self.assertEqual(result.decision, "keep", result.reason)

    def test_faster_variant_with_slow_tail_is_reverted(self):
        # The variant is 20% faster for 97% of requests, but 3% are 10x slower.
        rng = random.Random(2026)
        base = arm([rng.lognormvariate(math.log(100), 0.1) for _ in range(1000)])
        var_values = []
        for i in range(1000):
            value = rng.lognormvariate(math.log(80), 0.1)
            var_values.append(value * 10 if i % 100 < 3 else value)
        result = decide(base, arm(var_values))
        self.assertGreaterEqual(result.improve_pct, 10.0)       # the p50 alone would keep it
        self.assertLess(result.p_value, 0.01)
        self.assertEqual(result.decision, "revert")
        self.assertEqual(result.failed_rules, ["tail"])
        self.assertIn("p99", result.reason)
        self.assertGreater(result.p99_regress_pct, 100)


class FloatBoundaryTests(unittest.TestCase):
    """A value exactly at a bar, written in decimal milliseconds / percent, must meet the bar.

    IEEE-754 arithmetic on decimal inputs lands a hair on the wrong side: (1.8 - 2.0) / 2.0 * 100
    is -9.999999999999998, 2.2 - 1.2 is 1.0000000000000002 and (1.5 - 1.2) / 1.2 * 100 is
    25.000000000000007.  SPEC.md's rules are ">=" / "<=", so these must keep.
    """

    def test_improvement_exactly_10_pct_in_decimal_ms(self):
        base = arm(spread(2.0, 101, 0.001))           # p50 2.0 ms
        var = arm(spread(1.8, 101, 0.001))            # p50 1.8 ms: exactly 10% better
        result = decide(base, var)
        self.assertEqual((result.baseline["p50_ms"], result.variant["p50_ms"]), (2.0, 1.8))
        self.assertEqual(result.decision, "keep", result.reason)

    def test_the_same_data_in_other_units_gets_the_same_verdict(self):
        # Rules work on exact figures, rounded only for display: a true 9.5% gain at ~0.01 ms is not
        # a 16.7% one because p50s of 0.0105 and 0.0095 ms round to 0.011 and 0.009.
        rng = random.Random(9)
        base_ms = [rng.lognormvariate(math.log(0.0105), 0.02) for _ in range(2000)]
        var_ms = [value * 0.905 for value in base_ms[:1000]] + [rng.lognormvariate(math.log(0.0095), 0.02)
                                                                  for _ in range(1000)]
        for scale in (1, 1000, 1e6):
            with self.subTest(scale=scale):
                result = decide(arm([v * scale for v in base_ms]), arm([v * scale for v in var_ms]))
                self.assertEqual(result.decision, "revert")
                self.assertEqual(result.failed_rules, ["improvement"])
                self.assertAlmostEqual(result.improve_pct, 9.5, delta=0.6)

    def test_tail_exactly_25_pct_in_decimal_ms(self):
        base = [0.5 + k * 0.0025 for k in range(98)] + [1.2, 2.0]     # p99 1.2 ms
        var = [0.3 + k * 0.0025 for k in range(98)] + [1.5, 1.6]      # p99 1.5 ms: +25% exactly
        result = decide(arm(base), arm(var))
        self.assertEqual((result.baseline["p99_ms"], result.variant["p99_ms"]), (1.2, 1.5))
        self.assertEqual(result.decision, "keep", result.reason)

    def test_borderline_exactly_3_points_above_bar_in_decimal_ms(self):
        base = arm(spread(20.0, 101, 0.001))          # p50 20.0 ms
        var = arm(spread(17.4, 101, 0.001))           # p50 17.4 ms: exactly 13% = bar + 3 points
        result = decide(base, var)
        self.assertEqual(result.decision, "keep", result.reason)
        self.assertTrue(result.borderline)


class ReasonTests(unittest.TestCase):
    def test_keep_reason(self):
        result = decide(arm(range(100, 130)), arm(range(50, 80)))
        self.assertTrue(result.reason.startswith("keep"))

    def test_several_failed_rules_all_named(self):
        base = arm(spread(100.0, 101, 0.1))
        var_values = spread(99.0, 101, 0.1)
        var_values[-4:] = [1000.0] * 4                           # p99 regresses, in 4 of 101 requests
        var = arm(var_values + [1.0] * 10, [200] * 101 + [500] * 10)
        result = decide(base, var)
        self.assertEqual(result.decision, "revert")
        for rule in ("errors", "tail", "improvement", "significance"):
            self.assertIn(rule, result.failed_rules)
        self.assertIn("error rate", result.reason)
        self.assertIn("p99", result.reason)
        self.assertIn("p50 improved only", result.reason)
        self.assertIn("not significant", result.reason)


class BorderlineTests(unittest.TestCase):
    """Borderline: within 3 points of IMPROVE_PCT, or rule 3 alone decided it."""

    @staticmethod
    def improved_by(pct):
        base = arm(spread(100.0, 101, 0.01))
        var = arm(spread(100.0 - pct, 101, 0.01))
        return decide(base, var)

    def test_keep_within_3_points_is_borderline(self):
        for pct in (10.0, 12.0, 13.0):
            with self.subTest(pct=pct):
                result = self.improved_by(pct)
                self.assertEqual(result.decision, "keep")
                self.assertTrue(result.borderline)

    def test_keep_well_above_bar_is_not_borderline(self):
        for pct in (13.5, 30.0):
            with self.subTest(pct=pct):
                result = self.improved_by(pct)
                self.assertEqual(result.decision, "keep")
                self.assertFalse(result.borderline)

    def test_revert_within_3_points_is_borderline(self):
        result = self.improved_by(7.5)
        self.assertEqual(result.failed_rules, ["improvement"])
        self.assertTrue(result.borderline)

    def test_revert_well_below_bar_is_not_borderline(self):
        result = self.improved_by(6.0)
        self.assertEqual(result.failed_rules, ["improvement"])
        self.assertFalse(result.borderline)

    def test_insufficient_data_is_not_borderline(self):
        result = decide(arm(spread(100.0, 21, 0.1)), arm(spread(89.0, 21, 0.1)))
        self.assertEqual(result.failed_rules, ["samples"])
        self.assertFalse(result.borderline)


class ErrorRowsTests(unittest.TestCase):
    """Error rows (code 0 and 5xx) are counted in err_pct and left out of the percentiles."""

    def test_errors_excluded_from_percentiles_and_counted(self):
        a = smart.Arm()
        for value in range(1, 101):
            a.add(float(value), 200)
        for code in (0, 500, 502, 503, 504, 599):
            a.add(100000.0, code)              # huge latencies that would dominate p99 if counted
        a.add(0.5, 0)
        self.assertEqual(a.total, 107)
        self.assertEqual(a.errors, 7)
        self.assertEqual(a.ok, 100)
        figures = smart.summarize(a, sorted(a.latencies))
        self.assertEqual(figures["n"], 107)
        self.assertEqual(figures["errors"], 7)
        self.assertEqual(figures["p50_ms"], 50.0)
        self.assertEqual(figures["p90_ms"], 90.0)
        self.assertEqual(figures["p99_ms"], 99.0)
        self.assertAlmostEqual(figures["err_pct"], round(700 / 107, 4), places=9)

    def test_4xx_and_3xx_are_successes(self):
        a = smart.Arm()
        for code in (200, 204, 301, 304, 400, 404, 429, 499):
            a.add(10.0, code)
        self.assertEqual((a.total, a.errors, a.ok), (8, 0, 8))

    def test_verdict_figures_match(self):
        base = arm([float(v) for v in range(1, 101)])
        var = arm([float(v) for v in range(1, 101)] + [9999.0, 9999.0], [200] * 100 + [0, 500])
        result = decide(base, var)
        self.assertEqual(result.variant["n"], 102)
        self.assertEqual(result.variant["errors"], 2)
        self.assertEqual(result.variant["p99_ms"], 99.0)
        self.assertAlmostEqual(result.variant["err_pct"], round(200 / 102, 4), places=9)


class BlockedVerdictTests(unittest.TestCase):
    def test_blocks_make_a_consistent_shift_significant(self):
        # Six blocks at very different load levels; the variant is 10% faster in each block.
        rng = random.Random(8)
        base_values, var_values, blocks = [], [], []
        for block, level in enumerate((10.0, 100.0, 1000.0, 30.0, 300.0, 3000.0)):
            for _ in range(40):
                base_values.append(level * rng.uniform(0.85, 1.15))
                var_values.append(level * 0.9 * rng.uniform(0.85, 1.15))
                blocks.append(block)
        t = thresholds(improve_pct=0.0, max_tail_regress_pct=1000.0)
        blocked = smart.verdict(arm(base_values, blocks=blocks), arm(var_values, blocks=blocks), t)
        plain = smart.verdict(arm(base_values), arm(var_values), t)
        self.assertIn("van Elteren", blocked.test)
        self.assertIn("block medians", blocked.test)
        self.assertEqual(plain.decision, "revert")           # pooled, the load levels drown the shift
        self.assertEqual(blocked.decision, "keep", blocked.reason)
        self.assertAlmostEqual(blocked.improve_pct, 10.0, delta=3.0)

    def test_drift_between_blocks_is_not_an_effect(self):
        # No effect, but latency falls 10% from each block to the next; half the pairs run the
        # variant second, so a naive within-pair comparison sees gains and losses of 10%.
        rng = random.Random(9)
        base, var = smart.Arm(), smart.Arm()
        level, clock = 100.0, 0.0
        for block in range(6):
            halves = (var, base) if block % 2 == 0 else (base, var)
            for half in halves:
                for _ in range(60):
                    half.add(level * rng.uniform(0.97, 1.03), 200, block, clock)
                level *= 0.9
                clock += 10
        result = smart.verdict(base, var, thresholds(improve_pct=0.0))
        self.assertEqual(result.decision, "revert", result.reason)
        self.assertIn("significance", result.failed_rules)
        self.assertLess(abs(result.improve_pct), 3.0)

class FromCsvTests(unittest.TestCase):
    def test_decide_files(self):
        rng = random.Random(77)
        with tempfile.TemporaryDirectory() as tmp:
            base_csv = write_csv(os.path.join(tmp, "baseline.csv"),
                                 rows_from([rng.gauss(100, 5) for _ in range(200)]))
            var_csv = write_csv(os.path.join(tmp, "variant.csv"),
                                rows_from([rng.gauss(70, 5) for _ in range(200)]))
            result = smart.decide_files(base_csv, var_csv, thresholds())
            again = smart.decide_files(base_csv, var_csv, thresholds())
        self.assertEqual(result.decision, "keep", result.reason)
        self.assertEqual(result.to_json(), again.to_json())
        self.assertEqual(result.baseline["n"], 200)


if __name__ == "__main__":
    unittest.main()
