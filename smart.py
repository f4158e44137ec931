#!/usr/bin/env python3
"""smart.py - a self-tuning agent for a small web server.

On a timer it runs experiments on the box it lives on: it measures a baseline,
applies each variant of an experiment, measures again, decides keep or revert
from the numbers (a rank test, not a bare comparison of medians), reverts
whatever is not kept, and publishes what happened to a dashboard.  On any
doubt or fault it reverts and says why.

One file, Python 3.11+ standard library only.  The contract (command line,
settings, file formats, decision rules, state.json) is docs/SPEC.md beside this
file; the names in __all__ are the stable API that tests and scripts may import.
"""

from __future__ import annotations

import signal
import sys

if __name__ == "__main__":
    # The imports below take a few hundred milliseconds on a small box; a SIGTERM or Ctrl-C meanwhile
    # is noted, not fatal, and main() acts on it (nothing has been changed yet).
    EARLY_SIGNALS = []
    for _early in (signal.SIGTERM, signal.SIGINT):
        signal.signal(_early, lambda signum, frame: EARLY_SIGNALS.append(signum))

import argparse
import array
import bisect
import collections
import contextlib
import errno
import fcntl
import glob
import gzip
import html
import http.client
import http.server
import io
import json
import math
import operator
import os
import pwd
import random
import re
import secrets
import select
import selectors
import shlex
import shutil
import socket
import ssl
import stat
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from dataclasses import dataclass
from datetime import datetime, timezone
from itertools import compress, count, islice, repeat
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


###### Errors: each failure a user can see, with its exit code ######

class SmartError(Exception):
    """A failure a user can act on; carries the process exit code."""
    exit_code = 1


class BadInput(SmartError):
    """Bad input or usage: an unreadable or malformed file, a bad setting, an unknown name."""
    exit_code = 2


class WorkFailed(SmartError):
    """The work itself failed: a revert failed, a run was interrupted."""
    exit_code = 1


class LockHeld(WorkFailed):
    """Another run holds the home's lock."""


class RevertFailed(WorkFailed):
    """A revert failed: the box may be left on a variant; the journal stays for the next run."""


class Interrupted(WorkFailed):
    """SIGTERM or SIGINT arrived: what was applied has been reverted."""


class Unhealthy(WorkFailed):
    """The target answers mostly failures on the baseline: nothing is tried against a broken site."""


class ApplyFailed(SmartError):
    """An apply command failed or overran its time box (the variant is reverted)."""


class MeasureFailed(SmartError):
    """A measurement failed (the variant is reverted)."""


class CoachError(WorkFailed):
    """The coach could not be reached or gave no usable reply (a run goes on regardless)."""


###### Output: lines for the operator, the journal's priorities ######

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


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """text without control characters (escape sequences from a command's output, a coach, a file):
    what reaches a terminal must not drive it."""
    return _CONTROL.sub("", text)


def emit(line: str, stream=None, level: str = "info") -> None:
    """Print a line without control characters; under journald with a <N> priority prefix."""
    stream = sys.stdout if stream is None else stream
    prefix = f"<{JOURNAL_PRIORITY[level]}>" if to_journal(stream) else ""
    print(prefix + printable(line), file=stream, flush=True)


def warn(message: str) -> None:
    """Print a one-line warning on stderr."""
    emit(f"warning: {message}", sys.stderr, "warning")


###### Settings: smart.conf, the environment, flags ######

class Kind:
    """What a setting or a meta.json field may hold: parsed from smart.conf text, or checked as a JSON value."""

    def __init__(self, description: str, from_text, accepts):
        self.description = description
        self.from_text = from_text      # text -> value; ValueError when the text is not one
        self.accepts = accepts          # a JSON value -> whether it is one


    @classmethod
    def number(cls, kind, low=None, high=None, low_open=False, high_open=False) -> "Kind":
        """A whole number (kind int) or a number (kind float) in a range."""
        def in_range(value):
            return (math.isfinite(value)
                    and (low is None or (value > low if low_open else value >= low))
                    and (high is None or (value < high if high_open else value <= high)))

        def from_text(text):
            value = kind(text)
            if not in_range(value):
                raise ValueError(text)
            return value

        def accepts(value):
            types = (int,) if kind is int else (int, float)
            return isinstance(value, types) and not isinstance(value, bool) and in_range(value)

        bounds = []
        if low is not None:
            bounds.append(f"{'>' if low_open else '>='} {low:g}")
        if high is not None:
            bounds.append(f"{'<' if high_open else '<='} {high:g}")
        noun = "a whole number" if kind is int else "a number"
        return cls(noun + (" " + " and ".join(bounds) if bounds else ""), from_text, accepts)

    @classmethod
    def choice(cls, *options) -> "Kind":
        def from_text(text):
            if text not in options:
                raise ValueError(text)
            return text
        return cls("one of " + ", ".join(options), from_text, lambda value: value in options)

    @classmethod
    def text(cls, description="text", pattern=None) -> "Kind":
        """A string; with pattern, one that matches it."""
        def fits(value):
            return isinstance(value, str) and (pattern is None or re.match(pattern, value) is not None)

        def from_text(value):
            if not fits(value):
                raise ValueError(value)
            return value
        return cls(description, from_text, fits)


URL_OR_EMPTY = Kind.text("empty or an http:// or https:// URL", r"^(?:|https?://[^\s/]+.*)\Z")
TOKEN = Kind.text("printable ASCII without spaces (it goes into an HTTP header)", r"^[\x21-\x7e]*\Z")

# key: (default, Kind, meaning)
SETTINGS = {
    "BASELINE_SECONDS": (300.0, Kind.number(float, 0, low_open=True), "baseline measurement length"),
    "EXPERIMENT_SECONDS": (300.0, Kind.number(float, 0, low_open=True), "each variant's measurement length"),
    "COOLDOWN_SECONDS": (60.0, Kind.number(float, 0), "wait after apply before measuring"),
    "IMPROVE_PCT": (10.0, Kind.number(float, 0, 100, high_open=True), "p50 improvement (%) needed to keep"),
    "MAX_ERR_DELTA_PCT": (1.0, Kind.number(float, 0, 100), "most error-rate increase (points) a kept variant may add"),
    "CONFIDENCE": (0.99, Kind.number(float, 0.5, 1, high_open=True), "confidence that the improvement is real"),
    "MIN_SAMPLES": (30, Kind.number(int, 2), "fewest successful samples per arm"),
    "MAX_TAIL_REGRESS_PCT": (25.0, Kind.number(float, 0), "most p99 regression (%) a kept variant may have"),
    "DESIGN": ("switchback", Kind.choice("switchback", "sequential"), "how variants are measured against the baseline"),
    "BLOCKS": (12, Kind.number(int, 2), "switchback: baseline/variant block pairs per variant"),
    "WARMUP_SECONDS": (5.0, Kind.number(float, 0), "switchback: measured, unjudged wait after each switch"),
    "EARLY_STOP": ("yes", Kind.choice("yes", "no"), "end a variant early once its verdict is certain"),
    "LOOK_SECONDS": (5.0, Kind.number(float, 0, low_open=True), "how often the sequential stop looks"),
    "VERIFY_SECONDS": (60.0, Kind.number(float, 0, low_open=True), "apply: baseline and variant check length"),
    "COMMAND_TIMEOUT_SECONDS": (60.0, Kind.number(float, 0, low_open=True), "time box of each command"),
    "RETRY_HOURS": (24.0, Kind.number(float, 0), "the timer tries an experiment that kept nothing again after this"),
    "RECHECK_DAYS": (7.0, Kind.number(float, 0), "the timer re-checks a kept variant this long after its last "
                     "confirmation; 0 never"),
    "ACCESS_LOG": ("/var/log/nginx/smart-timing.log", Kind.text("an absolute path", r"^/\S*\Z"),
                   "nginx's timing log of visitors' requests, for measure.source access-log"),
    "KEEP_RUNS": (200, Kind.number(int, 1), "run folders kept under var/runs"),
    "PHONE_HOME": ("borderline", Kind.choice("never", "borderline", "always"), "when to ask the coach"),
    "PHONE_HOME_URL": ("", URL_OR_EMPTY, "coach endpoint"),
    "PHONE_HOME_TOKEN": ("", TOKEN, "coach bearer token"),
    "PHONE_HOME_MODEL": ("llama3.2", Kind.text(), "model name for an Ollama-style local coach"),
    "SITE_URL": ("http://127.0.0.1", Kind.text("an http:// or https:// URL", r"^https?://[^\s/]+\Z"),
                 "the site a meta.json URL path like /about/ is measured on"),
    "SITE_TLS_URL": ("https://127.0.0.1", Kind.text("an https:// URL", r"^https://[^\s/]+\Z"),
                     "the HTTPS site of an experiment with \"site\": \"tls\""),
    "HELPER_COMMAND": ("sudo -n /usr/local/sbin/", Kind.text("a command prefix", r"^[A-Za-z0-9 ./_-]*\Z"),
                       "what runs a root helper: this, then the helper's name and its arguments"),
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
    kind = SETTINGS[key][1]
    try:
        return kind.from_text(text.strip())
    except ValueError:
        shown = "(value not shown)" if key in SECRET_SETTINGS else repr(text)
        raise BadInput(f"{where}: {key}={shown} is not valid: expected {kind.description}") from None


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

VARIANT_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}\Z")     # a file name, never an option or hidden
A_STRING = Kind.text("a string")
A_COMMAND = Kind.text("a shell command string")

# meta.json's fields with a plain value: field -> Kind; variants, target_url and measure are checked apart
META_FIELDS = {
    "id": A_STRING,
    "description": A_STRING,
    "target_url": A_STRING,
    "revert": A_COMMAND,
    "decide": A_COMMAND,
    "design": SETTINGS["DESIGN"][1],
    "helper": Kind.text("a root helper's name (smart-nginx, smart-php)", r"^smart-[a-z]+\Z"),
    "site": Kind.choice("http", "tls"),
    "blocks": SETTINGS["BLOCKS"][1],
    "baseline_seconds": SETTINGS["BASELINE_SECONDS"][1],
    "experiment_seconds": SETTINGS["EXPERIMENT_SECONDS"][1],
    "cooldown_seconds": SETTINGS["COOLDOWN_SECONDS"][1],
    "warmup_seconds": SETTINGS["WARMUP_SECONDS"][1],
}


def shape_kind(name: str, kind=float) -> Kind:
    """A load-shape number with the prober's own limits (check_shape), for meta.json."""
    return Kind.number(kind, *_SHAPE_LIMITS[name])


def measure_fields() -> dict:
    """meta.json's `measure` object: field -> Kind, the load shape within the prober's own limits."""
    shape = shape_kind
    return {
        "concurrency": shape("concurrency", int),
        "rate": shape("rate"),
        "timeout": shape("timeout"),
        "max_in_flight": shape("max_in_flight", int),
        "method": Kind.text("an HTTP method name", _TOKEN.pattern),
        "headers": Kind("a list of \"Name: value\" strings", None,
                        lambda value: isinstance(value, list) and all(isinstance(h, str) for h in value)),
        "insecure": Kind("true or false", None, lambda value: isinstance(value, bool)),
        "connections": Kind.choice(*CONNECTION_MODES),
        "source": Kind.choice(*MEASURE_SOURCES),
    }


EXPECT_FIELDS = {     # meta.json's `expect` of a URL: what its every answer must show
    "status": Kind.number(int, 100, 999),
    "body": Kind.text("a non-empty text", r"(?s)^.+\Z"),
}
URL_FIELDS = {"url": A_STRING, "weight": Kind.number(int, 1, 1000), "expect": None}
HELPER_WORD = r"^[A-Za-z0-9][A-Za-z0-9._]{0,63}\Z"     # a helper setting's name or value: a sudoers argument as is
REQUIREMENTS = ("nginx", "php-fpm", "tls")             # besides absolute paths that must exist


class Experiment:
    """One folder under experiments/: its meta.json, checked, with the commands to run.

    A variant's `set` ({"NAME": "VALUE"}) is applied through the experiment's root `helper`
    (`HELPER set N1 V1 ...`, names sorted, so sudoers lists it exactly) and reverted by
    `HELPER reset N1 ...` over every name the experiment sets; a URL that is a path is on the site
    (SITE_URL, or SITE_TLS_URL with "site": "tls").  `settings` supplies those; the defaults without.
    """

    def __init__(self, path: str, meta: dict, settings=None):
        settings = settings or {key: spec[0] for key, spec in SETTINGS.items()}
        self.path = path
        self.helper = meta.get("helper")
        self.helper_command = settings["HELPER_COMMAND"]
        implied = {"smart-nginx": ["nginx"], "smart-php": ["php-fpm"]}.get(self.helper, [])
        self.requires = list(dict.fromkeys(list(meta.get("requires") or []) + implied))
        self.site_url = settings["SITE_TLS_URL" if meta.get("site") == "tls" else "SITE_URL"]
        self.id = meta.get("id") or os.path.basename(path)
        self.description = meta.get("description", "")
        self.sweep = meta.get("sweep")
        self.variants = meta.get("variants") or sweep_variants(self.sweep)
        self.baseline = next((v for v in self.variants if v["name"] == "baseline"), self.variants[0])
        self.candidates = [v for v in self.variants if v is not self.baseline]
        names = sorted({name for v in self.variants for name in (v.get("set") or {})})
        self.revert = meta.get("revert") or (self.helper_call("reset", names) if names else "./revert.sh")
        self.helper_names = names
        # the URLs to measure: one target_url (with its expect), or a weighted page mix
        self.urls = [dict(entry, url=self.site_url + entry["url"] if entry["url"].startswith("/") else entry["url"])
                     for entry in meta.get("urls") or ([{"url": meta["target_url"], "expect": meta.get("expect") or {}}]
                                                       if meta.get("target_url") else [])]
        self.target_url = self.urls[0]["url"] if self.urls else None
        self.interval = meta.get("measure_interval_sec")
        self.measure = meta.get("measure") or {}
        self.measure_sh = os.path.isfile(os.path.join(path, "measure.sh"))
        self.seconds = {key: meta.get(key) for key in ("baseline_seconds", "experiment_seconds", "cooldown_seconds",
                                                       "warmup_seconds")}
        self.design = meta.get("design")
        self.blocks = meta.get("blocks")
        self.decider = meta.get("decide") or ("./decide.sh" if os.path.isfile(os.path.join(path, "decide.sh")) else None)

    def helper_call(self, verb: str, words) -> str:
        """The shell command that runs the root helper with a verb and its words."""
        return f"{self.helper_command}{self.helper} {verb} {' '.join(words)}"

    def apply_command(self, variant: dict):
        """The shell command that applies a variant, or None for a baseline with nothing to apply."""
        if variant.get("set"):
            return self.helper_call("set", [word for name in sorted(variant["set"])
                                            for word in (name, str(variant["set"][name]))])
        if variant.get("apply"):
            return variant["apply"]
        if os.path.isfile(os.path.join(self.path, "apply.sh")):
            return f"./apply.sh {shlex.quote(variant['name'])}"
        return None

    def variant(self, name: str):
        return next((v for v in self.variants if v["name"] == name), None)

    def targets(self) -> list:
        """The built-in prober's Targets: each URL with its weight and expected answer."""
        spec = self.measure
        return [Target(entry["url"], spec.get("method", "GET"), spec.get("headers", []), bool(spec.get("insecure")),
                       weight=entry.get("weight", 1), expect_status=(entry.get("expect") or {}).get("status"),
                       expect_body=(entry.get("expect") or {}).get("body"))
                for entry in self.urls]


def load_experiment(path: str, settings=None) -> Experiment:
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

    def check(where, value, kind):
        if not kind.accepts(value):
            raise bad(where, f"{value!r} is not valid: expected {kind.description}")

    if not isinstance(meta, dict):
        raise bad("(top level)", "expected a JSON object")
    for field, kind in dict(META_FIELDS, measure_interval_sec=shape_kind("interval")).items():
        if meta.get(field) is not None:
            check(field, meta[field], kind)
    if meta.get("sweep") is not None:
        _check_sweep(meta, bad)
        meta = dict(meta, variants=sweep_variants(meta["sweep"]))
    _check_variants(meta.get("variants"), bad)
    has_measure_sh = os.path.isfile(os.path.join(path, "measure.sh"))
    if meta.get("target_url") is None and meta.get("urls") is None and not has_measure_sh:
        raise bad("target_url", "required (or urls, or a measure.sh in the folder)")
    if meta.get("target_url") is not None and meta.get("urls") is not None:
        raise bad("urls", "give target_url or urls, not both")
    _check_urls(meta, bad, check)
    measure = meta.get("measure", {})
    if not isinstance(measure, dict):
        raise bad("measure", "expected an object")
    fields = measure_fields()
    for key, value in measure.items():
        if key not in fields:
            raise bad(f"measure.{key}", f"unknown; expected one of {', '.join(sorted(fields))}")
        check(f"measure.{key}", value, fields[key])
    if sum(key in measure for key in ("concurrency", "rate")) > 1:
        raise bad("measure", "choose concurrency or rate, not both")
    _check_helper_and_requires(meta, bad)
    experiment = Experiment(path, meta, settings)
    try:
        experiment.targets()
    except BadInput as exc:                  # the prober's own words name its command-line flags
        problem = str(exc)
        for flag, field in (("--method", "measure.method"), ("--header", "measure.headers"),
                            ("--expect-status", "expect.status"), ("--expect-body", "expect.body")):
            if problem.startswith(flag):
                raise bad(field, problem[len(flag):].strip()) from None
        raise bad("urls" if meta.get("urls") else "target_url", problem) from None
    for variant in experiment.candidates:
        if experiment.apply_command(variant) is None:
            raise bad(f"variant {variant['name']!r}", "no apply command and no apply.sh in the folder")
    if not meta.get("revert") and not experiment.helper_names and not os.path.isfile(os.path.join(path, "revert.sh")):
        raise bad("revert", "required (or a revert.sh in the folder, or variants that set through a helper)")
    return experiment


SWEEP_MOST = 32      # values a sweep may walk
SWEEP_NAME = r"^[A-Za-z0-9][A-Za-z0-9_]{0,39}\Z"


def sweep_values(sweep: dict) -> list:
    """A sweep's values in the order it walks them: ascending (docs/SPEC.md "Sweeps")."""
    if "values" in sweep:
        return sorted(sweep["values"])
    low, high, step = sweep["from"], sweep["to"], sweep["step"]
    steps = math.floor((high - low) / step + 1e-9)
    whole = all(isinstance(x, int) for x in (low, high, step))
    return [low + i * step if whole else round(low + i * step, 9) for i in range(steps + 1)]


def _number_text(value) -> str:
    """A sweep value as the helper gets it: 8, not 8.0; 0.25 as is."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value) if isinstance(value, int) else f"{value:.9g}"


def sweep_template(sweep: dict) -> dict:
    """NAME -> VALUE with {value} in it, from a sweep's `set` (a name alone means NAME: {value})."""
    return dict(sweep["set"]) if isinstance(sweep["set"], dict) else {sweep["set"]: "{value}"}


def sweep_variants(sweep: dict) -> list:
    """The variants a sweep stands for: the baseline (the configuration as it is), then one per value,
    named NAME_VALUE, whose `set` has the value in place of {value}."""
    variants = [{"name": "baseline"}]
    for value in sweep_values(sweep):
        text = _number_text(value)
        variants.append({"name": f"{sweep['name']}_{text}", "value": value,
                         "set": {key: str(word).replace("{value}", text) for key, word in sweep_template(sweep).items()}})
    return variants


def _check_sweep(meta: dict, bad) -> None:
    """meta.json's sweep: {"name", "set", and "values" or "from"/"to"/"step"}, through the helper."""
    sweep = meta["sweep"]
    if not isinstance(sweep, dict):
        raise bad("sweep", "expected an object with name, set, and values or from, to and step")
    if meta.get("variants") is not None:
        raise bad("sweep", "give variants or a sweep, not both (a sweep's baseline is the configuration as it is)")
    if not meta.get("helper"):
        raise bad("sweep", "needs the experiment's \"helper\" (smart-nginx or smart-php), which sets each value")
    known = ("name", "set", "values", "from", "to", "step")
    for key in sweep:
        if key not in known:
            raise bad(f"sweep.{key}", f"unknown; expected one of {', '.join(known)}")
    if not isinstance(sweep.get("name"), str) or not re.match(SWEEP_NAME, sweep["name"]):
        raise bad("sweep.name", f"{sweep.get('name')!r}: 1 to 40 letters, digits and _ (variants are NAME_VALUE)")
    template = sweep.get("set")
    if isinstance(template, str):
        template = {template: "{value}"}
    if not isinstance(template, dict) or not template or not all(
            isinstance(key, str) and re.match(HELPER_WORD, key) and isinstance(word, (str, int))
            and not isinstance(word, bool) for key, word in template.items()):
        raise bad("sweep.set", "expected a helper setting's name, or an object of NAME: VALUE")
    if not any("{value}" in str(word) for word in template.values()):
        raise bad("sweep.set", "no VALUE has {value} in it: every value of the sweep would set the same")

    def number(value):
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

    if "values" in sweep:
        if any(key in sweep for key in ("from", "to", "step")):
            raise bad("sweep.values", "give values or from, to and step, not both")
        values = sweep["values"]
        if not isinstance(values, list) or not all(number(value) for value in values):
            raise bad("sweep.values", "expected a list of numbers")
        if len(set(values)) != len(values):
            raise bad("sweep.values", "a value is listed twice")
    else:
        if not all(number(sweep.get(key)) for key in ("from", "to", "step")):
            raise bad("sweep", "needs values, or from, to and step (numbers)")
        if sweep["step"] <= 0 or sweep["to"] <= sweep["from"]:
            raise bad("sweep.step", "from must be below to, and step above 0")
        if (sweep["to"] - sweep["from"]) / sweep["step"] + 1 > SWEEP_MOST + 1e-9:
            raise bad("sweep.step", f"more than {SWEEP_MOST} values from {sweep['from']} to {sweep['to']}")
        values = sweep_values(sweep)
    if not 2 <= len(values) <= SWEEP_MOST:
        raise bad("sweep.values", f"a sweep walks 2 to {SWEEP_MOST} values; this has {len(values)}")
    for value in values:
        for key, word in template.items():
            text = str(word).replace("{value}", _number_text(value))
            if not re.match(HELPER_WORD, text):
                raise bad(f"sweep.set.{key}", f"value {value!r} gives {text!r}: a helper value is letters, digits, "
                                             ". and _")


def _check_helper_and_requires(meta: dict, bad) -> None:
    """A variant's `set` needs the experiment's `helper`, words a sudoers line can hold as they are,
    and no `apply` beside it; `requires` names software or absolute paths."""
    for index, variant in enumerate(meta["variants"]):
        settings = variant.get("set")
        if settings is None:
            continue
        where = f"variants[{index}].set"
        if not meta.get("helper"):
            raise bad(where, "needs the experiment's \"helper\" (smart-nginx or smart-php)")
        if "apply" in variant:
            raise bad(where, "give set or apply, not both")
        if not isinstance(settings, dict) or not settings:
            raise bad(where, "expected an object of NAME: VALUE")
        for name, value in settings.items():
            if not re.match(HELPER_WORD, name) or not isinstance(value, (str, int)) or isinstance(value, bool) \
                    or not re.match(HELPER_WORD, str(value)):
                raise bad(f"{where}.{name}", f"{value!r}: names and values are letters, digits, . and _")
    requires = meta.get("requires")
    if requires is not None and (not isinstance(requires, list) or not all(
            isinstance(need, str) and (need in REQUIREMENTS or os.path.isabs(need)) for need in requires)):
        raise bad("requires", f"expected a list of {', '.join(REQUIREMENTS)} or absolute paths")


def _check_urls(meta: dict, bad, check) -> None:
    """target_url's expect, or the urls list: each {"url", "weight", "expect": {"status", "body"}}."""
    if meta.get("urls") is not None:
        if not isinstance(meta["urls"], list) or not meta["urls"]:
            raise bad("urls", "expected a non-empty list of {\"url\": ..., \"weight\": ..., \"expect\": ...}")
        entries = [(f"urls[{index}].", entry) for index, entry in enumerate(meta["urls"])]
    elif meta.get("target_url") is not None:
        entries = [("", {"url": meta["target_url"], **({"expect": meta["expect"]} if "expect" in meta else {})})]
    else:
        if meta.get("expect") is not None:
            raise bad("expect", "needs a target_url")
        return
    for where, entry in entries:
        if not isinstance(entry, dict):
            raise bad(where.rstrip("."), "expected an object with url, and optionally weight and expect")
        for key, value in entry.items():
            if key not in URL_FIELDS:
                raise bad(f"{where}{key}", f"unknown; expected one of {', '.join(URL_FIELDS)}")
            if URL_FIELDS[key] is not None:
                check(f"{where}{key}", value, URL_FIELDS[key])
        if not isinstance(entry.get("url"), str):
            raise bad(f"{where}url", "required")
        expect = entry.get("expect")
        if expect is None:
            continue
        if not isinstance(expect, dict):
            raise bad(f"{where}expect", "expected an object with status and/or body")
        for key, value in expect.items():
            if key not in EXPECT_FIELDS:
                raise bad(f"{where}expect.{key}", f"unknown; expected one of {', '.join(EXPECT_FIELDS)}")
            check(f"{where}expect.{key}", value, EXPECT_FIELDS[key])


def _check_variants(variants, bad) -> None:
    if not isinstance(variants, list) or not variants:
        raise bad("variants", "expected a non-empty list of {\"name\": ..., \"apply\": ...}")
    seen = set()
    for index, variant in enumerate(variants):
        where = f"variants[{index}]"
        if not isinstance(variant, dict):
            raise bad(where, "expected an object with name and apply")
        name = variant.get("name")
        if not isinstance(name, str) or not VARIANT_NAME.match(name):
            raise bad(f"{where}.name", f"{name!r} must be 1 to 64 of A-Z a-z 0-9 . _ - and not start with . or -")
        if name in seen:
            raise bad(f"{where}.name", f"{name!r} is used twice")
        seen.add(name)
        if "apply" in variant and not A_COMMAND.accepts(variant["apply"]):
            raise bad(f"{where}.apply", "expected a shell command string")
    if len(variants) < 2:
        raise bad("variants", "needs at least one variant besides the baseline")


@dataclass(frozen=True)
class Schedule:
    """How an experiment's variants are measured: design and lengths from meta.json, else the settings."""

    design: str
    blocks: int
    baseline_seconds: float
    experiment_seconds: float
    cooldown_seconds: float
    warmup_seconds: float
    look_seconds: float
    early_stop: bool

    @classmethod
    def of(cls, experiment: Experiment, settings: dict) -> "Schedule":
        def seconds(key):
            value = experiment.seconds.get(key.lower())
            return float(value if value is not None else settings[key])
        return cls(design=experiment.design or settings["DESIGN"],
                   blocks=int(experiment.blocks or settings["BLOCKS"]),
                   baseline_seconds=seconds("BASELINE_SECONDS"), experiment_seconds=seconds("EXPERIMENT_SECONDS"),
                   cooldown_seconds=seconds("COOLDOWN_SECONDS"), warmup_seconds=seconds("WARMUP_SECONDS"),
                   look_seconds=settings["LOOK_SECONDS"],
                   # a custom decider has the last word, so no built-in look may end a measurement early
                   early_stop=settings["EARLY_STOP"] == "yes" and experiment.decider is None)

    def look_every(self, horizon: float) -> float:
        """Seconds between the sequential design's looks over a horizon."""
        return max(0.5, min(self.look_seconds, horizon / 10))

    def variant_seconds(self) -> float:
        """The longest one variant's measuring can take."""
        if self.design == "switchback":
            return self.baseline_seconds + self.experiment_seconds + 2 * self.blocks * self.warmup_seconds
        return self.cooldown_seconds + self.experiment_seconds

    def run_seconds(self, variants: int) -> float:
        """The longest a run of that many variants can take to measure."""
        opening = self.warmup_seconds if self.design == "switchback" else self.baseline_seconds
        return opening + variants * self.variant_seconds()


def lacks(experiment: Experiment) -> list:
    """What this box lacks of what the experiment needs to run: its `requires` (nginx, php-fpm, an
    HTTPS site answering at SITE_TLS_URL, paths) and its root helper."""
    missing = []
    for need in experiment.requires:
        if need == "nginx" and not (shutil.which("nginx") or os.path.exists("/usr/sbin/nginx")):
            missing.append("nginx")
        elif need == "php-fpm" and not (shutil.which("php-fpm8.2") or glob.glob("/usr/sbin/php-fpm*")):
            missing.append("php-fpm")
        elif need == "tls" and not _answers_tls(experiment.site_url):
            missing.append(f"an HTTPS site at {experiment.site_url}")
        elif os.path.isabs(need) and not os.path.exists(need):
            missing.append(need)
    if experiment.helper:
        helper = experiment.helper_command.split()[-1] + experiment.helper if experiment.helper_command.strip() \
            else experiment.helper
        if not (os.path.exists(helper) or shutil.which(helper)):
            missing.append(f"the helper {helper} (deploy/install.sh installs it)")
    return missing


def _answers_tls(url: str) -> bool:
    parts = urllib.parse.urlsplit(url)
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    try:
        with socket.create_connection((parts.hostname, parts.port or 443), timeout=2) as sock:
            with context.wrap_socket(sock, server_hostname=parts.hostname):
                return True
    except (OSError, ssl.SSLError):
        return False


def _meta_id(path: str):
    meta = read_json(path)
    return meta.get("id") if isinstance(meta, dict) else None


def find_experiments(home: str, names, settings=None) -> list:
    """Experiments named by folder path or id, or every folder in experiments/ in name order."""
    root = os.path.join(home, "experiments")
    if not names:
        try:
            folders = sorted(e for e in os.listdir(root) if os.path.isdir(os.path.join(root, e)))
        except FileNotFoundError:
            raise BadInput(f"{root}: no experiments folder; create one with an NNN_name/meta.json") from None
        return [load_experiment(os.path.join(root, folder), settings) for folder in folders]
    found = []
    for name in names:
        if os.path.isdir(name):
            found.append(load_experiment(os.path.abspath(name), settings))
        elif os.path.isdir(os.path.join(root, name)):
            found.append(load_experiment(os.path.join(root, name), settings))
        else:
            folders = sorted(os.listdir(root)) if os.path.isdir(root) else []
            matches = [folder for folder in folders
                       if _meta_id(os.path.join(root, folder, "meta.json")) == name]
            if not matches:
                raise BadInput(f"unknown experiment {name!r}: not a folder, nor an id under {root}")
            found.extend(load_experiment(os.path.join(root, folder), settings) for folder in matches)
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
MEASURE_SOURCES = ("prober", "access-log")     # measure.source: probes of our own, or visitors' requests


class Target:
    """A URL to probe, checked before anything is sent: its request bytes, its weight in a page
    mix, and what its responses must show (a status, a text in the body) to pass."""

    @staticmethod
    def label_of(url: str) -> str:
        """A URL as the CSV's url column holds it (a comma would split the row)."""
        return url.replace(",", "%2C")

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
        self.label = self.label_of(url)
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

def is_failure(code: int) -> bool:
    """A request that failed whatever the URL: no HTTP answer (code 0) or a server error (5xx).

    A request also fails when its content check failed (the CSV's `check` column), or when its
    status differs from what its URL usually answered on the baseline (Arm.judged).  Failed
    requests count in the error rate and stay out of the latency percentiles (docs/SPEC.md).
    """
    return code == 0 or code >= 500


def answer_class(code: int) -> int:
    """The status a request's answer is judged as: a 206 (a range of it) or a 304 (not modified)
    answers a request for the same page as its 200 does, so a visitor's conditional and range
    requests never pass for a broken route."""
    return 200 if code in (206, 304) else code


class Arm:
    """One arm's measurements: the latencies of its successful requests (array of float ms) with
    their status, URL and block, and a count of every answer.

    judged() turns the answers whose status differs from the baseline's usual status for their
    URL into failures, so that a variant breaking routing (fast 404s) can never pass for faster.
    """

    __slots__ = ("path", "latencies", "statuses", "status", "urls", "url_names", "url_lookup", "blocks", "total",
                 "errors", "block_totals", "block_errors", "block_started", "answers", "in_order")

    def __init__(self, path="-"):
        self.path = path
        self.latencies = array.array("d")
        self.statuses = None                  # array('H') parallel to latencies once successes differ in status
        self.status = None                    # ... until then the one status every success had
        self.urls = None                      # array('H') parallel to latencies, once rows name their URL
        self.url_names = [None]               # what those indexes stand for; 0 is "the one URL"
        self.url_lookup = {None: 0}           # ... and the other way round
        self.blocks = None                    # array('l') parallel to latencies, when rows carry a block
        self.total = 0
        self.errors = 0
        self.block_totals = {}
        self.block_errors = {}
        self.block_started = {}               # block -> epoch seconds of its first row (which arm went first)
        self.answers = collections.Counter()  # (url, status) -> requests, the failed ones too
        self.in_order = False                 # latencies are sorted (settle)

    def add(self, latency_ms: float, code: int, block=None, at=None, url=None, check="") -> None:
        """Count one request; `at` is when it was sent, `check` names a content check it failed."""
        self.total += 1
        self.answers[(url, code)] += 1
        failed = is_failure(code) or bool(check)
        if block is not None:
            if self.blocks is None:
                self.blocks = array.array("l", bytes(8 * len(self.latencies)))
            if block not in self.block_started and at is not None:
                self.block_started[block] = at
            self.block_totals[block] = self.block_totals.get(block, 0) + 1
            if failed:
                self.block_errors[block] = self.block_errors.get(block, 0) + 1
        if failed:
            self.errors += 1
            return
        self.add_success(latency_ms, code)
        if url is not None or self.urls is not None:
            self._url_indexes().append(self._url_index(url))
        if self.blocks is not None:
            self.blocks.append(block if block is not None else 0)

    def add_success(self, latency_ms: float, code: int) -> None:
        """The latency and status of a successful request, with nothing else counted."""
        self.latencies.append(latency_ms)
        if self.statuses is not None:
            self.statuses.append(code)
        elif self.status is None or self.status == code:
            self.status = code
        else:
            self.statuses = array.array("H", [self.status]) * (len(self.latencies) - 1)
            self.statuses.append(code)

    def _url_indexes(self):
        if self.urls is None:
            self.urls = array.array("H", bytes(2 * len(self.latencies)))
        return self.urls

    def _url_index(self, url) -> int:
        index = self.url_lookup.get(url)
        if index is None:
            index = self.url_lookup[url] = len(self.url_names)
            self.url_names.append(url)
        return index

    @property
    def ok(self) -> int:
        return len(self.latencies)

    def settle(self) -> None:
        """Sort the latencies in place when nothing else is kept per row (one URL, one status, no
        blocks): a verdict then needs no sorted copy of a million rows."""
        if self.statuses is None and self.urls is None and self.blocks is None and not self.in_order:
            counts = _value_counts(self.latencies)
            if counts is None:
                self.latencies = array.array("d", sorted(self.latencies))
            else:
                self.latencies = None            # the unsorted rows go before their sorted copy is made
                self.latencies = _in_order(counts)
            self.in_order = True

    def usual_status(self) -> dict:
        """URL -> the status (1xx-4xx) this arm answered most often for it, 206 and 304 counted as
        the 200 they stand for (answer_class); ties go to the lower status."""
        counts = collections.Counter()
        for (url, code), count in self.answers.items():
            if 100 <= code < 500:
                counts[(url, answer_class(code))] += count
        best = {}
        for (url, code), count in counts.items():
            if (count, -code) > best.get(url, (0, 0)):
                best[url] = (count, -code)
        return {url: -negative for url, (_, negative) in best.items()}

    def judged(self, usual: dict) -> "Arm":
        """This arm with every successful request whose status differs from usual[its URL] failed."""
        wrong = {(url, code) for (url, code) in self.answers
                 if not is_failure(code) and url in usual and answer_class(code) != usual[url]}
        if not wrong:
            return self
        return self._select(lambda url, code, block: (url, code) not in wrong)

    def only(self, blocks) -> "Arm":
        """A copy holding only the rows of the given blocks."""
        keep = set(blocks)
        return self._select(lambda url, code, block: True, keep)

    def _select(self, keeps, blocks=None) -> "Arm":
        """A copy of the successful rows keeps(url, code, block) holds for (the others become failures),
        over the given blocks (all when None)."""
        part = Arm(self.path)
        part.url_names, part.url_lookup = list(self.url_names), dict(self.url_lookup)
        part.urls = None if self.urls is None else array.array("H")
        part.blocks = None if self.blocks is None else array.array("l")
        urls = self.urls if self.urls is not None else repeat(0)
        rows = self.blocks if self.blocks is not None else repeat(None)
        moved = collections.Counter()
        statuses = self.statuses if self.statuses is not None else repeat(self.status)
        for latency, code, index, block in zip(self.latencies, statuses, urls, rows):
            if blocks is not None and block not in blocks:
                continue
            if keeps(self.url_names[index], code, block):
                part.add_success(latency, code)
                if part.urls is not None:
                    part.urls.append(index)
                if part.blocks is not None:
                    part.blocks.append(block)
            else:
                moved[block] += 1
        chosen = self.block_totals.keys() if blocks is None else blocks
        if self.blocks is None:
            part.total, part.errors = self.total, self.errors + moved[None]
        for block in chosen:
            part.total += self.block_totals.get(block, 0)
            part.errors += self.block_errors.get(block, 0) + moved[block]
            part.block_totals[block] = self.block_totals.get(block, 0)
            part.block_errors[block] = self.block_errors.get(block, 0) + moved[block]
            if block in self.block_started:
                part.block_started[block] = self.block_started[block]
        part.answers = self.answers
        part.in_order = self.in_order and self.blocks is None       # a subset of sorted rows stays sorted
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


CSV_COLUMNS = ("timestamp", "latency_ms", "response_code", "block", "url", "check")   # the last three optional


def csv_layout(header: str):
    """The columns a header line names, or None when the line is no header."""
    names = [name.strip() for name in header.split(",")]
    if names[:3] != list(CSV_COLUMNS[:3]) or not set(names[3:]) <= set(CSV_COLUMNS[3:]) \
            or len(set(names)) != len(names):
        return None
    return tuple(names)


def _parse_row(line: str, layout=None):
    """One CSV line -> (timestamp, latency_ms, code, block, url, check); ValueError says what is wrong.

    Without a header's layout, 3 fields are the basic row and 4 carry a block.
    """
    fields = line.split(",")
    if layout is None:
        if len(fields) not in (3, 4):
            raise ValueError(f"expected 3 or 4 fields, found {len(fields)}")
        layout = CSV_COLUMNS[:len(fields)]
    elif len(fields) != len(layout):
        raise ValueError(f"expected {len(layout)} fields ({','.join(layout)}), found {len(fields)}")
    row = dict(zip(layout, fields))
    stamp = row["timestamp"].strip()
    try:
        _check_timestamp(stamp)
    except ValueError:
        raise ValueError(f"timestamp {stamp[:30]!r} is neither ISO-8601 nor epoch seconds") from None
    try:
        latency = float(row["latency_ms"])
    except ValueError:
        raise ValueError(f"latency_ms {row['latency_ms'].strip()[:30]!r} is not a number") from None
    if not 0 <= latency < math.inf:
        raise ValueError(f"latency_ms {row['latency_ms'].strip()!r} is not a non-negative number")
    try:
        code = int(row["response_code"])
    except ValueError:
        raise ValueError(f"response_code {row['response_code'].strip()[:30]!r} is not a whole number") from None
    if not (code == 0 or 100 <= code <= 999):
        raise ValueError(f"response_code {code} is neither an HTTP status (100-999) nor 0")
    block = None
    if "block" in row:
        try:
            block = int(row["block"])
        except ValueError:
            raise ValueError(f"block {row['block'].strip()[:30]!r} is not a whole number") from None
    url = row.get("url", "").strip() or None
    return stamp, latency, code, block, url, row.get("check", "").strip()


def read_measurements(path: str) -> Arm:
    """Stream a measurement CSV into an Arm; BadInput names file:line on a malformed row.

    A final line without a newline that does not parse (a measurement cut off mid-write) is
    skipped with a warning.  Memory holds a float and a status per successful row, nothing else.
    """
    try:
        handle = open_measurement_csv(path)
    except OSError as exc:
        raise BadInput(f"{path}: cannot read: {exc.strerror or exc}") from None
    reader = _CsvReader(path)
    with handle:
        try:
            carry = ""
            while True:
                chunk = handle.read(1 << 18)
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
        except (OSError, EOFError, zlib.error) as exc:
            raise BadInput(f"{path}: cannot read: {getattr(exc, 'strerror', None) or exc}") from None
    return reader.arm


def open_measurement_csv(path: str):
    """A measurement CSV opened as text: path itself, gzip-compressed or not (a run compresses its
    CSVs once its verdicts are written), or path.gz when only that is there."""
    return io.TextIOWrapper(_measurement_bytes(path), encoding="utf-8-sig", newline="")


def _measurement_bytes(path: str):
    try:
        fd = open_nofollow(path)
    except FileNotFoundError:
        if path.endswith(".gz") or not os.path.lexists(path + ".gz"):
            raise
        fd = open_nofollow(path + ".gz")
    raw = open(fd, "rb")
    return _GzipReader(raw) if raw.peek(2)[:2] == b"\x1f\x8b" else raw


class _GzipReader(gzip.GzipFile):
    """A GzipFile over an open file that closes that file when it is closed itself."""

    def __init__(self, raw):
        super().__init__(fileobj=raw, mode="rb")
        self.raw = raw

    def close(self):
        try:
            super().close()
        finally:
            self.raw.close()


def compress_measurements(run_dir: str) -> int:
    """Replace every NAME.csv of a finished run folder by NAME.csv.gz (through a temp file and a rename);
    the bytes it saved.  A run's CSVs are most of what var/ holds."""
    saved = 0
    for name in sorted(os.listdir(run_dir)):
        path = os.path.join(run_dir, name)
        if not name.endswith(".csv") or not stat.S_ISREG(os.lstat(path).st_mode):
            continue
        fd, temp = tempfile.mkstemp(prefix=f".{name}.", suffix=".gz.tmp", dir=run_dir)
        try:
            with open(fd, "wb") as out, open(open_nofollow(path), "rb") as source:
                with gzip.GzipFile(filename=name, mode="wb", fileobj=out, compresslevel=6, mtime=0) as packed:
                    shutil.copyfileobj(source, packed, 1 << 20)
                out.flush()
                os.fchmod(out.fileno(), 0o644)
                os.fsync(out.fileno())
            os.replace(temp, path + ".gz")
        except BaseException as exc:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            if isinstance(exc, OSError) and not exc.filename:
                raise OSError(exc.errno, exc.strerror or str(exc), path + ".gz") from None
            raise
        saved += os.lstat(path).st_size - os.lstat(path + ".gz").st_size
        os.unlink(path)
    return saved


class _CsvReader:
    """Rows of one CSV into an Arm: whole chunks column-wise at C speed, any odd chunk line by line."""

    def __init__(self, path):
        self.path = path
        self.arm = Arm(path)
        self.number = 0           # lines consumed so far
        self.layout = None        # the header's columns, when the file has a header
        self.labelled = None      # without a header: whether rows carry a block column, once known

    def feed(self, lines) -> None:
        first = self.number
        self.number += len(lines)
        if first == 0 and lines and csv_layout(lines[0].strip()):
            self.layout = csv_layout(lines[0].strip())
            lines, first = lines[1:], 1
        if not self._columns(lines):
            for offset, line in enumerate(lines, first + 1):
                self._line(line, offset, last=False)

    def feed_last(self, line: str) -> None:
        self.number += 1
        if self.number == 1 and csv_layout(line.strip()):
            return
        self._line(line, self.number, last=True)

    def _columns(self, lines) -> bool:
        """The fast path: every line has the layout's fields and they parse; False sends the chunk line by line."""
        if not lines:
            return False
        layout = self.layout or CSV_COLUMNS[:lines[0].count(",") + 1]
        width = len(layout)
        if (self.layout is None and (width not in (3, 4) or self.labelled not in (None, width == 4))) \
                or set(map(str.count, lines, repeat(","))) != {width - 1}:
            return False
        fields = ",".join(lines).split(",")
        column = {name: fields[index::width] for index, name in enumerate(layout)}
        stamps = column["timestamp"]
        try:
            latencies = list(map(float, column["latency_ms"]))
            codes = list(map(int, column["response_code"]))
            blocks = list(map(int, column["block"])) if "block" in column else None
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
        if self.layout is None:
            self.labelled = width == 4
        urls = [url.strip() or None for url in column["url"]] if "url" in column else None
        checks = [check.strip() for check in column["check"]] if "check" in column else None
        if blocks is not None or urls is not None or (checks is not None and any(checks)):
            for stamp, latency, code, block, url, check in zip(stamps, latencies, codes, blocks or repeat(None),
                                                               urls or repeat(None), checks or repeat("")):
                at = _epoch(stamp) if block is not None and block not in self.arm.block_started else None
                self.arm.add(latency, code, block, at, url, check)
            return True
        arm = self.arm
        arm.total += len(codes)
        for code, count in collections.Counter(codes).items():
            arm.answers[(None, code)] += count
        failing = {code for code in distinct if is_failure(code)}
        if failing:
            good = list(map(operator.not_, map(failing.__contains__, codes)))
            latencies, codes = list(compress(latencies, good)), list(compress(codes, good))
            arm.errors += len(good) - len(codes)
            distinct -= failing
        if len(distinct) == 1 and arm.statuses is None and arm.status in (None, next(iter(distinct))):
            arm.status = next(iter(distinct))
            arm.latencies.extend(latencies)
        else:
            for latency, code in zip(latencies, codes):
                arm.add_success(latency, code)
        if arm.urls is not None:
            arm.urls.extend(repeat(0, len(codes)))
        return True

    def _line(self, line: str, number: int, last: bool) -> None:
        try:
            stamp, latency, code, block, url, check = _parse_row(line, self.layout)
            if self.layout is None and self.labelled is not None and (block is None) == self.labelled:
                raise ValueError("a block column in some rows and not in others; label every row or none")
        except ValueError as exc:
            if not line.strip():
                return
            if last:
                warn(f"{self.path}:{number}: truncated final line skipped")
                return
            raise BadInput(f"{self.path}:{number}: malformed row {line.strip()[:60]!r}: {exc}") from None
        if self.layout is None:
            self.labelled = block is not None
        at = _epoch(stamp) if block is not None and block not in self.arm.block_started else None
        self.arm.add(latency, code, block, at, url, check)


def _undecodable_line(path: str) -> int:
    """The number of the first line that is not UTF-8 (the decoder reads ahead in chunks)."""
    with _measurement_bytes(path) as handle:
        for number, raw in enumerate(handle, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                return number
    return 0


###### Statistics (pure functions, no I/O) ######

_NORMAL = NormalDist()


def sort_latencies(values) -> array.array:
    """values sorted, as an array of doubles (never a list of a million float objects)."""
    counts = _value_counts(values)
    return array.array("d", sorted(values)) if counts is None else _in_order(counts)


def _value_counts(values):
    """value -> how often, when the values repeat a lot (measured latencies have 3 decimals), else None:
    laying counted values out in order is faster than sorting and needs a fraction of the memory."""
    if len(values) < 50000:
        return None
    counts, limit = collections.Counter(), len(values) // 4
    for start in range(0, len(values), 65536):
        counts.update(values[start:start + 65536])
        if len(counts) > limit:              # few repeats: counting does not pay
            return None
    return counts


def _in_order(counts) -> array.array:
    out = array.array("d")
    for value in sorted(counts):
        out.extend(array.array("d", (value,)) * counts[value])
    return out


def percentile(sorted_values, pct: float):
    """Nearest-rank percentile: the smallest observed value with at least pct% of the data at or below it."""
    n = len(sorted_values)
    if n == 0:
        return None
    rank = math.ceil(pct * n / 100 - 1e-9)
    return sorted_values[min(n, max(1, rank)) - 1]


def summarize(arm: Arm, sorted_latencies) -> dict:
    """The per-arm figures of docs/SPEC.md: n, errors, p50/p90/p99 (ms, successful rows), err_pct."""
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
    return wilson_bounds(successes, trials, _NORMAL.inv_cdf(confidence))[0]


def wilson_bounds(successes: int, trials: int, z: float):
    """The Wilson score interval of a proportion, z standard errors each side."""
    share = successes / trials
    center = share + z * z / (2 * trials)
    spread = z * math.sqrt(share * (1 - share) / trials + z * z / (4 * trials * trials))
    return max(0.0, (center - spread) / (1 + z * z / trials)), min(1.0, (center + spread) / (1 + z * z / trials))


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


###### The decision: the five rules over two arms ######

class Thresholds:
    """The five rules' settings (docs/SPEC.md "The decision")."""

    KEYS = ("IMPROVE_PCT", "MAX_ERR_DELTA_PCT", "CONFIDENCE", "MIN_SAMPLES", "MAX_TAIL_REGRESS_PCT")

    def __init__(self, settings: dict):
        self.improve_pct = settings["IMPROVE_PCT"]
        self.max_err_delta_pct = settings["MAX_ERR_DELTA_PCT"]
        self.confidence = settings["CONFIDENCE"]
        self.min_samples = settings["MIN_SAMPLES"]
        self.max_tail_regress_pct = settings["MAX_TAIL_REGRESS_PCT"]

    def to_json(self) -> dict:
        return {key.lower(): getattr(self, key.lower()) for key in self.KEYS}


BORDERLINE_POINTS = 3.0
EPSILON = 1e-9           # thresholds compare with this slack: 2.2 - 1.2 is 1.0000000000000002 in floats
ERR_CONFIDENCE = 0.80    # rule 4: a variant with errors must show its rise is within the allowed one at this confidence
TAIL_CONFIDENCE = 0.995  # rule 5: a regressed percentile counts when its excess is significant at this confidence
P99_BOUND_CONFIDENCE = 0.5   # ... above the baseline's p99 taken as its median-unbiased order statistic
OUTLIER_FACTOR = 8.0     # rule 5 also: requests slower than this many times the baseline's p99 ...
OUTLIER_EXCESS = 2       # ... may not outnumber the baseline's own by this many
BEYOND_ALPHA = 0.0025    # ... and so many requests slower than the baseline's slowest that chance gives it less often


@dataclass(frozen=True)
class Figures:
    """What a verdict weighs, before any rule: both arms, the p50 change and its significance, errors, tail."""

    baseline: dict                 # summarize() of each arm
    variant: dict
    base_ok: int                   # successful samples
    var_ok: int
    improve: float | None          # p50 improvement, % (the crossover estimate for blocked arms)
    improve_ci: list | None        # its interval at the confidence, %
    p_value: float                 # one-sided: the variant is faster
    alpha: float                   # what p must not exceed (sequential_alpha at a look)
    test: str
    err_delta: float               # error-rate change, points
    err_rise_bound: float | None   # the rise's upper bound at ERR_CONFIDENCE, points (None without variant errors)
    tail: float | None             # p99 change, %
    tails: list                    # per TAIL_PERCENTILES: change, bound, requests above it, p
    outliers: dict                 # requests slower than OUTLIER_FACTOR x base p99, in each arm
    blocks: list                   # per block pair: medians and which arm went first
    fraction: float | None         # how far to the horizon a look is; None without looks


@dataclass(frozen=True)
class Verdict:
    """keep or revert, the rules that failed, and every figure behind it (decide --json prints it)."""

    decision: str
    reason: str
    borderline: bool
    failed_rules: list
    baseline: dict
    variant: dict
    improve_pct: float | None
    improve_ci: list | None
    err_delta_pct: float
    err_rise_bound_pct: float | None
    p99_regress_pct: float | None
    tails: list
    outliers: dict
    p_value: float
    alpha: float
    confidence: float
    test: str
    blocks: list
    fraction: float | None
    thresholds: dict

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
    """Apply docs/SPEC.md's five rules to two arms; pure (no I/O), the same input gives the same verdict.

    figures() computes the numbers, broken_rules() which rules they break, wording() the reason.
    `fraction` is set by a sequential stop: how far to the horizon this look is; rule 3 then
    uses sequential_alpha, whose error bound holds however many looks are made.
    """
    fig = figures(base, var, thresholds, fraction)
    broken = broken_rules(fig, thresholds)
    t = thresholds
    enough = fig.base_ok >= t.min_samples and fig.var_ok >= t.min_samples
    near_bar = fig.improve is not None and abs(fig.improve - t.improve_pct) <= BORDERLINE_POINTS + EPSILON
    names = [name for name, _ in broken]
    return Verdict(
        decision="revert" if broken else "keep", reason=wording(fig, broken, t),
        borderline=enough and (near_bar or names == ["significance"]), failed_rules=names,
        baseline=fig.baseline, variant=fig.variant,
        improve_pct=_round(fig.improve),
        improve_ci=None if fig.improve_ci is None else [_round(x) for x in fig.improve_ci],
        err_delta_pct=_round(fig.err_delta, 4), err_rise_bound_pct=_round(fig.err_rise_bound, 4),
        p99_regress_pct=_round(fig.tail),
        tails=[{key: _round(value) if isinstance(value, float) else value for key, value in tail.items()}
               for tail in fig.tails],
        outliers={key: _round(value) if isinstance(value, float) else value for key, value in fig.outliers.items()},
        p_value=float(f"{fig.p_value:.6g}"), alpha=float(f"{fig.alpha:.6g}"), confidence=t.confidence,
        test=fig.test, blocks=fig.blocks, fraction=fraction, thresholds=t.to_json(),
    )


def figures(base: Arm, var: Arm, thresholds: Thresholds, fraction=None) -> Figures:
    """The numbers of a verdict.  Both arms are first judged against the baseline's usual status per
    URL (an answer with another status failed).  Block-labelled arms are compared within the blocks
    both have: the rank test is van Elteren's, and the p50 improvement and a second significance test
    come from the period-adjusted crossover analysis of block medians, so drift between blocks cannot
    pass for an effect."""
    t = thresholds
    usual = base.usual_status()
    base, var = base.judged(usual), var.judged(usual)
    if base.blocks is not None and var.blocks is not None:
        common = set(base.block_totals) & set(var.block_totals)
        base, var = base.only(common), var.only(common)
    base_sorted = base.latencies if base.in_order else sort_latencies(base.latencies)
    var_sorted = var.latencies if var.in_order else sort_latencies(var.latencies)
    base_fig, var_fig = summarize(base, base_sorted), summarize(var, var_sorted)
    strata = _strata(base, var, base_sorted, var_sorted)
    test = rank_test([(b, v) for _, b, v in strata])
    p_value, method = test["p_value"], test["method"]
    interval = median_ratio_interval(base_sorted, var_sorted, t.confidence)
    improve = _pct_change(percentile(base_sorted, 50), percentile(var_sorted, 50))
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
        early = fraction is not None and fraction < 1
        if early and _every_pair_faster(blocks, t.improve_pct):
            # Drift between a pair's two blocks flatters one order and hurts the other: when every pair,
            # in both orders, is faster by the bar, no drift explains it, and the rank test decides alone
            # (a t test on two or three block medians could not reach the sequential boundary).
            improve = (1 - math.exp(_period_adjusted(blocks))) * 100
            p_value, method = test["p_value"], (f"{test['method']}; every block pair, in both orders, is "
                                                f"{t.improve_pct:g}% faster or more, so drift is ruled out")
    return Figures(
        baseline=base_fig, variant=var_fig, base_ok=base.ok, var_ok=var.ok, improve=improve, improve_ci=improve_ci,
        p_value=p_value, alpha=1 - t.confidence if fraction is None else sequential_alpha(t.confidence, fraction),
        test=method, err_delta=var_fig["err_pct"] - base_fig["err_pct"],
        err_rise_bound=(rise_upper_bound(var.errors, var.total, base.errors, base.total, ERR_CONFIDENCE) * 100
                        if var.errors and base.total else None),
        tail=_pct_change(percentile(base_sorted, 99), percentile(var_sorted, 99)),
        tails=_tails(base_sorted, var_sorted, t.max_tail_regress_pct),
        outliers=_outliers(base_sorted, var_sorted), blocks=blocks, fraction=fraction)


def rise_upper_bound(var_errors: int, var_total: int, base_errors: int, base_total: int, confidence: float) -> float:
    """One-sided upper confidence bound of the error rate's rise, variant minus baseline (a share):
    Newcombe's hybrid score interval, from the two Wilson intervals."""
    z = _NORMAL.inv_cdf(confidence)
    var_share, base_share = var_errors / var_total, base_errors / base_total
    var_high = wilson_bounds(var_errors, var_total, z)[1]
    base_low = wilson_bounds(base_errors, base_total, z)[0]
    return var_share - base_share + math.hypot(var_high - var_share, base_share - base_low)


def _tails(base_sorted, var_sorted, allowed_pct: float) -> list:
    """Where the variant is slower than the baseline above the median: the p99 (how much it regressed,
    and how many of the variant's requests are slower than base p99 x (1 + allowed), with the
    binomial p of that many against 1%), and the percentile where the variant's distribution lies
    furthest above the baseline's (a one-sided two-sample Kolmogorov-Smirnov statistic over the
    baseline's upper half, with its p)."""
    if not base_sorted or not var_sorted:
        return []
    n, m = len(base_sorted), len(var_sorted)
    base_p99, var_p99 = percentile(base_sorted, 99), percentile(var_sorted, 99)
    bound = percentile_upper_bound(base_sorted, 99, P99_BOUND_CONFIDENCE) * (1 + allowed_pct / 100)
    above = m - bisect.bisect_right(var_sorted, bound)
    tails = [{"percentile": 99, "regress_pct": _pct_change(base_p99, var_p99), "bound_ms": bound, "above": above,
              "p": binomial_sf(above, m, 0.01), "test": "binomial against 1%"}]
    # Where, above the baseline's median, the variant has more requests slower than a baseline
    # percentile than the baseline has, by more than the allowed regression in latency there:
    # the largest such gap in the two distribution functions, from the median to the p99 (above it the
    # p99's own test speaks; at most 1000 points looked at).
    best = None
    top = max(n // 2 + 1, math.floor(0.99 * n + 1e-9))
    for rank in range(n // 2 + 1, top + 1, max(1, (top - n // 2) // 1000)):
        at = base_sorted[rank - 1]
        level = rank / n
        var_there = var_sorted[min(m, max(1, math.ceil(level * m - 1e-9))) - 1]
        gap = level - bisect.bisect_right(var_sorted, at) / m
        if var_there > at * (1 + allowed_pct / 100) + EPSILON and (best is None or gap > best[0] + EPSILON):
            best = (gap, rank, at, var_there)
    if best is not None and best[0] > 0:
        gap, rank, at, var_there = best
        tails.append({"percentile": round(100.0 * rank / n, 1), "regress_pct": _pct_change(at, var_there),
                      "bound_ms": at, "above": round(gap * m), "p": math.exp(-2.0 * gap * gap * n * m / (n + m)),
                      "test": "Kolmogorov-Smirnov"})
    return tails


def percentile_upper_bound(sorted_values, pct: float, confidence: float):
    """A distribution-free upper confidence bound of a percentile: the smallest order statistic that is
    at least the true percentile with probability `confidence` (for 300 values and p99 at 90%, the
    largest); the count of values below the true percentile is binomial (normal beyond 1000 values)."""
    n, share = len(sorted_values), pct / 100
    if n > 1000:
        k = math.ceil(n * share + _NORMAL.inv_cdf(confidence) * math.sqrt(n * share * (1 - share)) + 0.5)
        return sorted_values[min(n, k) - 1]
    below = 0.0
    for k in range(n + 1):               # P(at most k values lie below the percentile), growing in k
        below += math.comb(n, k) * share ** k * (1 - share) ** (n - k)
        if below >= confidence and k + 1 >= share * n:
            return sorted_values[min(n, k + 1) - 1]
    return sorted_values[-1]


def _outliers(base_sorted, var_sorted) -> dict:
    """Requests slower than OUTLIER_FACTOR x the baseline's p99 in each arm; the variant's requests
    slower than the baseline's slowest, and the chance of that many or more with no change."""
    p99 = percentile(base_sorted, 99)
    if p99 is None or not var_sorted:
        return {}
    bound = OUTLIER_FACTOR * p99
    beyond = len(var_sorted) - bisect.bisect_right(var_sorted, base_sorted[-1])
    return {"bound_ms": bound, "baseline": len(base_sorted) - bisect.bisect_right(base_sorted, bound),
            "variant": len(var_sorted) - bisect.bisect_right(var_sorted, bound),
            "beyond_slowest": beyond, "beyond_p": beyond_chance(beyond, len(var_sorted), len(base_sorted))}


def beyond_chance(k: int, var_n: int, base_n: int) -> float:
    """P(at least k of the variant's var_n requests are slower than all base_n of the baseline's) when
    both come from one distribution: the top k of the pooled requests are then all the variant's."""
    if k <= 0:
        return 1.0
    if k > var_n:
        return 0.0
    return math.exp(sum(math.log((var_n - i) / (var_n + base_n - i)) for i in range(k)))


def broken_rules(fig: Figures, thresholds: Thresholds) -> list:
    """(rule, why) for each rule the figures break; none broken means keep."""
    t = thresholds
    if fig.base_ok < t.min_samples or fig.var_ok < t.min_samples:
        return [("samples", f"insufficient data: {fig.base_ok} baseline and {fig.var_ok} variant successful "
                            f"samples, {t.min_samples} needed in each")]
    broken = []
    if fig.err_rise_bound is not None and fig.err_rise_bound > t.max_err_delta_pct + EPSILON:
        broken.append(("errors", f"error rate rose {fig.err_delta:.2f} points, and the rise could be "
                                 f"{fig.err_rise_bound:.2f} ({ERR_CONFIDENCE:.0%} bound; at most "
                                 f"{t.max_err_delta_pct:g} allowed)"))
    regressed = [tail for tail in fig.tails if tail["regress_pct"] > t.max_tail_regress_pct + EPSILON
                 and tail["p"] <= 1 - TAIL_CONFIDENCE]
    if regressed:
        tail = regressed[-1]
        broken.append(("tail", f"p{tail['percentile']:g} regressed {_fmt_pct(tail['regress_pct'])} (at most "
                               f"{t.max_tail_regress_pct:g}% allowed; {tail['above']} of {fig.var_ok} requests "
                               f"slower than {tail['bound_ms']:.3g} ms, {tail['test']} p={tail['p']:.2g})"))
    elif fig.outliers and fig.outliers["variant"] - fig.outliers["baseline"] >= OUTLIER_EXCESS:
        broken.append(("tail", f"{fig.outliers['variant']} requests slower than {fig.outliers['bound_ms']:.3g} ms "
                               f"({OUTLIER_FACTOR:g} x the baseline's p99), against {fig.outliers['baseline']} in "
                               "the baseline"))
    elif fig.outliers and fig.outliers["beyond_p"] <= BEYOND_ALPHA:
        broken.append(("tail", f"{fig.outliers['beyond_slowest']} requests slower than the baseline's slowest "
                               f"(p={fig.outliers['beyond_p']:.2g} with no change)"))
    if fig.improve is None or fig.improve < t.improve_pct - EPSILON:
        change = (f"p50 got {_fmt_pct(-fig.improve)} slower" if fig.improve is not None and fig.improve < 0
                  else f"p50 improved only {_fmt_pct(fig.improve)}")
        broken.append(("improvement", f"{change} (needs a {t.improve_pct:g}% improvement)"))
    if fig.p_value > fig.alpha * (1 + EPSILON):
        look = "" if fig.fraction is None else f" at {fig.fraction:.0%} of the horizon"
        broken.append(("significance", f"not significant at {t.confidence:g} confidence{look} "
                                       f"(p={fig.p_value:.3g}, needs <= {fig.alpha:.3g})"))
    return broken


def wording(fig: Figures, broken: list, thresholds: Thresholds) -> str:
    """The verdict's reason: every broken rule, or why it is a keep."""
    if broken:
        return "revert: " + "; ".join(text for _, text in broken)
    return (f"keep: p50 improved {_fmt_pct(fig.improve)} (needs {thresholds.improve_pct:g}%), significant "
            f"(p={fig.p_value:.3g}); errors {fig.err_delta:+.2f} points, p99 {_fmt_signed(fig.tail)}")


def _every_pair_faster(blocks, improve_pct: float) -> bool:
    """Every block pair's variant median is at least improve_pct below its baseline's, and pairs of
    both orders (variant first, baseline first) are among them."""
    orders = {x["variant_first"] for x in blocks}
    return ({True, False} <= orders and all(x["base_p50_ms"] and x["var_p50_ms"]
                                            and x["var_p50_ms"] <= x["base_p50_ms"] * (1 - improve_pct / 100)
                                            for x in blocks))


def _period_adjusted(blocks) -> float:
    """The mean log ratio (variant over baseline) of the variant-first pairs and of the others, averaged:
    a linear drift's bias cancels between the two orders."""
    groups = {True: [], False: []}
    for x in blocks:
        groups[x["variant_first"]].append(math.log(x["var_p50_ms"]) - math.log(x["base_p50_ms"]))
    return (statistics.fmean(groups[True]) + statistics.fmean(groups[False])) / 2


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


def decide_files(baseline_path: str, variant_path: str, thresholds: Thresholds, fraction=None) -> Verdict:
    """Read two measurement CSVs and return the verdict (at a sequential stop's look `fraction` of the
    way to the horizon, when given)."""
    base = read_measurements(baseline_path)
    base.settle()
    var = read_measurements(variant_path)
    var.settle()
    return verdict(base, var, thresholds, fraction=fraction)


###### Files: the home, atomic writes, the lock ######

def utc_now() -> str:
    """The current UTC time as ISO-8601 with a Z."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _iso_seconds(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class Home:
    """The paths of a home (docs/SPEC.md "Layout of a home")."""

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

    def run_folders(self) -> set:
        """The names of the run folders under var/runs (real folders only: no symlink is ever followed)."""
        self.check_runs()
        if not os.path.lexists(self.runs):
            return set()
        return {name for name in os.listdir(self.runs)
                if stat.S_ISDIR(os.lstat(os.path.join(self.runs, name)).st_mode)}

    def check_runs(self) -> None:
        """BadInput when var/runs is anything but a real folder (a symlink would take runs, and the
        rotation's deletions, elsewhere)."""
        if os.path.islink(self.runs) or (os.path.lexists(self.runs) and not os.path.isdir(self.runs)):
            raise BadInput(f"{self.runs} is not a folder (a symbolic link or a file); remove it, a run makes it anew")

    def new_run_dir(self):
        """A fresh RUN_ID (UTC start time, -2, -3... if taken) and its folder."""
        self.check_runs()
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


def open_nofollow(path: str, flags: int = os.O_RDONLY, mode: int = 0o644) -> int:
    """os.open that refuses a symlink at path: var/ belongs to the smart user, and whoever reads or
    writes there must not be led to another file by a link planted in it."""
    return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)


def read_text(path: str):
    """A file's text, or None when it does not exist; OSError (ELOOP for a symlink) otherwise."""
    try:
        fd = open_nofollow(path)
    except FileNotFoundError:
        return None
    with open(fd, encoding="utf-8") as handle:
        return handle.read()


def write_atomic(path: str, text: str) -> None:
    """Write text to path through a fresh temp file and a rename: a reader sees the old or the new file,
    never half.  An OSError names path (a full disk says which file it kept from being written)."""
    folder = os.path.dirname(path) or "."
    temp = None
    try:
        fd, temp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
        with open(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fchmod(handle.fileno(), 0o644)      # the dashboard's web server reads what is published
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException as exc:
        if temp is not None:
            with contextlib.suppress(OSError):
                os.unlink(temp)
        if isinstance(exc, OSError) and exc.filename != path:
            raise OSError(exc.errno, exc.strerror or str(exc), path) from None
        raise


def write_json(path: str, value) -> None:
    write_atomic(path, json.dumps(value, indent=2) + "\n")


def append_line(path: str, line: str) -> None:
    """Append one line to a file (created when missing), never through a symlink; an OSError names path."""
    try:
        fd = open_nofollow(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        with open(fd, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror or str(exc), path) from None


def os_problem(exc: OSError) -> str:
    """An OSError as the file it concerns and what went wrong: "var/state.json: No space left on device"."""
    return f"{exc.filename}: {exc.strerror or exc}" if exc.filename else (exc.strerror or str(exc))


def read_json(path: str, default=None):
    """A JSON file's value, or default when it is missing, unreadable, a symlink or not valid JSON."""
    try:
        text = read_text(path)
        return default if text is None else json.loads(text)
    except (OSError, ValueError):
        return default


def _var_json(path: str, what: str, error=BadInput):
    """A var/ file that must be sound: its value, or None when missing; `error` names the file otherwise."""
    try:
        text = read_text(path)
    except (OSError, ValueError) as exc:
        raise error(f"{path}: cannot read {what}: {getattr(exc, 'strerror', None) or exc}") from None
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError as exc:
        raise error(f"{path}: {what} is not valid JSON ({exc})") from None


def read_kept(home: Home) -> dict:
    """var/kept.json: experiment id -> {variant, run_id, kept_at, revert, path}; {} when there is none.

    BadInput when it is damaged: a kept variant must never be forgotten by reading garbage as empty.
    """
    kept = _var_json(home.kept, "the kept variants")
    if kept is None:
        return {}
    if not isinstance(kept, dict) or not all(isinstance(entry, dict) and isinstance(entry.get("variant"), str)
                                             for entry in kept.values()):
        raise BadInput(f"{home.kept}: expected an object of experiment id -> {{\"variant\": ...}}; fix it (or "
                       "check what is applied and delete it)")
    return kept


def write_journal(home: Home, run_id: str, experiment: Experiment, variant: str, in_flight=None) -> None:
    """var/applied.json: what is applied (or about to be), so that a crashed run's successor reverts it.

    `in_flight` marks the apply or revert command running now (its processes carry it in their
    environment): a successor stops what is left of it before it reverts.
    """
    write_json(home.journal, {
        "run_id": run_id, "experiment": experiment.id, "path": experiment.path, "variant": variant,
        "revert": experiment.revert, "pid": os.getpid(), "in_flight": in_flight, "written_at": utc_now()})


def clear_journal(home: Home) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(home.journal)


def forget_kept(home: Home, experiment_id, variant=None, run_id=None) -> bool:
    """Drop kept.json's entry for an experiment (when given: only if it names that variant of that
    run); whether it did."""
    kept = read_kept(home)
    mine = kept.get(experiment_id)
    if not mine or (variant is not None and (mine.get("variant") != variant or mine.get("run_id") != run_id)):
        return False
    del kept[experiment_id]
    write_json(home.kept, kept)
    return True


def read_journal(home: Home):
    """var/applied.json: the variant a run applied and has not reverted yet, or None.

    RevertFailed when it is damaged: what is applied is then unknown, and no run may start.
    """
    advice = "check what is applied, revert by hand, then delete it"
    entry = _var_json(home.journal, "the journal", RevertFailed)
    if entry is None:
        return None
    if not (isinstance(entry, dict) and all(isinstance(entry.get(key), str) for key in ("revert", "path"))):
        raise RevertFailed(f"{home.journal}: not a journal entry (it needs revert and path); {advice}")
    return entry


class HomeLock:
    """fcntl.flock on var/lock, holding the pid of the run that has it."""

    def __init__(self, var: str):
        self.path = os.path.join(var, "lock")
        self.fd = None

    def __enter__(self):
        try:
            fd = open_nofollow(self.path, os.O_RDWR | os.O_CREAT)
        except OSError as exc:
            raise WorkFailed(f"{self.path}: cannot open the lock: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise LockHeld(f"another run holds the lock {self.path} (pid {holder}); try again when it ends") from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as exc:
            os.close(fd)
            raise WorkFailed(f"{self.path}: cannot write the lock: {exc.strerror or exc}") from None
        self.fd = fd
        return self

    def __exit__(self, *exc):
        with contextlib.suppress(OSError):
            os.ftruncate(self.fd, 0)
        os.close(self.fd)


def lock_holder(var: str):
    """The pid of the run that holds var/lock, or None when no run holds it."""
    try:
        fd = open_nofollow(os.path.join(var, "lock"))
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None
    except BlockingIOError:
        return os.read(fd, 64).decode("ascii", "replace").strip() or "unknown"
    finally:
        os.close(fd)


def run_as_owner(home_root: str) -> None:
    """Started as root on a home whose var/ belongs to someone else: become that user before reading
    anything, so that a root invocation can do no more than the owner of var/ can."""
    if os.geteuid() != 0:
        return
    var = os.path.join(home_root, "var")
    try:
        info = os.lstat(var)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise BadInput(f"{var}: {exc.strerror}") from None
    if stat.S_ISLNK(info.st_mode):
        raise BadInput(f"{var} is a symbolic link; refusing to run as root on it")
    if info.st_uid == 0:
        return
    try:
        owner = pwd.getpwuid(info.st_uid)
    except KeyError:
        raise BadInput(f"{var} belongs to uid {info.st_uid}, who has no account; run as that user, not root") from None
    os.initgroups(owner.pw_name, owner.pw_gid)
    os.setgid(owner.pw_gid)
    os.setuid(owner.pw_uid)


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

    With should_stop, the command is also killed as soon as should_stop() turns true.  When the
    command ends, whatever it left running in its process group is killed too (a daemon that
    started a session of its own is not).  The output is stdout and stderr together, or with
    stdout_only stdout alone (stderr then goes to the result's `errors`).
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
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(child.pid, signal.SIGKILL)     # what it left running in its group must not act later
    result = CommandResult(command, child.returncode, _cut(output), time.monotonic() - started, timed_out)
    result.errors = _cut(errors)
    return result


MARK = "SMART_COMMAND"    # environment variable naming the journal's command in flight (see stop_marked)


def stop_marked(token: str, wait: float = 5.0) -> list:
    """SIGKILL every process whose environment carries MARK=token (a command a dead run left running,
    and what it started), and wait until they are gone; their pids."""
    needle = f"{MARK}={token}".encode()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as handle:
                if needle in handle.read().split(b"\0"):
                    found.append(int(name))
        except OSError:
            continue
    for pid in found:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline and any(os.path.exists(f"/proc/{pid}") and not _zombie(pid) for pid in found):
        time.sleep(0.02)
    return found


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            return handle.read().rsplit(b")", 1)[1].split()[0] == b"Z"
    except (OSError, IndexError):
        return True


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


###### Run record: what one run writes, and how it tells the operator ######

class StatusLine:
    """On a terminal, one line redrawn in place that says where a run is: experiment, variant, block k
    of N, step, time left, requests and errors so far.  Lines printed meanwhile go above it."""

    def __init__(self, out, clock=time.monotonic):
        self.out, self.clock = out, clock
        self.fields = {}
        self.drawn = 0.0
        self.width = 0

    def update(self, **fields) -> None:
        self.fields.update(fields)
        now = self.clock()
        if now - self.drawn >= 0.25 or "step" in fields:
            self.drawn = now
            self.draw()

    def count(self, failed: bool) -> None:
        self.fields["requests"] = self.fields.get("requests", 0) + 1
        self.fields["errors"] = self.fields.get("errors", 0) + failed
        self.update()

    def draw(self) -> None:
        f, now = self.fields, self.clock()
        parts = [f.get("experiment"), f.get("variant")]
        if f.get("pair"):
            parts.append(f"block {f['pair'][0]} of {f['pair'][1]}")
        parts.append(f.get("step"))
        if f.get("step_ends"):
            parts.append(f"{_clock_text(f['step_ends'] - now)} left in it")
        if f.get("run_ends"):
            parts.append(f"run at most {_clock_text(f['run_ends'] - now)} more")
        if "requests" in f:
            parts.append(f"{f['requests']} requests, {f['errors']} errors")
        text = printable(" · ".join(str(part) for part in parts if part))
        self.out.write("\r" + text.ljust(self.width))
        self.out.flush()
        self.width = len(text)

    def clear(self) -> None:
        if self.width:
            self.out.write("\r" + " " * self.width + "\r")
            self.out.flush()
            self.width = 0


def _clock_text(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


class Log:
    """A run's lines: timestamped on the operator's stream (the journal, under systemd) and in run.log.

    On a terminal the stream shows a StatusLine instead, and only warnings and errors as lines; the
    full log stays in run.log.  Lines from before a run folder exists (a recovery, a skipped
    experiment) wait and go into the next run.log.
    """

    def __init__(self, out=None):
        self.out = sys.stdout if out is None else out
        self.handle = None
        self.waiting = []
        self.lost = None             # why run.log stopped taking lines (a full disk), once it did
        live = getattr(self.out, "isatty", lambda: False)() and not to_journal(self.out)
        self.status = StatusLine(self.out) if live else None

    def __call__(self, message: str, level: str = "info") -> None:
        line = f"{utc_now()} {message}"
        if self.handle is not None and self.lost is None:
            try:
                self.handle.write(line + "\n")
                self.handle.flush()
            except OSError as exc:       # a full disk must not stop a revert: the journal still gets it
                self.lost = exc.strerror or str(exc)
        elif self.handle is None:
            self.waiting.append(line)
        if self.status is None:
            emit(line, self.out, level)
        elif level != "info" or self.handle is None:
            self.status.clear()
            emit(line, self.out, level)
            self.status.draw()

    def attach(self, path: str) -> None:
        """Write the lines to path from now on, starting with those that waited."""
        self.handle = open(open_nofollow(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT), "a", encoding="utf-8")
        self.lost = None
        for line in self.waiting:
            self.handle.write(line + "\n")
        self.waiting.clear()

    def detach(self) -> None:
        if self.handle is not None:
            with contextlib.suppress(OSError):
                self.handle.close()
            self.handle = None

    def command(self, what: str, result: CommandResult) -> None:
        """A command's outcome and the tail of its output."""
        self(f"{what}: $ {result.command}  -> {result.describe()}")
        for line in (result.output + result.errors).rstrip().splitlines()[-40:]:
            self(f"    | {line}")


class Commands:
    """The door to run_command for a run: the time box from the settings, every result in the log."""

    def __init__(self, log: Log, timeout: float, run=run_command):
        self.log, self.timeout, self.run = log, timeout, run

    def __call__(self, what: str, command: str, cwd: str, timeout=None, env=None, should_stop=None,
                 stdout_only=False) -> CommandResult:
        result = self.run(command, cwd, timeout or self.timeout, env=env, should_stop=should_stop,
                          stdout_only=stdout_only)
        self.log.command(what, result)
        return result


def variant_record(name: str, decision: str, reason: str, result=None, stopped_early=None, blocks=(),
                   decider=None) -> dict:
    """One variant's outcome, as state.json, history and the dashboard show it."""
    return {"name": name, "decision": decision, "reason": reason,
            "borderline": bool(result is not None and result.borderline),
            "metrics": None if result is None else variant_metrics(result),
            "verdict": None if result is None else result.to_json(),
            "stopped_early": stopped_early, "blocks": list(blocks), "decider": decider}


HISTORY_VARIANT_KEYS = ("name", "decision", "reason", "borderline", "metrics")
HISTORY_KEYS = ("run_id", "experiment", "status", "kept_variant", "metrics", "started_at", "finished_at", "reason",
                "design", "stopped_early", "baseline_p50_ms", "anomaly", "recheck", "sweep", "source")


def baselines_of(history, experiment_id) -> list:
    """The baseline p50s (ms) of an experiment's runs, oldest first; a run recorded before they were
    gives its variants' baseline p50."""
    found = []
    for entry in history:
        if entry.get("experiment") != experiment_id:
            continue
        value = entry.get("baseline_p50_ms")
        if value is None:
            value = (entry.get("metrics") or {}).get("base_p50_ms")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
            found.append(value)
    return found


def variant_metrics(result: Verdict) -> dict:
    """The figures of a verdict that state.json, history and the dashboard show per variant."""
    metrics = {}
    for prefix, figures_of_arm in (("base", result.baseline), ("var", result.variant)):
        for key in ("n", "errors", "p50_ms", "p90_ms", "p99_ms", "err_pct"):
            metrics[f"{prefix}_{key}"] = figures_of_arm[key]
    metrics.update(improve_pct=result.improve_pct, improve_ci=result.improve_ci, p_value=result.p_value,
                   err_delta_pct=result.err_delta_pct, p99_regress_pct=result.p99_regress_pct)
    return metrics


class RunRecord:
    """One run's records: its folder, state.json, run.log, the journal, and the door to commands."""

    def __init__(self, home: Home, log: Log, command: Commands, run_id: str, run_dir: str, state: dict):
        self.home, self.log, self.command = home, log, command
        self.run_id, self.run_dir, self.state = run_id, run_dir, state

    @classmethod
    def open(cls, home: Home, log: Log, command: Commands, experiment: Experiment) -> "RunRecord":
        """A new run folder with its run.log, and the run's first state.json."""
        try:
            run_id, run_dir = home.new_run_dir()
            log.attach(os.path.join(run_dir, "run.log"))
        except OSError as exc:
            raise WorkFailed(f"cannot create a run folder under {home.runs}: {exc.strerror or exc}; "
                             "nothing was changed") from None
        state = {
            "run_id": run_id, "experiment": experiment.id, "description": experiment.description,
            "kept_variant": None, "metrics": None, "status": "running", "phase": "starting",
            "started_at": utc_now(), "finished_at": None, "host": socket.gethostname(),
            "version": __version__, "pid": os.getpid(), "design": None, "variants": [], "current": None,
            "reason": None,
            "stopped_early": None, "defined_variants": [v["name"] for v in experiment.variants], "coach": None,
            "baseline_p50_ms": None, "anomaly": None, "recheck": None, "sweep": None, "source": None,
        }
        return cls(home, log, command, run_id, run_dir, state)

    def path(self, name: str) -> str:
        return os.path.join(self.run_dir, name)

    def save(self, **changes) -> None:
        """Update state.json (atomically)."""
        self.state.update(changes)
        self.state["updated_at"] = utc_now()
        write_json(self.home.state, self.state)

    def phase(self, phase: str, current=None) -> None:
        self.save(phase=phase, current=current)
        if self.log.status is not None:
            current = current or {}
            ends = current.get("ends_at")
            self.log.status.update(experiment=self.state["experiment"], variant=current.get("variant"),
                                   step=current.get("step") or phase,
                                   step_ends=time.monotonic() + (_epoch(ends) - time.time()) if ends else None)

    def add_variant(self, record: dict) -> None:
        """A variant's outcome; a decided one's figures are also the run's `metrics`."""
        self.state["variants"].append(record)
        self.headline(record)
        if record["stopped_early"]:
            self.state["stopped_early"] = f"{record['name']}: {record['stopped_early']}"

    def headline(self, record: dict) -> None:
        """The run's `metrics`: a decided variant's p50s and error rates."""
        if record["metrics"] is not None:
            self.state["metrics"] = {key: record["metrics"][key] for key in
                                     ("base_p50_ms", "var_p50_ms", "base_err_pct", "var_err_pct")}

    def write_journal(self, experiment: Experiment, variant: str, in_flight=None) -> None:
        write_journal(self.home, self.run_id, experiment, variant, in_flight)

    def clear_journal(self) -> None:
        clear_journal(self.home)

    def close(self) -> None:
        self.log.detach()


###### Runner: the lock, recovery, and the run's entry points ######

class StopFlag:
    """Set by SIGTERM/SIGINT; every wait and measurement of a run checks it."""

    def __init__(self):
        self.signal_name = None

    def __bool__(self):
        return self.signal_name is not None

    def install(self, early=()):
        """Catch SIGTERM and SIGINT from now on (and count those in `early`); returns what undoes it."""
        def handler(signum, frame):
            self.signal_name = signal.Signals(signum).name
        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
        for signum in early:
            handler(signum, None)
        return lambda: [signal.signal(sig, old) for sig, old in previous.items()]

    def check(self):
        if self:
            raise Interrupted(f"stopped by {self.signal_name}")


class Runner:
    """Runs experiments the way docs/SPEC.md "A run" says, so that no variant stays applied unless kept.

    Entry points: run() for the experiments an operator names, run_rotation() for the timer's
    pass over every experiment, apply() and revert_experiment() for one variant on purpose.
    Each experiment is a run of its own (run_experiment); a Trial does the measuring and deciding.
    """

    def __init__(self, home: Home, settings: dict, out=None, stop: StopFlag | None = None, run=run_command,
                 clock=time.monotonic):
        self.home, self.settings = home, settings
        self.stop = stop or StopFlag()
        self.log = Log(out)
        self.command = Commands(self.log, settings["COMMAND_TIMEOUT_SECONDS"], run)
        self.clock = clock

    # -- entry points --
    def run(self, experiments) -> int:
        """The named experiments, each run now; a settled one's kept variant is reverted first."""
        for experiment in experiments:
            missing = lacks(experiment)
            if missing:
                raise BadInput(f"{experiment.id} does not apply on this box: it needs {', '.join(missing)}")

        def start(experiment):
            if self.revert_kept(experiment):
                self.log(f"{experiment.id}: its kept variant was reverted, so the run starts from the baseline")
            return self.run_experiment(experiment, Trial.run)
        return self.locked(lambda: self.each(experiments, start))

    def run_rotation(self, experiments) -> int:
        """The timer's pass: one trial, of the first experiment in name order that is not resting
        (settled, or tried within RETRY_HOURS) - a settled one whose kept variant is due for its
        re-check (RECHECK_DAYS) is re-checked; the others wait for a later pass, so that a pass fits
        the service's time box whatever the size of the catalogue."""
        tried = []

        def start(experiment):
            if tried:
                self.log(f"{experiment.id}: waits for a later pass (one trial a pass: {tried[0]} ran in this one)")
                return "done"
            kept = self.recheck_due(experiment)
            if kept is not None:
                tried.append(experiment.id)
                return self.recheck(experiment, kept)
            why = self.resting(experiment)
            if why is None:
                tried.append(experiment.id)
                return self.run_experiment(experiment, Trial.run)
            self.log(f"{experiment.id}: {why}")
            state = read_json(self.home.state)
            if isinstance(state, dict):
                state["checked_at"] = utc_now()      # the timer ran: the dashboard must not call it stale
                write_json(self.home.state, state)
            return "done"
        return self.locked(lambda: self.each(experiments, start))

    def run_rechecks(self, experiments, named: bool) -> int:
        """Re-check the kept variant of each experiment now (docs/SPEC.md "Re-checks")."""
        if named:
            kept = read_kept(self.home)
            for experiment in experiments:
                if experiment.id not in kept:
                    raise BadInput(f"{experiment.id} has no kept variant to re-check")

        def start(experiment):
            kept = read_kept(self.home).get(experiment.id)
            if kept is None:
                return "done"
            return self.recheck(experiment, kept)

        def work():
            chosen = [e for e in experiments if e.id in read_kept(self.home)]
            if not chosen:
                self.log("nothing is kept: nothing to re-check")
                return 0
            return self.each(chosen, start)
        return self.locked(work)

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
            kept = read_kept(self.home).get(experiment.id)
            if kept and kept.get("variant") == name:
                self.log(f"{experiment.id}: {name} is already applied (kept in run {kept.get('run_id')}); "
                         "nothing to do")
                return 0
            if kept:
                self.revert_kept(experiment)
            status = self.run_experiment(experiment, lambda trial: trial.run_apply(variant))
            state = read_json(self.home.state, {}) or {}
            return 0 if status == "done" and state.get("kept_variant") == name else 1
        return self.locked(work)

    def revert_experiment(self, experiment: Experiment) -> int:
        """Revert an experiment's kept variant, reopening the experiment; 0 also when nothing was applied."""
        def work():
            if not self.revert_kept(experiment):
                self.log(f"{experiment.id}: nothing applied; it is on its baseline")
            return 0
        return self.locked(work)

    # -- around every entry point --
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

    def each(self, experiments, start) -> int:
        """start(experiment) for each in turn; 0 when all finished, 1 when any failed."""
        failed = 0
        for index, experiment in enumerate(experiments):
            if self.stop and index == 0:
                raise Interrupted(f"stopped by {self.stop.signal_name} before {experiment.id} started; "
                                  "nothing was changed")
            if self.stop:
                self.log(f"{self.stop.signal_name}: {experiment.id} not started")
                failed += 1
                continue
            failed += start(experiment) != "done"
            if os.path.exists(self.home.journal):
                self.log("a revert failed: no further experiment starts until it is fixed", "error")
                break
        return 1 if failed else 0

    def recover(self) -> dict | None:
        """Revert what an interrupted run left applied (var/applied.json) and close that run's record.

        What is left of the command the dead run had in flight is stopped first, so that it cannot
        apply its variant after the revert.  A run that died with nothing applied is closed too.
        RevertFailed if the revert fails or the journal is damaged.
        """
        entry = read_journal(self.home)
        if entry is None:
            self._close_dead_run(None)
            return None
        self.log(f"recovering: run {entry.get('run_id')} left {entry.get('experiment')}/{entry.get('variant')} "
                 f"applied (pid {entry.get('pid')}); reverting it first")
        if isinstance(entry.get("in_flight"), str):
            stopped = stop_marked(entry["in_flight"])
            if stopped:
                self.log(f"recovering: stopped what was left of its last command (pids {' '.join(map(str, stopped))})")
        result = self.command("recover revert", entry["revert"], entry["path"])
        if not result.ok:
            raise RevertFailed(f"recovery revert of {entry.get('experiment')}/{entry.get('variant')} "
                               f"{result.describe()}; fix it by hand, then run 'smart.py recover'")
        # The revert returns the whole experiment to its baseline: whatever kept.json says it kept (a run
        # killed in its keep, while reverting a kept variant, or in a re-check) is undone.
        if forget_kept(self.home, entry.get("experiment")):
            self.log(f"recovering: {entry['experiment']}/{entry['variant']} is reverted and no longer kept")
        clear_journal(self.home)
        self._close_dead_run(entry)
        return entry

    def _close_dead_run(self, entry) -> None:
        """The records of a run that died (this process holds the lock, so none is running): state.json,
        and a history line for every run folder that has none."""
        self._close_unrecorded_runs()
        state = read_json(self.home.state)
        if not isinstance(state, dict):
            return
        ours = entry is not None and state.get("run_id") == entry.get("run_id")
        if ours and state.get("status") == "failed":
            state.update(recovered_at=utc_now(), updated_at=utc_now())     # the failed revert is now done
            write_json(self.home.state, state)
        if state.get("status") != "running":
            return
        if ours:
            reason = f"the run stopped while {entry.get('variant')} was applied; reverted by recovery at {utc_now()}"
        else:
            reason = f"the run (pid {state.get('pid')}) stopped with nothing applied; closed by recovery at {utc_now()}"
        kept = read_kept(self.home).get(state.get("experiment")) or {}
        state.update(status="interrupted", phase="recovered", reason=reason, current=None, updated_at=utc_now(),
                     kept_variant=kept.get("variant") if kept.get("run_id") == state.get("run_id") else None)
        write_json(self.home.state, state)
        self.append_history(state)
        self.log(f"recovering: run {state.get('run_id')} closed as interrupted: {reason}")

    def _close_unrecorded_runs(self) -> None:
        """A history line for each run folder that has none (a run that died before it wrote its first
        state, or between its last state and its history line, on a full disk or a SIGKILL)."""
        state = read_json(self.home.state)
        state = state if isinstance(state, dict) else {}
        recorded = {entry.get("run_id") for entry in _history(self.home)}
        for run_id in sorted(self.home.run_folders() - recorded):
            if run_id == state.get("run_id"):
                if state.get("status") != "running":      # finished, all but its history line
                    self.append_history(state)
                continue
            try:
                with open(open_nofollow(os.path.join(self.home.runs, run_id, "run.log")), encoding="utf-8",
                          errors="replace") as handle:
                    found = re.search(r" run \S+: experiment (\S+)", handle.read(65536))
            except OSError:
                found = None
            self.append_history({"run_id": run_id, "experiment": found.group(1) if found else None,
                                 "status": "interrupted", "finished_at": utc_now(), "variants": [],
                                 "reason": "the run stopped before it recorded its state; closed by recovery"})
            self.log(f"recovering: run {run_id} had no record; closed as interrupted")

    def revert_kept(self, experiment: Experiment) -> bool:
        """Run the revert of the experiment's kept variant and forget it; RevertFailed if that fails."""
        kept = read_kept(self.home)
        entry = kept.get(experiment.id)
        if not entry:
            return False
        variant, run_id = entry.get("variant"), entry.get("run_id")
        token = secrets.token_hex(8)          # under the journal: a revert cut short is finished by recovery
        write_journal(self.home, run_id, experiment, variant, in_flight=token)
        result = self.command(f"revert {variant}", experiment.revert, experiment.path, env=marked(token))
        if not result.ok:
            raise RevertFailed(f"revert of {experiment.id}/{variant} {result.describe()}; the journal "
                               "var/applied.json stays and the next run retries the revert first")
        forget_kept(self.home, experiment.id, variant, run_id)
        clear_journal(self.home)
        self.log(f"{experiment.id}: reverted {variant}")
        return True

    def recheck_due(self, experiment: Experiment):
        """The kept.json entry of an experiment whose kept variant is due for its re-check, or None."""
        days = self.settings["RECHECK_DAYS"]
        kept = read_kept(self.home).get(experiment.id)
        if not kept or days <= 0 or lacks(experiment):
            return None
        age = _age_minutes(kept.get("confirmed_at") or kept.get("kept_at"))
        return kept if age is None or age >= days * 1440 else None

    def recheck(self, experiment: Experiment, kept: dict) -> str:
        """One re-check run of an experiment's kept variant (Trial.run_recheck)."""
        variant = experiment.variant(kept["variant"])
        if variant is None or variant is experiment.baseline:
            self.log(f"{experiment.id}: the kept {kept['variant']} is no longer a variant in its meta.json, so it "
                     "cannot be re-checked: it is reverted and the experiment reopens", "warning")
            self.revert_kept(experiment)
            return "done"
        return self.run_experiment(experiment, lambda trial: trial.run_recheck(variant, kept))

    def resting(self, experiment: Experiment):
        """Why the timer's run skips an experiment now (it does not apply on this box, a kept variant, or
        tried within RETRY_HOURS), or None."""
        missing = lacks(experiment)
        if missing:
            return f"does not apply on this box: it needs {', '.join(missing)}"
        kept = read_kept(self.home).get(experiment.id)
        if kept:
            days = self.settings["RECHECK_DAYS"]
            since = kept.get("confirmed_at") or kept.get("kept_at")
            when = (f"re-checked {days:g} days after {since} (RECHECK_DAYS)" if days > 0
                    else "never re-checked (RECHECK_DAYS=0)")
            return (f"settled, {kept.get('variant')} kept in run {kept.get('first_run_id') or kept.get('run_id')}, "
                    f"{when}; 'smart.py revert {experiment.id}' reopens it")
        last = None
        for entry in _history(self.home):
            if entry.get("experiment") == experiment.id:
                last = entry
        age = _age_minutes(last.get("finished_at")) if last else None
        if last and last.get("status") == "done" and age is not None and age < self.settings["RETRY_HOURS"] * 60:
            return (f"tried in run {last.get('run_id')} {age:.0f} minutes ago, nothing kept; tried again after "
                    f"RETRY_HOURS={self.settings['RETRY_HOURS']:g} (or name it to run it now)")
        return None

    # -- one run --
    def run_experiment(self, experiment: Experiment, body) -> str:
        """One experiment as one run: its own RUN_ID, run folder, state and history line; body(trial) measures."""
        record = RunRecord.open(self.home, self.log, self.command, experiment)
        trial = self.trial(record, experiment)
        try:
            record.save()
            self.log(f"run {record.run_id}: experiment {experiment.id} ({len(experiment.candidates)} variants)")
            self.hook("pre-run", record)
            body(trial)
            status = "done"
        except Interrupted as exc:
            status, reason = "interrupted", str(exc)
        except RevertFailed as exc:
            status, reason = "failed", str(exc)
        except (OSError, SmartError) as exc:
            status, reason = "failed", str(exc) if isinstance(exc, SmartError) else f"I/O error: {os_problem(exc)}"
        problems = []
        if status != "done":
            reason = trial.switch.abandon(reason)
            if record.state.get("recheck") and record.state["recheck"].get("outcome") is None:
                record.state["recheck"]["outcome"] = "reverted"      # the run ended unfinished: reopened
            self.log(f"run {record.run_id} {status}: {reason}", "error" if status == "failed" else "warning")
            problems.append(f"{status}: {reason}")
        try:
            self.finish(record, status, None if status == "done" else reason)
            self.ask_coach(record)
            self.hook("post-run", record)
        except OSError as exc:
            status = "failed"
            problems.append(f"could not be recorded ({os_problem(exc)})")
        finally:
            trial.measurer.close()
            record.close()
        if self.log.status is not None:
            self.log.status.clear()
            print(format_verdicts(record.state), file=self.log.out, flush=True)
        if self.log.lost:
            problems.append(f"run.log is incomplete ({self.log.lost})")
        if problems:
            emit(f"error: run {record.run_id} of {experiment.id} " + "; and ".join(problems), sys.stderr, "error")
        return status

    def trial(self, record: RunRecord, experiment: Experiment) -> "Trial":
        """The Trial of one run, with its switcher and measurer."""
        schedule = Schedule.of(experiment, self.settings)
        return Trial(record, experiment, schedule, Thresholds(self.settings), self.settings["VERIFY_SECONDS"],
                     Switcher(record, experiment, self.stop),
                     Measurer(record, experiment, schedule, self.stop, settings=self.settings),
                     self.stop, self.clock, usual_baselines=baselines_of(_history(self.home), experiment.id))

    def hook(self, name: str, record: RunRecord) -> None:
        path = os.path.join(self.home.root, "hooks", name)
        if not os.access(path, os.X_OK):
            return
        result = self.command(f"{name} hook", f"{shlex.quote(path)} {record.run_id} {shlex.quote(self.home.state)}",
                              self.home.root)
        if not result.ok:
            if name == "pre-run":
                raise WorkFailed(f"pre-run hook {result.describe()}; nothing was changed")
            self.log(f"warning: post-run hook {result.describe()}")

    def finish(self, record: RunRecord, status: str, reason) -> None:
        """Final state.json, history line, run-folder rotation, dashboard files."""
        record.save(status=status, phase="finished", finished_at=utc_now(), current=None,
                    reason=reason or record.state.get("reason"))
        self.append_history(record.state)
        try:
            saved = compress_measurements(record.run_dir)
            if saved:
                self.log(f"measurement CSVs gzip-compressed, {saved / 1048576:.1f} MiB saved")
        except OSError as exc:          # only space saving: the CSVs that are left stay readable
            self.log(f"measurement CSVs left uncompressed ({os_problem(exc)})", "warning")
        self.rotate_runs(record.run_id)
        publish_dashboard(self.home, running=False, recheck_days=self.settings["RECHECK_DAYS"])
        self.log(f"finished: status {status}, kept {record.state['kept_variant'] or 'nothing'}")

    def ask_coach(self, record: RunRecord) -> None:
        """Phone home when PHONE_HOME says so; a coach that fails is logged, never fatal."""
        if not wants_coach(record.state, self.settings):
            return
        self.log(f"asking the coach {_public_url(self.settings['PHONE_HOME_URL'])}")
        try:
            advice = phone_home(record.state, self.settings, trend=trend_summary(self.home, record.state["experiment"]))
        except (SmartError, OSError) as exc:
            self.log(f"coach: {exc}", "warning")
            record.save(coach={"advice": None, "error": str(exc), "at": utc_now(),
                               "coach": _public_url(self.settings["PHONE_HOME_URL"])})
            return
        self.log(f"coach advice (shown, never executed): {advice['advice']!r}; next_variant "
                 f"{advice['next_variant']}; confidence {advice['confidence']}")
        record.save(coach=advice)
        publish_dashboard(self.home, recheck_days=self.settings["RECHECK_DAYS"])

    def append_history(self, state: dict) -> None:
        entry = {key: state.get(key) for key in HISTORY_KEYS}
        entry["variants"] = [{key: v.get(key) for key in HISTORY_VARIANT_KEYS} for v in state.get("variants", [])]
        append_line(self.home.history, json.dumps(entry))

    def rotate_runs(self, current: str) -> None:
        """Remove the run folders that finished longest ago beyond KEEP_RUNS, never the current run's.

        The order is history.jsonl's, the order the runs finished in, not their names: a clock
        stepped back gives a new run a name that sorts first.  Folders the history does not know
        go first.
        """
        folders = self.home.run_folders()
        finished = list(dict.fromkeys(entry.get("run_id") for entry in reversed(list(_history(self.home)))))[::-1]
        known = [run_id for run_id in finished if run_id in folders and run_id != current]
        ranked = sorted(folders - set(known) - {current}) + known
        for old in ranked[: max(0, len(ranked) + 1 - self.settings["KEEP_RUNS"])]:
            shutil.rmtree(os.path.join(self.home.runs, old), ignore_errors=True)


###### Trial: the designs' schedules and each variant's outcome ######

class Trial:
    """One experiment's variants inside a run: switch, warm up, measure, decide, revert unless kept.

    Two designs.  sequential (the original flow): the baseline first, then each variant after
    a cool-down.  switchback: per variant, BLOCKS pairs of a baseline block and a variant block
    in random order, each after a measured warm-up, judged within blocks so drift cancels out.
    In both, a Guard aborts a harmful variant at once and, with EARLY_STOP, a Look may end a
    variant's measurement as soon as its verdict is certain.  Switching is the Switcher's job,
    measuring the Measurer's; the clock is a seam (bench/design_quality.py runs a virtual one).
    """

    def __init__(self, record: RunRecord, experiment: Experiment, schedule: Schedule, thresholds: Thresholds,
                 verify_seconds: float, switch: "Switcher", measurer: "Measurer", stop: StopFlag,
                 clock=time.monotonic, usual_baselines=()):
        self.record, self.experiment, self.schedule, self.thresholds = record, experiment, schedule, thresholds
        self.verify_seconds = verify_seconds
        self.switch, self.measurer, self.measure = switch, measurer, measurer.measure
        self.stop, self.clock = stop, clock
        self.log = record.log
        self.block = 0               # switchback blocks are numbered across the run; 0 is the opening warm-up
        self.reference = Arm()       # baseline rows the guard compares against
        self.baseline = None         # the judged baseline arm, once measuring starts
        self.usual_baselines = list(usual_baselines)     # earlier runs' baseline p50s, oldest first (anomaly)
        self.recheck = None          # kept.json's entry of the variant a re-check is about

    def guard(self) -> "Guard":
        return Guard(self.reference, self.thresholds, self.clock)

    def check_health(self, arm=None) -> None:
        """Unhealthy unless the baseline answers mostly successes: a short probe (or the arm given)."""
        if arm is None:
            arm = Arm()
            self.measure("health", HEALTH_SECONDS, arm, step="health check")
        mix = len(self.experiment.urls) > 1
        expected = {(Target.label_of(entry["url"]) if mix else None): entry["expect"]["status"]
                    for entry in self.experiment.urls if (entry.get("expect") or {}).get("status")}
        problem = unhealthy(arm, self.experiment.target_url, expected)
        if problem:
            raise Unhealthy(f"the baseline is not healthy, so no variant was tried: {problem}")

    # -- the two designs --
    def run(self, candidates=None) -> None:
        """The experiment's variants (or the candidates given) under the run's design."""
        candidates = self.experiment.candidates if candidates is None else candidates
        self.record.save(design=self.schedule.design)
        if self.log.status is not None:
            self.log.status.update(run_ends=self.clock() + HEALTH_SECONDS + self.schedule.run_seconds(len(candidates)))
        self.switch.to(self.experiment.baseline)
        self.check_health()
        self.record.save(source=self.measurer.choose_source())
        if self.schedule.design == "switchback":
            self.run_switchback(candidates)
        else:
            self.run_sequential(candidates)
        self.note_baseline()

    def run_recheck(self, variant: dict, kept: dict) -> None:
        """Re-check a kept variant: it is taken back under the journal, reverted, and tried again
        against the baseline under the run's design; kept again only when it still meets the rules."""
        self.recheck = kept
        self.switch.adopt(variant["name"], kept)
        self.record.save(recheck={"variant": variant["name"], "kept_at": kept.get("kept_at"),
                                  "kept_in": kept.get("first_run_id") or kept.get("run_id"),
                                  "confirmed_at": kept.get("confirmed_at"), "outcome": None})
        self.log(f"re-check of {variant['name']} (kept {kept.get('kept_at')}, last confirmed "
                 f"{kept.get('confirmed_at') or 'never'}): reverted, then measured against the baseline again")
        self.switch.back()
        self.run([variant])

    def run_sequential(self, candidates) -> None:
        baseline = self.baseline = Arm()
        self.measure("baseline", self.schedule.baseline_seconds, baseline)
        self.check_health(baseline)
        self.reference = baseline
        self.walk(candidates, lambda variant: self.sequential_variant(variant, baseline))

    def sequential_variant(self, variant: dict, baseline: Arm) -> dict:
        name, schedule = variant["name"], self.schedule
        guard = self.guard()
        self.switch.to(variant)
        self.measure(f"{name}_warmup", schedule.cooldown_seconds, Arm(), guard=guard, step="cooldown")
        if guard.reason:
            return self.aborted(name, guard.reason)
        arm = Arm()
        horizon = schedule.experiment_seconds
        look = (Look(baseline, arm, self.thresholds, horizon, schedule.look_every(horizon), self.clock)
                if schedule.early_stop else None)
        self.measure(name, horizon, arm, guard=guard, look=look)
        if guard.reason:
            return self.aborted(name, guard.reason)
        if look is not None and look.result is not None:
            return self.decided(name, look.result, stopped_early=look.fraction)
        return self.decided(name, verdict(baseline, arm, self.thresholds, fraction=1.0 if look else None))

    def run_switchback(self, candidates) -> None:
        seed = int(self.record.run_id[:15].replace("T", "")) % (2 ** 32)
        rng = random.Random(seed)
        self.log(f"switchback: {self.schedule.blocks} block pairs per variant, order seed {seed}")
        self.measure_reference()
        baseline = self.baseline = Arm()
        self.walk(candidates, lambda variant: self.switchback_variant(variant, baseline, rng))

    def walk(self, candidates, measure_one) -> None:
        """Each candidate in turn until one is kept; a sweep walks its values and keeps the best."""
        if self.experiment.sweep is not None and self.recheck is None:
            self.walk_sweep(candidates, measure_one)
            return
        for variant in candidates:
            self.stop.check()
            if self.record_outcome(variant, self.attempt(variant, lambda: measure_one(variant))):
                return

    def walk_sweep(self, candidates, measure_one) -> None:
        """A line search: the values in ascending order, each against the baseline by the rules, until
        one is worse than the best so far (worse_than_best); the best value that passed is kept."""
        sweep = {"name": self.experiment.sweep["name"], "order": "ascending",
                 "values": [v["name"] for v in candidates], "tried": 0, "best": None, "stopped": None}
        self.record.save(sweep=sweep)
        best = None         # (variant, record, the rules' reason) of the best value so far
        passed = []         # the records of the values that passed every rule
        for index, variant in enumerate(candidates):
            self.stop.check()
            record = self.attempt(variant, lambda: measure_one(variant))
            sweep["tried"] = index + 1
            rules = record["reason"] if record["decision"] == "keep" else None
            if rules:
                record = dict(record, decision="revert",
                              reason=f"revert for now: it passes every rule ({rules}); the sweep walks on")
                passed.append(record)
            self.record.add_variant(record)
            self.switch.back()
            why = None if best is None else self.worse_than_best(record, best[1])
            if rules and (best is None or record["metrics"]["improve_pct"] > best[1]["metrics"]["improve_pct"]):
                best = (variant, record, rules)
                sweep["best"] = variant["name"]
            if why:
                left = [v["name"] for v in candidates[index + 1:]]
                sweep["stopped"] = f"{why}: the walk stops" + (f" ({', '.join(left)} not tried)" if left else "")
                self.log(f"sweep {sweep['name']}: {sweep['stopped']}")
                self.record.save(sweep=sweep)
                break
            self.record.save(sweep=sweep)
        if best is None:
            return
        variant, record, rules = best
        for other in passed:
            if other is not record:
                other["reason"] = (f"revert: it passes every rule, but {variant['name']} improved p50 more "
                                   f"({_fmt_pct(other['metrics']['improve_pct'])} against "
                                   f"{_fmt_pct(record['metrics']['improve_pct'])})")
        record.update(decision="keep", reason=f"keep: the best of the sweep's {sweep['tried']} values tried: "
                                              f"{rules.split(': ', 1)[-1]}")
        record.update(self.fair(record))
        self.record.headline(record)
        self.log(f"sweep {sweep['name']}: {record['reason']}")
        self.settle(variant, record)

    def worse_than_best(self, record: dict, best: dict):
        """Why a sweep's value ends the walk, or None: it did harm (or could not be applied), or even
        the upper end of its improvement's interval is below the best value's improvement."""
        verdict_of = record.get("verdict")
        name = record["name"]
        if verdict_of is None or {"errors", "tail"} & set(verdict_of["failed_rules"]):
            return f"{name} did harm or failed ({record['reason'].split(': ', 1)[-1]})"
        ci = verdict_of.get("improve_ci")
        if ci is not None and ci[1] < best["metrics"]["improve_pct"]:
            return (f"{name} improves p50 by {_fmt_pct(ci[1])} at most ({verdict_of['confidence']:g} interval), "
                    f"less than {best['name']} did ({_fmt_pct(best['metrics']['improve_pct'])})")
        return None

    def measure_reference(self) -> None:
        """The opening warm-up on the baseline, long enough to give the guard GUARD_MIN_ROWS good rows."""
        seconds, spent = self.schedule.warmup_seconds, 0.0
        limit = max(seconds, self.schedule.baseline_seconds)
        while True:
            self.measure("baseline_warmup", seconds, self.reference, block=0, step="warm-up")
            spent += seconds
            if self.reference.ok >= GUARD_MIN_ROWS or spent >= limit:
                return
            seconds = min(1.0, limit - spent) if seconds > 0 else 1.0

    def switchback_variant(self, variant: dict, baseline: Arm, rng: random.Random) -> dict:
        name, schedule = variant["name"], self.schedule
        pairs, warmup = schedule.blocks, schedule.warmup_seconds
        orders = balanced_orders(rng, pairs)
        self.log(f"{name}: block order " + " ".join("VB" if first else "BV" for first in orders))
        arm, strip = Arm(), []
        for index, variant_first in enumerate(orders):
            self.block += 1
            block = self.block
            if self.log.status is not None:
                self.log.status.update(pair=(index + 1, pairs))
            for is_variant in (variant_first, not variant_first):
                if is_variant:
                    guard = self.guard()
                    self.switch.to(variant)
                    self.measure(f"{name}_warmup", warmup, Arm(), block, guard, step="warm-up")
                    if not guard.reason:
                        self.measure(name, schedule.experiment_seconds / pairs, arm, block, guard)
                    if guard.reason:
                        return self.aborted(name, guard.reason, strip)
                else:
                    self.switch.back()
                    self.measure("baseline_warmup", warmup, self.reference, block, step="warm-up")
                    self.measure("baseline", schedule.baseline_seconds / pairs, baseline, block,
                                 reference=self.reference)
                source = arm if is_variant else baseline
                strip.append({"index": block, "arm": "variant" if is_variant else "baseline",
                              "p50_ms": _round(percentile(sorted(source.only([block]).latencies), 50))})
            if schedule.early_stop and FIRST_LOOK_PAIR <= index + 1 < pairs:
                result = decisive(baseline, arm, self.thresholds, (index + 1) / pairs)
                if result is not None:
                    return self.decided(name, result, stopped_early=(index + 1) / pairs, strip=strip)
        result = verdict(baseline, arm, self.thresholds, fraction=1.0 if schedule.early_stop else None)
        return self.decided(name, result, strip=strip)

    def run_apply(self, variant: dict) -> None:
        """Apply a variant by name and keep it only when a short check against the baseline finds no harm."""
        self.record.save(design="apply")
        self.switch.to(self.experiment.baseline)
        self.check_health()
        baseline = self.baseline = Arm()
        self.measure("baseline", self.verify_seconds, baseline)
        self.check_health(baseline)
        self.reference = baseline
        self.record_outcome(variant, self.attempt(variant, lambda: self.verify_variant(variant, baseline)))
        self.note_baseline()

    def verify_variant(self, variant: dict, baseline: Arm) -> dict:
        name = variant["name"]
        guard = self.guard()
        self.switch.to(variant)
        self.measure(f"{name}_warmup", self.schedule.warmup_seconds, Arm(), guard=guard, step="warm-up")
        arm = Arm()
        if not guard.reason:
            self.measure(name, self.verify_seconds, arm, guard=guard)
        if guard.reason:
            return self.aborted(name, guard.reason)
        result = verdict(baseline, arm, self.thresholds)
        harm = harm_found(result, baseline, arm, self.thresholds)
        metrics = variant_metrics(result)
        reason = (f"revert: applied on request, but {harm}" if harm else
                  f"keep: applied on request; no harm against the baseline "
                  f"(p50 {metrics['base_p50_ms']} -> {metrics['var_p50_ms']} ms, "
                  f"errors {metrics['err_delta_pct']:+.2f} points)")
        return self.decided(name, result, decision="revert" if harm else "keep", reason=reason)

    # -- outcomes --
    def attempt(self, variant: dict, body) -> dict:
        """Run one variant's measurement; a failed apply or measurement reverts it with the reason."""
        name = variant["name"]
        try:
            return body()
        except Interrupted as exc:
            self.record.add_variant(variant_record(name, "revert", f"revert: {exc} while it was under test"))
            raise
        except (ApplyFailed, MeasureFailed) as exc:
            self.log(f"{name}: {exc}; reverting")
            return variant_record(name, "revert", f"revert: {exc}")

    def record_outcome(self, variant: dict, record: dict) -> bool:
        """Store a variant's outcome; keep it applied when kept (True), else make sure it is reverted."""
        record = self.fair(record)
        self.record.add_variant(record)
        return self.settle(variant, record)

    def settle(self, variant: dict, record: dict) -> bool:
        """Leave the variant applied for good when its record says keep (True); else revert it."""
        if self.recheck is not None:
            outcome = ("reverted" if record["decision"] != "keep" else
                       "inconclusive" if record.get("anomalous") else "confirmed")
            self.record.save(recheck=dict(self.record.state["recheck"], outcome=outcome))
        if record["decision"] == "keep":
            self.switch.to(variant)
            self.switch.keep(variant["name"], confirmed=not record.get("anomalous"))
            return True
        self.switch.back()
        self.record.save()
        return False

    def fair(self, record: dict) -> dict:
        """A decided record as a run may act on it: under an anomaly (the baseline far from its usual
        range) a run keeps nothing, and a re-check leaves its kept variant as it was, unconfirmed,
        unless it did harm."""
        if self.record.state.get("design") == "apply":
            return record
        anomaly = self.anomaly()
        if anomaly is None:
            return record
        why = f"the baseline is anomalous ({anomaly['text']})"
        verdict_of = record.get("verdict")
        harm = verdict_of is None or bool({"errors", "tail"} & set(verdict_of["failed_rules"]))
        if self.recheck is not None and not harm:
            return dict(record, decision="keep", anomalous=True,
                        reason=f"keep, unconfirmed: {why}, so the re-check cannot judge it; {record['name']} stays "
                               f"as it was and is re-checked on the next run (the rules said {record['reason']})")
        if record["decision"] == "keep":
            return dict(record, decision="revert", anomalous=True,
                        reason=f"revert: {why}: a run under an anomaly keeps nothing (the rules said "
                               f"{record['reason']})")
        return record

    def anomaly(self):
        """The baseline's anomaly against the experiment's earlier runs (baseline_anomaly), or None."""
        arm = self.baseline
        if arm is None or not arm.ok:
            return None
        return baseline_anomaly(percentile(sort_latencies(arm.latencies), 50), self.usual_baselines)

    def note_baseline(self) -> None:
        """The run's baseline p50 and its anomaly, if any, in state.json (and so in the history)."""
        arm = self.baseline
        if arm is None or not arm.ok:
            return
        anomaly = self.anomaly()
        if anomaly is not None:
            self.log(f"anomaly: {anomaly['text']}", "warning")
        self.record.save(baseline_p50_ms=_round(percentile(sort_latencies(arm.latencies), 50)), anomaly=anomaly)

    def aborted(self, name: str, reason: str, strip=()) -> dict:
        self.log(f"{name}: {reason}; reverting at once", "warning")
        self.switch.back()
        return variant_record(name, "revert", f"revert: {reason}", stopped_early=reason, blocks=strip)

    def decided(self, name: str, result: Verdict, stopped_early=None, strip=(), decision=None, reason=None) -> dict:
        """A measured variant's record: the verdict (written to NAME_decision.log), or the one given, or
        the experiment's own decider's."""
        with open(self.record.path(f"{name}_decision.log"), "w", encoding="utf-8") as handle:
            handle.write(format_verdict(result) + "\n\n" + json.dumps(result.to_json(), indent=2) + "\n")
        why = None
        if stopped_early is not None and stopped_early < 1:
            why = (f"{'kept' if result.decision == 'keep' else 'reverted'} at {stopped_early:.0%} of the horizon: "
                   + ("every rule held at the sequential boundary" if result.decision == "keep"
                      else "the improvement's interval lies below the bar"))
            self.log(f"{name}: sequential stop, {why}")
        given = decision is not None
        decision, reason, decider = decision or result.decision, reason or result.reason, None
        if given:           # applied on request: harm decides; the rules' verdict is only shown beside it
            self.log(f"{name}: {reason} (the five rules, for comparison: {result.reason})")
        else:
            self.log(f"{name}: {result.reason}")
        if not given and self.experiment.decider:
            decision, reason = self.custom_decision(name, result)
            decider = {"command": self.experiment.decider, "decision": decision,
                       "builtin_decision": result.decision, "builtin_reason": result.reason}
        return variant_record(name, decision, reason, result, stopped_early=why, blocks=strip, decider=decider)

    def custom_decision(self, name: str, builtin: Verdict):
        """The experiment's own decider, given the two CSVs: keep or revert; anything else reverts."""
        command = (f"{self.experiment.decider} {shlex.quote(self.record.path('baseline.csv'))} "
                   f"{shlex.quote(self.record.path(name + '.csv'))}")
        result = self.record.command(f"decide {name}", command, self.experiment.path, stdout_only=True)
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


FIRST_LOOK_PAIR = 2     # the switchback design's sequential stop looks after each pair from this one on
HEALTH_SECONDS = 1.0    # the probe of the baseline before anything is tried
ANOMALY_WINDOW = 10     # a baseline is judged against the experiment's last this many baselines ...
ANOMALY_MIN_RUNS = 5    # ... once there are at least this many
ANOMALY_K = 4.0         # ... anomalous beyond their median +- K robust standard deviations (1.4826 x MAD) ...
ANOMALY_FLOOR = 0.10    # ... each at least this share of the median (a steady history is no hair trigger)


def baseline_anomaly(p50_ms: float, earlier) -> dict | None:
    """Whether a run's baseline p50 lies far outside the experiment's recent ones: beyond their
    median +- ANOMALY_K x max(1.4826 x MAD, ANOMALY_FLOOR x median) over the last ANOMALY_WINDOW
    runs (at least ANOMALY_MIN_RUNS); the figures and their wording, or None."""
    recent = [x for x in earlier if isinstance(x, (int, float)) and x > 0][-ANOMALY_WINDOW:]
    if len(recent) < ANOMALY_MIN_RUNS:
        return None
    usual = statistics.median(recent)
    spread = max(1.4826 * statistics.median(abs(x - usual) for x in recent), ANOMALY_FLOOR * usual)
    low, high = max(0.0, usual - ANOMALY_K * spread), usual + ANOMALY_K * spread
    if low <= p50_ms <= high:
        return None
    return {"baseline_p50_ms": _round(p50_ms), "usual_p50_ms": _round(usual), "low_ms": _round(low),
            "high_ms": _round(high), "runs": len(recent), "ratio": _round(p50_ms / usual),
            "text": f"baseline p50 {p50_ms:.3g} ms is {p50_ms / usual:.2g} x the usual {usual:.3g} ms, outside "
                    f"{low:.3g}-{high:.3g} ms (median +- {ANOMALY_K:g} robust deviations of the last "
                    f"{len(recent)} runs)"}


def unhealthy(arm: Arm, url=None, expected=None):
    """Why an arm's answers are mostly failures (no answer, 4xx, 5xx or, where `expected` declares a
    URL's status, any other; a failed check), or None when they are not; `url` names the one URL of
    rows that carry none."""
    expected = expected or {}
    if arm.total == 0:
        return f"{url or 'the target'} gave no answer to measure"
    by_url = collections.defaultdict(collections.Counter)
    for (label, code), count in arm.answers.items():
        by_url[label][code] += count
    for label, answers in sorted(by_url.items(), key=lambda item: str(item[0])):
        total = sum(answers.values())
        bad = collections.Counter({code: n for code, n in answers.items()
                                   if (code != expected[label] if label in expected else is_failure(code) or code >= 400)})
        if 2 * sum(bad.values()) > total:
            code, count = bad.most_common(1)[0]
            what = "no answer (refused, reset or timed out)" if code == 0 else f"{code}"
            return f"{label or url or 'the target'} answered {what} to {count} of {total} requests"
    if 2 * arm.errors > arm.total:
        return f"{arm.errors} of {arm.total} requests failed their check"
    return None


def format_verdicts(state: dict) -> str:
    """The run's outcome as a table for the terminal: each variant's decision, p50s, change and why."""
    lines = [f"{state.get('experiment')}: run {state.get('run_id')} {state.get('status')}, "
             f"kept {state.get('kept_variant') or 'nothing'}" + (f" ({state['reason']})" if state.get("reason") else "")]
    if state.get("variants"):
        lines.append(f"  {'variant':<20} {'decision':<9} {'p50 baseline -> variant':>24} {'p50':>8}  reason")
    for variant in state.get("variants") or []:
        metrics = variant.get("metrics") or {}
        p50s = (f"{metrics['base_p50_ms']:.3g} -> {metrics['var_p50_ms']:.3g} ms"
                if isinstance(metrics.get("base_p50_ms"), (int, float)) and isinstance(metrics.get("var_p50_ms"), (int, float))
                else "-")
        change = _fmt_signed(-metrics["improve_pct"]) if isinstance(metrics.get("improve_pct"), (int, float)) else "-"
        reason = str(variant.get("reason") or "").split(": ", 1)[-1]
        lines.append(f"  {str(variant.get('name'))[:20]:<20} {str(variant.get('decision')):<9} {p50s:>24} {change:>8}  "
                     f"{reason[:100]}")
    return printable("\n".join(lines))


def balanced_orders(rng: random.Random, pairs: int) -> list:
    """Which pairs run the variant first: half of them, chosen at random, so drift cancels out."""
    first = set(rng.sample(range(pairs), pairs // 2 + (rng.random() < 0.5 if pairs % 2 else 0)))
    return [index in first for index in range(pairs)]


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


###### Switching: apply and revert, the journal before every apply ######

RECHECKS_KEPT = 10      # a kept variant's re-checks listed in kept.json (the history has them all)
RECHECK_OUTCOMES = ("confirmed", "reverted", "inconclusive")


def marked(token: str) -> dict:
    """The environment of a journaled command: this process's, with MARK=token."""
    return dict(os.environ, **{MARK: token})


class Switcher:
    """Switches one experiment between its baseline and its variants inside a run.

    The journal (var/applied.json) is written before every apply and cleared after the revert, so
    that a run that dies in between leaves its successor what to revert.
    """

    def __init__(self, record: RunRecord, experiment: Experiment, stop: StopFlag):
        self.record, self.experiment, self.stop = record, experiment, stop
        self.applied = None          # the variant applied now and not kept
        self.revert_failed = False
        self.carried = None          # a re-checked variant's kept.json entry: its age and re-checks go on

    def adopt(self, name: str, kept: dict) -> None:
        """Take a kept variant back under this run: the journal names it, then kept.json forgets it, so
        that from here on it is reverted like any variant under test (and by recovery if the run dies)."""
        self.record.write_journal(self.experiment, name)
        self.applied, self.carried = name, kept
        entries = read_kept(self.record.home)
        entries.pop(self.experiment.id, None)
        write_json(self.record.home.kept, entries)

    def to(self, variant: dict) -> None:
        """Apply a variant (journal first); the baseline's apply, if any, is not journaled once done."""
        name = variant["name"]
        if name == self.applied:
            return
        is_baseline = variant is self.experiment.baseline
        command = self.experiment.apply_command(variant)
        if command is None:
            self.record.log(f"{name}: nothing to apply")
            return
        self.record.log(f"about to apply {name}: {command}")
        token = secrets.token_hex(8)
        self.record.write_journal(self.experiment, name, in_flight=token)
        self.applied = name
        self.record.phase(f"applying {name}", {"variant": name, "step": "applying"})
        result = self.record.command(f"apply {name}", command, self.experiment.path, env=marked(token))
        self.record.write_journal(self.experiment, name)
        self.stop.check()
        if not result.ok:
            raise (WorkFailed if is_baseline else ApplyFailed)(f"apply of {name} {result.describe()}")
        if is_baseline:
            self.record.clear_journal()
            self.applied = None

    def back(self) -> None:
        """Run the experiment's revert for the applied variant; RevertFailed leaves the journal in place.

        The revert runs even when nothing can be recorded (a full disk): the run's end says so on
        stderr, and the next run's recovery closes the record.
        """
        if self.applied is None:
            return
        name = self.applied
        token = secrets.token_hex(8)
        with contextlib.suppress(OSError):
            self.record.write_journal(self.experiment, name, in_flight=token)
            self.record.phase(f"reverting {name}", {"variant": name, "step": "reverting"})
        result = self.record.command(f"revert {name}", self.experiment.revert, self.experiment.path,
                                     env=marked(token))
        if not result.ok:
            self.revert_failed = True
            raise RevertFailed(f"revert of {name} {result.describe()}; the journal var/applied.json stays "
                               "and the next run retries the revert first")
        self.record.clear_journal()
        self.applied = None

    def keep(self, name: str, confirmed: bool = True) -> None:
        """Leave the applied variant in place for good: state.json, then kept.json say so, then the
        journal goes.  Cut short anywhere, the journal still names the variant and recovery reverts
        it (and forgets a kept.json entry that got written).

        A re-checked variant keeps its first keep's time and run, with the re-check added to its
        list; `confirmed` (the rules held on a fair trial) makes it its last confirmation."""
        home = self.record.home
        self.record.save(kept_variant=name, phase=f"kept {name}")
        now = utc_now()
        entry = {"variant": name, "run_id": self.record.run_id, "kept_at": now, "first_run_id": self.record.run_id,
                 "confirmed_at": None, "rechecks": [], "revert": self.experiment.revert, "path": self.experiment.path}
        carried = self.carried if self.carried and self.carried.get("variant") == name else None
        if carried:
            entry.update(kept_at=carried.get("kept_at") or now,
                         first_run_id=carried.get("first_run_id") or carried.get("run_id"),
                         confirmed_at=now if confirmed else carried.get("confirmed_at"),
                         rechecks=(list(carried.get("rechecks") or []) + [
                             {"run_id": self.record.run_id, "at": now,
                              "outcome": "confirmed" if confirmed else "inconclusive"}])[-RECHECKS_KEPT:])
        kept = read_kept(home)
        kept[self.experiment.id] = entry
        write_json(home.kept, kept)
        self.record.clear_journal()
        self.applied = None
        self.record.log(f"kept {name}: it stays applied")

    def abandon(self, reason: str) -> str:
        """After a fault or a signal: revert whatever is applied; returns the full reason."""
        name = self.applied
        if name is None or self.revert_failed:
            return reason
        try:
            self.back()
            with contextlib.suppress(OSError, SmartError):
                forget_kept(self.record.home, self.experiment.id, name, self.record.run_id)
                self.record.save(kept_variant=None)
            return f"{reason}; {name} reverted"
        except RevertFailed as exc:
            return f"{reason}; {exc}"
        except OSError as exc:
            return f"{reason}; the revert could not be recorded ({os_problem(exc)})"


###### Measuring: the prober or measure.sh, watched by the guard and the looks ######

class Measurer:
    """Measures the target for a trial into RUN_DIR/NAME.csv and an Arm: the built-in prober or measure.sh.

    measure() keeps the books (state.json, the log, who gets each row, when to stop); collect()
    gets the rows, and is what bench/design_quality.py replaces with a simulated target.
    """

    def __init__(self, record: RunRecord, experiment: Experiment, schedule: Schedule, stop: StopFlag,
                 wall=time.time, settings=None):
        self.record, self.experiment, self.schedule, self.stop, self.wall = record, experiment, schedule, stop, wall
        self.settings = settings or {key: spec[0] for key, spec in SETTINGS.items()}
        self.targets = [] if experiment.measure_sh else experiment.targets()
        self.source = "measure.sh" if experiment.measure_sh else "prober"
        self.access_log = None       # the AccessLog read while the source is "access-log"

    def close(self) -> None:
        if self.access_log is not None:
            self.access_log.close()

    def choose_source(self) -> dict:
        """What the run measures with: measure.source access-log reads visitors' requests from
        ACCESS_LOG, unless the log is unreadable or too thin (THIN_FACTOR), when the prober does;
        {"name", "note"} for state.json."""
        if self.experiment.measure.get("source") != "access-log":
            return {"name": self.source, "note": None}
        log = AccessLog(self.settings["ACCESS_LOG"])
        needed = THIN_FACTOR * self.settings["MIN_SAMPLES"]
        seconds = min(self.schedule.baseline_seconds, self.schedule.experiment_seconds)
        try:
            count, rate = log.recent_rate(self.wall())
        except OSError as exc:
            note = (f"cannot read the access log {log.path} ({os_problem(exc)}; deploy/install.sh sets it up): "
                    "measured with the prober")
        else:
            note = None if rate * seconds >= needed else (
                f"the access log is too thin: {count} visitors' requests in the last {THIN_WINDOW:g} s "
                f"({rate:.2g}/s) would give an arm of {seconds:g} s about {rate * seconds:.0f}, fewer than "
                f"{needed} ({THIN_FACTOR} x MIN_SAMPLES): measured with the prober")
        if note is not None:
            self.record.log(note, "warning")
            return {"name": self.source, "note": note}
        log.open_at_end()
        self.source, self.access_log = "access-log", log
        self.record.log(f"measuring visitors' requests from {log.path} ({rate:.2g}/s lately)")
        return {"name": "access-log", "note": None}

    def measure(self, name: str, seconds: float, arm: Arm, block=None, guard=None, look=None,
                step="measuring", reference=None) -> None:
        """Measure the target for `seconds`, appending rows to RUN_DIR/NAME.csv and to arm.

        Stops at once on a signal, a tripped guard or a look that decided; a failed measurement
        raises MeasureFailed.  measure.sh, where present, measures instead of the built-in prober
        (guard and looks then act between its calls, not during one).
        """
        if seconds <= 0:
            return
        path = self.record.path(f"{name}.csv")
        variant = name.rsplit("_warmup", 1)[0]
        self.record.phase(f"{step} {variant}", {"variant": variant, "step": step,
                                                "ends_at": _iso_seconds(self.wall() + seconds), "block": block})
        self.record.log(f"{step} {variant} for {seconds:g} s -> {os.path.basename(path)}"
                        + ("" if block is None else f" (block {block})"))

        mix = len(self.targets) > 1 or self.source == "access-log"

        status = self.record.log.status

        def on_row(latency, code, at, url=None, check=""):
            url = url if mix else None          # one URL's rows are told apart by nothing
            arm.add(latency, code, block, at, url, check)
            if status is not None:
                status.count(is_failure(code) or bool(check))
            if reference is not None:
                reference.add(latency, code, block, at, url, check)
            if guard is not None:
                guard.add(latency, code, url, check)

        def should_stop():
            return bool(self.stop) or (guard is not None and guard.tripped()) or (look is not None and look.due())

        self.collect(path, seconds, block, on_row, should_stop, variant)
        self.stop.check()
        if guard is not None:
            guard.tripped()

    def collect(self, path: str, seconds: float, block, on_row, should_stop, variant: str) -> None:
        """The rows of one measurement, from the access log, measure.sh or the built-in prober."""
        if self.source == "access-log":
            self.visitors(path, seconds, block, on_row, should_stop, variant)
            return
        if self.experiment.measure_sh:
            self.script(path, seconds, block, on_row)
            return
        experiment, spec = self.experiment, self.experiment.measure
        shape = {"concurrency": spec.get("concurrency"), "rate": spec.get("rate"),
                 "timeout": spec.get("timeout"), "max_in_flight": spec.get("max_in_flight")}
        if not shape["concurrency"] and not shape["rate"]:
            shape["interval"] = experiment.interval or 1.0
        with self.csv_file(path, csv_header(self.targets, block is not None)) as handle:
            result = Prober(self.targets, seconds, handle, on_row=on_row, should_stop=should_stop, block=block,
                            connections=spec.get("connections", "reuse"),
                            **{k: v for k, v in shape.items() if v is not None}).run()
        checks = f", {result.check_failures} failed their check" if result.check_failures else ""
        self.record.log(f"measured {variant}: {result.rows} requests, {result.errors} errors{checks}"
                        + (", stopped early" if result.stopped_early else ""))

    def visitors(self, path: str, seconds: float, block, on_row, should_stop, variant: str) -> None:
        """The visitors' requests that ended within the next `seconds`, read from the access log as it
        grows (a row's timestamp is when the request began: its end less its request time)."""
        start = self.wall()
        end = start + seconds
        rows = errors = 0
        with self.csv_file(path, "timestamp,latency_ms,response_code" + (",block" if block is not None else "")
                           + ",url\n") as handle:
            while True:
                last = should_stop() or self.wall() >= end + ACCESS_GRACE
                for entry in self.access_log.entries():
                    done, latency, code, label = entry
                    if done >= end:
                        self.access_log.pending.append(entry)
                    elif done >= start:
                        sent = done - latency / 1000
                        handle.write(f"{_iso_millis(sent)},{latency:.3f},{code}"
                                     + ("" if block is None else f",{block}") + f",{label}\n")
                        on_row(latency, code, sent, label)
                        rows += 1
                        errors += is_failure(code)
                if last:
                    break
                time.sleep(min(ACCESS_POLL, max(0.01, end + ACCESS_GRACE - self.wall())))
        self.record.log(f"measured {variant} from the access log: {rows} visitors' requests, {errors} failed")

    def csv_file(self, path: str, header: str):
        """A measurement CSV opened for appending (blocks add to it); the header written once."""
        handle = open(open_nofollow(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT), "a", encoding="utf-8", newline="")
        if handle.tell() == 0:
            handle.write(header)
        return handle

    def script(self, path: str, seconds: float, block, on_row) -> None:
        """Run measure.sh into a scratch CSV, check it, and append its rows (with the block)."""
        experiment = self.experiment
        scratch = path + ".part"
        env = dict(os.environ, TARGET_URL=experiment.target_url or "", DURATION=f"{seconds:g}",
                   INTERVAL=f"{experiment.interval or 1.0:g}", OUT=scratch)
        result = self.record.command("measure.sh", "./measure.sh", experiment.path,
                                     timeout=seconds + self.record.command.timeout, env=env,
                                     should_stop=lambda: bool(self.stop))
        self.stop.check()
        if not result.ok:
            raise MeasureFailed(f"measure.sh {result.describe()}")
        try:
            rows = list(_csv_rows(scratch))
        except BadInput as exc:
            raise MeasureFailed(f"measure.sh wrote a bad CSV (kept for a look): {exc}") from None
        os.unlink(scratch)
        suffix = "" if block is None else f",{block}"
        header = "timestamp,latency_ms,response_code" + (",block" if block is not None else "") + "\n"
        with self.csv_file(path, header) as handle:
            for stamp, latency, code in rows:
                handle.write(f"{stamp},{latency:.3f},{code}{suffix}\n")
                on_row(latency, code, _epoch(stamp))


THIN_WINDOW = 300.0     # the access log's recent traffic is counted over this many seconds ...
THIN_FACTOR = 4         # ... and is too thin when it would give an arm fewer than this many x MIN_SAMPLES
ACCESS_GRACE = 0.3      # seconds after a window's end to wait for its last log lines
ACCESS_POLL = 0.2       # seconds between two reads of the growing log
ACCESS_LABELS = 2000    # distinct pages told apart; the requests of any further page are "(other)"
ACCESS_TAIL = 4 << 20   # bytes at the end of the log the thin-traffic count reads at most
ACCESS_AGE_FLOOR = 5.0  # seconds: the shortest span a recent rate is taken over
ACCESS_LINE = re.compile(rb'^(\d+(?:\.\d+)?) (\d+(?:\.\d+)?) (\d{3}) "([A-Z]+) ([^" ?]*)')


class AccessLog:
    """nginx's timing log of visitors' requests (deploy/nginx/smart.conf's smart_timing format:
    `$msec $request_time $status "$request_method $request_uri" ...`), read as it grows.

    A request is labelled by its path (its method too, unless GET or HEAD), so that each page is
    judged against its own usual status; a 499 (the visitor gave up before the answer) counts as
    no answer (0).  A rotated or truncated log is followed from the new file's start.
    """

    def __init__(self, path: str):
        self.path = path
        self.handle = None
        self.inode = None
        self.rest = b""
        self.pending = []            # entries read that end after the window that read them
        self.labels = set()

    def recent_rate(self, now: float) -> tuple:
        """(requests, requests per second) of the last THIN_WINDOW seconds, from the log's last
        ACCESS_TAIL bytes; a log younger than that is judged over its age (ACCESS_AGE_FLOOR at least)."""
        with open(self.path, "rb") as handle:
            size = handle.seek(0, os.SEEK_END)
            handle.seek(max(0, size - ACCESS_TAIL))
            lines = handle.read(ACCESS_TAIL).split(b"\n")
        ends = [entry[0] for entry in map(self.parse, lines[1 if size > ACCESS_TAIL else 0:])
                if entry is not None and entry[0] >= now - THIN_WINDOW]
        span = max(ACCESS_AGE_FLOOR, now - min(ends)) if ends else THIN_WINDOW
        return len(ends), len(ends) / span

    def open_at_end(self) -> None:
        self.handle = open(self.path, "rb")
        self.inode = os.fstat(self.handle.fileno()).st_ino
        self.handle.seek(0, os.SEEK_END)

    def entries(self) -> list:
        """(end epoch, latency ms, status, label) of the entries left from the last read and of each
        complete line appended since."""
        out, self.pending = self.pending, []
        with contextlib.suppress(OSError):
            now = os.stat(self.path)
            if now.st_ino != self.inode or now.st_size < self.handle.tell():
                self.handle.close()
                self.handle, self.inode, self.rest = open(self.path, "rb"), now.st_ino, b""
        data = self.rest + self.handle.read()
        lines = data.split(b"\n")
        self.rest = lines.pop()
        out.extend(entry for entry in map(self.parse, lines) if entry is not None)
        return out

    def parse(self, line: bytes):
        found = ACCESS_LINE.match(line)
        if found is None:
            return None
        done, seconds, code, method, path = found.groups()
        label = printable(path.decode("utf-8", "replace"))[:200].replace(",", "%2C") or "/"
        if method not in (b"GET", b"HEAD"):
            label = f"{method.decode()} {label}"
        if label not in self.labels:
            if len(self.labels) >= ACCESS_LABELS:
                label = "(other)"
            self.labels.add(label)
        code = int(code)
        return float(done), float(seconds) * 1000, 0 if code == 499 else code, label

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()


def _csv_rows(path: str):
    """(timestamp, latency_ms, code) of each row of a measurement CSV, checked as read_measurements does."""
    read_measurements(path)
    with open(path, encoding="utf-8-sig", newline="") as handle:
        layout = None
        for number, line in enumerate(handle, 1):
            if number == 1 and csv_layout(line.strip()):
                layout = csv_layout(line.strip())
                continue
            if not line.strip():
                continue
            try:
                stamp, latency, code, _, _, _ = _parse_row(line, layout)
            except ValueError:
                continue
            yield stamp, latency, code


GUARD_CONFIDENCE = 0.999
GUARD_FACTOR = 3.0
GUARD_MIN_ROWS = 5
GUARD_EVERY = 0.5        # seconds between two of the guard's checks


class Guard:
    """Aborts a variant that is clearly harmful while it is applied; it never keeps anything.

    Fed every row from the moment of the apply (warm-up included).  Clearly harmful means: the
    error rate is above the reference's plus MAX_ERR_DELTA_PCT even at the lower end of a
    GUARD_CONFIDENCE interval, or the median latency is GUARD_FACTOR times the reference's p99.
    """

    def __init__(self, reference: Arm, thresholds: Thresholds, clock=time.monotonic):
        self.reference, self.thresholds, self.clock = reference, thresholds, clock
        self.started = clock()
        self.latencies = []          # kept sorted: a check reads the median
        self.total = self.errors = 0
        self.checked = None
        self.reason = None
        self.limit_for = (None, None)     # (reference size, GUARD_FACTOR x its p99): sorted once per size
        self.usual_for = (None, {})       # (reference size, its usual status per URL)

    def add(self, latency_ms: float, code: int, url=None, check: str = "") -> None:
        """One row of the variant: a failure when verdict() would count it one (judged against the
        reference's usual status per URL)."""
        self.total += 1
        if self.usual_for[0] != self.reference.total:
            self.usual_for = (self.reference.total, self.reference.usual_status())
        expected = self.usual_for[1].get(url)
        if is_failure(code) or check or (expected is not None and answer_class(code) != expected):
            self.errors += 1
        else:
            bisect.insort(self.latencies, latency_ms)

    def tripped(self) -> bool:
        """Check at most every GUARD_EVERY seconds; once tripped, stays tripped."""
        now = self.clock()
        if self.reason is None and (self.checked is None or now - self.checked >= GUARD_EVERY):
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
            limit = self.latency_limit()
            median = percentile(self.latencies, 50)
            if median > limit:
                return (f"guardrail: median latency {median:.0f} ms after {seconds:.0f} s is over "
                        f"{GUARD_FACTOR:g} x the baseline p99 ({limit:.0f} ms)")
        return None

    def latency_limit(self) -> float:
        size, limit = self.limit_for
        if size != self.reference.ok:
            limit = GUARD_FACTOR * percentile(sorted(self.reference.latencies), 99)
            self.limit_for = (self.reference.ok, limit)
        return limit


class Look:
    """The sequential stop: a verdict every `every` seconds that may end a measurement early."""

    def __init__(self, base: Arm, var: Arm, thresholds: Thresholds, horizon: float, every: float,
                 clock=time.monotonic):
        self.base, self.var, self.thresholds = base, var, thresholds
        self.horizon, self.every, self.clock = horizon, every, clock
        self.started = clock()
        self.next_at = self.started + every
        self.result = None
        self.fraction = None

    def due(self) -> bool:
        """Called from the measurement loop; True once a look has decided."""
        now = self.clock()
        if self.result is None and now >= self.next_at:
            self.next_at = now + self.every
            fraction = min(1.0, (now - self.started) / self.horizon)
            self.result = decisive(self.base, self.var, self.thresholds, fraction)
            if self.result is not None:
                self.fraction = fraction
        return self.result is not None


def decisive(base: Arm, var: Arm, thresholds: Thresholds, fraction: float):
    """The verdict at a look `fraction` of the way to the horizon when it is already certain, else None.

    keep when every rule holds with rule 3 at sequential_alpha (valid however often one looks);
    revert for futility when even the upper end of the improvement's interval is below the bar.
    """
    result = verdict(base, var, thresholds, fraction=fraction)
    futile = (result.failed_rules[:1] != ["samples"] and result.improve_ci is not None
              and result.improve_ci[1] < thresholds.improve_pct)
    return result if result.decision == "keep" or futile else None


###### State and dashboard ######

def _history(home: Home):
    """The entries of var/history.jsonl, oldest first; a damaged line is passed over."""
    try:
        fd = open_nofollow(home.history)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise BadInput(f"{home.history}: cannot read the run history: {exc.strerror or exc}") from None
    try:
        with open(fd, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                with contextlib.suppress(ValueError):
                    entry = json.loads(line)
                    if isinstance(entry, dict):
                        yield entry
    except OSError as exc:
        raise BadInput(f"{home.history}: cannot read the run history: {exc.strerror or exc}") from None


def publish_dashboard(home: Home, history_runs: int = 200, running=None, recheck_days=None) -> None:
    """Publish var/history.json (the last runs), var/context.md and var/smart.prom, each atomically."""
    history = list(_history(home))
    kept = {experiment: kept_summary(entry, recheck_days) for experiment, entry in read_kept(home).items()}
    write_json(os.path.join(home.var, "history.json"), {"runs": history[-history_runs:], "kept": kept,
                                                         "updated_at": utc_now()})
    write_atomic(os.path.join(home.var, "context.md"),
                 format_status(collect_status(home, running=running, history=history, recheck_days=recheck_days),
                               markdown=True))
    write_atomic(os.path.join(home.var, "smart.prom"), prometheus_metrics(home, history))


###### Status: context.md, `status` and Prometheus metrics ######

STALE_MINUTES = 35        # the timer fires every 30 minutes; older than this, something is wrong
SERVICE_UNIT = "smart-experiment.service"
TIMER_UNIT = "smart-experiment.timer"


def _age_minutes(stamp):
    try:
        moment = datetime.fromisoformat(stamp)
    except (TypeError, ValueError):
        return None
    return (datetime.now(timezone.utc) - moment).total_seconds() / 60


def next_timer_run():
    """When the systemd timer fires next, or None where there is no such timer."""
    if not shutil.which("systemctl"):
        return None
    result = run_command(f"systemctl show {TIMER_UNIT} --property=NextElapseUSecRealtime --value", "/", 5)
    value = result.output.strip() if result.ok else ""
    return value if value and value != "n/a" else None


def collect_status(home: Home, runs: int = 10, running=None, history=None, recheck_days=None) -> dict:
    """What is applied, the last verdicts, the next run and what needs attention, from var/ alone.

    `running` says whether a run holds the lock; by default the lock is asked (a run writing its
    own context.md at its end passes False: what it leaves behind is what counts).  `history`
    spares a caller that has read var/history.jsonl already a second read.  `recheck_days`
    (RECHECK_DAYS) dates each kept variant's next re-check.
    """
    attention = []

    def sound(read, fallback):
        try:
            return read()
        except SmartError as exc:       # a damaged file is itself what needs attention
            attention.append(str(exc))
            return fallback

    state = read_json(home.state)
    state = state if isinstance(state, dict) else None
    history = sound(lambda: list(_history(home)), []) if history is None else history
    kept = sound(lambda: read_kept(home), {})
    journal = sound(lambda: read_journal(home), None)
    running = lock_holder(home.var) is not None if running is None else running
    applied = {experiment: kept_summary(entry, recheck_days) for experiment, entry in kept.items()}
    if isinstance(journal, dict):
        applied[journal.get("experiment")] = {"variant": journal.get("variant"), "since": journal.get("written_at"),
                                             "run_id": journal.get("run_id"), "kept": False}
    last = {}
    for entry in history:
        last[entry.get("experiment")] = entry
    if isinstance(journal, dict) and not running:
        attention.append(f"{journal.get('experiment')}/{journal.get('variant')} is left applied by run "
                         f"{journal.get('run_id')} and not kept: run 'smart.py recover'")
    if state and state.get("status") == "failed" and not state.get("recovered_at"):
        attention.append(f"run {state.get('run_id')} failed: {state.get('reason')}")
    if state and state.get("status") == "running" and not running:
        attention.append(f"run {state.get('run_id')} says running but holds no lock: it died; "
                         "run 'smart.py recover'")
    for experiment, entry in last.items():
        if isinstance(entry.get("anomaly"), dict):
            attention.append(f"{experiment}: the last run's {entry['anomaly'].get('text')}: the box is not in its "
                             "usual state, so that run kept nothing")
    if state and not running:
        ages = [a for a in (_age_minutes(state.get("updated_at")), _age_minutes(state.get("checked_at"))) if a is not None]
        if ages and min(ages) > STALE_MINUTES:
            attention.append(f"no run for {min(ages):.0f} minutes: is {TIMER_UNIT} running?")
    return {
        "home": home.root, "host": socket.gethostname(), "version": __version__, "checked_at": utc_now(),
        "running": running, "status": state.get("status") if state else None,
        "phase": state.get("phase") if state else None, "applied": applied,
        "last": {experiment: {key: entry.get(key) for key in ("run_id", "status", "kept_variant", "finished_at",
                                                            "reason", "variants", "anomaly", "recheck", "sweep",
                                                            "source")}
                 for experiment, entry in last.items()},
        "next_run": next_timer_run(), "attention": attention,
        "runs": [{key: entry.get(key) for key in ("run_id", "experiment", "status", "kept_variant", "metrics")}
                 for entry in history[len(history) - runs:][::-1]] if runs > 0 else [],
    }


def kept_summary(entry: dict, recheck_days=None) -> dict:
    """A kept.json entry as status shows it: since when, its last confirmation, its re-checks and,
    given RECHECK_DAYS, when the next one is due."""
    confirmed = entry.get("confirmed_at")
    since = confirmed or entry.get("kept_at")
    due = None
    if recheck_days and _epoch_or_none(since) is not None:
        due = _iso_seconds(_epoch(since) + recheck_days * 86400)
    age = _age_minutes(entry.get("kept_at"))
    return {"variant": entry.get("variant"), "since": entry.get("kept_at"),
            "run_id": entry.get("first_run_id") or entry.get("run_id"), "kept": True,
            "age_days": None if age is None else round(age / 1440, 2), "confirmed_at": confirmed,
            "rechecks": len(entry.get("rechecks") or []), "next_recheck": due,
            "recheck_off": recheck_days is not None and recheck_days <= 0}


def format_status(status: dict, markdown: bool = False) -> str:
    """The status as text: for the terminal, or as context.md."""
    head = "# " if markdown else ""
    sub = "## " if markdown else ""
    item = "- " if markdown else "  "
    lines = [f"{head}smart.py on {status['host']} ({status['home']})",
             "" if markdown else f"checked {status['checked_at']}" + ("; a run is in progress" if status["running"] else ""),
             f"{sub}Applied now"]
    lines += [f"{item}{experiment}: {entry['variant']} "
              + (_kept_words(entry) if entry["kept"] else "(under test, not kept)")
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
        lines += [f"{'  ' + item}{note}" for note in _run_notes(entry)]
    if not status["last"]:
        lines.append(f"{item}no run yet")
    if status.get("experiments") is not None:
        lines.append(f"{sub}Experiments on this box")
        lines += [f"{item}{experiment}: " + ("applies" if not missing else f"does not apply: it needs {', '.join(missing)}; "
                                              "the timer skips it")
                  for experiment, missing in sorted(status["experiments"].items())] or [f"{item}none"]
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


def _kept_words(entry: dict) -> str:
    """How a kept variant stands: since when, its last confirmation, its next re-check."""
    age = f", {entry['age_days']:g} days ago" if entry.get("age_days") is not None else ""
    confirmed = (f"last confirmed by a re-check at {entry['confirmed_at']}" if entry.get("confirmed_at")
                 else "not re-checked yet")
    count = entry.get("rechecks") or 0
    next_one = ("; never re-checked (RECHECK_DAYS=0)" if entry.get("recheck_off") else
                f"; next re-check after {entry['next_recheck']}" if entry.get("next_recheck") else "")
    return (f"(kept in run {entry['run_id']} at {entry['since']}{age}; {confirmed}"
            + (f", {count} re-check{'s' if count != 1 else ''}" if count else "") + f"{next_one})")


def _run_notes(entry: dict) -> list:
    """A run's re-check, sweep, anomaly and measurement source, as lines for status."""
    notes = []
    recheck = entry.get("recheck")
    if isinstance(recheck, dict):
        notes.append(f"re-check of {recheck.get('variant')} (kept {recheck.get('kept_at')}): "
                     f"{recheck.get('outcome') or 'not finished'}")
    sweep = entry.get("sweep")
    if isinstance(sweep, dict):
        notes.append(f"sweep {sweep.get('name')}: {sweep.get('tried')} of {len(sweep.get('values') or [])} values "
                     f"tried, best {sweep.get('best') or 'none'}" + (f"; {sweep['stopped']}" if sweep.get("stopped") else ""))
    anomaly = entry.get("anomaly")
    if isinstance(anomaly, dict):
        notes.append(f"ANOMALY: {anomaly.get('text')}; a run under an anomaly keeps nothing")
    source = entry.get("source")
    if isinstance(source, dict) and (source.get("name") == "access-log" or source.get("note")):
        notes.append(f"measured with the {source.get('name')}" + (f" ({source['note']})" if source.get("note") else ""))
    return notes


def _label(value) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def prometheus_metrics(home: Home, history=None) -> str:
    """var/smart.prom for node_exporter's textfile collector (--collector.textfile.directory)."""
    history = list(_history(home)) if history is None else history
    kept = read_kept(home)
    out = []

    def metric(name, kind, help_text, samples):
        out.append(f"# HELP {name} {help_text}")
        out.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            text = ",".join(f'{key}="{_label(v)}"' for key, v in labels.items())
            number = repr(round(float(value), 9)) if isinstance(value, float) else str(value)   # no 0.0021880000000000003
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
    metric("smart_kept_variant_confirmed_timestamp_seconds", "gauge",
           "Unix time the kept variant last met the rules: its keep, or its last re-check that confirmed it.",
           [({"experiment": e, "variant": entry.get("variant")},
             _epoch_or_none(entry.get("confirmed_at") or entry.get("kept_at")))
            for e, entry in kept.items() if _epoch_or_none(entry.get("confirmed_at") or entry.get("kept_at"))])
    metric("smart_last_run_anomaly", "gauge", "1 when the experiment's last run had an anomalous baseline.",
           [({"experiment": e}, 1 if isinstance(entry.get("anomaly"), dict) else 0) for e, entry in last.items()])
    metric("smart_last_run_baseline_latency_seconds", "gauge", "The baseline p50 of the experiment's last run.",
           [({"experiment": e}, entry["baseline_p50_ms"] / 1000) for e, entry in last.items()
            if isinstance(entry.get("baseline_p50_ms"), (int, float))])
    rechecks = collections.Counter((entry.get("recheck") or {}).get("outcome") for entry in history
                                   if isinstance(entry.get("recheck"), dict))
    metric("smart_rechecks_total", "counter", "Re-checks of kept variants, by outcome.",
           [({"outcome": o}, rechecks.get(o, 0)) for o in RECHECK_OUTCOMES])
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


TREND_RUNS = 10          # the coach sees this many of the experiment's last runs


def trend_summary(home: Home, experiment_id) -> dict:
    """The experiment's history in short, for the coach: its last TREND_RUNS runs (baseline p50,
    anomaly, kept variant, re-check outcome), the usual baseline, and what is kept now."""
    history = list(_history(home))
    runs = [entry for entry in history if entry.get("experiment") == experiment_id][-TREND_RUNS:]
    baselines = baselines_of(history, experiment_id)[-ANOMALY_WINDOW:]
    kept = read_kept(home).get(experiment_id)
    return {
        "runs": [{"run_id": entry.get("run_id"), "finished_at": entry.get("finished_at"), "status": entry.get("status"),
                  "baseline_p50_ms": entry.get("baseline_p50_ms"), "anomaly": isinstance(entry.get("anomaly"), dict),
                  "kept_variant": entry.get("kept_variant"),
                  "recheck": (entry.get("recheck") or {}).get("outcome") if isinstance(entry.get("recheck"), dict)
                  else None} for entry in runs],
        "usual_baseline_p50_ms": _round(statistics.median(baselines)) if baselines else None,
        "kept": None if not kept else {key: kept.get(key) for key in ("variant", "kept_at", "confirmed_at", "rechecks")},
    }


def coach_prompt(state: dict, trend=None) -> str:
    """A short prompt for a local model, built from the run's figures and the experiment's trend."""
    lines = [f"A web server tuning agent ran experiment {state.get('experiment')} "
             f"({state.get('description') or 'no description'}). Variants tried:"]
    for variant in state.get("variants", []):
        metrics = variant.get("metrics") or {}
        lines.append(f"- {variant.get('name')}: {variant.get('decision')}; p50 {metrics.get('base_p50_ms')} -> "
                     f"{metrics.get('var_p50_ms')} ms; improvement {metrics.get('improve_pct')}% "
                     f"(interval {metrics.get('improve_ci')}); reason: {variant.get('reason')}")
    lines.append(f"Defined variants: {', '.join(state.get('defined_variants') or [])}.")
    if isinstance(state.get("anomaly"), dict):
        lines.append(f"This run's {state['anomaly'].get('text')}, so it kept nothing.")
    if trend:
        lines.append("Baseline p50 (ms) of the last runs, oldest first: "
                     + ", ".join(f"{run['baseline_p50_ms']}" + (" (anomaly)" if run["anomaly"] else "")
                                 for run in trend["runs"] if run["baseline_p50_ms"] is not None) + ".")
        kept = trend.get("kept")
        if kept:
            lines.append(f"Kept now: {kept['variant']} since {kept['kept_at']}, last confirmed "
                         f"{kept.get('confirmed_at') or 'never'}, re-checks: "
                         + (", ".join(f"{r.get('outcome')} {r.get('at')}" for r in kept.get("rechecks") or []) or "none")
                         + ".")
    lines.append('Reply with one JSON object only: {"advice": "<one or two sentences>", '
                 '"next_variant": "<a defined variant or null>", "confidence": <0..1>}.')
    return "\n".join(lines)


def phone_home(state: dict, settings: dict, clock=time.monotonic, sleep=time.sleep, trend=None) -> dict:
    """POST the run's state (and the experiment's trend_summary) to the coach and return its advice,
    validated; CoachError when there is none.

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
        prompt = coach_prompt(state, trend)
        model = settings.get("PHONE_HOME_MODEL") or "llama3.2"
        body = ({"model": model, "prompt": prompt, "stream": False, "format": "json"} if path.endswith("generate")
                else {"model": model, "messages": [{"role": "user", "content": prompt}], "stream": False,
                      "format": "json"})
    else:
        body = {"run_id": state.get("run_id"), "state": state, "server_id": socket.gethostname(), "trend": trend}
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
        advice["advice"] = printable(text)[:COACH_ADVICE_LIMIT]
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
    """PHONE_HOME=always, or borderline with a borderline verdict or an anomaly in the run; never
    without a URL."""
    if not settings["PHONE_HOME_URL"] or settings["PHONE_HOME"] == "never":
        return False
    return (settings["PHONE_HOME"] == "always" or isinstance(state.get("anomaly"), dict)
            or any(v.get("borderline") for v in state.get("variants", [])))


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

# What the pages of www/ may do: run their own inline <script> and <style> (each allowed by its
# hash: index.html's, then fleet.html's), set the one style attribute index.html sets (its
# legend's colour), fetch the JSON beside them; no other origin, no frames, forms or <base>.
# deploy/nginx/smart.conf sends the same policy; tests/test_serve.py checks the hashes against
# the pages, so an edit of a page's script or style fails the tests until they are updated here
# and there.
DASHBOARD_CSP = ("default-src 'self'; "
                 "script-src 'sha256-dxX/iCPp+xUq+EjtBBDv9az4MB8+aQfHnhu1Iu2MAEo=' "
                 "'sha256-BIi1noX0qTzATcT1BMBFMW8Lq0epEKg4tfTmDV+d26w='; "
                 "style-src 'sha256-AukH3ColuYmgxrL10v375XdGxh8nZ/7folXaW820El0=' "
                 "'sha256-AzcrXKDVk8tOr3BNkSd8Zaiexuz4KTnurjhzR1qppbA=' "
                 "'unsafe-hashes' 'sha256-CXrmR8Ivp3FsNY5Y7pV5kS6fG/nVl1Yt0Ba6GlryI6M='; "
                 "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = (("Content-Security-Policy", DASHBOARD_CSP), ("X-Content-Type-Options", "nosniff"),
                    ("Referrer-Policy", "no-referrer"))
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")


def host_name(header) -> str:
    """The name in a Host header: lower case, without its port, brackets or trailing dot ("" when missing)."""
    value = (header or "").strip().lower()
    if value.startswith("["):
        value = value[1:].partition("]")[0]
    elif value.count(":") == 1:
        value = value.partition(":")[0]
    return value.rstrip(".")


###### Serve: connections, one loop thread and a few workers ######

def _canned(code: int, reason: str, body: bytes) -> bytes:
    """A whole answer that closes its connection, security headers included, for the connection loop."""
    lines = [f"HTTP/1.1 {code} {reason}", "Content-Type: text/plain; charset=utf-8",
             f"Content-Length: {len(body)}", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in SECURITY_HEADERS]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class _Head:
    """A request head the connection loop read whole, as the file BaseHTTPRequestHandler reads lines from.

    The loop caps a head at HEAD_BYTES, below the handler's own line limits, so readline never cuts.
    """

    def __init__(self, data: bytes):
        self.data, self.at = data, 0

    def readline(self, limit=-1) -> bytes:
        end = self.data.find(b"\n", self.at) + 1 or len(self.data)
        line, self.at = self.data[self.at:end], end
        return line


class _Connection:
    """A client's connection: the bytes read of its next request head, and when that head must be whole."""

    def __init__(self, sock, address, deadline):
        self.sock, self.address, self.deadline = sock, address, deadline
        self.pending = b""
        self.head = b""
        self.idle = False


_HEAD_END = re.compile(rb"\r?\n\r?\n")


class DashboardServer:
    """HTTP/1.1 for the dashboard: one loop thread watches every connection, a few workers answer.

    A connection holds no thread while its request head arrives or while it idles between
    requests: the loop reads heads (whole within head_seconds of their first byte, at most
    HEAD_BYTES), closes a keep-alive connection idle for idle_seconds, and answers 503 and closes
    at once when max_connections are open.  A whole head goes to one of `workers` threads, which
    answers it (every send within send_seconds) and hands the connection back to the loop.
    Requests are answered only for the names in allowed_hosts (see host_name).
    """

    HEAD_BYTES = 16384
    BUSY = _canned(503, "Service Unavailable", b"too many connections; try again in a moment\n")
    TOO_LARGE = _canned(431, "Request Header Fields Too Large", b"request head too large\n")

    def __init__(self, address, handler_class, allow_hosts=(), max_connections=512, workers=8,
                 head_seconds=5.0, idle_seconds=5.0, send_seconds=30.0):
        host, port = address
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.create_server((host, port), family=family, backlog=128)
        self.socket.setblocking(False)
        self.server_address = self.socket.getsockname()
        self.handler_class = handler_class
        bound = {host.lower(), self.server_address[0]} - {"0.0.0.0", "::", ""}
        self.allowed_hosts = frozenset(LOOPBACK_NAMES) | bound | {host_name(name) for name in allow_hosts}
        self.max_connections, self.workers = max_connections, workers
        self.head_seconds, self.idle_seconds, self.send_seconds = head_seconds, idle_seconds, send_seconds
        self._wake_read, self._wake_write = socket.socketpair()
        self._wake_read.setblocking(False)
        self._lock = threading.Lock()
        self._has_work = threading.Condition(self._lock)
        self._work = collections.deque()        # connections with a whole head, for the workers
        self._back = collections.deque()        # connections the workers answered, for the loop
        self._busy = set()                      # connections a worker is answering
        self._open = 0
        self._stopping = threading.Event()
        self._stopped = threading.Event()

    def serve_forever(self) -> None:
        """Accept and answer until shutdown() is called or an exception (Ctrl-C) ends the loop."""
        workers = [threading.Thread(target=self._work_loop, name=f"dashboard-worker-{n}", daemon=True)
                   for n in range(self.workers)]
        for worker in workers:
            worker.start()
        selector = selectors.DefaultSelector()
        selector.register(self.socket, selectors.EVENT_READ, "accept")
        selector.register(self._wake_read, selectors.EVENT_READ, "wake")
        waiting = set()
        accept_again = None
        try:
            while not self._stopping.is_set():
                now = time.monotonic()
                if accept_again is not None and now >= accept_again:
                    selector.register(self.socket, selectors.EVENT_READ, "accept")
                    accept_again = None
                soonest = min((conn.deadline for conn in waiting), default=now + 1.0)
                for key, _ in selector.select(max(0.0, min(soonest - now, 1.0))):
                    if key.data == "accept":
                        if not self._accept(selector, waiting):
                            selector.unregister(self.socket)      # out of file descriptors: pause
                            accept_again = time.monotonic() + 0.5
                    elif key.data == "wake":
                        self._take_back(selector, waiting)
                    elif key.data in waiting:
                        self._read(key.data, selector, waiting)
                now = time.monotonic()
                for conn in [conn for conn in waiting if conn.deadline <= now]:
                    self._drop(conn, selector, waiting)
        finally:
            selector.close()
            with self._lock:
                self._stopping.set()
                left = list(waiting) + list(self._work) + list(self._back)
                self._work.clear()
                self._back.clear()
                for conn in self._busy:
                    with contextlib.suppress(OSError):
                        conn.sock.shutdown(socket.SHUT_RDWR)
                self._has_work.notify_all()
            for conn in left:
                self._close(conn)
            for worker in workers:
                worker.join(5)
            self._stopped.set()

    def shutdown(self) -> None:
        """Make serve_forever return, and wait until it has (call it from another thread)."""
        self._stopping.set()
        self._wake()
        self._stopped.wait()

    def server_close(self) -> None:
        """Close the listening socket."""
        self.socket.close()
        self._wake_read.close()
        self._wake_write.close()

    def _wake(self):
        with contextlib.suppress(OSError):
            self._wake_write.send(b"x")

    def _accept(self, selector, waiting) -> bool:
        """Accept every connection waiting; False when the process is out of file descriptors."""
        while True:
            try:
                sock, address = self.socket.accept()
            except BlockingIOError:
                return True
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    return False
                continue                                    # that client gave up already
            with self._lock:
                full = self._open >= self.max_connections
                if not full:
                    self._open += 1
            if full:
                self._refuse(sock, self.BUSY)
                continue
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = _Connection(sock, address, time.monotonic() + self.head_seconds)
            selector.register(sock, selectors.EVENT_READ, conn)
            waiting.add(conn)

    @staticmethod
    def _refuse(sock, answer: bytes):
        """Send a short answer without waiting (a fresh socket's buffer holds it) and close."""
        with contextlib.suppress(OSError):
            sock.setblocking(False)
            sock.send(answer)
            sock.shutdown(socket.SHUT_WR)
        sock.close()

    def _read(self, conn, selector, waiting):
        try:
            data = conn.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            return self._drop(conn, selector, waiting)
        if conn.idle:                  # the first bytes of the next request on a kept-alive connection
            conn.idle = False
            conn.deadline = time.monotonic() + self.head_seconds
        conn.pending += data
        self._dispatch(conn, selector, waiting)

    def _dispatch(self, conn, selector, waiting):
        """Hand conn to a worker when its head is whole; a head past HEAD_BYTES is refused."""
        end = _HEAD_END.search(conn.pending, 0, self.HEAD_BYTES + 4)
        if end is None:
            if len(conn.pending) > self.HEAD_BYTES:
                selector.unregister(conn.sock)
                waiting.discard(conn)
                self._refuse(conn.sock, self.TOO_LARGE)
                self._forget()
            return
        conn.head, conn.pending = conn.pending[:end.end()], conn.pending[end.end():]
        selector.unregister(conn.sock)
        waiting.discard(conn)
        with self._lock:
            self._work.append(conn)
            self._has_work.notify()

    def _take_back(self, selector, waiting):
        """Watch again the connections the workers have answered (a pipelined head goes straight on)."""
        with contextlib.suppress(OSError):
            while self._wake_read.recv(4096):
                pass
        with self._lock:
            back = list(self._back)
            self._back.clear()
        now = time.monotonic()
        for conn in back:
            conn.sock.setblocking(False)
            conn.idle = not conn.pending
            conn.deadline = now + (self.idle_seconds if conn.idle else self.head_seconds)
            selector.register(conn.sock, selectors.EVENT_READ, conn)
            waiting.add(conn)
            if conn.pending:
                self._dispatch(conn, selector, waiting)

    def _drop(self, conn, selector, waiting):
        selector.unregister(conn.sock)
        waiting.discard(conn)
        self._close(conn)

    def _close(self, conn):
        with contextlib.suppress(OSError):
            conn.sock.close()
        self._forget()

    def _forget(self):
        with self._lock:
            self._open -= 1

    def _work_loop(self):
        while True:
            with self._lock:
                while not self._work and not self._stopping.is_set():
                    self._has_work.wait()
                if self._stopping.is_set():
                    return
                conn = self._work.popleft()
                self._busy.add(conn)
            keep = self._answer(conn)
            with self._lock:
                self._busy.discard(conn)
                keep = keep and not self._stopping.is_set()
                if keep:
                    self._back.append(conn)
            if keep:
                self._wake()
            else:
                self._close(conn)

    def _answer(self, conn) -> bool:
        """Answer the request in conn.head; whether the connection stays open for another."""
        conn.sock.settimeout(self.send_seconds)
        try:
            return not self.handler_class(conn, conn.address, self).close_connection
        except OSError:                 # the client went away, or read nothing for send_seconds
            return False
        except Exception as exc:
            warn(f"dashboard: {type(exc).__name__}: {exc} (answering {conn.address[0]}); connection closed")
            return False


class _DashboardHandler(_QuietHandler):
    """One request of a DashboardServer connection, whose head the loop read; every answer has SECURITY_HEADERS."""

    def setup(self):
        self.connection = self.request.sock
        self.rfile = _Head(self.request.head)
        self.wfile = self.connection.makefile("wb")

    def handle(self):
        self.close_connection = True
        self.handle_one_request()
        headers = getattr(self, "headers", None)
        if headers is not None and (headers.get("Transfer-Encoding")
                                    or headers.get("Content-Length", "0").strip() not in ("", "0")):
            self.close_connection = True      # its body would be read as the next request's head

    def finish(self):
        try:
            self.wfile.flush()
        finally:
            self.wfile.close()

    def end_headers(self):
        for name, value in SECURITY_HEADERS:
            self.send_header(name, value)
        super().end_headers()


###### Serve: the files and the routes ######

def _open_below(root: str, relative: str):
    """An fd of root/relative, opened one part at a time without following a symlink; with whether it is a folder.

    FileNotFoundError when it is not there; PermissionError when it is refused: a symlink
    anywhere below root, a part that starts with a dot (.., dot files), or neither a folder nor
    a regular file (a FIFO is opened without blocking, then refused).
    """
    parts = [part for part in relative.split("/") if part]
    if any(part.startswith(".") or "\0" in part or "\\" in part for part in parts):
        raise PermissionError(relative)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in parts:
            try:
                inner = os.open(part, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                    raise FileNotFoundError(relative) from None
                raise PermissionError(relative) from None       # ELOOP: a symlink
            os.close(fd)
            fd = inner
        mode = os.fstat(fd).st_mode
        if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
            raise PermissionError(relative)
        return fd, stat.S_ISDIR(mode)
    except BaseException:
        os.close(fd)
        raise


def make_dashboard_server(home: Home, bind: str = "127.0.0.1", port: int = 8080, allow_hosts=(), **limits):
    """A DashboardServer for www/, /state.json, /history.json and a listing of /runs/ - nothing else.

    Files are streamed in chunks, never read whole; a symlink is never followed below www/ or
    var/.  limits: DashboardServer's max_connections, workers and timeouts.
    """

    class Handler(_DashboardHandler):
        CHUNK = 65536

        def do_GET(self):
            if not self.headers.get("Host"):
                return self.send_body(400, b"a Host header is required\n")
            if host_name(self.headers["Host"]) not in self.server.allowed_hosts:
                return self.send_body(421, b"this server does not answer to that host name; "
                                           b"start it with: smart.py serve --allow-host NAME\n")
            target = self.path.split("?", 1)[0]
            if not target.startswith("/"):
                return self.send_body(400, b"bad request target\n")
            path = urllib.parse.unquote(target)
            if path in ("/state.json", "/history.json"):
                return self.send_path(home.var, path, "application/json", no_cache=True)
            if path == "/runs" or path.startswith("/runs/"):
                if path.endswith(".csv") and not os.path.lexists(os.path.join(home.var, path.lstrip("/"))):
                    path += ".gz"                 # a finished run's CSVs are compressed: served as text
                return self.send_path(home.var, path, "text/plain; charset=utf-8", no_cache=True, listing=True)
            name = "/index.html" if path == "/" else path
            kind = _TYPES.get(os.path.splitext(name)[1], "text/plain; charset=utf-8")
            return self.send_path(home.www(), name, kind, refused=404)

        do_HEAD = do_GET

        def send_path(self, root, path, kind, no_cache=False, listing=False, refused=403):
            """A regular file (streamed) or, with listing, a folder's listing; 404 or `refused` otherwise."""
            try:
                fd, folder = _open_below(root, path)
            except FileNotFoundError:
                return self.send_body(404, b"not found\n")
            except OSError:
                return self.send_body(refused, b"refused\n" if refused == 403 else b"not found\n")
            try:
                if folder and not listing:
                    return self.send_body(404, b"not found\n")
                if folder and not path.endswith("/"):
                    return self.send_body(301, b"", headers=[("Location", urllib.parse.quote(path) + "/")])
                if folder:
                    return self.send_listing(fd, newest_first=path.strip("/") == "runs")
                if path.endswith(".csv.gz"):
                    return self.send_gzip_text(fd)
                return self.send_stream(fd, kind, no_cache)
            finally:
                os.close(fd)

        def send_listing(self, fd, newest_first):
            with os.scandir(fd) as entries:
                shown = sorted(((entry.name, entry.is_dir(follow_symlinks=False)) for entry in entries
                                if not entry.name.startswith(".")
                                and (entry.is_dir(follow_symlinks=False) or entry.is_file(follow_symlinks=False))),
                               reverse=newest_first)
            items = "".join(f'<li><a href="{urllib.parse.quote(name)}{"/" if folder else ""}">{html.escape(name)}</a></li>'
                            for name, folder in shown)
            page = f"<!doctype html><meta charset=utf-8><title>runs</title><ul>{items}</ul>".encode()
            self.send_body(200, page, "text/html; charset=utf-8", [("Cache-Control", "no-cache")])

        def send_gzip_text(self, fd):
            """A compressed CSV as text: as it is, Content-Encoding gzip, to a client that takes that;
            decompressed on the fly (to the connection's close) to one that does not."""
            accepts = "gzip" in (self.headers.get("Accept-Encoding") or "").lower()
            if accepts:
                return self.send_stream(fd, "text/plain; charset=utf-8", True, [("Content-Encoding", "gzip")])
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.close_connection = True
            self.end_headers()
            if self.command == "HEAD":
                return
            self.wfile.flush()
            with _GzipReader(open(os.dup(fd), "rb")) as packed:
                while chunk := packed.read(self.CHUNK):
                    self.connection.sendall(chunk)

        def send_stream(self, fd, kind, no_cache, headers=()):
            size = os.fstat(fd).st_size
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(size))
            if no_cache:
                self.send_header("Cache-Control", "no-cache")
            for name, value in headers:
                self.send_header(name, value)
            self.end_headers()
            if self.command == "HEAD":
                return
            self.wfile.flush()
            left = size
            while left:
                chunk = os.read(fd, min(self.CHUNK, left))
                if not chunk:                 # the file shrank since: the answer is short, end it
                    self.close_connection = True
                    return
                self.connection.sendall(chunk)
                left -= len(chunk)

    return DashboardServer((bind, port), Handler, allow_hosts, **limits)


def serve_dashboard(home: Home, bind: str, port: int, allow_hosts=()) -> int:
    """Serve the dashboard until Ctrl-C or SIGTERM."""
    if bind not in LOOPBACK_NAMES:
        warn(f"serving on {bind}: there is no authentication; anyone who can reach it sees the dashboard "
             "(for production use nginx, see DEPLOYMENT.md)")
    try:
        server = make_dashboard_server(home, bind, port, allow_hosts)
    except OSError as exc:
        raise BadInput(f"cannot listen on {bind}:{port}: {exc.strerror or exc}; try --port") from None
    host, real_port = server.server_address[:2]
    shown = "127.0.0.1" if host == "0.0.0.0" else f"[{host}]" if ":" in host else host
    print(f"dashboard: http://{shown}:{real_port}/  (Ctrl-C to stop)", flush=True)
    if bind not in LOOPBACK_NAMES or allow_hosts:
        print(f"answers requests for: {', '.join(sorted(server.allowed_hosts))} (more with --allow-host NAME)",
              flush=True)

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
    two fails; stalled: every page takes a second; missing and forbidden: every page is a fast
    404 or 403 (a variant that broke routing).  The demo's variants switch modes by writing that
    file, as a real experiment edits a config.
    """

    # mode: (seconds each page waits, every how many requests one fails with 503 (0: none), status)
    MODES = {"plain": (0.020, 0, 200), "cached": (0.0, 0, 200), "slow": (0.045, 0, 200), "broken": (0.020, 4, 200),
             "failing": (0.020, 2, 200), "stalled": (1.0, 0, 200), "missing": (0.0, 0, 404),
             "forbidden": (0.0, 0, 403)}

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
                delay, fail_every, status = server.MODES[server.mode()]
                server.count += 1
                if fail_every and server.count % fail_every == 0:
                    self.send_body(503, b"backend unavailable\n")
                    return
                time.sleep(delay)
                if status != 200:
                    self.send_body(status, b"<html><body>no such page</body></html>\n", "text/html; charset=utf-8")
                    return
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


def _probe(command: str, timeout: float = 10):
    return run_command(command, "/", timeout)


def doctor_checks(home: Home, settings: dict):
    """(name, ok, detail, fix command) for each thing the seed's troubleshooting guide names."""
    checks = []

    def check(name, ok, detail, fix=""):
        checks.append((name, bool(ok), detail, fix))

    check("python", sys.version_info >= (3, 11), f"{sys.version.split()[0]} at {sys.executable}",
          "install Python 3.11 or newer")
    var_owner = _owner(home.var) if os.path.isdir(home.var) else "smart"
    smart_py = (f"{'' if var_owner == 'root' else f'sudo -u {var_owner} '}python3 {os.path.abspath(__file__)} "
                f"--home {home.root}")
    owner = _owner(home.root)
    check("home", os.path.isdir(home.root), f"{home.root} owned by {owner}", "sudo deploy/install.sh")
    writable = os.access(home.var, os.W_OK) if os.path.isdir(home.var) else os.access(home.root, os.W_OK)
    check("var writable", writable, f"{home.var} by {_user()}", f"sudo chown -R smart:smart {home.var}")
    check("dashboard page", os.path.isfile(os.path.join(home.www(), "index.html")),
          os.path.join(home.www(), "index.html"), "sudo deploy/install.sh (it installs www/)")
    experiments = []
    try:
        experiments = find_experiments(home.root, [], settings)
        check("experiments", experiments, f"{len(experiments)} found: " + ", ".join(e.id for e in experiments),
              f"add a folder with a meta.json under {os.path.join(home.root, 'experiments')}")
    except BadInput as exc:
        check("experiments", False, str(exc), "fix the file named above")
    systemd = os.path.isdir("/run/systemd/system") and shutil.which("systemctl")
    if systemd:
        enabled = _probe(f"systemctl is-enabled {TIMER_UNIT}").output.strip()
        active = _probe(f"systemctl is-active {TIMER_UNIT}").output.strip()
        check("timer", enabled == "enabled" and active == "active", f"{TIMER_UNIT} {enabled}, {active}",
              f"sudo systemctl enable --now {TIMER_UNIT}")
        result = _probe(f"systemctl show -p Result --value {SERVICE_UNIT}").output.strip()
        check("last service run", result in ("success", ""), f"Result={result}",
              f"journalctl -u {SERVICE_UNIT} -n 50")
    else:
        check("timer", False, "no systemd here: nothing runs smart.py on a schedule",
              f"crontab -u {var_owner} -e, add: */30 * * * * python3 {os.path.abspath(__file__)} --home {home.root} run")
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
    check("nginx", nginx, nginx or "not installed", "sudo apt-get install -y nginx")
    if nginx:
        running = _probe("pgrep -x nginx").ok
        check("nginx running", running, "a master process is running" if running else "no nginx process",
              "sudo systemctl start nginx" if systemd else "sudo nginx")
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
    where = next(path for path in (home.var, home.root, os.path.dirname(home.root) or "/", "/") if os.path.isdir(path))
    free = shutil.disk_usage(where).free
    check("free disk", free >= 500 * 2 ** 20, f"{free / 2 ** 30:.1f} GiB free for var/",
          f"free space, or lower KEEP_RUNS (now {settings['KEEP_RUNS']})")
    for experiment in experiments:
        missing = lacks(experiment)
        check(f"experiment {experiment.id}", True, "applies on this box" if not missing else
              f"does not apply on this box (it needs {', '.join(missing)}); the timer skips it")
        if experiment.target_url and not experiment.measure_sh and not missing:
            answered = probe_target(experiment)
            check(f"target of {experiment.id}", answered.startswith("answered 2") or answered.startswith("answered 3"),
                  f"{experiment.target_url} {answered}",
                  "start the site (the baseline of a run must be healthy), or fix target_url in its meta.json")
    status = collect_status(home)
    state = read_json(home.state)
    if isinstance(state, dict):
        age = min([a for a in (_age_minutes(state.get("updated_at")), _age_minutes(state.get("checked_at")))
                   if a is not None] or [0])
        check("state.json age", age <= 60 or status["running"], f"updated {age:.0f} minutes ago",
              f"systemctl status {TIMER_UNIT}; journalctl -u {SERVICE_UNIT}")
        failed = state.get("status") == "failed" and not state.get("recovered_at")
        check("last run", not failed,
              f"run {state.get('run_id')} {state.get('status')}" + (f": {state.get('reason')}" if state.get("reason") else ""),
              f"{smart_py} status; read var/runs/{state.get('run_id')}/run.log")
    else:
        check("state.json", True, "no run yet (the dashboard shows 'no data yet')")
    for text in status["attention"]:
        if "left applied" in text or "died" in text:
            check("left applied", False, text, f"{smart_py} recover")
        elif "cannot read" in text or "not valid" in text or "not a journal" in text or "expected an object" in text:
            check("var files", False, text, "fix or remove the file named, after checking what is applied")
    return checks


def probe_target(experiment: Experiment) -> str:
    """What the experiment's target answers to one request now: 'answered 200', or why it did not."""
    codes = []
    spec = experiment.measure
    try:
        with open(os.devnull, "w", encoding="utf-8") as sink:
            Prober(experiment.targets()[:1], 0.001, sink, interval=1.0, timeout=min(5.0, spec.get("timeout", 5.0)),
                   on_row=lambda latency, code, *rest: codes.append(code)).run()
    except (BadInput, OSError) as exc:
        return f"could not be probed: {exc}"
    if not codes or codes[0] == 0:
        return "did not answer (down, refused or timed out)"
    return f"answered {codes[0]}"


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
                         timeout=args.timeout, max_in_flight=args.max_in_flight, should_stop=lambda: bool(args.stop),
                         on_row=lambda latency, code, at, url, check: arm.add(latency, code, check=check))
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
    if args.stop:
        raise Interrupted(f"stopped by {args.stop.signal_name}; the {result.rows} rows measured so far are in {args.out}")
    return 0


def cmd_run(args, settings) -> int:
    """run [EXPERIMENT ...]: the experiments in order, each reverted unless kept."""
    home = Home(args.home)
    experiments = find_experiments(home.root, args.experiments, settings)
    if not experiments:
        raise BadInput(f"no experiments under {os.path.join(home.root, 'experiments')}")
    if args.dry_run:
        print(format_plan(experiments, settings, {e.id: configured(e, settings) for e in experiments}))
        return 0
    runner = Runner(home, settings, stop=args.stop)
    return runner.run(experiments) if args.experiments else runner.run_rotation(experiments)


def cmd_recheck(args, settings) -> int:
    """recheck [EXPERIMENT ...]: re-check kept variants now, whatever RECHECK_DAYS says."""
    home = Home(args.home)
    experiments = find_experiments(home.root, args.experiments, settings)
    return Runner(home, settings, stop=args.stop).run_rechecks(experiments, named=bool(args.experiments))


def configured(experiment: Experiment, settings: dict) -> dict:
    """What the experiment's helper says is in effect now for the names it sets (`HELPER get`), or {}
    when it has no helper or the helper cannot tell."""
    if not experiment.helper_names:
        return {}
    result = run_command(experiment.helper_call("get", experiment.helper_names), experiment.path,
                         settings["COMMAND_TIMEOUT_SECONDS"], stdout_only=True)
    if not result.ok:
        return {}
    return dict(line.split(None, 1) for line in result.output.splitlines() if len(line.split(None, 1)) == 2)


def format_plan(experiments, settings, now=None) -> str:
    """What run would do, for --dry-run: experiments, design, variants, commands, durations; with
    `now` (experiment id -> the helper's settings in effect), which variants are A/A trials."""
    now = now or {}
    lines = []
    total = 0.0
    for experiment in experiments:
        schedule = Schedule.of(experiment, settings)
        base, each, warm = schedule.baseline_seconds, schedule.experiment_seconds, schedule.warmup_seconds
        if schedule.design == "switchback":
            pairs = schedule.blocks
            shape = (f"switchback: {pairs} pairs of a {base / pairs:g} s baseline block and a {each / pairs:g} s "
                     f"variant block, each after a {warm:g} s measured warm-up, in random order")
        else:
            shape = (f"sequential: baseline {base:g} s first, then each variant after a "
                     f"{schedule.cooldown_seconds:g} s cool-down for {each:g} s")
        longest = schedule.run_seconds(len(experiment.candidates))
        total += longest
        how = "measure.sh" if experiment.measure_sh else (
            f"built-in prober {experiment.target_url} "
            + (f"concurrency {experiment.measure['concurrency']}" if "concurrency" in experiment.measure else
               f"rate {experiment.measure['rate']}/s" if "rate" in experiment.measure else
               f"every {experiment.interval or 1:g} s"))
        if experiment.measure.get("source") == "access-log":
            how = f"visitors' requests from {settings['ACCESS_LOG']} (else, when too thin, the {how})"
        lines += [f"experiment {experiment.id}: {experiment.description}",
                  f"  folder   {experiment.path}",
                  f"  measure  {how}",
                  f"  design   {shape}",
                  f"  baseline {experiment.baseline['name']}: apply {experiment.apply_command(experiment.baseline) or '(nothing)'}"]
        lacking = lacks(experiment)
        if lacking:
            lines.append(f"  skipped  it does not apply on this box: it needs {', '.join(lacking)}")
        if experiment.sweep is not None:
            lines.append(f"  sweep    {experiment.sweep['name']}: {len(experiment.candidates)} values in ascending order, "
                         "until one is clearly worse than the best so far; the best that passes is kept")
        current = now.get(experiment.id) or {}
        for variant in experiment.candidates:
            same = variant.get("set") and all(current.get(name) == str(value) for name, value in variant["set"].items())
            lines.append(f"  variant  {variant['name']}: apply {experiment.apply_command(variant)}; "
                         f"{schedule.variant_seconds():g} s at most; decide; revert unless kept"
                         + ("; it equals what is configured now (an A/A trial: expect a revert)" if same else ""))
        lines += [f"  revert   {experiment.revert}",
                  f"  decide   {experiment.decider or 'built-in rules'}" + ("; may stop early" if schedule.early_stop else ""),
                  f"  at most  {longest:g} s of measuring plus command time"]
    lines.append(f"dry run: nothing was changed; at most {total:g} s of measuring in all")
    return "\n".join(lines)


def cmd_apply(args, settings) -> int:
    """apply EXPERIMENT VARIANT: apply a known variant, verify it against the baseline, revert on harm."""
    home = Home(args.home)
    experiment = find_experiments(home.root, [args.experiment], settings)[0]
    return Runner(home, settings, stop=args.stop).apply(experiment, args.variant)


def cmd_revert(args, settings) -> int:
    """revert EXPERIMENT: revert its kept variant (the experiment is tried again by the next run)."""
    home = Home(args.home)
    experiment = find_experiments(home.root, [args.experiment], settings)[0]
    code = Runner(home, settings, stop=args.stop).revert_experiment(experiment)
    publish_dashboard(home, recheck_days=settings["RECHECK_DAYS"])
    return code


def cmd_recover(args, settings) -> int:
    """recover: revert what an interrupted run left applied."""
    home = Home(args.home)
    os.makedirs(home.var, exist_ok=True)
    runner = Runner(home, settings, stop=args.stop)
    with HomeLock(home.var):
        entry = runner.recover()
    if entry is None:
        print("nothing to recover: no variant is left applied")
    publish_dashboard(home, recheck_days=settings["RECHECK_DAYS"])
    return 0


def cmd_dashboard(args, settings) -> int:
    """dashboard: rebuild the published files from var/."""
    home = Home(args.home)
    os.makedirs(home.var, exist_ok=True)
    publish_dashboard(home, recheck_days=settings["RECHECK_DAYS"])
    print(f"published {os.path.join(home.var, 'history.json')}")
    return 0


def cmd_demo(args, settings) -> int:
    """demo: the whole loop against a built-in target, then the dashboard."""
    home = Home(args.home if args.home_given else tempfile.mkdtemp(prefix="smart-demo-"))
    os.makedirs(home.root, exist_ok=True)
    target = DemoTarget(os.path.join(home.root, "target", "mode")).start()
    try:
        folder = write_demo_experiment(home.root, target.url, args.seconds)
        print(f"demo home {home.root}; target {target.url}")
        print("trying three variants of the demo site: noop (changes nothing), slow_backend (harmful), "
              "response_cache (helpful)")
        runner = Runner(home, settings)
        code = runner.run([load_experiment(folder)])
        if runner.log.status is None:        # on a terminal the run has shown its table already
            print("\n" + format_verdicts(read_json(home.state, {})))
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
        publish_dashboard(home, recheck_days=settings["RECHECK_DAYS"])
    return serve_dashboard(home, args.bind, args.port, args.allow_host)


def cmd_phone_home(args, settings) -> int:
    """phone-home [RUN_ID]: send a run's result (the latest by default) to the coach; print its advice."""
    home = Home(args.home)
    state = read_json(home.state)
    if args.run_id and (not isinstance(state, dict) or state.get("run_id") != args.run_id):
        state = next((entry for entry in _history(home) if entry.get("run_id") == args.run_id), None)
    if not isinstance(state, dict) or not state.get("run_id"):
        which = f"run {args.run_id}" if args.run_id else "run"
        raise BadInput(f"no {which} to send: neither {home.state} nor {home.history} has it")
    advice = phone_home(state, settings, trend=trend_summary(home, state.get("experiment")))
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
    status = collect_status(Home(args.home), args.runs, recheck_days=settings["RECHECK_DAYS"])
    try:
        status["experiments"] = {e.id: lacks(e) for e in find_experiments(args.home, [], settings)}
    except BadInput as exc:
        status["attention"].append(str(exc))
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
    result = decide_files(args.baseline, args.variant, Thresholds(settings), args.look)
    if result.blocks and args.look is None:
        emit("note: these CSVs carry switchback blocks; a run with EARLY_STOP=yes judged them at its last "
             "look, at a stricter significance level (the fraction in its NAME_decision.log); "
             "decide --look FRACTION judges as that look did", sys.stderr)
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


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise ValueError(text)
    return value


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError(text)
    return value


def build_parser() -> argparse.ArgumentParser:
    """The command line of docs/SPEC.md."""
    common = _Parser(add_help=False)
    common.add_argument("--home", default=argparse.SUPPRESS, help="the home folder (default $SMART_HOME, else beside smart.py)")
    common.add_argument("--config", default=argparse.SUPPRESS, help="settings file (default HOME/smart.conf)")
    common.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS, help="more detail")
    parser = _Parser(prog="smart.py", parents=[common],
                     description="A self-tuning agent for a small web server (docs/SPEC.md).")
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
    decide.add_argument("--look", type=_fraction, metavar="FRACTION",
                        help="judge as a sequential stop's look this share of the way to the horizon (0 to 1]")
    for key, flag in _DECIDE_FLAGS.items():
        decide.add_argument(flag, dest=key, metavar="N",
                            help=f"{SETTINGS[key][2]} (default {SETTINGS[key][0]})".replace("%", "%%"))

    run = command("run", cmd_run, "run experiments (every folder in experiments/ by default)")
    run.add_argument("experiments", nargs="*", metavar="EXPERIMENT", help="folder path or id")
    run.add_argument("--dry-run", action="store_true", help="print the plan and change nothing")
    recheck = command("recheck", cmd_recheck, "re-check kept variants against the baseline now (the timer does it "
                                              "every RECHECK_DAYS)")
    recheck.add_argument("experiments", nargs="*", metavar="EXPERIMENT",
                         help="folder path or id (default: every experiment with a kept variant)")
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
    serve.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                       help="also answer requests for this host name (repeatable); 127.0.0.1, localhost, "
                            "::1 and the --bind address are always answered")
    phone = command("phone-home", cmd_phone_home, "send a run's result to the coach")
    phone.add_argument("run_id", nargs="?")
    demo = command("demo", cmd_demo, "a complete experiment against a built-in server, then the dashboard "
                                     "(in --home DIR if given, else a new temporary folder)")
    demo.add_argument("--seconds", type=float, default=60.0, metavar="S",
                      help="about how long the experiment runs (default 60)")
    demo.add_argument("--no-serve", action="store_true", help="stop after the run")
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


STOPPABLE = {"run", "recheck", "apply", "revert", "recover", "measure"}    # commands that stop cleanly on SIGTERM/SIGINT


def _default_signals() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def main(argv=None) -> int:
    """Parse argv, run the command; the one place that turns errors into messages and exit codes."""
    argv = sys.argv[1:] if argv is None else list(argv)
    verbose = "--verbose" in argv
    early = globals().get("EARLY_SIGNALS")      # set when run as a script (see the top of this file)
    stop = StopFlag()
    restore = stop.install(early or ())
    try:
        stop.check()
        args = build_parser().parse_args(argv)
        if args.command not in STOPPABLE:     # these end on a signal the usual way (serve, demo: Ctrl-C)
            (restore if early is None else _default_signals)()
            restore = list
            stop.check()
        elif early is not None:
            restore = list                    # caught until the process exits: a late signal is no crash
        args.home_given = bool(getattr(args, "home", None) or os.environ.get("SMART_HOME"))
        args.home = resolve_home(args)
        run_as_owner(args.home)
        args.stop = stop
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
    except OSError as exc:        # a fault no check foresaw (a full disk, a file in place of a folder): one line
        where = f"{exc.filename}: " if exc.filename else ""
        emit(f"error: {where}{exc.strerror or exc}", sys.stderr, "error")
        return 1
    finally:
        restore()


if __name__ == "__main__":
    sys.exit(main())
