"""The fleet rollout (issue 10): deploy/ansible/*.yml run by a real ansible-playbook against a 4-host
inventory on this one machine, and www/fleet.html in headless Chromium.

Each host is `ansible_connection=local` with its own temporary prefix (in the rollout case
install.yml runs deploy/install.sh --prefix there; the other cases copy smart.py in), its own home
and its own smart.DemoTarget on 127.0.0.1 (a port the OS picks), started in this process; every
host's experiment 050_fleet_cache switches its target's mode file between plain (20 ms a page) and
cached (~0 ms). web1 is the canary; web2, web3, web4 are the waves (serial 1, 25%, 100% of three
hosts: one host each). Settings are short and come through the inventory (smart_environment):
sequential design, VERIFY_SECONDS 1.5, WARMUP_SECONDS 0.3.

ansible-core (and ansible-lint) come from PyPI: a test dependency only (.ci/run installs them).
Without ansible-playbook the tests skip, except under CI=true where they fail; likewise Chromium for
the page tests. ansible-lint is optional: its test skips without it, CI or not. The unreachable-host
test needs an ssh client (it skips without one). Every server and process stops in cleanup.

Cases: the canary keeps `cached` and the rollout reaches all 4 (then a re-run changes nothing), with
the coach token in smart_settings: it is in smart.conf and nowhere else (the first install.yml and
experiment.yml run at -vvv while every process is watched); in smart_environment it is refused; web3
turns `failing` on apply, reverts, and wave 3 never starts; a canary that keeps nothing, one whose
revert fails, one without smart.py (three 2-host fleets side by side); a host busy with a timer run
(lock held) waited for; an unreachable host; --syntax-check and ansible-lint; fleet.html in Chromium.
The stopped rollout, the canary outcomes, the busy host and the unreachable host have fleets of their
own and run their playbooks at once (SideBySide); the rollout runs alone.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import fcntl
import http.server
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from helpers import REPO_ROOT, clean_env, import_smart  # noqa: E402

smart = import_smart()

ANSIBLE_DIR = os.path.join(REPO_ROOT, "deploy", "ansible")
PLAYBOOKS = ("install.yml", "experiment.yml", "fleet-status.yml")
FLEET_HTML = os.path.join(REPO_ROOT, "www", "fleet.html")
EXPERIMENT = "050_fleet_cache"
VARIANT = "response_cache"
HOSTS = ("web1", "web2", "web3", "web4")          # web1 is the canary
PLAYBOOK_TIMEOUT = 240
CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
HOSTILE = '<img src=x onerror="document.body.dataset.pwned=1"><script>document.body.dataset.pwned=2</script>'

# Short settings for every host, through the inventory (the playbooks pass them as environment).
SETTINGS = {
    "DESIGN": "sequential", "BASELINE_SECONDS": "2", "EXPERIMENT_SECONDS": "3", "COOLDOWN_SECONDS": "0.3",
    "LOOK_SECONDS": "0.5", "VERIFY_SECONDS": "1.5", "WARMUP_SECONDS": "0.3", "COMMAND_TIMEOUT_SECONDS": "10",
    "PHONE_HOME": "never",
}
RECAP = re.compile(r"^(\S+)\s*:\s*ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)"
                   r"\s+skipped=(\d+)\s+rescued=(\d+)\s+ignored=(\d+)", re.M)


def need(tool: str) -> str:
    """The tool's path; skip without it (fail under CI=true)."""
    path = shutil.which(tool) or (os.path.join(os.path.dirname(sys.executable), tool)
                                  if os.access(os.path.join(os.path.dirname(sys.executable), tool), os.X_OK) else None)
    if not path:
        message = f"{tool} is not installed (python3 -m pip install ansible-core ansible-lint)"
        if os.environ.get("CI") == "true":
            raise AssertionError(f"{message} and CI=true: this test cannot be skipped")
        raise unittest.SkipTest(message)
    return path


def ansible_env(work: str) -> dict:
    """The environment of ansible-playbook: no smart setting of the caller, an empty ansible.cfg, temp dirs."""
    config = os.path.join(work, "ansible.cfg")
    if not os.path.exists(config):
        with open(config, "w", encoding="utf-8") as handle:
            handle.write("[defaults]\nretry_files_enabled = False\nforks = 8\n")
    return clean_env({
        "ANSIBLE_CONFIG": config, "ANSIBLE_HOME": os.path.join(work, "ansible-home"),
        "ANSIBLE_LOCAL_TEMP": os.path.join(work, "ansible-tmp"),
        "ANSIBLE_REMOTE_TEMP": os.path.join(work, "ansible-remote-tmp"),
        "ANSIBLE_NOCOLOR": "1", "ANSIBLE_FORCE_COLOR": "0", "ANSIBLE_STDOUT_CALLBACK": "default",
        "ANSIBLE_LOCALHOST_WARNING": "0", "ANSIBLE_INVENTORY_UNPARSED_WARNING": "0",
        "LC_ALL": os.environ.get("LC_ALL") or "C.UTF-8",
    })


def recap(output: str) -> dict:
    """PLAY RECAP of an ansible-playbook output: host -> {ok, changed, unreachable, failed, skipped, rescued}."""
    keys = ("ok", "changed", "unreachable", "failed", "skipped", "rescued", "ignored")
    return {m.group(1): dict(zip(keys, map(int, m.groups()[1:]))) for m in RECAP.finditer(output)}


def read_text(path: str, default=None):
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except FileNotFoundError:
        return default


class Fleet:
    """Four hosts on this machine: prefixes, homes, DemoTargets, an inventory; torn down by the cleanups
    that `cleanup` registers (a class's addClassCleanup, or unittest.addModuleCleanup)."""

    def __init__(self, cleanup, failing_host=None, hosts=HOSTS):
        self.playbook_bin = need("ansible-playbook")
        self.names = hosts
        self.root = tempfile.mkdtemp(prefix="smart-fleet-")
        cleanup(shutil.rmtree, self.root, True)
        self.failing_host = failing_host
        self.fleet_dir = os.path.join(self.root, "control", "fleet")
        self.targets, self.hosts = {}, {}
        for name in hosts:
            prefix = os.path.join(self.root, name)
            home = os.path.join(prefix, "opt", "smart")
            mode = os.path.join(home, "target", "mode")
            os.makedirs(os.path.dirname(mode))
            with open(mode, "w", encoding="utf-8") as handle:
                handle.write("plain\n")
            target = smart.DemoTarget(mode).start()
            cleanup(target.server_close)
            cleanup(target.shutdown)
            self.targets[name] = target
            self.hosts[name] = {
                "ansible_connection": "local", "ansible_python_interpreter": sys.executable,
                "smart_prefix": prefix, "smart_home": home, "smart_src_dir": os.path.join(prefix, "src"),
                "smart_python": sys.executable, "smart_become": False,
            }
        self.inventory = os.path.join(self.root, "inventory.json")
        smart.write_json(self.inventory, {"all": {
            "vars": {"smart_environment": SETTINGS},
            "children": {
                "canary": {"hosts": {hosts[0]: {}}},
                "fleet": {"hosts": {name: vars for name, vars in self.hosts.items()}},
            }}})

    def home(self, name: str) -> str:
        return self.hosts[name]["smart_home"]

    def bare_install(self) -> None:
        """smart.py in each home without install.yml (for the tests that are not about installing)."""
        for name in self.names:
            shutil.copy(os.path.join(REPO_ROOT, "smart.py"), os.path.join(self.home(name), "smart.py"))

    def write_experiment(self, name: str, word=None, revert="echo plain > ../../target/mode") -> None:
        """experiments/050_fleet_cache in the host's home: plain vs cached (or failing, on the failing host)."""
        folder = os.path.join(self.home(name), "experiments", EXPERIMENT)
        os.makedirs(folder, exist_ok=True)
        word = word or ("failing" if name == self.failing_host else "cached")
        smart.write_json(os.path.join(folder, "meta.json"), {
            "id": EXPERIMENT, "description": "Does a response cache make the demo site faster?",
            "variants": [{"name": "baseline", "apply": "echo plain > ../../target/mode"},
                         {"name": VARIANT, "apply": f"echo {word} > ../../target/mode"}],
            "revert": revert,
            "target_url": self.targets[name].url,
            "measure": {"rate": 40, "timeout": 2},
        })

    def playbook(self, playbook: str, *args, experiment=True, on_line=None):
        """Run ansible-playbook; returns (exit code, output, seconds). on_line(line) sees each line as it comes."""
        command = [self.playbook_bin, "-i", self.inventory, os.path.join(ANSIBLE_DIR, playbook), *args]
        if experiment:
            command += ["-e", f"experiment={EXPERIMENT}", "-e", f"fleet_dir={self.fleet_dir}"]
        started = time.monotonic()
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   env=ansible_env(self.root), cwd=self.root, stdin=subprocess.DEVNULL,
                                   start_new_session=True)
        timed_out = threading.Event()

        def kill():
            timed_out.set()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
        watchdog = threading.Timer(PLAYBOOK_TIMEOUT, kill)
        watchdog.start()
        lines = []
        try:
            for line in process.stdout:
                lines.append(line)
                if on_line is not None:
                    on_line(line)
            process.wait()
        finally:
            watchdog.cancel()
            if process.poll() is None:
                kill()
                process.wait()
            process.stdout.close()
        output = "".join(lines)
        if timed_out.is_set():
            raise AssertionError(f"ansible-playbook {playbook} ran over {PLAYBOOK_TIMEOUT} s:\n{output[-4000:]}")
        return process.returncode, output, time.monotonic() - started

    def mode(self, name: str) -> str:
        return read_text(os.path.join(self.home(name), "target", "mode"), "").strip()

    def kept(self, name: str) -> dict:
        return smart.read_json(os.path.join(self.home(name), "var", "kept.json"), {}) or {}

    def state(self, name: str) -> dict:
        return smart.read_json(os.path.join(self.home(name), "var", "state.json"), {}) or {}

    def runs(self, name: str) -> list:
        folder = os.path.join(self.home(name), "var", "runs")
        return sorted(os.listdir(folder)) if os.path.isdir(folder) else []

    def fleet_json(self) -> dict:
        with open(os.path.join(self.fleet_dir, "fleet.json"), encoding="utf-8") as handle:
            return json.load(handle)


def at_once(runs: dict) -> dict:
    """{key: (fleet, playbook, *args)} run side by side; {key: what Fleet.playbook returns}."""
    with concurrent.futures.ThreadPoolExecutor(len(runs)) as pool:
        futures = {key: pool.submit(fleet.playbook, *what) for key, (fleet, *what) in runs.items()}
        return {key: future.result() for key, future in futures.items()}


def by_name(fleet_json: dict) -> dict:
    return {host["name"]: host for host in fleet_json["hosts"]}


class PlaybookSourceTests(unittest.TestCase):
    """Every playbook parses (ansible-playbook --syntax-check) and passes ansible-lint."""

    def test_syntax_check(self):
        playbook_bin = need("ansible-playbook")
        work = tempfile.mkdtemp(prefix="smart-fleet-syntax-")
        self.addCleanup(shutil.rmtree, work, True)
        for playbook in PLAYBOOKS:
            with self.subTest(playbook=playbook):
                done = subprocess.run(
                    [playbook_bin, "--syntax-check", "-i", os.path.join(ANSIBLE_DIR, "inventory.example.ini"),
                     os.path.join(ANSIBLE_DIR, playbook)], capture_output=True, text=True, timeout=120,
                    env=ansible_env(work), cwd=work, stdin=subprocess.DEVNULL)
                self.assertEqual(done.returncode, 0, f"{playbook}:\n{done.stdout}\n{done.stderr}")

    def test_ansible_lint(self):
        lint = shutil.which("ansible-lint")
        if not lint:          # optional, even under CI: .ci/run installs it when it installs
            raise unittest.SkipTest("ansible-lint is not installed (python3 -m pip install ansible-lint)")
        work = tempfile.mkdtemp(prefix="smart-fleet-lint-")
        self.addCleanup(shutil.rmtree, work, True)
        env = ansible_env(work)
        env.update(XDG_CACHE_HOME=os.path.join(work, "cache"), NO_COLOR="1")
        done = subprocess.run([lint, "--offline", "--nocolor", *PLAYBOOKS], capture_output=True, text=True,
                              timeout=300, env=env, cwd=ANSIBLE_DIR, stdin=subprocess.DEVNULL)
        self.assertEqual(done.returncode, 0, f"ansible-lint:\n{done.stdout}\n{done.stderr}")

    def test_inventory_example_has_canary_and_fleet(self):
        work = tempfile.mkdtemp(prefix="smart-fleet-inventory-")
        self.addCleanup(shutil.rmtree, work, True)
        graph = subprocess.run([need("ansible-inventory"), "-i", os.path.join(ANSIBLE_DIR, "inventory.example.ini"),
                                "--list"], capture_output=True, text=True, timeout=60,
                               env=ansible_env(work), cwd=work, stdin=subprocess.DEVNULL)
        self.assertEqual(graph.returncode, 0, graph.stderr)
        groups = json.loads(graph.stdout)
        self.assertEqual(len(groups["canary"]["hosts"]), 1)
        self.assertTrue(set(groups["canary"]["hosts"]) < set(groups["fleet"]["hosts"]))


class RolloutTests(unittest.TestCase):
    """install.yml twice, then experiment.yml: the canary keeps `cached` and the rollout reaches all 4;
    then experiment.yml again, which changes nothing.  The inventory carries the coach token in
    smart_settings, and the first install.yml and experiment.yml run at -vvv under a ProcessWatch:
    the token goes into smart.conf and nowhere else."""

    @classmethod
    def setUpClass(cls):
        cls.fleet = fleet = Fleet(cls.addClassCleanup)
        inventory = smart.read_json(fleet.inventory)
        inventory["all"]["vars"]["smart_settings"] = {"PHONE_HOME": "never", "PHONE_HOME_TOKEN": TOKEN,
                                                      "EARLY_STOP": False, "KEEP_RUNS": 50}
        smart.write_json(fleet.inventory, inventory)
        with ProcessWatch(TOKEN) as watch:
            cls.install = [fleet.playbook("install.yml", "-vvv", experiment=False)]
            cls.install.append(fleet.playbook("install.yml", experiment=False))
            for name in HOSTS:
                fleet.write_experiment(name)
            cls.first = fleet.playbook("experiment.yml", "-vvv")
        cls.watch = watch
        cls.first_fleet_json = fleet.fleet_json() if os.path.exists(os.path.join(fleet.fleet_dir, "fleet.json")) else None
        cls.state_after_first = {name: fleet.state(name) for name in HOSTS}
        cls.second = fleet.playbook("experiment.yml")
        cls.second_fleet_json = fleet.fleet_json()
        cls.figures = {"install": [round(s, 1) for _, _, s in cls.install],
                       "rollout": round(cls.first[2], 1), "rerun": round(cls.second[2], 1)}

    def test_install_is_idempotent(self):
        (rc1, out1, _), (rc2, out2, _) = self.install
        self.assertEqual(rc1, 0, out1[-4000:])
        self.assertEqual(rc2, 0, out2[-4000:])
        first, second = recap(out1), recap(out2)
        self.assertEqual(set(first), set(HOSTS), out1[-3000:])
        for name in HOSTS:
            self.assertGreater(first[name]["changed"], 0, f"{name}: the first install changed nothing")
            self.assertEqual(second[name]["changed"], 0, f"{name}: the second install changed something:\n{out2[-4000:]}")
            home = self.fleet.home(name)
            for path in ("smart.py", "www/index.html", "www/fleet.html", "experiments/001_nginx_workers/meta.json",
                         "experiments/001_nginx_workers/README.md", "smart.conf", "var"):
                self.assertTrue(os.path.exists(os.path.join(home, path)), f"{name}: {path} not installed")
            self.assertTrue(os.access(os.path.join(home, "smart.py"), os.X_OK))

    def test_rollout_reaches_every_host(self):
        rc, out, _ = self.first
        self.assertEqual(rc, 0, out[-6000:])
        for name in HOSTS:
            self.assertEqual(self.fleet.mode(name), "cached", f"{name}: the target is not on cached")
            self.assertEqual(self.fleet.kept(name).get(EXPERIMENT, {}).get("variant"), VARIANT, name)
        canary = self.state_after_first[HOSTS[0]]
        self.assertEqual(canary.get("design"), "sequential")        # the canary measured: a run, not an apply
        self.assertEqual(canary.get("kept_variant"), VARIANT)
        for name in HOSTS[1:]:
            state = self.state_after_first[name]
            self.assertEqual((state.get("design"), state.get("kept_variant"), state.get("status")),
                             ("apply", VARIANT, "done"), name)
        counts = recap(out)
        self.assertEqual(counts[HOSTS[0]]["failed"], 0)
        self.assertTrue(all(counts[name]["failed"] == 0 and counts[name]["rescued"] == 0 for name in HOSTS), out[-3000:])

    def test_fleet_json_lists_every_host_with_the_variant(self):
        fleet_json = self.first_fleet_json
        self.assertIsNotNone(fleet_json, self.first[1][-4000:])
        self.assertEqual((fleet_json["experiment"], fleet_json["variant"], fleet_json["canary"], fleet_json["outcome"]),
                         (EXPERIMENT, VARIANT, HOSTS[0], "rolled out"))
        self.assertEqual(fleet_json["failed"], [])
        self.assertEqual(fleet_json["not_reached"], [])
        self.assertEqual([(w["wave"], w["hosts"]) for w in fleet_json["waves"]],
                         [(0, ["web1"]), (1, ["web2"]), (2, ["web3"]), (3, ["web4"])])
        hosts = by_name(fleet_json)
        self.assertEqual(list(hosts), list(HOSTS))
        for wave, name in enumerate(HOSTS):
            host = hosts[name]
            self.assertEqual(host["variant"], VARIANT, name)
            self.assertEqual(host["wave"], wave, name)
            self.assertEqual(host["outcome"], "kept" if wave == 0 else "applied", name)
            self.assertEqual(host["applied"][EXPERIMENT]["variant"], VARIANT)
            self.assertEqual(host["last"]["verdict"]["decision"], "keep", name)
            self.assertEqual(host["home"], self.fleet.home(name))
        self.assertTrue(os.path.exists(os.path.join(self.fleet.fleet_dir, "fleet.html")))

    def test_rerun_is_idempotent(self):
        rc, out, _ = self.second
        self.assertEqual(rc, 0, out[-6000:])
        counts = recap(out)
        for name in [*HOSTS, "localhost"]:
            self.assertEqual(counts[name]["changed"], 0, f"{name} changed on a re-run:\n{out[-6000:]}")
            self.assertEqual(counts[name]["failed"], 0, out[-4000:])
        for name in HOSTS:
            self.assertEqual(self.fleet.mode(name), "cached")
            self.assertEqual(self.fleet.kept(name)[EXPERIMENT]["variant"], VARIANT)
        # the canary is not measured again and every other host says "already applied"
        self.assertEqual(self.fleet.state(HOSTS[0])["run_id"], self.state_after_first[HOSTS[0]]["run_id"])
        hosts = by_name(self.second_fleet_json)
        self.assertEqual(hosts[HOSTS[0]]["outcome"], "kept earlier")
        for name in HOSTS[1:]:
            self.assertEqual(hosts[name]["outcome"], "already applied", name)
            self.assertIn("already applied", hosts[name]["apply"]["message"])
            self.assertEqual(self.fleet.state(name)["run_id"], self.state_after_first[name]["run_id"], name)
        self.assertEqual(self.second_fleet_json["outcome"], "rolled out")

    def test_the_token_is_in_smart_conf(self):
        for name in self.fleet.names:
            conf = os.path.join(self.fleet.home(name), "smart.conf")
            self.assertEqual(os.stat(conf).st_mode & 0o777, 0o640, name)
            text = read_text(conf)
            self.assertIn(f"\nPHONE_HOME_TOKEN={TOKEN}\n", text, name)
            self.assertIn("\nEARLY_STOP=no\n", text, "a YAML boolean is written as yes/no")
            settings = smart.load_settings(conf, environ={})
            self.assertEqual((settings["PHONE_HOME_TOKEN"], settings["KEEP_RUNS"]), (TOKEN, 50))

    def test_the_playbooks_ran_and_never_showed_the_token(self):
        for what, (rc, out, _) in (("install.yml", self.install[0]), ("experiment.yml", self.first)):
            self.assertEqual(rc, 0, f"{what}:\n{out[-4000:]}")
            self.assertIn("EXEC /bin/sh -c", out, f"{what} did not run at -vvv")
            self.assertNotIn(TOKEN, out, f"{what} -vvv printed the token")
        self.assertEqual(self.fleet.kept("web2")[EXPERIMENT]["variant"], VARIANT)
        again = self.install[1]
        self.assertEqual(recap(again[1])["web1"]["changed"], 0, "smart.conf is rewritten on every run")

    def test_no_process_carried_the_token(self):
        self.assertGreater(self.watch.ansible, 0, "the watch saw no Ansible module run")
        self.assertEqual(self.watch.seen, [], "the token was in a command line or an environment")


class StoppedRolloutTests(unittest.TestCase):
    """web3 (wave 2) turns its target to `failing` on apply: it reverts, wave 3 never starts, fleet.json says why."""

    FAILING = "web3"

    @classmethod
    def setUpClass(cls):
        SideBySide.wait(cls)

    @classmethod
    def prepare(cls):
        cls.fleet = fleet = Fleet(unittest.addModuleCleanup, failing_host=cls.FAILING)
        fleet.bare_install()
        for name in HOSTS:
            fleet.write_experiment(name)

        def run():
            cls.result = fleet.playbook("experiment.yml")
            cls.figures = {"stopped rollout": round(cls.result[2], 1)}
        return run

    def test_the_playbook_fails_and_says_why(self):
        rc, out, _ = self.result
        self.assertNotEqual(rc, 0, out[-4000:])
        self.assertIn(f"stopped at wave 2: {self.FAILING} failed verification", out)

    def test_failing_host_reverted_itself(self):
        self.assertEqual(self.fleet.mode(self.FAILING), "plain")
        self.assertNotIn(EXPERIMENT, self.fleet.kept(self.FAILING))
        state = self.fleet.state(self.FAILING)
        self.assertEqual((state["design"], state["status"], state["kept_variant"]), ("apply", "done", None))
        self.assertEqual(state["variants"][-1]["decision"], "revert")
        self.assertFalse(os.path.exists(os.path.join(self.fleet.home(self.FAILING), "var", "applied.json")))

    def test_earlier_waves_keep_the_variant(self):
        for name in HOSTS[:2]:
            self.assertEqual(self.fleet.mode(name), "cached", name)
            self.assertEqual(self.fleet.kept(name)[EXPERIMENT]["variant"], VARIANT, name)

    def test_later_waves_never_start(self):
        name = HOSTS[3]
        self.assertEqual(self.fleet.mode(name), "plain")
        self.assertEqual(self.fleet.kept(name), {})
        self.assertEqual(self.fleet.runs(name), [], "web4 ran something")
        self.assertNotIn(f"{name}]", self.result[1].split("Apply the variant", 1)[-1].split("PLAY [Fleet status", 1)[0])

    def test_fleet_json_says_which_host_failed_and_why(self):
        fleet_json = self.fleet.fleet_json()
        self.assertEqual(fleet_json["outcome"], "stopped")
        self.assertEqual([(w["wave"], w["hosts"]) for w in fleet_json["waves"]],
                         [(0, ["web1"]), (1, ["web2"]), (2, ["web3"])])
        self.assertEqual(fleet_json["not_reached"], ["web4"])
        [failure] = fleet_json["failed"]
        self.assertEqual((failure["host"], failure["wave"], failure["rc"], failure["status"]), (self.FAILING, 2, 1, "done"))
        state = self.fleet.state(self.FAILING)
        self.assertEqual(failure["run_id"], state["run_id"])
        self.assertEqual(failure["reason"], state["variants"][-1]["reason"])     # the reason from its state.json
        self.assertRegex(failure["reason"], r"^revert: .*(guardrail|error rate)")
        hosts = by_name(fleet_json)
        self.assertEqual([hosts[n]["outcome"] for n in HOSTS], ["kept", "applied", "reverted", "not reached"])
        self.assertEqual([hosts[n]["variant"] for n in HOSTS], [VARIANT, VARIANT, None, None])
        self.assertEqual(hosts[self.FAILING]["failure"]["reason"], failure["reason"])
        self.assertIsNone(hosts["web4"]["last"])
        self.assertIn(self.FAILING, fleet_json["summary"])

    def test_fleet_page_shows_the_failed_host(self):
        dom, markup = render_fleet_page(self, self.fleet.fleet_dir)
        row = dom.row("web3")
        self.assertIn("failed", row["class"])
        self.assertIn("reverted", row["text"])
        self.assertIn(self.fleet.fleet_json()["failed"][0]["reason"], row["text"])
        self.assertIn("not reached", dom.text_of("rollout-body"))
        self.assertIn("wave 2", dom.text_of("rollout-body"))
        self.assertEqual(dom.text_of("outcome-pill"), "stopped")
        self.assertIn("web3 failed verification", dom.text_of("banner"))
        self.assertIn(VARIANT, dom.row("web2")["text"])


class CanaryOutcomeTests(unittest.TestCase):
    """Three 2-host fleets: a canary that keeps nothing (its variant is slower), one whose revert fails,
    and one without smart.py. None rolls anything out: web2 stays untouched; fleet.json says why.
    """

    @classmethod
    def setUpClass(cls):
        SideBySide.wait(cls)

    @classmethod
    def prepare(cls):
        cls.nothing = Fleet(unittest.addModuleCleanup, hosts=HOSTS[:2])
        cls.broken = Fleet(unittest.addModuleCleanup, hosts=HOSTS[:2])
        for fleet, revert in ((cls.nothing, "echo plain > ../../target/mode"), (cls.broken, "exit 3")):
            fleet.bare_install()
            for name in fleet.names:
                fleet.write_experiment(name, word="slow", revert=revert)
        cls.missing = Fleet(unittest.addModuleCleanup, hosts=HOSTS[:2])       # smart.py not installed at all

        def run():
            cls.results = at_once({"nothing": (cls.nothing, "experiment.yml"),
                                   "broken": (cls.broken, "experiment.yml"), "missing": (cls.missing, "experiment.yml")})
            cls.figures = {f"canary {key}": round(result[2], 1) for key, result in cls.results.items()}
        return run

    def assertUntouched(self, fleet, name):
        self.assertEqual(fleet.mode(name), "plain")
        self.assertEqual(fleet.kept(name), {})
        self.assertEqual(fleet.runs(name), [])

    def test_canary_keeps_nothing_so_nothing_rolls_out(self):
        rc, out, _ = self.results["nothing"]
        self.assertEqual(rc, 0, out[-4000:])
        self.assertEqual(self.nothing.state("web1")["kept_variant"], None)
        self.assertEqual(self.nothing.mode("web1"), "plain")
        self.assertUntouched(self.nothing, "web2")
        fleet_json = self.nothing.fleet_json()
        self.assertEqual((fleet_json["outcome"], fleet_json["variant"], fleet_json["failed"]), ("nothing kept", None, []))
        self.assertEqual([w["wave"] for w in fleet_json["waves"]], [0])
        hosts = by_name(fleet_json)
        self.assertEqual((hosts["web1"]["outcome"], hosts["web2"]["outcome"]), ("nothing kept", None))
        self.assertEqual(hosts["web1"]["last"]["verdict"]["decision"], "revert")

    def test_a_canary_without_smart_is_a_canary_failure(self):
        rc, out, _ = self.results["missing"]
        self.assertNotEqual(rc, 0, out[-4000:])
        fleet_json = self.missing.fleet_json()
        self.assertEqual(fleet_json["outcome"], "canary failed")
        [failure] = fleet_json["failed"]
        self.assertEqual((failure["host"], failure["rc"], failure["run_id"]), ("web1", 2, None))
        self.assertIn("smart.py", failure["reason"])                     # python's "can't open file" line
        hosts = by_name(fleet_json)
        self.assertTrue(hosts["web2"]["error"])
        self.assertUntouched(self.missing, "web2")

    def test_canary_failure_stops_everything_and_says_why(self):
        rc, out, _ = self.results["broken"]
        self.assertNotEqual(rc, 0, out[-4000:])
        state = self.broken.state("web1")
        self.assertEqual(state["status"], "failed")
        self.assertUntouched(self.broken, "web2")
        fleet_json = self.broken.fleet_json()
        self.assertEqual(fleet_json["outcome"], "canary failed")
        [failure] = fleet_json["failed"]
        self.assertEqual((failure["host"], failure["wave"], failure["rc"], failure["run_id"], failure["status"]),
                         ("web1", 0, 1, state["run_id"], "failed"))
        self.assertEqual(failure["reason"], state["reason"])
        self.assertIn("exited 3", failure["reason"])
        self.assertIn("the canary web1 failed", out)
        hosts = by_name(fleet_json)
        self.assertEqual(hosts["web1"]["outcome"], "failed")
        self.assertTrue(hosts["web1"]["attention"], "a failed revert needs attention")


class BusyHostTests(unittest.TestCase):
    """A host whose lock a timer run holds is waited for (smart_lock_retries / smart_lock_delay), not failed."""

    @classmethod
    def setUpClass(cls):
        SideBySide.wait(cls)

    @classmethod
    def prepare(cls):
        cls.fleet = fleet = Fleet(unittest.addModuleCleanup, hosts=HOSTS[:2])
        fleet.bare_install()
        for name in fleet.names:
            fleet.write_experiment(name)
        var = os.path.join(fleet.home("web2"), "var")
        os.makedirs(var)
        lock = open(os.path.join(var, "lock"), "a+", encoding="utf-8")
        unittest.addModuleCleanup(lock.close)
        fcntl.flock(lock, fcntl.LOCK_EX)           # as a run of the timer would
        lock.write("4242\n")
        lock.flush()

        def release(line):              # the timer's run ends once the apply has found the lock held
            if "FAILED - RETRYING: [web2]" in line and not lock.closed:
                fcntl.flock(lock, fcntl.LOCK_UN)

        def run():
            cls.result = fleet.playbook("experiment.yml", "-e", "smart_lock_delay=1", "-e", "smart_lock_retries=30",
                                        on_line=release)
            cls.figures = {"busy host": round(cls.result[2], 1)}
        return run

    def test_the_apply_waits_for_the_lock(self):
        rc, out, _ = self.result
        self.assertEqual(rc, 0, out[-4000:])
        self.assertRegex(out, r"FAILED - RETRYING: \[web2\]: Apply the variant")
        self.assertEqual(self.fleet.kept("web2")[EXPERIMENT]["variant"], VARIANT)
        self.assertEqual(self.fleet.fleet_json()["outcome"], "rolled out")


class UnreachableHostTests(unittest.TestCase):
    """web3 does not answer (ssh to a closed port): max_fail_percentage ends the playbook, web4 is untouched,
    and fleet-status.yml run afterwards lists web3 as unreachable."""

    @classmethod
    def setUpClass(cls):
        SideBySide.wait(cls)

    @classmethod
    def prepare(cls):
        if not shutil.which("ssh"):
            raise unittest.SkipTest("no ssh client to make a host unreachable with")
        cls.fleet = fleet = Fleet(unittest.addModuleCleanup)
        fleet.bare_install()
        for name in HOSTS:
            fleet.write_experiment(name)
        inventory = smart.read_json(fleet.inventory)
        inventory["all"]["children"]["fleet"]["hosts"]["web3"].update(
            ansible_connection="ssh", ansible_host="127.0.0.1", ansible_port=closed_port())
        smart.write_json(fleet.inventory, inventory)

        def run():
            cls.result = fleet.playbook("experiment.yml")
            cls.fleet_json_written = os.path.exists(os.path.join(fleet.fleet_dir, "fleet.json"))
            cls.status = fleet.playbook("fleet-status.yml")
            cls.figures = {"unreachable host": round(cls.result[2], 1)}
        return run

    def test_the_rollout_stops_before_later_waves(self):
        rc, out, _ = self.result
        self.assertEqual(rc, 4, out[-4000:])
        self.assertFalse(self.fleet_json_written)
        self.assertEqual(self.fleet.kept("web2")[EXPERIMENT]["variant"], VARIANT)
        self.assertEqual((self.fleet.mode("web4"), self.fleet.kept("web4"), self.fleet.runs("web4")), ("plain", {}, []))

    def test_fleet_status_afterwards_lists_the_unreachable_host(self):
        rc, out, _ = self.status
        self.assertEqual(rc, 0, out[-4000:])
        fleet_json = self.fleet.fleet_json()
        self.assertEqual(fleet_json["outcome"], "status only")
        hosts = by_name(fleet_json)
        self.assertFalse(hosts["web3"]["reachable"])
        self.assertTrue(hosts["web3"]["error"])          # what ssh said
        self.assertEqual([hosts[n]["variant"] for n in HOSTS], [VARIANT, VARIANT, None, None])


class SideBySide:
    """The scenarios that share nothing - BusyHostTests, CanaryOutcomeTests, StoppedRolloutTests and
    UnreachableHostTests, each with fleets of its own - run their playbooks at once.  The first of
    those classes to set up has each one prepare (fleets, experiments, inventory: in this thread, the
    cleanups registered with the module) and starts what each returns, its playbooks, in a thread of
    its own; every class then waits for its own.  A module cleanup, registered after the fleets' and
    so run before them, waits for every thread."""

    futures = None

    @classmethod
    def wait(cls, case):
        if cls.futures is None:
            cls.futures = {}
            pool = concurrent.futures.ThreadPoolExecutor(len(SIDE_BY_SIDE))
            for scenario in SIDE_BY_SIDE:
                try:
                    cls.futures[scenario] = pool.submit(scenario.prepare())
                except Exception as exc:      # that class alone fails or skips (SkipTest), with this
                    cls.futures[scenario] = concurrent.futures.Future()
                    cls.futures[scenario].set_exception(exc)
            unittest.addModuleCleanup(pool.shutdown)
        cls.futures[case].result()


class ProcessWatch(threading.Thread):
    """While in a `with` block, reads every process's command line and environment (/proc) every
    20 ms: `seen` lists each one that holds `secret`, `ansible` counts the Ansible module runs
    seen (so a test knows the watch looked while something ran)."""

    def __init__(self, secret: str):
        super().__init__(daemon=True)
        self.secret = secret.encode()
        self.seen, self.ansible = [], 0
        self.halt = threading.Event()

    def run(self):
        while not self.halt.wait(0.02):
            for entry in os.listdir("/proc"):
                if not entry.isdigit() or int(entry) == os.getpid():
                    continue
                for part in ("cmdline", "environ"):
                    try:
                        with open(f"/proc/{entry}/{part}", "rb") as handle:
                            data = handle.read()
                    except OSError:
                        continue
                    if self.secret in data:
                        self.seen.append((int(entry), part, data[:200]))
                    if part == "cmdline" and b"AnsiballZ_" in data:
                        self.ansible += 1

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.halt.set()
        self.join(10)


TOKEN = "tok-9Zq3vKx1-never-shown"


SIDE_BY_SIDE = (BusyHostTests, CanaryOutcomeTests, StoppedRolloutTests, UnreachableHostTests)


class SecretTests(unittest.TestCase):
    """In smart_environment the coach token is refused before anything runs (RolloutTests checks
    that through smart_settings it goes into smart.conf and nowhere else); the ProcessWatch sees a
    token in an environment."""

    @classmethod
    def setUpClass(cls):
        cls.refused = Fleet(cls.addClassCleanup, hosts=HOSTS[:2])
        cls.refused.bare_install()
        for name in cls.refused.names:
            cls.refused.write_experiment(name)
        inventory = smart.read_json(cls.refused.inventory)
        inventory["all"]["vars"]["smart_environment"] = dict(SETTINGS, PHONE_HOME_TOKEN=TOKEN)
        smart.write_json(cls.refused.inventory, inventory)
        cls.refused_runs = at_once({playbook: (cls.refused, playbook, "-vvv")
                                    for playbook in ("experiment.yml", "fleet-status.yml")})

    def test_the_watch_sees_a_token_in_an_environment(self):
        with ProcessWatch(TOKEN) as watch:
            child = subprocess.Popen(["sleep", "30"], env={"PHONE_HOME_TOKEN": TOKEN}, start_new_session=True)
            try:
                deadline = time.monotonic() + 10
                while not watch.seen and time.monotonic() < deadline:
                    time.sleep(0.02)
            finally:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
        self.assertIn((child.pid, "environ"), [(pid, part) for pid, part, _ in watch.seen])

    def test_a_token_in_smart_environment_is_refused(self):
        for playbook, (rc, out, _) in self.refused_runs.items():
            self.assertNotEqual(rc, 0, f"{playbook}:\n{out[-4000:]}")
            self.assertIn("smart_environment has PHONE_HOME_TOKEN", out, playbook)
            self.assertNotIn(TOKEN, out, playbook)
        for name in self.refused.names:
            self.assertEqual(self.refused.runs(name), [], f"{name} ran something")
            self.assertEqual(self.refused.mode(name), "plain")


def closed_port() -> int:
    """A loopback port nothing listens on (bound, read, closed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ------------------------------------------------------------------------------- the page --

class FleetPageSourceTests(unittest.TestCase):
    def setUp(self):
        self.source = read_text(FLEET_HTML)

    def test_no_external_asset_and_no_html_sinks(self):
        self.assertNotRegex(self.source, r'(?i)(src|href)\s*=\s*["\']?(https?:)?//')
        self.assertNotRegex(self.source, r"(?i)@import|url\(")
        for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
            self.assertNotIn(sink, self.source)

    def test_reads_fleet_json_relative_and_uncached(self):
        self.assertIn('getJSON("fleet.json")', self.source)
        self.assertIn('cache: "no-store"', self.source)
        self.assertIn("prefers-color-scheme: light", self.source)


def render_fleet_page(test: unittest.TestCase, folder: str):
    """Serve folder (fleet.html + fleet.json) on a free port; the DOM headless Chromium ends with.

    One Chromium serves every page of the module (test_dashboard's DevTools, started at the first page,
    stopped by a module cleanup)."""
    if not CHROMIUM:
        if os.environ.get("CI") == "true":
            raise AssertionError("chromium is missing and CI=true: the fleet page tests cannot be skipped")
        raise unittest.SkipTest("chromium is not installed")
    from test_dashboard import DevTools, Dom

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=folder, **kwargs)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, name="fleet-page", daemon=True)
    thread.start()
    test.addCleanup(thread.join, 10)
    test.addCleanup(server.server_close)
    test.addCleanup(server.shutdown)
    if BROWSER.get("devtools") is None:
        BROWSER["devtools"] = DevTools(test, cleanup=unittest.addModuleCleanup)
    browser = BROWSER["devtools"]
    browser.test = test
    markup = browser.dump(f"http://127.0.0.1:{server.server_address[1]}/fleet.html")
    test.assertIn("<main>", markup, "chromium rendered no page; console:\n" + "\n".join(browser.console)[-2000:])
    dom = Dom(markup)

    def row(name):
        """A host's table row: its class and text."""
        match = re.search(r'<tr[^>]*data-host="' + re.escape(name) + r'"[^>]*>.*?</tr>', markup, re.S)
        test.assertIsNotNone(match, f"no row for {name}")
        tag = re.match(r"<tr[^>]*>", match.group(0)).group(0)
        klass = re.search(r'class="([^"]*)"', tag)
        return {"class": klass.group(1) if klass else "", "text": " ".join(Dom(match.group(0)).visible.split())}
    dom.row = row
    return dom, markup


BROWSER = {}            # the module's Chromium, once a page needs it


class FleetPageBrowserTests(unittest.TestCase):
    """fleet.html with a crafted fleet.json: hostile strings stay text, odd shapes do not blank the page."""

    def page(self, fleet_json, raw=None):
        folder = tempfile.mkdtemp(prefix="smart-fleet-page-")
        self.addCleanup(shutil.rmtree, folder, True)
        shutil.copy(FLEET_HTML, os.path.join(folder, "fleet.html"))
        if raw is not None or fleet_json is not None:
            with open(os.path.join(folder, "fleet.json"), "w", encoding="utf-8") as handle:
                handle.write(raw if raw is not None else json.dumps(fleet_json))
        return render_fleet_page(self, folder)

    def test_hostile_strings_stay_text(self):
        fleet_json = {
            "experiment": HOSTILE, "variant": HOSTILE, "canary": "web1", "outcome": "stopped", "summary": HOSTILE,
            "generated_at": "2026-11-27T21:00:00Z", "serial": [1, "25%", "100%"],
            "waves": [{"wave": 0, "role": "canary", "hosts": ["web1"]}, {"wave": 1, "role": "rollout", "hosts": [HOSTILE]}],
            "failed": [{"host": HOSTILE, "wave": 1, "rc": 1, "reason": "revert: " + HOSTILE}],
            "not_reached": ['"><script>alert(1)</script>'],
            "hosts": [
                {"name": "web1", "role": "canary", "wave": 0, "outcome": "kept", "variant": HOSTILE,
                 "applied": {HOSTILE: {"variant": HOSTILE, "kept": True}},
                 "last": {"run_id": HOSTILE, "status": "done", "verdict": {"variant": HOSTILE, "decision": HOSTILE,
                                                                           "reason": HOSTILE, "base_p50_ms": 20.1}},
                 "attention": [HOSTILE], "failure": None},
                {"name": HOSTILE, "role": "fleet", "wave": 1, "outcome": "reverted", "variant": None, "error": HOSTILE,
                 "failure": {"host": HOSTILE, "reason": "revert: " + HOSTILE}},
            ],
        }
        dom, markup = self.page(fleet_json)
        self.assertIn("&lt;img", markup)
        self.assertIn("&lt;script&gt;", markup)
        self.assertNotIn('<img src="x"', markup)
        self.assertNotIn("data-pwned=", markup)
        self.assertEqual([tag for tag, _ in dom.tags if tag == "img"], [])
        self.assertEqual(len([tag for tag, _ in dom.tags if tag == "script"]), 1)     # the page's own
        self.assertIn("revert: " + HOSTILE, dom.text_of("hosts-body"))

    def test_missing_and_odd_fleet_json_do_not_blank_the_page(self):
        dom, _ = self.page(None)
        self.assertIn("No data yet", dom.text_of("banner"))
        dom, _ = self.page(None, raw="{not json")
        self.assertIn("not valid JSON", dom.text_of("banner"))
        dom, _ = self.page({"hosts": [None, 3, {"name": "web9", "applied": [1], "last": "x", "waves": 2}],
                            "waves": {"a": 1}, "failed": "x"})
        self.assertIn("web9", dom.text_of("hosts-body"))
        self.assertEqual(dom.attrs_of("banner").get("data-kind"), "")


def tearDownModule():
    figures = {}
    for case in (RolloutTests, StoppedRolloutTests, CanaryOutcomeTests, BusyHostTests, UnreachableHostTests,
                 SecretTests):
        figures.update(getattr(case, "figures", {}) or {})
    if figures and os.environ.get("SMART_FLEET_FIGURES"):
        print(f"\nfleet timings (s): {figures}", file=sys.stderr)


if __name__ == "__main__":
    unittest.main()
