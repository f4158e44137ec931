"""Settings (SPEC.md "Settings"): smart.parse_conf and smart.load_settings."""

import contextlib
import io
import os
import sys
import shutil
import tempfile
import unittest
from unittest import mock

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from helpers import import_smart

smart = import_smart()

# The table in SPEC.md "Settings (smart.conf and environment)".
DOCUMENTED_DEFAULTS = {
    "BASELINE_SECONDS": 300,
    "EXPERIMENT_SECONDS": 300,
    "COOLDOWN_SECONDS": 60,
    "IMPROVE_PCT": 10,
    "MAX_ERR_DELTA_PCT": 1.0,
    "CONFIDENCE": 0.99,
    "MIN_SAMPLES": 30,
    "MAX_TAIL_REGRESS_PCT": 25,
    "COMMAND_TIMEOUT_SECONDS": 60,
    "KEEP_RUNS": 200,
    "PHONE_HOME": "borderline",
    "PHONE_HOME_URL": "",
    "PHONE_HOME_TOKEN": "",
    # Added by the switchback/guardrail/sequential-stop issue (documented in README.md).
    "DESIGN": "switchback",
    "BLOCKS": 12,
    "WARMUP_SECONDS": 5,
    "EARLY_STOP": "yes",
    "LOOK_SECONDS": 5,
    # Added by the fleet issue (apply's check) and for the timer's rotation.
    "VERIFY_SECONDS": 60,
    "RETRY_HOURS": 24,
    # Added by the phone-home issue: the model of an Ollama-style local coach.
    "PHONE_HOME_MODEL": "llama3.2",
    # Added by the catalogue issue: where a helper's experiment measures, and what runs a helper.
    "SITE_URL": "http://127.0.0.1",
    "SITE_TLS_URL": "https://127.0.0.1",
    "HELPER_COMMAND": "sudo -n /usr/local/sbin/",
    # Added by the adapting issue: re-checks and visitors' timings.
    "RECHECK_DAYS": 7.0,
    "ACCESS_LOG": "/var/log/nginx/smart-timing.log",
}

# For every key, values that must be refused (exit 2 naming the key).
BAD_VALUES = {
    "BASELINE_SECONDS": ["0", "-5", "abc", "nan", "inf", ""],
    "EXPERIMENT_SECONDS": ["0", "-1", "five"],
    "COOLDOWN_SECONDS": ["-1", "x", "inf"],
    "IMPROVE_PCT": ["-1", "100", "150", "ten", "nan"],
    "MAX_ERR_DELTA_PCT": ["-0.5", "101", "x"],
    "CONFIDENCE": ["1.5", "1", "0.4", "99", "high", "-0.9"],
    "MIN_SAMPLES": ["abc", "1", "0", "-3", "2.5", "30.0"],
    "MAX_TAIL_REGRESS_PCT": ["-1", "lots", "inf"],
    "COMMAND_TIMEOUT_SECONDS": ["0", "-10", "x"],
    "KEEP_RUNS": ["0", "-1", "many", "1.5"],
    "PHONE_HOME": ["sometimes", "yes", "NEVER", "1"],
    "PHONE_HOME_URL": ["ftp://x", "coach.example.com", "http//x", "file:///etc/passwd", "http://"],
    "SITE_URL": ["ftp://x", "127.0.0.1", "http://host/path", "http://a b", ""],
    "SITE_TLS_URL": ["http://127.0.0.1", "https://host/path", ""],
    "HELPER_COMMAND": ["sudo; rm -rf /", "a|b", "$(id)"],
    "RECHECK_DAYS": ["-1", "week", "nan", "inf"],
    "ACCESS_LOG": ["relative/log", "/var/log/with space", ""],
}

GOOD_VALUES = {
    "BASELINE_SECONDS": ("0.5", 0.5),
    "COOLDOWN_SECONDS": ("0", 0.0),
    "IMPROVE_PCT": ("0", 0.0),
    "MAX_ERR_DELTA_PCT": ("0", 0.0),
    "CONFIDENCE": ("0.5", 0.5),
    "MIN_SAMPLES": ("2", 2),
    "KEEP_RUNS": ("1", 1),
    "PHONE_HOME": ("always", "always"),
    "PHONE_HOME_URL": ("https://coach.example.com/api/v1", "https://coach.example.com/api/v1"),
    "PHONE_HOME_TOKEN": ("s3cr3t", "s3cr3t"),
    "SITE_URL": ("http://127.0.0.1:8080", "http://127.0.0.1:8080"),
    "RECHECK_DAYS": ("0", 0.0),
    "HELPER_COMMAND": ("", ""),
}


class SettingsTestCase(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="smart-conf-")
        self.addCleanup(shutil.rmtree, self.tmp, ignore_errors=True)

    def conf(self, text, name="smart.conf"):
        path = os.path.join(self.tmp, name)
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(text)
        return path

    def load(self, conf_path=None, environ=None, overrides=None, **kwargs):
        """load_settings, returning (settings, captured stderr)."""
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            values = smart.load_settings(conf_path, environ={} if environ is None else environ,
                                         overrides=overrides, **kwargs)
        return values, err.getvalue()


class ParseConfTests(SettingsTestCase):
    def test_comments_quotes_export_blank_lines(self):
        text = "\n".join([
            "# a comment",
            "",
            "   # an indented comment",
            "IMPROVE_PCT=15",
            "export CONFIDENCE=0.95",
            'PHONE_HOME_TOKEN="two words"',
            "PHONE_HOME='always'",
            "MIN_SAMPLES=50   # trailing comment",
            "   ",
            "KEEP_RUNS = 20",
            "PHONE_HOME_URL=",
        ]) + "\n"
        raw = smart.parse_conf(text, "smart.conf")
        values = {key: value for key, (value, _) in raw.items()}
        self.assertEqual(values, {
            "IMPROVE_PCT": "15",
            "CONFIDENCE": "0.95",
            "PHONE_HOME_TOKEN": "two words",
            "PHONE_HOME": "always",
            "MIN_SAMPLES": "50",
            "KEEP_RUNS": "20",
            "PHONE_HOME_URL": "",
        })
        self.assertEqual(raw["IMPROVE_PCT"][1], "smart.conf:4")
        self.assertEqual(raw["KEEP_RUNS"][1], "smart.conf:10")

    def test_quoted_hash_is_not_a_comment(self):
        raw = smart.parse_conf('PHONE_HOME_TOKEN="abc#def"\n', "c")
        self.assertEqual(raw["PHONE_HOME_TOKEN"][0], "abc#def")

    def test_later_line_wins(self):
        raw = smart.parse_conf("IMPROVE_PCT=5\nIMPROVE_PCT=7\n", "c")
        self.assertEqual(raw["IMPROVE_PCT"], ("7", "c:2"))

    def test_malformed_line_names_file_and_line(self):
        for line in ("this is not a setting", "=5", "1KEY=5", "IMPROVE_PCT", "IMPROVE-PCT=5"):
            with self.subTest(line=line):
                with self.assertRaises(smart.BadInput) as caught:
                    smart.parse_conf(f"# header\nIMPROVE_PCT=5\n{line}\n", "/etc/smart.conf")
                self.assertIn("/etc/smart.conf:3", str(caught.exception))

    def test_unbalanced_quote_names_file_line_and_key(self):
        with self.assertRaises(smart.BadInput) as caught:
            smart.parse_conf('PHONE_HOME_TOKEN="abc\n', "smart.conf")
        self.assertIn("smart.conf:1", str(caught.exception))
        self.assertIn("PHONE_HOME_TOKEN", str(caught.exception))

    def test_two_words_unquoted(self):
        with self.assertRaises(smart.BadInput) as caught:
            smart.parse_conf("\nPHONE_HOME_TOKEN=two words\n", "smart.conf")
        self.assertIn("smart.conf:2", str(caught.exception))


class DefaultsTests(SettingsTestCase):
    def test_settings_table_matches_spec(self):
        self.assertEqual(set(smart.SETTINGS), set(DOCUMENTED_DEFAULTS))

    def test_every_key_has_documented_default(self):
        values, err = self.load()
        for key, default in DOCUMENTED_DEFAULTS.items():
            with self.subTest(key=key):
                self.assertEqual(values[key], default)
                self.assertEqual(type(values[key]) is str, isinstance(default, str))
                self.assertEqual(smart.SETTINGS[key][0], default)
        self.assertEqual(err, "")

    def test_missing_optional_conf_gives_defaults(self):
        values, _ = self.load(os.path.join(self.tmp, "nope.conf"))
        self.assertEqual(values["IMPROVE_PCT"], 10)

    def test_missing_required_conf_is_bad_input(self):
        path = os.path.join(self.tmp, "nope.conf")
        with self.assertRaises(smart.BadInput) as caught:
            self.load(path, conf_required=True)
        self.assertIn(path, str(caught.exception))

    def test_defaults_are_valid_settings(self):
        for key, (default, kind, _) in smart.SETTINGS.items():
            with self.subTest(key=key):
                self.assertEqual(kind.from_text(str(default)), default)
                self.assertTrue(kind.accepts(default))


class PrecedenceTests(SettingsTestCase):
    def test_conf_then_environment_then_overrides(self):
        path = self.conf("IMPROVE_PCT=5\nCONFIDENCE=0.9\nMIN_SAMPLES=40\n")
        environ = {"IMPROVE_PCT": "7", "CONFIDENCE": "0.95"}
        overrides = {"IMPROVE_PCT": "9"}
        values, _ = self.load(path, environ, overrides)
        self.assertEqual(values["IMPROVE_PCT"], 9.0)       # flag beats environment and file
        self.assertEqual(values["CONFIDENCE"], 0.95)       # environment beats file
        self.assertEqual(values["MIN_SAMPLES"], 40)        # file beats default
        self.assertEqual(values["KEEP_RUNS"], 200)         # default

    def test_none_override_does_not_override(self):
        path = self.conf("IMPROVE_PCT=5\n")
        values, _ = self.load(path, {"IMPROVE_PCT": "7"}, {"IMPROVE_PCT": None, "CONFIDENCE": None})
        self.assertEqual(values["IMPROVE_PCT"], 7.0)
        self.assertEqual(values["CONFIDENCE"], 0.99)

    def test_environment_alone(self):
        values, _ = self.load(None, {"MIN_SAMPLES": "12", "PHONE_HOME": "never", "UNRELATED": "x"})
        self.assertEqual(values["MIN_SAMPLES"], 12)
        self.assertEqual(values["PHONE_HOME"], "never")

    def test_uses_os_environ_by_default(self):
        with mock.patch.dict(os.environ, {"KEEP_RUNS": "17"}, clear=True):
            self.assertEqual(smart.load_settings(None)["KEEP_RUNS"], 17)

    def test_good_values_parse(self):
        for key, (text, expected) in GOOD_VALUES.items():
            with self.subTest(key=key):
                values, _ = self.load(self.conf(f"{key}={text}\n"))
                self.assertEqual(values[key], expected)
                values, _ = self.load(None, {key: text})
                self.assertEqual(values[key], expected)

    def test_integer_settings_are_ints(self):
        values, _ = self.load(self.conf("MIN_SAMPLES=12\nKEEP_RUNS=3\n"))
        self.assertIs(type(values["MIN_SAMPLES"]), int)
        self.assertIs(type(values["KEEP_RUNS"]), int)


class BadValueTests(SettingsTestCase):
    def assert_bad(self, key, call, where=None):
        with self.assertRaises(smart.BadInput) as caught:
            call()
        message = str(caught.exception)
        self.assertIn(key, message)
        if where:
            self.assertIn(where, message)
        self.assertEqual(caught.exception.exit_code, 2)
        self.assertNotIn("\n", message)

    def test_bad_values_in_conf_name_key_and_line(self):
        for key, values in BAD_VALUES.items():
            for value in values:
                with self.subTest(key=key, value=value):
                    path = self.conf(f"# settings\n{key}={value}\n")
                    self.assert_bad(key, lambda: self.load(path), f"{path}:2")

    def test_bad_values_in_environment_name_key(self):
        for key, values in BAD_VALUES.items():
            for value in values:
                with self.subTest(key=key, value=value):
                    self.assert_bad(key, lambda: self.load(None, {key: value}))

    def test_bad_values_as_overrides_name_key(self):
        for key, values in BAD_VALUES.items():
            for value in values:
                with self.subTest(key=key, value=value):
                    self.assert_bad(key, lambda: self.load(None, None, {key: value}))

    def test_brief_examples(self):
        for line, key in (("CONFIDENCE=1.5", "CONFIDENCE"), ("MIN_SAMPLES=abc", "MIN_SAMPLES"),
                          ("PHONE_HOME=sometimes", "PHONE_HOME"), ("PHONE_HOME_URL=ftp://x", "PHONE_HOME_URL"),
                          ("IMPROVE_PCT=-1", "IMPROVE_PCT")):
            with self.subTest(line=line):
                path = self.conf(line + "\n")
                self.assert_bad(key, lambda: self.load(path), f"{path}:1")

    def test_malformed_line_through_load_settings(self):
        path = self.conf("IMPROVE_PCT=5\nnonsense here\n")
        with self.assertRaises(smart.BadInput) as caught:
            self.load(path)
        self.assertIn(f"{path}:2", str(caught.exception))

    def test_non_utf8_conf(self):
        path = os.path.join(self.tmp, "smart.conf")
        with open(path, "wb") as handle:
            handle.write(b"PHONE_HOME_TOKEN=\xff\xfe\n")
        with self.assertRaises(smart.BadInput) as caught:
            self.load(path)
        self.assertIn(path, str(caught.exception))

    def test_conf_is_a_directory(self):
        with self.assertRaises(smart.BadInput) as caught:
            self.load(self.tmp)
        self.assertIn(self.tmp, str(caught.exception))


class UnknownKeyTests(SettingsTestCase):
    def test_unknown_key_warns_and_is_ignored(self):
        path = self.conf("IMPROVE_PCT=12\nIMPROVE_PERCENT=20\n")
        values, err = self.load(path)
        self.assertEqual(values["IMPROVE_PCT"], 12.0)
        self.assertNotIn("IMPROVE_PERCENT", values)
        self.assertTrue(err.startswith("warning:"), err)
        self.assertIn("IMPROVE_PERCENT", err)
        self.assertIn(f"{path}:2", err)

    def test_unknown_environment_variables_are_ignored_silently(self):
        values, err = self.load(None, {"IMPROVE_PERCENT": "x", "PATH": "/bin"})
        self.assertEqual(err, "")
        self.assertNotIn("IMPROVE_PERCENT", values)


if __name__ == "__main__":
    unittest.main()
