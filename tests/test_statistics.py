"""Statistics of smart.py: percentile, rank_test, exact_u_cdf, median_ratio_interval.

Reference values from scipy were computed once (scipy 1.17.1) and are hard-coded here;
the tests themselves import nothing but the standard library.
"""

import math
import os
import random
import sys
import unittest
from fractions import Fraction

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from helpers import import_smart

smart = import_smart()


def naive_u_faster(base, var):
    """Pairs (b, v) with v < b, ties counting half: the U of "variant faster", by brute force."""
    return sum(1.0 if v < b else 0.5 if v == b else 0.0 for b in base for v in var)


def average_ranks(values):
    """Average (mid) ranks of values, 1-based, by brute force."""
    order = sorted(values)
    first = {}
    last = {}
    for index, value in enumerate(order, 1):
        first.setdefault(value, index)
        last[value] = index
    return [(first[value] + last[value]) / 2 for value in values]


def naive_van_elteren_p(strata):
    """One-sided p that the variant is faster: van Elteren (weights 1/(N+1)) on rank sums, tie-corrected.

    An independent textbook formulation (rank sums instead of U) used as a reference.
    """
    statistic = variance = 0.0
    for base, var in strata:
        n1, n2 = len(base), len(var)
        big_n = n1 + n2
        ranks = average_ranks(list(base) + list(var))
        w_base = sum(ranks[:n1])                      # a large baseline rank sum = variant faster
        counts = {}
        for value in list(base) + list(var):
            counts[value] = counts.get(value, 0) + 1
        ties = sum(t ** 3 - t for t in counts.values())
        weight = 1.0 / (big_n + 1)
        statistic += weight * (w_base - n1 * (big_n + 1) / 2)
        variance += weight ** 2 * (n1 * n2 / 12) * ((big_n + 1) - ties / (big_n * (big_n - 1)))
    z = statistic / math.sqrt(variance)
    return 0.5 * math.erfc(z / math.sqrt(2))


class PercentileTests(unittest.TestCase):
    """Nearest rank: the smallest value with at least p% of the data at or below it (rank ceil(p*n/100))."""

    def check(self, n, expected):
        values = list(range(1, n + 1))             # value == rank, so the expected value is the rank
        for pct, rank in expected.items():
            with self.subTest(n=n, pct=pct):
                self.assertEqual(smart.percentile(values, pct), rank)

    def test_n1(self):
        self.check(1, {50: 1, 90: 1, 99: 1})

    def test_n10(self):
        # ceil(5) = 5, ceil(9) = 9, ceil(9.9) = 10
        self.check(10, {50: 5, 90: 9, 99: 10})

    def test_n100(self):
        # ceil(50) = 50, ceil(90) = 90, ceil(99) = 99: exact products, no off-by-one upward
        self.check(100, {50: 50, 90: 90, 99: 99})

    def test_n101(self):
        # ceil(50.5) = 51, ceil(90.9) = 91, ceil(99.99) = 100
        self.check(101, {50: 51, 90: 91, 99: 100})

    def test_n10_with_real_values(self):
        values = sorted([12.5, 3.25, 7.0, 100.0, 9.5, 8.0, 1.0, 55.5, 20.0, 4.75])
        # sorted: 1.0 3.25 4.75 7.0 8.0 9.5 12.5 20.0 55.5 100.0
        self.assertEqual(smart.percentile(values, 50), 8.0)
        self.assertEqual(smart.percentile(values, 90), 55.5)
        self.assertEqual(smart.percentile(values, 99), 100.0)

    def test_extremes_and_empty(self):
        values = [1.0, 2.0, 3.0]
        self.assertEqual(smart.percentile(values, 0), 1.0)
        self.assertEqual(smart.percentile(values, 100), 3.0)
        self.assertIsNone(smart.percentile([], 50))

    def test_is_an_observed_value(self):
        values = [10.0, 20.0]
        self.assertEqual(smart.percentile(values, 50), 10.0)   # no interpolation to 15


class ExactDistributionTests(unittest.TestCase):
    """exact_u_cdf(u, n1, n2) = P(U <= u) under H0 for untied samples."""

    def test_three_by_three_smallest_value(self):
        # 6 choose 3 = 20 equally likely arrangements; U = 0 for exactly one of them.
        self.assertAlmostEqual(smart.exact_u_cdf(0, 3, 3), 1 / 20, places=15)

    def test_three_by_three_full_table(self):
        # Frequencies of U for m = n = 3 (Gaussian binomial [6 choose 3]_q): 1 1 2 3 3 3 3 2 1 1
        frequencies = [1, 1, 2, 3, 3, 3, 3, 2, 1, 1]
        cumulative = 0
        for u, count in enumerate(frequencies):
            cumulative += count
            with self.subTest(u=u):
                self.assertAlmostEqual(smart.exact_u_cdf(u, 3, 3), cumulative / 20, places=12)

    def test_two_by_three_table(self):
        # 5 choose 2 = 10; U frequencies 1 1 2 2 2 1 1
        self.assertAlmostEqual(smart.exact_u_cdf(2, 2, 3), 4 / 10, places=12)
        self.assertAlmostEqual(smart.exact_u_cdf(2, 3, 2), 4 / 10, places=12)

    def test_total_mass_is_one(self):
        for n1, n2 in ((1, 1), (3, 3), (4, 7), (10, 5), (20, 25)):
            with self.subTest(n1=n1, n2=n2):
                self.assertAlmostEqual(smart.exact_u_cdf(n1 * n2, n1, n2), 1.0, places=12)
                self.assertAlmostEqual(smart.exact_u_cdf(n1 * n2 + 5, n1, n2), 1.0, places=12)
                self.assertEqual(smart.exact_u_cdf(-1, n1, n2), 0.0)

    def test_symmetry(self):
        # U and n1*n2 - U have the same distribution: P(U <= u) = P(U >= n1n2 - u) = 1 - P(U <= n1n2 - u - 1)
        for n1, n2 in ((3, 3), (4, 7), (6, 5)):
            top = n1 * n2
            for u in range(top + 1):
                with self.subTest(n1=n1, n2=n2, u=u):
                    self.assertAlmostEqual(smart.exact_u_cdf(u, n1, n2),
                                           1.0 - smart.exact_u_cdf(top - u - 1, n1, n2), places=12)

    def test_argument_order_does_not_matter(self):
        for u in range(0, 29):
            self.assertAlmostEqual(smart.exact_u_cdf(u, 4, 7), smart.exact_u_cdf(u, 7, 4), places=14)

    def test_matches_brute_force_enumeration(self):
        # Enumerate every split of ranks 1..7 into 3 + 4 and count U directly.
        from itertools import combinations
        n1, n2 = 3, 4
        counts = [0] * (n1 * n2 + 1)
        for chosen in combinations(range(n1 + n2), n1):
            rest = [i for i in range(n1 + n2) if i not in chosen]
            counts[sum(1 for a in chosen for b in rest if a < b)] += 1
        total = sum(counts)
        for u in range(n1 * n2 + 1):
            expected = Fraction(sum(counts[: u + 1]), total)
            self.assertAlmostEqual(smart.exact_u_cdf(u, n1, n2), float(expected), places=12)


class RankTestTextbookTests(unittest.TestCase):
    def test_hollander_wolfe_permeability_example(self):
        # Hollander, Wolfe & Chicken, Nonparametric Statistical Methods, Example 4.1 (also R's
        # ?wilcox.test example): permeability at term (x) vs 12-26 weeks (y); alternative "x greater".
        # Published: W = 35 (pairs with x > y), one-sided exact p = 0.1272.
        # Here the variant is y: "variant faster" means y smaller, i.e. the same one-sided question.
        # scipy.stats.mannwhitneyu(x, y, alternative='greater', method='exact') -> 35, 0.1272061272061272
        # = 382 / 3003 (3003 = 15 choose 5).
        x = [0.80, 0.83, 1.89, 1.04, 1.45, 1.38, 1.91, 1.64, 0.73, 1.46]
        y = [1.15, 0.88, 0.90, 0.74, 1.21]
        result = smart.rank_test([(sorted(x), sorted(y))])
        self.assertEqual(result["u"], 35)
        self.assertAlmostEqual(result["p_value"], 0.1272, delta=5e-5)
        self.assertAlmostEqual(result["p_value"], 382 / 3003, places=12)
        self.assertIn("exact", result["method"])

    def test_scipy_docs_diabetes_example(self):
        # scipy.stats.mannwhitneyu docs: ages at diagnosis, males [19, 22, 16, 29, 24] vs
        # females [20, 11, 17, 12]: U1 = 17, two-sided exact p = 0.1111, so one-sided 0.0556 (= 7/126).
        males = [19, 22, 16, 29, 24]
        females = [20, 11, 17, 12]
        result = smart.rank_test([(sorted(males), sorted(females))])
        self.assertEqual(result["u"], 17)
        self.assertAlmostEqual(result["p_value"], 7 / 126, places=12)

    def test_orientation_variant_slower_gives_large_p(self):
        x = [0.80, 0.83, 1.89, 1.04, 1.45, 1.38, 1.91, 1.64, 0.73, 1.46]
        y = [1.15, 0.88, 0.90, 0.74, 1.21]
        # Swap roles: now the variant is x, which is slower.  p = P(U >= 15) = 1 - P(U <= 14).
        result = smart.rank_test([(sorted(y), sorted(x))])
        self.assertEqual(result["u"], 15)
        self.assertAlmostEqual(result["p_value"], 1 - smart.exact_u_cdf(14, 5, 10), places=12)
        self.assertGreater(result["p_value"], 0.5)

    def test_exact_path_larger_untied_sample(self):
        # 40 x 60 = 2400 <= EXACT_LIMIT, no ties.
        # scipy.stats.mannwhitneyu(var, base, alternative='less', method='exact') -> U=901, p=0.01764229514402274
        base = [100 + ((i * 37) % 97) + i / 1000 for i in range(40)]
        var = [90 + ((i * 53) % 89) + i / 997 + 0.0001 for i in range(60)]
        self.assertEqual(len(set(base + var)), 100)
        result = smart.rank_test([(sorted(base), sorted(var))])
        self.assertIn("exact", result["method"])
        self.assertEqual(result["u"], 40 * 60 - 901)
        self.assertAlmostEqual(result["p_value"], 0.01764229514402274, places=12)

    def test_u_matches_brute_force(self):
        rng = random.Random(3)
        base = sorted(rng.choice(range(20)) for _ in range(25))
        var = sorted(rng.choice(range(18)) for _ in range(30))
        self.assertEqual(smart.rank_test([(base, var)])["u"], naive_u_faster(base, var))


class RankTestNormalTests(unittest.TestCase):
    """The normal approximation with tie and continuity correction vs scipy."""

    BASE = [(i * 7) % 23 + 10 for i in range(60)]      # integers: many ties
    VAR = [(i * 5) % 19 + 8 for i in range(50)]

    def test_ties_variant_faster_matches_scipy(self):
        # scipy.stats.mannwhitneyu(VAR, BASE, alternative='less', method='asymptotic',
        #                          use_continuity=True) -> U=983.5, p=0.0009657658670620368
        # (equivalently mannwhitneyu(BASE, VAR, alternative='greater', ...) -> U=2016.5, same p)
        result = smart.rank_test([(sorted(self.BASE), sorted(self.VAR))])
        self.assertIn("normal", result["method"])
        self.assertEqual(result["u"], 2016.5)
        self.assertAlmostEqual(result["p_value"], 0.0009657658670620368, delta=1e-12)

    def test_ties_variant_slower_matches_scipy(self):
        # Roles swapped: scipy.stats.mannwhitneyu(BASE, VAR, alternative='less', method='asymptotic',
        #                use_continuity=True) -> U=2016.5, p=0.9990536481787119
        result = smart.rank_test([(sorted(self.VAR), sorted(self.BASE))])
        self.assertEqual(result["u"], 983.5)
        self.assertAlmostEqual(result["p_value"], 0.9990536481787119, delta=1e-12)

    def test_untied_above_exact_limit_matches_scipy(self):
        # 60 x 50 = 3000 > EXACT_LIMIT, all 110 values distinct.
        # scipy.stats.mannwhitneyu(var, base, alternative='less', method='asymptotic',
        #                          use_continuity=True) -> U=1179.0, p=0.02717965949310506
        base = [100 + (i * 37) % 101 + i / 1000 for i in range(60)]
        var = [95 + (i * 53) % 89 + i / 997 + 0.0001 for i in range(50)]
        self.assertEqual(len(set(base + var)), 110)
        result = smart.rank_test([(sorted(base), sorted(var))])
        self.assertIn("normal", result["method"])
        self.assertEqual(result["u"], 60 * 50 - 1179)
        self.assertAlmostEqual(result["p_value"], 0.02717965949310506, delta=1e-12)

    def test_all_tied_and_empty(self):
        tied = smart.rank_test([([5.0] * 10, [5.0] * 10)])
        self.assertEqual(tied["p_value"], 1.0)
        self.assertEqual(smart.rank_test([([], [1.0, 2.0])])["p_value"], 1.0)
        self.assertEqual(smart.rank_test([])["p_value"], 1.0)

    def test_identical_samples_not_significant(self):
        values = sorted(float(i % 13) for i in range(100))
        self.assertGreater(smart.rank_test([(values, list(values))])["p_value"], 0.4)


class VanElterenTests(unittest.TestCase):
    @staticmethod
    def blocks(seed=7, shift=0.95, per_block=20, levels=(10.0, 100.0, 1000.0)):
        rng = random.Random(seed)
        strata = []
        for level in levels:
            base = sorted(level * rng.uniform(0.9, 1.1) for _ in range(per_block))
            var = sorted(level * shift * rng.uniform(0.9, 1.1) for _ in range(per_block))
            strata.append((base, var))
        return strata

    def test_same_shift_in_every_block_beats_pooled_test(self):
        # Block levels differ 10x; the variant is 5% faster in each.  Pooling mixes the block
        # effect into the noise; stratifying removes it, so the stratified p is much smaller.
        strata = self.blocks()
        pooled_base = sorted(x for b, _ in strata for x in b)
        pooled_var = sorted(x for _, v in strata for x in v)
        stratified = smart.rank_test(strata)
        pooled = smart.rank_test([(pooled_base, pooled_var)])
        self.assertIn("van Elteren", stratified["method"])
        self.assertLess(stratified["p_value"], pooled["p_value"])
        self.assertLess(stratified["p_value"], 0.01)
        self.assertGreater(pooled["p_value"], 0.05)

    def test_matches_independent_rank_sum_formulation(self):
        strata = self.blocks()
        self.assertAlmostEqual(smart.rank_test(strata)["p_value"], naive_van_elteren_p(strata), delta=1e-12)

    def test_matches_independent_formulation_with_ties(self):
        strata = [
            (sorted([10, 11, 11, 12, 13, 13, 13, 14]), sorted([9, 10, 10, 11, 12, 12])),
            (sorted([100, 101, 101, 103, 104]), sorted([98, 99, 101, 101, 102, 102, 103])),
        ]
        self.assertAlmostEqual(smart.rank_test(strata)["p_value"], naive_van_elteren_p(strata), delta=1e-12)

    def test_empty_blocks_are_dropped(self):
        strata = self.blocks()
        with_empty = strata + [([], [1.0, 2.0]), ([3.0], [])]
        self.assertEqual(smart.rank_test(with_empty), smart.rank_test(strata))

    def test_no_shift_is_not_significant(self):
        self.assertGreater(smart.rank_test(self.blocks(shift=1.0, seed=11))["p_value"], 0.05)


class MedianRatioIntervalTests(unittest.TestCase):
    @staticmethod
    def sample(rng, n, median, sigma=0.3):
        return sorted(rng.lognormvariate(math.log(median), sigma) for _ in range(n))

    def test_contains_true_ratio_large_sample(self):
        rng = random.Random(20261127)
        base = self.sample(rng, 3000, 100.0)
        var = self.sample(rng, 3000, 80.0)
        low, high = smart.median_ratio_interval(base, var, 0.99)
        self.assertLess(low, 0.8)
        self.assertGreater(high, 0.8)
        self.assertGreater(low, 0.7)             # and it is informative, not (0, inf)
        self.assertLess(high, 0.9)

    def test_contains_true_ratio_moderate_sample(self):
        rng = random.Random(42)
        base = self.sample(rng, 400, 50.0)
        var = self.sample(rng, 500, 45.0)
        low, high = smart.median_ratio_interval(base, var, 0.95)
        self.assertLess(low, 0.9)
        self.assertGreater(high, 0.9)

    def test_higher_confidence_is_wider(self):
        rng = random.Random(5)
        base = self.sample(rng, 300, 100.0)
        var = self.sample(rng, 300, 90.0)
        low95, high95 = smart.median_ratio_interval(base, var, 0.95)
        low99, high99 = smart.median_ratio_interval(base, var, 0.99)
        self.assertLess(low99, low95)
        self.assertGreater(high99, high95)

    def test_too_short_input_is_none(self):
        self.assertIsNone(smart.median_ratio_interval([], [1.0, 2.0, 3.0], 0.99))
        self.assertIsNone(smart.median_ratio_interval([1.0], [1.0, 2.0, 3.0], 0.99))
        self.assertIsNone(smart.median_ratio_interval([1.0, 2.0, 3.0], [2.0], 0.99))

    def test_zero_latencies_give_none_not_an_exception(self):
        self.assertIsNone(smart.median_ratio_interval([0.0] * 50, [0.0] * 50, 0.99))


class DeterminismTests(unittest.TestCase):
    def test_rank_test_same_input_same_dict(self):
        rng = random.Random(99)
        base = sorted(round(rng.uniform(10, 20), 1) for _ in range(200))
        var = sorted(round(rng.uniform(9, 19), 1) for _ in range(180))
        first = smart.rank_test([(list(base), list(var))])
        second = smart.rank_test([(list(base), list(var))])
        self.assertEqual(first, second)

    def test_rank_test_does_not_mutate_input(self):
        base = [1.0, 2.0, 3.0, 4.0]
        var = [0.5, 1.5, 2.5]
        smart.rank_test([(base, var)])
        self.assertEqual(base, [1.0, 2.0, 3.0, 4.0])
        self.assertEqual(var, [0.5, 1.5, 2.5])

    def test_verdict_same_input_identical_dict(self):
        rng = random.Random(1234)
        base_values = [rng.lognormvariate(4.6, 0.2) for _ in range(500)]
        var_values = [rng.lognormvariate(4.4, 0.2) for _ in range(500)]
        thresholds = smart.Thresholds(smart.load_settings(None, environ={}))

        def build():
            base, var = smart.Arm(), smart.Arm()
            for i, value in enumerate(base_values):
                base.add(value, 503 if i % 97 == 0 else 200)
            for value in var_values:
                var.add(value, 200)
            return smart.verdict(base, var, thresholds).to_json()

        self.assertEqual(build(), build())


if __name__ == "__main__":
    unittest.main()
