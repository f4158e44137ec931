"""Shared helpers for the smart.py tests (stdlib only).

import_smart()  puts the repository root on sys.path and imports smart.py.
write_csv()     writes a measurement CSV (SPEC.md "Measurement CSV").
run_cli()       runs `python3 smart.py ...` as a subprocess and returns (rc, stdout, stderr).
"""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(TESTS_DIR)
SMART_PY = os.path.join(REPO_ROOT, "smart.py")

HEADER = "timestamp,latency_ms,response_code"
CLI_TIMEOUT = 60

# Settings and variables that would make a subprocess depend on the caller's environment.
_SETTING_KEYS = (
    "BASELINE_SECONDS", "EXPERIMENT_SECONDS", "COOLDOWN_SECONDS", "IMPROVE_PCT",
    "MAX_ERR_DELTA_PCT", "CONFIDENCE", "MIN_SAMPLES", "MAX_TAIL_REGRESS_PCT",
    "COMMAND_TIMEOUT_SECONDS", "KEEP_RUNS", "PHONE_HOME", "PHONE_HOME_URL", "PHONE_HOME_TOKEN",
    "SMART_HOME",
)


def import_smart():
    """Put the repository root first on sys.path and return the imported smart module."""
    if REPO_ROOT not in sys.path:
        sys.path.insert(0, REPO_ROOT)
    return importlib.import_module("smart")


def _format_row(row) -> str:
    if isinstance(row, str):
        return row
    return ",".join(str(field) for field in row)


def write_csv(path, rows, header=True, block=False, newline_at_end=True) -> str:
    """Write a measurement CSV; rows are tuples (timestamp, latency_ms, code[, block]) or raw lines.

    header=True writes `timestamp,latency_ms,response_code` (plus `,block` when block=True).
    newline_at_end=False leaves the last line without its newline.
    """
    lines = []
    if header:
        lines.append(HEADER + (",block" if block else ""))
    lines.extend(_format_row(row) for row in rows)
    text = "\n".join(lines)
    if lines and newline_at_end:
        text += "\n"
    with open(path, "w", encoding="utf-8", newline="") as handle:
        handle.write(text)
    return path


def rows_from(latencies, codes=None, start=1764274326.0, step=0.5, blocks=None):
    """Rows (epoch timestamp, latency, code[, block]) for write_csv."""
    rows = []
    for i, latency in enumerate(latencies):
        code = 200 if codes is None else codes[i]
        row = (f"{start + i * step:.3f}", repr(float(latency)), code)
        if blocks is not None:
            row += (blocks[i],)
        rows.append(row)
    return rows


def clean_env(extra=None) -> dict:
    """os.environ without any smart setting or SMART_HOME, updated with `extra`."""
    env = {key: value for key, value in os.environ.items() if key not in _SETTING_KEYS}
    env.pop("PYTHONWARNINGS", None)
    if extra:
        env.update(extra)
    return env


def run_cli(*args, env=None, cwd=None):
    """Run `python3 smart.py ARGS...`; returns (returncode, stdout, stderr) as text.

    The child's environment is the caller's minus every smart setting and SMART_HOME, plus `env`.
    """
    completed = subprocess.run(
        [sys.executable, SMART_PY, *[str(arg) for arg in args]],
        env=clean_env(env), cwd=cwd, capture_output=True, text=True,
        timeout=CLI_TIMEOUT, stdin=subprocess.DEVNULL,
    )
    return completed.returncode, completed.stdout, completed.stderr


def spawn_smart(test, home, args, env, out, err):
    """Start `smart.py --home HOME ARGS` in its own process group, writing to the open files out/err;
    the test's cleanup kills the group and closes the files."""
    proc = subprocess.Popen([sys.executable, SMART_PY, "--home", home, *args], env=env,
                            stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True)

    def stop():
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(5)
        out.close()
        err.close()
    test.addCleanup(stop)
    return proc
