"""Every experiment of the catalogue (experiments/ with a helper, but 001: tests/test_nginx_experiment.py)
run for real by smart.py against the nginx + PHP-FPM 8.2 + WordPress stack of tests/stack.py.

deploy/install.sh installs into a temporary prefix with both helpers pointed at the stack, as
tests/test_helpers.py does (its install()); `smart.py --home PREFIX/opt/smart run EXP` runs with
short arms, the meta.json URL paths measured on the stack (SITE_URL, SITE_TLS_URL) and the helpers
called directly (HELPER_COMMAND), while a second prober requests the site over HTTP and HTTPS.
Checked for each: exit 0, status done, a decision with a reason for each variant tried (a sweep in
ascending order, stopping early only with a reason), every configuration file byte for byte as it
was when nothing is kept, or `get` equal to the kept variant's set and `smart.py revert` putting
every file back; nginx -t and php-fpm -t pass; no failed request seen by the prober, no 0 or 5xx
row in the run's CSVs.  And a variant that breaks what is served is reverted with the site up.

The stack's php-fpm.conf gets `process_control_timeout = 10s` before anything is measured, as
DEPLOYMENT.md advises ("Lossless reloads"): without it the reload that brings the helper's pool
drop-in in may fail a request in flight, once per experiment.

Without the stack's packages (or not as root) the tests skip, except under CI=true where they fail.
Everything listens on 127.0.0.1; the stack stops in tearDownClass.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import shutil
import subprocess
import sys
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import test_helpers as helpers_test  # noqa: E402  (support code only: no TestCase is imported by name)
from helpers import REPO_ROOT, clean_env, import_smart  # noqa: E402

smart = import_smart()

# Sequential design, short arms: a run is a baseline and one arm per variant, so the whole catalogue
# fits in about a minute and a half; MIN_SAMPLES 10 lets a 1.5 s arm at 10 requests/s be judged.
SHORT = {"DESIGN": "sequential", "BASELINE_SECONDS": "1.5", "EXPERIMENT_SECONDS": "1.5", "COOLDOWN_SECONDS": "1",
         "WARMUP_SECONDS": "0.3", "BLOCKS": "2", "LOOK_SECONDS": "1", "MIN_SAMPLES": "10",
         "COMMAND_TIMEOUT_SECONDS": "30", "PHONE_HOME": "never", "RECHECK_DAYS": "0"}
LENGTHS = ("baseline_seconds", "experiment_seconds", "cooldown_seconds", "warmup_seconds", "blocks", "design")
SKIPPED = ("001_nginx_workers",)      # tests/test_nginx_experiment.py


class Prober(helpers_test.Prober):
    """test_helpers' prober, but a run outlasts its requests: no wait for a sample at the end."""
    least = 5


def catalogue() -> list:
    """(id, meta) of every shipped experiment with a helper, but those tested elsewhere."""
    found = []
    for path in sorted(glob.glob(os.path.join(REPO_ROOT, "experiments", "*", "meta.json"))):
        with open(path) as handle:
            meta = json.load(handle)
        if meta.get("helper") and meta["id"] not in SKIPPED:
            found.append((meta["id"], meta))
    return found


class CatalogueTest(helpers_test.InstalledStack):

    tmp_prefix = "smart-catalogue-"

    @classmethod
    def prepare_stack(cls):
        with open(cls.stack.php_fpm_conf) as handle:
            text = handle.read()
        with open(cls.stack.php_fpm_conf, "w") as handle:
            handle.write(text.replace("[global]\n", "[global]\nprocess_control_timeout = 10s\n", 1))
        cls.stack.reload_php()

    @classmethod
    def installed(cls):
        # The installed meta.json files without their own lengths and design (004 and 008 shorten
        # their arms to fit the timer's time box), which would win over SHORT's.
        for path in glob.glob(os.path.join(cls.home, "experiments", "*", "meta.json")):
            with open(path) as handle:
                meta = json.load(handle)
            for key in LENGTHS:
                meta.pop(key, None)
            with open(path, "w") as handle:
                json.dump(meta, handle, indent=2)
        cls.original = helpers_test.snapshot(cls.stack, cls.cache_dir)

    def smart(self, *argv, **settings):
        env = clean_env(dict(SHORT, SITE_URL=self.stack.http_url, SITE_TLS_URL=self.stack.https_url,
                             HELPER_COMMAND=os.path.dirname(self.helpers["nginx"]) + "/", **settings))
        return subprocess.run([sys.executable, os.path.join(self.home, "smart.py"), "--home", self.home, *argv],
                              capture_output=True, text=True, timeout=120, env=env, stdin=subprocess.DEVNULL)

    def run_experiment(self, experiment, **settings):
        """smart.py run EXPERIMENT under a prober on the HTTP and one on the HTTPS site: (done, state).
        Neither prober may see a failed request, and no old nginx worker may exit with a connection open."""
        aborted = self.aborted_connections()
        with Prober(self.stack.http_url, threads=1) as http, Prober(self.stack.https_url, threads=1) as https:
            done = self.smart("run", experiment, **settings)
        with open(os.path.join(self.home, "var", "state.json")) as handle:
            state = json.load(handle)
        for prober in (http, https):
            self.assertGreaterEqual(prober.requests, Prober.least)
            self.assertEqual(prober.failures, [], f"{prober.url}: failed requests")
        self.assertEqual(self.aborted_connections(), aborted, "an old nginx worker exited with a connection open")
        return done, state

    def helper_of(self, meta):
        return self.helpers[meta["helper"].split("-", 1)[1]]

    def get(self, meta, names):
        done = subprocess.run([self.helper_of(meta), "get", *sorted(names)], capture_output=True, text=True,
                              timeout=60, env=clean_env(), stdin=subprocess.DEVNULL)
        self.assertEqual(done.returncode, 0, done.stderr)
        return dict(line.split(" ", 1) for line in done.stdout.splitlines())

    # -- what every run must leave --
    def wait_old_nginx_workers_gone(self, timeout=20):
        """Until no worker is "shutting down" (the old ones of a reload), so that a check's request meets
        the new workers."""
        def shutting_down(pid):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as handle:
                    return b"shutting down" in handle.read()
            except OSError:
                return False
        deadline = time.monotonic() + timeout
        while any(shutting_down(pid) for pid in self.stack.nginx_workers()):
            self.assertLess(time.monotonic(), deadline, "nginx's old workers still run after a reload")
            time.sleep(0.02)

    def assert_services_pass_their_tests(self):
        self.wait_old_nginx_workers_gone()
        for name, (ok, output) in (("nginx -t", self.stack.nginx_test()), ("php-fpm -t", self.stack.php_test())):
            self.assertTrue(ok, f"{name}: {output}")
        for url in (self.stack.front_url, self.stack.static_url, self.stack.https_url + "/"):
            self.assertEqual(self.stack.get(url)[0], 200, url)

    def assert_no_failed_rows(self, state):
        """No 0 or 5xx row in any of the run's CSVs, the warm-ups after each switch included."""
        run_dir = os.path.join(self.home, "var", "runs", state["run_id"])
        paths = glob.glob(os.path.join(run_dir, "*.csv.gz")) + glob.glob(os.path.join(run_dir, "*.csv"))
        self.assertIn(os.path.join(run_dir, "baseline.csv.gz"), paths)
        for path in paths:
            with smart.open_measurement_csv(path) as handle:
                rows = list(csv.DictReader(handle))
            if path.endswith("baseline.csv.gz"):
                self.assertTrue(rows, path)     # a variant's arm may be empty: the guard reverted it at once
            bad = [row for row in rows if int(row["response_code"]) == 0 or int(row["response_code"]) >= 500]
            self.assertEqual(bad, [], f"{os.path.basename(path)}: failed probes")

    def assert_verdicts(self, meta, state):
        """A decision and its reason for each variant tried, in the catalogue's order; the sweep's walk."""
        variants = smart.sweep_variants(meta["sweep"]) if "sweep" in meta else meta["variants"]
        candidates = [v["name"] for v in variants if v["name"] != "baseline"]
        names = [v["name"] for v in state["variants"]]
        self.assertTrue(names)
        self.assertEqual(names, candidates[:len(names)], "variants tried in order")
        for variant in state["variants"]:
            self.assertIn(variant["decision"], ("keep", "revert"), variant)
            self.assertTrue(variant["reason"], variant)
        kept = state["kept_variant"]
        self.assertEqual([v["name"] for v in state["variants"] if v["decision"] == "keep"], [kept] if kept else [])
        if "sweep" in meta:
            sweep = state["sweep"]
            self.assertEqual(sweep["values"], candidates)
            self.assertEqual(sweep["tried"], len(names))
            self.assertEqual(sweep["best"], kept)
            if len(names) < len(candidates):
                self.assertTrue(sweep["stopped"], "a walk that stops early says why")
                self.assertIn(", ".join(candidates[len(names):]) + " not tried", sweep["stopped"])
        elif kept:
            self.assertEqual(names[-1], kept, "a keep ends the experiment")
        else:
            self.assertEqual(names, candidates, "nothing kept: every variant has its verdict")
        return {v["name"]: v for v in variants}.get(kept)

    def assert_original(self, why):
        now = helpers_test.snapshot(self.stack, self.cache_dir)
        self.assertEqual(sorted(now), sorted(self.original), why)
        for path, content in self.original.items():
            self.assertEqual(now[path], content, f"{path}: {why}")
        for path in (self.dropin, self.pool_dropin, self.ini_dropin):
            self.assertFalse(os.path.exists(path), path)

    # -- the tests --
    def test_every_url_of_the_catalogue_answers_as_expected(self):
        for experiment, meta in catalogue():
            base = self.stack.https_url if meta.get("site") == "tls" else self.stack.http_url
            for url in meta["urls"]:
                with self.subTest(experiment=experiment, url=url["url"]):
                    status, _, body = self.stack.get(base + url["url"])
                    expect = url.get("expect", {})
                    self.assertEqual(status, expect.get("status", 200))
                    self.assertIn(expect.get("body", "").encode(), body)

    def test_every_experiment_of_the_catalogue_runs_and_leaves_what_it_decided(self):
        experiments = catalogue()
        self.assertGreaterEqual(len(experiments), 7)
        verdicts = {}
        for experiment, meta in experiments:
            with self.subTest(experiment=experiment):
                begun = time.monotonic()
                try:
                    verdicts[experiment] = self.check_run(experiment, meta) + [f"{time.monotonic() - begun:.1f} s"]
                finally:
                    self.put_back(experiment, meta)
        if os.environ.get("SMART_CATALOGUE_VERDICTS"):
            print(f"\n  verdicts: {json.dumps(verdicts)}", file=sys.stderr)

    def check_run(self, experiment, meta):
        done, state = self.run_experiment(experiment)
        self.assertEqual(done.returncode, 0, f"{done.stdout}\n{done.stderr}")
        self.assertEqual(state["experiment"], experiment)
        self.assertEqual(state["status"], "done", state.get("reason"))
        kept = self.assert_verdicts(meta, state)
        self.assert_services_pass_their_tests()
        self.assert_no_failed_rows(state)
        self.assertFalse(os.path.exists(os.path.join(self.home, "var", "applied.json")))
        if kept is None:
            self.assert_original("every variant reverted: the files as they were")
        else:
            self.assertEqual(self.get(meta, kept["set"]), kept["set"], "the kept variant is in effect")
            reverted = self.smart("revert", experiment)
            self.assertEqual(reverted.returncode, 0, reverted.stdout + reverted.stderr)
            self.assert_original("the kept variant's revert puts every file back")
            self.assert_services_pass_their_tests()
        return [(v["name"], v["decision"]) for v in state["variants"]]

    def put_back(self, experiment, meta):
        """Whatever a failed check left: the next experiment starts from the original files."""
        if helpers_test.snapshot(self.stack, self.cache_dir) == self.original:
            return
        self.smart("revert", experiment)
        names = {name for variant in (smart.sweep_variants(meta["sweep"]) if "sweep" in meta else meta["variants"])
                 for name in variant.get("set", {})}
        subprocess.run([self.helper_of(meta), "reset", *sorted(names)], capture_output=True, timeout=60,
                       env=clean_env(), stdin=subprocess.DEVNULL)

    def test_a_variant_the_service_rejects_is_rolled_back_with_the_site_serving(self):
        # php-fpm -t refuses pm.max_children 2 under Debian's www pool (pm.max_spare_servers 3)
        folder = os.path.join(self.home, "experiments", "090_broken_children")
        os.makedirs(folder)
        self.addCleanup(shutil.rmtree, folder, True)
        meta = {"id": "090_broken_children", "description": "a variant php-fpm refuses", "helper": "smart-php",
                "variants": [{"name": "baseline"}, {"name": "children_2", "set": {"pm.max_children": "2"}},
                             {"name": "requests_500", "set": {"pm.max_requests": "500"}}],
                "urls": [{"url": "/", "expect": {"status": 200, "body": "</html>"}}],
                "measure": {"rate": 10, "timeout": 10}}
        with open(os.path.join(folder, "meta.json"), "w") as handle:
            json.dump(meta, handle)
        done, state = self.run_experiment("090_broken_children", IMPROVE_PCT="99.9")
        self.assertEqual(done.returncode, 0, f"{done.stdout}\n{done.stderr}")
        self.assertEqual(state["status"], "done", state.get("reason"))
        broken, other = state["variants"]
        self.assertEqual((broken["name"], broken["decision"]), ("children_2", "revert"))
        self.assertIn("apply of children_2 exited 1", broken["reason"])
        self.assertEqual((other["name"], other["decision"]), ("requests_500", "revert"), "the run goes on")
        self.assert_original("a refused variant leaves nothing behind")
        self.assert_services_pass_their_tests()
        self.assert_no_failed_rows(state)


if __name__ == "__main__":
    unittest.main()
