"""Randomized fault injection: the promise of docs/SPEC.md "A run" under faults at random moments.

On any fault (SIGKILL at any moment, SIGTERM, a full disk, corrupt var/ files) the box is never left
on a variant that was not kept, after recovery or the next run; and every fault gives one clear line,
never a traceback.  Each kind of fault is a test; each of its trials is a subTest in a temporary home
of its own (tests/test_run.py's RunTestCase helpers), with an experiment whose variants write their
name into HOME/server.conf and append to HOME/order.log, measured by a fake measure.sh whose latency
follows server.conf (fast* variants answer twice as fast, so that they are kept) or, in a quarter of
the signal trials, by the built-in prober against a DemoTarget.  Apply and revert commands sleep a
random while, before their write or partly after it (a config written, then a slow reload).

  sigkill     SIGKILL smart.py (its pid only, so that its commands live on as orphans, or its process
              group) at a random moment: uniform over the run's expected length, or just after
              state.json says applying / reverting / kept, or just after a command's write shows in
              order.log; in `run EXP` on a fresh home, `run EXP`, `revert EXP` or `recheck EXP` on a settled
              one (the kept variant's revert runs first), or `apply EXP VARIANT`; then `recover`, `run EXP` or
              the timer's `run` (sometimes itself killed, then `recover`)
  sigterm     SIGTERM at a random moment: exit 1 within seconds, reverted, one line on stderr
  apply-kill  SIGKILL inside a slow apply (0.2-1.5 s) whose background children write later
  disk        var/ on a tmpfs of a few hundred KB, filled at a random moment leaving 0-8 pages free:
              by an apply, a background filler, before the run, or just before a keep
  corrupt     garbage, truncation, [], {}, a folder, a symlink elsewhere, for each of state.json,
              kept.json, applied.json, history.jsonl, lock and runs/; then run, run EXP, recover,
              status, doctor and dashboard in a random order

After each trial: server.conf is the baseline or exactly the variant var/kept.json names, and
state.json, history.jsonl and kept.json agree; no journal, no run left "running", no traceback,
one line on stderr, `status` exits 0 or names what needs attention; no process of the trial lives on.

Trials are seeded: SMART_FAULT_SEED (default below, so CI is reproducible) seeds every trial's
parameters (random.Random("SEED:KIND:INDEX")); the moment a signal lands still depends on the
scheduler.  SMART_FAULT_ONLY=sigkill:3,disk runs only those trials or kinds; SMART_FAULT_WORKERS
trials run at once (default 10, mostly sleeping); SMART_FAULT_KEEP=1 keeps the homes of failed
trials; SMART_FAULT_VERBOSE=1 prints a line per trial.  The table of trials and survivors per kind,
and where the faults hit, is printed to stderr at the end.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import random
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from helpers import clean_env, import_smart, spawn_smart  # noqa: E402
from test_run import RunTestCase  # noqa: E402

smart = import_smart()

DEFAULT_SEED = 20261201
SEED = int(os.environ.get("SMART_FAULT_SEED") or DEFAULT_SEED)
WORKERS = max(1, int(os.environ.get("SMART_FAULT_WORKERS") or 10))
KEEP_FAILED = os.environ.get("SMART_FAULT_KEEP", "") not in ("", "0")
VERBOSE = os.environ.get("SMART_FAULT_VERBOSE", "") not in ("", "0")
COUNTS = {"sigkill": 36, "sigterm": 16, "apply-kill": 16, "disk": 18, "corrupt": 36}
TRIAL_ENV = "SMART_FAULT_TRIAL"      # every process a trial starts carries it: cleanup finds them by it
EXP = "001_workers"


def _selection():
    """SMART_FAULT_ONLY as {kind: None (all) or a set of indexes}, or None for everything."""
    text = os.environ.get("SMART_FAULT_ONLY", "").strip()
    if not text:
        return None
    chosen = {}
    for part in text.split(","):
        kind, _, index = part.strip().partition(":")
        if index:
            if chosen.get(kind, set()) is not None:
                chosen.setdefault(kind, set()).add(int(index))
        else:
            chosen[kind] = None
    return chosen


ONLY = _selection()

MEASURE_SH = """#!/bin/sh
# a fake prober: after DURATION x {scale} s, 40 good rows, ~10-20 ms while a fast* variant is applied, else ~20-30 ms
conf=$(cat ../../server.conf 2>/dev/null)
sleep "$(awk -v d="$DURATION" 'BEGIN {{ printf "%.3f", d * {scale} }}')"
case "$conf" in fast*) base=10 ;; *) base=20 ;; esac
awk -v b="$base" -v seed="$$" 'BEGIN {{ srand(seed); print "timestamp,latency_ms,response_code";
  for (i = 0; i < 40; i++) printf "%d,%.3f,200\\n", 1764274326 + i, b + rand() * 10 }}' > "$OUT"
# disk trials: fill var/ leaving N KiB once a fast variant has been measured (the moment before its keep)
if [ -e ../../fill.trigger ] && [ "${{conf#fast}}" != "$conf" ]; then
    leave=$(cat ../../fill.trigger); rm -f ../../fill.trigger
    dd if=/dev/zero of=../../var/fill bs=4k 2>/dev/null; truncate -s "-${{leave}}K" ../../var/fill 2>/dev/null
fi
"""

CONF = """\
BASELINE_SECONDS={baseline}
EXPERIMENT_SECONDS={experiment}
COOLDOWN_SECONDS={cooldown}
COMMAND_TIMEOUT_SECONDS={timeout}
MIN_SAMPLES=10
PHONE_HOME=never
DESIGN={design}
BLOCKS={blocks}
WARMUP_SECONDS={warmup}
EARLY_STOP={early}
LOOK_SECONDS=1
VERIFY_SECONDS=1
KEEP_RUNS={keep_runs}
"""


# ---------------------------------------------------------------------------------------------
# processes: every one a trial starts carries TRIAL_ENV=token in its environment


def trial_pids(token):
    """Live (non-zombie) pids whose environment holds TRIAL_ENV=token, with their command lines."""
    needle = f"{TRIAL_ENV}={token}".encode()
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as handle:
                if needle not in handle.read().split(b"\0"):
                    continue
            with open(f"/proc/{entry}/stat", "rb") as handle:
                if handle.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                    continue
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                found[int(entry)] = handle.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()
        except (OSError, IndexError):
            continue
    return found


def kill_trial_processes(token):
    """SIGKILL each process of a trial by its pid, and its process group (never this one's)."""
    for _ in range(3):
        pids = trial_pids(token)
        if not pids:
            return
        own = os.getpgrp()
        for pid in pids:
            try:
                group = os.getpgid(pid)
                if group not in (own, 0, 1):
                    os.killpg(group, signal.SIGKILL)
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.05)


def catches(pid, sig):
    """Whether the process has a handler for sig now (/proc/PID/status SigCgt)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) & (1 << (sig - 1)))
    except (OSError, ValueError):
        pass
    return False


def phase_kind(phase):
    """A phase of state.json without its variant: applying, measuring, kept..."""
    if not phase:
        return "starting"
    if str(phase).startswith("order.log"):
        return "after a write (" + phase_kind(str(phase).split("(", 1)[1].rstrip(")")) + ")"
    return str(phase).split()[0].replace("kept.json", "kept")


def wait_for(predicate, timeout, step=0.005):
    ends = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= ends:
            return value
        time.sleep(step)


# ---------------------------------------------------------------------------------------------
# one trial: a home (RunTestCase's helpers outside unittest's runner), its RNG and what went wrong


class Trial(RunTestCase):
    """One trial's home and helpers; problems are collected, not raised, so every check is reported."""

    def __init__(self, kind, index):
        super().__init__()                        # methodName "runTest": a helper, not a test of its own
        self.kind, self.index = kind, index
        self.rng = random.Random(f"{SEED}:{kind}:{index}")
        self.token = secrets.token_hex(8)
        self.problems, self.notes, self.outputs = [], [], []
        self.procs = []
        self.landed = None                        # whether the fault hit a live run
        self.hit = None                           # where it hit (the phase of state.json), for the table
        self.cfg = {}

    # -- set-up --
    def start(self):
        self.setUp()
        self.addCleanup(kill_trial_processes, self.token)
        return self

    def env(self, extra=None):
        env = {TRIAL_ENV: self.token}
        env.update(extra or {})
        return env

    def settings(self, **fixed):
        """smart.conf with short, random settings (both designs)."""
        rng = self.rng
        cfg = {"design": rng.choice(["sequential", "switchback"]), "blocks": rng.choice([2, 3]),
               "warmup": rng.choice([0, 0.2, 0.3]), "baseline": rng.choice([1, 1, 2]),
               "experiment": rng.choice([1, 1, 2]), "cooldown": rng.choice([0, 0, 0.2]), "timeout": 3,
               "early": rng.choice(["yes", "no"]), "keep_runs": rng.choice([200, 200, 3])}
        cfg.update(fixed)
        self.cfg.update(cfg)
        self.write("smart.conf", CONF.format(**cfg))
        return cfg

    def experiment_of(self, candidates, apply_sleep=(0.0, 1.0), revert_sleep=(0.0, 0.4), target=False,
                      scale=0.5, apply_extra=None, exp_id=EXP, split=False, revert_after=None):
        """baseline + candidates; each apply writes its name to server.conf, the revert writes baseline.

        Each command sleeps a random while in all: before its write, or with split sometimes partly
        after it (a config written, then a slow reload: the box has changed before the command ends).
        """
        rng = self.rng

        def parts(low_high):
            total = round(rng.uniform(*low_high), 2)
            after = round(total * rng.choice([0.0, 0.5, 1.0]), 2) if split else 0.0
            return round(total - after, 2), after

        def command(name, label, word, before, after):
            text = f"sleep {before:.2f} && echo {name} > ../../server.conf"
            if target:
                text += f" && echo {word} > ../../target/mode"
            text += f" && echo '{label}' >> ../../order.log"
            if after:
                text += f" && sleep {after:.2f}"
            return text

        revert = parts(revert_sleep)
        if revert_after is not None:              # this share of the revert's sleep comes after its write
            total = sum(revert)
            revert = (round(total * (1 - revert_after), 2), round(total * revert_after, 2))
        sleeps = {name: parts(apply_sleep if name != "baseline" else (0.0, 0.3)) for name in ["baseline", *candidates]}
        variants = []
        for name in ["baseline", *candidates]:
            text = command(name, f"apply {name}", "cached" if name.startswith("fast") else "plain", *sleeps[name])
            if apply_extra and name != "baseline":
                text += apply_extra(name)
            variants.append((name, text))
        revert_text = command("baseline", "revert", "plain", *revert)
        if target:
            self.experiment(exp_id, variants, revert_text, target_url=self.target("plain").url)
        else:
            self.experiment(exp_id, variants, revert_text, measure_sh=MEASURE_SH.format(scale=scale))
        self.cfg.update(candidates=list(candidates), apply_sleeps={n: round(sum(v), 2) for n, v in sleeps.items()},
                        revert_sleep=round(sum(revert), 2), target=target, scale=1.0 if target else scale,
                        after_write=max([revert[1]] + [v[1] for v in sleeps.values()]))
        return variants

    def candidates(self, want_fast=None):
        rng = self.rng
        count = rng.choice([1, 2, 2, 3])
        names = []
        for i in range(1, count + 1):
            names.append(f"fast{i}" if rng.random() < 0.35 else f"v{i}")
        if want_fast and not any(n.startswith("fast") for n in names):
            names[-1] = f"fast{count}"
        return names

    def expected_seconds(self):
        """About how long the run takes when nothing stops it (for a kill uniform over its length)."""
        c = self.cfg
        scale = c["scale"]
        health = 1.0 * scale
        apply = c["apply_sleeps"]
        total = 0.4 + apply["baseline"] + health
        if c["design"] == "sequential":
            total += c["baseline"] * scale
            for name in c["candidates"]:
                total += apply[name] + (c["cooldown"] + c["experiment"]) * scale + c["revert_sleep"] + 0.1
        else:
            total += (c["warmup"] or 1.0) * scale
            for name in c["candidates"]:
                total += c["blocks"] * (apply[name] + c["revert_sleep"] + 2 * c["warmup"] * scale + 0.15)
                total += (c["baseline"] + c["experiment"]) * scale
        return total

    # -- commands --
    def spawn_run(self, label, *args):
        """smart.py ARGS in its own process group; its output in HOME/LABEL.out and LABEL.err."""
        out = open(self.path(f"{label}.out"), "w+", encoding="utf-8")
        err = open(self.path(f"{label}.err"), "w+", encoding="utf-8")
        proc = spawn_smart(self, self.home, args, clean_env(self.env()), out, err)
        proc.label, proc.started = label, time.monotonic()
        self.procs.append(proc)
        return proc

    def finished(self, proc, timeout=60):
        """Wait for a spawned command; (rc, out, err), recorded for the traceback check."""
        try:
            rc = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.problem(f"{proc.label} did not end within {timeout} s")
            os.killpg(proc.pid, signal.SIGKILL)
            rc = proc.wait(5)
        out, err = self.read(f"{proc.label}.out") or "", self.read(f"{proc.label}.err") or ""
        self.outputs.append((proc.label, rc, out, err))
        return rc, out, err

    def command(self, *args):
        rc, out, err = self.cli(*args, env=self.env())
        self.outputs.append((" ".join(args), rc, out, err))
        return rc, out, err

    def closer(self, choice):
        """`recover`, `run EXP` or `run` (the timer's pass) after a fault; checks its exit and stderr."""
        args = {"recover": ("recover",), "run EXP": ("run", EXP), "run": ("run",)}[choice]
        rc, out, err = self.command(*args)
        if rc not in (0, 1):
            self.problem(f"{choice} after the fault exited {rc}: {err.strip()[:300]!r}")
        if len(err.strip().splitlines()) > 1:
            self.problem(f"{choice} after the fault wrote {len(err.strip().splitlines())} lines on stderr: "
                         f"{err.strip()[:400]!r}")
        return rc, out, err

    # -- faults --
    def phase_now(self):
        try:
            with open(self.path("var", "state.json"), encoding="utf-8") as handle:
                return json.load(handle).get("phase")
        except (OSError, ValueError, AttributeError):
            return None

    def wait_moment(self, proc, mode, skip=0, delay=(0.0, 0.0), length=None):
        """Wait for the moment of the fault: uniform over `length` s, or `delay` after the (skip+1)-th time
        state.json's phase starts with `mode` (kept: also kept.json appearing).  The phase seen last."""
        if mode == "uniform":
            ends = proc.started + self.rng.uniform(0, length)
            wait_for(lambda: proc.poll() is not None or time.monotonic() >= ends, length + 1)
            return self.phase_now()
        wanted_delay = self.rng.uniform(*delay)
        if mode == "order":             # just after the (skip+1)-th line the run's commands add to order.log
            before = len(self.order())
            wait_for(lambda: proc.poll() is not None or len(self.order()) > before + skip, 90, 0.002)
            time.sleep(wanted_delay)
            return f"order.log line {before + skip + 1} ({self.phase_now()})"
        seen, last = 0, None
        kept_path = self.path("var", "kept.json")
        ends = time.monotonic() + 90
        while proc.poll() is None and time.monotonic() < ends:
            phase = self.phase_now()
            hit = isinstance(phase, str) and phase.startswith(mode)
            if mode == "kept" and not hit and os.path.exists(kept_path):
                phase, hit = "kept.json written", True
            if hit and phase != last:
                if seen >= skip:
                    time.sleep(wanted_delay)
                    return phase
                seen += 1
            last = phase if hit else None
            time.sleep(0.003)
        return self.phase_now()

    def kill(self, proc, sig=signal.SIGKILL, group=False):
        alive = proc.poll() is None
        try:
            (os.killpg if group else os.kill)(proc.pid, sig)
        except ProcessLookupError:
            alive = False
        return alive

    def wait_orphans(self, timeout):
        """Wait until no process of the trial lives (orphaned applies, their children, measure.sh)."""
        left = wait_for(lambda: not trial_pids(self.token), timeout, 0.05)
        if not left:
            pids = trial_pids(self.token)
            self.problem(f"processes still alive {timeout:.1f} s later: "
                         + "; ".join(f"{pid} {cmd[:80]}" for pid, cmd in pids.items()))
            kill_trial_processes(self.token)

    # -- what is left --
    def problem(self, text):
        self.problems.append(text)

    def json_file(self, name):
        """(value, None) or (None, why) for var/NAME."""
        path = self.path("var", name)
        try:
            with open(path, encoding="utf-8") as handle:
                return json.load(handle), None
        except FileNotFoundError:
            return None, "missing"
        except (OSError, ValueError) as exc:
            return None, str(exc)

    def history_lines(self):
        """(entries, damaged lines) of var/history.jsonl."""
        try:
            with open(self.path("var", "history.jsonl"), encoding="utf-8", errors="replace") as handle:
                text = handle.read()
        except FileNotFoundError:
            return [], []
        entries, damaged = [], []
        for line in text.splitlines():
            if not line.strip():
                continue
            try:
                entries.append(json.loads(line))
            except ValueError:
                damaged.append(line[:120])
        return entries, damaged

    def kept_entry(self):
        kept, why = self.json_file("kept.json")
        if why not in (None, "missing"):
            self.problem(f"var/kept.json unreadable after the fault: {why}")
            return None
        entry = (kept or {}).get(EXP)
        return entry if isinstance(entry, dict) else None

    def check_consistent(self, after="recovery", killed=False):
        """The promise: server.conf is the baseline, or exactly the variant kept.json names; the records agree."""
        conf = self.server()
        kept = self.kept_entry()
        if os.path.exists(self.journal()):
            self.problem(f"var/applied.json left after {after}: {self.read('var/applied.json')!r}"[:300])
        if kept:
            if conf != kept.get("variant"):
                self.problem(f"kept.json names {kept.get('variant')} (run {kept.get('run_id')}) but server.conf "
                             f"is {conf!r}")
        elif conf not in ("baseline", "original"):
            self.problem(f"server.conf is {conf!r}, a variant that was not kept (kept.json names none)")
        state, why = self.json_file("state.json")
        if why == "missing":
            if conf != "original":
                self.problem("no var/state.json, yet something was applied")
        elif why is not None or not isinstance(state, dict):
            self.problem(f"var/state.json unreadable after {after}: {why or type(state).__name__}")
            state = None
        entries, damaged = self.history_lines()
        if damaged:
            self.problem(f"history.jsonl has {len(damaged)} damaged line(s): {damaged[0]!r}")
        by_run = {}
        for entry in entries:
            by_run.setdefault(entry.get("run_id"), []).append(entry)
        if state is not None:
            if state.get("status") == "running":
                self.problem(f"state.json of run {state.get('run_id')} still says running (phase {state.get('phase')})")
            if state.get("kept_variant") and (not kept or kept.get("variant") != state["kept_variant"]):
                # what that run kept, reverted since (`revert EXP`, or `run EXP` reverting it first, does the
                # same): the box must be on its baseline then, which the server.conf check above sees to
                self.notes.append(f"state.json's run {state.get('run_id')} kept {state['kept_variant']}, "
                                  f"since reverted (kept.json: {kept and kept.get('variant')})")
            if kept and state.get("run_id") == kept.get("run_id") and state.get("kept_variant") != kept.get("variant"):
                self.problem(f"kept.json names {kept.get('variant')} from run {kept.get('run_id')}; that run's "
                             f"state.json says kept {state.get('kept_variant')}")
            if state.get("run_id") and state.get("status") in ("done", "failed", "interrupted") \
                    and state.get("phase") in ("finished", "recovered") and not by_run.get(state["run_id"]):
                self.problem(f"run {state['run_id']} ({state.get('status')}) has no line in history.jsonl")
        if kept:
            lines = by_run.get(kept.get("run_id"), [])
            if not any(line.get("kept_variant") == kept.get("variant") for line in lines):
                self.problem(f"kept.json names {kept.get('variant')} from run {kept.get('run_id')}, but history.jsonl "
                             f"has {[(l.get('status'), l.get('kept_variant')) for l in lines]} for that run")
        for run_id, lines in by_run.items():
            if len(lines) > 1:
                self.problem(f"run {run_id} has {len(lines)} lines in history.jsonl: "
                             f"{[l.get('status') for l in lines]}")
        for run_id in self.run_ids():
            if run_id not in by_run:
                self.problem(f"run folder {run_id} has no line in history.jsonl (a lost record)")
        leftovers = []
        if os.path.isdir(self.var):
            leftovers = [n for n in os.listdir(self.var) if n.endswith(".tmp")]
        if leftovers:
            # a SIGKILL between mkstemp and the rename leaves one: harmless (a dot file), nothing sweeps it
            (self.notes.append if killed else self.problem)(f"temp files left in var/: {leftovers}")

    def check_status(self):
        """`status` exits 0, or 1 naming what needs attention; no traceback."""
        rc, out, err = self.command("status")
        attention = out.split("Needs attention", 1)[1].split("Recent runs", 1)[0].strip() if "Needs attention" in out \
            else ""
        if rc == 1:
            if not attention or attention == "nothing":
                self.problem(f"status exited 1 naming nothing: {out[-300:]!r}")
            else:
                self.notes.append(f"status: {attention[:200]}")
        elif rc != 0:
            self.problem(f"status exited {rc}: {err.strip()[:200]!r}")
        return rc, attention

    def check_outputs(self):
        for label, rc, out, err in self.outputs:
            if "Traceback" in out + err:
                self.problem(f"a traceback from {label} (rc {rc}): {(err or out)[-600:]!r}")

    def run_logs(self, lines=14):
        """The tail of every run.log of the home, for a failure's report."""
        text = []
        for run_id in self.run_ids():
            log = self.read(os.path.join("var", "runs", run_id, "run.log"))
            if log:
                tail = log.strip().splitlines()[-lines:]
                text.append(f"    run.log {run_id}:\n" + "\n".join("      " + line[:220] for line in tail))
        return "\n".join(text)

    def finish(self):
        """Clean up (processes by pid, mounts, the home); the home stays for a look when asked."""
        self.check_outputs()
        kill_trial_processes(self.token)
        report = None
        if self.problems:
            try:
                order = " | ".join(self.order()[-16:])
            except OSError:
                order = "?"
            report = (f"{self.kind} #{self.index} (seed {SEED}) cfg {json.dumps(self.cfg, sort_keys=True)}\n"
                      f"  notes: {'; '.join(self.notes)}\n  order.log tail: {order}\n"
                      f"  server.conf: {self.server()!r}\n{self.run_logs()}")
        if KEEP_FAILED and self.problems:
            kept_home = tempfile.mkdtemp(prefix=f"smart-fault-{self.kind}-{self.index}-")
            with_copy = subprocess.run(["cp", "-a", self.home + "/.", kept_home], capture_output=True)
            self.notes.append(f"home kept in {kept_home} ({with_copy.returncode})")
            report += f"\n  home copied to {kept_home}"
        self.doCleanups()
        return report


# ---------------------------------------------------------------------------------------------
# the trials


def trial_sigkill(t: Trial):
    rng = t.rng
    scenario = rng.choice(["fresh", "fresh", "fresh", "fresh", "settled", "settled", "revert", "apply", "recheck"])
    mode = rng.choice(["uniform", "uniform", "uniform", "applying", "applying", "reverting", "kept", "order",
                       "order"])
    settled = scenario in ("settled", "revert", "recheck")
    if settled and rng.random() < 0.6:
        mode = "order"                           # the first line: the kept variant's revert, run with no journal
    target = rng.random() < 0.25
    t.settings()
    names = t.candidates(want_fast=mode == "kept" or scenario != "fresh")
    t.experiment_of(names, target=target, split=True,
                    **({"revert_sleep": (0.2, 0.6), "revert_after": rng.choice([0.5, 1.0])} if settled else {}))
    group = rng.random() < 0.3
    closer = rng.choice(["recover", "recover", "run EXP", "run"])
    double = rng.random() < 0.15
    skip = rng.choice([0, 0, 1, 2]) if mode != "kept" and not settled else 0
    length = t.expected_seconds() * 1.1
    args = ("run", EXP)
    if settled:                                  # a kept variant: `run EXP` and `revert EXP` revert it first
        rc, out, err = t.command("run", EXP)
        kept = t.kept_entry()
        t.notes.append(f"settled first: rc {rc}, kept {kept and kept.get('variant')}")
        if scenario == "revert":
            args = ("revert", EXP)
            length = 0.4 + t.cfg["revert_sleep"] + 0.3
        elif scenario == "recheck":              # the kept variant taken back, reverted, measured, kept or not
            args = ("recheck", EXP)
    elif scenario == "apply":                    # `apply EXP VARIANT`: baseline, the variant, keep unless harm
        args = ("apply", EXP, rng.choice(names))
        length = 0.4 + 2 * 1.0 * t.cfg["scale"] + t.cfg["warmup"] * t.cfg["scale"] + 2.5
    t.cfg.update(scenario=scenario, args=args, mode=mode, group=group, closer=closer, double=double, skip=skip,
                 length=round(length, 2))
    proc = t.spawn_run("killed", *args)
    delay = {"applying": (0, 1.05), "reverting": (0, t.cfg["revert_sleep"] + 0.05), "kept": (0, 0.02),
             "order": (0, t.cfg["after_write"] + 0.05)}
    phase = t.wait_moment(proc, mode, skip, delay.get(mode, (0, 0)), length)
    t.landed = t.kill(proc, signal.SIGKILL, group)
    t.hit = phase_kind(phase) if t.landed else "after the end"
    rc, out, err = t.finished(proc, 10)
    t.notes.append(f"{' '.join(args[:1])} killed at phase {phase!r} (rc {rc}, "
                   f"{'landed' if t.landed else 'run had ended'}), server.conf {t.server()!r}")
    if rc not in (0, 1, -signal.SIGKILL):
        t.problem(f"the run exited {rc} before the kill: {err.strip()[:300]!r}")
    if double:
        second = t.spawn_run("closer", *({"recover": ("recover",), "run EXP": ("run", EXP), "run": ("run",)}[closer]))
        time.sleep(rng.uniform(0.0, 1.2))
        hit = t.kill(second)
        t.finished(second, 10)
        t.notes.append(f"closer {closer} killed too ({'landed' if hit else 'it had ended'})")
        closer = "recover"
    t.closer(closer)
    t.wait_orphans(4.0)
    t.check_consistent(f"SIGKILL and {closer}", killed=True)
    t.check_status()


def trial_sigterm(t: Trial):
    rng = t.rng
    mode = rng.choice(["uniform", "uniform", "uniform", "starting", "applying", "reverting", "measuring",
                       "kept"])
    target = rng.random() < 0.25
    t.settings()
    t.experiment_of(t.candidates(want_fast=mode == "kept"), target=target, split=True)
    length = t.expected_seconds() * 1.1
    skip = rng.choice([0, 0, 1]) if mode != "kept" else 0
    t.cfg.update(mode=mode, skip=skip, length=round(length, 2))
    proc = t.spawn_run("termed", "run", EXP)
    if mode == "starting":
        time.sleep(rng.uniform(0.05, 0.6))
        phase = t.phase_now()
    else:
        delay = {"applying": (0, 1.0), "reverting": (0, t.cfg["revert_sleep"]), "measuring": (0, 0.5),
                 "kept": (0, 0.02)}
        phase = t.wait_moment(proc, mode, skip, delay.get(mode, (0, 0)), length)
    caught = catches(proc.pid, signal.SIGTERM)
    sent, sent_wall = time.monotonic(), time.time()
    t.landed = t.kill(proc, signal.SIGTERM)
    t.hit = (phase_kind(phase) if caught else "before the handler") if t.landed else "after the end"
    rc, out, err = t.finished(proc, 15)
    took = time.monotonic() - sent
    t.notes.append(f"SIGTERM at phase {phase!r}: rc {rc} after {took:.2f} s")
    state, why = t.json_file("state.json")
    state = state if isinstance(state, dict) else {}
    lines = err.strip().splitlines()
    ours = state.get("pid") == proc.pid           # the run had written its first state.json
    tried = [v.get("name") for v in state.get("variants") or []]
    decided_at = None
    if ours and tried:
        with_log = os.path.join(t.var, "runs", str(state.get("run_id")), f"{tried[-1]}_decision.log")
        decided_at = os.path.getmtime(with_log) if os.path.exists(with_log) else None
    if t.landed and rc == 0:
        # the work was over: finished, kept, or the last variant decided (what is left is its revert,
        # which an interrupt would do too), however stale the phase read just before the signal
        late = phase == "finished" or str(phase).startswith("kept") or state.get("kept_variant") \
            or (tried and phase == f"reverting {tried[-1]}") \
            or (decided_at is not None and decided_at <= sent_wall + 0.05)
        if not (ours and state.get("status") == "done" and late):
            t.problem(f"SIGTERM at phase {phase!r} and the run exited 0 (state {state.get('status')}, "
                      f"phase {state.get('phase')})")
        else:
            t.notes.append("the SIGTERM came after the work: exit 0, done")
    elif t.landed and rc == -signal.SIGTERM and not caught:
        # no handler: sent before smart.py's first line installed one (the interpreter still compiling
        # it), or after the work, while the interpreter shuts down (CPython resets handlers to SIG_DFL)
        if ours and state.get("status") == "done" and state.get("phase") == "finished":
            t.notes.append("the SIGTERM came as the finished run's interpreter shut down: killed, work done")
        elif t.order() or os.path.exists(t.path("var")):
            t.problem(f"killed by a SIGTERM it did not catch, yet var/ or order.log exist: {t.order()}")
        else:
            t.notes.append("the SIGTERM came before smart.py caught it: killed by Python's default action")
    elif t.landed and rc != 1:
        t.problem(f"SIGTERM: exit code {rc}, not 1 (its handler was {'installed' if caught else 'not installed'})")
    if t.landed and took > 5.0:
        t.problem(f"the run took {took:.1f} s to act on SIGTERM")
    if t.landed and rc == 1:
        if len(lines) != 1:
            t.problem(f"SIGTERM: {len(lines)} lines on stderr, not one: {err.strip()[:400]!r}")
        elif "SIGTERM" not in lines[0]:
            t.problem(f"SIGTERM: the error line does not say so: {lines[0][:300]!r}")
        if not ours:
            if t.server() != "original" or t.order():
                t.problem(f"SIGTERM before the run's first state.json, yet order.log says {t.order()}")
        elif state.get("status") != "interrupted":
            t.problem(f"SIGTERM: state.json says {state.get('status')} (phase {state.get('phase')}), not interrupted")
        elif "SIGTERM" not in str(state.get("reason")):
            t.problem(f"SIGTERM: state.json's reason does not say so: {state.get('reason')!r}")
        else:
            entries, _ = t.history_lines()
            if not entries or entries[-1].get("run_id") != state.get("run_id") \
                    or entries[-1].get("status") != "interrupted":
                t.problem(f"SIGTERM: the last history line is not the interrupted run: {entries[-1:]!r}"[:300])
    t.wait_orphans(2.0)
    t.check_consistent("SIGTERM")
    t.check_status()


def trial_apply_kill(t: Trial):
    rng = t.rng
    t.settings()
    names = [f"v{i}" for i in range(1, rng.choice([1, 2, 2]) + 1)]
    later = {}

    def children(name):
        duration = round(rng.uniform(0.2, 1.5), 2)
        write_at = round(rng.uniform(0.05, duration), 2)
        late = round(duration + rng.uniform(0.2, 1.0), 2)
        later[name] = (duration, write_at, late)
        child = f"sleep {late:.2f}; echo {name} > ../../server.conf; echo 'late {name}' >> ../../order.log"
        how = rng.choice(["plain", "double", "nohup"])
        spawn = {"plain": f"({child}) >/dev/null 2>&1 &",
                 "double": f"( ({child}) >/dev/null 2>&1 & );",
                 "nohup": f"nohup sh -c \"{child}\" >/dev/null 2>&1 &"}[how]
        # the apply's own write comes at write_at, it ends at duration; the child writes again at late
        return f"; {spawn} sleep {max(0.0, duration - write_at):.2f}"

    t.experiment_of(names, apply_sleep=(0, 0), revert_sleep=(0.0, 0.2), apply_extra=children)
    # each variant's apply: sleep write_at, write, spawn the child, sleep the rest
    meta_path = t.path("experiments", EXP, "meta.json")
    with open(meta_path, encoding="utf-8") as handle:
        meta = json.load(handle)
    for variant in meta["variants"]:
        if variant["name"] in later:
            variant["apply"] = variant["apply"].replace("sleep 0.00 &&", f"sleep {later[variant['name']][1]:.2f} &&", 1)
    with open(meta_path, "w", encoding="utf-8") as handle:
        json.dump(meta, handle, indent=2)
    victim = rng.choice(names)
    duration = later[victim][0]
    group = rng.random() < 0.3
    closer = rng.choice(["recover", "recover", "recover", "run EXP", "run"])
    skip = rng.choice([0, 0, 1]) if t.cfg["design"] == "switchback" else 0
    t.cfg.update(victim=victim, later=later, group=group, closer=closer, skip=skip)
    proc = t.spawn_run("killed", "run", EXP)
    phase = t.wait_moment(proc, f"applying {victim}", skip, (0.0, duration * 0.95))
    t.landed = t.kill(proc, signal.SIGKILL, group)
    t.hit = phase_kind(phase) if t.landed else "after the end"
    rc, out, err = t.finished(proc, 10)
    t.notes.append(f"killed at phase {phase!r} (rc {rc}), server.conf {t.server()!r}")
    t.closer(closer)
    t.wait_orphans(max(v[2] for v in later.values()) + 2.5)
    time.sleep(0.2)
    if t.server() not in ("baseline", "original"):
        t.problem(f"server.conf is {t.server()!r} after {closer} and a wait: an orphaned apply or its child wrote it")
    order = t.order()
    if any(line.startswith("late ") for line in order):
        # an orphan's child may write before recovery reverts (between the kill and the closer), never after
        last_revert = max((i for i, line in enumerate(order) if line == "revert"), default=-1)
        after = [line for line in order[last_revert + 1:] if line.startswith("late ")]
        if after:
            t.problem("an apply's background child wrote after the last revert: " + ", ".join(after))
        else:
            t.notes.append("a child of the orphaned apply wrote before recovery reverted it")
    if any("Syntax error" in (t.read(os.path.join("var", "runs", r, "run.log")) or "") for r in t.run_ids()):
        t.problem("the trial's apply command is not valid sh (a fault of this test)")
    t.check_consistent(f"SIGKILL in an apply and {closer}", killed=True)
    t.check_status()


# -- a full disk --

def mount_tmpfs(t: Trial, size):
    if os.geteuid() != 0 or not shutil.which("mount"):
        raise unittest.SkipTest("a tmpfs needs root and mount(8)")
    os.makedirs(t.var, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", t.var], capture_output=True,
                          text=True)
    if done.returncode != 0:
        raise unittest.SkipTest(f"mount -t tmpfs is not allowed here: {done.stderr.strip()}")
    t.addCleanup(subprocess.run, ["umount", "-l", t.var], capture_output=True)


def fill(path, leave_pages):
    """Fill the file system of path's folder, then give back leave_pages pages (4 KiB)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    chunk = b"\0" * 4096
    try:
        while os.write(fd, chunk) > 0:
            pass
    except OSError:
        pass
    finally:
        os.close(fd)
    size = os.path.getsize(path)
    os.truncate(path, max(0, size - leave_pages * 4096))


FILL_SH = (" && {{ dd if=/dev/zero of=../../var/fill bs=4k 2>/dev/null; "
           "truncate -s -{leave}K ../../var/fill 2>/dev/null; true; }}")


def trial_disk(t: Trial):
    rng = t.rng
    size = rng.choice(["192k", "256k", "384k"])
    how = rng.choice(["apply", "apply", "thread", "thread", "before", "keep", "keep"])
    leave = rng.choice([0, 0, 1, 2, 3, 4, 6, 8])
    closer = rng.choice(["recover", "run EXP", "run"])
    mount_tmpfs(t, size)
    t.settings(experiment=1, baseline=1, **({"design": "sequential"} if how == "keep" else {}))
    names = t.candidates(want_fast=how == "keep")
    filler_name = rng.choice(names)
    extra = (lambda name: FILL_SH.format(leave=leave * 4) if name == filler_name else "") if how == "apply" else None
    t.experiment_of(names, apply_sleep=(0.0, 0.3), revert_sleep=(0.0, 0.1), apply_extra=extra)
    t.cfg.update(size=size, how=how, leave=leave, closer=closer, filler=filler_name if how == "apply" else None)
    fill_path = t.path("var", "fill")
    if how == "before":
        fill(fill_path, leave)
    if how == "keep":
        t.write("fill.trigger", f"{leave * 4}\n")
    proc = t.spawn_run("full", "run", EXP)
    filler = None
    if how == "thread":
        at = rng.uniform(0, t.expected_seconds())
        t.cfg["fill_at"] = round(at, 2)
        filler = threading.Timer(at, fill, (fill_path, leave))
        filler.start()
        t.addCleanup(filler.cancel)
    rc, out, err = t.finished(proc, 60)
    if filler is not None:
        filler.join(5)
    filled = os.path.exists(fill_path)
    t.landed = filled
    t.hit = f"{how}, leaving {leave} pages" if filled else "never filled"
    t.notes.append(f"run rc {rc}, disk {'filled' if filled else 'never filled'}; stderr {err.strip()[:300]!r}")
    if rc not in (0, 1):
        t.problem(f"the run on a full disk exited {rc}")
    lines = err.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    if rc == 1:
        if len(lines) != 1:
            t.problem(f"{len(lines)} lines on stderr, not one: {err.strip()[:500]!r}")
        if len(errors) != 1:
            t.problem(f"{len(errors)} error lines on stderr: {err.strip()[:300]!r}")
        elif "No space left on device" not in errors[0]:
            t.problem(f"the error line does not say the disk is full: {errors[0][:300]!r}")
        elif not re.search(r"(/var\b|var/|\.json|\.jsonl|\.csv|\.log|runs)", errors[0]):
            t.problem(f"the error line does not say what could not be written: {errors[0][:300]!r}")
    conf, kept = t.server(), t.kept_entry()
    if kept and conf != kept.get("variant"):
        t.problem(f"on the full disk: kept.json names {kept.get('variant')} but server.conf is {conf!r}")
    elif not kept and conf not in ("baseline", "original"):
        t.problem(f"on the full disk: server.conf is {conf!r}, not kept")
    if os.path.exists(t.journal()):
        t.problem("var/applied.json left after the run on a full disk")
    t.wait_orphans(2.0)
    with_space = os.path.exists(fill_path)
    if with_space:
        os.unlink(fill_path)
    t.closer(closer)
    t.check_consistent(f"the full disk and {closer}")
    t.check_status()


# -- corrupt var/ files --

CORRUPTIONS = ("garbage", "truncated", "[]", "{}", "folder", "symlink")
FILES = ("state.json", "kept.json", "applied.json", "history.jsonl", "lock", "runs")


class Template:
    """A home after one real run that kept fast1 (made once, copied into each corrupt trial)."""
    lock = threading.Lock()
    home = None

    @classmethod
    def get(cls):
        with cls.lock:
            if cls.home is None:
                t = Trial("template", 0)
                t.start()
                t.settings(design="sequential", early="no", keep_runs=3, baseline=1, experiment=1, warmup=0,
                           cooldown=0)
                t.experiment_of(["fast1", "v2"], apply_sleep=(0, 0), revert_sleep=(0, 0), scale=0)
                rc, out, err = t.command("run", EXP)
                if rc != 0 or t.server() != "fast1":
                    raise AssertionError(f"the template run did not keep fast1: rc {rc} {err!r}")
                cls.home = tempfile.mkdtemp(prefix="smart-fault-template-")
                shutil.copytree(t.home, cls.home, dirs_exist_ok=True)
                cls.origin = t.home
                t.doCleanups()
        return cls.home


def copy_template(t: Trial):
    template = Template.get()
    shutil.rmtree(t.home)
    shutil.copytree(template, t.home, symlinks=True)
    for name in ("state.json", "kept.json", "history.jsonl", "history.json"):
        path = t.path("var", name)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as handle:
                text = handle.read()
            with open(path, "w", encoding="utf-8") as handle:
                handle.write(text.replace(Template.origin, t.home))


def corrupt(t: Trial, name, how):
    """Damage var/NAME; returns the outside files/folders a symlink points at (to check they stay as they were)."""
    rng = t.rng
    path = t.path("var", name)
    outside = tempfile.mkdtemp(prefix="smart-fault-outside-")
    t.addCleanup(shutil.rmtree, outside, True)
    watched = {}
    if name == "runs":
        if how == "symlink":
            for sub in ("20200101T000000", "20200101T000001", "precious"):
                os.makedirs(os.path.join(outside, sub))
                with open(os.path.join(outside, sub, "keep.txt"), "w", encoding="utf-8") as handle:
                    handle.write("precious\n")
            shutil.rmtree(path)
            os.symlink(outside, path)
            watched[outside] = None
        elif how == "folder":
            for run_id in os.listdir(path):
                log = os.path.join(path, run_id, "run.log")
                if os.path.isfile(log):
                    os.unlink(log)
                    os.makedirs(os.path.join(log, "x"))
            os.makedirs(os.path.join(path, "not-a-run", "junk"))
        elif how == "truncated":
            for run_id in os.listdir(path):
                for entry in os.listdir(os.path.join(path, run_id)):
                    file = os.path.join(path, run_id, entry)
                    os.truncate(file, os.path.getsize(file) // 2)
        else:
            shutil.rmtree(path)
            with open(path, "wb") as handle:
                handle.write(os.urandom(rng.randint(1, 300)) if how == "garbage" else how.encode())
        return watched
    if name == "applied.json":
        journal = {"run_id": "20261201T000000", "experiment": EXP, "path": t.path("experiments", EXP),
                   "variant": "v2", "revert": "echo baseline > ../../server.conf && echo revert >> ../../order.log",
                   "pid": 999999, "in_flight": None, "written_at": "2026-12-01T00:00:00Z"}
        t.write("var/applied.json", json.dumps(journal))
        t.write("var/kept.json", "{}\n")
        t.write("server.conf", "v2\n")           # what the crashed run left applied
    if name == "lock":
        t.write("var/lock", "4242\n")
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    text = b""
    if os.path.isfile(path):
        with open(path, "rb") as handle:
            text = handle.read()
    if how == "garbage":
        data = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 400)))
        if rng.random() < 0.5:
            data = text[: len(text) // 2] + data
        with open(path, "wb") as handle:
            handle.write(data)
    elif how == "truncated":
        with open(path, "wb") as handle:
            handle.write(text[: rng.randint(0, max(0, len(text) - 1))])
    elif how in ("[]", "{}"):
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(how + "\n")
    elif how == "folder":
        if os.path.exists(path):
            os.unlink(path)
        os.makedirs(os.path.join(path, "inner"))
    elif how == "symlink":
        target = os.path.join(outside, "elsewhere")
        with open(target, "wb") as handle:
            handle.write(text or b'{"precious": true}\n')        # valid content: following it would be tempting
        if os.path.exists(path):
            os.unlink(path)
        os.symlink(target, path)
        watched[target] = None
    return watched


def read_bytes(path):
    with open(path, "rb") as handle:
        return handle.read()


def snapshot(path):
    """What a watched outside file or folder holds now."""
    if os.path.isdir(path):
        found = {}
        for root, dirs, files in os.walk(path):
            for entry in dirs + files:
                full = os.path.join(root, entry)
                found[os.path.relpath(full, path)] = read_bytes(full) if os.path.isfile(full) else None
        return found
    with open(path, "rb") as handle:
        return handle.read()


def unreadable(t: Trial):
    """Which of the journal and kept.json smart itself cannot read soundly (it must then apply nothing)."""
    home = smart.Home(t.home)
    bad = []
    for name, reader in (("applied.json", smart.read_journal), ("kept.json", smart.read_kept)):
        try:
            reader(home)
        except smart.SmartError:
            bad.append(name)
        except OSError:
            bad.append(name)
    return bad


def trial_corrupt(t: Trial, name, how):
    rng = t.rng
    copy_template(t)
    t.cfg.update(file=name, corruption=how)
    t.hit = name
    watched = corrupt(t, name, how)
    for path in watched:
        watched[path] = snapshot(path)
    commands = [("run", EXP), ("run",), ("recover",), ("status",), ("doctor",), ("dashboard",)]
    rng.shuffle(commands)
    t.cfg["commands"] = [" ".join(c) for c in commands]
    for args in commands:
        label = " ".join(args)
        before_order, before_conf, bad = len(t.order()), t.server(), unreadable(t)
        rc, out, err = t.command(*args)
        lines = err.strip().splitlines()
        if rc not in (0, 1, 2):
            t.problem(f"{label}: exit code {rc}")
        if len(lines) > 1:
            t.problem(f"{label}: {len(lines)} lines on stderr: {err.strip()[:400]!r}")
        if rc != 0 and args[0] not in ("status", "doctor"):
            if not lines:
                t.problem(f"{label}: exit {rc} with nothing on stderr")
            elif name not in lines[0] and name.split(".")[0] not in lines[0]:
                t.notes.append(f"{label}: error line does not name {name}: {lines[0][:200]!r}")
        new = t.order()[before_order:]
        if bad:
            if any(line.startswith("apply") for line in new) or t.server() != before_conf:
                t.problem(f"{label} applied {new} while {' and '.join(bad)} could not be read")
            if args[0] == "status" and (rc != 1 or not any(b in out for b in bad)):
                t.problem(f"status with {' and '.join(bad)} unreadable exited {rc} without naming it")
        elif args[0] == "run" and name != "applied.json" and (name, how) != ("kept.json", "{}"):
            # ({} in kept.json is a sound file that forgets fast1: the box on fast1 is the damage itself)
            kept = t.kept_entry()
            conf = t.server()
            if (kept and conf != kept.get("variant")) or (not kept and conf not in ("baseline", "original")):
                t.problem(f"{label}: server.conf {conf!r}, kept.json {kept and kept.get('variant')}")
        t.notes.append(f"{label}: rc {rc}" + (f" {lines[0][:120]!r}" if lines else ""))
    for path, before in watched.items():
        after = snapshot(path)
        if after != before:
            if isinstance(before, dict):
                added = sorted(set(after) - set(before))
                removed = sorted(set(before) - set(after))
                t.problem(f"the symlink's target {path} was changed through var/{name}: added {added[:8]}, "
                          f"removed {removed[:8]}")
            else:
                t.problem(f"the symlink's target {path} was changed through var/{name}: {before[:60]!r} -> "
                          f"{after[:60]!r}")


# ---------------------------------------------------------------------------------------------


class FaultInjection(unittest.TestCase):
    """One test per kind of fault; one subTest per trial; the table at the end."""

    table = {}
    started = None

    @classmethod
    def setUpClass(cls):
        cls.started = time.monotonic()
        print(f"\ntest_faults: seed {SEED} (SMART_FAULT_SEED overrides), {WORKERS} trials at once", file=sys.stderr)

    @classmethod
    def tearDownClass(cls):
        if Template.home:
            shutil.rmtree(Template.home, ignore_errors=True)
        lines = [f"\ntest_faults: seed {SEED}, {time.monotonic() - cls.started:.0f} s",
                 f"  {'kind':<12}{'trials':>7}{'survivors':>10}{'landed':>8}{'s/trial':>9}{'wall s':>8}"]
        for kind in COUNTS:
            if kind not in cls.table:
                continue
            row = cls.table[kind]
            lines.append(f"  {kind:<12}{row['trials']:>7}{row['survivors']:>10}{row['landed']:>8}"
                         f"{row['seconds'] / max(1, row['trials']):>9.1f}{row['wall']:>8.0f}")
        for kind in COUNTS:
            if kind in cls.table:
                hits = sorted(cls.table[kind]["hits"].items(), key=lambda kv: (-kv[1], str(kv[0])))
                lines.append(f"  {kind} hit: " + ", ".join(f"{name} {n}" for name, n in hits))
        total = sum(r["trials"] for r in cls.table.values())
        alive = sum(r["survivors"] for r in cls.table.values())
        lines.append(f"  {'total':<12}{total:>7}{alive:>10}")
        for kind, row in cls.table.items():
            for index, problems in row["failures"]:
                lines.append(f"  FAILED {kind} #{index} (SMART_FAULT_SEED={SEED} SMART_FAULT_ONLY={kind}:{index}): "
                             + " | ".join(p[:300] for p in problems))
        lines.append("  (landed: trials whose fault hit a live run / filled the disk)")
        print("\n".join(lines), file=sys.stderr)

    def run_kind(self, kind, body, params=None):
        """Run COUNTS[kind] trials (WORKERS at once), then report each as a subTest."""
        indexes = range(COUNTS[kind])
        if ONLY is not None:
            if kind not in ONLY:
                self.skipTest(f"SMART_FAULT_ONLY leaves out {kind}")
            if ONLY[kind] is not None:
                indexes = sorted(ONLY[kind])

        def one(index):
            began = time.monotonic()
            t = Trial(kind, index)
            try:
                t.start()
                body(t, *(params[index] if params else ()))
            except unittest.SkipTest:
                t.doCleanups()
                raise
            except Exception:          # the harness itself failed: that trial is reported, not the rest lost
                t.problem("the trial raised: " + traceback.format_exc()[-1500:])
            report = t.finish()
            if VERBOSE:
                print(f"  [{kind} #{index}] {'ok' if not t.problems else 'FAILED'} hit {t.hit}; "
                      + "; ".join(t.notes)[:700], file=sys.stderr)
            return index, t.problems, report, t.landed, time.monotonic() - began, t.hit

        kind_began = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(WORKERS) as pool:
            futures = [pool.submit(one, index) for index in indexes]
            outcomes = []
            for future in futures:
                try:
                    outcomes.append(future.result())
                except unittest.SkipTest as exc:
                    for other in futures:
                        other.cancel()
                    self.skipTest(str(exc))
        row = {"trials": 0, "survivors": 0, "landed": 0, "failures": [], "seconds": 0.0, "wall": 0.0, "hits": {}}
        self.table[kind] = row
        row["wall"] = time.monotonic() - kind_began
        for index, problems, report, landed, seconds, hit in sorted(outcomes, key=lambda o: o[0]):
            row["hits"][hit] = row["hits"].get(hit, 0) + 1
            row["trials"] += 1
            row["seconds"] += seconds
            row["landed"] += bool(landed)
            row["survivors"] += not problems
            if problems:
                row["failures"].append((index, problems))
            with self.subTest(kind=kind, trial=index):
                if problems:
                    self.fail("\n  - ".join([f"{kind} trial {index} (seed {SEED}):", *problems]) + "\n" + report)

    def test_1_sigkill_then_recover_or_next_run(self):
        self.run_kind("sigkill", trial_sigkill)

    def test_2_sigterm_at_a_random_moment(self):
        self.run_kind("sigterm", trial_sigterm)

    def test_3_sigkill_inside_an_apply(self):
        self.run_kind("apply-kill", trial_apply_kill)

    def test_4_full_disk(self):
        self.run_kind("disk", trial_disk)

    def test_5_corrupt_var_files(self):
        pairs = [(name, how) for name in FILES for how in CORRUPTIONS]
        params = [pairs[i % len(pairs)] for i in range(COUNTS["corrupt"])]
        self.run_kind("corrupt", trial_corrupt, params)


if __name__ == "__main__":
    unittest.main()
