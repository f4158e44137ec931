"""The measurement designs of `run` (issue 8): switchback blocks, guardrails, the sequential stop.

Every test runs `python3 smart.py --home TMP run EXP` as a subprocess (in its own process group,
killed in cleanup) against a smart.DemoTarget served from this process on 127.0.0.1 (a port from
the OS), with short settings from the environment.  The variants switch the target's mode by
writing its mode file, as the demo experiment does, and note every apply/revert in order.log.

  SwitchbackFiles       (a) block-labelled CSVs, `decide` on them agrees with the run, the order
                        seed and block order in run.log, the per-block strip in state.json
  Guardrails*           (b) a 50%-5xx and a 1 s-stall variant reverted within 10 s of the apply
                        with EXPERIMENT_SECONDS=120, under both designs
  EarlyStop*            (c) EARLY_STOP=yes keeps the cached variant before the horizon, =no runs
                        the full horizon, under both designs
  Robustness*           (d) SIGTERM, SIGKILL + recover and the lock, under both designs
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import socketserver
import subprocess
import sys
import tempfile
import time
import unittest
from datetime import datetime

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from helpers import SMART_PY, import_smart, spawn_smart

smart = import_smart()

MEASURE = {"rate": 50, "timeout": 2}
RUN_TIMEOUT = 60


def wait_for(predicate, timeout, step=0.02):
    ends = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= ends:
            return value
        time.sleep(step)


def log_time(line: str) -> float:
    """Epoch seconds of a run.log line (it starts with utc_now(): 2026-11-27T21:35:53Z)."""
    return datetime.fromisoformat(line.split()[0].replace("Z", "+00:00")).timestamp()


class DesignTestCase(unittest.TestCase):
    """A temporary home with a DemoTarget (mode file HOME/target/mode) and helpers to run smart.py."""

    def setUp(self):
        self.home = tempfile.mkdtemp(prefix="smart-design-test-")
        self.addCleanup(shutil.rmtree, self.home, True)
        self.target = self.start_target(self.home)

    # -- the target and the experiment --
    def start_target(self, home, cleanup=None):
        mode_path = os.path.join(home, "target", "mode")
        os.makedirs(os.path.dirname(mode_path), exist_ok=True)
        with open(mode_path, "w", encoding="utf-8") as handle:
            handle.write("plain\n")
        server = smart.DemoTarget(mode_path)

        def handle_error(request, client_address):
            # a prober that stops early hangs up on the stalled mode: not worth a traceback
            if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
                socketserver.BaseServer.handle_error(server, request, client_address)
        server.handle_error = handle_error
        server.start()

        def stop():
            server.shutdown()
            server.server_close()
        (cleanup or self.addCleanup)(stop)
        return server

    def experiment(self, variants, home=None, exp_id="001_design", url=None, **extra):
        """experiments/EXP_ID/meta.json; variants: (name, mode word or None for a marker-only apply)."""
        home = home or self.home
        folder = os.path.join(home, "experiments", exp_id)
        os.makedirs(folder, exist_ok=True)

        def apply(name, mode):
            change = f"echo {mode} > ../../target/mode && " if mode else ""
            return f"{change}echo {name} > ../../server.conf && echo 'apply {name}' >> ../../order.log"
        meta = {"id": exp_id, "description": "issue 8 design test",
                "variants": [{"name": "baseline", "apply": apply("baseline", "plain")}]
                + [{"name": name, "apply": apply(name, mode)} for name, mode in variants],
                "revert": "echo plain > ../../target/mode && echo baseline > ../../server.conf "
                          "&& echo revert >> ../../order.log",
                "target_url": url or self.target.url, "measure": dict(MEASURE)}
        meta.update(extra)
        with open(os.path.join(folder, "meta.json"), "w", encoding="utf-8") as handle:
            json.dump(meta, handle, indent=2)
        return exp_id

    # -- running smart.py --
    def env(self, **settings):
        env = {k: v for k, v in os.environ.items() if k not in smart.SETTINGS and k != "SMART_HOME"}
        env.pop("PYTHONWARNINGS", None)
        env.update(PHONE_HOME="never", COMMAND_TIMEOUT_SECONDS="5")
        env.update({key: str(value) for key, value in settings.items()})
        return env

    def spawn(self, *args, home=None, **settings):
        """`smart.py --home HOME ARGS` in its own process group; the group is killed in cleanup."""
        home = home or self.home
        out = tempfile.TemporaryFile("w+", encoding="utf-8")
        err = tempfile.TemporaryFile("w+", encoding="utf-8")
        proc = spawn_smart(self, home, args, self.env(**settings), out, err)
        proc.out, proc.err = out, err
        return proc

    def finish(self, proc, timeout=RUN_TIMEOUT):
        """Wait for a spawned smart.py; returns (exit code, stdout, stderr)."""
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
            self.fail(f"smart.py did not finish within {timeout} s")
        outputs = []
        for handle in (proc.out, proc.err):
            handle.seek(0)
            outputs.append(handle.read())
        return code, outputs[0], outputs[1]

    def run_smart(self, *args, home=None, timeout=RUN_TIMEOUT, **settings):
        started = time.monotonic()
        code, out, err = self.finish(self.spawn(*args, home=home, **settings), timeout)
        return code, out, err, time.monotonic() - started

    def cli(self, *args, home=None, **settings):
        done = subprocess.run([sys.executable, SMART_PY, "--home", home or self.home, *args],
                              env=self.env(**settings), capture_output=True, text=True, timeout=RUN_TIMEOUT,
                              stdin=subprocess.DEVNULL)
        return done.returncode, done.stdout, done.stderr

    # -- what a run left --
    def path(self, *parts, home=None):
        return os.path.join(home or self.home, *parts)

    def read(self, *parts, home=None, default=""):
        try:
            with open(self.path(*parts, home=home), encoding="utf-8") as handle:
                return handle.read()
        except FileNotFoundError:
            return default

    def state(self, home=None):
        return json.loads(self.read("var", "state.json", home=home))

    def variants(self, state):
        return {v["name"]: v for v in state["variants"]}

    def run_dir(self, home=None, state=None):
        state = state or self.state(home)
        return self.path("var", "runs", state["run_id"], home=home)

    def run_log(self, home=None):
        with open(os.path.join(self.run_dir(home), "run.log"), encoding="utf-8") as handle:
            return handle.read()

    def csv_lines(self, name, home=None):
        with smart.open_measurement_csv(os.path.join(self.run_dir(home), name)) as handle:
            return handle.read().splitlines()

    def mode(self, home=None):
        return self.read("target", "mode", home=home).strip()

    def applied(self, home=None):
        return self.read("server.conf", home=home).strip()

    def order(self, home=None):
        return self.read("order.log", home=home).splitlines()

    def journal(self, home=None):
        return self.path("var", "applied.json", home=home)

    def wait_phase(self, phase, timeout=15, home=None):
        def seen():
            try:
                return self.state(home).get("phase") == phase
            except (OSError, ValueError):
                return False
        self.assertTrue(wait_for(seen, timeout), f"state.json never reached phase {phase!r}")


###### (a) switchback files, decide on them, seed and order, the strip ######

class SwitchbackFiles(DesignTestCase):
    """One switchback run (setUpClass) whose files the tests read."""

    BLOCKS = 4

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.home = tempfile.mkdtemp(prefix="smart-design-test-")
        cls.addClassCleanup(shutil.rmtree, cls.home, True)
        cls.target = cls.start_target(cls, cls.home, cleanup=cls.addClassCleanup)
        exp = cls.experiment(cls, [("cached", "cached")])
        command = [sys.executable, SMART_PY, "--home", cls.home, "run", exp]
        env = cls.env(cls, DESIGN="switchback", BLOCKS=cls.BLOCKS, EARLY_STOP="no", BASELINE_SECONDS=1.6,
                      EXPERIMENT_SECONDS=1.6, WARMUP_SECONDS=0.2, COOLDOWN_SECONDS=0.3, LOOK_SECONDS=0.5)
        proc = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            out, err = proc.communicate(timeout=RUN_TIMEOUT)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
        cls.result = (proc.returncode, out, err)

    def setUp(self):
        code, out, err = self.result
        self.assertEqual(code, 0, out + err)
        self.assertNotIn("Traceback", err)

    def test_block_labelled_csvs_decide_alike_and_the_order_is_logged(self):
        state = self.state()
        self.assertEqual(state["design"], "switchback")
        record = self.variants(state)["cached"]
        run_dir = self.run_dir(state=state)

        # baseline.csv and cached.csv: a 4th column `block`, every row labelled, blocks 1..BLOCKS
        for name in ("baseline.csv", "cached.csv"):
            lines = self.csv_lines(name)
            self.assertEqual(lines[0].replace(" ", ""), "timestamp,latency_ms,response_code,block", name)
            fields = [line.split(",") for line in lines[1:] if line.strip()]
            self.assertTrue(fields, f"{name} has no rows")
            self.assertEqual({len(f) for f in fields}, {4}, f"{name}: a row without its block")
            self.assertEqual({int(f[3]) for f in fields}, set(range(1, self.BLOCKS + 1)), name)

        # `decide baseline.csv cached.csv --json` on those files: the run's decision
        code, out, err = self.cli("decide", os.path.join(run_dir, "baseline.csv"),
                                  os.path.join(run_dir, "cached.csv"), "--json")
        self.assertEqual(code, 0, err)
        by_hand = json.loads(out)
        self.assertEqual(by_hand["decision"], record["decision"])
        self.assertEqual(record["decision"], "keep", record["reason"])
        self.assertEqual(state["kept_variant"], "cached")
        self.assertEqual(by_hand["failed_rules"], record["verdict"]["failed_rules"])
        self.assertAlmostEqual(by_hand["improve_pct"], record["verdict"]["improve_pct"], delta=1.0)
        self.assertIn("van Elteren", by_hand["test"])
        self.assertEqual([b["block"] for b in by_hand["blocks"]], list(range(1, self.BLOCKS + 1)))
        self.assertIn("decide --look FRACTION", err)            # a run's look would judge at another alpha
        self.assertIsNone(record["verdict"]["fraction"])          # EARLY_STOP=no: the fixed alpha, as decide's
        self.assertEqual((by_hand["alpha"], by_hand["p_value"]), (record["verdict"]["alpha"], record["verdict"]["p_value"]))

        # run.log: the order seed, and the block order it draws (balanced_orders reproduces it)
        log = self.run_log()
        seed = re.search(r"order seed (\d+)", log)
        self.assertIsNotNone(seed, "run.log does not record the order seed")
        order = re.search(r"cached: block order ((?:VB|BV)(?: (?:VB|BV))*)", log)
        self.assertIsNotNone(order, "run.log does not record the block order of cached")
        logged = order.group(1).split()
        self.assertEqual(len(logged), self.BLOCKS)
        drawn = smart.balanced_orders(random.Random(int(seed.group(1))), self.BLOCKS)
        self.assertEqual(logged, ["VB" if first else "BV" for first in drawn])
        # ... and the CSVs' timestamps agree with it (decide tells which arm of each pair went first)
        self.assertEqual(["VB" if b["variant_first"] else "BV" for b in by_hand["blocks"]], logged)

        # state.json: the variant's strip of blocks, each block's p50 as in the CSVs
        strip = record.get("blocks")
        self.assertIsInstance(strip, list)
        self.assertEqual(len(strip), 2 * self.BLOCKS)
        for pair, first in enumerate(logged, 1):
            entries = [s for s in strip if s["index"] == pair]
            self.assertEqual([s["arm"] for s in entries],
                             ["variant", "baseline"] if first == "VB" else ["baseline", "variant"])
            block = next(b for b in by_hand["blocks"] if b["block"] == pair)
            for entry in entries:
                expected = block["var_p50_ms"] if entry["arm"] == "variant" else block["base_p50_ms"]
                self.assertAlmostEqual(entry["p50_ms"], expected, delta=0.002)
        self.assertFalse(os.path.exists(self.journal()))

    def test_every_csv_of_the_run_reads_back(self):
        # The warm-up CSVs are measurement CSVs in the run folder too: smart's own reader (and
        # `decide`) must accept them.
        run_dir = self.run_dir()
        names = sorted(n for n in os.listdir(run_dir) if n.endswith(".csv.gz"))    # compressed at the run's end
        self.assertEqual([n for n in os.listdir(run_dir) if n.endswith(".csv")], [])
        self.assertIn("baseline_warmup.csv.gz", names)
        for name in names:
            with self.subTest(csv=name):
                try:
                    smart.read_measurements(os.path.join(run_dir, name))
                except smart.BadInput as exc:
                    self.fail(f"{name} does not read back: {exc}")


###### (b) guardrails ######

class Guardrails:
    DESIGN = None

    def test_harmful_variants_are_reverted_within_10_s_whatever_the_horizon(self):
        exp = self.experiment([("half_failing", "failing"), ("stall_1s", "stalled")])
        code, out, err, took = self.run_smart("run", exp, DESIGN=self.DESIGN, BLOCKS=6, BASELINE_SECONDS=2,
                                              EXPERIMENT_SECONDS=120, WARMUP_SECONDS=0.3, COOLDOWN_SECONDS=0.3,
                                              LOOK_SECONDS=0.5)
        self.assertNotIn("Traceback", err)
        self.assertEqual(code, 0, out + err)
        self.assertLess(took, 40, "a harmful variant was measured far too long")
        state = self.state()
        self.assertEqual(state["status"], "done")
        self.assertIsNone(state["kept_variant"])
        self.assertEqual(self.mode(), "plain")
        self.assertEqual(self.applied(), "baseline")
        self.assertFalse(os.path.exists(self.journal()))
        records = self.variants(state)
        lines = self.run_log().splitlines()
        for name in ("half_failing", "stall_1s"):
            with self.subTest(variant=name):
                record = records[name]
                self.assertEqual(record["decision"], "revert")
                self.assertTrue(record["reason"].startswith("revert: guardrail"), record["reason"])
                applies = [i for i, line in enumerate(lines) if f"about to apply {name}:" in line]
                self.assertEqual(len(applies), 1, f"{name} applied more than once after a guardrail trip")
                revert = next((line for line in lines[applies[0]:] if re.search(rf"\brevert {name}: \$", line)),
                              None)
                self.assertIsNotNone(revert, f"run.log has no revert of {name}")
                held = log_time(revert) - log_time(lines[applies[0]])
                self.assertLessEqual(held, 10, f"{name} stayed applied {held:.0f} s")
                # the rows measured while it was applied: seconds' worth, not minutes'
                rows = sum(max(0, len(self.csv_lines(f)) - 1) for f in (f"{name}.csv", f"{name}_warmup.csv")
                           if os.path.exists(os.path.join(self.run_dir(state=state), f)))
                self.assertLess(rows, 10 * MEASURE["rate"])


class GuardrailsSequential(Guardrails, DesignTestCase):
    DESIGN = "sequential"


class GuardrailsSwitchback(Guardrails, DesignTestCase):
    DESIGN = "switchback"


###### (c) the sequential stop ######

class EarlyStop:
    DESIGN = None
    SETTINGS = {}

    def blocks_measured(self, home):
        return {line.split(",")[3] for line in self.csv_lines("cached.csv", home=home)[1:] if line.strip()}

    def test_cached_variant_kept_before_the_horizon_only_with_early_stop(self):
        # The two runs go side by side, each in its own home against its own target.
        other = tempfile.mkdtemp(prefix="smart-design-test-")
        self.addCleanup(shutil.rmtree, other, True)
        other_target = self.start_target(other)
        runs = {}
        for early, home, target in (("yes", self.home, self.target), ("no", other, other_target)):
            exp = self.experiment([("cached", "cached")], home=home, url=target.url)
            runs[early] = (home, time.monotonic(), self.spawn("run", exp, home=home, DESIGN=self.DESIGN,
                                                              EARLY_STOP=early, **self.SETTINGS))
        took = {}
        for early, (home, started, proc) in runs.items():
            code, out, err = self.finish(proc)
            took[early] = time.monotonic() - started
            self.assertEqual(code, 0, out + err)
            self.assertNotIn("Traceback", err)
            state = self.state(home)
            self.assertEqual(state["kept_variant"], "cached", out)
            record = self.variants(state)["cached"]
            if early == "yes":
                self.assertTrue(state.get("stopped_early"), "state.json does not say the run stopped early")
                self.assertTrue(record.get("stopped_early"), "the variant does not say it stopped early")
                self.assertIn("cached", state["stopped_early"])
                self.assertLess(record["verdict"]["fraction"], 1.0)
            else:
                self.assertFalse(state.get("stopped_early"))
                self.assertFalse(record.get("stopped_early"))
            self.check_horizon(early, home, state, record)
        self.assertLess(took["yes"], took["no"] - self.SAVES_AT_LEAST,
                        f"early stop took {took['yes']:.1f} s against {took['no']:.1f} s for the full horizon")


class EarlyStopSequential(EarlyStop, DesignTestCase):
    DESIGN = "sequential"
    HORIZON = 6.0
    SETTINGS = {"BASELINE_SECONDS": 1.5, "EXPERIMENT_SECONDS": HORIZON, "COOLDOWN_SECONDS": 0.3, "LOOK_SECONDS": 0.5}
    SAVES_AT_LEAST = 3.0

    def check_horizon(self, early, home, state, record):
        rows = len(self.csv_lines("cached.csv", home=home)) - 1
        full = self.HORIZON * MEASURE["rate"]
        if early == "yes":
            self.assertLess(rows, 0.5 * full, "the sequential stop measured more than half the horizon")
            self.assertLessEqual(record["verdict"]["fraction"], 0.5)
        else:
            self.assertGreater(rows, 0.9 * full, "EARLY_STOP=no ended before the horizon")


class EarlyStopSwitchback(EarlyStop, DesignTestCase):
    DESIGN = "switchback"
    BLOCKS = 6
    SETTINGS = {"BASELINE_SECONDS": 2.4, "EXPERIMENT_SECONDS": 2.4, "WARMUP_SECONDS": 0.2, "BLOCKS": BLOCKS,
                "LOOK_SECONDS": 0.5}
    SAVES_AT_LEAST = 1.0

    def check_horizon(self, early, home, state, record):
        blocks = self.blocks_measured(home)
        if early == "yes":
            self.assertLess(len(blocks), self.BLOCKS, "the sequential stop measured every block pair")
            self.assertLess(len(record["blocks"]), 2 * self.BLOCKS)
        else:
            self.assertEqual(len(blocks), self.BLOCKS)
            self.assertEqual(len(record["blocks"]), 2 * self.BLOCKS)


###### (d) SIGTERM, SIGKILL + recover, the lock ######

class Robustness:
    DESIGN = None

    def settings(self):
        return dict(DESIGN=self.DESIGN, BLOCKS=6, BASELINE_SECONDS=1.2, EXPERIMENT_SECONDS=30,
                    WARMUP_SECONDS=0.3, COOLDOWN_SECONDS=0.3, LOOK_SECONDS=0.5, EARLY_STOP="no")

    def start_v1(self):
        exp = self.experiment([("v1", None), ("v2", None)])
        proc = self.spawn("run", exp, **self.settings())
        self.wait_phase("measuring v1")
        time.sleep(0.3)
        self.assertEqual(self.applied(), "v1")
        return proc

    def test_sigkill_during_a_variant_then_recover_reverts_it(self):
        proc = self.start_v1()
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)
        self.assertEqual(self.applied(), "v1")
        journal = smart.read_json(self.journal())
        self.assertIsNotNone(journal, "no var/applied.json after SIGKILL with v1 applied")
        self.assertEqual(journal["variant"], "v1")
        killed = self.state()
        self.assertEqual(killed["status"], "running")

        code, out, err = self.cli("recover")
        self.assertEqual(code, 0, out + err)
        self.assertNotIn("Traceback", err)
        self.assertIn("recovering", out)
        self.assertEqual(self.applied(), "baseline")
        self.assertEqual(self.order(), ["apply baseline", "apply v1", "revert"])
        self.assertFalse(os.path.exists(self.journal()))
        state = self.state()
        self.assertEqual(state["run_id"], killed["run_id"])
        self.assertEqual(state["status"], "interrupted")
        self.assertIsNone(state["kept_variant"])

    def test_a_second_concurrent_run_exits_at_once_naming_the_holder_and_sigterm_then_reverts(self):
        first = self.start_v1()
        code, out, err = self.cli("run", **self.settings())
        self.assertNotEqual(code, 0)
        self.assertIsNone(first.poll(), "the second run waited for the first instead of exiting at once")
        self.assertNotIn("Traceback", err)
        self.assertEqual(len(err.strip().splitlines()), 1, err)
        self.assertIn(str(first.pid), err)
        self.assertIn("lock", err)
        code, out, err = self.cli("recover")           # nor may recover touch what a live run applied
        self.assertNotEqual(code, 0)
        self.assertIn(str(first.pid), err)
        self.assertEqual(self.applied(), "v1")
        self.assertEqual(len(os.listdir(self.path("var", "runs"))), 1)

        first.send_signal(signal.SIGTERM)
        code, out, err = self.finish(first, 10)        # v1's arm alone lasts 30 s: this is SIGTERM acted on
        self.assertEqual(code, 1, out + err)
        self.assertNotIn("Traceback", err)
        self.assertEqual(self.applied(), "baseline")
        self.assertEqual(self.order(), ["apply baseline", "apply v1", "revert"])
        self.assertFalse(os.path.exists(self.journal()))
        state = self.state()
        self.assertEqual(state["status"], "interrupted")
        self.assertEqual(state["design"], self.DESIGN)
        self.assertIsNone(state["kept_variant"])
        self.assertIn("SIGTERM", state["reason"])
        self.assertIn("v1 reverted", state["reason"])
        self.assertIn("SIGTERM", self.run_log())


class RobustnessSequential(Robustness, DesignTestCase):
    DESIGN = "sequential"


class RobustnessSwitchback(Robustness, DesignTestCase):
    DESIGN = "switchback"


if __name__ == "__main__":
    unittest.main()


class ClockSeams(unittest.TestCase):
    """Guard and Look pace themselves by the clock they are given (bench/design_quality.py runs a virtual one)."""

    def setUp(self):
        self.now = 100.0
        self.thresholds = smart.Thresholds(smart.load_settings(None, environ={}))

    def clock(self):
        return self.now

    def arm(self, latencies):
        arm = smart.Arm()
        for latency in latencies:
            arm.add(latency, 200)
        return arm

    def test_guard_checks_again_only_when_its_clock_has_moved_on(self):
        guard = smart.Guard(self.arm([10.0] * 50), self.thresholds, self.clock)
        self.assertFalse(guard.tripped())                 # the first check: nothing measured yet
        for _ in range(20):
            guard.add(0.0, 503)
        self.assertFalse(guard.tripped(), "checked again before GUARD_EVERY passed on its clock")
        self.now += smart.GUARD_EVERY
        self.assertTrue(guard.tripped())
        self.assertIn("20 of 20 requests failed", guard.reason)

    def test_look_decides_at_its_clocks_due_time_and_records_the_fraction(self):
        base = self.arm([20.0 + (i % 7) * 0.1 for i in range(300)])
        var = self.arm([2.0 + (i % 7) * 0.1 for i in range(300)])
        look = smart.Look(base, var, self.thresholds, horizon=100.0, every=10.0, clock=self.clock)
        self.assertFalse(look.due())
        self.now += 25.0
        self.assertTrue(look.due())
        self.assertEqual(look.result.decision, "keep")
        self.assertAlmostEqual(look.fraction, 0.25)
