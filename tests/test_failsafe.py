"""Fail-safe on real sites (issue 13): a broken site is never a gain, and no fault leaves a variant applied.

Each test is one defect found by trying the product as an operator and an attacker would; each
would fail on the code before issue 13.  They reuse the homes, fake experiments and DemoTarget of
tests/test_run.py (a server file the variants write, order.log of every apply/revert).

  BrokenSiteTests      fast 404/403 variants reverted in both designs and by decide; a dead or
                       404 baseline stops the run before any variant, and status/doctor say so
  InterruptionTests    SIGKILL mid-apply (the orphaned apply), an apply's background child, a keep
                       cut short, a run killed with nothing applied, a signal at start-up
  DiskAndFileTests     a full disk mid-variant (tmpfs), corrupt var/ files, a clock stepped back
  OwnerTests           root on a home whose var/ is someone else's: the owner's rights, no symlinks
  NameAndTextTests     variant names that look like options, control characters on the terminal
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from helpers import SMART_PY, clean_env, import_smart, rows_from, run_cli, write_csv  # noqa: E402
from test_run import FAKE_MEASURE_SH, RunTestCase, apply_cmd, revert_cmd, wait_for  # noqa: E402

smart = import_smart()


class BrokenSiteTests(RunTestCase):

    def demo_experiment(self, modes, **extra):
        """baseline plain (20 ms pages) and one variant per mode of the DemoTarget."""
        target = self.target("plain")
        variants = [("baseline", "echo plain > ../../target/mode")] + [
            (mode, f"echo {mode} > ../../target/mode") for mode in modes]
        return self.experiment("001_routing", variants, "echo plain > ../../target/mode", target_url=target.url,
                               **extra)

    def test_fast_404_and_403_variants_are_reverted_in_both_designs(self):
        for design in ("sequential", "switchback"):
            with self.subTest(design=design):
                self.demo_experiment(("missing", "forbidden"))
                rc, out, err = self.cli("run", "001_routing", env={"DESIGN": design, "BLOCKS": "3",
                                                                    "EXPERIMENT_SECONDS": "2", "BASELINE_SECONDS": "2"})
                self.assertEqual(rc, 0, out + err)
                state = self.state()
                self.assertIsNone(state["kept_variant"], state["variants"])
                for name in ("missing", "forbidden"):
                    record = self.variants(state)[name]
                    self.assertEqual(record["decision"], "revert")
                    self.assertRegex(record["reason"], "guardrail|error rate")
                self.assertEqual(self.server("target/mode"), "plain")
                self.assert_nothing_applied()

    def test_decide_counts_a_status_other_than_the_baselines_usual_one_as_failed(self):
        base = write_csv(self.path("base.csv"), rows_from([20.0 + (i % 5) for i in range(100)]))
        broken = write_csv(self.path("var.csv"), rows_from([0.1] * 100, codes=[404] * 100))
        rc, out, err = run_cli("decide", "--json", base, broken)
        self.assertEqual(rc, 0, err)
        verdict = json.loads(out)
        self.assertEqual(verdict["decision"], "revert")
        self.assertIn("samples", verdict["failed_rules"])
        self.assertEqual(verdict["variant"]["errors"], 100)
        mixed = write_csv(self.path("mixed.csv"), rows_from([0.1] * 50 + [20.0] * 50, codes=[404] * 50 + [200] * 50))
        verdict = json.loads(run_cli("decide", "--json", base, mixed)[1])
        self.assertEqual((verdict["decision"], verdict["variant"]["err_pct"]), ("revert", 50.0))
        self.assertIn("errors", verdict["failed_rules"])

    def test_a_dead_target_is_not_experimented_on(self):
        self.simple_experiment(url="http://127.0.0.1:9/", names=("v1",))
        rc, out, err = self.cli("run", "001_workers")
        self.assertEqual(rc, 1, out + err)
        state = self.state()
        self.assertEqual(state["status"], "failed")
        self.assertIn("http://127.0.0.1:9/", state["reason"])
        self.assertIn("no answer", state["reason"])
        self.assertEqual(state["variants"], [])
        self.assertNotIn("apply v1", self.order())
        self.assertEqual(len(err.strip().splitlines()), 1, err)
        rc, out, _ = self.cli("status")
        self.assertEqual(rc, 1, out)
        self.assertIn("not healthy", out)
        rc, out, _ = self.cli("doctor")
        self.assertIn("FIX  target of 001_workers: http://127.0.0.1:9/ did not answer", out)
        self.assertIn("FIX  last run", out)

    def test_a_baseline_that_answers_404_is_not_experimented_on(self):
        target = self.target("missing")
        self.simple_experiment(url=target.url, names=("v1",))
        rc, out, err = self.cli("run", "001_workers")
        self.assertEqual(rc, 1, out + err)
        state = self.state()
        self.assertIn(f"{target.url} answered 404", state["reason"])
        self.assertNotIn("apply v1", self.order())


def loaded(pid: int, name: str) -> bool:
    """Whether the process has a file whose path contains name mapped (/proc/PID/maps)."""
    try:
        with open(f"/proc/{pid}/maps", encoding="utf-8", errors="replace") as handle:
            return name in handle.read()
    except OSError:
        return False


class InterruptionTests(RunTestCase):

    def quick(self, apply_v1, revert=None):
        variants = [("baseline", apply_cmd("baseline")), ("v1", apply_v1)]
        return self.experiment("001_workers", variants, revert or revert_cmd(), measure_sh=FAKE_MEASURE_SH)

    def test_sigkill_during_an_apply_the_orphaned_apply_never_reapplies_after_recovery(self):
        self.quick("sleep 1.5 && echo v1 > ../../server.conf && echo 'apply v1' >> ../../order.log")
        proc = self.spawn("run", "001_workers")
        self.wait_phase("applying v1")
        time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)          # smart.py only: its apply lives on in its own session
        proc.wait(5)
        rc, out, err = self.cli("recover")
        self.assertEqual(rc, 0, out + err)
        self.assertIn("stopped what was left of its last command", out)
        time.sleep(2.0)                            # the orphan would have written v1 by now
        self.assertEqual(self.server(), "baseline")
        self.assertNotIn("apply v1", self.order())

    def test_an_apply_that_leaves_a_background_child_cannot_write_after_the_revert(self):
        self.quick("echo v1 > ../../server.conf; (sleep 1; echo v1 > ../../server.conf) >/dev/null 2>&1 &",
                   revert=revert_cmd())
        code, _ = self.run_inprocess([self.path("experiments", "001_workers")])
        self.assertEqual(code, 0)
        time.sleep(1.5)
        self.assertEqual(self.server(), "baseline")

    def test_a_keep_cut_short_between_kept_json_and_the_journal_is_undone_by_recovery(self):
        folder = self.quick(apply_cmd("v1"))
        run_id = "20261201T000000"
        os.makedirs(self.path("var", "runs", run_id))
        self.write("server.conf", "v1\n")
        kept = {"001_workers": {"variant": "v1", "run_id": run_id, "kept_at": "2026-12-01T00:00:00Z",
                                "revert": revert_cmd(), "path": folder}}
        journal = {"run_id": run_id, "experiment": "001_workers", "path": folder, "variant": "v1",
                   "revert": revert_cmd(), "pid": 999999, "in_flight": None, "written_at": "2026-12-01T00:00:00Z"}
        state = {"run_id": run_id, "experiment": "001_workers", "status": "running", "phase": "kept v1",
                 "kept_variant": "v1", "variants": []}
        for name, value in (("kept.json", kept), ("applied.json", journal), ("state.json", state)):
            self.write(f"var/{name}", json.dumps(value))
        rc, out, err = self.cli("recover")
        self.assertEqual(rc, 0, out + err)
        self.assertEqual(self.server(), "baseline")
        self.assertEqual(json.loads(self.read("var/kept.json")), {})
        state = self.state()
        self.assertEqual((state["status"], state["kept_variant"]), ("interrupted", None))
        rc, out, _ = self.cli("status")
        self.assertNotIn("001_workers: v1", out)

    def test_a_run_killed_with_nothing_applied_is_closed_by_recover_and_by_the_next_run(self):
        holding = FAKE_MEASURE_SH.replace("    hold*)", "    baseline.csv*|hold*)")
        for closer in ("recover", "run"):
            with self.subTest(closer=closer):
                variants = [("baseline", "true"), ("v1", apply_cmd("v1"))]
                self.experiment("001_workers", variants, revert_cmd(), measure_sh=holding)
                proc = self.spawn("run", "001_workers")
                self.wait_phase("measuring baseline")
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(5)
                self._kill_hold()
                dead = self.state()["run_id"]
                self.assertEqual(self.state()["status"], "running")
                rc, out, err = self.cli(closer, *(["001_workers"] if closer == "run" else []))
                closed = [entry for entry in self.history() if entry["run_id"] == dead]
                self.assertEqual([entry["status"] for entry in closed], ["interrupted"], out + err)
                self.assertIn("nothing applied", closed[0]["reason"])
                self._kill_hold()

    def _kill_hold(self):
        text = self.read("hold.pid")
        if text and text.strip().isdigit():
            try:
                os.kill(int(text), signal.SIGKILL)
            except ProcessLookupError:
                pass

    def test_a_signal_at_start_up_exits_1_with_one_line(self):
        # While smart.py's imports run (100-200 ms) and after: each signal goes a delay after the process
        # has loaded _ssl (its /proc maps say so), which `import ssl` does half-way through the imports.
        # Before smart.py's first line runs (the interpreter starting, compiling the file) it is Python's.
        holding = FAKE_MEASURE_SH.replace("    hold*)", "    baseline.csv*|hold*)")
        variants = [("baseline", apply_cmd("baseline")), ("v1", apply_cmd("v1"))]
        self.experiment("001_workers", variants, revert_cmd(), measure_sh=holding)
        for sig in (signal.SIGTERM, signal.SIGINT):
            for delay in (0.0, 0.01, 0.03, 0.06, 0.1, 0.2, 0.4):
                with self.subTest(signal=sig.name, delay=delay):
                    proc = subprocess.Popen([sys.executable, SMART_PY, "--home", self.home, "run", "001_workers"],
                                            env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                            stdin=subprocess.DEVNULL, text=True, start_new_session=True)
                    self.assertTrue(wait_for(lambda: loaded(proc.pid, "/_ssl."), 10, 0.001), "smart.py never imported ssl")
                    time.sleep(delay)
                    proc.send_signal(sig)
                    out, err = proc.communicate(timeout=20)
                    self._kill_hold()
                    self.assertEqual(proc.returncode, 1, out + err)
                    self.assertNotIn("Traceback", err)
                    self.assertEqual(len(err.strip().splitlines()), 1, err)
                    self.assertNotIn("v1", self.server())
                    self.assert_nothing_applied()


class DiskAndFileTests(RunTestCase):

    def tmpfs_var(self, size="4m"):
        """var/ on a small tmpfs of its own (root only); skipped where mounting is not allowed."""
        if os.geteuid() != 0 or not shutil.which("mount"):
            self.skipTest("a tmpfs needs root and mount(8)")
        os.makedirs(self.var, exist_ok=True)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", self.var],
                              capture_output=True, text=True)
        if done.returncode != 0:
            self.skipTest(f"mount -t tmpfs is not allowed here: {done.stderr.strip()}")
        self.addCleanup(subprocess.run, ["umount", "-l", self.var], capture_output=True)

    def test_a_full_disk_mid_variant_still_reverts_and_says_so(self):
        self.tmpfs_var()
        fill = "dd if=/dev/zero of=../../var/fill bs=64k count=1000 2>/dev/null; true"
        variants = [("baseline", apply_cmd("baseline")), ("v1", f"{apply_cmd('v1')} && {fill}")]
        self.experiment("001_workers", variants, revert_cmd(), measure_sh=FAKE_MEASURE_SH)
        rc, out, err = self.cli("run", "001_workers")
        self.assertEqual(rc, 1, out + err)
        self.assertEqual(self.server(), "baseline")
        self.assertEqual(self.order()[-1], "revert")
        self.assertNotIn("Traceback", err)
        self.assertIn("No space left on device", err)
        os.unlink(self.path("var", "fill"))
        rc, out, err = self.cli("recover")            # the record that could not be written is closed now
        self.assertEqual(rc, 0, out + err)
        self.assertNotEqual(self.state()["status"], "running")

    def test_a_full_disk_before_the_lock_is_one_line(self):
        self.tmpfs_var("64k")
        subprocess.run(["dd", "if=/dev/zero", f"of={self.path('var', 'fill')}", "bs=4k", "count=64"],
                       capture_output=True)
        self.quick_experiment()
        rc, out, err = self.cli("run", "001_workers")
        self.assertNotEqual(rc, 0)
        self.assert_one_error_line(err)
        self.assertEqual(self.server(), "original")

    def test_corrupt_var_files_are_one_line_naming_the_file_and_nothing_is_applied(self):
        self.quick_experiment()
        cases = [("applied.json", "[]", 1), ("applied.json", "{}", 1), ("kept.json", "[1]", 2),
                 ("kept.json", "garbage", 2), ("kept.json", '{"001_workers": 5}', 2)]
        for name, text, code in cases:
            with self.subTest(name=name, text=text):
                shutil.rmtree(self.var, ignore_errors=True)
                self.write(f"var/{name}", text)
                rc, out, err = self.cli("run")
                self.assertEqual(rc, code, out + err)
                self.assert_one_error_line(err, name)
                self.assertEqual(self.server(), "original")
                rc, out, err = self.cli("status")
                self.assertEqual(rc, 1, out + err)
                self.assertIn(name, out)
                self.assertNotIn("Traceback", err)
        shutil.rmtree(self.var)
        os.makedirs(self.path("var", "history.jsonl"))
        for command in ("run", "status", "dashboard"):
            with self.subTest(history="a folder", command=command):
                rc, out, err = self.cli(command)
                self.assertNotEqual(rc, 0)
                self.assertNotIn("Traceback", err)
                self.assertIn("history.jsonl", out + err)
        self.assertEqual(self.server(), "original")
        shutil.rmtree(self.var)
        self.write("var", "a file where the folder should be\n")
        rc, out, err = self.cli("run")
        self.assertNotEqual(rc, 0)
        self.assert_one_error_line(err, "var")

    def test_a_clock_stepped_back_never_rotates_away_the_current_run(self):
        self.quick_experiment()
        for run_id in ("20991231T000000", "20991231T000001"):   # runs that finished before the clock went back
            os.makedirs(self.path("var", "runs", run_id))
            with open(self.path("var", "history.jsonl"), "a", encoding="utf-8") as handle:
                handle.write(json.dumps({"run_id": run_id, "experiment": "001_workers", "status": "done"}) + "\n")
        code, _ = self.run_inprocess([self.path("experiments", "001_workers")], KEEP_RUNS=2)
        self.assertEqual(code, 0)
        current = self.state()["run_id"]
        self.assertLess(current, "20991231T000000")
        self.assertEqual(self.run_ids(), sorted([current, "20991231T000001"]))


@unittest.skipUnless(os.geteuid() == 0, "root runs these: they check what a root invocation may do")
class OwnerTests(RunTestCase):
    """var/ belongs to nobody (65534), as /opt/smart/var belongs to smart on a box."""

    def setUp(self):
        super().setUp()
        os.chmod(self.home, 0o755)
        self.spot = tempfile.mkdtemp(prefix="smart-owner-")
        os.chmod(self.spot, 0o777)
        self.addCleanup(shutil.rmtree, self.spot, True)
        os.makedirs(self.var)
        os.chown(self.var, 65534, 65534)

    def test_root_recover_runs_the_journal_with_the_rights_of_var_s_owner(self):
        journal = {"run_id": "x", "experiment": "001", "variant": "v", "path": self.spot,
                   "revert": f"id -u > {self.spot}/who"}
        self.write("var/applied.json", json.dumps(journal))
        os.chown(self.path("var", "applied.json"), 65534, 65534)
        rc, out, err = self.cli("recover")
        self.assertEqual(rc, 0, out + err)
        with open(os.path.join(self.spot, "who"), encoding="utf-8") as handle:
            self.assertEqual(handle.read().strip(), "65534")

    def test_a_lock_or_state_symlinked_elsewhere_is_not_followed(self):
        victim = os.path.join(self.spot, "victim")
        with open(victim, "w", encoding="utf-8") as handle:
            handle.write("precious\n")
        os.symlink(victim, self.path("var", "lock"))
        self.quick_experiment()
        rc, out, err = self.cli("run", "001_workers")
        self.assertNotEqual(rc, 0)
        self.assert_one_error_line(err, "lock")
        with open(victim, encoding="utf-8") as handle:
            self.assertEqual(handle.read(), "precious\n")
        os.unlink(self.path("var", "lock"))
        os.symlink(victim, self.path("var", "state.json"))
        rc, out, err = self.cli("status")
        self.assertNotIn("precious", out + err)

    def test_doctor_says_to_run_fixes_as_var_s_owner(self):
        journal = {"run_id": "x", "experiment": "001", "variant": "v", "path": self.spot, "revert": "true"}
        self.write("var/applied.json", json.dumps(journal))
        rc, out, err = self.cli("doctor")
        self.assertIn(f"sudo -u nobody python3 {SMART_PY} --home {self.home} recover", out)


class NameAndTextTests(RunTestCase):

    def test_variant_names_that_look_like_options_or_hidden_files_are_refused(self):
        for name in ("-rf", ".hidden", "--help"):
            with self.subTest(name=name):
                self.experiment("001_names", [("baseline", "true"), (name, "true")], "true",
                                target_url="http://127.0.0.1:9/")
                rc, out, err = self.cli("run", "--dry-run", "001_names")
                self.assertEqual(rc, 2, out + err)
                self.assert_one_error_line(err, "variants[1].name")

    def test_control_characters_never_reach_the_terminal(self):
        variants = [("baseline", apply_cmd("baseline")),
                    ("v1", "printf '\\033]0;owned\\007\\033[2J\\033[31mred\\n'; " + apply_cmd("v1"))]
        self.experiment("001_workers", variants, revert_cmd(), measure_sh=FAKE_MEASURE_SH)
        rc, out, err = self.cli("run", "001_workers")
        self.assertEqual(rc, 0, out + err)
        self.assertIn("red", out)
        self.assertNotIn("\x1b", out + err)
        self.assertNotIn("\x07", out + err)


if __name__ == "__main__":
    unittest.main()
