"""`python3 smart.py decide` as a subprocess (SPEC.md "Command line", "The decision")."""

import json
import os
import sys
import random
import shutil
import tempfile
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from helpers import import_smart, rows_from, run_cli, write_csv

smart = import_smart()

SPEC_ARM_KEYS = {"n", "errors", "p50_ms", "p90_ms", "p99_ms", "err_pct"}
SPEC_KEYS = {"decision", "reason", "borderline", "baseline", "variant",
             "improve_pct", "err_delta_pct", "p_value", "confidence"}


class CliTestCase(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="smart-cli-")
        cls.home = os.path.join(cls.tmp, "home")
        os.mkdir(cls.home)
        rng = random.Random(20261127)
        base = [rng.gauss(100, 5) for _ in range(300)]
        fast = [rng.gauss(80, 5) for _ in range(300)]            # ~20% better
        codes = [503 if i % 50 == 0 else 200 for i in range(300)]
        cls.base = write_csv(os.path.join(cls.tmp, "baseline.csv"), rows_from(base, codes))
        cls.fast = write_csv(os.path.join(cls.tmp, "fast.csv"), rows_from(fast, codes))
        cls.same = write_csv(os.path.join(cls.tmp, "same.csv"),
                             rows_from([rng.gauss(100, 5) for _ in range(300)]))

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def decide(self, *args, env=None, home=None):
        return run_cli("--home", home or self.home, "decide", *args, env=env)

    def decide_json(self, *args, env=None, home=None):
        rc, out, err = self.decide("--json", *args, env=env, home=home)
        self.assertEqual(rc, 0, err)
        return json.loads(out)

    def assert_usage_error(self, rc, out, err, *mentions):
        """Exit 2, nothing on stdout, exactly one stderr line starting 'error:', no traceback."""
        self.assertEqual(rc, 2, err)
        self.assertEqual(out, "")
        self.assertNotIn("Traceback", err)
        lines = err.splitlines()
        self.assertEqual(len(lines), 1, err)
        self.assertTrue(lines[0].startswith("error:"), err)
        for mention in mentions:
            self.assertIn(mention, lines[0])


class DecideOutputTests(CliTestCase):
    def test_keep_on_stdout_summary_on_stderr(self):
        rc, out, err = self.decide(self.base, self.fast)
        self.assertEqual(rc, 0, err)
        self.assertEqual(out, "keep\n")
        self.assertIn("baseline", err)
        self.assertIn("variant", err)
        self.assertIn("p50", err)
        self.assertIn("p99", err)
        self.assertNotIn("Traceback", err)

    def test_look_judges_at_the_sequential_stops_alpha(self):
        fixed = self.decide_json(self.base, self.fast)
        quarter = self.decide_json(self.base, self.fast, "--look", "0.25")
        self.assertEqual(fixed["alpha"], 0.01)
        self.assertAlmostEqual(quarter["alpha"], smart.sequential_alpha(0.99, 0.25), delta=1e-9)
        self.assertEqual(quarter["fraction"], 0.25)
        for bad in ("0", "1.5", "x"):
            self.assert_usage_error(*self.decide(self.base, self.fast, "--look", bad), "--look")

    def test_revert_on_stdout_exit_0(self):
        rc, out, err = self.decide(self.base, self.same)
        self.assertEqual(rc, 0, err)
        self.assertEqual(out, "revert\n")
        self.assertIn("revert", err)

    def test_json_has_spec_keys(self):
        rc, out, err = self.decide("--json", self.base, self.fast)
        self.assertEqual(rc, 0, err)
        self.assertEqual(out.count("\n"), 1)               # one JSON object, one line
        data = json.loads(out)
        self.assertTrue(SPEC_KEYS <= set(data), SPEC_KEYS - set(data))
        for side in ("baseline", "variant"):
            self.assertTrue(SPEC_ARM_KEYS <= set(data[side]), SPEC_ARM_KEYS - set(data[side]))
        self.assertEqual(data["decision"], "keep")
        self.assertIsInstance(data["reason"], str)
        self.assertIsInstance(data["borderline"], bool)
        self.assertEqual(data["confidence"], 0.99)
        self.assertEqual(data["baseline"]["n"], 300)
        self.assertEqual(data["baseline"]["errors"], 6)
        self.assertAlmostEqual(data["baseline"]["err_pct"], 2.0)
        self.assertAlmostEqual(data["err_delta_pct"], 0.0)
        self.assertGreater(data["improve_pct"], 10)
        self.assertLess(data["p_value"], 0.01)
        for key in ("p50_ms", "p90_ms", "p99_ms"):
            self.assertIsInstance(data["variant"][key], float)

    def test_json_revert(self):
        data = self.decide_json(self.base, self.same)
        self.assertEqual(data["decision"], "revert")
        self.assertTrue(data["reason"].startswith("revert"))

    def test_json_is_strict_json(self):
        # No NaN/Infinity even when a baseline p50 is zero (improvement from zero is unbounded).
        zero = write_csv(os.path.join(self.tmp, "zero.csv"), rows_from([0.0] * 50))
        rc, out, err = self.decide("--json", zero, self.fast)
        self.assertEqual(rc, 0, err)
        json.loads(out, parse_constant=lambda name: self.fail(f"non-JSON constant {name} in {out}"))

    def test_byte_identical_twice(self):
        first = self.decide(self.base, self.fast)
        second = self.decide(self.base, self.fast)
        self.assertEqual(first, second)
        first = self.decide("--json", self.base, self.fast)
        second = self.decide("--json", self.base, self.fast)
        self.assertEqual(first, second)

    def test_options_before_command(self):
        rc, out, err = run_cli("--home", self.home, "decide", self.base, self.fast, "--json")
        self.assertEqual(rc, 0, err)
        self.assertEqual(json.loads(out)["decision"], "keep")

    def test_truncated_final_line_warns_but_decides(self):
        path = os.path.join(self.tmp, "truncated.csv")
        shutil.copy(self.fast, path)
        with open(path, "a") as handle:
            handle.write("1764274999.0,12.")
        rc, out, err = self.decide(self.base, path)
        self.assertEqual(rc, 0, err)
        self.assertEqual(out, "keep\n")
        self.assertIn("warning:", err)
        self.assertIn(f"{path}:", err)


class PrecedenceTests(CliTestCase):
    """flags > environment > --config FILE or HOME/smart.conf > defaults."""

    def setUp(self):
        self.home = tempfile.mkdtemp(prefix="smart-home-", dir=self.tmp)
        with open(os.path.join(self.home, "smart.conf"), "w") as handle:
            handle.write("# home settings\nCONFIDENCE=0.9\nIMPROVE_PCT=50\n")
        self.other = os.path.join(self.tmp, "other.conf")
        with open(self.other, "w") as handle:
            handle.write("CONFIDENCE=0.8\n")

    def test_home_conf_is_read(self):
        data = self.decide_json(self.base, self.fast)
        self.assertEqual(data["confidence"], 0.9)
        self.assertEqual(data["decision"], "revert")              # IMPROVE_PCT=50 from the file

    def test_environment_beats_home_conf(self):
        data = self.decide_json(self.base, self.fast, env={"CONFIDENCE": "0.95", "IMPROVE_PCT": "5"})
        self.assertEqual(data["confidence"], 0.95)
        self.assertEqual(data["decision"], "keep")

    def test_flag_beats_environment(self):
        data = self.decide_json("--confidence", "0.975", "--improve-pct", "60", self.base, self.fast,
                                env={"CONFIDENCE": "0.95", "IMPROVE_PCT": "5"})
        self.assertEqual(data["confidence"], 0.975)
        self.assertEqual(data["decision"], "revert")

    def test_config_flag_replaces_home_conf(self):
        rc, out, err = run_cli("--home", self.home, "--config", self.other, "decide", "--json",
                               self.base, self.fast)
        self.assertEqual(rc, 0, err)
        data = json.loads(out)
        self.assertEqual(data["confidence"], 0.8)
        self.assertEqual(data["decision"], "keep")                # IMPROVE_PCT back to its default

    def test_environment_beats_config_flag(self):
        rc, out, err = run_cli("--home", self.home, "--config", self.other, "decide", "--json",
                               self.base, self.fast, env={"CONFIDENCE": "0.95"})
        self.assertEqual(rc, 0, err)
        self.assertEqual(json.loads(out)["confidence"], 0.95)

    def test_smart_home_environment(self):
        rc, out, err = run_cli("decide", "--json", self.base, self.fast, env={"SMART_HOME": self.home})
        self.assertEqual(rc, 0, err)
        self.assertEqual(json.loads(out)["confidence"], 0.9)

    def test_min_samples_flag(self):
        data = self.decide_json("--min-samples", "301", "--improve-pct", "10", self.base, self.fast)
        self.assertEqual(data["decision"], "revert")
        self.assertIn("insufficient data", data["reason"])


class BadInputTests(CliTestCase):
    def test_missing_csv(self):
        missing = os.path.join(self.tmp, "missing.csv")
        self.assert_usage_error(*self.decide(self.base, missing), missing)

    def test_csv_is_directory(self):
        self.assert_usage_error(*self.decide(self.base, self.tmp), self.tmp)

    def test_malformed_row(self):
        path = write_csv(os.path.join(self.tmp, "bad.csv"),
                         rows_from([1.0, 2.0]) + [("1764274326", "fast", 200)] + rows_from([3.0]))
        self.assert_usage_error(*self.decide(self.base, path), f"{path}:4")

    def test_non_utf8_csv(self):
        path = os.path.join(self.tmp, "binary.csv")
        with open(path, "wb") as handle:
            handle.write(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe")
        self.assert_usage_error(*self.decide(self.base, path), path)

    def test_bad_flag_values(self):
        for flag, value, key in (("--improve-pct", "abc", "IMPROVE_PCT"),
                                 ("--improve-pct", "-1", "IMPROVE_PCT"),
                                 ("--confidence", "1.5", "CONFIDENCE"),
                                 ("--min-samples", "abc", "MIN_SAMPLES"),
                                 ("--max-err-delta-pct", "-2", "MAX_ERR_DELTA_PCT"),
                                 ("--max-tail-regress-pct", "nan", "MAX_TAIL_REGRESS_PCT")):
            with self.subTest(flag=flag, value=value):
                self.assert_usage_error(*self.decide(flag, value, self.base, self.fast), key)

    def test_flag_without_value(self):
        self.assert_usage_error(*self.decide(self.base, self.fast, "--confidence"))

    def test_unknown_flag(self):
        self.assert_usage_error(*self.decide("--frobnicate", self.base, self.fast))

    def test_bad_environment_value(self):
        self.assert_usage_error(*self.decide(self.base, self.fast, env={"MIN_SAMPLES": "abc"}), "MIN_SAMPLES")

    def test_bad_home_conf_value(self):
        home = tempfile.mkdtemp(dir=self.tmp)
        with open(os.path.join(home, "smart.conf"), "w") as handle:
            handle.write("# ok\nPHONE_HOME=sometimes\n")
        conf = os.path.join(home, "smart.conf")
        self.assert_usage_error(*self.decide(self.base, self.fast, home=home), "PHONE_HOME", f"{conf}:2")

    def test_malformed_home_conf_line(self):
        home = tempfile.mkdtemp(dir=self.tmp)
        conf = os.path.join(home, "smart.conf")
        with open(conf, "w") as handle:
            handle.write("IMPROVE_PCT=12\nthis is not a setting\n")
        self.assert_usage_error(*self.decide(self.base, self.fast, home=home), f"{conf}:2")

    def test_missing_config_file(self):
        missing = os.path.join(self.tmp, "nope.conf")
        self.assert_usage_error(*run_cli("--home", self.home, "--config", missing, "decide",
                                         self.base, self.fast), missing)

    def test_unknown_command(self):
        self.assert_usage_error(*run_cli("--home", self.home, "frobnicate"), "frobnicate")

    def test_no_command(self):
        self.assert_usage_error(*run_cli("--home", self.home))

    def test_missing_arguments(self):
        self.assert_usage_error(*run_cli("--home", self.home, "decide"))
        self.assert_usage_error(*run_cli("--home", self.home, "decide", self.base))

    def test_too_many_arguments(self):
        self.assert_usage_error(*run_cli("--home", self.home, "decide", self.base, self.fast, self.same))

    def test_unknown_conf_key_is_a_warning_not_an_error(self):
        home = tempfile.mkdtemp(dir=self.tmp)
        with open(os.path.join(home, "smart.conf"), "w") as handle:
            handle.write("IMPROVE_PERCENT=20\n")
        rc, out, err = self.decide(self.base, self.fast, home=home)
        self.assertEqual(rc, 0, err)
        self.assertEqual(out, "keep\n")
        self.assertIn("warning:", err)
        self.assertIn("IMPROVE_PERCENT", err)


if __name__ == "__main__":
    unittest.main()
