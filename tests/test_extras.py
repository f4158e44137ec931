"""Issue 9: custom deciders, context.md and `status`, Prometheus textfile metrics, journald prefixes.

Each test has its own temporary home and its own smart.DemoTarget (a thread of this process on
127.0.0.1, its speed set by the word in HOME/target/mode, as in write_demo_experiment), and runs
`python3 smart.py --home HOME ...` as a subprocess with short settings: DESIGN=sequential,
BASELINE_SECONDS=1.5, EXPERIMENT_SECONDS=1.5, COOLDOWN_SECONDS=0, EARLY_STOP=no,
COMMAND_TIMEOUT_SECONDS=2, and meta.json "measure": {"rate": 40, "timeout": 2} (60 requests an arm).

The custom decider tests' runs share nothing and go at once (SideBySideCase: each test's home is
prepared, and its run started, in setUpClass; the test reads what its run left).

The demo modes give verdicts that do not depend on luck: slow_backend (45 ms against 20 ms) is
always reverted by the built-in rules, response_cache (no wait) always kept.

promtool (Debian's `prometheus` package) is needed for one test: without it that test skips,
except under CI=true where it fails.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from helpers import SMART_PY, clean_env, import_smart  # noqa: E402

smart = import_smart()

EXPERIMENT = "001_extras"
SHORT = {
    "DESIGN": "sequential", "BASELINE_SECONDS": "1.5", "EXPERIMENT_SECONDS": "1.5", "COOLDOWN_SECONDS": "0",
    "EARLY_STOP": "no", "COMMAND_TIMEOUT_SECONDS": "2",
}
MODE = "../../target/mode"          # the mode file, from the experiment folder
VARIANTS = {
    "slow_backend": f"echo slow > {MODE}",
    "response_cache": f"echo cached > {MODE}",
    "noop": "true",
}
PRIORITY = re.compile(r"^<([0-7])>")


def need(tool):
    path = shutil.which(tool)
    if path is None:
        message = f"{tool} is not installed"
        if os.environ.get("CI") == "true":
            raise AssertionError(f"{message} and CI=true: this test cannot be skipped")
        raise unittest.SkipTest(message)
    return path


def write_script(path, body):
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("#!/bin/sh\n" + body)
    os.chmod(path, 0o755)


class Lab:
    """A temporary home with a running DemoTarget, and what the tests do with it; close() stops all."""

    def __init__(self):
        self.home = tempfile.mkdtemp(prefix="smart-extras-")
        self.target = None
        try:
            os.makedirs(os.path.join(self.home, "target"))
            self.mode_path = os.path.join(self.home, "target", "mode")
            self.set_mode("plain")
            self.target = smart.DemoTarget(self.mode_path).start()
            self.folder = os.path.join(self.home, "experiments", EXPERIMENT)
            os.makedirs(self.folder)
            self.var = os.path.join(self.home, "var")
        except BaseException:
            self.close()
            raise

    def close(self):
        if self.target is not None:
            self.target.shutdown()
            self.target.server_close()
            self.target = None
        shutil.rmtree(self.home, ignore_errors=True)

    def set_mode(self, word):
        with open(self.mode_path, "w", encoding="utf-8") as handle:
            handle.write(word + "\n")

    def mode(self):
        with open(self.mode_path, encoding="utf-8") as handle:
            return handle.read().strip()

    def experiment(self, variants=("slow_backend",), revert=f"echo plain > {MODE}", **extra):
        meta = {
            "id": EXPERIMENT, "description": "issue 9 extras",
            "variants": [{"name": "baseline", "apply": f"echo plain > {MODE}"}]
                        + [{"name": name, "apply": VARIANTS[name]} for name in variants],
            "revert": revert, "target_url": self.target.url, "measure": {"rate": 40, "timeout": 2},
        }
        meta.update(extra)
        with open(os.path.join(self.folder, "meta.json"), "w", encoding="utf-8") as handle:
            json.dump(meta, handle, indent=2)
        return meta

    @staticmethod
    def env(extra=None):
        env = clean_env()
        for key in list(smart.SETTINGS) + ["JOURNAL_STREAM", "SMART_HOME"]:
            env.pop(key, None)
        env.update(SHORT)
        env.update(extra or {})
        return env

    def smart(self, *args, env=None, timeout=60, **kwargs):
        """Run smart.py --home HOME ARGS; a CompletedProcess (text) unless stdout/stderr are given."""
        if "stdout" not in kwargs:
            kwargs.update(capture_output=True)
        return subprocess.run([sys.executable, SMART_PY, "--home", self.home, *args], env=self.env(env),
                              text=True, timeout=timeout, stdin=subprocess.DEVNULL, **kwargs)

    def run(self, *args, expect=0, env=None):
        result = self.smart("run", *args, env=env)
        if result.returncode != expect:
            raise AssertionError(f"run exited {result.returncode}, not {expect}\n{result.stdout}\n{result.stderr}")
        return result

    def state(self):
        with open(os.path.join(self.var, "state.json"), encoding="utf-8") as handle:
            return json.load(handle)

    def read_var(self, name):
        with open(os.path.join(self.var, name), encoding="utf-8") as handle:
            return handle.read()

    def status_json(self, expect, *args):
        result = self.smart("status", "--json", *args)
        if result.returncode != expect:
            raise AssertionError(f"status exited {result.returncode}, not {expect}\n{result.stdout}\n{result.stderr}")
        return json.loads(result.stdout)


class HomeCase(unittest.TestCase):
    """A Lab of its own for each test."""

    def setUp(self):
        self.lab = Lab()
        self.addCleanup(self.lab.close)


class SharedHomeCase(unittest.TestCase):
    """One Lab for the whole class, prepared once by prepare() (the tests must only read it)."""

    @classmethod
    def setUpClass(cls):
        cls.lab = Lab()
        try:
            cls.prepare()
        except BaseException:
            cls.lab.close()
            raise

    @classmethod
    def tearDownClass(cls):
        cls.lab.close()

    @classmethod
    def prepare(cls):
        pass


def alive(pid):
    """Whether pid runs (a zombie no init has reaped yet does not count)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


# ------------------------------------------------------------------ custom decider --

def run_first(prepare, env=None):
    """Mark a test of a SideBySideCase: prepare(lab) writes its experiment, its run has `env`."""
    def mark(test):
        test.prepare, test.run_env = prepare, env
        return test
    return mark


class SideBySideCase(unittest.TestCase):
    """Each test (marked with run_first) has a Lab of its own, prepared in setUpClass; the runs share
    nothing, so they go at once, each in a thread; a test reads what its run left (ran())."""

    @classmethod
    def setUpClass(cls):
        marked = {name: getattr(cls, name) for name in unittest.TestLoader().getTestCaseNames(cls)}
        cls.labs = {}
        for name, test in marked.items():
            lab = cls.labs[name] = Lab()
            cls.addClassCleanup(lab.close)
            test.prepare(lab)

        def timed(lab, env):
            started = time.monotonic()
            return lab.run(env=env), time.monotonic() - started
        pool = concurrent.futures.ThreadPoolExecutor(len(marked))
        cls.addClassCleanup(pool.shutdown)
        cls.runs = {name: pool.submit(timed, cls.labs[name], test.run_env) for name, test in marked.items()}

    def setUp(self):
        self.lab = self.labs[self._testMethodName]

    def ran(self):
        """(the CompletedProcess of this test's run, how many seconds it took)."""
        return self.runs[self._testMethodName].result()


def judged_by(body, variant="response_cache", **extra):
    """A run_first prepare: the experiment tries `variant`, and ./judge.sh (its "decide") runs `body`."""
    def prepare(lab):
        lab.experiment([variant], decide="./judge.sh", **extra)
        write_script(os.path.join(lab.folder, "judge.sh"), body)
    return prepare


def decide_sh_that_keeps(lab):
    lab.experiment(["slow_backend"])
    write_script(os.path.join(lab.folder, "decide.sh"),
                 'for arg in "$@"; do echo "$arg"; done > decider_args.txt\n'
                 'echo "figures on stdout first"\necho keep\n')


class CustomDeciderTest(SideBySideCase):
    """meta "decide" or decide.sh: called with the two CSV paths; only `keep` or `revert` count."""

    def decided_variant(self, name):
        state = self.lab.state()
        self.assertEqual(state["status"], "done", state.get("reason"))
        record = next(v for v in state["variants"] if v["name"] == name)
        self.assertIsNotNone(record.get("decider"), f"no decider record in {record}")
        return state, record

    def assert_reverted(self, record, builtin):
        state = self.lab.state()
        self.assertEqual(record["decision"], "revert", record["reason"])
        self.assertEqual(record["decider"]["decision"], "revert")
        self.assertEqual(record["decider"]["builtin_decision"], builtin)
        self.assertTrue(record["decider"]["builtin_reason"].startswith(builtin), record["decider"])
        self.assertIn(f"built-in verdict: {builtin}", record["reason"])
        self.assertIsNone(state["kept_variant"])
        self.assertEqual(self.lab.mode(), "plain", "the variant was not reverted")
        self.assertFalse(os.path.exists(os.path.join(self.lab.var, "applied.json")))

    @run_first(decide_sh_that_keeps)
    def test_decide_sh_keeps_where_the_builtin_verdict_reverts_and_gets_both_csvs(self):
        self.ran()
        state, record = self.decided_variant("slow_backend")
        self.assertEqual(record["decision"], "keep", record["reason"])
        self.assertEqual(state["kept_variant"], "slow_backend")
        self.assertEqual(record["decider"]["command"], "./decide.sh")
        self.assertEqual(record["decider"]["decision"], "keep")
        self.assertEqual(record["decider"]["builtin_decision"], "revert")
        self.assertTrue(record["decider"]["builtin_reason"].startswith("revert:"), record["decider"])
        self.assertIn("custom decider", record["reason"])
        self.assertEqual(record["verdict"]["decision"], "revert", "the built-in verdict is still recorded")
        self.assertEqual(self.lab.mode(), "slow", "a kept variant stays applied")
        # Called in the experiment folder with BASELINE.csv and VARIANT.csv of this run.
        with open(os.path.join(self.lab.folder, "decider_args.txt"), encoding="utf-8") as handle:
            args = handle.read().splitlines()
        run_dir = os.path.join(self.lab.var, "runs", state["run_id"])
        self.assertEqual(args, [os.path.join(run_dir, "baseline.csv"), os.path.join(run_dir, "slow_backend.csv")])
        for path in args:
            self.assertGreaterEqual(smart.read_measurements(path).ok, 30, path)

    @run_first(judged_by("echo 'maybe later'\n"))
    def test_garbage_reverts_with_a_reason_naming_it(self):
        # The built-in verdict keeps response_cache; the decider's garbage still reverts it.
        self.ran()
        _, record = self.decided_variant("response_cache")
        self.assert_reverted(record, builtin="keep")
        self.assertIn("maybe later", record["reason"])
        self.assertEqual(record["decider"]["command"], "./judge.sh")

    @run_first(judged_by("echo keep\nexit 1\n"))
    def test_a_nonzero_exit_reverts_even_after_keep(self):
        self.ran()
        _, record = self.decided_variant("response_cache")
        self.assert_reverted(record, builtin="keep")
        self.assertIn("exited 1", record["reason"])

    @run_first(judged_by("echo $$ > judge.pid\nexec sleep 30\n"))
    def test_a_hanging_decider_is_killed_at_its_time_box_and_reverts(self):
        _, took = self.ran()
        self.assertLess(took, 20, "the decider was not stopped at COMMAND_TIMEOUT_SECONDS=2")
        _, record = self.decided_variant("response_cache")
        self.assert_reverted(record, builtin="keep")
        self.assertIn("time box", record["reason"])
        with open(os.path.join(self.lab.folder, "judge.pid"), encoding="utf-8") as handle:
            pid = int(handle.read())
        if alive(pid):
            os.kill(pid, signal.SIGKILL)
            self.fail(f"the hung decider (pid {pid}) is still running")

    @run_first(judged_by("echo keep\necho 'note: judged by hand' >&2\n", variant="slow_backend"))
    def test_a_decider_logging_on_stderr_after_its_verdict_is_still_heard(self):
        # Like `smart.py decide`: the verdict on stdout, notes on stderr (here after the verdict).
        self.ran()
        _, record = self.decided_variant("slow_backend")
        self.assertEqual(record["decision"], "keep",
                         "a line on stderr was read as the verdict (stdout and stderr are merged): "
                         + record["reason"])

    @run_first(judged_by('head -n 2 "$1" > base_head.txt\nhead -n 2 "$2" > var_head.txt\necho revert\n',
                         variant="slow_backend", design="switchback", blocks=2), env={"WARMUP_SECONDS": "0.2"})
    def test_switchback_passes_block_labelled_csvs(self):
        self.ran()
        state, record = self.decided_variant("slow_backend")
        self.assertEqual(state["design"], "switchback")
        self.assertEqual(record["decision"], "revert")
        for name in ("base_head.txt", "var_head.txt"):
            with open(os.path.join(self.lab.folder, name), encoding="utf-8") as handle:
                header, row = handle.read().splitlines()
            self.assertEqual(header, "timestamp,latency_ms,response_code,block", name)
            self.assertRegex(row, r",[0-9]+$", name)


# ------------------------------------------------------------------ status, context.md, metrics --

METRIC_NAMES = (
    "smart_last_run_timestamp_seconds", "smart_last_run_status", "smart_variant_latency_seconds",
    "smart_variant_error_ratio", "smart_kept_variant_info", "smart_kept_variant_applied_timestamp_seconds",
    "smart_runs_total", "smart_decisions_total",
)
THREE = ["noop", "slow_backend", "response_cache"]


def samples(prom_text):
    """{(name, frozenset of label pairs): value} of a textfile."""
    found = {}
    for line in prom_text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = re.match(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$', line)
        assert match, f"not a sample line: {line!r}"
        labels = frozenset(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"', match.group(2) or ""))
        found[(match.group(1), labels)] = float(match.group(3))
    return found


def section(text, title, until="##"):
    """The body of a context.md / status section."""
    return text.split(title, 1)[1].split(until, 1)[0]


class StatusAfterRunTest(SharedHomeCase):
    """One real run of three variants (noop and slow_backend reverted, response_cache kept); read only."""

    @classmethod
    def prepare(cls):
        cls.lab.experiment(THREE)
        cls.lab.run()
        cls.run_id = cls.lab.state()["run_id"]

    def test_context_md(self):
        self.assertEqual(self.lab.state()["kept_variant"], "response_cache")
        context = self.lab.read_var("context.md")
        self.assertTrue(context.startswith("# "), context)
        for title in ("## Applied now", "## Last verdicts", "## Next run", "## Needs attention"):
            self.assertIn(title, context)
        applied = section(context, "## Applied now")
        self.assertIn(f"{EXPERIMENT}: response_cache", applied)
        self.assertIn(self.run_id, applied)
        verdicts = section(context, "## Last verdicts")
        self.assertIn(f"{EXPERIMENT}: run {self.run_id} done, kept response_cache", verdicts)
        history = json.loads(self.lab.read_var("history.jsonl").splitlines()[-1])
        self.assertEqual([v["name"] for v in history["variants"]], THREE)
        for variant in history["variants"]:
            metrics = variant["metrics"]
            line = next(l for l in verdicts.splitlines() if f" {variant['name']}: " in l)
            self.assertIn(f"p50 {metrics['base_p50_ms']} -> {metrics['var_p50_ms']} ms", line)
            self.assertIn(f"; {variant['decision']}: ", line)
        self.assertEqual(section(context, "## Needs attention").strip(), "- nothing")

    def test_status_text_and_json(self):
        text = self.lab.smart("status")
        self.assertEqual(text.returncode, 0, text.stdout + text.stderr)
        self.assertEqual(text.stderr, "")
        self.assertIn(f"{EXPERIMENT}: response_cache (kept in run {self.run_id}", text.stdout)
        self.assertIn("p50 ", text.stdout)
        self.assertRegex(text.stdout, rf"\n  {self.run_id} +{EXPERIMENT} +done +response_cache +[0-9.]+ +[0-9.]+\n")

        status = self.lab.status_json(0)
        self.assertEqual(status["attention"], [])
        self.assertEqual(status["status"], "done")
        self.assertFalse(status["running"])
        self.assertEqual(status["applied"][EXPERIMENT]["variant"], "response_cache")
        self.assertTrue(status["applied"][EXPERIMENT]["kept"])
        last = status["last"][EXPERIMENT]
        self.assertEqual((last["run_id"], last["kept_variant"]), (self.run_id, "response_cache"))
        self.assertEqual([v["name"] for v in last["variants"]], THREE)
        self.assertEqual([v["decision"] for v in last["variants"]], ["revert", "revert", "keep"])
        self.assertEqual([run["run_id"] for run in status["runs"]], [self.run_id])

    def test_status_runs_zero_lists_no_run(self):
        self.assertEqual(self.lab.status_json(0, "--runs", "0")["runs"], [],
                         "status --runs 0 lists every run (history[-0:] is the whole history)")

    def test_promtool_accepts_smart_prom(self):
        promtool = need("promtool")
        path = os.path.join(self.lab.var, "smart.prom")
        with open(path, "rb") as handle:
            checked = subprocess.run([promtool, "check", "metrics"], stdin=handle, capture_output=True,
                                     text=True, timeout=30)
        self.assertEqual(checked.returncode, 0, f"promtool check metrics:\n{checked.stdout}{checked.stderr}")

    def test_smart_prom_content(self):
        path = os.path.join(self.lab.var, "smart.prom")
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode) & 0o004, 0o004, "node_exporter could not read it")
        self.assertEqual([name for name in os.listdir(self.lab.var) if name.endswith(".tmp")], [])
        text = self.lab.read_var("smart.prom")
        self.assertTrue(text.endswith("\n"))
        for name in METRIC_NAMES:
            self.assertEqual(text.count(f"# TYPE {name} "), 1, name)
        found = samples(text)
        self.assertIn(f'smart_kept_variant_info{{experiment="{EXPERIMENT}",variant="response_cache"}} 1\n', text)
        self.assertEqual([key for key in found if key[0] == "smart_kept_variant_info"],
                         [("smart_kept_variant_info", frozenset({("experiment", EXPERIMENT),
                                                                 ("variant", "response_cache")}))])
        self.assertEqual(found[("smart_runs_total", frozenset({("status", "done")}))], 1)
        self.assertEqual(found[("smart_decisions_total", frozenset({("decision", "keep")}))], 1)
        self.assertEqual(found[("smart_decisions_total", frozenset({("decision", "revert")}))], 2)
        self.assertEqual(found[("smart_last_run_status",
                                frozenset({("experiment", EXPERIMENT), ("status", "done")}))], 1)
        finished = found[("smart_last_run_timestamp_seconds", frozenset({("experiment", EXPERIMENT)}))]
        self.assertAlmostEqual(finished, smart._epoch(self.lab.state()["finished_at"]), delta=1)
        for variant in THREE:
            for arm in ("baseline", "variant"):
                labels = {("experiment", EXPERIMENT), ("variant", variant), ("arm", arm)}
                self.assertEqual(found[("smart_variant_error_ratio", frozenset(labels))], 0)
                for pct in ("p50", "p90", "p99"):
                    value = found[("smart_variant_latency_seconds", frozenset(labels | {("percentile", pct)}))]
                    self.assertTrue(0 < value < 1, f"{variant} {arm} {pct}: {value} (seconds expected)")
        slow = ("smart_variant_latency_seconds", frozenset({("experiment", EXPERIMENT), ("variant", "slow_backend"),
                                                            ("arm", "variant"), ("percentile", "p50")}))
        self.assertGreater(found[slow], 0.040)


class AfterKeepTest(HomeCase):
    """What happens to the published files after the keep: a later timer run, then `revert`."""

    def test_a_later_timer_run_then_revert(self):
        self.lab.experiment(["response_cache"])
        self.lab.run()
        time.sleep(2.5)
        again = self.lab.run()          # the timer's run: the settled experiment rests
        self.assertIn("settled", again.stdout)
        with self.subTest("time applied after a later timer run"):
            found = samples(self.lab.read_var("smart.prom"))
            kept_at = smart._epoch(json.loads(self.lab.read_var("kept.json"))[EXPERIMENT]["kept_at"])
            labels = frozenset({("experiment", EXPERIMENT), ("variant", "response_cache")})
            stamps = [value for (name, l), value in found.items() if name.endswith("_timestamp_seconds") and l == labels]
            applied = found.get(("smart_variant_applied_seconds", labels))
            self.assertTrue(any(abs(value - kept_at) < 1 for value in stamps) or (applied is not None and applied >= 2),
                            f"smart_variant_applied_seconds is {applied} 2.5 s after the keep and no "
                            "*_timestamp_seconds sample gives kept_at: the value is frozen when smart.prom is "
                            "written, and a resting experiment never rewrites it")
        result = self.lab.smart("revert", EXPERIMENT)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertEqual(self.lab.mode(), "plain")
        self.assertEqual(self.lab.status_json(0)["applied"], {})
        with self.subTest("context.md after revert"):
            applied = section(self.lab.read_var("context.md"), "## Applied now")
            self.assertNotIn("response_cache", applied, "context.md still shows the reverted variant as applied")
        with self.subTest("smart.prom after revert"):
            self.assertNotIn("smart_kept_variant_info{", self.lab.read_var("smart.prom"),
                             "smart.prom still reports the reverted variant as kept")


def failed_revert_run(lab):
    """A run whose revert.sh exits 1: it fails and leaves slow_backend applied; returns its run id."""
    write_script(os.path.join(lab.folder, "revert.sh"), "echo 'cannot revert' >&2\nexit 1\n")
    lab.experiment(["slow_backend"], revert="./revert.sh")
    result = lab.run(expect=1)
    state = lab.state()
    if "revert" not in result.stderr or state["status"] != "failed" or lab.mode() != "slow":
        raise AssertionError(f"expected a failed revert with slow_backend left applied: mode {lab.mode()}, "
                             f"state {state.get('status')}: {state.get('reason')}\n{result.stderr}")
    return state["run_id"]


class StatusAfterFailedRevertTest(SharedHomeCase):
    """revert.sh exits 1: the run fails, the variant stays applied, status says what to do; read only."""

    @classmethod
    def prepare(cls):
        cls.run_id = failed_revert_run(cls.lab)

    def test_status_needs_attention(self):
        text = self.lab.smart("status")
        self.assertEqual(text.returncode, 1, text.stdout + text.stderr)
        attention = section(text.stdout, "Needs attention", "Recent runs")
        self.assertIn(f"{EXPERIMENT}/slow_backend", attention)
        self.assertIn("smart.py recover", attention)
        self.assertIn(f"run {self.run_id} failed", attention)
        self.assertIn("revert of slow_backend exited 1", attention)

        status = self.lab.status_json(1)
        self.assertEqual(status["status"], "failed")
        applied = status["applied"][EXPERIMENT]
        self.assertEqual((applied["variant"], applied["run_id"], applied["kept"]), ("slow_backend", self.run_id, False))
        joined = "\n".join(status["attention"])
        self.assertIn("smart.py recover", joined)
        self.assertIn("revert of slow_backend exited 1", joined)

        prom = samples(self.lab.read_var("smart.prom"))
        self.assertEqual(prom[("smart_last_run_status", frozenset({("experiment", EXPERIMENT), ("status", "failed")}))], 1)
        self.assertEqual(prom[("smart_runs_total", frozenset({("status", "failed")}))], 1)

    def test_context_md_lists_it_under_needs_attention(self):
        context = self.lab.read_var("context.md")
        self.assertIn("slow_backend (under test, not kept)", section(context, "## Applied now"))
        needs = section(context, "## Needs attention")
        self.assertNotIn("- nothing", needs)
        self.assertIn(f"run {self.run_id} failed", needs)
        self.assertIn("revert of slow_backend exited 1", needs)
        self.assertIn(f"{EXPERIMENT}/slow_backend", needs,
                      "context.md, written by the run while it holds the lock, leaves out the 'left applied: "
                      "run smart.py recover' item that status shows")
        self.assertIn("recover", needs)



class RecoverTest(HomeCase):
    """After a failed revert the operator fixes revert.sh and runs `recover`."""

    def test_after_recover_nothing_needs_attention(self):
        failed_revert_run(self.lab)
        write_script(os.path.join(self.lab.folder, "revert.sh"), f"echo plain > {MODE}\n")
        result = self.lab.smart("recover")
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertEqual(self.lab.mode(), "plain")
        text = self.lab.smart("status")
        self.assertNotIn("left applied", text.stdout)
        with self.subTest("context.md after recover"):
            self.assertNotIn("slow_backend (under test", self.lab.read_var("context.md"),
                             "context.md is not rewritten by recover")
        with self.subTest("status exit after recover"):
            self.assertEqual(text.returncode, 0, "status still needs attention after a successful recover:\n"
                             + section(text.stdout, "Needs attention", "Recent runs"))


# ------------------------------------------------------------------ journald --

class JournalTest(HomeCase):
    """JOURNAL_STREAM naming the output's device:inode -> <N> prefixes; otherwise plain lines."""

    def setUp(self):
        super().setUp()
        with open(os.path.join(self.lab.home, "smart.conf"), "w", encoding="utf-8") as handle:
            handle.write("NO_SUCH_SETTING=1\n")          # a warning on every command

    def run_to_file(self, *args, journal=True, stream=None):
        """Run with stdout and stderr on one file, as systemd does with the journal's stream."""
        path = os.path.join(self.lab.home, f"out-{time.monotonic_ns()}.log")
        with open(path, "w", encoding="utf-8") as handle:
            info = os.fstat(handle.fileno())
            env = {}
            if journal:
                env["JOURNAL_STREAM"] = stream or f"{info.st_dev}:{info.st_ino}"
            done = self.lab.smart(*args, env=env, stdout=handle, stderr=handle)
        with open(path, encoding="utf-8") as handle:
            return done.returncode, [line for line in handle.read().splitlines() if line]

    def by_level(self, lines):
        levels = {}
        for line in lines:
            match = PRIORITY.match(line)
            self.assertIsNotNone(match, f"no priority prefix: {line!r}")
            levels.setdefault(int(match.group(1)), []).append(line)
        return levels

    def test_a_run_prefixes_every_line(self):
        write_script(os.path.join(self.lab.folder, "revert.sh"), "exit 1\n")
        self.lab.experiment(["slow_backend"], revert="./revert.sh")
        code, lines = self.run_to_file("run")
        self.assertEqual(code, 1)
        levels = self.by_level(lines)
        self.assertEqual(set(levels), {3, 4, 6}, lines)
        self.assertEqual(len(levels[4]), 1, levels[4])
        self.assertTrue(levels[4][0].startswith("<4>warning: ") and "NO_SUCH_SETTING" in levels[4][0], levels[4])
        self.assertTrue(any(line.startswith("<3>error: run ") and "revert of slow_backend" in line
                            for line in levels[3]), levels[3])
        self.assertTrue(any("measuring baseline" in line for line in levels[6]), levels[6])
        self.assertTrue(any("slow_backend: revert:" in line for line in levels[6]), levels[6])

    def test_status_warning_and_a_bad_command_error(self):
        self.lab.experiment(["slow_backend"])
        code, lines = self.run_to_file("status")
        self.assertEqual(code, 0, lines)
        warnings = [line for line in lines if "NO_SUCH_SETTING" in line]
        self.assertEqual(len(warnings), 1, lines)
        self.assertTrue(warnings[0].startswith("<4>warning: "), warnings[0])
        self.assertFalse([line for line in lines if line.startswith(("<3>", "<4>")) and line not in warnings], lines)
        self.lab.experiment(["slow_backend"])
        code, lines = self.run_to_file("run", "no_such_experiment")
        self.assertEqual(code, 2)
        levels = self.by_level(lines)
        self.assertEqual(len(levels.get(3, [])), 1, lines)
        self.assertTrue(levels[3][0].startswith("<3>error: ") and "no_such_experiment" in levels[3][0], levels[3])

    def test_no_prefix_without_a_matching_journal_stream(self):
        self.lab.experiment(["slow_backend"])
        other = os.stat(self.lab.mode_path)
        for kwargs in ({"journal": False}, {"stream": f"{other.st_dev}:{other.st_ino}"}, {"stream": "garbage"}):
            with self.subTest(**kwargs):
                code, lines = self.run_to_file("run", "no_such_experiment", **kwargs)
                self.assertEqual(code, 2)
                self.assertEqual([line for line in lines if PRIORITY.match(line)], [])
                self.assertTrue(any(line.startswith("warning: ") and "NO_SUCH_SETTING" in line for line in lines), lines)
                self.assertTrue(any(line.startswith("error: ") and "no_such_experiment" in line for line in lines), lines)


if __name__ == "__main__":
    unittest.main()
