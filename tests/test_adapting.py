"""Adapting after the first keep (issue 17): re-checks, sweeps, anomalies, the trend for the coach.

The homes, experiments and DemoTarget are tests/test_run.py's; a Paced target (below) is a
DemoTarget whose pages wait as long as its mode file says, so that a test can make a kept
variant stop being faster, or the whole box three times slower, between two runs.  The sweep's
knob goes through the fake root helper of tests/test_helper_variants.py, and a KnobTarget reads
the helper's state to answer as fast as the value set makes it.

  RecheckTests    a due re-check reverts a variant whose advantage is gone and keeps one that
                  still helps (its age and confirmation carried on); RECHECK_DAYS and `recheck`;
                  status, context.md, smart.prom and history show it; SIGTERM, SIGKILL and
                  recover, the lock
  AnomalyTests    a baseline 3x the usual is flagged, asks the coach (which sees the trend) and
                  keeps nothing; the next normal run keeps (one series of runs); the rule's figures
  SweepTests      the walk in ascending order stops past the best and keeps it; meta.json's
                  sweep checked; SIGTERM and SIGKILL in a sweep
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import unittest
from datetime import datetime, timedelta, timezone

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from helpers import import_smart  # noqa: E402
from test_helper_variants import FAKE_HELPER  # noqa: E402
from test_run import RunTestCase, wait_for  # noqa: E402

smart = import_smart()

SWITCHBACK = {"DESIGN": "switchback", "BLOCKS": "6", "BASELINE_SECONDS": "2.4", "EXPERIMENT_SECONDS": "2.4",
              "WARMUP_SECONDS": "0.2", "LOOK_SECONDS": "0.5", "EARLY_STOP": "yes"}


class Paced(smart.DemoTarget):
    """A DemoTarget with modes named by their page time: ms5, ms20, ms45, ms60."""
    MODES = dict(smart.DemoTarget.MODES, ms5=(0.005, 0, 200), ms20=(0.020, 0, 200), ms45=(0.045, 0, 200),
                 ms60=(0.060, 0, 200))


def days_ago(days: float) -> str:
    return (datetime.now(timezone.utc) - timedelta(days=days)).strftime("%Y-%m-%dT%H:%M:%SZ")


class AdaptingTestCase(RunTestCase):

    def paced(self, mode):
        mode_path = self.write("target/mode", mode + "\n")
        server = Paced(mode_path).start()

        def stop():
            server.shutdown()
            server.server_close()
        self.addCleanup(stop)
        return server

    def kept(self):
        return json.loads(self.read("var/kept.json") or "{}")

    def age_kept(self, experiment, days):
        """Make the kept variant's keep (and last confirmation) `days` old."""
        kept = self.kept()
        kept[experiment]["kept_at"] = days_ago(days)
        if kept[experiment].get("confirmed_at"):
            kept[experiment]["confirmed_at"] = days_ago(days)
        self.write("var/kept.json", json.dumps(kept))


class RecheckTests(AdaptingTestCase):
    """Baseline: 45 ms pages.  The variant writes the mode in variant.mode (20 ms pages at first).
    One switchback run keeps it in a home made once (setUpClass); keep_first() copies that home into
    the test's own, with the test's home and target put in place of the first ones."""

    @classmethod
    def setUpClass(cls):
        maker = cls()
        maker.setUp()
        try:
            rc, out, err = maker.cli("run", "001_cache", env=SWITCHBACK)
            maker.assertEqual(rc, 0, out + err)
            maker.assertEqual(maker.state()["kept_variant"], "faster", maker.state()["variants"])
            maker.assertEqual(maker.server("target/mode"), "ms20")
            cls.template = tempfile.mkdtemp(prefix="smart-recheck-template-")
            cls.addClassCleanup(shutil.rmtree, cls.template, True)
            shutil.copytree(maker.home, cls.template, symlinks=True, dirs_exist_ok=True)
            cls.template_home, cls.template_url = maker.home, maker.target_url
        finally:
            maker.doCleanups()

    def setUp(self):
        super().setUp()
        target = self.paced("ms45")
        self.target_url = target.url
        self.write("variant.mode", "ms20\n")
        self.experiment("001_cache", [("baseline", "echo ms45 > ../../target/mode"),
                                      ("faster", "cat ../../variant.mode > ../../target/mode && "
                                                 "echo 'apply faster' >> ../../order.log")],
                        "echo ms45 > ../../target/mode && echo revert >> ../../order.log", target_url=target.url)

    def keep_first(self):
        """This home as the template's run left it: faster kept, the target on 20 ms pages."""
        shutil.copytree(self.template, self.home, symlinks=True, dirs_exist_ok=True)
        for folder, _, files in os.walk(self.home):
            for name in files:
                path = os.path.join(folder, name)
                if name.endswith(".gz") or os.path.islink(path):
                    continue
                with open(path, encoding="utf-8") as handle:
                    text = handle.read()
                moved = text.replace(self.template_home, self.home).replace(self.template_url, self.target_url)
                if moved != text:
                    with open(path, "w", encoding="utf-8") as handle:
                        handle.write(moved)
        self.assertEqual(self.state()["kept_variant"], "faster")
        self.assertEqual(self.server("target/mode"), "ms20")
        return self.kept()["001_cache"]

    def test_a_due_recheck_reverts_a_variant_whose_advantage_is_gone(self):
        first = self.keep_first()
        self.assertEqual(first["first_run_id"], first["run_id"])
        self.age_kept("001_cache", 8)
        self.write("variant.mode", "ms45\n")           # the box changed: the variant is no faster now
        rc, out, err = self.cli("run", env=SWITCHBACK)   # the timer's rotation
        self.assertEqual(rc, 0, out + err)
        state = self.state()
        self.assertEqual(state["recheck"]["variant"], "faster")
        self.assertEqual(state["recheck"]["outcome"], "reverted")
        self.assertEqual(state["recheck"]["kept_in"], first["run_id"])
        self.assertIsNone(state["kept_variant"])
        self.assertEqual(self.variants(state)["faster"]["decision"], "revert")
        self.assertEqual(self.kept(), {})                # the experiment reopens
        self.assertEqual(self.server("target/mode"), "ms45")
        self.assert_nothing_applied()
        self.assertEqual(self.history()[-1]["recheck"]["outcome"], "reverted")
        rc, out, _ = self.cli("status")
        self.assertIn("re-check of faster", out)
        self.assertIn("reverted", out)
        self.assertIn("every experiment is on its baseline", out)
        self.assertIn('smart_rechecks_total{outcome="reverted"} 1', self.read("var/smart.prom"))
        self.assertIn("re-check of faster", self.read("var/context.md"))

    def test_a_recheck_keeps_a_variant_that_still_helps_with_its_age_and_a_new_confirmation(self):
        first = self.keep_first()
        rc, out, err = self.cli("recheck", env=SWITCHBACK)
        self.assertEqual(rc, 0, out + err)
        state = self.state()
        self.assertEqual(state["recheck"]["outcome"], "confirmed", state["variants"])
        self.assertEqual(state["kept_variant"], "faster")
        kept = self.kept()["001_cache"]
        self.assertEqual(kept["kept_at"], first["kept_at"])
        self.assertEqual(kept["first_run_id"], first["run_id"])
        self.assertEqual(kept["run_id"], state["run_id"])
        self.assertIsNotNone(kept["confirmed_at"])
        self.assertEqual([r["outcome"] for r in kept["rechecks"]], ["confirmed"])
        self.assertEqual(self.server("target/mode"), "ms20")
        order = self.order()
        self.assertIn("revert", order[order.index("apply faster") + 1:])   # taken off and measured again
        self.assert_nothing_applied()
        rc, out, _ = self.cli("status")
        self.assertIn(f"faster (kept in run {first['run_id']}", out)
        self.assertIn("last confirmed by a re-check at", out)
        self.assertIn("1 re-check", out)
        self.assertIn("next re-check after", out)
        prom = self.read("var/smart.prom")
        self.assertIn('smart_rechecks_total{outcome="confirmed"} 1', prom)
        self.assertIn('smart_kept_variant_confirmed_timestamp_seconds{experiment="001_cache",variant="faster"}', prom)
        self.assertEqual(self.history()[-1]["recheck"]["outcome"], "confirmed")

    def test_the_timer_rests_a_fresh_keep_and_never_rechecks_with_recheck_days_0(self):
        self.keep_first()
        runs = len(self.history())
        rc, out, err = self.cli("run", env=SWITCHBACK)
        self.assertEqual(rc, 0, out + err)
        self.assertIn("re-checked 7 days after", out + err)
        self.assertEqual(len(self.history()), runs)
        self.age_kept("001_cache", 30)
        rc, out, err = self.cli("run", env=dict(SWITCHBACK, RECHECK_DAYS="0"))
        self.assertEqual(rc, 0, out + err)
        self.assertIn("never re-checked (RECHECK_DAYS=0)", out + err)
        self.assertEqual(len(self.history()), runs)
        self.assertEqual(self.server("target/mode"), "ms20")

    def test_recheck_of_an_experiment_with_nothing_kept_is_bad_input(self):
        rc, out, err = self.cli("recheck", "001_cache")
        self.assertEqual(rc, 2)
        self.assert_one_error_line(err, "001_cache has no kept variant to re-check")
        rc, out, err = self.cli("recheck")
        self.assertEqual(rc, 0, err)
        self.assertIn("nothing is kept", out + err)

    def test_sigterm_in_a_recheck_reverts_the_variant_and_reopens_the_experiment(self):
        self.keep_first()
        proc = self.spawn("recheck", env=dict(SWITCHBACK, EARLY_STOP="no", EXPERIMENT_SECONDS="30"))
        self.wait_phase("measuring faster", 20)
        rc, took, out, err = self.interrupt(proc, signal.SIGTERM)
        self.assertEqual(rc, 1, out + err)
        state = self.state()
        self.assertEqual(state["status"], "interrupted")
        self.assertEqual(state["recheck"]["outcome"], "reverted")
        self.assertEqual(self.kept(), {})
        self.assertEqual(self.server("target/mode"), "ms45")
        self.assert_nothing_applied()

    def test_sigkill_in_a_recheck_is_undone_by_recovery_and_the_lock_holds_meanwhile(self):
        self.keep_first()
        proc = self.spawn("recheck", env=dict(SWITCHBACK, EARLY_STOP="no", EXPERIMENT_SECONDS="30"))
        self.wait_phase("measuring faster", 20)
        rc, out, err = self.cli("recheck", env=SWITCHBACK)          # a second one meanwhile
        self.assertEqual(rc, 1, out + err)
        self.assertIn("lock", err)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)
        self.assertTrue(os.path.exists(self.journal()))
        self.assertEqual(self.server("target/mode"), "ms20")           # the variant was left applied
        rc, out, err = self.cli("recover")
        self.assertEqual(rc, 0, out + err)
        self.assertEqual(self.server("target/mode"), "ms45")
        self.assertEqual(self.kept(), {})
        self.assert_nothing_applied()
        self.assertEqual(self.state()["status"], "interrupted")

    def test_sigkill_between_the_journal_and_kept_json_leaves_nothing_kept_after_recovery(self):
        self.keep_first()
        kept = self.kept()
        entry = kept["001_cache"]
        # what Switcher.adopt leaves when killed after the journal and before kept.json forgets
        smart.write_journal(smart.Home(self.home), "20991231T000000Z", smart.load_experiment(
            self.path("experiments", "001_cache")), entry["variant"])
        rc, out, err = self.cli("recover")
        self.assertEqual(rc, 0, out + err)
        self.assertEqual(self.kept(), {})
        self.assertEqual(self.server("target/mode"), "ms45")


class AnomalyTests(AdaptingTestCase):
    """Sequential runs; five at 20 ms make the usual, one at 60 ms is the anomaly."""

    QUICK = {"BASELINE_SECONDS": "1", "EXPERIMENT_SECONDS": "1"}

    def setUp(self):
        super().setUp()
        self.target = self.paced("ms20")
        self.write("box.mode", "ms20\n")
        self.write("variant.mode", "ms20\n")
        self.experiment("001_cache", [("baseline", "cat ../../box.mode > ../../target/mode"),
                                      ("faster", "cat ../../variant.mode > ../../target/mode")],
                        "cat ../../box.mode > ../../target/mode", target_url=self.target.url)

    def run_once(self, **env):
        rc, out, err = self.cli("run", "001_cache", env=dict(self.QUICK, **env))
        self.assertEqual(rc, 0, out + err)
        return self.state()

    def test_a_baseline_three_times_the_usual_is_flagged_asks_the_coach_keeps_nothing_and_the_next_run_keeps(self):
        received = []

        class Coach(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                body = json.dumps({"advice": "monitor for 24h", "confidence": 0.5}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        coach = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Coach)
        thread = threading.Thread(target=coach.serve_forever, daemon=True)
        thread.start()
        self.addCleanup(thread.join, 5)
        self.addCleanup(coach.server_close)
        self.addCleanup(coach.shutdown)
        env = {"PHONE_HOME": "borderline", "PHONE_HOME_URL": f"http://127.0.0.1:{coach.server_address[1]}/coach"}
        for _ in range(5):
            state = self.run_once(**env)
            self.assertIsNone(state["anomaly"])
            self.assertIsNone(state["kept_variant"])
        usual = [entry["baseline_p50_ms"] for entry in self.history()]
        self.assertTrue(all(19 < p50 < 26 for p50 in usual), usual)
        received.clear()                               # clear A/A runs may be borderline; only the anomaly counts
        self.write("box.mode", "ms60\n")              # the box is three times slower ...
        self.write("variant.mode", "ms5\n")           # ... and the variant would be a clear keep
        state = self.run_once(**env)
        self.assertIsNotNone(state["anomaly"], state)
        self.assertGreater(state["anomaly"]["ratio"], 2.4)
        self.assertIsNone(state["kept_variant"])
        record = self.variants(state)["faster"]
        self.assertEqual(record["decision"], "revert")
        self.assertTrue(record["anomalous"])
        self.assertIn("a run under an anomaly keeps nothing", record["reason"])
        self.assertIn("(the rules said keep:", record["reason"])
        self.assertEqual(self.kept(), {})
        self.assertEqual(self.server("target/mode"), "ms60")
        self.assertTrue(received, "an anomaly did not ask the coach")
        trend = received[-1]["trend"]
        self.assertEqual(len(trend["runs"]), 6)
        self.assertEqual([run["anomaly"] for run in trend["runs"]], [False] * 5 + [True])
        self.assertTrue(19 < trend["usual_baseline_p50_ms"] < 26, trend)
        self.assertEqual(state["coach"]["advice"], "monitor for 24h")
        rc, out, _ = self.cli("status")
        self.assertEqual(rc, 1, out)                   # it needs attention
        self.assertIn("ANOMALY: baseline p50", out)
        self.assertIn("not in its usual state", out)
        self.assertIn("ANOMALY", self.read("var/context.md"))
        self.assertIn('smart_last_run_anomaly{experiment="001_cache"} 1', self.read("var/smart.prom"))
        self.assertIsNotNone(self.history()[-1]["anomaly"])
        self.write("box.mode", "ms20\n")              # the box is back to normal
        state = self.run_once()
        self.assertIsNone(state["anomaly"])
        self.assertEqual(state["kept_variant"], "faster", state["variants"])
        self.assertIn('smart_last_run_anomaly{experiment="001_cache"} 0', self.read("var/smart.prom"))

    def test_the_rule_median_and_robust_deviations_of_the_last_runs(self):
        usual = [20.0, 21.0, 19.5, 20.5, 22.0]
        self.assertIsNone(smart.baseline_anomaly(60.0, usual[:4]))          # too few runs to judge
        self.assertIsNone(smart.baseline_anomaly(27.0, usual))              # within median +- 4 x 2 ms
        flagged = smart.baseline_anomaly(60.0, usual)
        self.assertEqual((flagged["usual_p50_ms"], flagged["runs"]), (20.5, 5))
        self.assertEqual(flagged["ratio"], round(60 / 20.5, 3))
        self.assertIsNotNone(smart.baseline_anomaly(9.0, usual))            # far faster is a changed box too
        steady = [20.0] * 8                                                  # MAD 0: the floor, 10% of the median
        self.assertIsNone(smart.baseline_anomaly(27.9, steady))
        self.assertIsNotNone(smart.baseline_anomaly(28.1, steady))
        old = [100.0] * 10 + usual * 2                                      # only the last 10 runs count
        self.assertIsNone(smart.baseline_anomaly(21.0, old))

class KnobTarget(smart.DemoTarget):
    """Pages as fast as the fake helper's `knob` value makes them: best at 3, worse either side."""
    PAGE_MS = {None: 30, "1": 45, "2": 24, "3": 8, "4": 18, "5": 30, "6": 45}
    MODES = {f"knob{value}": (ms / 1000, 0, 200) for value, ms in PAGE_MS.items()}

    def mode(self) -> str:
        try:
            with open(self.mode_path, encoding="utf-8") as handle:
                text = handle.read()
        except OSError:
            text = ""
        value = next((line.split(" ", 1)[1].strip() for line in text.splitlines() if line.startswith("knob ")), None)
        return f"knob{value}" if f"knob{value}" in self.MODES else "knobNone"


class SweepTests(AdaptingTestCase):

    def setUp(self):
        super().setUp()
        self.write("bin/smart-fake", FAKE_HELPER, 0o755)
        self.write("helper.state", "")
        self.env = dict(SWITCHBACK, HELPER_COMMAND=self.path("bin") + "/")
        server = KnobTarget(self.path("helper.state")).start()

        def stop():
            server.shutdown()
            server.server_close()
        self.addCleanup(stop)
        self.url = server.url

    def sweep(self, **sweep):
        meta = {"id": "003_knob", "helper": "smart-fake", "target_url": self.url,
                "measure": {"rate": 40, "timeout": 1},
                "sweep": dict({"name": "knob", "set": "knob", "from": 1, "to": 6, "step": 1}, **sweep)}
        self.write("experiments/003_knob/meta.json", json.dumps(meta))

    def test_the_walk_goes_up_stops_past_the_best_and_keeps_it(self):
        self.sweep()
        rc, out, err = self.cli("run", "003_knob", env=self.env)
        self.assertEqual(rc, 0, out + err)
        state = self.state()
        self.assertEqual(state["kept_variant"], "knob_3", state["variants"])
        tried = [v["name"] for v in state["variants"]]
        self.assertEqual(tried[:3], ["knob_1", "knob_2", "knob_3"])
        self.assertNotIn("knob_6", tried, state["sweep"])             # stopped before the end
        self.assertIn("the walk stops", state["sweep"]["stopped"])
        self.assertIn("knob_6 not tried", state["sweep"]["stopped"].replace(", ", " ").replace("(", ""))
        self.assertEqual(state["sweep"]["best"], "knob_3")
        self.assertEqual(state["sweep"]["tried"], len(tried))
        records = self.variants(state)
        self.assertEqual(records["knob_3"]["decision"], "keep")
        self.assertIn("the best of the sweep", records["knob_3"]["reason"])
        self.assertEqual(sum(v["decision"] == "keep" for v in state["variants"]), 1)
        self.assertIn("knob 3", self.read("helper.state"))
        self.assertEqual(self.kept()["003_knob"]["variant"], "knob_3")
        helper = (self.read("helper.log") or "").splitlines()
        self.assertIn("set knob 1", helper)
        self.assertEqual(helper[-1], "set knob 3")                   # the best, applied again and kept
        self.assert_nothing_applied()
        rc, out, _ = self.cli("status")
        self.assertIn("sweep knob:", out)
        self.assertIn("best knob_3", out)

    def test_a_sweep_is_checked_when_read(self):
        cases = [({"step": 0}, "sweep.step"), ({"from": 5, "to": 1}, "sweep.step"),
                 ({"set": {"knob": "fixed"}}, "no VALUE has {value}"), ({"name": "bad name"}, "sweep.name"),
                 ({"values": [1, 1, 2], "from": None, "to": None, "step": None}, "sweep.values"),
                 ({"from": 0, "to": 100, "step": 1}, "more than 32 values"), ({"extra": 1}, "sweep.extra"),
                 ({"from": -3, "to": -1}, "sweep.set.knob")]
        for change, words in cases:
            with self.subTest(change=change):
                sweep = {key: value for key, value in dict(
                    {"name": "knob", "set": "knob", "from": 1, "to": 6, "step": 1}, **change).items() if value is not None}
                self.write("experiments/003_knob/meta.json", json.dumps(
                    {"helper": "smart-fake", "target_url": self.url, "sweep": sweep}))
                rc, out, err = self.cli("run", "--dry-run", "003_knob", env=self.env)
                self.assertEqual(rc, 2, out + err)
                self.assert_one_error_line(err, words)
        self.write("experiments/003_knob/meta.json", json.dumps(
            {"helper": "smart-fake", "target_url": self.url, "sweep": {"name": "knob", "set": "knob", "values": [3, 1]},
             "variants": [{"name": "baseline"}, {"name": "x", "set": {"knob": "9"}}]}))
        rc, out, err = self.cli("run", "--dry-run", "003_knob", env=self.env)
        self.assert_one_error_line(err, "give variants or a sweep, not both")

    def test_sigterm_in_a_sweep_reverts_and_keeps_nothing(self):
        self.sweep()
        proc = self.spawn("run", "003_knob", env=dict(self.env, EARLY_STOP="no", EXPERIMENT_SECONDS="30"))
        self.wait_phase("measuring knob_1", 20)
        rc, took, out, err = self.interrupt(proc, signal.SIGTERM)
        self.assertEqual(rc, 1, out + err)
        self.assertEqual(self.read("helper.state").strip(), "")
        self.assertEqual(self.kept(), {})
        self.assert_nothing_applied()

    def test_sigkill_in_a_sweep_is_undone_by_recovery_and_the_lock_holds_meanwhile(self):
        self.sweep()
        proc = self.spawn("run", "003_knob", env=dict(self.env, EARLY_STOP="no", EXPERIMENT_SECONDS="30"))
        self.wait_phase("measuring knob_1", 20)
        rc, out, err = self.cli("run", "003_knob", env=self.env)
        self.assertEqual(rc, 1, out + err)
        self.assertIn("lock", err)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)
        self.assertIn("knob 1", self.read("helper.state"))
        rc, out, err = self.cli("recover", env=self.env)
        self.assertEqual(rc, 0, out + err)
        self.assertEqual(self.read("helper.state").strip(), "")
        self.assertEqual(self.state()["status"], "interrupted")
        self.assert_nothing_applied()


if __name__ == "__main__":
    unittest.main()
