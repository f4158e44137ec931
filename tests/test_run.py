"""Fault injection for the `run` orchestrator (SPEC.md "A run", "var/state.json", "Layout of a home").

Every test works in its own temporary home.  Fake experiments edit a "server config" file in the
home (server.conf, or the DemoTarget's mode file) so that a test can see what is left applied, and
append each apply/revert to order.log so that a test can see in which order things happened.
Measurements go to a smart.DemoTarget on 127.0.0.1 (OS-assigned port) or to a fake measure.sh.
Signal, kill and lock tests run smart.py as a subprocess in its own process group; the others drive
smart.Runner in this process.  The home's smart.conf pins DESIGN=sequential and EARLY_STOP=no so
that the flow is the one of SPEC.md "A run" step by step; SwitchbackFaults repeats the main faults
under the switchback design (the default).
"""

from __future__ import annotations

import io
import json
import os
import pathlib
import random
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from helpers import clean_env, import_smart, run_cli, spawn_smart  # noqa: E402

smart = import_smart()

CONF = """\
BASELINE_SECONDS=1
EXPERIMENT_SECONDS=1
COOLDOWN_SECONDS=0
COMMAND_TIMEOUT_SECONDS=2
MIN_SAMPLES=10
PHONE_HOME=never
# the original flow (baseline, then each variant) unless a test asks for switchback; no early stops
DESIGN=sequential
EARLY_STOP=no
WARMUP_SECONDS=0
BLOCKS=2
"""

MEASURE = {"rate": 40, "timeout": 1}


def apply_cmd(name, file="server.conf", extra=""):
    """A variant's apply: write NAME to the home's server file and note it in order.log."""
    return f"echo {name} > ../../{file} && echo 'apply {name}' >> ../../order.log{extra}"


def revert_cmd(label="revert", file="server.conf"):
    return f"echo baseline > ../../{file} && echo '{label}' >> ../../order.log"


FAKE_MEASURE_SH = """#!/bin/sh
# a fake prober: 40 good rows at once for most arms; a failure for bad*, a long wait for hold*
good() {
    echo timestamp,latency_ms,response_code
    i=0
    while [ $i -lt 40 ]; do echo "$((1764274326 + i)),2$((i % 10)).5,200"; i=$((i + 1)); done
}
case "$(basename "$OUT")" in
    badexit.csv*) echo "probe crashed on $TARGET_URL"; exit 1 ;;
    badcsv.csv*) printf 'timestamp,latency_ms,response_code\\n1764274326,20.5,200\\nnot a row at all\\n1764274327,20.5,200\\n' > "$OUT" ;;
    hold*) echo $$ > ../../hold.pid; exec sleep 10 ;;
    *) good > "$OUT" ;;
esac
"""


def wait_for(predicate, timeout, step=0.02):
    """Poll predicate until it returns a truthy value or timeout passes; returns the last value."""
    ends = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= ends:
            return value
        time.sleep(step)


def processes_with(token):
    """Pids of live (non-zombie) processes whose command line contains token."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                cmdline = handle.read().replace(b"\0", b" ").decode("utf-8", "replace")
        except OSError:
            continue
        if token in cmdline:
            found.append(int(entry))
    return found


def kill_all(token):
    for pid in processes_with(token):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


class RunTestCase(unittest.TestCase):
    """A temp home with smart.conf, helpers to write experiments, run them and read what they left."""

    def setUp(self):
        self.home = tempfile.mkdtemp(prefix="smart-run-test-")
        self.addCleanup(shutil.rmtree, self.home, True)
        with open(os.path.join(self.home, "smart.conf"), "w", encoding="utf-8") as handle:
            handle.write(CONF)
        self.write("server.conf", "original\n")
        self.var = os.path.join(self.home, "var")

    # -- files --
    def path(self, *parts):
        return os.path.join(self.home, *parts)

    def write(self, relative, text, mode=None):
        path = self.path(relative)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(text)
        if mode is not None:
            os.chmod(path, mode)
        return path

    def read(self, relative, default=None):
        try:
            with open(self.path(relative), encoding="utf-8") as handle:
                return handle.read()
        except FileNotFoundError:
            return default

    def server(self, file="server.conf"):
        return (self.read(file) or "").strip()

    def order(self):
        return (self.read("order.log") or "").splitlines()

    def state(self):
        with open(self.path("var", "state.json"), encoding="utf-8") as handle:
            return json.load(handle)

    def history(self):
        with open(self.path("var", "history.jsonl"), encoding="utf-8") as handle:
            return [json.loads(line) for line in handle if line.strip()]

    def run_ids(self):
        runs = self.path("var", "runs")
        if not os.path.isdir(runs):
            return []
        return sorted(e for e in os.listdir(runs) if os.path.isdir(os.path.join(runs, e)))

    def run_log(self, run_id=None):
        run_id = run_id or self.state()["run_id"]
        with open(self.path("var", "runs", run_id, "run.log"), encoding="utf-8") as handle:
            return handle.read()

    def journal(self):
        return self.path("var", "applied.json")

    def variants(self, state=None):
        """{name: variant record} from state.json."""
        return {v["name"]: v for v in (state or self.state())["variants"]}

    # -- experiments and targets --
    def target(self, mode="plain"):
        """A DemoTarget on 127.0.0.1 whose mode file is HOME/target/mode; stopped in cleanup."""
        mode_path = self.write("target/mode", mode + "\n")
        server = smart.DemoTarget(mode_path).start()

        def stop():
            server.shutdown()
            server.server_close()
        self.addCleanup(stop)
        return server

    def experiment(self, exp_id, variants, revert, target_url=None, measure_sh=None, **extra):
        """experiments/EXP_ID/meta.json; variants is a list of (name, apply) pairs."""
        folder = self.path("experiments", exp_id)
        os.makedirs(folder, exist_ok=True)
        meta = {"id": exp_id, "description": f"test experiment {exp_id}",
                "variants": [{"name": name, "apply": command} for name, command in variants],
                "revert": revert}
        if target_url is not None:
            meta["target_url"] = target_url
            meta["measure"] = dict(MEASURE)
        meta.update(extra)
        with open(os.path.join(folder, "meta.json"), "w", encoding="utf-8") as handle:
            json.dump(meta, handle, indent=2)
        if measure_sh is not None:
            self.write(os.path.join("experiments", exp_id, "measure.sh"), measure_sh, 0o755)
        return folder

    def simple_experiment(self, exp_id="001_workers", url=None, names=("workers_2",), **extra):
        """baseline + the named variants, each writing its name to server.conf; revert writes baseline."""
        url = url or self.target().url
        variants = [("baseline", apply_cmd("baseline"))] + [(n, apply_cmd(n)) for n in names]
        return self.experiment(exp_id, variants, revert_cmd(), target_url=url, **extra)

    def quick_experiment(self, exp_id="001_workers", names=("v1",), revert=None, file="server.conf"):
        """Like simple_experiment, measured at once by FAKE_MEASURE_SH (same numbers in every arm)."""
        variants = [("baseline", apply_cmd("baseline", file))] + [(n, apply_cmd(n, file)) for n in names]
        return self.experiment(exp_id, variants, revert or revert_cmd(file=file), measure_sh=FAKE_MEASURE_SH)

    # -- running --
    def settings(self, **overrides):
        return smart.load_settings(self.path("smart.conf"), environ={}, overrides=overrides)

    def run_inprocess(self, folders, **overrides):
        """Drive smart.Runner in this process; returns (exit code, what it printed)."""
        out = io.StringIO()
        runner = smart.Runner(smart.Home(self.home), self.settings(**overrides), out=out)
        code = runner.run([smart.load_experiment(folder) for folder in folders])
        return code, out.getvalue()

    def cli(self, *args, env=None):
        return run_cli("--home", self.home, *args, env=env)

    def spawn(self, *args, env=None):
        """Start `smart.py --home HOME ARGS` in its own process group; killed in cleanup."""
        out = open(self.path("cli.out"), "w+", encoding="utf-8")
        err = open(self.path("cli.err"), "w+", encoding="utf-8")
        proc = spawn_smart(self, self.home, args, clean_env(env), out, err)
        return proc

    def interrupt(self, proc, sig):
        """Send sig to a spawned run; (exit code, seconds it took to end, stdout, stderr)."""
        sent = time.monotonic()
        proc.send_signal(sig)
        rc = proc.wait(10)
        took = time.monotonic() - sent
        out, err = self.spawned_output()
        return rc, took, out, err

    def spawned_output(self):
        return self.read("cli.out") or "", self.read("cli.err") or ""

    def wait_phase(self, phase, timeout=10):
        """Wait until var/state.json's phase is `phase`; fails the test otherwise."""
        def seen():
            try:
                return self.state().get("phase") == phase
            except (OSError, ValueError):
                return False
        self.assertTrue(wait_for(seen, timeout), f"state.json never reached phase {phase!r}")

    # -- assertions --
    def assert_one_error_line(self, err, *words):
        self.assertNotIn("Traceback", err)
        lines = err.strip().splitlines()
        self.assertEqual(len(lines), 1, f"expected one line on stderr, got: {err!r}")
        for word in words:
            self.assertIn(word, lines[0])

    def assert_nothing_applied(self):
        self.assertFalse(os.path.exists(self.journal()), "var/applied.json left behind")


# ---------------------------------------------------------------------------------------------
# 1-3: an apply or a measurement that fails reverts that variant; the run goes on


class ApplyAndMeasureFaults(RunTestCase):

    def test_apply_exit_1_reverts_that_variant_and_goes_on(self):
        folder = self.experiment("001_workers", [
            ("baseline", apply_cmd("baseline")),
            ("broken", apply_cmd("broken", extra=" && echo apply-went-wrong && exit 1")),
            ("workers_2", apply_cmd("workers_2")),
        ], revert_cmd(), target_url=self.target().url)
        code, out = self.run_inprocess([folder])

        self.assertEqual(code, 0, out)
        self.assertEqual(self.server(), "baseline")
        self.assertEqual(self.order(), ["apply baseline", "apply broken", "revert", "apply workers_2", "revert"])
        self.assert_nothing_applied()
        state = self.state()
        self.assertEqual(state["status"], "done")
        self.assertIsNone(state["kept_variant"])
        variants = self.variants(state)
        self.assertEqual(list(variants), ["broken", "workers_2"])
        self.assertEqual(variants["broken"]["decision"], "revert")
        self.assertIn("apply of broken exited 1", variants["broken"]["reason"])
        self.assertEqual(variants["workers_2"]["decision"], "revert")
        self.assertIsNotNone(variants["workers_2"].get("metrics"))
        log = self.run_log()
        self.assertIn("apply broken", log)
        self.assertIn("exited 1", log)
        self.assertIn("apply-went-wrong", log)        # the command's output is kept
        self.assertIn("revert broken", log)
        self.assertIn("measuring workers_2", log)
        run_dir = self.path("var", "runs", state["run_id"])
        self.assertFalse(os.path.exists(os.path.join(run_dir, "broken.csv.gz")))
        self.assertTrue(os.path.exists(os.path.join(run_dir, "workers_2.csv.gz")))
        self.assertEqual([h["status"] for h in self.history()], ["done"])

    def test_apply_past_time_box_is_killed_with_its_process_group(self):
        token = f"30.{random.randrange(10**6, 10**7)}"     # a sleep length no other process uses
        self.addCleanup(kill_all, token)
        folder = self.experiment("001_workers", [
            ("baseline", apply_cmd("baseline")),
            ("hang", apply_cmd("hang", extra=f"; sleep {token} & sleep {token}")),
            ("workers_2", apply_cmd("workers_2")),
        ], revert_cmd(), target_url=self.target().url)
        started = time.monotonic()
        code, out = self.run_inprocess([folder], COMMAND_TIMEOUT_SECONDS=1)
        elapsed = time.monotonic() - started

        self.assertEqual(code, 0, out)
        self.assertLess(elapsed, 15)
        self.assertEqual(processes_with(token), [], "a sleep of the hung apply survived")
        self.assertEqual(self.server(), "baseline")
        self.assertEqual(self.order(), ["apply baseline", "apply hang", "revert", "apply workers_2", "revert"])
        self.assert_nothing_applied()
        state = self.state()
        self.assertEqual(state["status"], "done")
        self.assertIsNone(state["kept_variant"])
        variants = self.variants(state)
        self.assertEqual(variants["hang"]["decision"], "revert")
        self.assertIn("time box", variants["hang"]["reason"])
        self.assertEqual(variants["workers_2"]["decision"], "revert")
        log = self.run_log()
        self.assertIn("apply hang", log)
        self.assertIn("time box", log)
        self.assertIn("revert hang", log)


    def test_guardrail_aborts_a_harmful_variant_reverts_it_and_goes_on(self):
        # the DemoTarget's broken mode fails one request in four: the guard must stop that
        # variant's measurement early, revert it with the reason, and try the next variant
        target = self.target("plain")
        mode = "../../target/mode"
        folder = self.experiment("001_demo", [
            ("baseline", f"echo plain > {mode}"),
            ("broken", f"echo broken > {mode}"),
            ("noop", "true"),
        ], f"echo plain > {mode}; echo reverted >> ../../order.log", target_url=target.url,
            experiment_seconds=6)
        started = time.monotonic()
        code, out = self.run_inprocess([folder])

        self.assertEqual(code, 0, out)
        self.assertLess(time.monotonic() - started, 11, "the guard did not cut the broken variant short")
        self.assertEqual(self.read("target/mode").strip(), "plain")
        self.assertEqual(self.order(), ["reverted", "reverted"])
        self.assert_nothing_applied()
        state = self.state()
        self.assertEqual((state["status"], state["kept_variant"]), ("done", None))
        variants = self.variants(state)
        self.assertEqual([(n, v["decision"]) for n, v in variants.items()], [("broken", "revert"), ("noop", "revert")])
        self.assertIn("guardrail", variants["broken"]["reason"])
        self.assertIn("guardrail", self.run_log())

    def test_measure_sh_failure_and_malformed_csv_revert_with_the_reason(self):
        folder = self.experiment("001_workers", [
            ("baseline", apply_cmd("baseline")),
            ("badexit", apply_cmd("badexit")),
            ("badcsv", apply_cmd("badcsv")),
            ("fine", apply_cmd("fine")),
        ], revert_cmd(), measure_sh=FAKE_MEASURE_SH, target_url="http://127.0.0.1:9/")
        code, out = self.run_inprocess([folder])

        self.assertEqual(code, 0, out)
        self.assertEqual(self.server(), "baseline")
        self.assertEqual(self.order(), ["apply baseline", "apply badexit", "revert", "apply badcsv", "revert",
                                        "apply fine", "revert"])
        self.assert_nothing_applied()
        state = self.state()
        self.assertEqual(state["status"], "done")
        self.assertIsNone(state["kept_variant"])
        variants = self.variants(state)
        self.assertEqual(list(variants), ["badexit", "badcsv", "fine"])
        self.assertEqual(variants["badexit"]["decision"], "revert")
        self.assertIn("measure.sh exited 1", variants["badexit"]["reason"])
        self.assertEqual(variants["badcsv"]["decision"], "revert")
        self.assertRegex(variants["badcsv"]["reason"], r"badcsv\.csv[^:]*:3:")   # names the file and line
        self.assertIn("malformed", variants["badcsv"]["reason"])
        self.assertEqual(variants["fine"]["decision"], "revert")           # same numbers: no gain
        log = self.run_log()
        self.assertIn("probe crashed on http://127.0.0.1:9/", log)
        self.assertIn("revert badexit", log)
        self.assertIn("revert badcsv", log)


# ---------------------------------------------------------------------------------------------
# 4: a revert that fails stops the run; the next run retries it first


class RevertFailure(RunTestCase):

    def test_failed_revert_stops_the_run_and_the_next_run_retries_it_first(self):
        self.write("revert.fail", "")
        revert = ("if [ -e ../../revert.fail ]; then echo 'revert-went-wrong'; echo 'revert failed' >> ../../order.log; "
                  "exit 3; fi; " + revert_cmd())
        self.experiment("001_workers", [
            ("baseline", apply_cmd("baseline")), ("v1", apply_cmd("v1")), ("v2", apply_cmd("v2")),
        ], revert, target_url=self.target().url)

        rc, out, err = self.cli("run")
        self.assertEqual(rc, 1, out + err)
        self.assertNotIn("Traceback", err)
        self.assertEqual(self.server(), "v1")                      # the box is left on v1 ...
        journal = smart.read_json(self.journal())                  # ... and the journal says so
        self.assertIsNotNone(journal, "var/applied.json must stay after a failed revert")
        self.assertEqual((journal["experiment"], journal["variant"]), ("001_workers", "v1"))
        self.assertNotIn("apply v2", self.order())                 # the run stopped there
        first = self.state()
        self.assertEqual(first["status"], "failed")
        self.assertIsNone(first["kept_variant"])
        self.assertIn("revert of v1 exited 3", first["reason"])
        first_log = self.run_log(first["run_id"])
        self.assertIn("revert v1", first_log)
        self.assertIn("exited 3", first_log)
        self.assertIn("revert-went-wrong", first_log)
        self.assertFalse(os.path.exists(self.path("var", "runs", first["run_id"], "v2.csv.gz")))

        # while the revert still fails, the next run retries it, fails again and starts nothing
        rc, out, err = self.cli("run")
        self.assertEqual(rc, 1, out + err)
        self.assert_one_error_line(err, "v1", "recover")
        self.assertEqual(self.run_ids(), [first["run_id"]])
        self.assertEqual(self.server(), "v1")
        self.assertTrue(os.path.exists(self.journal()))
        self.assertEqual(self.order()[-1], "revert failed")
        self.assertEqual(self.state()["run_id"], first["run_id"])

        os.unlink(self.path("revert.fail"))
        order_before = len(self.order())
        time.sleep(1.05)                                           # a new RUN_ID second, for tidiness
        rc, out, err = self.cli("run")
        self.assertEqual(rc, 0, out + err)
        # the revert is retried before anything else, then the run proceeds
        self.assertEqual(self.order()[order_before:], ["revert", "apply baseline", "apply v1", "revert",
                                                       "apply v2", "revert"])
        self.assertIn("recovering", out)
        self.assertLess(out.index("recovering"), out.index("apply baseline"))
        self.assertEqual(self.server(), "baseline")
        self.assert_nothing_applied()
        second = self.state()
        self.assertNotEqual(second["run_id"], first["run_id"])
        self.assertEqual(second["status"], "done")
        self.assertIsNone(second["kept_variant"])
        self.assertEqual([(n, v["decision"]) for n, v in self.variants(second).items()],
                         [("v1", "revert"), ("v2", "revert")])
        self.assertEqual([h["status"] for h in self.history()], ["failed", "done"])

    FAILING_REVERT = "echo 'revert failed' >> ../../order.log; exit 3"

    def test_failed_revert_stops_the_whole_run_before_the_next_experiment(self):
        # SPEC "A run" 4: a revert that fails: stop, status failed, exit 1 (the journal must survive)
        self.quick_experiment("001_a", names=("v1",), revert=self.FAILING_REVERT, file="a.conf")
        self.quick_experiment("002_b", names=("w1",), file="b.conf")
        rc, out, err = self.cli("run")
        self.assertEqual(rc, 1, out + err)
        self.assertEqual(self.server("a.conf"), "v1")
        self.assertFalse(os.path.exists(self.path("b.conf")), "002_b was started after 001_a's revert failed")
        journal = smart.read_json(self.journal())
        self.assertIsNotNone(journal, "002_b ran after 001_a's revert failed and its journal replaced "
                                      "001_a's: nothing remembers that 001_a/v1 is still applied")
        self.assertEqual((journal["experiment"], journal["variant"]), ("001_a", "v1"))
        self.assertNotIn("apply w1", self.order(), "002_b was tried after 001_a's revert failed")

    def test_failed_revert_is_one_of_the_variants_in_state_json(self):
        # SPEC "var/state.json": variants has one entry per variant tried; v1 was applied, measured
        # and decided before its revert failed.
        self.quick_experiment(names=("v1",), revert=self.FAILING_REVERT)
        rc, out, err = self.cli("run")
        self.assertEqual(rc, 1, out + err)
        state = self.state()
        self.assertEqual(state["status"], "failed")
        self.assertIn("v1", self.variants(state),
                      "state.json of the failed run has no entry for v1, the variant whose revert failed")
        self.assertEqual(self.variants(state)["v1"]["decision"], "revert")

    def test_failed_revert_says_so_in_one_line_on_stderr(self):
        # SPEC "Command line": exit 1 = the work failed (a revert failed); every error is one line on stderr
        self.quick_experiment(names=("v1",), revert=self.FAILING_REVERT)
        rc, out, err = self.cli("run")
        self.assertEqual(rc, 1, out + err)
        self.assert_one_error_line(err, "v1")


# ---------------------------------------------------------------------------------------------
# 5-7: signals, SIGKILL + recovery, the lock (smart.py as a subprocess)


class SignalsAndRecovery(RunTestCase):

    def test_sigterm_during_measurement_reverts_and_exits_1(self):
        self.simple_experiment(names=("v1", "v2"), experiment_seconds=8)
        proc = self.spawn("run")
        self.wait_phase("measuring v1")
        time.sleep(0.5)
        self.assertEqual(self.server(), "v1")
        rc, took, out, err = self.interrupt(proc, signal.SIGTERM)

        self.assertEqual(rc, 1, out + err)
        self.assertLess(took, 4, "the run measured on instead of acting on SIGTERM (its arm lasts 8 s)")
        self.assertNotIn("Traceback", err)
        self.assertEqual(self.server(), "baseline")
        self.assertEqual(self.order(), ["apply baseline", "apply v1", "revert"])
        self.assert_nothing_applied()
        state = self.state()
        self.assertEqual(state["status"], "interrupted")
        self.assertIsNone(state["kept_variant"])
        self.assertIn("SIGTERM", state["reason"])
        self.assertIn("v1 reverted", state["reason"])
        self.assertNotIn("v2", self.variants(state))
        log = self.run_log()
        self.assertIn("SIGTERM", log)
        self.assertIn("revert v1", log)
        self.assertIn("interrupted", log)
        self.assertEqual([h["status"] for h in self.history()], ["interrupted"])

    def test_sigint_during_cooldown_reverts_and_exits_1(self):
        self.simple_experiment(names=("v1",), cooldown_seconds=10)
        proc = self.spawn("run")
        self.wait_phase("cooldown v1")
        time.sleep(0.3)
        rc, took, out, err = self.interrupt(proc, signal.SIGINT)
        self.assertEqual(rc, 1, out + err)
        self.assertLess(took, 5, "the run waited out its 10 s cool-down instead of acting on SIGINT")
        self.assertNotIn("Traceback", err)
        self.assertEqual(self.server(), "baseline")
        self.assertEqual(self.order(), ["apply baseline", "apply v1", "revert"])
        self.assert_nothing_applied()
        state = self.state()
        self.assertEqual(state["status"], "interrupted")
        self.assertIn("SIGINT", state["reason"])
        self.assertIn("SIGINT", self.run_log())

    def test_sigterm_in_measure_sh_kills_it_and_lists_the_reverted_variant(self):
        self.quick_experiment(names=("hold1", "v2"))
        self.addCleanup(self._kill_hold)
        proc = self.spawn("run")
        self.wait_phase("measuring hold1")
        self.assertTrue(wait_for(lambda: self.read("hold.pid"), 5))
        time.sleep(0.3)
        rc, _, out, err = self.interrupt(proc, signal.SIGTERM)
        self.assertEqual(rc, 1, out + err)
        hold = int(self.read("hold.pid"))
        self.assertTrue(wait_for(lambda: not os.path.exists(f"/proc/{hold}/cmdline")
                                 or not pathlib.Path(f"/proc/{hold}/cmdline").read_bytes(), 2),
                        "measure.sh was not killed on SIGTERM")
        self.assertEqual(self.server(), "baseline")
        self.assertEqual(self.order(), ["apply baseline", "apply hold1", "revert"])
        state = self.state()
        self.assertEqual(state["status"], "interrupted")
        self.assertIn("hold1 reverted", state["reason"])
        # SPEC "var/state.json": variants has one entry per variant tried (hold1 was applied,
        # measured for a while and reverted)
        self.assertIn("hold1", self.variants(state),
                      "state.json of the interrupted run has no entry for hold1, the variant it reverted")
        self.assertEqual(self.variants(state)["hold1"]["decision"], "revert")

    def _kill_hold(self):
        text = self.read("hold.pid")
        if text and text.strip().isdigit():
            try:
                os.kill(int(text), signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _kill_during_v1(self, *run_args):
        proc = self.spawn("run", *run_args)
        self.wait_phase("measuring v1")
        time.sleep(0.3)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(5)
        self.assertEqual(self.server(), "v1")
        journal = smart.read_json(self.journal())
        self.assertIsNotNone(journal, "no var/applied.json after SIGKILL with v1 applied")
        self.assertEqual(journal["variant"], "v1")
        killed = self.state()
        self.assertEqual(killed["status"], "running")
        return killed

    def test_sigkill_leaves_the_journal_and_recover_reverts(self):
        self.simple_experiment(names=("v1",), experiment_seconds=8)
        killed = self._kill_during_v1()

        rc, out, err = self.cli("recover")
        self.assertEqual(rc, 0, out + err)
        self.assertEqual(err, "")
        self.assertIn("recovering", out)
        self.assertEqual(self.server(), "baseline")
        self.assertEqual(self.order(), ["apply baseline", "apply v1", "revert"])
        self.assert_nothing_applied()
        state = self.state()
        self.assertEqual(state["run_id"], killed["run_id"])
        self.assertEqual(state["status"], "interrupted")
        self.assertIsNone(state["kept_variant"])
        self.assertIn("v1", state["reason"])
        self.assertEqual([(h["run_id"], h["status"]) for h in self.history()], [(killed["run_id"], "interrupted")])
        self.assertIn("measuring v1", self.run_log(killed["run_id"]))

        rc, out, err = self.cli("recover")                 # nothing left: says so, changes nothing
        self.assertEqual(rc, 0, out + err)
        self.assertIn("nothing to recover", out)
        self.assertEqual(len(self.order()), 3)

    def test_sigkill_then_another_experiment_recovers_the_first_before_anything_else(self):
        url = self.target().url
        self.experiment("001_first", [("baseline", apply_cmd("baseline", "a.conf")), ("v1", apply_cmd("v1", "a.conf"))],
                        revert_cmd("revert first", "a.conf"), target_url=url, experiment_seconds=8)
        self.experiment("002_second", [("baseline", apply_cmd("B", "b.conf")), ("w1", apply_cmd("w1", "b.conf"))],
                        revert_cmd("revert second", "b.conf"), target_url=url)
        proc = self.spawn("run", "001_first")
        self.wait_phase("measuring v1")
        time.sleep(0.3)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(5)
        self.assertEqual(self.server("a.conf"), "v1")
        killed = self.state()

        rc, out, err = self.cli("run", "002_second")
        self.assertEqual(rc, 0, out + err)
        self.assertIn("recovering", out)
        order = self.order()
        self.assertEqual(order[:3], ["apply baseline", "apply v1", "revert first"])   # before anything of 002
        self.assertEqual(order[3:], ["apply B", "apply w1", "revert second"])
        self.assertEqual(self.server("a.conf"), "baseline")
        self.assertEqual(self.server("b.conf"), "baseline")
        self.assert_nothing_applied()
        state = self.state()
        self.assertEqual(state["experiment"], "002_second")
        self.assertEqual(state["status"], "done")
        self.assertIsNone(state["kept_variant"])
        self.assertEqual(self.variants(state)["w1"]["decision"], "revert")
        self.assertEqual([(h["experiment"], h["status"]) for h in self.history()],
                         [("001_first", "interrupted"), ("002_second", "done")])
        self.assertIn("measuring v1", self.run_log(killed["run_id"]))

    def test_recovery_at_the_start_of_a_run_is_in_a_run_log(self):
        # SPEC "Layout of a home": var/runs/RUN_ID/run.log; the recovery a run does first (reverting
        # what a killed run left applied) should be recorded there, not only on stdout.
        self.experiment("001_first", [("baseline", apply_cmd("baseline", "a.conf")), ("v1", apply_cmd("v1", "a.conf"))],
                        revert_cmd("revert first", "a.conf"), target_url=self.target().url, cooldown_seconds=10)
        self.quick_experiment("002_second", names=("w1",), file="b.conf")
        proc = self.spawn("run", "001_first")
        self.wait_phase("cooldown v1")
        time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(5)
        killed = self.state()
        rc, out, err = self.cli("run", "002_second")
        self.assertEqual(rc, 0, out + err)
        self.assertIn("recovering", out)
        self.assertEqual(self.server("a.conf"), "baseline")
        logs = {run_id: self.run_log(run_id) for run_id in self.run_ids()}
        self.assertTrue(any("recover" in log for log in logs.values()),
                        f"no run.log records the recovery of 001_first/v1 (killed run {killed['run_id']}); "
                        "it went to stdout only")

    def test_second_concurrent_run_exits_at_once_naming_the_holder(self):
        self.simple_experiment(names=("v1",), experiment_seconds=5)
        first = self.spawn("run")
        self.wait_phase("measuring v1")
        rc, out, err = self.cli("run")

        self.assertNotEqual(rc, 0)
        self.assertIsNone(first.poll(), "the second run waited for the first instead of exiting at once")
        self.assert_one_error_line(err, str(first.pid), "lock")
        self.assertEqual(len(self.run_ids()), 1)            # the second run made no run folder
        # nor may `recover` revert what a live run has applied
        rc, out, err = self.cli("recover")
        self.assertNotEqual(rc, 0)
        self.assert_one_error_line(err, str(first.pid), "lock")
        self.assertEqual(self.server(), "v1")
        self.assertTrue(os.path.exists(self.journal()))
        self.assertEqual(self.state()["phase"], "measuring v1")

        first.send_signal(signal.SIGTERM)
        self.assertEqual(first.wait(10), 1)
        self.assertEqual(self.server(), "baseline")
        self.assertEqual(self.order(), ["apply baseline", "apply v1", "revert"])
        self.assert_nothing_applied()
        state = self.state()
        self.assertEqual(state["status"], "interrupted")
        self.assertIsNone(state["kept_variant"])
        self.assertIn("SIGTERM", self.run_log())


# ---------------------------------------------------------------------------------------------
# 8-10: a real run against the DemoTarget, rotation, state.json atomicity


class RealRuns(RunTestCase):

    def test_three_variants_against_the_demo_target_keep_the_cached_one(self):
        target = self.target("plain")
        mode = "../../target/mode"
        folder = self.experiment("001_demo", [
            ("baseline", f"echo plain > {mode}"),
            ("noop", "true"),
            ("broken_apply", f"echo slow > {mode}; exit 1"),
            ("cached", f"echo cached > {mode}"),
            ("never_tried", f"echo slow > {mode}"),
        ], f"echo plain > {mode}; echo reverted >> ../../order.log", target_url=target.url,
            baseline_seconds=1.5, experiment_seconds=1.5, cooldown_seconds=0.1)
        code, out = self.run_inprocess([folder])

        self.assertEqual(code, 0, out)
        self.assertEqual(self.read("target/mode").strip(), "cached")
        self.assertEqual(self.order(), ["reverted", "reverted"])     # noop and broken_apply
        self.assert_nothing_applied()
        state = self.state()
        self.assertEqual(state["status"], "done")
        self.assertEqual(state["kept_variant"], "cached")
        variants = self.variants(state)
        self.assertEqual(list(variants), ["noop", "broken_apply", "cached"])
        self.assertEqual([v["decision"] for v in variants.values()], ["revert", "revert", "keep"])
        self.assertIn("apply of broken_apply exited 1", variants["broken_apply"]["reason"])
        self.assertGreater(state["metrics"]["base_p50_ms"], state["metrics"]["var_p50_ms"])
        self.assertGreaterEqual(variants["cached"]["metrics"]["improve_pct"], 50)
        run_dir = self.path("var", "runs", state["run_id"])
        files = set(os.listdir(run_dir))
        self.assertLessEqual({"baseline.csv.gz", "noop.csv.gz", "cached.csv.gz", "noop_decision.log",
                              "cached_decision.log", "run.log"}, files)      # the CSVs compressed at the run's end
        self.assertNotIn("broken_apply.csv.gz", files)
        self.assertNotIn("never_tried.csv.gz", files)
        self.assertEqual({name for name in files if name.endswith(".csv")}, set())
        for name in ("baseline", "noop", "cached"):
            self.assertGreaterEqual(smart.read_measurements(os.path.join(run_dir, f"{name}.csv")).ok, 30)
        for name in ("state.json", "history.jsonl", "history.json"):
            self.assertTrue(os.path.isfile(self.path("var", name)), name)
        self.assertEqual(smart.read_json(self.path("var", "history.json"))["runs"][-1]["kept_variant"], "cached")
        self.assertEqual(smart.read_json(self.path("var", "kept.json"))["001_demo"]["variant"], "cached")
        log = self.run_log()
        self.assertIn("about to apply cached", log)
        self.assertIn("kept cached", log)
        self.assertIn("revert noop", log)

    def test_keep_runs_rotation_leaves_exactly_the_newest(self):
        runs = self.path("var", "runs")
        os.makedirs(runs)
        old = [time.strftime("%Y%m%dT%H%M%S", time.gmtime(1577836800 + i * 61)) for i in range(1000)]
        with open(self.path("var", "history.jsonl"), "w", encoding="utf-8") as history:
            for run_id in old:
                os.makedirs(os.path.join(runs, run_id))
                history.write(json.dumps({"run_id": run_id, "experiment": "000_old", "status": "done",
                                          "kept_variant": None, "variants": []}) + "\n")
        with open(os.path.join(runs, old[-1], "run.log"), "w", encoding="utf-8") as handle:
            handle.write("an old run\n")
        folder = self.experiment("001_workers", [("baseline", apply_cmd("baseline")), ("v1", apply_cmd("v1"))],
                                 revert_cmd(), measure_sh=FAKE_MEASURE_SH)
        code, out = self.run_inprocess([folder], KEEP_RUNS=200)

        self.assertEqual(code, 0, out)
        state = self.state()
        left = self.run_ids()
        self.assertEqual(len(left), 200)
        self.assertEqual(left[-1], state["run_id"])
        self.assertEqual(left[:-1], old[-199:])
        lines = self.history()                             # every line parses
        self.assertEqual(len(lines), 1001)
        self.assertEqual(lines[-1]["run_id"], state["run_id"])
        published = smart.read_json(self.path("var", "history.json"))
        self.assertEqual(published["runs"][-1]["run_id"], state["run_id"])
        self.assertLessEqual(len(published["runs"]), 200)
        self.assertEqual(self.server(), "baseline")
        self.assertEqual(state["status"], "done")
        self.assertIn("measuring v1", self.run_log())

    def test_state_json_is_never_seen_half_written(self):
        self.simple_experiment(names=("v1", "v2"), cooldown_seconds=0.2)
        state_path = self.path("var", "state.json")
        reads, failures, phases = [0], [], set()
        done = threading.Event()

        def reader():
            while not done.is_set():
                try:
                    with open(state_path, "rb") as handle:
                        data = handle.read()
                except FileNotFoundError:
                    continue
                reads[0] += 1
                try:
                    phases.add(json.loads(data)["phase"])
                except (ValueError, KeyError) as exc:
                    failures.append(f"{exc}: {data[:80]!r}")

        thread = threading.Thread(target=reader, daemon=True)
        thread.start()
        self.addCleanup(done.set)
        proc = self.spawn("run")
        rc = proc.wait(30)
        done.set()
        thread.join(5)
        out, err = self.spawned_output()

        self.assertEqual(rc, 0, out + err)
        self.assertEqual(failures, [])
        self.assertGreater(reads[0], 100)
        self.assertLessEqual({"measuring baseline", "cooldown v1", "measuring v1", "finished"}, phases)
        self.assertEqual(self.state()["status"], "done")
        self.assertEqual(self.server(), "baseline")
        self.assertEqual([n for n in os.listdir(self.var) if n.endswith(".tmp")], [])
        self.assertIn("finished: status done", self.run_log())


# ---------------------------------------------------------------------------------------------
# the same faults under the switchback design (the default DESIGN): many applies and reverts


class SwitchbackFaults(RunTestCase):

    def assert_applies_reverted(self, order, name):
        """Every `apply NAME` in order is followed by a revert before anything else is applied."""
        for index, line in enumerate(order):
            if line == f"apply {name}":
                self.assertEqual(order[index + 1:index + 2], ["revert"], order)

    def test_switchback_apply_failure_reverts_and_goes_on(self):
        folder = self.experiment("001_workers", [
            ("baseline", apply_cmd("baseline")),
            ("broken", apply_cmd("broken", extra=" && exit 1")),
            ("workers_2", apply_cmd("workers_2")),
        ], revert_cmd(), target_url=self.target().url, design="switchback", blocks=2)
        code, out = self.run_inprocess([folder])

        self.assertEqual(code, 0, out)
        self.assertEqual(self.server(), "baseline")
        order = self.order()
        self.assertEqual(order[:3], ["apply baseline", "apply broken", "revert"])
        self.assertIn(order[3:].count("apply workers_2"), (1, 2))        # two variant blocks, maybe back to back
        self.assert_applies_reverted(order, "workers_2")
        self.assertEqual(order[-1], "revert")
        self.assert_nothing_applied()
        state = self.state()
        self.assertEqual((state["status"], state["design"], state["kept_variant"]), ("done", "switchback", None))
        variants = self.variants(state)
        self.assertEqual([(n, v["decision"]) for n, v in variants.items()],
                         [("broken", "revert"), ("workers_2", "revert")])
        self.assertIn("apply of broken exited 1", variants["broken"]["reason"])
        log = self.run_log()
        self.assertIn("switchback", log)
        self.assertIn("revert broken", log)

    def test_switchback_sigterm_in_a_variant_block_reverts(self):
        self.simple_experiment(names=("v1", "v2"), design="switchback", blocks=2, experiment_seconds=8)
        proc = self.spawn("run")
        self.wait_phase("measuring v1")
        time.sleep(0.5)
        self.assertEqual(self.server(), "v1")
        rc, took, out, err = self.interrupt(proc, signal.SIGTERM)

        self.assertEqual(rc, 1, out + err)
        self.assertLess(took, 4, "the run measured on instead of acting on SIGTERM (its block lasts 8 s)")
        self.assertNotIn("Traceback", err)
        self.assertEqual(self.server(), "baseline")
        order = self.order()
        self.assertEqual(order[-1], "revert")
        self.assertNotIn("apply v2", order)
        self.assert_applies_reverted(order, "v1")
        self.assert_nothing_applied()
        state = self.state()
        self.assertEqual(state["status"], "interrupted")
        self.assertIn("SIGTERM", state["reason"])
        self.assertIn("v1 reverted", state["reason"])
        self.assertIn("SIGTERM", self.run_log())


# ---------------------------------------------------------------------------------------------
# 11-14: bad meta.json, --dry-run, an unwritable var/, hooks (CLI)


class InputsAndHooks(RunTestCase):

    def assert_changed_nothing(self):
        self.assertEqual(self.server(), "original")
        self.assertEqual(self.run_ids(), [])
        self.assertFalse(os.path.exists(self.path("var", "state.json")))
        self.assertFalse(os.path.exists(self.path("order.log")))

    def test_bad_meta_json_exits_2_naming_the_file_and_the_field(self):
        good = {"id": "001_bad", "variants": [{"name": "baseline", "apply": apply_cmd("baseline")},
                                              {"name": "v1", "apply": apply_cmd("v1")}],
                "revert": revert_cmd(), "target_url": "http://127.0.0.1:9/"}

        def changed(**fields):
            meta = json.loads(json.dumps(good))
            for key, value in fields.items():
                if value is None:
                    meta.pop(key)
                else:
                    meta[key] = value
            return json.dumps(meta)

        cases = [
            ("invalid JSON", '{"variants": [\n', "meta.json:2"),
            ("missing variants", changed(variants=None), "variants"),
            ("bad variant name", changed(variants=[good["variants"][0], {"name": "v 1/..", "apply": "true"}]),
             "variants[1].name"),
            ("duplicate names", changed(variants=[good["variants"][0], good["variants"][1], good["variants"][1]]),
             "variants[2].name"),
            ("only a baseline", changed(variants=[good["variants"][0]]), "variants"),
            ("ftp target_url", changed(target_url="ftp://127.0.0.1/"), "target_url"),
            ("negative seconds", changed(experiment_seconds=-1), "experiment_seconds"),
            ("unknown measure key", changed(measure={"concurrency": 2, "bogus": 1}), "measure.bogus"),
            ("variants not a list", changed(variants={"baseline": "true"}), "variants"),
        ]
        problems = []
        for label, text, field in cases:
            self.write("experiments/001_bad/meta.json", text)
            rc, out, err = self.cli("run", "001_bad")
            lines = err.strip().splitlines()
            if rc != 2 or len(lines) != 1 or "Traceback" in err or "meta.json" not in err or field not in err:
                problems.append(f"{label}: rc {rc}, stderr {err!r}")
        shutil.rmtree(self.path("experiments", "001_bad"))
        self.simple_experiment("002_fine", url="http://127.0.0.1:9/")
        rc, out, err = self.cli("run", "999_nope")
        if rc != 2 or len(err.strip().splitlines()) != 1 or "999_nope" not in err or "Traceback" in err:
            problems.append(f"unknown experiment: rc {rc}, stderr {err!r}")
        self.assertEqual(problems, [])
        self.assertEqual(self.server(), "original")
        self.assertEqual(self.run_ids(), [])

    def test_measure_shape_outside_the_probers_limits_exits_2_in_run_dry_run_and_apply(self):
        # The prober refuses 20000 connections; meta.json must be refused at load time, before the
        # baseline's apply, naming the file and the field - not later with a command-line flag's name.
        for field, value in (("concurrency", 20000), ("rate", 0), ("timeout", 7200), ("max_in_flight", 0.5)):
            self.simple_experiment("001_shape", url="http://127.0.0.1:9/", measure={field: value})
            for args in (("run", "001_shape"), ("run", "--dry-run", "001_shape"), ("apply", "001_shape", "workers_2")):
                with self.subTest(field=field, args=args):
                    rc, out, err = self.cli(*args)
                    self.assertEqual(rc, 2, out + err)
                    self.assert_one_error_line(err, "meta.json", f"measure.{field}")
                    self.assertNotIn("--", err.split(f"measure.{field}", 1)[1])
        self.assertEqual(self.server(), "original")
        self.assertFalse(os.path.exists(self.path("order.log")))
        self.assertEqual(self.run_ids(), [])

    def test_dry_run_prints_the_plan_and_changes_nothing(self):
        self.experiment("001_workers", [("baseline", apply_cmd("baseline")), ("workers_2", apply_cmd("workers_2")),
                                        ("workers_4", apply_cmd("workers_4"))],
                        revert_cmd(), target_url="http://127.0.0.1:9/")
        rc, out, err = self.cli("run", "--dry-run")
        self.assertEqual(rc, 0, out + err)
        self.assertEqual(err, "")
        for text in ("001_workers", "workers_2", "workers_4", apply_cmd("workers_2"), apply_cmd("workers_4"),
                     apply_cmd("baseline"), revert_cmd(), "dry run"):
            self.assertIn(text, out)
        self.assert_changed_nothing()
        self.assertFalse(os.path.exists(self.var))

    def test_dry_run_plan_describes_the_switchback_design_and_its_length(self):
        # DESIGN=switchback (the default) measures each variant in BLOCKS baseline/variant pairs with a
        # warm-up after every switch; the plan should say so and its "at most" should cover that time
        self.write("smart.conf", "BASELINE_SECONDS=10\nEXPERIMENT_SECONDS=20\nCOOLDOWN_SECONDS=3\n"
                                 "DESIGN=switchback\nBLOCKS=4\nWARMUP_SECONDS=5\nEARLY_STOP=no\n")
        self.experiment("001_workers", [("baseline", apply_cmd("baseline")), ("workers_2", apply_cmd("workers_2")),
                                        ("workers_4", apply_cmd("workers_4"))],
                        revert_cmd(), target_url="http://127.0.0.1:9/")
        rc, out, err = self.cli("run", "--dry-run")
        self.assertEqual(rc, 0, out + err)
        self.assert_changed_nothing()
        # warm-up, then per variant: BLOCKS x (baseline block + variant block + two warm-ups)
        measuring = 5 + 2 * (10 + 20 + 2 * 4 * 5)
        total = float(re.findall(r"at most ([0-9.]+) s", out)[-1])
        self.assertGreaterEqual(total, measuring, f"the plan's length is for the sequential design:\n{out}")
        self.assertIn("switchback", out)

    def test_var_runs_is_a_file_one_error_line_nothing_applied(self):
        self.simple_experiment(url="http://127.0.0.1:9/")
        self.write("var/runs", "not a folder\n")
        rc, out, err = self.cli("run")
        self.assertNotEqual(rc, 0)
        self.assert_one_error_line(err, "var/runs")
        self.assertEqual(self.server(), "original")
        self.assertFalse(os.path.exists(self.path("order.log")))
        self.assert_nothing_applied()

    def test_state_json_is_a_folder_one_error_line_nothing_applied(self):
        self.simple_experiment(url="http://127.0.0.1:9/")
        os.makedirs(self.path("var", "state.json"))
        rc, out, err = self.cli("run")
        self.assertNotEqual(rc, 0)
        self.assert_one_error_line(err, "state.json")
        self.assertEqual(self.server(), "original")
        self.assertFalse(os.path.exists(self.path("order.log")))
        self.assert_nothing_applied()
        self.assertEqual([n for n in os.listdir(self.var) if n.endswith(".tmp")], [])

    def test_journal_is_a_folder_one_error_line_nothing_applied(self):
        self.simple_experiment(url="http://127.0.0.1:9/")
        os.makedirs(self.path("var", "applied.json", "x"))    # a folder in place of the journal
        rc, out, err = self.cli("run")
        self.assertEqual(rc, 1, out + err)
        self.assert_one_error_line(err, "applied.json")
        self.assertEqual(self.server(), "original")           # no apply without a journal
        self.assertFalse(os.path.exists(self.path("order.log")))

    HOOK = """#!/bin/sh
echo "{name} $1 $2" >> "{home}/hooks.log"
echo 'hook {name}' >> "{home}/order.log"
cp "$2" "{home}/{name}.state.json"
exit {code}
"""

    def hooks(self, pre_code=0):
        for name, code in (("pre-run", pre_code), ("post-run", 0)):
            self.write(f"hooks/{name}", self.HOOK.format(name=name, home=self.home, code=code), 0o755)

    def test_pre_and_post_run_hooks_get_the_run_id_and_the_state_path(self):
        self.simple_experiment(names=("v1",))
        self.hooks()
        rc, out, err = self.cli("run")
        self.assertEqual(rc, 0, out + err)
        state = self.state()
        state_path = self.path("var", "state.json")
        self.assertEqual((self.read("hooks.log") or "").splitlines(),
                         [f"pre-run {state['run_id']} {state_path}", f"post-run {state['run_id']} {state_path}"])
        self.assertEqual(self.order(), ["hook pre-run", "apply baseline", "apply v1", "revert", "hook post-run"])
        self.assertEqual(smart.read_json(self.path("pre-run.state.json"))["status"], "running")
        self.assertEqual(smart.read_json(self.path("post-run.state.json"))["status"], "done")
        self.assertEqual(self.server(), "baseline")
        self.assertEqual(state["status"], "done")
        self.assertEqual(self.variants(state)["v1"]["decision"], "revert")
        log = self.run_log()
        self.assertIn("pre-run hook", log)
        self.assertIn("post-run hook", log)

    def test_failing_pre_run_hook_changes_nothing(self):
        self.simple_experiment(names=("v1",))
        self.hooks(pre_code=4)
        rc, out, err = self.cli("run")
        self.assertEqual(rc, 1, out + err)
        self.assertNotIn("Traceback", err)
        self.assertEqual(self.server(), "original")
        self.assertNotIn("apply baseline", self.order())
        self.assert_nothing_applied()
        state = self.state()
        self.assertEqual(state["status"], "failed")
        self.assertIsNone(state["kept_variant"])
        self.assertEqual(state["variants"], [])
        self.assertIn("pre-run hook exited 4", state["reason"])
        run_dir = self.path("var", "runs", state["run_id"])
        self.assertEqual([n for n in os.listdir(run_dir) if ".csv" in n], [])
        self.assertIn("pre-run hook", self.run_log())
        self.assertEqual([h["status"] for h in self.history()], ["failed"])

    def test_the_timers_pass_runs_one_trial_and_the_next_pass_the_next_experiment(self):
        # SPEC "One trial a pass": a pass fits the service's time box however many experiments there are
        self.quick_experiment("001_a", names=("v1",), file="a.conf")
        self.quick_experiment("002_b", names=("w1",), file="b.conf")
        rc, out, err = self.cli("run")
        self.assertEqual(rc, 0, out + err)
        self.assertEqual([h["experiment"] for h in self.history()], ["001_a"])
        self.assertNotIn("apply w1", self.order())
        self.assertIn("002_b: waits for a later pass (one trial a pass: 001_a ran in this one)", out)
        time.sleep(1.05)                                           # a new RUN_ID second
        rc, out, err = self.cli("run")
        self.assertEqual(rc, 0, out + err)
        self.assertEqual([h["experiment"] for h in self.history()], ["001_a", "002_b"], "001_a rests, 002_b's turn")
        self.assertIn("apply w1", self.order())
        rc, out, err = self.cli("run", "001_a", "002_b")
        self.assertEqual(rc, 0, out + err)
        self.assertEqual([h["experiment"] for h in self.history()][2:], ["001_a", "002_b"], "named: all of them run")


if __name__ == "__main__":
    unittest.main()
