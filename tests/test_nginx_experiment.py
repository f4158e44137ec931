"""experiments/001_nginx_workers end to end against a real nginx (issue 6 "Acceptance").

deploy/install.sh installs into a temporary prefix with the helper pointed at a test nginx's
nginx.conf (reloaded by `nginx -s reload`, as without systemd); the installed experiment's
target_url, a path, is measured on SITE_URL (that nginx), HELPER_COMMAND points smart.py's helper calls (`set
worker_processes auto|2`, `reset worker_processes`) at the installed helper (no sudo in a test), and `smart.py --home PREFIX/opt/smart run 001_nginx_workers`
runs with 2-second arms.  Checked: a verdict per variant tried in state.json, nginx.conf (and the
running workers) matching the verdict, and nginx serving throughout - no probe row with code 0 or
5xx in the run's CSVs, and no failure seen by a second prober that runs across every reload.

Both tests run in one install and one nginx (setUpClass).  Without nginx (or not as root) the tests
skip, except under CI=true where they fail.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from helpers import clean_env, import_smart  # noqa: E402
import test_deploy as deploy  # noqa: E402  (support code only: no TestCase is imported by name)

smart = import_smart()

VARIANT_WORKERS = {"workers_auto": "auto", "workers_2": "2"}
# Short arms.  Under the switchback design (smart.py's default) every block pair applies and reverts
# the variant: many reloads while the prober runs, which is what "serving throughout" must survive.
SHORT = {"BASELINE_SECONDS": "2", "EXPERIMENT_SECONDS": "2", "COOLDOWN_SECONDS": "0.5",
         "WARMUP_SECONDS": "0.3", "BLOCKS": "3", "COMMAND_TIMEOUT_SECONDS": "30", "PHONE_HOME": "never"}


class NginxWorkersExperimentTest(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        """One nginx and one install for both runs.  test_every_variant_reverted_... comes first (unittest
        orders tests by name) and leaves nginx.conf as it was, byte for byte (it checks that); the end to
        end run starts from there."""
        deploy.need_root()
        deploy.need(deploy.HELPER_PYTHON)
        cls.root = tempfile.mkdtemp(prefix="smart-001-")
        cls.addClassCleanup(shutil.rmtree, cls.root, True)
        nginx_root = os.path.join(cls.root, "nginx")
        os.makedirs(nginx_root)
        os.chmod(cls.root, 0o755)
        cls.nginx = deploy.NginxUnderTest(nginx_root, workers="1")
        cls.nginx.start()
        cls.addClassCleanup(cls.nginx.stop)
        cls.deployed = deploy.Deployed(os.path.join(cls.root, "d"), cls.nginx)
        cls.home = cls.deployed.opt
        meta_path = os.path.join(cls.home, "experiments", "001_nginx_workers", "meta.json")
        with open(meta_path) as handle:
            cls.meta = json.load(handle)

    def setUp(self):
        self.assertEqual(self.meta["target_url"], "/", "a path: measured on SITE_URL")

    def run_experiment(self, **settings):
        env = clean_env(dict(SHORT, HELPER_COMMAND=os.path.dirname(self.deployed.helper) + "/",
                             SITE_URL=self.nginx.url.rstrip("/"), **settings))
        with deploy.Prober(self.nginx.port, period=0.005) as prober:
            done = subprocess.run([sys.executable, os.path.join(self.home, "smart.py"), "--home", self.home,
                                   "run", "001_nginx_workers"], capture_output=True, text=True, timeout=120,
                                  env=env, stdin=subprocess.DEVNULL)
        with open(os.path.join(self.home, "var", "state.json")) as handle:
            state = json.load(handle)
        return done, state, prober

    def assert_served_throughout(self, state, prober):
        run_dir = os.path.join(self.home, "var", "runs", state["run_id"])
        csvs = {os.path.basename(p)[:-3]: p for p in glob.glob(os.path.join(run_dir, "*.csv.gz"))}
        arms = ["baseline.csv"] + [f"{v['name']}.csv" for v in state["variants"] if v.get("metrics")]
        for name in arms:
            self.assertIn(name, csvs)
        for name, path in csvs.items():        # the arms and the warm-ups right after each reload
            with smart.open_measurement_csv(path) as handle:
                rows = list(csv.DictReader(handle))
            if name in arms:
                self.assertGreaterEqual(len(rows), 30, f"{name}: the measure profile should load the server")
            bad = [row for row in rows if int(row["response_code"]) == 0 or int(row["response_code"]) >= 500]
            self.assertEqual(bad, [], f"{name}: failed probes")
        self.assertGreater(prober.requests, 200)
        self.assertEqual(prober.failures, [], "the second prober saw nginx fail during a reload")
        self.assertEqual(deploy.http_get(self.nginx.port)[0], 200)
        self.assertNotIn("[emerg]", self.nginx.errors())

    def assert_verdicts_match_nginx(self, state):
        conf = deploy.read_bytes(self.nginx.conf)
        names = [v["name"] for v in state["variants"]]
        candidates = [v["name"] for v in self.meta["variants"] if v["name"] != "baseline"]
        self.assertEqual(names, candidates[:len(names)], "variants tried in order")
        for variant in state["variants"]:
            self.assertIn(variant["decision"], ("keep", "revert"))
            self.assertTrue(variant["reason"])
        kept = state["kept_variant"]
        if kept is None:
            self.assertEqual(names, candidates, "nothing kept: every variant has its verdict")
            self.assertTrue(all(v["decision"] == "revert" for v in state["variants"]))
            self.assertEqual(conf, self.nginx.original, "every variant reverted: nginx.conf as it was, byte for byte")
            self.assertEqual(self.nginx.wait_workers(1), 1)
        else:
            self.assertEqual(names[-1], kept, "a keep ends the experiment")
            self.assertEqual(state["variants"][-1]["decision"], "keep")
            self.assertTrue(all(v["decision"] == "revert" for v in state["variants"][:-1]))
            value = VARIANT_WORKERS[kept]
            self.assertEqual(deploy.worker_value(conf), value)
            self.assertEqual(deploy.without_workers(conf), deploy.without_workers(self.nginx.original))
            expected = {int(value)} if value != "auto" else deploy.expected_auto_workers()
            self.assertIn(self.nginx.wait_workers(min(expected)), expected)
        self.assertFalse(os.path.exists(os.path.join(self.home, "var", "applied.json")), "nothing left to recover")

    def test_run_end_to_end(self):
        done, state, prober = self.run_experiment()
        self.assertEqual(done.returncode, 0, f"{done.stdout}\n{done.stderr}\n{self.nginx.errors()}")
        self.assertEqual(state["status"], "done")
        self.assertEqual(state["experiment"], "001_nginx_workers")
        self.assertTrue(state["variants"])
        self.assert_verdicts_match_nginx(state)
        self.assert_served_throughout(state, prober)

    def test_every_variant_reverted_puts_nginx_conf_back_byte_for_byte(self):
        # IMPROVE_PCT 99.9: no variant can be kept, so each gets its verdict and its revert.
        done, state, prober = self.run_experiment(IMPROVE_PCT="99.9")
        self.assertEqual(done.returncode, 0, f"{done.stdout}\n{done.stderr}\n{self.nginx.errors()}")
        self.assertIsNone(state["kept_variant"])
        self.assertEqual([v["name"] for v in state["variants"]], ["workers_auto", "workers_2"])
        self.assert_verdicts_match_nginx(state)
        self.assert_served_throughout(state, prober)
        with open(os.path.join(self.home, "var", "runs", state["run_id"], "run.log")) as handle:
            log = handle.read()
        self.assertIn("worker_processes 1 -> 2; nginx -t passed, reloaded", log)
        self.assertIn("reset worker_processes to what they were before smart-nginx changed them", log)


if __name__ == "__main__":
    unittest.main()
