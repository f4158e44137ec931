#!/usr/bin/env python3
"""smart.py - a self-tuning agent for a small web server.

On a timer it runs experiments on the box it lives on: it measures a baseline,
applies each variant of an experiment, measures again, decides keep or revert
from the numbers (a rank test, not a bare comparison of medians), reverts
whatever is not kept, and publishes what happened to a dashboard.  On any
doubt or fault it reverts and says why.

One file, Python 3.11+ standard library only.  The contract (command line,
settings, file formats, decision rules, state.json) is SPEC.md; the names in
__all__ are the stable API that tests and scripts may import.
"""

from __future__ import annotations

import argparse
import array
import bisect
import collections
import contextlib
import errno
import fcntl
import html
import http.client
import http.server
import json
import math
import operator
import os
import pwd
import random
import re
import select
import selectors
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from datetime import datetime, timezone
from itertools import count, islice, repeat
import statistics
from statistics import NormalDist

__version__ = "0.1.0"

__all__ = [
    "SmartError", "BadInput", "WorkFailed",
    "SETTINGS", "load_settings", "parse_conf",
    "Arm", "read_measurements",
    "percentile", "summarize", "rank_test", "exact_u_cdf", "median_ratio_interval",
    "Thresholds", "Verdict", "verdict", "decide_files", "format_verdict",
    "main",
]


###### Errors ######

class SmartError(Exception):
    """A failure a user can act on; carries the process exit code."""
    exit_code = 1


class BadInput(SmartError):
    """Bad input or usage: an unreadable or malformed file, a bad setting, an unknown name."""
    exit_code = 2


class WorkFailed(SmartError):
    """The work itself failed: a revert failed, a run was interrupted."""
    exit_code = 1


JOURNAL_PRIORITY = {"error": 3, "warning": 4, "info": 6}


def to_journal(stream) -> bool:
    """Whether stream is the systemd journal: JOURNAL_STREAM names its device:inode (systemd.exec(5))."""
    expected = os.environ.get("JOURNAL_STREAM")
    if not expected:
        return False
    try:
        info = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return expected == f"{info.st_dev}:{info.st_ino}"


def emit(line: str, stream=None, level: str = "info") -> None:
    """Print a line; under journald with a <N> priority prefix, so journalctl -p filters it."""
    stream = sys.stdout if stream is None else stream
    prefix = f"<{JOURNAL_PRIORITY[level]}>" if to_journal(stream) else ""
    print(prefix + line, file=stream, flush=True)


def warn(message: str) -> None:
    """Print a one-line warning on stderr."""
    emit(f"warning: {message}", sys.stderr, "warning")


###### Settings ######

def _number(kind, low=None, high=None, low_open=False, high_open=False):
    """A validator for a number in a range; returns (parse, description)."""
    def parse(text):
        value = kind(text)
        if not math.isfinite(value):
            raise ValueError
        if low is not None and (value < low or (low_open and value == low)):
            raise ValueError
        if high is not None and (value > high or (high_open and value == high)):
            raise ValueError
        return value
    bounds = []
    if low is not None:
        bounds.append(f"{'>' if low_open else '>='} {low:g}")
    if high is not None:
        bounds.append(f"{'<' if high_open else '<='} {high:g}")
    noun = "a whole number" if kind is int else "a number"
    return parse, noun + (" " + " and ".join(bounds) if bounds else "")


def _choice(*options):
    def parse(text):
        if text not in options:
            raise ValueError
        return text
    return parse, "one of " + ", ".join(options)


def _url_or_empty():
    def parse(text):
        if text and not re.match(r"^https?://[^\s/]+", text):
            raise ValueError
        return text
    return parse, "empty or an http:// or https:// URL"


def _text():
    return str, "text"


def _token():
    def parse(text):
        if any(not 0x21 <= ord(c) <= 0x7E for c in text):
            raise ValueError
        return text
    return parse, "printable ASCII without spaces (it goes into an HTTP header)"


# key: (default, (parse, description), meaning)
SETTINGS = {
    "BASELINE_SECONDS": (300.0, _number(float, 0, low_open=True), "baseline measurement length"),
    "EXPERIMENT_SECONDS": (300.0, _number(float, 0, low_open=True), "each variant's measurement length"),
    "COOLDOWN_SECONDS": (60.0, _number(float, 0), "wait after apply before measuring"),
    "IMPROVE_PCT": (10.0, _number(float, 0, 100, high_open=True), "p50 improvement (%) needed to keep"),
    "MAX_ERR_DELTA_PCT": (1.0, _number(float, 0, 100), "most error-rate increase (points) a kept variant may add"),
    "CONFIDENCE": (0.99, _number(float, 0.5, 1, high_open=True), "confidence that the improvement is real"),
    "MIN_SAMPLES": (30, _number(int, 2), "fewest successful samples per arm"),
    "MAX_TAIL_REGRESS_PCT": (25.0, _number(float, 0), "most p99 regression (%) a kept variant may have"),
    "DESIGN": ("switchback", _choice("switchback", "sequential"), "how variants are measured against the baseline"),
    "BLOCKS": (12, _number(int, 2), "switchback: baseline/variant block pairs per variant"),
    "WARMUP_SECONDS": (5.0, _number(float, 0), "switchback: measured, unjudged wait after each switch"),
    "EARLY_STOP": ("yes", _choice("yes", "no"), "end a variant early once its verdict is certain"),
    "LOOK_SECONDS": (5.0, _number(float, 0, low_open=True), "how often the sequential stop looks"),
    "VERIFY_SECONDS": (60.0, _number(float, 0, low_open=True), "apply: baseline and variant check length"),
    "COMMAND_TIMEOUT_SECONDS": (60.0, _number(float, 0, low_open=True), "time box of each command"),
    "RETRY_HOURS": (24.0, _number(float, 0), "the timer tries an experiment that kept nothing again after this"),
    "KEEP_RUNS": (200, _number(int, 1), "run folders kept under var/runs"),
    "PHONE_HOME": ("borderline", _choice("never", "borderline", "always"), "when to ask the coach"),
    "PHONE_HOME_URL": ("", _url_or_empty(), "coach endpoint"),
    "PHONE_HOME_TOKEN": ("", _token(), "coach bearer token"),
    "PHONE_HOME_MODEL": ("llama3.2", _text(), "model name for an Ollama-style local coach"),
}

SECRET_SETTINGS = {"PHONE_HOME_TOKEN"}
_CONF_LINE = re.compile(r"^(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*=(.*)$")


def parse_conf(text: str, source: str) -> dict:
    """Parse smart.conf text (KEY=VALUE, # comments, shell quotes) into raw strings."""
    raw = {}
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        match = _CONF_LINE.match(stripped)
        if not match:
            raise BadInput(f"{source}:{number}: expected KEY=VALUE, got {stripped[:60]!r}")
        key, value = match.groups()
        try:
            words = shlex.split(value, comments=True)
        except ValueError as exc:
            raise BadInput(f"{source}:{number}: {key}: {exc} (check the quotes)") from None
        if len(words) > 1:
            raise BadInput(f"{source}:{number}: {key}: one value expected; quote a value with spaces")
        raw[key] = (words[0] if words else "", f"{source}:{number}")
    return raw


def _validate(key: str, text: str, where: str):
    parse, description = SETTINGS[key][1]
    try:
        return parse(text.strip())
    except ValueError:
        shown = "(value not shown)" if key in SECRET_SETTINGS else repr(text)
        raise BadInput(f"{where}: {key}={shown} is not valid: expected {description}") from None


def load_settings(conf_path: str | None, environ=None, overrides=None, conf_required=False) -> dict:
    """Settings from smart.conf, then the environment, then overrides (flags); validated."""
    environ = os.environ if environ is None else environ
    values = {key: spec[0] for key, spec in SETTINGS.items()}
    if conf_path:
        try:
            with open(conf_path, encoding="utf-8") as handle:
                text = handle.read()
        except FileNotFoundError:
            if conf_required:
                raise BadInput(f"{conf_path}: config file not found") from None
            text = ""
        except (OSError, UnicodeDecodeError) as exc:
            raise BadInput(f"{conf_path}: cannot read config: {exc}") from None
        for key, (text_value, where) in parse_conf(text, conf_path).items():
            if key not in SETTINGS:
                warn(f"{where}: unknown setting {key} ignored")
                continue
            values[key] = _validate(key, text_value, where)
    for key in SETTINGS:
        if key in environ:
            values[key] = _validate(key, environ[key], "environment")
    for key, value in (overrides or {}).items():
        if value is not None:
            values[key] = _validate(key, str(value), "command line")
    return values


###### Experiment definition (meta.json) ######

VARIANT_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
MEASURE_KEYS = {"concurrency", "rate", "timeout", "method", "headers", "insecure", "max_in_flight"}


class Experiment:
    """One folder under experiments/: its meta.json, checked, with the commands to run."""

    def __init__(self, path: str, meta: dict):
        self.path = path
        self.id = meta.get("id") or os.path.basename(path)
        self.description = meta.get("description", "")
        self.variants = meta["variants"]
        self.baseline = next((v for v in self.variants if v["name"] == "baseline"), self.variants[0])
        self.candidates = [v for v in self.variants if v is not self.baseline]
        self.revert = meta.get("revert") or "./revert.sh"
        self.target_url = meta.get("target_url")
        self.interval = meta.get("measure_interval_sec")
        self.measure = meta.get("measure") or {}
        self.measure_sh = os.path.isfile(os.path.join(path, "measure.sh"))
        self.seconds = {key: meta.get(key) for key in ("baseline_seconds", "experiment_seconds", "cooldown_seconds",
                                                       "warmup_seconds")}
        self.design = meta.get("design")
        self.blocks = meta.get("blocks")
        self.decider = meta.get("decide") or ("./decide.sh" if os.path.isfile(os.path.join(path, "decide.sh")) else None)

    def apply_command(self, variant: dict):
        """The shell command that applies a variant, or None for a baseline with nothing to apply."""
        if variant.get("apply"):
            return variant["apply"]
        if os.path.isfile(os.path.join(self.path, "apply.sh")):
            return f"./apply.sh {shlex.quote(variant['name'])}"
        return None

    def variant(self, name: str):
        return next((v for v in self.variants if v["name"] == name), None)


def load_experiment(path: str) -> Experiment:
    """Read and check experiments/NNN/meta.json; BadInput names the file and the field at fault."""
    meta_path = os.path.join(path, "meta.json")
    try:
        with open(meta_path, encoding="utf-8") as handle:
            meta = json.load(handle)
    except FileNotFoundError:
        raise BadInput(f"{meta_path}: not found; an experiment folder needs a meta.json") from None
    except json.JSONDecodeError as exc:
        raise BadInput(f"{meta_path}:{exc.lineno}:{exc.colno}: not valid JSON: {exc.msg}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInput(f"{meta_path}: cannot read: {exc}") from None

    def bad(field, problem):
        return BadInput(f"{meta_path}: {field}: {problem}")

    if not isinstance(meta, dict):
        raise bad("(top level)", "expected a JSON object")
    for field in ("id", "description", "revert", "target_url", "design", "decide"):
        if field in meta and not isinstance(meta[field], str):
            raise bad(field, "expected a string")
    variants = meta.get("variants")
    if not isinstance(variants, list) or not variants:
        raise bad("variants", "expected a non-empty list of {\"name\": ..., \"apply\": ...}")
    seen = set()
    for index, variant in enumerate(variants):
        where = f"variants[{index}]"
        if not isinstance(variant, dict):
            raise bad(where, "expected an object with name and apply")
        name = variant.get("name")
        if not isinstance(name, str) or not VARIANT_NAME.match(name):
            raise bad(f"{where}.name", f"{name!r} must match [A-Za-z0-9._-]{{1,64}}")
        if name in seen:
            raise bad(f"{where}.name", f"{name!r} is used twice")
        seen.add(name)
        if "apply" in variant and not isinstance(variant["apply"], str):
            raise bad(f"{where}.apply", "expected a shell command string")
    if len(variants) < 2:
        raise bad("variants", "needs at least one variant besides the baseline")
    target = meta.get("target_url")
    if target is None and not os.path.isfile(os.path.join(path, "measure.sh")):
        raise bad("target_url", "required (or a measure.sh in the folder)")
    if target is not None:
        try:
            Target(target)
        except BadInput as exc:
            raise bad("target_url", str(exc)) from None
    if meta.get("design") not in (None, "sequential", "switchback"):
        raise bad("design", f"{meta['design']!r} must be sequential or switchback")
    blocks = meta.get("blocks")
    if blocks is not None and (isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 2):
        raise bad("blocks", f"{blocks!r} must be a whole number of at least 2")
    for field in ("measure_interval_sec", "baseline_seconds", "experiment_seconds", "cooldown_seconds",
                  "warmup_seconds"):
        value = meta.get(field)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value) or value < 0
                                  or (value == 0 and field not in ("cooldown_seconds", "warmup_seconds"))):
            raise bad(field, f"{value!r} must be a positive number")
    measure = meta.get("measure", {})
    if not isinstance(measure, dict):
        raise bad("measure", "expected an object")
    for key, value in measure.items():
        if key not in MEASURE_KEYS:
            raise bad(f"measure.{key}", f"unknown; expected one of {', '.join(sorted(MEASURE_KEYS))}")
        if key in ("concurrency", "rate", "timeout", "max_in_flight") and (
                isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0):
            raise bad(f"measure.{key}", f"{value!r} must be a positive number")
    if sum(key in measure for key in ("concurrency", "rate")) > 1:
        raise bad("measure", "choose concurrency or rate, not both")
    if not isinstance(measure.get("headers", []), list):
        raise bad("measure.headers", "expected a list of \"Name: value\" strings")
    experiment = Experiment(path, meta)
    for variant in experiment.candidates:
        if experiment.apply_command(variant) is None:
            raise bad(f"variant {variant['name']!r}", "no apply command and no apply.sh in the folder")
    if not meta.get("revert") and not os.path.isfile(os.path.join(path, "revert.sh")):
        raise bad("revert", "required (or a revert.sh in the folder)")
    return experiment


def _meta_id(path: str):
    meta = read_json(path)
    return meta.get("id") if isinstance(meta, dict) else None


def find_experiments(home: str, names) -> list:
    """Experiments named by folder path or id, or every folder in experiments/ in name order."""
    root = os.path.join(home, "experiments")
    if not names:
        try:
            folders = sorted(e for e in os.listdir(root) if os.path.isdir(os.path.join(root, e)))
        except FileNotFoundError:
            raise BadInput(f"{root}: no experiments folder; create one with an NNN_name/meta.json") from None
        return [load_experiment(os.path.join(root, folder)) for folder in folders]
    found = []
    for name in names:
        if os.path.isdir(name):
            found.append(load_experiment(os.path.abspath(name)))
        elif os.path.isdir(os.path.join(root, name)):
            found.append(load_experiment(os.path.join(root, name)))
        else:
            folders = sorted(os.listdir(root)) if os.path.isdir(root) else []
            matches = [folder for folder in folders
                       if _meta_id(os.path.join(root, folder, "meta.json")) == name]
            if not matches:
                raise BadInput(f"unknown experiment {name!r}: not a folder, nor an id under {root}")
            found.extend(load_experiment(os.path.join(root, folder)) for folder in matches)
    return found


###### Measure: the built-in prober ######

USER_AGENT = f"smart.py/{__version__}"
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}")
MAX_HEAD = 64 * 1024            # a response head larger than this is not HTTP we can use: code 0
MAX_BODY = 64 * 1024 * 1024     # a body larger than this ends as a failed row (code 0), connection closed
MAX_LINE = 4096                 # a chunk-size or trailer line longer than this: code 0
MAX_WEIGHT = 1000
_RECV = 16384                   # bytes per read
_READ_NS = 1_000_000            # reading one connection yields to the loop after this long
_POLL_NS = 50_000_000           # should_stop is asked at least this often
CONNECTION_MODES = ("reuse", "new", "resume")


class Target:
    """A URL to probe, checked before anything is sent: its request bytes, its weight in a page
    mix, and what its responses must show (a status, a text in the body) to pass."""

    def __init__(self, url: str, method: str = "GET", headers=(), insecure: bool = False, *,
                 weight: int = 1, expect_status=None, expect_body=None):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise BadInput(f"URL {url!r}: scheme must be http:// or https://")
        try:
            port = parts.port
        except ValueError:
            raise BadInput(f"URL {url!r}: the port is not a number from 0 to 65535") from None
        if port == 0:
            raise BadInput(f"URL {url!r}: port 0 is not a port one can connect to")
        if not parts.hostname or any(c in url for c in " \r\n\t"):
            raise BadInput(f"URL {url!r}: no host name, or a blank inside")
        if not _TOKEN.match(method):
            raise BadInput(f"--method {method!r} is not an HTTP method name")
        if isinstance(weight, bool) or not isinstance(weight, int) or not 1 <= weight <= MAX_WEIGHT:
            raise BadInput(f"URL {url!r}: the weight must be a whole number from 1 to {MAX_WEIGHT}, got {weight!r}")
        if expect_status is not None and (isinstance(expect_status, bool) or not isinstance(expect_status, int)
                                          or not 100 <= expect_status <= 999):
            raise BadInput(f"--expect-status {expect_status!r} is not an HTTP status (100-999)")
        if expect_body is not None and (not isinstance(expect_body, str) or not expect_body):
            raise BadInput("--expect-body must be a non-empty text")
        self.url, self.method, self.host = url, method.upper(), parts.hostname
        if expect_body is not None and self.method == "HEAD":
            raise BadInput("--expect-body cannot be checked: a HEAD response has no body")
        self.label = url.replace(",", "%2C")       # the CSV's url column
        self.weight = weight
        self.expect_status = expect_status
        self.expect_body = None if expect_body is None else expect_body.encode("utf-8")
        self.checked = expect_status is not None or expect_body is not None
        self.tls = parts.scheme == "https"
        self.port = port or (443 if self.tls else 80)
        self.origin = (parts.scheme, self.host, self.port, bool(insecure))   # what a connection can serve
        host = f"[{self.host}]" if ":" in self.host else self.host
        if port and port != (443 if self.tls else 80):
            host += f":{port}"
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        # A header the user gives replaces the default of that name: two Host headers are a 400.
        fields = {"host": f"Host: {host}", "user-agent": f"User-Agent: {USER_AGENT}", "accept": "Accept: */*"}
        replaced, extra = set(), []
        for header in headers:
            name, sep, value = header.partition(":")
            name = name.strip()
            if not sep or not _TOKEN.match(name) or "\r" in value or "\n" in value:
                raise BadInput(f"--header {header!r}: expected NAME:VALUE")
            key = name.lower()
            if key == "host" and key in replaced:
                raise BadInput(f"--header {header!r}: a second Host header (servers answer 400)")
            if key in fields and key not in replaced:
                fields[key] = f"{name}: {value.strip()}"
                replaced.add(key)
            else:
                extra.append(f"{name}: {value.strip()}")
        lines = [f"{self.method} {path} HTTP/1.1", *fields.values(), *extra]
        self.request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace")
        if not any(line.lower().startswith("connection:") for line in extra):
            lines.append("Connection: close")
        self.request_close = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace")
        self.ssl_context = None
        if self.tls:
            self.ssl_context = ssl.create_default_context()
            if insecure:
                self.ssl_context.check_hostname = False
                self.ssl_context.verify_mode = ssl.CERT_NONE


def weighted_url(text: str):
    """'URL@WEIGHT' (a trailing @ and a whole number) -> (URL, WEIGHT); a plain URL weighs 1."""
    match = re.fullmatch(r"(.+)@(\d+)", text)
    return (match[1], int(match[2])) if match else (text, 1)


def smooth_weighted(weights):
    """Indices into weights, forever, in nginx's smooth weighted round-robin order: each turn
    every entry gains its weight, the largest (the first on a tie) is chosen and loses the total."""
    current = [0] * len(weights)
    total = sum(weights)
    while True:
        for index, weight in enumerate(weights):
            current[index] += weight
        best = current.index(max(current))
        current[best] -= total
        yield best


def _target_list(targets) -> list:
    targets = [targets] if isinstance(targets, Target) else list(targets)
    if not targets:
        raise BadInput("no URL to probe")
    return targets


def _columns(targets) -> tuple:
    """Whether rows carry a url column (a page mix) and a check column (any target checks)."""
    return len(targets) > 1, any(target.checked for target in targets)


def csv_header(targets, block=False) -> str:
    """The measurement CSV's header line (newline included) for the rows a Prober of these
    targets writes: timestamp,latency_ms,response_code[,block][,url][,check]."""
    url, check = _columns(_target_list(targets))
    return ("timestamp,latency_ms,response_code" + (",block" if block else "") + (",url" if url else "")
            + (",check" if check else "") + "\n")


class _BodyTooLarge(ValueError):
    """A response body longer than MAX_BODY."""


class _Response:
    """One response read incrementally: the head from at most MAX_HEAD bytes, then the body counted
    and dropped as it arrives.  A body check keeps only the last len(expected) - 1 bytes, so a text
    split across two reads is still found; chunked framing is a small state machine, never a rescan."""

    __slots__ = ("status", "body_start", "length", "chunked", "keep_alive", "received", "left", "state",
                 "line", "expect", "window", "found")

    @classmethod
    def parse_head(cls, buf: bytearray, head_request: bool, since: int = 0):
        """The status line and headers once complete, else None; ValueError on garbage.

        `since` is how much of buf an earlier call searched already (a head that drips in is not
        searched from its start again)."""
        end = buf.find(b"\r\n\r\n", max(0, since - 3))
        if end < 0 or end > MAX_HEAD:
            if len(buf) > MAX_HEAD:
                raise ValueError(f"response headers larger than {MAX_HEAD >> 10} KiB")
            return None
        lines = bytes(buf[:end]).decode("latin-1").split("\r\n")
        version, _, rest = lines[0].partition(" ")
        if not version.startswith("HTTP/1."):
            raise ValueError("not an HTTP/1.x response")
        response = cls()
        response.status = int(rest[:3])
        response.body_start = end + 4
        response.length, response.chunked = None, False
        response.keep_alive = version == "HTTP/1.1"
        for line in lines[1:]:
            name, _, value = line.partition(":")
            name, value = name.strip().lower(), value.strip().lower()
            if name == "content-length":
                if not value.isdigit():
                    raise ValueError(f"Content-Length {value[:30]!r} is not a whole number")
                response.length = int(value)
            elif name == "transfer-encoding" and "chunked" in value:
                response.chunked = True
            elif name == "connection":
                response.keep_alive = "close" not in value and (response.keep_alive or "keep-alive" in value)
        if head_request or response.status in (204, 304) or 100 <= response.status < 200:
            response.length, response.chunked = 0, False
        if response.chunked:
            response.length = None
        elif response.length is None:
            response.keep_alive = False     # the body runs to the end of the connection
        elif response.length > MAX_BODY:
            raise _BodyTooLarge(f"Content-Length {response.length} is over the {MAX_BODY >> 20} MiB cap")
        response.received = 0
        response.left = response.length     # body (or current chunk) bytes still to come
        response.state = "size"
        response.line = b""
        response.expect, response.window, response.found = None, b"", False
        return response

    @property
    def to_close(self) -> bool:
        """The body has no length: the server's close ends it."""
        return self.length is None and not self.chunked

    def feed(self, data: bytes):
        """Take the next bytes of the body; the index in data just past its end once it is
        complete, else None.  ValueError on broken chunk framing, _BodyTooLarge past MAX_BODY."""
        if self.chunked:
            end = self._chunks(data)
        else:
            take = len(data) if self.left is None else min(self.left, len(data))
            self._scan(data if take == len(data) else data[:take])
            if self.left is not None:
                self.left -= take
            end = take if self.left == 0 else None
        self.received += len(data) if end is None else end
        if self.received > MAX_BODY:
            raise _BodyTooLarge(f"response body over the {MAX_BODY >> 20} MiB cap")
        return end

    def _chunks(self, data: bytes):
        pos, size = 0, len(data)
        while pos < size:
            if self.state == "data":
                take = min(self.left, size - pos)
                self._scan(data[pos:pos + take])
                pos += take
                self.left -= take
                if not self.left:
                    if data.startswith(b"\r\n", pos):
                        pos, self.state = pos + 2, "size"
                    else:
                        self.state = "crlf"
                continue
            line, pos = self._line(data, pos)
            if line is None:
                return None
            if self.state == "size":
                digits = line.partition(b";")[0].strip()
                if not _CHUNK_SIZE.fullmatch(digits):
                    raise ValueError(f"chunk size {digits[:20]!r} is not hex digits")
                self.left = int(digits, 16)
                self.state = "data" if self.left else "trailer"
            elif self.state == "crlf":
                if line:
                    raise ValueError("chunk data longer than its chunk size")
                self.state = "size"
            elif not line:
                return pos                  # the empty line after the last chunk and any trailers
        return None

    def _line(self, data: bytes, pos: int):
        """The next line without its line end, and the index after it; (None, len(data)) while
        the line is still arriving."""
        end = data.find(b"\n", pos)
        if end < 0:
            self.line += data[pos:]
            if len(self.line) > MAX_LINE:
                raise ValueError(f"a chunk-size or trailer line over {MAX_LINE} bytes")
            return None, len(data)
        line = self.line + data[pos:end] if self.line else data[pos:end]
        self.line = b""
        if len(line) > MAX_LINE:
            raise ValueError(f"a chunk-size or trailer line over {MAX_LINE} bytes")
        return (line[:-1] if line.endswith(b"\r") else line), end + 1

    def _scan(self, piece: bytes) -> None:
        if self.expect is None or self.found:
            return
        hay = self.window + piece
        if self.expect in hay:
            self.found = True
            return
        keep = len(self.expect) - 1
        self.window = hay[-keep:] if keep else b""


class _Conn:
    """One connection of the prober and the request it carries."""

    __slots__ = ("sock", "state", "out", "head", "response", "due", "deadline", "served", "retried",
                 "target", "origin")

    def __init__(self):
        self.sock = None
        self.state = "closed"
        self.out = b""
        self.head = bytearray()
        self.response = None
        self.due = self.deadline = 0
        self.served = 0
        self.retried = False
        self.target = self.origin = None


class ProbeResult:
    """What a probe did: rows written, errors, connections opened, in-flight cap hits, bytes
    received, bodies over the cap, failed checks, TLS handshakes and how many resumed a session."""

    def __init__(self):
        self.rows = self.errors = self.connections = self.cap_hits = self.max_in_flight = 0
        self.bytes_received = self.oversized = self.check_failures = self.handshakes = self.resumed = 0
        self.elapsed = 0.0
        self.stopped_early = False


def _iso_millis(epoch: float, _cache={}) -> str:
    second = int(epoch)
    prefix = _cache.get(second)
    if prefix is None:
        _cache.clear()
        prefix = _cache[second] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
    return f"{prefix}.{int((epoch - second) * 1000):03d}Z"


_SHAPE_LIMITS = {"duration": (1e-3, 7 * 86400), "interval": (1e-3, 86400), "rate": (1e-3, 100000),
                 "concurrency": (1, 10000), "timeout": (1e-3, 3600), "max_in_flight": (1, 10000)}
_SHAPE_CHOICES = {"connections": CONNECTION_MODES}


def check_shape(duration, **shape) -> None:
    """BadInput unless the measurement's length, load shape and connection mode are sane (checked
    before any I/O) against _SHAPE_LIMITS and _SHAPE_CHOICES."""
    if sum(shape.get(key) is not None for key in ("interval", "concurrency", "rate")) > 1:
        raise BadInput("choose one load shape: --interval, --concurrency or --rate")
    for name, value in dict(shape, duration=duration).items():
        flag = f"--{name.replace('_', '-')}"
        if value is None:
            continue
        if name in _SHAPE_CHOICES:
            if value not in _SHAPE_CHOICES[name]:
                raise BadInput(f"{flag} must be one of {', '.join(_SHAPE_CHOICES[name])}, got {value!r}")
            continue
        if name not in _SHAPE_LIMITS:
            raise BadInput(f"{name!r} is not a measurement setting")
        low, high = _SHAPE_LIMITS[name]
        if isinstance(value, bool) or not (isinstance(value, (int, float)) and low <= value <= high):
            raise BadInput(f"{flag} must be a number from {low:g} to {high:g}, got {value!r}")


class Prober:
    """An event loop over non-blocking connections, for the three load shapes and a page mix.

    interval: one connection, a probe due every `interval` seconds; concurrency: N connections,
    each sending the next request when the last ends (closed loop); rate: requests due on a fixed
    schedule (open loop) over as many connections as needed up to `max_in_flight`.  Requests go to
    the targets in smooth weighted round-robin order.  connections: "reuse" (keep-alive), "new" (a
    new connection and TLS handshake per request) or "resume" (a new connection offering the last
    TLS session).  Latency runs from the moment a request was due (open loop and interval) or sent
    (closed loop) to the last byte of the body; a request without its whole response within
    `timeout` is a row with code 0, as is a body over MAX_BODY.
    """

    def __init__(self, targets, duration: float, out, *, interval=None, concurrency=None, rate=None,
                 timeout=5.0, max_in_flight=256, connections="reuse", on_row=None, should_stop=None,
                 progress=None, block=None):
        check_shape(duration, interval=interval, concurrency=concurrency, rate=rate, timeout=timeout,
                    max_in_flight=max_in_flight, connections=connections)
        self.targets, self.out = _target_list(targets), out
        self.order = smooth_weighted([t.weight for t in self.targets]) if len(self.targets) > 1 else repeat(0)
        self.duration_ns = int(duration * 1e9)
        self.timeout_ns = int(timeout * 1e9)
        self.concurrency = int(concurrency) if concurrency else None
        self.period_ns = None if self.concurrency else int(1e9 / rate if rate else (interval or 1.0) * 1e9)
        self.cap = 1 if interval or not (rate or concurrency) else int(max_in_flight)
        self.reuse, self.resume = connections == "reuse", connections == "resume"
        self.on_row, self.should_stop, self.progress = on_row, should_stop, progress
        self.block = "" if block is None else f",{block}"
        self.labelled, self.checked = _columns(self.targets)
        # A TLS session resumes only under the context that made it: one context per origin.
        self.contexts = {t.origin: t.ssl_context for t in reversed(self.targets) if t.tls}
        self.sessions = {}
        self.addresses = {}
        self.result = ProbeResult()
        self.selector = selectors.DefaultSelector()
        self.precise = True
        self.idle = {}                      # origin -> idle keep-alive connections
        self.busy = set()
        self.pending = collections.deque()  # (due, target) of requests waiting for a connection
        self.rows = []
        self.resting = []
        self.recent = collections.deque(maxlen=1000)

    # -- the loop --
    def run(self) -> ProbeResult:
        """Probe until the duration is over and in-flight requests are answered or timed out."""
        clock = time.perf_counter_ns
        self.start_ns = start = clock()
        self.start_wall = time.time()
        end = start + self.duration_ns
        hard_end = end + self.timeout_ns + 1_000_000_000
        next_due = start
        next_progress = start
        if self.concurrency:
            for _ in range(self.concurrency):
                self._send(_Conn(), start, self._next_target())
        try:
            while True:
                now = clock()
                if self.should_stop is not None and self.should_stop():
                    self.result.stopped_early = True
                    break
                if self.period_ns:
                    while next_due <= now and next_due < end:
                        self.pending.append((next_due, self._next_target()))
                        next_due += self.period_ns
                    self._dispatch()
                if self.resting:
                    self._wake_resting(now, end)
                self._expire(now)
                self._flush()
                if now >= end and not self.busy and not self.pending and not self.resting:
                    break
                if now >= hard_end:
                    # Requests still queued behind the in-flight cap never got an answer: error rows.
                    for due, target in self.pending:
                        conn = _Conn()
                        conn.due, conn.target = due, target
                        self._finish(conn, 0, now, keep=False)
                    self.pending.clear()
                    break
                if self.progress is not None and now >= next_progress:
                    self.progress(self._progress_line(now))
                    next_progress = now + 500_000_000
                wake = min(end if now < end else hard_end, self._earliest_deadline(hard_end), now + _POLL_NS)
                if self.period_ns and next_due < end:
                    wake = min(wake, next_due)
                if self.resting:
                    wake = min(wake, min(at for at, _ in self.resting))
                for key, mask in self._wait((wake - clock()) / 1e9):
                    self._on_event(key.data, mask)
        finally:
            self._flush()
            for conn in [*self.busy, *(conn for pool in self.idle.values() for conn in pool)]:
                self._close(conn)
            self.selector.close()
            self.result.elapsed = (clock() - start) / 1e9
        return self.result

    def _wait(self, seconds):
        """The ready events, waiting at most `seconds`, waking on time to the microsecond.

        epoll counts its timeout in whole milliseconds and Python rounds it up, so a loop asleep
        in it sends up to 1 ms late, and later still as the lag adds up from request to request.
        select() on the epoll descriptor itself wakes on the same events, timed in microseconds;
        beyond select()'s descriptor limit (a process with over 1023 files open) epoll waits alone.
        """
        if seconds > 0 and self.precise:
            try:
                select.select([self.selector], [], [], seconds)
            except ValueError:
                self.precise = False
                return self.selector.select(seconds)
            return self.selector.select(0)
        return self.selector.select(seconds)

    def _next_target(self) -> Target:
        return self.targets[next(self.order)]

    def _progress_line(self, now):
        recent = sorted(self.recent)
        p50 = f"{percentile(recent, 50):.1f} ms" if recent else "-"
        return (f"{(now - self.start_ns) / 1e9:6.1f}s  {self.result.rows} requests  "
                f"{self.result.errors} errors  p50 {p50}")

    def _dispatch(self):
        while self.pending:
            if len(self.busy) >= self.cap:
                self.result.cap_hits += 1
                return
            due, target = self.pending.popleft()
            pool = self.idle.get(target.origin)
            self._send(pool.pop() if pool else _Conn(), due, target)

    def _wake_resting(self, now, end):
        due = [(at, conn) for at, conn in self.resting if at <= now]
        self.resting = [(at, conn) for at, conn in self.resting if at > now]
        for _, conn in due:
            if now < end:
                self._send(conn, now, self._next_target())

    def _earliest_deadline(self, default):
        return min((conn.deadline for conn in self.busy), default=default)

    def _expire(self, now):
        for conn in [c for c in self.busy if c.deadline <= now]:
            self._finish(conn, 0, now, keep=False)

    # -- one request --
    def _send(self, conn: _Conn, due: int, target: Target):
        if conn.sock is not None and conn.origin != target.origin:
            self._close(conn)               # a closed-loop slot moving to another origin of the mix
        conn.due, conn.target, conn.origin = due, target, target.origin
        conn.deadline = time.perf_counter_ns() + self.timeout_ns
        conn.head.clear()
        conn.response = None
        conn.out = target.request if self.reuse else target.request_close
        self.busy.add(conn)
        self.result.max_in_flight = max(self.result.max_in_flight, len(self.busy))
        if conn.sock is None:
            self._connect(conn)
        else:
            conn.state = "sending"
            try:
                self._write(conn)
            except OSError as exc:
                self._failed(conn, exc)

    def _connect(self, conn: _Conn) -> None:
        target = conn.target
        try:
            address = self.addresses.get(target.origin)
            if address is None:
                address = socket.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)[0]
                self.addresses[target.origin] = address
            sock = socket.socket(*address[:3])
        except OSError:
            self._finish(conn, 0, time.perf_counter_ns(), keep=False)
            return
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.sock, conn.state, conn.served = sock, "connecting", 0
        self.result.connections += 1
        err = sock.connect_ex(address[4])
        if err not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK):
            self._finish(conn, 0, time.perf_counter_ns(), keep=False)
            return
        self.selector.register(sock, selectors.EVENT_WRITE, conn)

    def _on_event(self, conn: _Conn, mask):
        if conn not in self.busy:
            self._close(conn)      # an idle keep-alive connection closed by the server
            return
        try:
            if conn.state == "connecting":
                err = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    raise OSError(err, os.strerror(err))
                if conn.target.tls:
                    conn.sock = self.contexts[conn.origin].wrap_socket(
                        conn.sock, server_hostname=conn.target.host, do_handshake_on_connect=False,
                        session=self.sessions.get(conn.origin) if self.resume else None)
                    self.selector.modify(conn.sock, selectors.EVENT_WRITE, conn)
                    conn.state = "handshaking"
                    self._handshake(conn)
                else:
                    conn.state = "sending"
                    self._write(conn)
            elif conn.state == "handshaking":
                self._handshake(conn)
            elif conn.state == "sending":
                self._write(conn)
            else:
                self._read(conn)
        except (OSError, ValueError) as exc:
            self._failed(conn, exc)

    def _handshake(self, conn):
        try:
            conn.sock.do_handshake()
        except ssl.SSLWantReadError:
            self.selector.modify(conn.sock, selectors.EVENT_READ, conn)
            return
        except ssl.SSLWantWriteError:
            self.selector.modify(conn.sock, selectors.EVENT_WRITE, conn)
            return
        self.result.handshakes += 1
        self.result.resumed += conn.sock.session_reused
        conn.state = "sending"
        self._write(conn)

    def _write(self, conn):
        try:
            sent = conn.sock.send(conn.out)
        except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
            sent = 0
        conn.out = conn.out[sent:]
        if conn.out:
            self._watch(conn, selectors.EVENT_WRITE)
        else:
            conn.state = "receiving"
            self._watch(conn, selectors.EVENT_READ)

    def _watch(self, conn, events):
        try:
            self.selector.modify(conn.sock, events, conn)
        except KeyError:
            self.selector.register(conn.sock, events, conn)

    def _read(self, conn):
        # Read while data keeps coming, but for at most _READ_NS: a body that streams without a
        # pause cannot keep the loop from its schedule, its deadlines and should_stop.  The rest of
        # a TLS record is taken at once: epoll cannot see bytes already inside the TLS layer.
        sock, tls = conn.sock, conn.target.tls
        started = time.perf_counter_ns()
        while True:
            try:
                data = sock.recv(_RECV)
                while tls and sock.pending():
                    data += sock.recv(sock.pending())
            except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                return
            now = time.perf_counter_ns()
            if not data:
                self._eof(conn, now)
                return
            self.result.bytes_received += len(data)
            if self._received(conn, data, now) or (len(data) < _RECV and not tls) or now - started > _READ_NS:
                return

    def _received(self, conn, data, now) -> bool:
        """Parse what arrived; True once the response is complete (and the row written)."""
        response = conn.response
        if response is None:
            head = conn.head
            since = len(head)
            head += data
            while True:
                response = _Response.parse_head(head, conn.target.method == "HEAD", since)
                if response is None:
                    return False
                if not 100 <= response.status < 200 or response.status == 101:
                    break
                del head[:response.body_start]      # an interim response (e.g. 103 Early Hints)
                since = 0
            response.expect = conn.target.expect_body
            conn.response = response
            data = bytes(head[response.body_start:])
            head.clear()
        end = response.feed(data)
        if end is None:
            return False
        self._complete(conn, now, keep=response.keep_alive and end == len(data))
        return True

    def _complete(self, conn, now, keep):
        response, target = conn.response, conn.target
        check = ""
        if target.expect_status is not None and response.status != target.expect_status:
            check = "status"
        elif target.expect_body is not None and not response.found:
            check = "body"
        if self.resume and target.tls:
            # Taken after the body: TLS 1.3 sends its session tickets after the handshake.
            self.sessions[conn.origin] = conn.sock.session
        self._finish(conn, response.status, now, keep=keep and self.reuse, check=check)

    def _eof(self, conn, now):
        if conn.response is not None and conn.response.to_close:
            self._complete(conn, now, keep=False)
        else:
            self._failed(conn, ConnectionResetError("connection closed before the response ended"))

    def _failed(self, conn, exc):
        if isinstance(exc, _BodyTooLarge):
            self.result.oversized += 1
        if conn.served and conn.response is None and not conn.head and not conn.retried:
            # The server closed a keep-alive connection between requests: retry once on a new one.
            self._close(conn)
            self.busy.discard(conn)
            conn.retried = True
            self._send(conn, conn.due, conn.target)
            return
        self._finish(conn, 0, time.perf_counter_ns(), keep=False)

    def _finish(self, conn, code, now, keep, check=""):
        text = f"{(now - conn.due) / 1e6:.3f}"
        latency_ms = float(text)            # what the CSV says, so a verdict from memory equals one from the file
        self.busy.discard(conn)
        self.result.rows += 1
        if code == 0 or code >= 500:
            self.result.errors += 1
        else:
            self.recent.append(latency_ms)
        if check:
            self.result.check_failures += 1
        label = conn.target.label
        wall = self.start_wall + (conn.due - self.start_ns) / 1e9
        self.rows.append(f"{_iso_millis(wall)},{text},{code}{self.block}{f',{label}' if self.labelled else ''}"
                         f"{f',{check}' if self.checked else ''}\n")
        if self.on_row is not None:
            self.on_row(latency_ms, code, wall, label, check)
        conn.retried = False
        if keep and conn.sock is not None:
            conn.served += 1
            conn.state = "idle"
        else:
            self._close(conn)
        if self.concurrency:
            if code == 0:
                # Pause a failing slot briefly so a refused port does not become a busy loop.
                self.resting.append((now + 10_000_000, conn))
            elif now < self.start_ns + self.duration_ns:
                self._send(conn, time.perf_counter_ns(), self._next_target())
            else:
                self._close(conn)
        elif conn.sock is not None:
            self.idle.setdefault(conn.origin, []).append(conn)

    def _close(self, conn):
        if conn.sock is not None:
            try:
                self.selector.unregister(conn.sock)
            except (KeyError, ValueError):
                pass
            conn.sock.close()
            conn.sock = None
        conn.state = "closed"
        pool = self.idle.get(conn.origin)
        if pool and conn in pool:
            pool.remove(conn)

    def _flush(self):
        if self.rows:
            self.out.write("".join(self.rows))
            self.out.flush()
            self.rows.clear()


def measure_url(url, duration: float, out_path: str, *, method="GET", headers=(), insecure=False,
                connections="reuse", expect_status=None, expect_body=None, progress=None, on_row=None,
                should_stop=None, **shape) -> ProbeResult:
    """Probe for duration seconds, streaming rows to out_path as they complete.

    url is one URL or a page mix: a list of URLs and (URL, weight) pairs; every URL gets the same
    method, headers and checks."""
    targets = []
    for item in [url] if isinstance(url, str) else url:
        address, weight = (item, 1) if isinstance(item, str) else item
        targets.append(Target(address, method, headers, insecure, weight=weight, expect_status=expect_status,
                              expect_body=expect_body))
    shape = {k: v for k, v in shape.items() if v is not None}
    check_shape(duration, connections=connections, **shape)
    header = csv_header(targets)
    try:
        handle = open(out_path, "w", encoding="utf-8", newline="")
    except OSError as exc:
        raise BadInput(f"{out_path}: cannot write: {exc.strerror or exc}") from None
    with handle:
        handle.write(header)
        prober = Prober(targets, duration, handle, connections=connections, progress=progress, on_row=on_row,
                        should_stop=should_stop, **shape)
        return prober.run()


###### Measurement CSV ######

class Arm:
    """One arm's measurements: successful latencies (array of float ms), counts, block labels."""

    __slots__ = ("path", "latencies", "blocks", "total", "errors", "block_totals", "block_errors", "block_started")

    def __init__(self, path="-"):
        self.path = path
        self.latencies = array.array("d")
        self.blocks = None            # array('l') parallel to latencies, when rows carry a block
        self.total = 0
        self.errors = 0
        self.block_totals = {}
        self.block_errors = {}
        self.block_started = {}       # block -> epoch seconds of its first row (tells which arm went first)

    def add(self, latency_ms: float, code: int, block=None, at=None) -> None:
        """Count one request (used by the prober and by tests); `at` is when a block's first row was sent."""
        self.total += 1
        failed = code == 0 or code >= 500
        if block is not None:
            if self.blocks is None:
                self.blocks = array.array("l", [0] * len(self.latencies))
            if block not in self.block_started and at is not None:
                self.block_started[block] = at
            self.block_totals[block] = self.block_totals.get(block, 0) + 1
            if failed:
                self.block_errors[block] = self.block_errors.get(block, 0) + 1
        if failed:
            self.errors += 1
            return
        self.latencies.append(latency_ms)
        if self.blocks is not None:
            self.blocks.append(block if block is not None else 0)

    @property
    def ok(self) -> int:
        return len(self.latencies)

    def only(self, blocks) -> "Arm":
        """A copy holding only the rows of the given blocks."""
        keep = set(blocks)
        part = Arm(self.path)
        part.blocks = array.array("l")
        for latency, block in zip(self.latencies, self.blocks):
            if block in keep:
                part.latencies.append(latency)
                part.blocks.append(block)
        for block in keep:
            part.total += self.block_totals.get(block, 0)
            part.errors += self.block_errors.get(block, 0)
            part.block_totals[block] = self.block_totals.get(block, 0)
            part.block_errors[block] = self.block_errors.get(block, 0)
            if block in self.block_started:
                part.block_started[block] = self.block_started[block]
        return part


def _check_timestamp(text: str) -> None:
    if "T" in text:
        datetime.fromisoformat(text)
    else:
        value = float(text)
        if not math.isfinite(value) or value < 0:
            raise ValueError


def _epoch(stamp: str) -> float:
    """A checked timestamp (ISO-8601 or epoch seconds) as epoch seconds."""
    if "T" not in stamp:
        return float(stamp)
    moment = datetime.fromisoformat(stamp)
    return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).timestamp()


def _parse_row(line: str):
    """One CSV line -> (latency_ms, code, block or None); ValueError says what is wrong."""
    fields = line.split(",")
    if len(fields) == 3:
        block = None
    elif len(fields) == 4:
        try:
            block = int(fields[3])
        except ValueError:
            raise ValueError(f"block {fields[3].strip()[:30]!r} is not a whole number") from None
    else:
        raise ValueError(f"expected 3 or 4 fields, found {len(fields)}")
    try:
        _check_timestamp(fields[0].strip())
    except ValueError:
        raise ValueError(f"timestamp {fields[0].strip()[:30]!r} is neither ISO-8601 nor epoch seconds") from None
    try:
        latency = float(fields[1])
    except ValueError:
        raise ValueError(f"latency_ms {fields[1].strip()[:30]!r} is not a number") from None
    if not 0 <= latency < math.inf:
        raise ValueError(f"latency_ms {fields[1].strip()!r} is not a non-negative number")
    try:
        code = int(fields[2])
    except ValueError:
        raise ValueError(f"response_code {fields[2].strip()[:30]!r} is not a whole number") from None
    if not (code == 0 or 100 <= code <= 999):
        raise ValueError(f"response_code {code} is neither an HTTP status (100-999) nor 0")
    return latency, code, block


_HEADER = re.compile(r"^\s*timestamp\s*,\s*latency_ms\s*,\s*response_code\s*(,\s*block\s*)?$")


def read_measurements(path: str) -> Arm:
    """Stream a measurement CSV into an Arm; BadInput names file:line on a malformed row.

    A final line without a newline that does not parse (a measurement cut off mid-write) is
    skipped with a warning.  Memory holds one float per successful row, nothing per row else.
    """
    try:
        handle = open(path, encoding="utf-8-sig", newline="")
    except OSError as exc:
        raise BadInput(f"{path}: cannot read: {exc.strerror or exc}") from None
    reader = _CsvReader(path)
    with handle:
        try:
            carry = ""
            while True:
                chunk = handle.read(1 << 20)
                if not chunk:
                    break
                text = carry + chunk
                cut = text.rfind("\n") + 1
                carry = text[cut:]
                if cut:
                    reader.feed(text[:cut].split("\n")[:-1])
            if carry:
                reader.feed_last(carry)
        except UnicodeDecodeError:
            raise BadInput(f"{path}:{_undecodable_line(path)}: not UTF-8 text; is this a measurement CSV?") from None
        except OSError as exc:
            raise BadInput(f"{path}: cannot read: {exc.strerror or exc}") from None
    return reader.arm


class _CsvReader:
    """Rows of one CSV into an Arm: whole chunks column-wise at C speed, any odd chunk line by line."""

    def __init__(self, path):
        self.path = path
        self.arm = Arm(path)
        self.number = 0           # lines consumed so far
        self.labelled = None      # whether rows carry a block column, once known

    def feed(self, lines) -> None:
        first = self.number
        self.number += len(lines)
        if first == 0 and lines and _HEADER.match(lines[0]):
            lines, first = lines[1:], 1
        if not (self.labelled or self._columns(lines)):
            for offset, line in enumerate(lines, first + 1):
                self._line(line, offset, last=False)

    def feed_last(self, line: str) -> None:
        self.number += 1
        if self.number == 1 and _HEADER.match(line):
            return
        self._line(line, self.number, last=True)

    def _columns(self, lines) -> bool:
        """The fast path: every line has three fields that parse; False sends the chunk line by line."""
        if not lines or set(map(str.count, lines, repeat(","))) != {2}:
            return False
        fields = ",".join(lines).split(",")
        stamps = fields[0::3]
        try:
            latencies = list(map(float, fields[1::3]))
            codes = list(map(int, fields[2::3]))
            try:
                collections.deque(map(datetime.fromisoformat, stamps), maxlen=0)
            except ValueError:
                epochs = list(map(float, stamps))
                if not 0 <= min(epochs) <= max(epochs) < math.inf or any(map(math.isnan, epochs)):
                    return False
        except ValueError:
            return False
        if not 0 <= min(latencies) <= max(latencies) < math.inf or any(map(math.isnan, latencies)):
            return False
        distinct = set(codes)
        if any(not (code == 0 or 100 <= code <= 999) for code in distinct):
            return False
        self.labelled = False
        self.arm.total += len(codes)
        if any(code == 0 or code >= 500 for code in distinct):
            ok = [latency for latency, code in zip(latencies, codes) if 0 < code < 500]
            self.arm.errors += len(codes) - len(ok)
            latencies = ok
        self.arm.latencies.extend(latencies)
        return True

    def _line(self, line: str, number: int, last: bool) -> None:
        try:
            latency, code, block = _parse_row(line)
            if self.labelled is not None and (block is None) == self.labelled:
                raise ValueError("a block column in some rows and not in others; label every row or none")
        except ValueError as exc:
            if not line.strip():
                return
            if last:
                warn(f"{self.path}:{number}: truncated final line skipped")
                return
            raise BadInput(f"{self.path}:{number}: malformed row {line.strip()[:60]!r}: {exc}") from None
        self.labelled = block is not None
        at = None
        if block is not None and block not in self.arm.block_started:
            at = _epoch(line.split(",")[0].strip())
        self.arm.add(latency, code, block, at)


def _undecodable_line(path: str) -> int:
    """The number of the first line that is not UTF-8 (the decoder reads ahead in chunks)."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                return number
    return 0


###### Statistics (pure functions, no I/O) ######

_NORMAL = NormalDist()


def percentile(sorted_values, pct: float):
    """Nearest-rank percentile: the smallest observed value with at least pct% of the data at or below it."""
    n = len(sorted_values)
    if n == 0:
        return None
    rank = math.ceil(pct * n / 100 - 1e-9)
    return sorted_values[min(n, max(1, rank)) - 1]


def summarize(arm: Arm, sorted_latencies) -> dict:
    """The per-arm figures of SPEC.md: n, errors, p50/p90/p99 (ms, successful rows), err_pct."""
    def rounded(value):
        return None if value is None else round(value, 3)
    return {
        "n": arm.total,
        "errors": arm.errors,
        "p50_ms": rounded(percentile(sorted_latencies, 50)),
        "p90_ms": rounded(percentile(sorted_latencies, 90)),
        "p99_ms": rounded(percentile(sorted_latencies, 99)),
        "err_pct": round(100.0 * arm.errors / arm.total, 4) if arm.total else 0.0,
    }


def _u_statistic(base, var):
    """Mann-Whitney U of the variant being faster: pairs (b, v) with v < b, ties counting half.

    Both lists sorted.  Also returns the tie term sum(t^3 - t) over tied groups of both arms pooled.
    Measured latencies (3 decimals) are heavily tied, so where distinct values are few the
    work goes value by value; otherwise sample by sample with C-level bisects.
    """
    n1, n2 = len(base), len(var)
    repeats = _adjacent_ties(base) + _adjacent_ties(var)
    if 4 * (n1 + n2 - repeats) < n1 + n2:
        return _u_by_value(base, var)
    at_or_below = sum(map(bisect.bisect_right, repeat(base), var))
    below = sum(map(bisect.bisect_left, repeat(base), var))
    u_faster = n1 * n2 - 0.5 * (at_or_below + below)
    if not repeats and at_or_below == below:
        return u_faster, 0
    return u_faster, _u_by_value(base, var)[1]


def _adjacent_ties(sorted_values) -> int:
    return sum(map(operator.eq, sorted_values, islice(sorted_values, 1, None)))


def _u_by_value(base, var):
    """_u_statistic over distinct values: Counter of a sorted list keeps its keys in order."""
    n1 = len(base)
    base_counts, var_counts = collections.Counter(base), collections.Counter(var)
    u_faster = 0.0
    ties = 0
    base_below = 0
    for value in sorted(base_counts.keys() | var_counts.keys()):
        in_base, in_var = base_counts.get(value, 0), var_counts.get(value, 0)
        if in_var:
            u_faster += in_var * (n1 - base_below - in_base + 0.5 * in_base)
        size = in_base + in_var
        ties += size * size * size - size
        base_below += in_base
    return u_faster, ties


def exact_u_cdf(u: float, n1: int, n2: int) -> float:
    """P(U <= u) for the Mann-Whitney U of untied samples of sizes n1, n2 (exact)."""
    frequencies = _u_frequencies(min(n1, n2), max(n1, n2))
    limit = math.floor(u + 1e-9)
    if limit < 0:
        return 0.0
    return sum(frequencies[: limit + 1]) / math.comb(n1 + n2, n1)


def _u_frequencies(m: int, n: int) -> list:
    """Counts of each U value: coefficients of the Gaussian binomial [m+n choose m]_q."""
    top = m * n
    coefficients = [1] + [0] * top
    for i in range(1, m + 1):
        for k in range(top, n + i - 1, -1):
            coefficients[k] -= coefficients[k - n - i]
        for k in range(i, top + 1):
            coefficients[k] += coefficients[k - i]
    return coefficients


EXACT_LIMIT = 2500   # n1 * n2 at or below which an untied single-stratum test is exact


def rank_test(strata) -> dict:
    """One-sided rank test that the variant is faster: Mann-Whitney U, or van Elteren across blocks.

    `strata` is a list of (baseline_sorted, variant_sorted) lists, one per block (one for an
    unblocked comparison).  Ties are corrected for; a single untied stratum with
    n1 * n2 <= EXACT_LIMIT uses the exact distribution, anything else the normal approximation
    (with continuity correction for a single stratum).  Returns p_value, z, u and the method.
    """
    strata = [(b, v) for b, v in strata if b and v]
    if not strata:
        return {"p_value": 1.0, "z": 0.0, "u": 0.0, "method": "none (an arm is empty)"}
    if len(strata) == 1:
        base, var = strata[0]
        n1, n2 = len(base), len(var)
        u, ties = _u_statistic(base, var)
        if not ties and n1 * n2 <= EXACT_LIMIT:
            p_value = exact_u_cdf(n1 * n2 - u, n1, n2)
            return {"p_value": p_value, "z": None, "u": u, "method": "Mann-Whitney U, exact"}
        mean = n1 * n2 / 2
        big_n = n1 + n2
        variance = n1 * n2 / 12 * ((big_n + 1) - ties / (big_n * (big_n - 1)))
        if variance <= 0:
            return {"p_value": 1.0, "z": 0.0, "u": u, "method": "Mann-Whitney U (all values tied)"}
        z = (u - mean - 0.5) / math.sqrt(variance)
        return {"p_value": 0.5 * math.erfc(z / math.sqrt(2)), "z": z, "u": u,
                "method": "Mann-Whitney U, normal approximation with tie and continuity correction"}
    statistic = variance = u_total = 0.0
    for base, var in strata:
        n1, n2 = len(base), len(var)
        big_n = n1 + n2
        u, ties = _u_statistic(base, var)
        weight = 1.0 / (big_n + 1)
        statistic += weight * (u - n1 * n2 / 2)
        if big_n > 1:
            variance += weight * weight * n1 * n2 / 12 * ((big_n + 1) - ties / (big_n * (big_n - 1)))
        u_total += u
    if variance <= 0:
        return {"p_value": 1.0, "z": 0.0, "u": u_total, "method": "van Elteren (all values tied)"}
    z = statistic / math.sqrt(variance)
    return {"p_value": 0.5 * math.erfc(z / math.sqrt(2)), "z": z, "u": u_total,
            "method": f"van Elteren stratified rank test over {len(strata)} blocks"}


def binomial_sf(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p)."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    log_p, log_q, log_n = math.log(p), math.log1p(-p), math.lgamma(n + 1)
    below = sum(math.exp(log_n - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * log_p + (n - i) * log_q)
                for i in range(k))
    return max(0.0, 1.0 - below)


def _betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b) (continued fraction, Lentz's method)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    if x > (a + 1) / (a + b + 2):
        return 1.0 - _betainc(b, a, 1.0 - x)
    front = math.exp(a * math.log(x) + b * math.log1p(-x)
                     + math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)) / a
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, 500):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            result *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return front * result


def t_cdf(value: float, df: float) -> float:
    """P(T <= value) for Student's t with df degrees of freedom."""
    if math.isinf(value):
        return 1.0 if value > 0 else 0.0
    tail = 0.5 * _betainc(df / 2, 0.5, df / (df + value * value))
    return 1.0 - tail if value > 0 else tail


def t_quantile(probability: float, df: float) -> float:
    """The value with P(T <= value) = probability (bisection on t_cdf)."""
    low, high = -1e6, 1e6
    for _ in range(200):
        middle = (low + high) / 2
        if t_cdf(middle, df) < probability:
            low = middle
        else:
            high = middle
    return (low + high) / 2


def crossover_test(pairs, confidence: float) -> dict | None:
    """Period-adjusted comparison of block medians across switchback pairs (an AB/BA crossover).

    `pairs` holds (baseline_p50, variant_p50, variant_first) per pair.  Each pair's log ratio
    carries the effect plus or minus a period effect (drift between the pair's two blocks); the
    mean of the two order groups' means cancels that (Hills & Armitage), with a t test on the
    pooled within-group spread.  Without both orders it falls back to a paired t test.  Returns
    the log-ratio estimate, its interval at `confidence`, and the one-sided p that the variant is
    faster, or None with fewer than 3 usable pairs.
    """
    groups = {True: [], False: [], None: []}
    for base_p50, var_p50, variant_first in pairs:
        if base_p50 and var_p50 and base_p50 > 0 and var_p50 > 0:
            groups[variant_first].append(math.log(var_p50) - math.log(base_p50))
    first, second = groups[True], groups[False]
    if first and second and len(first) + len(second) >= 3 and not groups[None]:
        estimate = (statistics.fmean(first) + statistics.fmean(second)) / 2
        df = len(first) + len(second) - 2
        spread = sum((r - statistics.fmean(g)) ** 2 for g in (first, second) for r in g)
        se = 0.5 * math.sqrt(spread / df if df else 0.0) * math.sqrt(1 / len(first) + 1 / len(second))
        method = "period-adjusted crossover t test on block medians"
    else:
        ratios = first + second + groups[None]
        if len(ratios) < 3:
            return None
        estimate, df = statistics.fmean(ratios), len(ratios) - 1
        se = statistics.stdev(ratios) / math.sqrt(len(ratios))
        method = "paired t test on block medians"
    if df < 1:
        return None
    if se == 0:
        statistic = -math.inf if estimate < 0 else (math.inf if estimate > 0 else 0.0)
    else:
        statistic = estimate / se
    half = t_quantile(0.5 + confidence / 2, df) * se
    return {"estimate": estimate, "low": estimate - half, "high": estimate + half, "df": df,
            "p_value": t_cdf(statistic, df) if statistic else 0.5, "method": method}


def sequential_alpha(confidence: float, fraction: float) -> float:
    """Significance level at a look `fraction` of the way to the horizon, valid however often one looks.

    The boundary z >= z(1 - alpha/2) / sqrt(fraction) is O'Brien-Fleming's under continuous
    monitoring: by the reflection principle a Brownian path crosses it before the horizon with
    probability alpha (Lan & DeMets 1983), so checking every few seconds keeps false keeps at alpha.
    """
    alpha = 1 - confidence
    boundary = _NORMAL.inv_cdf(1 - alpha / 2) / math.sqrt(min(1.0, max(fraction, 1e-6)))
    return 0.5 * math.erfc(boundary / math.sqrt(2))     # 1 - cdf would round to 0 early in the run


def wilson_lower(successes: int, trials: int, confidence: float) -> float:
    """One-sided lower confidence bound of a proportion (Wilson score)."""
    if trials == 0:
        return 0.0
    z = _NORMAL.inv_cdf(confidence)
    share = successes / trials
    center = share + z * z / (2 * trials)
    spread = z * math.sqrt(share * (1 - share) / trials + z * z / (4 * trials * trials))
    return max(0.0, (center - spread) / (1 + z * z / trials))


def _log_median_se(sorted_values):
    """Standard error of log(median) from the distribution-free order-statistic interval (Bonett-Price)."""
    n = len(sorted_values)
    c = max(1, round((n + 1) / 2 - math.sqrt(n)))
    if n <= 1000:
        tail = sum(math.comb(n, k) for k in range(c)) / 2 ** n
    else:
        tail = _NORMAL.cdf((c - 0.5 - n / 2) / (math.sqrt(n) / 2))
    low, high = sorted_values[c - 1], sorted_values[n - c]
    if low <= 0 or tail <= 0 or tail >= 0.5:
        return None
    return (math.log(high) - math.log(low)) / (2 * _NORMAL.inv_cdf(1 - tail))


def median_ratio_interval(base_sorted, var_sorted, confidence: float):
    """Two-sided interval at `confidence` for median(variant) / median(baseline), or None."""
    if len(base_sorted) < 2 or len(var_sorted) < 2:
        return None
    base_median, var_median = percentile(base_sorted, 50), percentile(var_sorted, 50)
    se_base, se_var = _log_median_se(base_sorted), _log_median_se(var_sorted)
    if not base_median or not var_median or se_base is None or se_var is None:
        return None
    center = math.log(var_median) - math.log(base_median)
    half = _NORMAL.inv_cdf(0.5 + confidence / 2) * math.hypot(se_base, se_var)
    return math.exp(center - half), math.exp(center + half)


###### The decision ######

class Thresholds:
    """The five rules' settings (SPEC.md "The decision")."""

    KEYS = ("IMPROVE_PCT", "MAX_ERR_DELTA_PCT", "CONFIDENCE", "MIN_SAMPLES", "MAX_TAIL_REGRESS_PCT")

    def __init__(self, settings: dict):
        self.improve_pct = settings["IMPROVE_PCT"]
        self.max_err_delta_pct = settings["MAX_ERR_DELTA_PCT"]
        self.confidence = settings["CONFIDENCE"]
        self.min_samples = settings["MIN_SAMPLES"]
        self.max_tail_regress_pct = settings["MAX_TAIL_REGRESS_PCT"]


BORDERLINE_POINTS = 3.0
EPSILON = 1e-9           # thresholds compare with this slack: 2.2 - 1.2 is 1.0000000000000002 in floats
TAIL_CONFIDENCE = 0.90   # a p99 regression counts when more than 1% of requests exceed the bound at this confidence


class Verdict:
    """keep or revert, the rule that decided, and every figure behind it."""

    def __init__(self, **fields):
        self.__dict__.update(fields)

    def to_json(self) -> dict:
        return dict(self.__dict__)


def _pct_change(old, new):
    if old is None or new is None:
        return None
    if old == 0:
        return 0.0 if new == 0 else math.inf
    return (new - old) / old * 100


def _round(value, digits=3):
    if value is None or not math.isfinite(value):
        return value if value is None else None
    return round(value, digits)


def verdict(base: Arm, var: Arm, thresholds: Thresholds, fraction=None) -> Verdict:
    """Apply SPEC.md's five rules to two arms; pure (no I/O), the same input gives the same verdict.

    Block-labelled arms are compared within the blocks both have: the rank test is van Elteren's,
    and the p50 improvement and a second significance test come from the period-adjusted
    crossover analysis of block medians, so drift between blocks cannot pass for an effect.
    `fraction` is set by a sequential stop: how far to the horizon this look is; rule 3 then
    uses sequential_alpha, whose error bound holds however many looks are made.
    """
    t = thresholds
    if base.blocks is not None and var.blocks is not None:
        common = set(base.block_totals) & set(var.block_totals)
        base, var = base.only(common), var.only(common)
    base_sorted, var_sorted = sorted(base.latencies), sorted(var.latencies)
    base_fig, var_fig = summarize(base, base_sorted), summarize(var, var_sorted)
    strata = _strata(base, var, base_sorted, var_sorted)
    test = rank_test([(b, v) for _, b, v in strata])
    p_value, method = test["p_value"], test["method"]
    interval = median_ratio_interval(base_sorted, var_sorted, t.confidence)
    improve = _pct_change(base_fig["p50_ms"], var_fig["p50_ms"])
    improve = None if improve is None else 0.0 - improve
    improve_ci = None if interval is None else [(1 - interval[1]) * 100, (1 - interval[0]) * 100]
    blocks = []
    if len(strata) > 1:
        blocks = [{"block": block, "base_p50_ms": percentile(b, 50), "var_p50_ms": percentile(v, 50),
                   "variant_first": _variant_first(base, var, block)} for block, b, v in strata]
        cross = crossover_test([(x["base_p50_ms"], x["var_p50_ms"], x["variant_first"]) for x in blocks],
                               t.confidence)
        if cross is not None:
            improve = (1 - math.exp(cross["estimate"])) * 100
            improve_ci = [(1 - math.exp(cross["high"])) * 100, (1 - math.exp(cross["low"])) * 100]
            p_value = max(p_value, cross["p_value"])
            method = f"{method}, and {cross['method']} (df {cross['df']}); p is the larger"
    alpha = 1 - t.confidence if fraction is None else sequential_alpha(t.confidence, fraction)
    err_delta = var_fig["err_pct"] - base_fig["err_pct"]
    tail = _pct_change(base_fig["p99_ms"], var_fig["p99_ms"])

    failed = []
    if base.ok < t.min_samples or var.ok < t.min_samples:
        failed.append(("samples", f"insufficient data: {base.ok} baseline and {var.ok} variant successful "
                                  f"samples, {t.min_samples} needed in each"))
    else:
        if err_delta > t.max_err_delta_pct + EPSILON:
            failed.append(("errors", f"error rate rose {err_delta:.2f} points "
                                     f"(at most {t.max_err_delta_pct:g} allowed)"))
        if tail is not None and tail > t.max_tail_regress_pct + EPSILON:
            limit = base_fig["p99_ms"] * (1 + t.max_tail_regress_pct / 100)
            above = var.ok - bisect.bisect_right(var_sorted, limit)
            p_tail = binomial_sf(above, var.ok, 0.01)
            if p_tail <= 1 - TAIL_CONFIDENCE:
                failed.append(("tail", f"p99 regressed {_fmt_pct(tail)} (at most {t.max_tail_regress_pct:g}% "
                                       f"allowed; {above} of {var.ok} requests above {limit:.3g} ms, "
                                       f"p={p_tail:.2g} against 1%)"))
        if improve is None or improve < t.improve_pct - EPSILON:
            change = (f"p50 got {_fmt_pct(-improve)} slower" if improve is not None and improve < 0
                      else f"p50 improved only {_fmt_pct(improve)}")
            failed.append(("improvement", f"{change} (needs a {t.improve_pct:g}% improvement)"))
        if p_value > alpha * (1 + EPSILON):
            look = "" if fraction is None else f" at {fraction:.0%} of the horizon"
            failed.append(("significance", f"not significant at {t.confidence:g} confidence{look} "
                                           f"(p={p_value:.3g}, needs <= {alpha:.3g})"))
    decision = "revert" if failed else "keep"
    if failed:
        reason = "revert: " + "; ".join(text for _, text in failed)
    else:
        reason = (f"keep: p50 improved {_fmt_pct(improve)} (needs {t.improve_pct:g}%), significant "
                  f"(p={p_value:.3g}); errors {err_delta:+.2f} points, p99 {_fmt_signed(tail)}")
    enough = base.ok >= t.min_samples and var.ok >= t.min_samples
    near_bar = improve is not None and abs(improve - t.improve_pct) <= BORDERLINE_POINTS + EPSILON
    borderline = enough and (near_bar or [name for name, _ in failed] == ["significance"])
    return Verdict(
        decision=decision, reason=reason, borderline=borderline,
        failed_rules=[name for name, _ in failed],
        baseline=base_fig, variant=var_fig,
        improve_pct=_round(improve), improve_ci=None if improve_ci is None else [_round(x) for x in improve_ci],
        err_delta_pct=_round(err_delta, 4), p99_regress_pct=_round(tail),
        p_value=float(f"{p_value:.6g}"), alpha=float(f"{alpha:.6g}"), confidence=t.confidence, test=method,
        blocks=blocks, fraction=fraction,
        thresholds={key.lower(): getattr(t, key.lower()) for key in Thresholds.KEYS},
    )


def _strata(base: Arm, var: Arm, base_sorted, var_sorted):
    """(block, baseline_sorted, variant_sorted) per block both arms have; one stratum when unblocked."""
    if base.blocks is None or var.blocks is None:
        return [(None, base_sorted, var_sorted)]
    groups = {}
    for arm, side in ((base, 0), (var, 1)):
        for latency, block in zip(arm.latencies, arm.blocks):
            groups.setdefault(block, ([], []))[side].append(latency)
    return [(block, sorted(b), sorted(v)) for block, (b, v) in sorted(groups.items()) if b and v]


def _variant_first(base: Arm, var: Arm, block):
    """Whether the variant's half of a block pair ran first; None when the CSVs do not tell."""
    if block in base.block_started and block in var.block_started:
        return var.block_started[block] < base.block_started[block]
    return None


def _fmt_pct(value):
    if value is None:
        return "n/a"
    if not math.isfinite(value):
        return "without bound (from zero)"
    return f"{value:.1f}%"


def _fmt_signed(value):
    if value is None or not math.isfinite(value):
        return _fmt_pct(value)
    return f"{value:+.1f}%"


def format_verdict(v: Verdict) -> str:
    """The short human summary decide prints on stderr."""
    def arm_line(label, fig):
        def ms(key):
            return "n/a" if fig[key] is None else f"{fig[key]:.2f}"
        return (f"{label:<9}n={fig['n']} errors={fig['errors']} ({fig['err_pct']:.2f}%)  "
                f"p50 {ms('p50_ms')}  p90 {ms('p90_ms')}  p99 {ms('p99_ms')} ms")
    interval = ("" if v.improve_ci is None else
                f" [{v.confidence:g} CI {v.improve_ci[0]:.1f}% .. {v.improve_ci[1]:.1f}%]")
    lines = [
        arm_line("baseline", v.baseline),
        arm_line("variant", v.variant),
        f"p50 improvement {_fmt_pct(v.improve_pct)}{interval}; p={v.p_value:.3g} ({v.test})",
        f"errors {v.err_delta_pct:+.2f} points; p99 {_fmt_signed(v.p99_regress_pct)}",
        v.reason + ("  [borderline]" if v.borderline else ""),
    ]
    return "\n".join(lines)


def decide_files(baseline_path: str, variant_path: str, thresholds: Thresholds) -> Verdict:
    """Read two measurement CSVs and return the verdict."""
    return verdict(read_measurements(baseline_path), read_measurements(variant_path), thresholds)


###### Files: atomic writes, the lock, the journal ######

def utc_now() -> str:
    """The current UTC time as ISO-8601 with a Z."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def write_atomic(path: str, text: str) -> None:
    """Write text to path through a temp file and a rename: a reader sees the old or the new file, never half."""
    folder = os.path.dirname(path) or "."
    temp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        with open(temp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise


def write_json(path: str, value) -> None:
    write_atomic(path, json.dumps(value, indent=2) + "\n")


def read_json(path: str, default=None):
    """A JSON file's value, or default when it is missing or not valid JSON."""
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return default


class LockHeld(WorkFailed):
    """Another run holds the home's lock."""


class HomeLock:
    """fcntl.flock on var/lock, holding the pid of the run that has it."""

    def __init__(self, var: str):
        self.path = os.path.join(var, "lock")
        self.handle = None

    def __enter__(self):
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            handle = open(self.path, "a+", encoding="utf-8")
        except OSError as exc:
            raise WorkFailed(f"{self.path}: cannot open the lock: {exc.strerror or exc}") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise LockHeld(f"another run holds the lock {self.path} (pid {holder}); try again when it ends") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self.handle = handle
        return self

    def __exit__(self, *exc):
        with contextlib.suppress(OSError):
            self.handle.truncate(0)
        self.handle.close()


###### Commands: the one place that runs a shell command ######

class CommandResult:
    """How a command ended: exit code (None when killed for its time box), output, seconds."""

    def __init__(self, command, code, output, seconds, timed_out):
        self.command, self.code, self.output, self.seconds, self.timed_out = command, code, output, seconds, timed_out
        self.errors = ""

    @property
    def ok(self) -> bool:
        return self.code == 0 and not self.timed_out

    def describe(self) -> str:
        if self.timed_out:
            return f"ran past its time box and was killed after {self.seconds:.1f} s"
        if self.code is None:
            return "could not be started"
        return f"exited {self.code} after {self.seconds:.2f} s"


def run_command(command: str, cwd: str, timeout: float, env=None, should_stop=None,
                stdout_only=False) -> CommandResult:
    """Run a shell command in its own process group; kill the whole group when it overruns.

    With should_stop, the command is also killed as soon as should_stop() turns true.  The
    output is stdout and stderr together, or with stdout_only stdout alone (stderr then goes
    to the result's `errors`).
    """
    started = time.monotonic()
    try:
        child = subprocess.Popen(["/bin/sh", "-c", command], cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                 stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE if stdout_only else subprocess.STDOUT,
                                 start_new_session=True)
    except OSError as exc:
        return CommandResult(command, None, str(exc), 0.0, False)
    deadline = started + timeout
    timed_out = False
    try:
        while True:
            try:
                step = deadline - time.monotonic() if should_stop is None else min(0.2, deadline - time.monotonic())
                output, errors = child.communicate(timeout=max(0.0, step))
                break
            except subprocess.TimeoutExpired:
                if time.monotonic() >= deadline or (should_stop is not None and should_stop()):
                    timed_out = time.monotonic() >= deadline
                    _kill_group(child)
                    output, errors = child.communicate()
                    break
    except BaseException:
        _kill_group(child)
        child.wait()
        raise
    result = CommandResult(command, child.returncode, _cut(output), time.monotonic() - started, timed_out)
    result.errors = _cut(errors)
    return result


def _cut(raw) -> str:
    text = (raw or b"").decode("utf-8", "replace")
    return text if len(text) <= 8000 else text[:4000] + "\n[... output cut ...]\n" + text[-4000:]


def _kill_group(child):
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.pid, sig)
        try:
            child.wait(timeout=2)
            return
        except subprocess.TimeoutExpired:
            continue


###### Run: the orchestrator ######

class RevertFailed(WorkFailed):
    """A revert failed: the box may be left on a variant; the journal stays for the next run."""


class Interrupted(WorkFailed):
    """SIGTERM or SIGINT arrived: what was applied has been reverted."""


class Home:
    """The paths of a home (SPEC.md "Layout of a home")."""

    def __init__(self, root: str):
        self.root = root
        self.var = os.path.join(root, "var")
        self.runs = os.path.join(self.var, "runs")
        self.state = os.path.join(self.var, "state.json")
        self.history = os.path.join(self.var, "history.jsonl")
        self.journal = os.path.join(self.var, "applied.json")
        self.kept = os.path.join(self.var, "kept.json")

    def www(self) -> str:
        """The home's www/, else the one beside smart.py."""
        own = os.path.join(self.root, "www")
        return own if os.path.isdir(own) else os.path.join(os.path.dirname(os.path.abspath(__file__)), "www")

    def new_run_dir(self):
        """A fresh RUN_ID (UTC start time, -2, -3... if taken) and its folder."""
        os.makedirs(self.runs, exist_ok=True)
        base = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
        for suffix in count(1):
            run_id = base if suffix == 1 else f"{base}-{suffix}"
            path = os.path.join(self.runs, run_id)
            try:
                os.mkdir(path)
                return run_id, path
            except FileExistsError:
                continue


class StopFlag:
    """Set by SIGTERM/SIGINT; every wait and measurement of a run checks it."""

    def __init__(self):
        self.signal_name = None

    def __bool__(self):
        return self.signal_name is not None

    def install(self):
        def handler(signum, frame):
            self.signal_name = signal.Signals(signum).name
        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
        return lambda: [signal.signal(sig, old) for sig, old in previous.items()]

    def check(self):
        if self:
            raise Interrupted(f"stopped by {self.signal_name}")


class Runner:
    """Runs experiments the way SPEC.md "A run" says, so that no variant stays applied unless kept."""

    def __init__(self, home: Home, settings: dict, out=None, stop: StopFlag | None = None):
        self.home, self.settings = home, settings
        self.out = sys.stdout if out is None else out
        self.stop = stop or StopFlag()
        self.log_handle = None
        self.early_lines = []
        self.state = None

    # -- logging and state --
    def log(self, message: str, level: str = "info") -> None:
        """One timestamped line in run.log and on stdout (the journal, under systemd)."""
        line = f"{utc_now()} {message}"
        if self.log_handle is not None:
            self.log_handle.write(line + "\n")
            self.log_handle.flush()
        else:
            self.early_lines.append(line)     # recovery before a run folder exists: goes into the next run.log
        emit(line, self.out, level)

    def log_command(self, what: str, result: CommandResult) -> None:
        self.log(f"{what}: $ {result.command}  -> {result.describe()}")
        for line in (result.output + result.errors).rstrip().splitlines()[-40:]:
            self.log(f"    | {line}")

    def save_state(self, **changes) -> None:
        self.state.update(changes)
        self.state["updated_at"] = utc_now()
        write_json(self.home.state, self.state)

    def command(self, what: str, command: str, cwd: str, timeout=None, stdout_only=False) -> CommandResult:
        result = run_command(command, cwd, timeout or self.settings["COMMAND_TIMEOUT_SECONDS"],
                             stdout_only=stdout_only)
        self.log_command(what, result)
        return result

    # -- the journal --
    def write_journal(self, experiment: Experiment, variant: str, run_id: str) -> None:
        write_json(self.home.journal, {
            "run_id": run_id, "experiment": experiment.id, "path": experiment.path, "variant": variant,
            "revert": experiment.revert, "pid": os.getpid(), "written_at": utc_now()})

    def clear_journal(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.home.journal)

    def recover(self) -> dict | None:
        """Revert what an interrupted run left applied (var/applied.json); RevertFailed if that fails."""
        entry = read_json(self.home.journal)
        if entry is None:
            if os.path.exists(self.home.journal):
                raise RevertFailed(f"{self.home.journal}: unreadable journal; check what is applied, "
                                   "revert by hand, then delete it")
            return None
        self.log(f"recovering: run {entry.get('run_id')} left {entry.get('experiment')}/{entry.get('variant')} "
                 f"applied (pid {entry.get('pid')}); reverting it first")
        result = self.command("recover revert", entry["revert"], entry["path"])
        if not result.ok:
            raise RevertFailed(f"recovery revert of {entry.get('experiment')}/{entry.get('variant')} "
                               f"{result.describe()}; fix it by hand, then run 'smart.py recover'")
        self.clear_journal()
        self._close_interrupted_run(entry)
        return entry

    def _close_interrupted_run(self, entry: dict) -> None:
        state = read_json(self.home.state)
        if isinstance(state, dict) and state.get("run_id") == entry.get("run_id") and state.get("status") == "failed":
            state.update(recovered_at=utc_now(), updated_at=utc_now())     # the failed revert is now done
            write_json(self.home.state, state)
        if isinstance(state, dict) and state.get("run_id") == entry.get("run_id") and state.get("status") == "running":
            state.update(status="interrupted", phase="recovered",
                         reason=f"the run stopped while {entry.get('variant')} was applied; "
                                f"reverted by recovery at {utc_now()}", current=None, updated_at=utc_now())
            write_json(self.home.state, state)
            self._append_history(state)

    # -- one invocation --
    def run(self, experiments, rotation=False) -> int:
        """Lock, recover, then run each experiment; 0 when all finished, 1 when any failed."""
        def each():
            failed = 0
            for experiment in experiments:
                if self.stop:
                    self.log(f"{self.stop.signal_name}: {experiment.id} not started")
                    failed += 1
                    continue
                failed += self.run_experiment(experiment, rotation=rotation) != "done"
                if os.path.exists(self.home.journal):
                    self.log("a revert failed: no further experiment starts until it is fixed", "error")
                    break
            return 1 if failed else 0
        return self.locked(each)

    def locked(self, work) -> int:
        """Hold the home's lock with signals caught, revert what a crashed run left, then do the work."""
        os.makedirs(self.home.var, exist_ok=True)
        restore_signals = self.stop.install()
        try:
            with HomeLock(self.home.var):
                self.recover()
                return work()
        finally:
            restore_signals()

    def apply(self, experiment: Experiment, name: str) -> int:
        """Apply one known variant on purpose (a fleet rollout): verify it against a fresh baseline.

        0 when it is applied and did no harm (or was already applied); 1 when it did harm and was
        reverted, or a revert failed.
        """
        variant = experiment.variant(name)
        if variant is None or variant is experiment.baseline:
            names = ", ".join(v["name"] for v in experiment.candidates)
            raise BadInput(f"{experiment.id} has no variant {name!r} to apply; its variants: {names}")

        def work():
            kept = (read_json(self.home.kept, {}) or {}).get(experiment.id)
            if kept and kept.get("variant") == name:
                print(f"{experiment.id}: {name} is already applied (kept in run {kept.get('run_id')}); nothing to do",
                      file=self.out)
                return 0
            if kept:
                self.revert_kept(experiment)
            status = self.run_experiment(experiment, body=lambda trial: trial.run_apply(variant))
            state = read_json(self.home.state, {}) or {}
            return 0 if status == "done" and state.get("kept_variant") == name else 1
        return self.locked(work)

    def revert_experiment(self, experiment: Experiment) -> int:
        """Revert an experiment's kept variant, reopening the experiment; 0 also when nothing was applied."""
        def work():
            if not self.revert_kept(experiment):
                print(f"{experiment.id}: nothing applied; it is on its baseline", file=self.out)
            return 0
        return self.locked(work)

    def revert_kept(self, experiment: Experiment) -> bool:
        """Run the revert of the experiment's kept variant and forget it; RevertFailed if that fails."""
        kept = read_json(self.home.kept, {}) or {}
        entry = kept.get(experiment.id)
        if not entry:
            return False
        result = self.command(f"revert {entry.get('variant')}", experiment.revert, experiment.path)
        if not result.ok:
            raise RevertFailed(f"revert of {experiment.id}/{entry.get('variant')} {result.describe()}")
        del kept[experiment.id]
        write_json(self.home.kept, kept)
        print(f"{experiment.id}: reverted {entry.get('variant')}", file=self.out)
        return True

    def resting(self, experiment: Experiment):
        """Why the timer's run skips an experiment now (a kept variant, or tried within RETRY_HOURS), or None."""
        kept = (read_json(self.home.kept, {}) or {}).get(experiment.id)
        if kept:
            return (f"settled, {kept.get('variant')} kept in run {kept.get('run_id')}; "
                    f"'smart.py revert {experiment.id}' reopens it")
        last = None
        for entry in _history(self.home):
            if entry.get("experiment") == experiment.id:
                last = entry
        age = _age_minutes(last.get("finished_at")) if last else None
        if last and last.get("status") == "done" and age is not None and age < self.settings["RETRY_HOURS"] * 60:
            return (f"tried in run {last.get('run_id')} {age:.0f} minutes ago, nothing kept; tried again after "
                    f"RETRY_HOURS={self.settings['RETRY_HOURS']:g} (or name it to run it now)")
        return None

    def run_experiment(self, experiment: Experiment, body=None, rotation=False) -> str:
        """One experiment as one run: its own RUN_ID, run folder, state and history line.

        In the timer's rotation (no experiment named) an experiment that is resting is skipped.
        """
        why = self.resting(experiment) if rotation else None
        if body is None and not rotation and self.revert_kept(experiment):
            self.log(f"{experiment.id}: its kept variant was reverted, so the run starts from the baseline")
        if why:
            print(f"{experiment.id}: {why}", file=self.out)
            state = read_json(self.home.state)
            if isinstance(state, dict):
                state["checked_at"] = utc_now()      # the timer ran: the dashboard must not call it stale
                write_json(self.home.state, state)
            return "done"
        try:
            run_id, run_dir = self.home.new_run_dir()
            self.log_handle = open(os.path.join(run_dir, "run.log"), "a", encoding="utf-8")
        except OSError as exc:
            raise WorkFailed(f"cannot create a run folder under {self.home.runs}: {exc.strerror or exc}; "
                             "nothing was changed") from None
        for line in self.early_lines:
            self.log_handle.write(line + "\n")
        self.early_lines.clear()
        self.state = {
            "run_id": run_id, "experiment": experiment.id, "description": experiment.description,
            "kept_variant": None, "metrics": None, "status": "running", "phase": "starting",
            "started_at": utc_now(), "finished_at": None, "host": socket.gethostname(),
            "version": __version__, "design": None, "variants": [], "current": None, "reason": None,
            "stopped_early": None, "defined_variants": [v["name"] for v in experiment.variants], "coach": None,
        }
        trial = Trial(self, experiment, run_id, run_dir)
        try:
            self.save_state()
            self.log(f"run {run_id}: experiment {experiment.id} ({len(experiment.candidates)} variants)")
            self.hook("pre-run", run_id)
            (body or Trial.run)(trial)
            status = "done"
        except Interrupted as exc:
            status, reason = "interrupted", str(exc)
        except RevertFailed as exc:
            status, reason = "failed", str(exc)
        except (OSError, SmartError) as exc:
            status, reason = "failed", str(exc) if isinstance(exc, SmartError) else f"I/O error: {exc}"
        problems = []
        if status != "done":
            reason = trial.abandon(reason)
            self.log(f"run {run_id} {status}: {reason}", "error" if status == "failed" else "warning")
            problems.append(f"{status}: {reason}")
        try:
            self.finish(status, None if status == "done" else reason)
            self.ask_coach()
            self.hook("post-run", run_id)
        except OSError as exc:
            status = "failed"
            problems.append(f"could not be recorded: {exc}")
        finally:
            self.log_handle.close()
            self.log_handle = None
        if problems:
            emit(f"error: run {run_id} of {experiment.id} " + "; and ".join(problems), sys.stderr, "error")
        return status

    def hook(self, name: str, run_id: str) -> None:
        path = os.path.join(self.home.root, "hooks", name)
        if not os.access(path, os.X_OK):
            return
        result = self.command(f"{name} hook", f"{shlex.quote(path)} {run_id} {shlex.quote(self.home.state)}",
                              self.home.root)
        if not result.ok:
            if name == "pre-run":
                raise WorkFailed(f"pre-run hook {result.describe()}; nothing was changed")
            self.log(f"warning: post-run hook {result.describe()}")

    def finish(self, status: str, reason) -> None:
        """Final state.json, history line, run-folder rotation, dashboard files."""
        self.save_state(status=status, phase="finished", finished_at=utc_now(), current=None,
                        reason=reason or self.state.get("reason"))
        self._append_history(self.state)
        self.rotate_runs()
        publish_dashboard(self.home, running=False)
        self.log(f"finished: status {status}, kept {self.state['kept_variant'] or 'nothing'}")

    def ask_coach(self) -> None:
        """Phone home when PHONE_HOME says so; a coach that fails is logged, never fatal."""
        if not wants_coach(self.state, self.settings):
            return
        self.log(f"asking the coach {_public_url(self.settings['PHONE_HOME_URL'])}")
        try:
            advice = phone_home(self.state, self.settings)
        except (SmartError, OSError) as exc:
            self.log(f"coach: {exc}", "warning")
            self.save_state(coach={"advice": None, "error": str(exc), "at": utc_now(),
                                   "coach": _public_url(self.settings["PHONE_HOME_URL"])})
            return
        self.log(f"coach advice (shown, never executed): {advice['advice']!r}; next_variant "
                 f"{advice['next_variant']}; confidence {advice['confidence']}")
        self.save_state(coach=advice)
        publish_dashboard(self.home)

    def _append_history(self, state: dict) -> None:
        entry = {key: state.get(key) for key in ("run_id", "experiment", "status", "kept_variant", "metrics",
                                                 "started_at", "finished_at", "reason", "design", "stopped_early")}
        entry["variants"] = [{key: v.get(key) for key in ("name", "decision", "reason", "borderline", "metrics")}
                             for v in state.get("variants", [])]
        with open(self.home.history, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(entry) + "\n")

    def rotate_runs(self) -> None:
        """Remove the oldest run folders beyond KEEP_RUNS."""
        runs = sorted(e for e in os.listdir(self.home.runs) if os.path.isdir(os.path.join(self.home.runs, e)))
        for old in runs[: max(0, len(runs) - self.settings["KEEP_RUNS"])]:
            shutil.rmtree(os.path.join(self.home.runs, old), ignore_errors=True)


###### Guardrails and the sequential stop ######

class Guard:
    """Aborts a variant that is clearly harmful while it is applied; it never keeps anything.

    Fed every row from the moment of the apply (warm-up included).  Clearly harmful means: the
    error rate is above the reference's plus MAX_ERR_DELTA_PCT even at the lower end of a
    GUARD_CONFIDENCE interval, or the median latency is GUARD_FACTOR times the reference's p99.
    """

    def __init__(self, reference: Arm, thresholds: Thresholds):
        self.reference, self.thresholds = reference, thresholds
        self.started = time.monotonic()
        self.latencies = []
        self.total = self.errors = 0
        self.checked = 0.0
        self.reason = None

    def add(self, latency_ms: float, code: int) -> None:
        self.total += 1
        if code == 0 or code >= 500:
            self.errors += 1
        else:
            self.latencies.append(latency_ms)

    def tripped(self) -> bool:
        """Check at most twice a second; once tripped, stays tripped."""
        now = time.monotonic()
        if self.reason is None and now - self.checked >= 0.5:
            self.checked = now
            self.reason = self.check(now - self.started)
        return self.reason is not None

    def check(self, seconds: float):
        if self.total < GUARD_MIN_ROWS:
            return None
        reference = self.reference
        base_rate = reference.errors / reference.total if reference.total else 0.0
        bound = wilson_lower(self.errors, self.total, GUARD_CONFIDENCE)
        if bound > base_rate + self.thresholds.max_err_delta_pct / 100:
            return (f"guardrail: {self.errors} of {self.total} requests failed in {seconds:.0f} s "
                    f"({100 * self.errors / self.total:.0f}%, baseline {100 * base_rate:.1f}%)")
        if len(self.latencies) >= GUARD_MIN_ROWS and reference.ok >= GUARD_MIN_ROWS:
            limit = GUARD_FACTOR * percentile(sorted(reference.latencies), 99)
            median = percentile(sorted(self.latencies), 50)
            if median > limit:
                return (f"guardrail: median latency {median:.0f} ms after {seconds:.0f} s is over "
                        f"{GUARD_FACTOR:g} x the baseline p99 ({limit:.0f} ms)")
        return None


GUARD_CONFIDENCE = 0.999
GUARD_FACTOR = 3.0
GUARD_MIN_ROWS = 5


class Look:
    """The sequential stop: a verdict every LOOK_SECONDS that may end a measurement early.

    keep when every rule holds with rule 3 at sequential_alpha (valid however often one looks);
    revert for futility when even the upper end of the improvement's interval is below the bar.
    """

    def __init__(self, base: Arm, var: Arm, thresholds: Thresholds, horizon: float, every: float):
        self.base, self.var, self.thresholds = base, var, thresholds
        self.horizon, self.every = horizon, every
        self.started = time.monotonic()
        self.next_at = self.started + every
        self.result = None
        self.fraction = None

    def due(self) -> bool:
        """Called from the measurement loop; True once a look has decided."""
        now = time.monotonic()
        if self.result is None and now >= self.next_at:
            self.next_at = now + self.every
            self.decide(min(1.0, (now - self.started) / self.horizon))
        return self.result is not None

    def decide(self, fraction: float):
        """One look at `fraction` of the horizon; sets result when the verdict is already certain."""
        result = verdict(self.base, self.var, self.thresholds, fraction=fraction)
        if result.decision == "keep" or _futile(result, self.thresholds):
            self.result, self.fraction = result, fraction
        return self.result


def harm_found(result: Verdict, base: Arm, var: Arm, thresholds: Thresholds):
    """Why a variant applied on request does harm, or None, from its verdict against the baseline:
    too little data, more errors, a worse tail, or a p50 at least IMPROVE_PCT slower with
    significance (the rank test turned around)."""
    if "samples" in result.failed_rules:
        return f"too little data to verify it ({base.ok} and {var.ok} successful samples)"
    if "errors" in result.failed_rules:
        return f"the error rate rose {result.err_delta_pct:.2f} points"
    if "tail" in result.failed_rules:
        return f"p99 regressed {result.p99_regress_pct:.1f}%"
    slower = rank_test([(sorted(var.latencies), sorted(base.latencies))])
    if result.improve_pct <= -thresholds.improve_pct and slower["p_value"] <= 1 - thresholds.confidence:
        return f"p50 got {-result.improve_pct:.1f}% slower (p={slower['p_value']:.3g})"
    return None


def _futile(result: Verdict, thresholds: Thresholds) -> bool:
    """The improvement's interval lies wholly below the bar: no more data will make a keep."""
    return (not result.failed_rules[:1] == ["samples"] and result.improve_ci is not None
            and result.improve_ci[1] < thresholds.improve_pct)


def balanced_orders(rng: random.Random, pairs: int) -> list:
    """Which pairs run the variant first: half of them, chosen at random, so drift cancels out."""
    first = set(rng.sample(range(pairs), pairs // 2 + (rng.random() < 0.5 if pairs % 2 else 0)))
    return [index in first for index in range(pairs)]


###### Trial: one experiment's variants, by design ######

class Trial:
    """One experiment's variants inside a run: switch, warm up, measure, decide, revert unless kept.

    Two designs.  sequential (the original flow): the baseline first, then each variant after
    a cool-down.  switchback: per variant, BLOCKS pairs of a baseline block and a variant block
    in random order, each after a measured warm-up, judged within blocks so drift cancels out.
    In both, a Guard aborts a harmful variant at once and, with EARLY_STOP, a Look may end a
    variant's measurement as soon as its verdict is certain.
    """

    def __init__(self, runner: Runner, experiment: Experiment, run_id: str, run_dir: str):
        self.runner, self.experiment, self.run_id, self.run_dir = runner, experiment, run_id, run_dir
        self.settings = runner.settings
        self.thresholds = Thresholds(self.settings)
        self.design = experiment.design or self.settings["DESIGN"]
        # A custom decider has the last word, so no built-in look may end a measurement early.
        self.early_stop = self.settings["EARLY_STOP"] == "yes" and experiment.decider is None
        self.applied = None          # the variant applied now and not kept
        self.revert_failed = False
        self.block = 0               # switchback blocks are numbered across the run; 0 is the opening warm-up
        self.reference = Arm()       # baseline rows the guard compares against
        self.files = {}

    def seconds(self, key: str) -> float:
        value = self.experiment.seconds.get(key.lower())
        return float(value if value is not None else self.settings[key])

    def log(self, message: str, level: str = "info") -> None:
        self.runner.log(message, level)

    # -- the two designs --
    def run(self) -> None:
        self.runner.save_state(design=self.design)
        self.switch_to(self.experiment.baseline)
        if self.design == "switchback":
            self.run_switchback()
        else:
            self.run_sequential()

    def run_sequential(self) -> None:
        baseline = Arm()
        self.measure("baseline", self.seconds("BASELINE_SECONDS"), baseline)
        self.reference = baseline
        for variant in self.experiment.candidates:
            self.runner.stop.check()
            record = self.attempt(variant, lambda: self.sequential_variant(variant, baseline))
            if self.record(variant, record):
                return

    def sequential_variant(self, variant: dict, baseline: Arm) -> dict:
        name = variant["name"]
        guard = Guard(baseline, self.thresholds)
        self.switch_to(variant)
        self.measure(f"{name}_warmup", self.seconds("COOLDOWN_SECONDS"), Arm(), guard=guard, step="cooldown")
        if guard.reason:
            return self.aborted(name, guard.reason)
        arm = Arm()
        horizon = self.seconds("EXPERIMENT_SECONDS")
        look = Look(baseline, arm, self.thresholds, horizon, self.look_every(horizon)) if self.early_stop else None
        self.measure(name, horizon, arm, guard=guard, look=look)
        if guard.reason:
            return self.aborted(name, guard.reason)
        if look is not None and look.result is not None:
            return self.decided(name, look.result, stopped_early=look.fraction)
        return self.decided(name, verdict(baseline, arm, self.thresholds, fraction=1.0 if look else None))

    def run_switchback(self) -> None:
        blocks = int(self.experiment.blocks or self.settings["BLOCKS"])
        seed = int(self.run_id[:15].replace("T", "")) % (2 ** 32)
        rng = random.Random(seed)
        self.log(f"switchback: {blocks} block pairs per variant, order seed {seed}")
        self.measure_reference()
        baseline = Arm()
        for variant in self.experiment.candidates:
            self.runner.stop.check()
            record = self.attempt(variant, lambda: self.switchback_variant(variant, baseline, rng, blocks))
            if self.record(variant, record):
                return

    def measure_reference(self) -> None:
        """The opening warm-up on the baseline, long enough to give the guard GUARD_MIN_ROWS good rows."""
        seconds, spent = self.seconds("WARMUP_SECONDS"), 0.0
        limit = max(seconds, self.seconds("BASELINE_SECONDS"))
        while True:
            self.measure("baseline_warmup", seconds, self.reference, block=0, step="warm-up")
            spent += seconds
            if self.reference.ok >= GUARD_MIN_ROWS or spent >= limit:
                return
            seconds = min(1.0, limit - spent) if seconds > 0 else 1.0

    def switchback_variant(self, variant: dict, baseline: Arm, rng: random.Random, pairs: int) -> dict:
        name = variant["name"]
        orders = balanced_orders(rng, pairs)
        self.log(f"{name}: block order " + " ".join("VB" if first else "BV" for first in orders))
        arm, strip = Arm(), []
        block_seconds = self.seconds("EXPERIMENT_SECONDS") / pairs
        base_seconds = self.seconds("BASELINE_SECONDS") / pairs
        for index, variant_first in enumerate(orders):
            block = self.next_block()
            for is_variant in (variant_first, not variant_first):
                if is_variant:
                    guard = Guard(self.reference, self.thresholds)
                    self.switch_to(variant)
                    self.measure(f"{name}_warmup", self.seconds("WARMUP_SECONDS"), Arm(), block, guard, step="warm-up")
                    if not guard.reason:
                        self.measure(name, block_seconds, arm, block, guard)
                    if guard.reason:
                        return self.aborted(name, guard.reason, strip)
                else:
                    self.switch_back()
                    self.measure("baseline_warmup", self.seconds("WARMUP_SECONDS"), self.reference, block,
                                 step="warm-up")
                    self.measure("baseline", base_seconds, baseline, block, reference=self.reference)
                source = arm if is_variant else baseline
                strip.append({"index": block, "arm": "variant" if is_variant else "baseline",
                              "p50_ms": _round(percentile(sorted(source.only([block]).latencies), 50))})
            if self.early_stop and index + 1 >= 3 and index + 1 < pairs:
                result = Look(baseline, arm, self.thresholds, 1, 1).decide((index + 1) / pairs)
                if result is not None:
                    return self.decided(name, result, stopped_early=(index + 1) / pairs, strip=strip)
        result = verdict(baseline, arm, self.thresholds, fraction=1.0 if self.early_stop else None)
        return self.decided(name, result, strip=strip)

    def run_apply(self, variant: dict) -> None:
        """Apply a variant by name and keep it only when a short check against the baseline finds no harm."""
        self.runner.save_state(design="apply")
        self.switch_to(self.experiment.baseline)
        seconds = self.settings["VERIFY_SECONDS"]
        baseline = Arm()
        self.measure("baseline", seconds, baseline)
        self.reference = baseline
        self.record(variant, self.attempt(variant, lambda: self.verify_variant(variant, baseline, seconds)))

    def verify_variant(self, variant: dict, baseline: Arm, seconds: float) -> dict:
        name = variant["name"]
        guard = Guard(baseline, self.thresholds)
        self.switch_to(variant)
        self.measure(f"{name}_warmup", self.seconds("WARMUP_SECONDS"), Arm(), guard=guard, step="warm-up")
        arm = Arm()
        if not guard.reason:
            self.measure(name, seconds, arm, guard=guard)
        if guard.reason:
            return self.aborted(name, guard.reason)
        result = verdict(baseline, arm, self.thresholds)
        record = self.decided(name, result)
        harm = harm_found(result, baseline, arm, self.thresholds)
        record["decision"] = "revert" if harm else "keep"
        record["reason"] = (f"revert: applied on request, but {harm}" if harm else
                            f"keep: applied on request; no harm against the baseline "
                            f"(p50 {record['metrics']['base_p50_ms']} -> {record['metrics']['var_p50_ms']} ms, "
                            f"errors {record['metrics']['err_delta_pct']:+.2f} points)")
        self.log(f"{name}: {record['reason']}")
        return record

    def next_block(self) -> int:
        self.block += 1
        return self.block

    def look_every(self, horizon: float) -> float:
        return max(0.5, min(self.settings["LOOK_SECONDS"], horizon / 10))

    # -- outcomes --
    def attempt(self, variant: dict, body) -> dict:
        """Run one variant's measurement; a failed apply or measurement reverts it with the reason."""
        name = variant["name"]
        try:
            return body()
        except Interrupted as exc:
            self.runner.state["variants"].append({
                "name": name, "decision": "revert", "reason": f"revert: {exc} while it was under test",
                "borderline": False, "metrics": None})
            raise
        except (ApplyFailed, MeasureFailed) as exc:
            self.log(f"{name}: {exc}; reverting")
            return {"name": name, "decision": "revert", "reason": f"revert: {exc}", "borderline": False,
                    "metrics": None}

    def record(self, variant: dict, record: dict) -> bool:
        """Store a variant's outcome; keep it applied when kept (True), else make sure it is reverted."""
        self.runner.state["variants"].append(record)
        if record.get("stopped_early"):
            self.runner.state["stopped_early"] = f"{record['name']}: {record['stopped_early']}"
        if record["decision"] == "keep":
            self.switch_to(variant)
            self.keep(variant["name"])
            return True
        self.switch_back()
        self.runner.save_state()
        return False

    def aborted(self, name: str, reason: str, strip=None) -> dict:
        self.log(f"{name}: {reason}; reverting at once", "warning")
        self.switch_back()
        return {"name": name, "decision": "revert", "reason": f"revert: {reason}", "borderline": False,
                "metrics": None, "stopped_early": reason, "blocks": strip or []}

    def decided(self, name: str, result: Verdict, stopped_early=None, strip=None) -> dict:
        summary = format_verdict(result)
        with open(os.path.join(self.run_dir, f"{name}_decision.log"), "w", encoding="utf-8") as handle:
            handle.write(summary + "\n\n" + json.dumps(result.to_json(), indent=2) + "\n")
        why = None
        if stopped_early is not None and stopped_early < 1:
            why = (f"{'kept' if result.decision == 'keep' else 'reverted'} at {stopped_early:.0%} of the horizon: "
                   + ("every rule held at the sequential boundary" if result.decision == "keep"
                      else "the improvement's interval lies below the bar"))
            self.log(f"{name}: sequential stop, {why}")
        self.log(f"{name}: {result.reason}")
        decision, reason, decider = result.decision, result.reason, None
        if self.experiment.decider:
            decision, reason = self.custom_decision(name, result)
            decider = {"command": self.experiment.decider, "decision": decision,
                       "builtin_decision": result.decision, "builtin_reason": result.reason}
        record = {"name": name, "decision": decision, "reason": reason,
                  "borderline": result.borderline, "metrics": variant_metrics(result),
                  "verdict": result.to_json(), "stopped_early": why, "blocks": strip or [], "decider": decider}
        self.runner.state["metrics"] = {key: record["metrics"][key] for key in
                                        ("base_p50_ms", "var_p50_ms", "base_err_pct", "var_err_pct")}
        return record

    def custom_decision(self, name: str, builtin: Verdict):
        """The experiment's own decider, given the two CSVs: keep or revert; anything else reverts."""
        command = (f"{self.experiment.decider} {shlex.quote(os.path.join(self.run_dir, 'baseline.csv'))} "
                   f"{shlex.quote(os.path.join(self.run_dir, name + '.csv'))}")
        result = self.runner.command(f"decide {name}", command, self.experiment.path, stdout_only=True)
        lines = result.output.strip().splitlines()
        word = lines[-1].strip() if lines else ""
        if not result.ok:
            decision, why = "revert", f"the custom decider {result.describe()}"
        elif word not in ("keep", "revert"):
            decision, why = "revert", f"the custom decider printed {word[:40]!r}, not keep or revert"
        else:
            decision, why = word, f"the custom decider said {word}"
        reason = f"{decision}: {why} (built-in verdict: {builtin.reason})"
        self.log(f"{name}: {reason}")
        return decision, reason

    def keep(self, name: str) -> None:
        kept = read_json(self.runner.home.kept, {}) or {}
        kept[self.experiment.id] = {"variant": name, "run_id": self.run_id, "kept_at": utc_now(),
                                    "revert": self.experiment.revert, "path": self.experiment.path}
        write_json(self.runner.home.kept, kept)
        self.runner.state["kept_variant"] = name
        self.runner.save_state(phase=f"kept {name}")
        self.runner.clear_journal()
        self.applied = None
        self.log(f"kept {name}: it stays applied")

    # -- switching --
    def switch_to(self, variant: dict) -> None:
        """Apply a variant (journal first); the baseline's apply, if any, is not journaled once done."""
        name = variant["name"]
        if name == self.applied:
            return
        is_baseline = variant is self.experiment.baseline
        command = self.experiment.apply_command(variant)
        if command is None:
            self.log(f"{name}: nothing to apply")
            return
        self.log(f"about to apply {name}: {command}")
        self.runner.write_journal(self.experiment, name, self.run_id)
        self.applied = name
        self.runner.save_state(phase=f"applying {name}", current={"variant": name, "step": "applying"})
        result = self.runner.command(f"apply {name}", command, self.experiment.path)
        self.runner.stop.check()
        if not result.ok:
            raise (WorkFailed if is_baseline else ApplyFailed)(f"apply of {name} {result.describe()}")
        if is_baseline:
            self.runner.clear_journal()
            self.applied = None

    def switch_back(self) -> None:
        """Run the experiment's revert for the applied variant; RevertFailed leaves the journal in place."""
        if self.applied is None:
            return
        name = self.applied
        self.runner.save_state(phase=f"reverting {name}", current={"variant": name, "step": "reverting"})
        result = self.runner.command(f"revert {name}", self.experiment.revert, self.experiment.path)
        if not result.ok:
            self.revert_failed = True
            raise RevertFailed(f"revert of {name} {result.describe()}; the journal var/applied.json stays "
                               "and the next run retries the revert first")
        self.runner.clear_journal()
        self.applied = None

    def abandon(self, reason: str) -> str:
        """After a fault or a signal: revert whatever is applied; returns the full reason."""
        name = self.applied
        if name is None or self.revert_failed:
            return reason
        try:
            self.switch_back()
            return f"{reason}; {name} reverted"
        except RevertFailed as exc:
            return f"{reason}; {exc}"
        except OSError as exc:
            return f"{reason}; the revert could not be recorded ({exc})"

    # -- measuring --
    def measure(self, name: str, seconds: float, arm: Arm, block=None, guard=None, look=None,
                step="measuring", reference=None) -> None:
        """Measure the target for `seconds`, appending rows to RUN_DIR/NAME.csv and to arm.

        Stops at once on a signal, a tripped guard or a look that decided; a failed measurement
        raises MeasureFailed.  measure.sh, where present, measures instead of the built-in prober
        (guard and looks then act between its calls, not during one).
        """
        if seconds <= 0:
            return
        experiment = self.experiment
        path = os.path.join(self.run_dir, f"{name}.csv")
        ends = time.time() + seconds
        variant = name.rsplit("_warmup", 1)[0]
        self.runner.save_state(phase=f"{step} {variant}",
                               current={"variant": variant, "step": step, "ends_at": _iso_seconds(ends),
                                        "block": block})
        self.log(f"{step} {variant} for {seconds:g} s -> {os.path.basename(path)}"
                 + ("" if block is None else f" (block {block})"))

        def on_row(latency, code, at):
            arm.add(latency, code, block, at)
            if reference is not None:
                reference.add(latency, code, block, at)
            if guard is not None:
                guard.add(latency, code)

        def should_stop():
            return bool(self.runner.stop) or (guard is not None and guard.tripped()) or (
                look is not None and look.due())

        if experiment.measure_sh:
            self.measure_script(path, seconds, block, on_row)
        else:
            spec = experiment.measure
            shape = {"concurrency": spec.get("concurrency"), "rate": spec.get("rate"),
                     "timeout": spec.get("timeout"), "max_in_flight": spec.get("max_in_flight")}
            if not shape["concurrency"] and not shape["rate"]:
                shape["interval"] = experiment.interval or 1.0
            target = Target(experiment.target_url, spec.get("method", "GET"), spec.get("headers", []),
                            bool(spec.get("insecure")))
            with self.csv_file(path) as handle:
                result = Prober(target, seconds, handle, on_row=on_row, should_stop=should_stop, block=block,
                                **{k: v for k, v in shape.items() if v is not None}).run()
            self.log(f"measured {variant}: {result.rows} requests, {result.errors} errors"
                     + (", stopped early" if result.stopped_early else ""))
        self.runner.stop.check()
        if guard is not None:
            guard.tripped()

    def csv_file(self, path: str):
        """A measurement CSV opened for appending (blocks add to it); the header written once."""
        handle = open(path, "a", encoding="utf-8", newline="")
        if handle.tell() == 0:
            handle.write("timestamp,latency_ms,response_code" + (",block" if self.design == "switchback" else "")
                         + "\n")
        return handle

    def measure_script(self, path: str, seconds: float, block, on_row) -> None:
        """Run measure.sh into a scratch CSV, check it, and append its rows (with the block)."""
        experiment = self.experiment
        scratch = path + ".part"
        env = dict(os.environ, TARGET_URL=experiment.target_url or "", DURATION=f"{seconds:g}",
                   INTERVAL=f"{experiment.interval or 1.0:g}", OUT=scratch)
        result = run_command("./measure.sh", experiment.path, seconds + self.settings["COMMAND_TIMEOUT_SECONDS"],
                             env, should_stop=lambda: bool(self.runner.stop))
        self.runner.log_command("measure.sh", result)
        self.runner.stop.check()
        if not result.ok:
            raise MeasureFailed(f"measure.sh {result.describe()}")
        try:
            rows = list(_csv_rows(scratch))
        except BadInput as exc:
            raise MeasureFailed(f"measure.sh wrote a bad CSV (kept for a look): {exc}") from None
        os.unlink(scratch)
        suffix = "" if block is None else f",{block}"
        with self.csv_file(path) as handle:
            for stamp, latency, code in rows:
                handle.write(f"{stamp},{latency:.3f},{code}{suffix}\n")
                on_row(latency, code, _epoch(stamp))


def _csv_rows(path: str):
    """(timestamp, latency_ms, code) of each row of a measurement CSV, checked as read_measurements does."""
    read_measurements(path)
    with open(path, encoding="utf-8-sig", newline="") as handle:
        for number, line in enumerate(handle, 1):
            if (number == 1 and _HEADER.match(line)) or not line.strip():
                continue
            try:
                latency, code, _ = _parse_row(line)
            except ValueError:
                continue
            yield line.split(",")[0].strip(), latency, code


def variant_metrics(result: Verdict) -> dict:
    """The figures of a verdict that state.json, history and the dashboard show per variant."""
    metrics = {}
    for prefix, figures in (("base", result.baseline), ("var", result.variant)):
        for key in ("n", "errors", "p50_ms", "p90_ms", "p99_ms", "err_pct"):
            metrics[f"{prefix}_{key}"] = figures[key]
    metrics.update(improve_pct=result.improve_pct, improve_ci=result.improve_ci, p_value=result.p_value,
                   err_delta_pct=result.err_delta_pct, p99_regress_pct=result.p99_regress_pct)
    return metrics


class ApplyFailed(SmartError):
    """An apply command failed or overran its time box (the variant is reverted)."""


class MeasureFailed(SmartError):
    """A measurement failed (the variant is reverted)."""


def _iso_seconds(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


###### State and dashboard ######

def _history(home: Home):
    """The entries of var/history.jsonl, oldest first; a damaged line is passed over."""
    try:
        with open(home.history, encoding="utf-8") as handle:
            for line in handle:
                with contextlib.suppress(ValueError):
                    entry = json.loads(line)
                    if isinstance(entry, dict):
                        yield entry
    except FileNotFoundError:
        return


def publish_dashboard(home: Home, history_runs: int = 200, running=None) -> None:
    """Publish var/history.json (the last runs), var/context.md and var/smart.prom, each atomically."""
    history = list(_history(home))
    write_json(os.path.join(home.var, "history.json"), {"runs": history[-history_runs:], "updated_at": utc_now()})
    write_atomic(os.path.join(home.var, "context.md"),
                 format_status(collect_status(home, running=running, history=history), markdown=True))
    write_atomic(os.path.join(home.var, "smart.prom"), prometheus_metrics(home, history))


###### Status: context.md, `status` and Prometheus metrics ######

STALE_MINUTES = 35        # the timer fires every 30 minutes; older than this, something is wrong
TIMER_UNIT = "smart-experiment.timer"


def _age_minutes(stamp):
    try:
        moment = datetime.fromisoformat(stamp)
    except (TypeError, ValueError):
        return None
    return (datetime.now(timezone.utc) - moment).total_seconds() / 60


def _lock_held(home: Home) -> bool:
    try:
        with open(os.path.join(home.var, "lock"), "a+", encoding="utf-8") as handle:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return False
    except BlockingIOError:
        return True
    except OSError:
        return False


def next_timer_run():
    """When the systemd timer fires next, or None where there is no such timer."""
    if not shutil.which("systemctl"):
        return None
    result = run_command(f"systemctl show {TIMER_UNIT} --property=NextElapseUSecRealtime --value", "/", 5)
    value = result.output.strip() if result.ok else ""
    return value if value and value != "n/a" else None


def collect_status(home: Home, runs: int = 10, running=None, history=None) -> dict:
    """What is applied, the last verdicts, the next run and what needs attention, from var/ alone.

    `running` says whether a run holds the lock; by default the lock is asked (a run writing its
    own context.md at its end passes False: what it leaves behind is what counts).  `history`
    spares a caller that has read var/history.jsonl already a second read.
    """
    state = read_json(home.state)
    state = state if isinstance(state, dict) else None
    history = list(_history(home)) if history is None else history
    kept = read_json(home.kept, {}) or {}
    journal = read_json(home.journal)
    running = _lock_held(home) if running is None else running
    applied = {experiment: {"variant": entry.get("variant"), "since": entry.get("kept_at"),
                            "run_id": entry.get("run_id"), "kept": True}
               for experiment, entry in kept.items() if isinstance(entry, dict)}
    if isinstance(journal, dict):
        applied[journal.get("experiment")] = {"variant": journal.get("variant"), "since": journal.get("written_at"),
                                             "run_id": journal.get("run_id"), "kept": False}
    last = {}
    for entry in history:
        last[entry.get("experiment")] = entry
    attention = []
    if isinstance(journal, dict) and not running:
        attention.append(f"{journal.get('experiment')}/{journal.get('variant')} is left applied by run "
                         f"{journal.get('run_id')} and not kept: run 'smart.py recover'")
    elif os.path.exists(home.journal) and journal is None:
        attention.append(f"{home.journal} is unreadable: check what is applied, then delete it")
    if state and state.get("status") == "failed" and not state.get("recovered_at"):
        attention.append(f"run {state.get('run_id')} failed: {state.get('reason')}")
    if state and state.get("status") == "running" and not running:
        attention.append(f"run {state.get('run_id')} says running but holds no lock: it died; "
                         "run 'smart.py recover'")
    if state and not running:
        ages = [a for a in (_age_minutes(state.get("updated_at")), _age_minutes(state.get("checked_at"))) if a is not None]
        if ages and min(ages) > STALE_MINUTES:
            attention.append(f"no run for {min(ages):.0f} minutes: is {TIMER_UNIT} running?")
    return {
        "home": home.root, "host": socket.gethostname(), "version": __version__, "checked_at": utc_now(),
        "running": running, "status": state.get("status") if state else None,
        "phase": state.get("phase") if state else None, "applied": applied,
        "last": {experiment: {key: entry.get(key) for key in ("run_id", "status", "kept_variant", "finished_at",
                                                            "reason", "variants")}
                 for experiment, entry in last.items()},
        "next_run": next_timer_run(), "attention": attention,
        "runs": [{key: entry.get(key) for key in ("run_id", "experiment", "status", "kept_variant", "metrics")}
                 for entry in history[len(history) - runs:][::-1]] if runs > 0 else [],
    }


def format_status(status: dict, markdown: bool = False) -> str:
    """The status as text: for the terminal, or as context.md."""
    head = "# " if markdown else ""
    sub = "## " if markdown else ""
    item = "- " if markdown else "  "
    lines = [f"{head}smart.py on {status['host']} ({status['home']})",
             "" if markdown else f"checked {status['checked_at']}" + ("; a run is in progress" if status["running"] else ""),
             f"{sub}Applied now"]
    lines += [f"{item}{experiment}: {entry['variant']} "
              + (f"(kept in run {entry['run_id']} at {entry['since']})" if entry["kept"] else "(under test, not kept)")
              for experiment, entry in sorted(status["applied"].items(), key=lambda kv: str(kv[0]))] or [
        f"{item}every experiment is on its baseline"]
    lines.append(f"{sub}Last verdicts")
    for experiment, entry in sorted(status["last"].items(), key=lambda kv: str(kv[0])):
        lines.append(f"{item}{experiment}: run {entry['run_id']} {entry['status']}, "
                     f"kept {entry['kept_variant'] or 'nothing'}" + (f" ({entry['reason']})" if entry["reason"] else ""))
        for variant in entry.get("variants") or []:
            metrics = variant.get("metrics") or {}
            figures = (f"p50 {metrics.get('base_p50_ms')} -> {metrics.get('var_p50_ms')} ms, "
                       f"errors {metrics.get('base_err_pct')}% -> {metrics.get('var_err_pct')}%; " if metrics else "")
            lines.append(f"{'  ' + item}{variant.get('name')}: {figures}{variant.get('reason')}")
    if not status["last"]:
        lines.append(f"{item}no run yet")
    lines.append(f"{sub}Next run")
    lines.append(f"{item}{status['next_run'] or 'unknown: no ' + TIMER_UNIT + ' found (run by hand or check the timer)'}")
    lines.append(f"{sub}Needs attention")
    lines += [f"{item}{text}" for text in status["attention"]] or [f"{item}nothing"]
    if not markdown:
        lines.append("Recent runs")
        lines.append(f"  {'run':<20}{'experiment':<26}{'status':<12}{'kept':<18}{'base p50':>10}{'var p50':>10}")
        for run in status["runs"]:
            metrics = run.get("metrics") or {}
            lines.append(f"  {str(run['run_id']):<20}{str(run['experiment'])[:25]:<26}{str(run['status']):<12}"
                         f"{str(run['kept_variant'] or '-')[:17]:<18}{str(metrics.get('base_p50_ms', '-')):>10}"
                         f"{str(metrics.get('var_p50_ms', '-')):>10}")
    return "\n".join(line for line in lines if line is not None) + "\n"


def _label(value) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def prometheus_metrics(home: Home, history=None) -> str:
    """var/smart.prom for node_exporter's textfile collector (--collector.textfile.directory)."""
    history = list(_history(home)) if history is None else history
    kept = read_json(home.kept, {}) or {}
    out = []

    def metric(name, kind, help_text, samples):
        out.append(f"# HELP {name} {help_text}")
        out.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            text = ",".join(f'{key}="{_label(v)}"' for key, v in labels.items())
            number = repr(float(value)) if isinstance(value, float) else str(value)
            out.append(f"{name}{{{text}}} {number}" if text else f"{name} {number}")

    last = {}
    for entry in history:
        last[entry.get("experiment")] = entry
    statuses = ("done", "failed", "interrupted")
    finished = [(e, _epoch_or_none(entry.get("finished_at"))) for e, entry in last.items()]
    metric("smart_last_run_timestamp_seconds", "gauge", "Unix time the experiment's last run finished.",
           [({"experiment": e}, t) for e, t in finished if t is not None])
    metric("smart_last_run_status", "gauge", "1 for the status of the experiment's last run.",
           [({"experiment": e, "status": s}, 1 if entry.get("status") == s else 0)
            for e, entry in last.items() for s in statuses])
    latency, errors = [], []
    for experiment, entry in last.items():
        for variant in entry.get("variants") or []:
            metrics = variant.get("metrics") or {}
            for arm in ("base", "var"):
                labels = {"experiment": experiment, "variant": variant.get("name"),
                          "arm": "baseline" if arm == "base" else "variant"}
                for quantile in ("50", "90", "99"):
                    value = metrics.get(f"{arm}_p{quantile}_ms")
                    if isinstance(value, (int, float)):
                        latency.append((dict(labels, percentile=f"p{quantile}"), value / 1000))
                if isinstance(metrics.get(f"{arm}_err_pct"), (int, float)):
                    errors.append((labels, metrics[f"{arm}_err_pct"] / 100))
    metric("smart_variant_latency_seconds", "gauge", "Latency quantiles of each arm in the last run.", latency)
    metric("smart_variant_error_ratio", "gauge", "Share of failed requests of each arm in the last run.", errors)
    metric("smart_kept_variant_info", "gauge", "1 for the variant kept and applied now.",
           [({"experiment": e, "variant": entry.get("variant")}, 1) for e, entry in kept.items()
            if isinstance(entry, dict)])
    metric("smart_kept_variant_applied_timestamp_seconds", "gauge",
           "Unix time the kept variant was applied (time() minus this is how long it has been).",
           [({"experiment": e, "variant": entry.get("variant")}, _epoch_or_none(entry.get("kept_at")))
            for e, entry in kept.items() if isinstance(entry, dict) and _epoch_or_none(entry.get("kept_at"))])
    runs = collections.Counter(entry.get("status") for entry in history)
    metric("smart_runs_total", "counter", "Finished runs by status.",
           [({"status": s}, runs.get(s, 0)) for s in statuses])
    decisions = collections.Counter(v.get("decision") for entry in history for v in entry.get("variants") or [])
    metric("smart_decisions_total", "counter", "Variants decided, by decision.",
           [({"decision": d}, decisions.get(d, 0)) for d in ("keep", "revert")])
    return "\n".join(out) + "\n"


def _epoch_or_none(stamp):
    try:
        return _epoch(stamp)
    except (TypeError, ValueError, AttributeError):
        return None


###### Phone home: advice from a coach, never a command ######

COACH_REPLY_LIMIT = 64 * 1024     # bytes of a reply read at most; a larger reply is ignored
COACH_ADVICE_LIMIT = 2000         # characters of advice kept
COACH_ATTEMPTS = 3
COACH_ATTEMPT_SECONDS = 10.0
OLLAMA_PATHS = ("/api/generate", "/api/chat")


class CoachError(WorkFailed):
    """The coach could not be reached or gave no usable reply (a run goes on regardless)."""


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None      # a redirect would carry the bearer token to wherever it points


def _public_url(url: str) -> str:
    """The URL without any user:password part, for messages."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", ""))


def coach_prompt(state: dict) -> str:
    """A short prompt for a local model, built from the run's figures."""
    lines = [f"A web server tuning agent ran experiment {state.get('experiment')} "
             f"({state.get('description') or 'no description'}). Variants tried:"]
    for variant in state.get("variants", []):
        metrics = variant.get("metrics") or {}
        lines.append(f"- {variant.get('name')}: {variant.get('decision')}; p50 {metrics.get('base_p50_ms')} -> "
                     f"{metrics.get('var_p50_ms')} ms; improvement {metrics.get('improve_pct')}% "
                     f"(interval {metrics.get('improve_ci')}); reason: {variant.get('reason')}")
    lines.append(f"Defined variants: {', '.join(state.get('defined_variants') or [])}.")
    lines.append('Reply with one JSON object only: {"advice": "<one or two sentences>", '
                 '"next_variant": "<a defined variant or null>", "confidence": <0..1>}.')
    return "\n".join(lines)


def phone_home(state: dict, settings: dict, clock=time.monotonic, sleep=time.sleep) -> dict:
    """POST the run's state to the coach and return its advice, validated; CoachError when there is none.

    Retries connection errors and 5xx (never 4xx) with backoff, all within COMMAND_TIMEOUT_SECONDS.
    An Ollama-style URL (/api/generate, /api/chat) gets a prompt and its model's reply is parsed.
    """
    url = settings["PHONE_HOME_URL"]
    if not url:
        raise BadInput("PHONE_HOME_URL is not set; put the coach's URL in smart.conf")
    public = _public_url(url)
    host = urllib.parse.urlsplit(url).hostname or ""
    if url.startswith("http://") and host not in ("localhost", "127.0.0.1", "::1"):
        warn(f"phoning home over plain http to {host}: the token and the state travel unencrypted")
    path = urllib.parse.urlsplit(url).path.rstrip("/")
    ollama = path.endswith(OLLAMA_PATHS)
    if ollama:
        prompt = coach_prompt(state)
        model = settings.get("PHONE_HOME_MODEL") or "llama3.2"
        body = ({"model": model, "prompt": prompt, "stream": False, "format": "json"} if path.endswith("generate")
                else {"model": model, "messages": [{"role": "user", "content": prompt}], "stream": False,
                      "format": "json"})
    else:
        body = {"run_id": state.get("run_id"), "state": state, "server_id": socket.gethostname()}
    headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT, "Accept": "application/json"}
    if settings["PHONE_HOME_TOKEN"]:
        headers["Authorization"] = f"Bearer {settings['PHONE_HOME_TOKEN']}"
    data = json.dumps(body).encode()
    opener = urllib.request.build_opener(_NoRedirect)
    deadline = clock() + settings["COMMAND_TIMEOUT_SECONDS"]
    problem = "no attempt made"
    for attempt in range(1, COACH_ATTEMPTS + 1):
        left = deadline - clock()
        if left <= 0:
            break
        request = urllib.request.Request(url, data=data, headers=headers, method="POST")
        try:
            raw = _exchange(opener, request, left if ollama else min(COACH_ATTEMPT_SECONDS, left), public)
            if len(raw) > COACH_REPLY_LIMIT:
                raise CoachError(f"coach {public}: reply larger than {COACH_REPLY_LIMIT // 1024} KiB, ignored")
            return parse_coach_reply(raw, state, public, ollama)
        except urllib.error.HTTPError as exc:
            problem = f"HTTP {exc.code}"
            if exc.code < 500:
                raise CoachError(f"coach {public} answered {problem}; not retried") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            reason = getattr(exc, "reason", exc)
            problem = f"{type(reason).__name__}: {reason}" if not isinstance(reason, str) else reason
        if attempt < COACH_ATTEMPTS:
            sleep(max(0.0, min(2.0 ** (attempt - 1), deadline - clock())))
    raise CoachError(f"coach {public} unreachable after {attempt} attempts ({problem})")


def _exchange(opener, request, seconds: float, public: str) -> bytes:
    """One request and at most COACH_REPLY_LIMIT + 1 bytes of reply, all within `seconds`.

    A socket timeout bounds each read, not the whole; a coach dripping a byte at a time would
    hold a run forever, so the exchange runs in a daemon thread that is abandoned when time is up.
    """
    box = {}

    def work():
        try:
            with opener.open(request, timeout=seconds) as response:
                box["raw"] = response.read(COACH_REPLY_LIMIT + 1)
        except Exception as exc:       # handed to the caller, which sorts it
            box["error"] = exc

    thread = threading.Thread(target=work, name="coach", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise CoachError(f"coach {public}: no complete reply within {seconds:.0f} s")
    if "error" in box:
        if isinstance(box["error"], (ValueError, UnicodeError)):
            raise CoachError(f"coach {public}: the request could not be sent ({type(box['error']).__name__})")
        raise box["error"]
    return box["raw"]


def parse_coach_reply(raw: bytes, state: dict, public: str, ollama: bool) -> dict:
    """Validate a coach's reply: advice as capped text, confidence in [0, 1], a defined next_variant."""
    try:
        reply = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise CoachError(f"coach {public}: the reply is not JSON (or nested too deep)") from None
    if ollama:
        text = (reply.get("response") if isinstance(reply, dict) else None)
        if text is None and isinstance(reply, dict) and isinstance(reply.get("message"), dict):
            text = reply["message"].get("content")
        if not isinstance(text, str):
            raise CoachError(f"coach {public}: no model response in the reply")
        try:
            reply = json.loads(text)
        except (ValueError, RecursionError):
            reply = {"advice": text}
    if not isinstance(reply, dict):
        raise CoachError(f"coach {public}: the reply is not a JSON object")
    advice = {"advice": None, "next_variant": None, "confidence": None, "coach": public, "at": utc_now()}
    dropped = sorted(set(reply) - {"advice", "next_variant", "confidence"})
    text = reply.get("advice")
    if isinstance(text, str):
        advice["advice"] = text[:COACH_ADVICE_LIMIT]
    elif text is not None:
        dropped.append("advice (not text)")
    confidence = reply.get("confidence")
    if isinstance(confidence, (int, float)) and not isinstance(confidence, bool) and 0 <= confidence <= 1:
        advice["confidence"] = float(confidence)
    elif confidence is not None:
        dropped.append("confidence (not a number from 0 to 1)")
    name = reply.get("next_variant")
    if isinstance(name, str) and name in (state.get("defined_variants") or []):
        advice["next_variant"] = name
    elif name is not None:
        dropped.append("next_variant (not a variant of this experiment)")
    if dropped:
        warn(f"coach {public}: ignored " + ", ".join(str(item)[:60] for item in dropped))
    if advice["advice"] is None and advice["next_variant"] is None:
        raise CoachError(f"coach {public}: the reply has no advice")
    return advice


def wants_coach(state: dict, settings: dict) -> bool:
    """PHONE_HOME=always, or borderline with a borderline verdict in the run; never without a URL."""
    if not settings["PHONE_HOME_URL"] or settings["PHONE_HOME"] == "never":
        return False
    return settings["PHONE_HOME"] == "always" or any(v.get("borderline") for v in state.get("variants", []))


###### Serve: the dashboard over HTTP ######

class _QuietHandler(http.server.BaseHTTPRequestHandler):
    """A request handler with keep-alive, TCP_NODELAY and no per-request log lines."""

    protocol_version = "HTTP/1.1"
    server_version = f"smart.py/{__version__}"

    def setup(self):
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format, *args):
        pass

    def send_body(self, code: int, body: bytes, content_type="text/plain; charset=utf-8", headers=()):
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


class _QuietServer(http.server.ThreadingHTTPServer):
    """A threaded server whose clients may hang up mid-answer without a traceback on stderr."""

    daemon_threads = True

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


_TYPES = {".html": "text/html; charset=utf-8", ".json": "application/json", ".css": "text/css",
          ".js": "text/javascript", ".png": "image/png", ".svg": "image/svg+xml"}


def _inside(root: str, relative: str):
    """The real path of root/relative when it stays inside root (no .., no symlink out), else None."""
    if "\0" in relative or "\\" in relative or any(part == ".." for part in relative.split("/")):
        return None
    real_root = os.path.realpath(root)
    path = os.path.realpath(os.path.join(real_root, relative.lstrip("/")))
    return path if path == real_root or path.startswith(real_root + os.sep) else None


def make_dashboard_server(home: Home, bind: str = "127.0.0.1", port: int = 8080):
    """A threaded HTTP server for www/, /state.json, /history.json and a listing of /runs/ - nothing else."""

    class Handler(_QuietHandler):
        def do_GET(self):
            path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
            if path in ("/state.json", "/history.json"):
                return self.send_file(os.path.join(home.var, path[1:]), no_cache=True)
            if path == "/runs" or path.startswith("/runs/"):
                return self.send_run_path(path[len("/runs"):])
            if path == "/":
                path = "/index.html"
            found = _inside(home.www(), path)
            if found is None or not os.path.isfile(found):
                return self.send_body(404, b"not found\n")
            return self.send_file(found)

        do_HEAD = do_GET

        def send_file(self, path, no_cache=False, content_type=None):
            try:
                with open(path, "rb") as handle:
                    body = handle.read()
            except OSError:
                return self.send_body(404, b"not found\n")
            headers = [("Cache-Control", "no-cache")] if no_cache else []
            kind = content_type or _TYPES.get(os.path.splitext(path)[1], "text/plain; charset=utf-8")
            self.send_body(200, body, kind, headers)

        def send_run_path(self, relative):
            found = _inside(home.runs, relative or "/")
            if found is None:
                return self.send_body(403, b"refused\n")
            if os.path.isdir(found):
                if not self.path.split("?")[0].endswith("/"):
                    return self.send_body(301, b"", headers=[("Location", self.path.split("?")[0] + "/")])
                names = sorted(os.listdir(found), reverse=found == os.path.realpath(home.runs))
                items = "".join(
                    f'<li><a href="{urllib.parse.quote(n)}{"/" if os.path.isdir(os.path.join(found, n)) else ""}">'
                    f'{html.escape(n)}</a></li>' for n in names)
                page = (f"<!doctype html><meta charset=utf-8><title>runs</title><ul>{items}</ul>").encode()
                return self.send_body(200, page, "text/html; charset=utf-8", [("Cache-Control", "no-cache")])
            if not os.path.isfile(found):
                return self.send_body(404, b"not found\n")
            return self.send_file(found, no_cache=True, content_type="text/plain; charset=utf-8")

    return _QuietServer((bind, port), Handler)


def serve_dashboard(home: Home, bind: str, port: int) -> int:
    """Serve the dashboard until Ctrl-C or SIGTERM."""
    if bind not in ("127.0.0.1", "localhost", "::1"):
        warn(f"serving on {bind}: there is no authentication; anyone who can reach it sees the dashboard "
             "(for production use nginx, see DEPLOYMENT.md)")
    try:
        server = make_dashboard_server(home, bind, port)
    except OSError as exc:
        raise BadInput(f"cannot listen on {bind}:{port}: {exc.strerror or exc}; try --port") from None
    host, real_port = server.server_address[:2]
    print(f"dashboard: http://{'127.0.0.1' if host == '0.0.0.0' else host}:{real_port}/  (Ctrl-C to stop)", flush=True)

    def stop(signum, frame):
        raise KeyboardInterrupt
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped")
    finally:
        signal.signal(signal.SIGTERM, previous)
        server.server_close()
    return 0


###### Demo: a built-in target server with a real switch ######

class DemoTarget(_QuietServer):
    """A small web app whose speed depends on the word in its mode file.

    plain: each page waits 20 ms on a simulated backend; cached: pages come from memory;
    slow: 45 ms; broken: like plain, and one request in four fails with 503; failing: one in
    two fails; stalled: every page takes a second.  The demo's variants switch modes by writing
    that file, as a real experiment edits a config.
    """

    # mode: (seconds each page waits, every how many requests one fails with 503, 0 = none)
    MODES = {"plain": (0.020, 0), "cached": (0.0, 0), "slow": (0.045, 0), "broken": (0.020, 4),
             "failing": (0.020, 2), "stalled": (1.0, 0)}

    def __init__(self, mode_path: str, port: int = 0):
        self.mode_path = mode_path
        self.count = 0
        super().__init__(("127.0.0.1", port), self._handler())

    def mode(self) -> str:
        try:
            with open(self.mode_path, encoding="utf-8") as handle:
                word = handle.read().strip()
        except OSError:
            word = "plain"
        return word if word in self.MODES else "plain"

    def _handler(self):
        server = self

        class Handler(_QuietHandler):
            def do_GET(self):
                delay, fail_every = server.MODES[server.mode()]
                server.count += 1
                if fail_every and server.count % fail_every == 0:
                    self.send_body(503, b"backend unavailable\n")
                    return
                time.sleep(delay)
                self.send_body(200, b"<html><body>hello from the demo target</body></html>\n",
                               "text/html; charset=utf-8")

            do_HEAD = do_GET
        return Handler

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/"

    def start(self):
        thread = threading.Thread(target=self.serve_forever, name="demo-target", daemon=True)
        thread.start()
        return self


def write_demo_experiment(home: str, url: str, seconds: float) -> str:
    """experiments/001_demo_cache in home: a no-op, a harmful and a helpful variant of the demo target."""
    folder = os.path.join(home, "experiments", "001_demo_cache")
    os.makedirs(folder, exist_ok=True)
    os.makedirs(os.path.join(home, "target"), exist_ok=True)
    mode = "../../target/mode"
    write_atomic(os.path.join(home, "target", "mode"), "plain\n")
    arm_seconds = max(3.0, seconds / 10)
    meta = {
        "id": "001_demo_cache",
        "description": "Does a response cache make the demo site faster?",
        "variants": [
            {"name": "baseline", "apply": f"echo plain > {mode}"},
            {"name": "noop", "apply": "true"},
            {"name": "slow_backend", "apply": f"echo slow > {mode}"},
            {"name": "response_cache", "apply": f"echo cached > {mode}"},
        ],
        "revert": f"echo plain > {mode}",
        "target_url": url,
        "design": "switchback",
        "blocks": 6,
        "baseline_seconds": round(arm_seconds, 1),
        "experiment_seconds": round(arm_seconds, 1),
        "warmup_seconds": 0.5,
        "cooldown_seconds": 1,
        "measure": {"rate": 40, "timeout": 2},
    }
    write_json(os.path.join(folder, "meta.json"), meta)
    return folder


###### Doctor: is this installation healthy? ######

HELPER = "/usr/local/sbin/smart-nginx"
SUDOERS = "/etc/sudoers.d/smart-server"
UNITS = ("/etc/systemd/system/smart-experiment.service", "/etc/systemd/system/smart-experiment.timer")


def _probe(command: str, timeout: float = 10):
    return run_command(command, "/", timeout)


def doctor_checks(home: Home, settings: dict):
    """(name, ok, detail, fix command) for each thing the seed's troubleshooting guide names."""
    checks = []

    def check(name, ok, detail, fix=""):
        checks.append((name, bool(ok), detail, fix))

    check("python", sys.version_info >= (3, 11), f"{sys.version.split()[0]} at {sys.executable}",
          "install Python 3.11 or newer")
    owner = _owner(home.root)
    check("home", os.path.isdir(home.root), f"{home.root} owned by {owner}", "sudo deploy/install.sh")
    writable = os.access(home.var, os.W_OK) if os.path.isdir(home.var) else os.access(home.root, os.W_OK)
    check("var writable", writable, f"{home.var} by {_user()}", f"sudo chown -R smart:smart {home.var}")
    check("dashboard page", os.path.isfile(os.path.join(home.www(), "index.html")),
          os.path.join(home.www(), "index.html"), "sudo deploy/install.sh (it installs www/)")
    try:
        experiments = find_experiments(home.root, [])
        check("experiments", experiments, f"{len(experiments)} found: " + ", ".join(e.id for e in experiments),
              f"add a folder with a meta.json under {os.path.join(home.root, 'experiments')}")
    except BadInput as exc:
        check("experiments", False, str(exc), "fix the file named above")
    systemd = os.path.isdir("/run/systemd/system") and shutil.which("systemctl")
    if systemd:
        enabled = _probe("systemctl is-enabled smart-experiment.timer").output.strip()
        active = _probe("systemctl is-active smart-experiment.timer").output.strip()
        check("timer", enabled == "enabled" and active == "active", f"smart-experiment.timer {enabled}, {active}",
              "sudo systemctl enable --now smart-experiment.timer")
        result = _probe("systemctl show -p Result --value smart-experiment.service").output.strip()
        check("last service run", result in ("success", ""), f"Result={result}",
              "journalctl -u smart-experiment.service -n 50")
    else:
        check("timer", False, "no systemd here: nothing runs smart.py on a schedule",
              f"crontab -u smart -e, add: */30 * * * * python3 {os.path.abspath(__file__)} --home {home.root} run")
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
    check("nginx", nginx, nginx or "not installed", "sudo apt-get install -y nginx")
    if os.geteuid() == 0 and nginx:
        result = _probe(f"{nginx} -t")
        check("nginx -t", result.ok, result.output.strip().splitlines()[-1] if result.output.strip() else
              result.describe(), "fix the error nginx -t names")
    if os.path.exists(HELPER) or os.path.exists(SUDOERS):
        check("helper", os.path.isfile(HELPER) and _owner(HELPER) == "root", f"{HELPER} owned by {_owner(HELPER)}",
              "sudo deploy/install.sh")
        if os.geteuid() != 0:
            result = _probe(f"sudo -n {HELPER} test", 30)
            check("sudo rights", result.ok, f"sudo -n {HELPER} test {result.describe()}",
                  f"sudo visudo -cf {SUDOERS}; sudo deploy/install.sh")
        elif shutil.which("visudo"):
            result = _probe(f"visudo -cf {SUDOERS}")
            check("sudoers", result.ok, f"{SUDOERS}: {result.output.strip() or result.describe()}",
                  "sudo deploy/install.sh")
    free = shutil.disk_usage(home.var if os.path.isdir(home.var) else home.root).free
    check("free disk", free >= 500 * 2 ** 20, f"{free / 2 ** 30:.1f} GiB free for var/",
          f"free space, or lower KEEP_RUNS (now {settings['KEEP_RUNS']})")
    status = collect_status(home)
    state = read_json(home.state)
    if isinstance(state, dict):
        age = min([a for a in (_age_minutes(state.get("updated_at")), _age_minutes(state.get("checked_at")))
                   if a is not None] or [0])
        check("state.json age", age <= 60 or status["running"], f"updated {age:.0f} minutes ago",
              "systemctl status smart-experiment.timer; journalctl -u smart-experiment.service")
        check("last run", state.get("status") in ("done", "running"),
              f"run {state.get('run_id')} {state.get('status')}" + (f": {state.get('reason')}" if state.get("reason") else ""),
              f"python3 {os.path.abspath(__file__)} status; read var/runs/{state.get('run_id')}/run.log")
    else:
        check("state.json", True, "no run yet (the dashboard shows 'no data yet')")
    for text in status["attention"]:
        if "left applied" in text or "died" in text:
            check("left applied", False, text, f"python3 {os.path.abspath(__file__)} recover")
    return checks


def _owner(path: str) -> str:
    try:
        return pwd.getpwuid(os.stat(path).st_uid).pw_name
    except (OSError, KeyError):
        return "unknown"


def _user() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


###### Command line ######

class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage mistake as BadInput (one line, exit 2) instead of exiting."""

    def error(self, message):
        raise BadInput(f"{message} (see '{self.prog} --help')")


def cmd_measure(args, settings) -> int:
    """measure --url URL[@WEIGHT] ... --duration S --out FILE: probe and write the CSV; a summary on stderr."""
    live = sys.stderr.isatty()
    arm = Arm(args.out)

    def progress(line):
        print("\r" + line, end="", file=sys.stderr, flush=True)

    result = measure_url([weighted_url(text) for text in args.url], args.duration, args.out, method=args.method,
                         headers=args.header, insecure=args.insecure, connections=args.connections,
                         expect_status=args.expect_status, expect_body=args.expect_body,
                         progress=progress if live else None,
                         interval=args.interval, concurrency=args.concurrency, rate=args.rate,
                         timeout=args.timeout, max_in_flight=args.max_in_flight,
                         on_row=lambda latency, code, at, url, check: arm.add(latency, code))
    if live:
        print(file=sys.stderr)
    figures = summarize(arm, sorted(arm.latencies))
    rate = result.rows / result.elapsed if result.elapsed else 0.0
    latency = ", ".join(f"{key[:3]} {'-' if figures[key] is None else figures[key]} ms"
                        for key in ("p50_ms", "p90_ms", "p99_ms"))
    received = result.bytes_received
    extras = [(f"{received / 1048576:.1f} MiB" if received >= 1048576 else f"{received / 1024:.1f} KiB")
              + " received" if received else "",
              f"{result.oversized} bodies over {MAX_BODY >> 20} MiB" if result.oversized else "",
              f"{result.check_failures} failed checks" if result.check_failures else "",
              f"{result.resumed} of {result.handshakes} TLS handshakes resumed" if result.resumed else ""]
    print(f"{result.rows} requests in {result.elapsed:.1f} s ({rate:.0f}/s), {result.errors} errors "
          f"({figures['err_pct']:.2f}%), {latency}, {result.connections} connections"
          f"{''.join(f', {extra}' for extra in extras if extra)} -> {args.out}", file=sys.stderr)
    if result.cap_hits:
        warn(f"the in-flight cap of {args.max_in_flight} was reached {result.cap_hits} times; "
             "late requests still count from when they were due")
    return 0


def cmd_run(args, settings) -> int:
    """run [EXPERIMENT ...]: the experiments in order, each reverted unless kept."""
    home = Home(args.home)
    experiments = find_experiments(home.root, args.experiments)
    if not experiments:
        raise BadInput(f"no experiments under {os.path.join(home.root, 'experiments')}")
    if args.dry_run:
        print(format_plan(experiments, settings))
        return 0
    return Runner(home, settings).run(experiments, rotation=not args.experiments)


def format_plan(experiments, settings) -> str:
    """What run would do, for --dry-run: experiments, design, variants, commands, durations."""
    lines = []
    total = 0.0
    for experiment in experiments:
        def seconds(key):
            value = experiment.seconds.get(key.lower())
            return float(value if value is not None else settings[key])
        base, each = seconds("BASELINE_SECONDS"), seconds("EXPERIMENT_SECONDS")
        design = experiment.design or settings["DESIGN"]
        if design == "switchback":
            pairs = int(experiment.blocks or settings["BLOCKS"])
            warm = seconds("WARMUP_SECONDS")
            per_variant = base + each + 2 * pairs * warm
            longest = warm + len(experiment.candidates) * per_variant
            shape = (f"switchback: {pairs} pairs of a {base / pairs:g} s baseline block and a {each / pairs:g} s "
                     f"variant block, each after a {warm:g} s measured warm-up, in random order")
        else:
            cool = seconds("COOLDOWN_SECONDS")
            per_variant = cool + each
            longest = base + len(experiment.candidates) * per_variant
            shape = f"sequential: baseline {base:g} s first, then each variant after a {cool:g} s cool-down for {each:g} s"
        total += longest
        how = "measure.sh" if experiment.measure_sh else (
            f"built-in prober {experiment.target_url} "
            + (f"concurrency {experiment.measure['concurrency']}" if "concurrency" in experiment.measure else
               f"rate {experiment.measure['rate']}/s" if "rate" in experiment.measure else
               f"every {experiment.interval or 1:g} s"))
        lines += [f"experiment {experiment.id}: {experiment.description}",
                  f"  folder   {experiment.path}",
                  f"  measure  {how}",
                  f"  design   {shape}",
                  f"  baseline {experiment.baseline['name']}: apply {experiment.apply_command(experiment.baseline) or '(nothing)'}"]
        for variant in experiment.candidates:
            lines.append(f"  variant  {variant['name']}: apply {experiment.apply_command(variant)}; "
                         f"{per_variant:g} s at most; decide; revert unless kept")
        lines += [f"  revert   {experiment.revert}",
                  f"  decide   {experiment.decider or 'built-in rules'}"
                  + ("; may stop early" if settings["EARLY_STOP"] == "yes" and not experiment.decider else ""),
                  f"  at most  {longest:g} s of measuring plus command time"]
    lines.append(f"dry run: nothing was changed; at most {total:g} s of measuring in all")
    return "\n".join(lines)


def cmd_apply(args, settings) -> int:
    """apply EXPERIMENT VARIANT: apply a known variant, verify it against the baseline, revert on harm."""
    home = Home(args.home)
    experiment = find_experiments(home.root, [args.experiment])[0]
    return Runner(home, settings).apply(experiment, args.variant)


def cmd_revert(args, settings) -> int:
    """revert EXPERIMENT: revert its kept variant (the experiment is tried again by the next run)."""
    home = Home(args.home)
    experiment = find_experiments(home.root, [args.experiment])[0]
    code = Runner(home, settings).revert_experiment(experiment)
    publish_dashboard(home)
    return code


def cmd_recover(args, settings) -> int:
    """recover: revert what an interrupted run left applied."""
    home = Home(args.home)
    os.makedirs(home.var, exist_ok=True)
    runner = Runner(home, settings)
    with HomeLock(home.var):
        entry = runner.recover()
    if entry is None:
        print("nothing to recover: no variant is left applied")
    publish_dashboard(home)
    return 0


def cmd_dashboard(args, settings) -> int:
    """dashboard: rebuild the published files from var/."""
    home = Home(args.home)
    os.makedirs(home.var, exist_ok=True)
    publish_dashboard(home)
    print(f"published {os.path.join(home.var, 'history.json')}")
    return 0


def cmd_demo(args, settings) -> int:
    """demo: the whole loop against a built-in target, then the dashboard."""
    home = Home(os.path.abspath(args.home_dir) if args.home_dir else tempfile.mkdtemp(prefix="smart-demo-"))
    os.makedirs(home.root, exist_ok=True)
    target = DemoTarget(os.path.join(home.root, "target", "mode")).start()
    try:
        folder = write_demo_experiment(home.root, target.url, args.seconds)
        print(f"demo home {home.root}; target {target.url}")
        print("trying three variants of the demo site: noop (changes nothing), slow_backend (harmful), "
              "response_cache (helpful)")
        code = Runner(home, settings).run([load_experiment(folder)])
        state = read_json(home.state, {})
        print(f"\nkept: {state.get('kept_variant') or 'nothing'}")
        for variant in state.get("variants", []):
            print(f"  {variant['name']:<15} {variant['decision']:<7} {variant['reason']}")
        if code or args.no_serve:
            return code
        return serve_dashboard(home, args.bind, args.port)
    finally:
        target.shutdown()
        target.server_close()


def cmd_serve(args, settings) -> int:
    """serve: the dashboard over HTTP."""
    home = Home(args.home)
    with contextlib.suppress(OSError):
        publish_dashboard(home)
    return serve_dashboard(home, args.bind, args.port)


def cmd_phone_home(args, settings) -> int:
    """phone-home [RUN_ID]: send a run's result (the latest by default) to the coach; print its advice."""
    home = Home(args.home)
    state = read_json(home.state)
    if args.run_id and (not isinstance(state, dict) or state.get("run_id") != args.run_id):
        state = next((entry for entry in _history(home) if entry.get("run_id") == args.run_id), None)
    if not isinstance(state, dict) or not state.get("run_id"):
        which = f"run {args.run_id}" if args.run_id else "run"
        raise BadInput(f"no {which} to send: neither {home.state} nor {home.history} has it")
    advice = phone_home(state, settings)
    print(f"coach {advice['coach']}: {advice['advice']}")
    if advice["next_variant"] or advice["confidence"] is not None:
        print(f"next_variant {advice['next_variant']}; confidence {advice['confidence']}")
    current = read_json(home.state)
    if isinstance(current, dict) and current.get("run_id") == state.get("run_id"):
        current["coach"] = advice
        write_json(home.state, current)
    return 0


def cmd_status(args, settings) -> int:
    """status [--json]: what is applied, last verdicts, next run, attention; exit 1 when something needs it."""
    status = collect_status(Home(args.home), args.runs)
    print(json.dumps(status, indent=2) if args.json else format_status(status), end="" if not args.json else "\n")
    return 1 if status["attention"] else 0


def cmd_doctor(args, settings) -> int:
    """doctor: each check with ok or FIX and the command that fixes it; exit 1 when something needs fixing."""
    checks = doctor_checks(Home(args.home), settings)
    for name, ok, detail, fix in checks:
        print(f"{'ok ' if ok else 'FIX'}  {name}: {detail}")
        if not ok and fix:
            print(f"     -> {fix}")
    broken = sum(not ok for _, ok, _, _ in checks)
    print("all good" if not broken else f"{broken} thing(s) to fix")
    return 1 if broken else 0


def cmd_decide(args, settings) -> int:
    """decide BASELINE.csv VARIANT.csv: keep/revert on stdout, the figures on stderr."""
    result = decide_files(args.baseline, args.variant, Thresholds(settings))
    if args.json:
        print(json.dumps(result.to_json(), sort_keys=True))
    else:
        print(format_verdict(result), file=sys.stderr)
        print(result.decision)
    return 0


_DECIDE_FLAGS = {
    "IMPROVE_PCT": "--improve-pct",
    "MAX_ERR_DELTA_PCT": "--max-err-delta-pct",
    "CONFIDENCE": "--confidence",
    "MIN_SAMPLES": "--min-samples",
    "MAX_TAIL_REGRESS_PCT": "--max-tail-regress-pct",
}


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError(text)
    return value


def build_parser() -> argparse.ArgumentParser:
    """The command line of SPEC.md."""
    common = _Parser(add_help=False)
    common.add_argument("--home", default=argparse.SUPPRESS, help="the home folder (default $SMART_HOME, else beside smart.py)")
    common.add_argument("--config", default=argparse.SUPPRESS, help="settings file (default HOME/smart.conf)")
    common.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS, help="more detail")
    parser = _Parser(prog="smart.py", parents=[common],
                     description="A self-tuning agent for a small web server (SPEC.md).")
    parser.add_argument("--version", action="version", version=f"smart.py {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    def command(name, handler, help_text):
        sub = commands.add_parser(name, parents=[common], help=help_text, description=help_text)
        sub.set_defaults(handler=handler)
        return sub

    decide = command("decide", cmd_decide, "decide keep or revert from two measurement CSVs")
    decide.add_argument("baseline", metavar="BASELINE.csv")
    decide.add_argument("variant", metavar="VARIANT.csv")
    decide.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    for key, flag in _DECIDE_FLAGS.items():
        decide.add_argument(flag, dest=key, metavar="N", help=f"{SETTINGS[key][2]} (default {SETTINGS[key][0]})")

    run = command("run", cmd_run, "run experiments (every folder in experiments/ by default)")
    run.add_argument("experiments", nargs="*", metavar="EXPERIMENT", help="folder path or id")
    run.add_argument("--dry-run", action="store_true", help="print the plan and change nothing")
    measure = command("measure", cmd_measure, "probe a URL and write a measurement CSV")
    measure.add_argument("--url", action="append", required=True, metavar="URL[@WEIGHT]",
                         help="the URL to probe; repeat it for a page mix, visited in smooth weighted "
                              "round-robin order (WEIGHT a whole number from 1 to 1000, default 1; a URL that "
                              "itself ends in @DIGITS needs its weight written out, e.g. URL@1)")
    measure.add_argument("--duration", type=float, required=True, metavar="S")
    measure.add_argument("--out", required=True, metavar="FILE")
    shape = measure.add_mutually_exclusive_group()
    shape.add_argument("--interval", type=float, metavar="S", help="sequential probes every S seconds (default 1)")
    shape.add_argument("--concurrency", type=int, metavar="N", help="closed loop over N connections")
    shape.add_argument("--rate", type=float, metavar="R", help="open loop at R requests/s")
    measure.add_argument("--timeout", type=float, default=5.0, metavar="S", help="per request (default 5)")
    measure.add_argument("--max-in-flight", type=int, default=256, metavar="N",
                         help="open-loop cap on concurrent requests (default 256)")
    measure.add_argument("--method", default="GET")
    measure.add_argument("--header", action="append", default=[], metavar="NAME:VALUE")
    measure.add_argument("--insecure", action="store_true", help="skip TLS certificate checks (self-signed boxes)")
    measure.add_argument("--connections", choices=CONNECTION_MODES, default="reuse",
                         help="reuse: keep-alive (default); new: a new connection (and TLS handshake) per "
                              "request; resume: a new connection per request offering the last TLS session, "
                              "like a returning visitor")
    measure.add_argument("--expect-status", type=int, metavar="N",
                         help="a response with another status fails its check (check column: status)")
    measure.add_argument("--expect-body", metavar="TEXT",
                         help="a body without TEXT (UTF-8, anywhere in it) fails its check (check column: body)")
    command("dashboard", cmd_dashboard, "rebuild the published files from var/")
    serve = command("serve", cmd_serve, "serve the dashboard, state and run logs over HTTP")
    serve.add_argument("--bind", default="127.0.0.1", help="address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    phone = command("phone-home", cmd_phone_home, "send a run's result to the coach")
    phone.add_argument("run_id", nargs="?")
    demo = command("demo", cmd_demo, "a complete experiment against a built-in server, then the dashboard")
    demo.add_argument("--seconds", type=float, default=60.0, metavar="S",
                      help="about how long the experiment runs (default 60)")
    demo.add_argument("--no-serve", action="store_true", help="stop after the run")
    demo.add_argument("--dir", dest="home_dir", metavar="DIR", help="demo home (default a new temp folder)")
    demo.add_argument("--bind", default="127.0.0.1")
    demo.add_argument("--port", type=int, default=8080)
    command("recover", cmd_recover, "revert what an interrupted run left applied")
    apply = command("apply", cmd_apply, "apply a known variant, verify it briefly, revert on harm")
    apply.add_argument("experiment", metavar="EXPERIMENT")
    apply.add_argument("variant", metavar="VARIANT")
    revert = command("revert", cmd_revert, "revert an experiment's kept variant")
    revert.add_argument("experiment", metavar="EXPERIMENT")
    command("doctor", cmd_doctor, "check the installation and say what to fix")
    status = command("status", cmd_status, "what is applied, the last verdicts, what needs attention")
    status.add_argument("--json", action="store_true", help="one JSON object")
    status.add_argument("--runs", type=_count, default=10, metavar="N", help="recent runs to list (default 10)")
    return parser


def resolve_home(args, environ=None) -> str:
    """--home, else $SMART_HOME, else the folder that holds smart.py."""
    environ = os.environ if environ is None else environ
    home = getattr(args, "home", None) or environ.get("SMART_HOME") or os.path.dirname(os.path.abspath(__file__))
    return os.path.abspath(home)


def main(argv=None) -> int:
    """Parse argv, run the command; the one place that turns errors into messages and exit codes."""
    argv = sys.argv[1:] if argv is None else list(argv)
    verbose = "--verbose" in argv
    try:
        args = build_parser().parse_args(argv)
        args.home = resolve_home(args)
        config = getattr(args, "config", None)
        overrides = {key: getattr(args, key, None) for key in SETTINGS}
        settings = load_settings(config or os.path.join(args.home, "smart.conf"),
                                 overrides=overrides, conf_required=bool(config))
        return args.handler(args, settings)
    except SmartError as exc:
        if verbose:
            import traceback
            traceback.print_exc()
        emit(f"error: {exc}", sys.stderr, "error")
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 1


if __name__ == "__main__":
    sys.exit(main())
