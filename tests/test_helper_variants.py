"""Variants set through a root helper, what an experiment requires, and URLs on the site (issue 16).

A fake helper (a shell script standing in for deploy/smart-nginx, found through HELPER_COMMAND)
records every argv in the home's helper.log and keeps its settings in helper.state, answering `get`
from it; the variants it applies write nothing else, and a DemoTarget stands in for the site.
"""

import json
import os
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from helpers import import_smart  # noqa: E402
from test_run import RunTestCase  # noqa: E402

smart = import_smart()

FAKE_HELPER = """#!/bin/sh
# a stand-in root helper: set NAME VALUE..., reset NAME..., get NAME...
home=$(dirname "$0")/..
echo "$*" >> "$home/helper.log"
verb=$1; shift
case $verb in
    set) while [ $# -gt 0 ]; do grep -v "^$1 " "$home/helper.state" > "$home/helper.tmp" 2>/dev/null
                             echo "$1 $2" >> "$home/helper.tmp"; mv "$home/helper.tmp" "$home/helper.state"; shift 2; done ;;
    reset) for name; do grep -v "^$name " "$home/helper.state" > "$home/helper.tmp" 2>/dev/null
                        mv "$home/helper.tmp" "$home/helper.state"; done ;;
    get) for name; do line=$(grep "^$name " "$home/helper.state" 2>/dev/null) || line="$name default"; echo "$line"; done ;;
esac
"""


class HelperVariantTests(RunTestCase):

    def setUp(self):
        super().setUp()
        self.write("bin/smart-fake", FAKE_HELPER, 0o755)
        self.write("helper.state", "")
        self.env = {"HELPER_COMMAND": self.path("bin") + "/"}

    def meta(self, **extra):
        target = self.target("plain")
        meta = {"id": "002_fake", "helper": "smart-fake", "target_url": target.url,
                "measure": {"rate": 40, "timeout": 1},
                "variants": [{"name": "baseline"}, {"name": "both", "set": {"zeta": "1", "alpha": "on"}},
                             {"name": "one", "set": {"alpha": "off"}}]}
        meta.update(extra)
        self.write("experiments/002_fake/meta.json", json.dumps(meta))
        return meta

    def helper_log(self):
        return (self.read("helper.log") or "").splitlines()

    def test_variants_are_set_and_reset_through_the_helper_with_sorted_exact_argv(self):
        self.meta()
        rc, out, err = self.cli("run", "002_fake", env=self.env)
        self.assertEqual(rc, 0, out + err)
        log = self.helper_log()
        self.assertIn("set alpha on zeta 1", log)                  # names sorted: the argv sudoers lists
        self.assertIn("set alpha off", log)
        self.assertEqual({line for line in log if line.startswith("reset")}, {"reset alpha zeta"})
        self.assertEqual(self.read("helper.state").strip(), "")    # every change reset
        self.assert_nothing_applied()

    def test_the_dry_run_names_a_variant_equal_to_what_is_configured(self):
        self.meta()
        self.write("helper.state", "alpha off\n")
        rc, out, err = self.cli("run", "--dry-run", "002_fake", env=self.env)
        self.assertEqual(rc, 0, out + err)
        one = next(line for line in out.splitlines() if "variant  one" in line)
        both = next(line for line in out.splitlines() if "variant  both" in line)
        self.assertIn("A/A trial", one)
        self.assertNotIn("A/A trial", both)
        self.assertEqual(self.helper_log(), ["get alpha zeta"])     # the dry run only asks

    def test_set_needs_a_helper_safe_words_and_no_apply_beside_it(self):
        cases = [({"helper": None}, "variants[1].set"),
                 ({"variants": [{"name": "baseline"}, {"name": "x", "set": {"a": "1; rm -rf /"}}]}, "variants[1].set.a"),
                 ({"variants": [{"name": "baseline"}, {"name": "x", "set": {"a": "1"}, "apply": "true"}]},
                  "variants[1].set"),
                 ({"requires": ["mysql"]}, "requires")]
        for extra, field in cases:
            with self.subTest(field=field):
                meta = self.meta(**extra)
                if extra.get("helper", "x") is None:
                    meta.pop("helper")
                    self.write("experiments/002_fake/meta.json", json.dumps(meta))
                rc, out, err = self.cli("run", "--dry-run", "002_fake", env=self.env)
                self.assertEqual(rc, 2, out + err)
                self.assert_one_error_line(err, "meta.json", field)

    def test_an_experiment_whose_software_is_absent_is_skipped_and_said_so(self):
        self.meta(requires=["/nonexistent/wordpress"])
        rc, out, err = self.cli("run", env=self.env)                # the timer's pass
        self.assertEqual(rc, 0, out + err)
        self.assertIn("does not apply on this box: it needs /nonexistent/wordpress", out)
        self.assertEqual(self.helper_log(), [])
        rc, out, err = self.cli("run", "002_fake", env=self.env)    # named: refused, nothing changed
        self.assertEqual(rc, 2, out + err)
        self.assert_one_error_line(err, "/nonexistent/wordpress")
        rc, out, err = self.cli("status", env=self.env)
        self.assertIn("002_fake: does not apply: it needs /nonexistent/wordpress", out)
        rc, out, err = self.cli("doctor", env=self.env)
        self.assertIn("experiment 002_fake: does not apply on this box", out)
        self.assertEqual(self.helper_log(), [])
        missing_helper = dict(self.env, HELPER_COMMAND=self.path("nowhere") + "/")
        self.meta()
        rc, out, err = self.cli("run", "002_fake", env=missing_helper)
        self.assertEqual(rc, 2, out + err)
        self.assertIn("the helper", err)

    def test_a_url_path_is_measured_on_the_site(self):
        target = self.target("plain")
        meta = self.meta(target_url=None, urls=[{"url": "/", "weight": 2}, {"url": "/about/"}])
        meta.pop("target_url")
        self.write("experiments/002_fake/meta.json", json.dumps(meta))
        site = target.url.rstrip("/")
        experiment = smart.load_experiment(self.path("experiments", "002_fake"),
                                           self.settings(SITE_URL=site))
        self.assertEqual([t.url for t in experiment.targets()], [site + "/", site + "/about/"])
        self.assertEqual([t.weight for t in experiment.targets()], [2, 1])


if __name__ == "__main__":
    unittest.main()
