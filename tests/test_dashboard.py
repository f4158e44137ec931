"""The dashboard: www/index.html in a real headless Chromium, and the routes of smart.make_dashboard_server.

Browser tests need chromium (skipped without it, except under CI=true where they fail); the server
tests use plain HTTP.  Each test gets its own temporary home and a server on a free port; the browser
tests load theirs in one Chromium that their class starts (and the phone-width test in one of its own).
"""

from __future__ import annotations

import fcntl
import html.parser
import http.client
import json
import os
import select
import sys
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import unittest
from datetime import datetime, timedelta, timezone

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from helpers import REPO_ROOT, import_smart

smart = import_smart()

INDEX = os.path.join(REPO_ROOT, "www", "index.html")
CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
BROWSER_TIMEOUT = 60
HOSTILE = '<img src=x onerror="document.body.dataset.pwned=1"><script>document.body.dataset.pwned=2</script>'


def iso(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def variant(name, decision, base_p50, var_p50, improve, ci, p_value, reason, borderline=False, var_errors=0):
    """A state.json variant entry shaped like Trial.try_variant's record."""
    metrics = {"base_n": 300, "base_errors": 1, "base_p50_ms": base_p50, "base_p90_ms": 22.9, "base_p99_ms": 61.0,
               "base_err_pct": 0.333, "var_n": 300, "var_errors": var_errors, "var_p50_ms": var_p50,
               "var_p90_ms": 20.5, "var_p99_ms": 41.9, "var_err_pct": round(var_errors / 3, 3),
               "improve_pct": improve, "improve_ci": ci, "p_value": p_value,
               "err_delta_pct": round(var_errors / 3 - 0.333, 3), "p99_regress_pct": -31.4}
    return {"name": name, "decision": decision, "reason": reason, "borderline": borderline, "metrics": metrics,
            "verdict": {"decision": decision, "reason": reason, "borderline": borderline, "confidence": 0.99}}


def reverted_for_errors_and_tail() -> dict:
    """A variant entry whose verdict failed rules 4 and 5, with the figures behind them."""
    entry = variant("gzip_9", "revert", 17.834, 15.1, 15.3, [11.0, 19.2], 2e-9,
                    "revert: error rate rose 3.33 points, and the rise could be 5.12 (80% bound; at most 1 allowed); "
                    "p99 regressed 41.2% (at most 25% allowed; 9 of 300 requests slower than 76.2 ms, binomial "
                    "against 1% p=0.0009)", var_errors=11)
    entry["verdict"].update(
        failed_rules=["errors", "tail"], err_delta_pct=3.3337, err_rise_bound_pct=5.1204,
        tails=[{"percentile": 99, "regress_pct": 41.2, "bound_ms": 76.2, "above": 9, "p": 0.0009,
                "test": "binomial against 1%"},
               {"percentile": 97.5, "regress_pct": 30.4, "bound_ms": 40.1, "above": 12, "p": 0.0123,
                "test": "Kolmogorov-Smirnov"}],
        outliers={"bound_ms": 488.0, "baseline": 0, "variant": 3, "beyond_slowest": 4, "beyond_p": 0.0061},
        thresholds={"improve_pct": 10.0, "max_err_delta_pct": 1.0, "confidence": 0.99, "min_samples": 30,
                    "max_tail_regress_pct": 25.0})
    return entry


def applied_state(now: datetime, harm: str | None = None) -> dict:
    """state.json after `smart.py apply 001_nginx_workers workers_2`: kept when the check found no harm."""
    reason = (f"revert: applied on request, but {harm}" if harm else
              "keep: applied on request; no harm against the baseline (p50 20.948 -> 20.917 ms, errors +0.00 points)")
    entry = variant("workers_2", "revert" if harm else "keep", 20.948, 20.917, 0.148, [-0.198, 0.493], 0.055301, reason)
    entry["metrics"].update(base_n=120, var_n=120, base_errors=0, var_errors=0, base_err_pct=0.0, var_err_pct=0.0,
                            base_p99_ms=28.462, var_p99_ms=23.272, err_delta_pct=0.0, p99_regress_pct=-18.235)
    entry["verdict"].update(
        decision="revert", failed_rules=["improvement", "significance"], err_delta_pct=0.0, err_rise_bound_pct=None,
        tails=[{"percentile": 99, "regress_pct": -18.235, "bound_ms": 41.035, "above": 0, "p": 1.0,
                "test": "binomial against 1%"}],
        outliers={"bound_ms": 227.696, "baseline": 0, "variant": 0, "beyond_slowest": 0, "beyond_p": 1.0},
        blocks=[], thresholds={"improve_pct": 10.0, "max_err_delta_pct": 1.0, "confidence": 0.99, "min_samples": 30,
                               "max_tail_regress_pct": 25.0})
    return crafted_state(now, experiment="001_nginx_workers", description="nginx worker processes",
                         design="apply", kept_variant=None if harm else "workers_2", variants=[entry],
                         metrics={key: entry["metrics"][key] for key in
                                  ("base_p50_ms", "var_p50_ms", "base_err_pct", "var_err_pct")})


def crafted_state(now: datetime, **changes) -> dict:
    """A finished run of three variants, the last one kept, updated a minute ago."""
    state = {
        "run_id": "20261127T210947", "experiment": "007_open_file_cache",
        "description": "open_file_cache for static assets and PHP includes",
        "kept_variant": "ofc_10000_valid_120s",
        "metrics": {"base_p50_ms": 17.834, "var_p50_ms": 14.912, "base_err_pct": 0.333, "var_err_pct": 0.0},
        "status": "done", "phase": "finished", "started_at": iso(now - timedelta(minutes=24)),
        "finished_at": iso(now - timedelta(minutes=1)), "host": "web-1", "version": smart.__version__,
        "design": "sequential", "current": None, "reason": None, "updated_at": iso(now - timedelta(minutes=1)),
        "variants": [
            variant("ofc_1000", "revert", 17.834, 16.671, 6.521, [1.4, 11.2], 0.0045,
                    "revert: p50 improved only 6.5% (needs a 10% improvement)"),
            variant("ofc_10000", "revert", 17.834, 16.229, 9.0, [4.5, 13.4], 1.6e-6,
                    "revert: p50 improved only 9.0% (needs a 10% improvement)", borderline=True, var_errors=1),
            variant("ofc_10000_valid_120s", "keep", 17.834, 14.912, 16.384, [12.2, 20.4], 3.0e-18,
                    "keep: p50 improved 16.4% (needs 10%), significant (p=3e-18); errors -0.33 points, p99 -31.4%"),
        ],
    }
    state.update(changes)
    return state


def crafted_history(now: datetime, runs: int = 20) -> dict:
    """history.json: one run every 30 minutes, a kept variant every seventh run."""
    entries = []
    for index in range(runs):
        started = now - timedelta(minutes=30 * (runs - index))
        kept = "variant_%d" % index if index % 7 == 3 else None
        entries.append({"run_id": started.strftime("%Y%m%dT%H%M%S"), "experiment": "00%d_exp" % (index % 5),
                        "status": "done", "kept_variant": kept, "started_at": iso(started),
                        "finished_at": iso(started + timedelta(minutes=17)), "reason": None, "design": "sequential",
                        "metrics": {"base_p50_ms": 46.0 - index, "var_p50_ms": 44.0 - index,
                                    "base_err_pct": 0.0, "var_err_pct": 0.0}, "variants": []})
    return {"runs": entries, "updated_at": iso(now)}


# Issue 17's records (re-checks, anomalies, sweeps, the measurement source, history.json's `kept`), in the
# shapes real runs of smart.py wrote: tests/test_adapting.py's scenarios and tests/test_access_log.py's thin
# traffic, run with their var/ kept, the figures and texts copied, the times made relative to now.
ANOMALY_TEXT = ("baseline p50 61 ms is 2.9 x the usual 21.1 ms, outside 12.7-29.6 ms (median +- 4 robust deviations "
                "of the last 5 runs)")
THIN_NOTE = ("the access log is too thin: 0 visitors' requests in the last 300 s (0/s) would give an arm of 2.4 s about "
             "0, fewer than 40 (4 x MIN_SAMPLES): measured with the prober")


def run_id(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y%m%dT%H%M%S")


def anomaly(text: str = ANOMALY_TEXT) -> dict:
    return {"baseline_p50_ms": 60.964, "usual_p50_ms": 21.146, "low_ms": 12.688, "high_ms": 29.604, "runs": 5,
            "ratio": 2.883, "text": text}


def anomaly_state(now: datetime) -> dict:
    """A sequential run of 001_cache whose baseline was 2.9 x the usual: `faster` passed every rule, kept nothing."""
    faster = variant("faster", "revert", 60.964, 5.972, 90.204, [89.048, 91.238], 7.17037e-15,
                     f"revert: the baseline is anomalous ({ANOMALY_TEXT}): a run under an anomaly keeps nothing (the "
                     "rules said keep: p50 improved 90.2% (needs 10%), significant (p=7.17e-15); errors +0.00 points, "
                     "p99 -82.0%)")
    faster["anomalous"] = True
    return crafted_state(now, experiment="001_cache", description="test experiment 001_cache", kept_variant=None,
                         metrics={"base_p50_ms": 60.964, "var_p50_ms": 5.972, "base_err_pct": 0.0, "var_err_pct": 0.0},
                         variants=[faster], baseline_p50_ms=60.964, anomaly=anomaly(),
                         source={"name": "prober", "note": None}, recheck=None, sweep=None)


def recheck_state(now: datetime, outcome: str) -> dict:
    """A re-check of 001_cache's `faster`, kept 8 days ago, that ended `outcome`: confirmed, reverted, or
    inconclusive (under an anomalous baseline, left applied as it was)."""
    first = now - timedelta(days=8)
    if outcome == "confirmed":
        entry = variant("faster", "keep", 47.584, 20.884, 60.721, [52.547, 59.408], 4.47588e-12,
                        "keep: p50 improved 60.7% (needs 10%), significant (p=4.48e-12); errors +0.00 points, p99 -85.1%")
    elif outcome == "reverted":
        entry = variant("faster", "revert", 46.011, 45.905, 0.23, [-0.139, 0.598], 0.0310552,
                        "revert: p50 improved only 0.2% (needs a 10% improvement); not significant at 0.99 confidence "
                        "at 33% of the horizon (p=0.0311, needs <= 4.07e-06)")
    else:
        entry = variant("faster", "keep", 61.412, 6.358, 89.647, [87.608, 91.35], 9.3017e-24,
                        "keep, unconfirmed: the baseline is anomalous (baseline p50 61.4 ms is 2.9 x the usual 21 ms, "
                        "outside 12.6-29.4 ms (median +- 4 robust deviations of the last 5 runs)), so the re-check "
                        "cannot judge it; faster stays as it was and is re-checked on the next run (the rules said keep: "
                        "p50 improved 89.6% (needs 10%), significant (p=9.3e-24); errors +0.00 points, p99 -70.2%)")
        entry["anomalous"] = True
    m = entry["metrics"]
    return crafted_state(now, experiment="001_cache", description="test experiment 001_cache", design="switchback",
                         kept_variant=None if outcome == "reverted" else "faster", variants=[entry],
                         metrics={key: m[key] for key in ("base_p50_ms", "var_p50_ms", "base_err_pct", "var_err_pct")},
                         baseline_p50_ms=m["base_p50_ms"], sweep=None, source={"name": "prober", "note": None},
                         anomaly=anomaly() if outcome == "inconclusive" else None,
                         recheck={"variant": "faster", "kept_at": iso(first), "kept_in": run_id(first - timedelta(minutes=1)),
                                  "confirmed_at": None, "outcome": outcome})


def sweep_state(now: datetime) -> dict:
    """A switchback run of 003_knob's sweep over knob 1-6: knob_4 was no better than knob_3, so the walk stopped
    there and kept knob_3."""
    entries = [
        variant("knob_1", "revert", 31.386, 46.155, -47.056, [-54.655, -39.831], 1.0,
                "revert: p96.9 regressed 37.5% (at most 25% allowed; 31 of 32 requests slower than 37.3 ms, "
                "Kolmogorov-Smirnov p=9.1e-14); p50 got 47.1% slower (needs a 10% improvement); not significant at "
                "0.99 confidence at 33% of the horizon (p=1, needs <= 4.07e-06)"),
        variant("knob_2", "revert", 31.789, 25.59, 19.5, [11.157, 27.06], 6.34024e-09,
                "revert: it passes every rule, but knob_3 improved p50 more (19.5% against 69.5%)"),
        variant("knob_3", "keep", 31.056, 9.589, 69.461, [64.417, 73.207], 1.48481e-08,
                "keep: the best of the sweep's 4 values tried: p50 improved 69.5% (needs 10%), significant "
                "(p=1.48e-08); errors +0.00 points, p99 -5.0%"),
        variant("knob_4", "revert", 31.567, 19.039, 39.373, [37.13, 42.14], 3.30451e-11,
                "revert: it passes every rule, but knob_3 improved p50 more (39.4% against 69.5%)")]
    return crafted_state(now, experiment="003_knob", description=None, design="switchback", kept_variant="knob_3",
                         metrics={"base_p50_ms": 31.056, "var_p50_ms": 9.589, "base_err_pct": 0.0, "var_err_pct": 0.0},
                         variants=entries, baseline_p50_ms=31.338, anomaly=None, recheck=None,
                         source={"name": "prober", "note": None},
                         sweep={"name": "knob", "order": "ascending", "values": [f"knob_{i}" for i in range(1, 7)],
                                "tried": 4, "best": "knob_3",
                                "stopped": "knob_4 improves p50 by 42.1% at most (0.99 interval), less than knob_3 did "
                                           "(69.5%): the walk stops (knob_5, knob_6 not tried)"})


def history_line(state: dict, started: datetime) -> dict:
    """A state's line in history.json (smart.py's HISTORY_KEYS; its variants without their verdicts)."""
    keys = ("run_id", "experiment", "status", "kept_variant", "metrics", "reason", "design", "stopped_early",
            "baseline_p50_ms", "anomaly", "recheck", "sweep", "source")
    line = {key: state.get(key) for key in keys}
    line.update(run_id=run_id(started), started_at=iso(started), finished_at=iso(started + timedelta(minutes=4)),
                variants=[{key: v.get(key) for key in ("name", "decision", "reason", "borderline", "metrics")}
                          for v in state["variants"]])
    return line


def adapting_history(now: datetime) -> dict:
    """history.json: crafted_history's runs, then an anomalous run and the three outcomes of a re-check, with
    history.json's `kept` (smart.py's kept_summary) for 001_cache's faster."""
    history = crafted_history(now - timedelta(hours=3), runs=8)
    for hours, state in ((2.5, anomaly_state(now)), (2, recheck_state(now, "confirmed")),
                         (1.5, recheck_state(now, "inconclusive")), (1, recheck_state(now, "reverted"))):
        history["runs"].append(history_line(state, now - timedelta(hours=hours)))
    first = now - timedelta(days=8)
    history["kept"] = {"001_cache": kept_entry(now, "faster", first, confirmed=now - timedelta(hours=2), rechecks=2)}
    return history


def kept_entry(now: datetime, name: str, since: datetime, confirmed=None, rechecks=0, recheck_days=7.0) -> dict:
    """One experiment's entry in history.json's `kept` (smart.py's kept_summary)."""
    due = (confirmed or since) + timedelta(days=recheck_days)
    return {"variant": name, "since": iso(since), "run_id": run_id(since - timedelta(minutes=1)), "kept": True,
            "age_days": round((now - since).total_seconds() / 86400, 2),
            "confirmed_at": iso(confirmed) if confirmed else None, "rechecks": rechecks,
            "next_recheck": iso(due) if recheck_days > 0 else None, "recheck_off": recheck_days <= 0}


class Dom(html.parser.HTMLParser):
    """A serialized DOM: its tags, the visible text, the text inside each element that has an id, and
    every element with its attributes, text and parent (`elements`, in document order)."""

    VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}

    def __init__(self, markup: str):
        super().__init__(convert_charrefs=True)
        self.tags, self.text, self.by_id, self.open, self.elements = [], [], {}, [], []
        self.feed(markup)
        self.close()
        self.visible = " ".join(" ".join(self.text).split())

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append((tag, attrs))
        if tag in self.VOID:
            return
        parent = self.open[-1] if self.open else None
        node = {"tag": tag, "attrs": attrs, "classes": (attrs.get("class") or "").split(), "parts": [],
                "parent": parent, "quiet": tag in ("script", "style", "title") or "hidden" in attrs,
                "inside": (parent["inside"] | {parent["attrs"].get("id")}) if parent else set()}
        self.elements.append(node)
        self.open.append(node)
        if attrs.get("id"):
            self.by_id.setdefault(attrs["id"], [])

    def handle_endtag(self, tag):
        while self.open:
            if self.open.pop()["tag"] == tag:
                break

    def handle_data(self, data):
        if not any(node["quiet"] for node in self.open):
            self.text.append(data)
        for node in self.open:
            node["parts"].append(data)
            if node["attrs"].get("id"):
                self.by_id[node["attrs"]["id"]].append(data)

    def text_of(self, element_id: str) -> str:
        return " ".join("".join(self.by_id.get(element_id, [])).split())

    def attrs_of(self, element_id: str) -> dict:
        return next((attrs for _, attrs in self.tags if attrs.get("id") == element_id), {})

    @staticmethod
    def text_in(node) -> str:
        return " ".join("".join(node["parts"]).split())

    def find(self, tag: str | None = None, cls: str | None = None, within: str | None = None) -> list:
        """The elements of that tag and class (inside the element with id `within`)."""
        return [node for node in self.elements if (tag is None or node["tag"] == tag)
                and (cls is None or cls in node["classes"]) and (within is None or within in node["inside"])]

    def rows(self, within: str) -> list:
        """The rows of the tables inside `within`, each the list of its cells' (classes, text)."""
        return [[(cell["classes"], self.text_in(cell)) for cell in self.elements
                 if cell["parent"] is row and cell["tag"] in ("td", "th")] for row in self.find("tr", within=within)]


class HomeServer:
    """A temporary home with a var/ and smart's dashboard server on a free port (torn down by cleanups)."""

    def __init__(self, test: unittest.TestCase, state=None, history=None, raw_state: str | None = None):
        self.root = tempfile.mkdtemp(prefix="smart-dash-")
        test.addCleanup(shutil.rmtree, self.root, True)
        self.home = smart.Home(self.root)
        os.makedirs(self.home.runs)
        if raw_state is not None:
            with open(self.home.state, "w", encoding="utf-8") as handle:
                handle.write(raw_state)
        elif state is not None:
            smart.write_json(self.home.state, state)
        if history is not None:
            smart.write_json(os.path.join(self.home.var, "history.json"), history)
        self.server = smart.make_dashboard_server(self.home, "127.0.0.1", 0)
        thread = threading.Thread(target=self.server.serve_forever, name="dashboard", daemon=True)
        thread.start()
        test.addCleanup(thread.join, 10)
        test.addCleanup(self.server.server_close)
        test.addCleanup(self.server.shutdown)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/"

    def get(self, raw_path: str, method: str = "GET"):
        """(status, headers, body) for a path sent exactly as written (no client-side normalization)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request(method, raw_path)
            response = conn.getresponse()
            return response.status, response.headers, response.read()
        finally:
            conn.close()


class DevTools:
    """Headless Chromium driven over the DevTools protocol on a pipe: the DOM a page ends with (dump),
    and the layout at a given viewport width (open).  With --remote-debugging-pipe Chromium reads
    commands on its fd 3 and writes answers and events on its fd 4, each one JSON message ended by a
    NUL byte.  `test` is the test whose assertions the calls make (a shared browser is handed to each
    test in turn); `cleanup` registers its teardown (test.addCleanup unless given)."""

    def __init__(self, test: unittest.TestCase, cleanup=None):
        self.test, self.next_id, self.buffer, self.console = test, 0, b"", []
        cleanup = cleanup or test.addCleanup
        child_reads, self.send_end = os.pipe()
        self.receive_end, child_writes = os.pipe()
        # the child's ends above 4, so that putting them on 3 and 4 cannot clobber one of them
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 5) for fd in (child_reads, child_writes)]
        for fd in (child_reads, child_writes):
            os.close(fd)
        profile = tempfile.mkdtemp(prefix="smart-chromium-")
        cleanup(shutil.rmtree, profile, True)
        wire = "import os, sys; os.dup2(int(sys.argv[1]), 3); os.dup2(int(sys.argv[2]), 4); os.execv(sys.argv[3], sys.argv[3:])"
        command = [sys.executable, "-c", wire, str(high[0]), str(high[1]), CHROMIUM, "--headless",
                   "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                   "--disable-background-networking", "--disable-component-update", "--disable-sync",
                   "--remote-debugging-pipe", f"--user-data-dir={profile}", "about:blank"]
        self.browser = subprocess.Popen(command, pass_fds=high, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        start_new_session=True)
        for fd in high:
            os.close(fd)
        cleanup(self.close)
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.call("Runtime.enable", session=self.session)
        self.call("Log.enable", session=self.session)

    def call(self, method: str, session: str | None = None, **params) -> dict:
        """Send one command and return its result; events that arrive meanwhile are kept in `console`."""
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self.send_end, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + BROWSER_TIMEOUT
        while True:
            while b"\0" not in self.buffer:
                ready, _, _ = select.select([self.receive_end], [], [], max(0.0, deadline - time.monotonic()))
                chunk = os.read(self.receive_end, 1 << 16) if ready else b""
                if not chunk:
                    self.test.fail(f"chromium gave no answer to {method}")
                self.buffer += chunk
            raw, self.buffer = self.buffer.split(b"\0", 1)
            answer = json.loads(raw)
            if answer.get("id") == self.next_id:
                self.test.assertNotIn("error", answer, method)
                return answer["result"]
            if answer.get("method") in ("Runtime.exceptionThrown", "Log.entryAdded"):
                self.console.append(json.dumps(answer["params"]))

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", session=self.session, expression=expression, returnByValue=True)
        self.test.assertNotIn("exceptionDetails", result, expression)
        return result["result"].get("value")

    def dump(self, url: str) -> str:
        """Load url and return its DOM as markup once the page's first refresh() has ended (its `busy`
        flag down: state.json and history.json fetched and drawn; at once when its script never ran).
        What the console said meanwhile is in `console`."""
        self.console = []
        self.call("Page.navigate", session=self.session, url=url)
        ready = "document.readyState === 'complete' && (typeof busy === 'undefined' || !busy)"
        deadline = time.monotonic() + BROWSER_TIMEOUT
        while not self.evaluate(ready):
            if time.monotonic() > deadline:
                self.test.fail(f"the page at {url} did not finish its refresh within {BROWSER_TIMEOUT} s")
            time.sleep(0.02)
        return self.evaluate("document.documentElement.outerHTML")

    def open(self, url: str, width: int, height: int = 844, ready: str = "true"):
        """Load url in a viewport `width` CSS pixels wide (a phone's, for a small width) and wait until the
        expression `ready` holds."""
        self.call("Emulation.setDeviceMetricsOverride", session=self.session, width=width, height=height,
                  deviceScaleFactor=1, mobile=width < 600)
        self.call("Emulation.setScrollbarsHidden", session=self.session, hidden=True)
        self.call("Page.navigate", session=self.session, url=url)
        deadline = time.monotonic() + BROWSER_TIMEOUT
        while not self.evaluate(f"document.readyState === 'complete' && ({ready})"):
            if time.monotonic() > deadline:
                self.test.fail(f"the page at {url} was not ready ({ready}) within {BROWSER_TIMEOUT} s")
            time.sleep(0.05)
        problems = [line for line in self.console if "Content Security Policy" in line or "exceptionDetails" in line]
        self.test.assertEqual(problems, [], "the page threw or its Content-Security-Policy blocked something")

    def close(self):
        if self.browser.poll() is None:
            try:
                os.killpg(self.browser.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.browser.wait()
        for fd in (self.send_end, self.receive_end):
            os.close(fd)


class PageSourceTests(unittest.TestCase):
    """What can be checked on the file itself."""

    def setUp(self):
        with open(INDEX, encoding="utf-8") as handle:
            self.source = handle.read()

    def test_no_external_asset(self):
        self.assertNotRegex(self.source, r'(?i)(src|href)\s*=\s*["\']?(https?:)?//')
        self.assertNotRegex(self.source, r"(?i)@import|url\(")
        self.assertNotRegex(self.source, r'fetch\(\s*["\'`](/|https?:)')   # relative URLs only

    def test_no_html_sinks(self):
        for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
            self.assertFalse(sink in self.source, f"www/index.html uses {sink}")

    def test_fetches_state_and_history_uncached(self):
        self.assertIn('getJSON("state.json")', self.source)
        self.assertIn('getJSON("history.json")', self.source)
        self.assertIn('cache: "no-store"', self.source)


class BrowserTests(unittest.TestCase):
    """The page as a real browser renders it: one headless Chromium for the class (DevTools), each test's
    home served on a port of its own and loaded in it."""

    @classmethod
    def setUpClass(cls):
        if not CHROMIUM:
            if os.environ.get("CI") == "true":
                raise AssertionError("chromium is missing and CI=true: the dashboard tests cannot be skipped")
            raise unittest.SkipTest("chromium is not installed")
        cls.browser = DevTools(unittest.TestCase(), cleanup=cls.addClassCleanup)

    def render(self, page: str = "", **home) -> tuple[str, Dom]:
        """Serve a home and return the DOM Chromium ends with for its page (raw markup and parsed).

        A console message of the Content-Security-Policy (which the server sends) blocking
        anything fails the test.
        """
        site = HomeServer(self, **home)
        self.browser.test = self
        markup = self.browser.dump(site.url + page)
        console = "\n".join(self.browser.console)
        self.assertIn("<main>", markup, f"chromium rendered no page; console:\n{console[-2000:]}")
        violations = [line for line in self.browser.console if "Content Security Policy" in line]
        self.assertEqual(violations, [], "the page does something its Content-Security-Policy blocks")
        return markup, Dom(markup)

    def test_shows_the_figures_of_the_state(self):
        now = datetime.now(timezone.utc)
        _, dom = self.render(state=crafted_state(now), history=crafted_history(now))
        run = dom.text_of("run-body")
        self.assertIn("007_open_file_cache", run)
        self.assertIn("kept ofc_10000_valid_120s", run)
        self.assertIn("17.8 ms", run)                      # baseline p50
        self.assertIn("14.9 ms", run)                      # kept variant's p50
        self.assertIn("p50 −16.4% (faster)", run)          # the p50 change ...
        self.assertIn("−20.4 … −12.2%", run)               # ... with its interval
        self.assertIn("−0.33 pts", run)                    # the error rate's change
        self.assertIn("borderline", dom.text_of("variants-body"))
        for name in ("ofc_1000", "ofc_10000", "ofc_10000_valid_120s"):
            self.assertIn(name, dom.text_of("variants-body"))
        self.assertEqual(dom.text_of("status-pill"), "done")
        self.assertIn("hidden", dom.attrs_of("banner"))    # fresh: no warning
        self.assertIn("hidden", dom.attrs_of("coach"))     # no coach in this state
        self.assertIn("hidden", dom.attrs_of("kept"))      # a history.json without `kept` (before issue 17)
        for absent in ("recheck", "anomaly", "sweep", "source"):
            self.assertEqual(dom.attrs_of(absent), {}, absent)
        self.assertNotRegex(dom.visible, r"re-check|anomal|sweep|measured with")
        hrefs = {attrs.get("href") for tag, attrs in dom.tags if tag == "a"}
        self.assertIn("runs/20261127T210947/", hrefs)
        self.assertIn("runs/20261127T210947/ofc_10000_decision.log", hrefs)
        history = crafted_history(now)["runs"]
        self.assertIn(f"runs/{history[-1]['run_id']}/", hrefs)
        # the chart: one mark per run, the runs that kept a variant as diamonds
        marks = [tag for tag, _ in dom.tags if tag in ("circle", "polygon")]
        self.assertEqual(len(marks), 20)
        self.assertEqual(marks.count("polygon"), sum(1 for r in history if r["kept_variant"]))

    def test_a_state_in_the_original_designs_shape_shows_all_its_figures(self):
        # docs/SPEC.md "var/state.json": the seed's fields, metrics only at the top; once only the baseline p50 showed
        now = datetime.now(timezone.utc)
        seed = {"run_id": "20250121T143022", "experiment": "001_nginx_workers", "kept_variant": "workers_auto",
                "metrics": {"base_p50_ms": 45.2, "var_p50_ms": 38.1, "base_err_pct": 0.0, "var_err_pct": 0.0},
                "updated_at": iso(now)}
        _, dom = self.render(state=seed)
        rows = [[text for _, text in row] for row in dom.rows("run-body")]
        self.assertEqual(rows, [["", "baseline", "workers_auto", "change"],
                                ["p50", "45.2 ms", "38.1 ms", "−15.7% (faster)"],
                                ["errors", "0.00%", "0.00%", "0.00 pts"]])
        self.assertIn("kept workers_auto", dom.text_of("run-body"))
        self.assertIn("p50 −15.7% (faster)", dom.text_of("run-body"))
        self.assertNotRegex(dom.visible, r"re-check|anomal|sweep|measured with")
        # with a variants list whose entries carry no metrics: the kept one's row shows the run's figures
        seed.update(metrics={"base_p50_ms": 45.2, "var_p50_ms": 47.9, "base_err_pct": 0.5, "var_err_pct": 1.75},
                    kept_variant="workers_2",
                    variants=[{"name": "workers_auto", "decision": "revert", "reason": "revert: slower"},
                              {"name": "workers_2", "decision": "keep", "reason": "keep: by the seed's rules"}])
        _, dom = self.render(state=seed)
        rows = [[text for _, text in row] for row in dom.rows("run-body")]
        self.assertEqual(rows[1:], [["p50", "45.2 ms", "47.9 ms", "+6.0% (slower)"],
                                    ["errors", "0.50%", "1.75%", "+1.25 pts"]])
        self.assertEqual(dom.rows("run-body")[2][3][0], ["num", "bad"])
        self.assertIn("keep: by the seed's rules", dom.text_of("run-body"))
        variants = {row[0][1]: [text for _, text in row] for row in dom.rows("variants-body")[1:]}
        self.assertEqual(variants["workers_2"][2:7], ["+6.0% (slower)", "–", "–", "45.2 ms → 47.9 ms", "0.50% → 1.75%"])
        self.assertEqual(variants["workers_auto"][2:7], ["–", "–", "–", "– → –", "– → –"])

    def test_a_variant_applied_on_request_is_no_measured_gain(self):
        # after `smart.py apply`, a big green "kept workers_2" read like a measured win
        now = datetime.now(timezone.utc)
        history = crafted_history(now)
        history["runs"][-1].update(design="apply", kept_variant="workers_2")
        _, dom = self.render(state=applied_state(now), history=history)
        run = dom.text_of("run-body")
        self.assertEqual([(n["classes"], dom.text_in(n)) for n in dom.find(cls="big", within="run-body")],
                         [(["big"], "applied workers_2 on request")])
        self.assertNotIn("kept workers_2", dom.visible)
        self.assertIn("Applied on request (smart.py apply) and verified against a fresh baseline: no harm found.", run)
        self.assertIn("This is no measured gain", run)
        # the verification's figures: both arms, and each check for harm
        self.assertEqual([text for _, text in dom.rows("run-body")[1]], ["p50", "20.9 ms", "20.9 ms", "−0.1% (faster)"])
        self.assertEqual([text for _, text in dom.rows("run-body")[-1]], ["requests", "120", "120", ""])
        checks = dict(zip([dom.text_in(n) for n in dom.find("dt", within="run-body")],
                          [dom.text_in(n) for n in dom.find("dd", within="run-body")]))
        self.assertEqual(checks["p50"], "−0.1% (faster); harm from 10% slower, if significant")
        self.assertEqual(checks["errors"], "no failed request in the variant")
        self.assertEqual(checks["p99"], "−18.2% (faster); 0 of 120 variant requests slower than 41.0 ms "
                                        "(binomial against 1%, p > 0.9999)")
        self.assertIn("slower than 228 ms: 0 variant, 0 baseline requests", checks["outliers"])
        self.assertEqual(dom.rows("variants-body")[1][1][1], "applied: no harm found")
        self.assertEqual([n["classes"] for n in dom.find("span", within="variants-body")
                          if dom.text_in(n) == "applied: no harm found"], [[]])
        # history: an applied run is neutral, not a kept one's green diamond
        recent = dom.find("li", within="history-body")[0]
        self.assertIn("applied workers_2 on request", dom.text_in(recent))
        self.assertEqual([n["classes"] for n in dom.find("span", within="history-body")
                          if dom.text_in(n) == "applied workers_2 on request"], [["applied"]])
        fills = [n["attrs"].get("fill") for n in dom.find("polygon")]
        self.assertEqual(fills[-1], "var(--card)")
        self.assertEqual(set(fills[:-1]), {"var(--good)"})
        self.assertIn("variant applied on request", dom.text_of("history-body"))
        # while it runs: neither kept nor applied yet
        running = applied_state(now)
        running.update(status="running", kept_variant=None, variants=[], metrics=None,
                       current={"variant": "workers_2", "step": "measuring", "ends_at": iso(now + timedelta(minutes=1))})
        _, dom = self.render(state=running)
        self.assertEqual([(n["classes"], dom.text_in(n)) for n in dom.find(cls="big", within="run-body")],
                         [(["big", "dim"], "applying workers_2")])
        # an apply whose check found harm: reverted, in red, with the reason
        _, dom = self.render(state=applied_state(now, harm="p99 regressed 89.2%"))
        self.assertEqual([(n["classes"], dom.text_in(n)) for n in dom.find(cls="big", within="run-body")],
                         [(["big", "bad"], "reverted workers_2")])
        self.assertIn("revert: applied on request, but p99 regressed 89.2%", dom.text_of("run-body"))
        self.assertEqual([n["classes"] for n in dom.find("span", within="variants-body")
                          if dom.text_in(n) == "reverted: harm or failure"], [["bad"]])

    def test_the_checks_for_harm_of_a_variant_reverted_for_errors_and_tail(self):
        now = datetime.now(timezone.utc)
        state = crafted_state(now, kept_variant=None, variants=[reverted_for_errors_and_tail()])
        _, dom = self.render(state=state)
        checks = {dom.text_in(dt): dd for dt, dd in zip(dom.find("dt", within="run-body"), dom.find("dd", within="run-body"))}
        self.assertEqual(list(checks), ["errors", "p99", "p97.5", "outliers"])
        self.assertEqual(dom.text_in(checks["errors"]), "+3.33 pts; the rise could be up to 5.12 pts (at most 1 allowed)")
        self.assertEqual([n["classes"] for n in dom.find("span", within="run-body")
                          if dom.text_in(n).startswith("+3.33 pts; the rise")], [["bad"]])
        self.assertEqual(dom.text_in(checks["p99"]), "+41.2% (slower); 9 of 300 variant requests slower than 76.2 ms "
                                                     "(binomial against 1%, p = 0.0009)")
        self.assertEqual(dom.text_in(checks["p97.5"]), "+30.4% (slower); 12 of 300 variant requests slower than "
                                                       "40.1 ms (Kolmogorov-Smirnov, p = 0.0123)")
        self.assertEqual(dom.text_in(checks["outliers"]), "slower than 488 ms: 3 variant, 0 baseline requests; 4 slower "
                                                          "than the baseline's slowest (p = 0.0061 with no change)")
        self.assertIn("Checks for harm; a tail may be at most 25% slower:", dom.text_of("run-body"))

    def test_p_values_keep_their_digits(self):
        # p = 0.999 once read "p = 1": three significant digits, never rounded to 0 or 1
        now = datetime.now(timezone.utc)
        state = crafted_state(now)
        for entry, p_value in zip(state["variants"], (0.999, 0.0123, 3.0e-18)):
            entry["metrics"]["p_value"] = p_value
        state["variants"].insert(0, variant("ofc_100", "revert", 17.834, 17.8, 0.2, [-1.0, 1.4], 0.99996,
                                            "revert: p50 improved only 0.2% (needs a 10% improvement)"))
        state["variants"].insert(0, variant("ofc_1", "revert", 17.834, 17.9, -0.4, [-1.6, 0.8], 1.0,
                                            "revert: p50 got 0.4% slower (needs a 10% improvement)"))
        state["variants"].insert(0, variant("ofc_10", "revert", 17.834, 17.9, -0.4, [-1.6, 0.8], 0.5,
                                            "revert: p50 got 0.4% slower (needs a 10% improvement)"))
        _, dom = self.render(state=state)
        pvalues = {row[0][1]: row[4][1] for row in dom.rows("variants-body")[1:]}
        self.assertEqual(pvalues, {"ofc_1": "> 0.9999", "ofc_10": "0.5", "ofc_100": "> 0.9999", "ofc_1000": "0.999", "ofc_10000": "0.0123",
                                   "ofc_10000_valid_120s": "< 0.0001"})
        self.assertIn("p < 0.0001", dom.text_of("run-body"))

    def test_one_p50_change_with_one_sign_and_colour(self):
        # A switchback verdict's p50 estimate (within block pairs) said 0.5% faster while the two pooled
        # p50s differ by +0.6%: the page once showed "+0.6%" in red beside "+0.5%" in green.
        now = datetime.now(timezone.utc)
        state = crafted_state(now, kept_variant=None, design="switchback")
        state["variants"] = [variant("gzip_6", "revert", 17.834, 17.94, 0.5, [-1.2, 2.1], 0.21,
                                     "revert: p50 improved only 0.5% (needs a 10% improvement)")]
        state["variants"][0]["verdict"]["blocks"] = [{"block": 1, "base_p50_ms": 17.9, "var_p50_ms": 17.8,
                                                      "variant_first": True}]
        _, dom = self.render(state=state)
        p50_row = dom.rows("run-body")[1]
        self.assertEqual(p50_row[0][1], "p50")
        shown = [(node["classes"], dom.text_in(node)) for node in dom.elements
                 if dom.text_in(node) in ("−0.5% (faster)", "+0.5% (slower)", "+0.6% (slower)", "+0.5%", "+0.6%")
                 and node["tag"] == "span"]
        self.assertEqual(shown, [(["good"], "−0.5% (faster)")] * 3)   # run card table, its summary, the variants table
        self.assertNotIn("+0.6", dom.visible)
        self.assertNotIn("+0.5", dom.visible)
        self.assertIn("− is faster, + is slower", dom.text_of("run-body"))
        self.assertIn("− is faster, + is slower", dom.text_of("variants-body"))
        self.assertIn("within block pairs", dom.text_of("run-body"))
        self.assertEqual(dom.rows("variants-body")[1][3][1], "−2.1 … +1.2%")
        # a slower variant: + and red, everywhere
        state["variants"][0]["metrics"].update(improve_pct=-12.34, improve_ci=[-15.0, -9.5], var_p50_ms=20.03)
        _, dom = self.render(state=state)
        shown = [(node["classes"], dom.text_in(node)) for node in dom.elements
                 if node["tag"] == "span" and dom.text_in(node).endswith("(slower)")]
        self.assertEqual(shown[0], (["bad"], "+12.3% (slower)"))
        self.assertEqual(shown.count((["bad"], "+12.3% (slower)")), 3)
        self.assertNotIn("within block pairs", dom.text_of("run-body"))     # both figures agree: no note

    # -- issue 17: adapting after the first keep --
    def test_a_recheck_run_says_what_it_rechecked_and_how_it_ended(self):
        # a re-check of a kept variant once read as a fresh "kept faster", its outcome nowhere
        now = datetime.now(timezone.utc)
        meanings = {
            "confirmed": "Confirmed: it still meets every rule against the baseline, so it stays applied.",
            "reverted": "Reverted: its advantage is gone (it no longer meets the rules): it was reverted and the "
                        "experiment is reopened.",
            "inconclusive": "Inconclusive: the baseline was anomalous, so the re-check could not judge it: it stays "
                            "applied as it was, unconfirmed, and is re-checked again."}
        colours = {"confirmed": "good", "reverted": "bad", "inconclusive": "warn"}
        when = r"\d{4}-\d\d-\d\d \d\d:\d\d"
        for outcome, meaning in meanings.items():
            with self.subTest(outcome=outcome):
                state = recheck_state(now, outcome)
                if outcome == "confirmed":          # confirmed once before
                    state["recheck"]["confirmed_at"] = iso(now - timedelta(days=1))
                _, dom = self.render(state=state)
                self.assertEqual([(n["classes"], dom.text_in(n)) for n in dom.find(cls="big", within="run-body")],
                                 [(["big", colours[outcome]], f"re-check of faster: {outcome}")])
                last = rf"{when}\." if outcome == "confirmed" else r"never \(its first re-check\)\."
                self.assertRegex(dom.text_of("recheck"),
                                 rf"^A re-check of faster, kept since {when} \(8 days ago\), first kept in run "
                                 rf"{state['recheck']['kept_in']}; last confirmed {last}")
                self.assertTrue(dom.text_of("recheck").endswith(meaning), dom.text_of("recheck"))
                self.assertEqual([n["classes"] for n in dom.find("span", within="recheck") if dom.text_in(n) == meaning],
                                 [[colours[outcome]]])
                self.assertIn(f"runs/{state['recheck']['kept_in']}/", {a.get("href") for t, a in dom.tags if t == "a"})
                self.assertNotIn("kept faster", dom.visible)
        # interrupted: smart.py records "reverted", but no lost advantage
        stopped = recheck_state(now, "reverted")
        stopped.update(status="interrupted", reason="stopped by SIGTERM; faster reverted")
        _, dom = self.render(state=stopped)
        self.assertTrue(dom.text_of("recheck").endswith(
            "Reverted: the re-check did not finish (interrupted; see the reason): it was reverted and the experiment is "
            "reopened."), dom.text_of("recheck"))
        self.assertNotIn("advantage", dom.text_of("run-body"))
        running = recheck_state(now, "confirmed")
        running["recheck"]["outcome"] = None
        running.update(status="running", kept_variant=None, updated_at=iso(now),
                       current={"variant": "faster", "step": "measuring", "ends_at": iso(now + timedelta(minutes=2))})
        _, dom = self.render(state=running)
        self.assertEqual([(n["classes"], dom.text_in(n)) for n in dom.find(cls="big", within="run-body")],
                         [(["big", "dim"], "re-check of faster: in progress")])

    def test_history_marks_rechecks_and_anomalous_runs_apart(self):
        now = datetime.now(timezone.utc)
        _, dom = self.render(state=recheck_state(now, "reverted"), history=adapting_history(now))
        # the chart: a square per re-check in its outcome's colour, a dashed ring around each anomalous run
        self.assertEqual([(n["attrs"]["class"], n["attrs"]["fill"]) for n in dom.find("rect", within="history-body")],
                         [("recheck", "var(--good)"), ("recheck", "var(--warn)"), ("recheck", "var(--bad)")])
        self.assertEqual(len(dom.find("circle", cls="anomaly", within="history-body")), 2)
        self.assertEqual(len(dom.find("polygon", within="history-body")), 1)        # crafted_history's one keep
        legend = dom.text_in(dom.find(cls="legend", within="history-body")[0])
        self.assertIn("■■■ re-check of a kept variant: confirmed, reverted, inconclusive", legend)
        self.assertIn("◌ anomalous baseline: the run kept nothing new", legend)
        recent = [dom.text_in(n) for n in dom.find("li", within="history-body")][:4]
        self.assertIn("001_cache re-check of faster: reverted · p50 46.0 → 45.9 ms", recent[0])
        self.assertIn("001_cache re-check of faster: inconclusive anomaly · p50", recent[1])
        self.assertIn("001_cache re-check of faster: confirmed · p50", recent[2])
        self.assertIn("001_cache nothing kept anomaly · p50", recent[3])
        self.assertEqual([(n["classes"], dom.text_in(n)) for n in dom.find("span", within="history-body")
                          if dom.text_in(n).startswith("re-check of faster")],
                         [(["bad"], "re-check of faster: reverted"), (["warn"], "re-check of faster: inconclusive"),
                          (["good"], "re-check of faster: confirmed")])
        # without a re-check or an anomaly in the history, no legend for them
        _, dom = self.render(state=crafted_state(now), history=crafted_history(now))
        self.assertNotIn("re-check", dom.text_of("history-body"))
        self.assertNotIn("anomalous", dom.text_of("history-body"))

    def test_kept_variants_show_their_age_confirmation_and_next_recheck(self):
        now = datetime.now(timezone.utc)
        history = crafted_history(now)
        history["kept"] = {
            "001_cache": kept_entry(now, "faster", now - timedelta(days=15), confirmed=now - timedelta(days=1), rechecks=2),
            "003_knob": kept_entry(now, "knob_3", now - timedelta(hours=5)),
            "005_gzip": kept_entry(now, "gzip_6", now - timedelta(days=9), rechecks=1),   # inconclusive, due again
            "007_open_file_cache": kept_entry(now, "ofc_10000", now - timedelta(days=40), recheck_days=0)}
        _, dom = self.render(state=crafted_state(now), history=history)
        self.assertNotIn("hidden", dom.attrs_of("kept"))
        entries = {}
        for entry in dom.find("div", cls="kept-entry"):
            below = [n for n in dom.elements if n["parent"] is entry or (n["parent"] and n["parent"]["parent"] is entry)]
            entries[dom.text_in(below[0])] = dict(zip([dom.text_in(n) for n in below if n["tag"] == "dt"],
                                                      [dom.text_in(n) for n in below if n["tag"] == "dd"]))
        self.assertEqual(list(entries), ["001_cache: faster", "003_knob: knob_3", "005_gzip: gzip_6",
                                         "007_open_file_cache: ofc_10000"])
        when, run = r"\d{4}-\d\d-\d\d \d\d:\d\d", r"\d{8}T\d{6}"
        for entry in entries.values():
            self.assertEqual(list(entry), ["kept since", "last confirmed", "re-checks", "next re-check"])
        cache, knob, gzip, ofc = entries.values()
        self.assertRegex(cache["kept since"], rf"^{when} \(15 days ago\), first kept in run {run}$")
        self.assertRegex(cache["last confirmed"], rf"^{when} \(by a re-check\)$")
        self.assertEqual(cache["re-checks"], "2")
        self.assertRegex(cache["next re-check"], rf"^{when} \(in 6 days\)$")
        self.assertRegex(knob["kept since"], rf"^{when} \(5 h 0 min ago\), first kept in run {run}$")
        self.assertEqual((knob["last confirmed"], knob["re-checks"]), ("never re-checked", "0"))
        self.assertRegex(knob["next re-check"], rf"^{when} \(in 6 days\)$")
        self.assertEqual((gzip["last confirmed"], gzip["re-checks"]), ("never: its re-checks were inconclusive", "1"))
        self.assertRegex(gzip["next re-check"], rf"^{when} \(due: at the next timer run\)$")
        self.assertRegex(ofc["kept since"], r"\(40 days ago\)")
        self.assertEqual(ofc["next re-check"], "never: RECHECK_DAYS=0")
        self.assertIn(f"runs/{history['kept']['003_knob']['run_id']}/", {a.get("href") for t, a in dom.tags if t == "a"})
        history["kept"] = {}
        _, dom = self.render(state=crafted_state(now), history=history)
        self.assertEqual(dom.text_of("kept-body"), "nothing kept: every experiment is on its baseline")

    def test_an_anomalous_baseline_warns_that_the_run_kept_nothing(self):
        now = datetime.now(timezone.utc)
        history = crafted_history(now, runs=6)
        history["runs"].append(history_line(anomaly_state(now), now - timedelta(minutes=5)))
        _, dom = self.render(state=anomaly_state(now), history=history)
        self.assertEqual(dom.text_of("anomaly"), f"Anomalous baseline: {ANOMALY_TEXT}. This run kept nothing: a run "
                                                 "under an anomaly keeps nothing, whatever its figures said. The box is "
                                                 "not in its usual state.")
        self.assertEqual(dom.attrs_of("anomaly").get("class"), "alert")
        self.assertEqual([(n["classes"], dom.text_in(n)) for n in dom.find(cls="big", within="run-body")],
                         [(["big", "dim"], "nothing kept")])
        # the variant whose keep the anomaly turned into a revert is flagged, in the table and on the card
        self.assertEqual(dom.rows("variants-body")[1][1][1], "revert anomalous baseline")
        self.assertEqual([n["classes"] for n in dom.find("span", within="variants-body")
                          if dom.text_in(n) == "anomalous baseline"], [["badge", "warn"]])
        self.assertIn("p < 0.0001 · revert anomalous baseline", dom.text_of("run-body"))
        # the history: a dashed ring around the run, a legend entry, a badge in the list
        self.assertEqual(len(dom.find("circle", cls="anomaly", within="history-body")), 1)
        self.assertIn("anomalous baseline: the run kept nothing", dom.text_of("history-body"))
        self.assertIn("001_cache nothing kept anomaly", dom.text_in(dom.find("li", within="history-body")[0]))
        # smart.py apply records an anomaly too, but judges harm only: the page does not say it kept nothing
        applied = applied_state(now)
        applied["anomaly"] = anomaly()
        _, dom = self.render(state=applied)
        self.assertEqual(dom.text_of("anomaly"), f"Anomalous baseline: {ANOMALY_TEXT}. smart.py apply checks for harm "
                                                 "only: the anomaly did not change its decision.")

    def test_the_source_the_verdicts_were_measured_with(self):
        now = datetime.now(timezone.utc)
        for source, shown in (({"name": "access-log", "note": None}, "measured with: visitors' requests (access log)"),
                              ({"name": "measure.sh", "note": None}, "measured with: measure.sh"),
                              ({"name": "prober", "note": THIN_NOTE}, "measured with: prober")):
            with self.subTest(source=source["name"]):
                _, dom = self.render(state=crafted_state(now, source=source))
                self.assertEqual(dom.text_of("source"), shown)
                notes = [n["classes"] for n in dom.find("p", within="run-body") if dom.text_in(n) == THIN_NOTE]
                self.assertEqual(notes, [["reason", "warn"]] if source["note"] else [])

    def test_a_sweep_shows_its_walk_the_best_and_why_it_stopped(self):
        now = datetime.now(timezone.utc)
        state = sweep_state(now)
        history = crafted_history(now, runs=4)
        history["runs"].append(history_line(state, now - timedelta(minutes=20)))
        _, dom = self.render(state=state, history=history)
        sweep = dom.text_of("sweep")
        self.assertIn("sweep knob: a line search over its values in ascending order, 4 of 6 tried; best: knob_3", sweep)
        self.assertIn("stopped: knob_4 improves p50 by 42.1% at most (0.99 interval), less than knob_3 did (69.5%): the "
                      "walk stops (knob_5, knob_6 not tried)", sweep)
        self.assertEqual([(dom.text_in(n), n["classes"][2:]) for n in dom.find(cls="chip", within="sweep")],
                         [("knob_1", []), ("knob_2", []), ("knob_3", ["best"]), ("knob_4", []), ("knob_5", ["untried"]),
                          ("knob_6", ["untried"])])
        self.assertIn("green: the best value; dashed: not tried", sweep)
        self.assertEqual(dom.find("b", within="sweep")[-1]["classes"], ["mono", "good"])
        # the chart plots a run's own baseline p50 (the anomaly's figure), not its headline variant's
        self.assertIn("003_knob: baseline p50 31.3 ms, kept knob_3", dom.text_in(dom.find("title", within="history-body")[-1]))
        # a walk to the end: every value tried, none dashed
        state["sweep"].update(tried=6, stopped=None)
        _, dom = self.render(state=state)
        self.assertIn("6 of 6 tried; best: knob_3", dom.text_of("sweep"))
        self.assertIn("every value tried", dom.text_of("sweep"))
        self.assertEqual([n for n in dom.find(cls="untried", within="sweep")], [])

    LAYOUT = """(() => {
      const vw = document.documentElement.clientWidth, box = e => e.getBoundingClientRect();
      return {
        width: vw, page_overflow: document.documentElement.scrollWidth - vw,
        beyond: [...document.querySelectorAll("#now *, #kept *, #run *, #variants *, #history .legend *")].filter(e => box(e).right > vw + 0.5).map(e => e.tagName + "." + e.className),
        hidden_sideways: [...document.querySelectorAll(".scroll")].map(e => e.scrollWidth - e.clientWidth),
        card: box(document.getElementById("variants-body")).width,
        reasons: [...document.querySelectorAll("#variants td.reason")].map(td => ({
          start: td.textContent.slice(0, 30), width: box(td).width, left: box(td).left, right: box(td).right,
          lines: box(td).height / parseFloat(getComputedStyle(td).lineHeight), overflow: td.scrollWidth - td.clientWidth}))};
    })()"""

    def test_long_reasons_wrap_and_stay_readable_on_a_phone(self):
        now = datetime.now(timezone.utc)
        state = crafted_state(now, design="switchback", kept_variant=None)
        errors = reverted_for_errors_and_tail()
        tail = variant("http2_push", "revert", 17.834, 38.9, -118.83, [-119.8, -117.8], 0.9999996,
                       "revert: p100 regressed 112.6% (at most 25% allowed; 40 of 40 requests slower than 22.1 ms, "
                       "Kolmogorov-Smirnov p=4.2e-18); p50 got 118.8% slower (needs a 10% improvement); not "
                       "significant at 0.99 confidence at 33% of the horizon (p=1, needs <= 4.07e-06)")
        tail["blocks"] = [{"index": i, "arm": ("baseline", "variant")[i % 2], "p50_ms": 17.5 + i} for i in range(12)]
        broken = variant("brotli_11", "revert", None, None, None, None, None,
                         "revert: apply of brotli_11 exited 1: nginx: [emerg] unknown directive "
                         "/etc/nginx/conf.d/compression-brotli-level-eleven-with-static-precompressed-assets.conf:12")
        broken["metrics"] = None
        state["variants"] = [errors, tail, broken] + state["variants"]
        # issue 17's parts at their longest: a re-check of a long-named variant under an anomaly, a sweep of
        # long names that stopped, a note on the source, kept variants with long names
        long_name = "open_file_cache_max_10000_inactive_120s_valid_60s_errors_on"
        state.update(recheck={"variant": long_name, "kept_at": iso(now - timedelta(days=8)),
                              "kept_in": "20261119T101500", "confirmed_at": None, "outcome": "inconclusive"},
                     anomaly=anomaly("baseline p50 61 ms is 2.9 x the usual 21.1 ms, outside 12.7-29.6 ms (median +- 4 "
                                     "robust deviations of the last 10 runs); /var/www/html/wp-content/cache/"
                                     "supercache/example.org/index-https.html was missing"),
                     source={"name": "prober", "note": THIN_NOTE.replace("the access log", "/var/log/nginx/smart-timing-example-org-with-a-long-name.log")},
                     sweep={"name": "fastcgi_buffers_count", "order": "ascending", "tried": 5, "best": None,
                            "values": [f"fastcgi_buffers_count_{2 ** i}_with_size_{4 * 2 ** i}k" for i in range(8)],
                            "stopped": "fastcgi_buffers_count_16_with_size_64k did harm or failed (p99 regressed 41.2% "
                                       "(at most 25% allowed; 9 of 300 requests slower than 76.2 ms, binomial against "
                                       "1% p=0.0009)): the walk stops (fastcgi_buffers_count_32_with_size_128k, "
                                       "fastcgi_buffers_count_64_with_size_256k, fastcgi_buffers_count_128_with_size_512k "
                                       "not tried)"})
        history = adapting_history(now)
        history["kept"].update({"009_fastcgi_buffers_with_a_long_experiment_name": kept_entry(
            now, long_name, now - timedelta(days=3)), "010_off": kept_entry(now, "x", now, recheck_days=0)})
        site = HomeServer(self, state=state, history=history)
        browser = DevTools(self)
        for width in (390, 800, 1100, 1200):
            browser.open(site.url, width, ready="document.querySelector('#variants-body table') !== null")
            layout = browser.evaluate(self.LAYOUT)
            self.assertEqual(layout["width"], width)
            self.assertLessEqual(layout["page_overflow"], 0, f"{width} px: the page scrolls sideways")
            self.assertEqual(layout["beyond"], [], f"{width} px: elements reach past the viewport")
            self.assertTrue(all(x <= 0 for x in layout["hidden_sideways"]),
                            f"{width} px: a table is wider than its card {layout['hidden_sideways']}")
            self.assertEqual(len(layout["reasons"]), 6)
            for reason in layout["reasons"]:
                self.assertLessEqual(reason["overflow"], 0, f"{width} px: {reason}")
                self.assertGreaterEqual(reason["left"], 0, f"{width} px: {reason}")
                self.assertLessEqual(reason["right"], width, f"{width} px: {reason}")
                # narrower than the eight columns need (a phone), a reason has the card's whole width;
                # on a desktop a column of its own
                self.assertGreaterEqual(reason["width"], 0.9 * layout["card"] if width < 1100 else 250,
                                        f"{width} px: {reason}")
            longest = next(r for r in layout["reasons"] if r["start"].startswith("revert: p100 regressed"))
            self.assertGreaterEqual(longest["lines"], 5 if width < 600 else 2, f"{width} px: the reason does not wrap")

    def test_hostile_strings_stay_text(self):
        now = datetime.now(timezone.utc)
        state = crafted_state(now, description=HOSTILE, coach={
            "advice": HOSTILE, "next_variant": HOSTILE, "confidence": 0.8, "coach": HOSTILE, "at": iso(now)})
        state["variants"][0]["reason"] = "revert: " + HOSTILE
        state["variants"][1]["name"] = '"><img src=x onerror=alert(1)>'
        state["variants"][1]["stopped_early"] = HOSTILE
        state["variants"][1]["blocks"] = [{"index": HOSTILE, "arm": HOSTILE, "p50_ms": 12.5}]
        state.update(recheck={"variant": HOSTILE, "kept_at": HOSTILE, "kept_in": HOSTILE, "confirmed_at": HOSTILE,
                              "outcome": HOSTILE},
                     anomaly=anomaly(HOSTILE), source={"name": HOSTILE, "note": HOSTILE},
                     sweep={"name": HOSTILE, "order": HOSTILE, "values": [HOSTILE], "tried": 1, "best": HOSTILE,
                            "stopped": HOSTILE})
        state["variants"][2]["anomalous"] = True
        history = crafted_history(now)
        history["runs"][-1].update(experiment=HOSTILE, run_id='x"><script>alert(1)</script>', kept_variant=HOSTILE)
        history["runs"][-2].update(recheck={"variant": HOSTILE, "outcome": HOSTILE}, anomaly={"text": HOSTILE})
        history["kept"] = {HOSTILE: {"variant": HOSTILE, "since": HOSTILE, "run_id": HOSTILE, "confirmed_at": HOSTILE,
                                     "rechecks": HOSTILE, "next_recheck": HOSTILE, "recheck_off": False}}
        markup, dom = self.render(state=state, history=history)
        self.assertTrue("&lt;img" in markup, "the hostile <img> is not in the DOM as escaped text")
        self.assertTrue("&lt;script&gt;" in markup, "the hostile <script> is not in the DOM as escaped text")
        self.assertFalse('<img src="x"' in markup, "a hostile string became an <img> element")
        self.assertFalse("data-pwned=" in markup, "a hostile string ran script")
        self.assertEqual([tag for tag, _ in dom.tags if tag == "img"], [])
        self.assertEqual(len([tag for tag, _ in dom.tags if tag == "script"]), 1)     # the page's own
        self.assertIn('revert: <img src=x onerror="document.body.dataset.pwned=1">', dom.text_of("variants-body"))
        self.assertIn("<script>document.body.dataset.pwned=2</script>", dom.text_of("coach-body"))
        for part in ("recheck", "anomaly", "sweep", "source", "kept-body"):
            self.assertIn('<img src=x onerror="document.body.dataset.pwned=1">', dom.text_of(part), part)
        self.assertNotIn("hidden", dom.attrs_of("coach"))

    def test_stale_state_warns(self):
        now = datetime.now(timezone.utc)
        state = crafted_state(now, updated_at=iso(now - timedelta(hours=2)))
        _, dom = self.render(state=state, history=crafted_history(now))
        self.assertNotIn("hidden", dom.attrs_of("banner"))
        self.assertIn("Stale", dom.text_of("banner"))
        self.assertIn("2 h", dom.text_of("banner"))

    def test_a_recent_check_is_not_stale(self):
        now = datetime.now(timezone.utc)
        state = crafted_state(now, updated_at=iso(now - timedelta(hours=2)), checked_at=iso(now - timedelta(minutes=3)))
        _, dom = self.render(state=state)
        self.assertIn("hidden", dom.attrs_of("banner"))

    def test_running_state_shows_the_variant_under_test(self):
        now = datetime.now(timezone.utc)
        state = crafted_state(now, status="running", phase="measuring ofc_10000_valid_120s", kept_variant=None,
                              finished_at=None, updated_at=iso(now),
                              current={"variant": "ofc_10000_valid_120s", "step": "measuring", "block": 3,
                                       "ends_at": iso(now + timedelta(minutes=4))})
        state["variants"] = state["variants"][:2]
        _, dom = self.render(state=state, history=crafted_history(now))
        text = dom.text_of("now-body")
        self.assertIn("ofc_10000_valid_120s · measuring (block 3)", text)
        self.assertRegex(dom.text_of("time-left"), r"^[34]:\d\d$")
        self.assertIn("nothing kept yet", dom.text_of("run-body"))
        self.assertIn("hidden", dom.attrs_of("banner"))

    def test_running_state_that_went_silent_warns(self):
        now = datetime.now(timezone.utc)
        state = crafted_state(now, status="running", updated_at=iso(now - timedelta(hours=1)),
                              current={"variant": "ofc_1000", "step": "measuring",
                                       "ends_at": iso(now - timedelta(minutes=55))})
        _, dom = self.render(state=state)
        self.assertIn("Stale", dom.text_of("banner"))
        self.assertIn("recover", dom.text_of("banner"))

    def test_coach_blocks_and_early_stop_render_when_present(self):
        now = datetime.now(timezone.utc)
        state = crafted_state(now, stopped_early="the error rate passed 5% in block 3", coach={
            "advice": "Leave open_file_cache as it is.", "next_variant": "workers_auto", "confidence": 0.85,
            "coach": "coach.example.net", "at": iso(now)})
        state["variants"][1]["blocks"] = [{"index": i, "arm": ("baseline", "variant")[i % 2], "p50_ms": 17.5 + i}
                                          for i in range(6)]
        _, dom = self.render(state=state)
        coach = dom.text_of("coach-body")
        self.assertIn("Leave open_file_cache as it is.", coach)
        self.assertIn("workers_auto", coach)
        self.assertIn("85%", coach)
        chips = [node for node in dom.find(cls="block") if "blocks" in node["parent"]["classes"]]
        self.assertEqual([" ".join(chip["classes"]) for chip in chips], ["block baseline", "block variant"] * 3)
        self.assertEqual([dom.text_in(chip) for chip in chips], ["17.5", "18.5", "19.5", "20.5", "21.5", "22.5"])
        # the legend says which colour is which arm and what the number is
        legend = dom.find(within="blocks-legend")
        self.assertEqual([(" ".join(n["classes"]), dom.text_in(n)) for n in legend if "block" in n["classes"]],
                         [("block baseline", "p50"), ("block variant", "p50")])
        self.assertIn("p50 a baseline block", dom.text_of("blocks-legend"))
        self.assertIn("p50 a variant block", dom.text_of("blocks-legend"))
        self.assertIn("the number is the block's p50 in ms", dom.text_of("blocks-legend"))
        self.assertIn("stopped early: the error rate passed 5% in block 3", dom.text_of("run-body"))
        _, dom = self.render(state=crafted_state(now))            # no strip: no legend for one
        self.assertEqual(dom.attrs_of("blocks-legend"), {})

    def test_odd_shapes_do_not_blank_the_page(self):
        now = datetime.now(timezone.utc)
        state = {"status": "done", "kept_variant": None, "updated_at": iso(now), "current": 7, "coach": "text",
                 "metrics": "n/a", "variants": [{"name": 5, "metrics": {"improve_ci": "x", "p_value": "1",
                                                                        "base_p50_ms": None}}, "junk", None]}
        history = {"runs": [{"run_id": 1, "metrics": {"base_p50_ms": "12"}}, "junk", {"started_at": 5}]}
        _, dom = self.render(state=state, history=history)
        self.assertEqual(dom.text_of("status-pill"), "done")
        self.assertIn("hidden", dom.attrs_of("banner"))
        self.assertIn("nothing kept", dom.text_of("run-body"))
        self.assertIn("5", dom.text_of("variants-body"))
        # issue 17's parts in odd shapes
        state.update(recheck={"variant": 7, "outcome": 9}, anomaly={"text": None}, sweep={"values": "x", "tried": "3"},
                     source={"name": 5})
        history["runs"].append({"recheck": "x", "anomaly": [], "baseline_p50_ms": "9"})
        history["kept"] = {"e": "junk", "f": {"since": 5, "rechecks": "2", "next_recheck": [], "age_days": "3"}}
        _, dom = self.render(state=state, history=history)
        self.assertIn("hidden", dom.attrs_of("banner"))
        self.assertIn("re-check of 7: not finished", dom.text_of("run-body"))
        self.assertIn("f: kept since", dom.text_of("kept-body"))

    def test_fleet_page_runs_under_the_policy(self):
        # www/fleet.html is served from www/ too; without a fleet.json beside it, it says so.
        _, dom = self.render("fleet.html")
        self.assertIn("No data yet", dom.text_of("banner"))

    def test_missing_state_says_no_data_yet(self):
        _, dom = self.render()
        self.assertNotIn("hidden", dom.attrs_of("banner"))
        self.assertIn("no data yet", dom.text_of("banner").lower())

    def test_invalid_state_warns(self):
        _, dom = self.render(raw_state='{"run_id": "20261127T2109')
        self.assertIn("not valid JSON", dom.text_of("banner"))
        self.assertEqual(dom.attrs_of("banner").get("data-kind"), "error")


class ServerTests(unittest.TestCase):
    """smart's dashboard server: what it serves, with which headers, and what it refuses."""

    SECRET = "SECRET-7f3a"

    def setUp(self):
        now = datetime.now(timezone.utc)
        self.site = HomeServer(self, state=crafted_state(now, host=self.SECRET), history=crafted_history(now))
        root = self.site.root
        with open(os.path.join(root, "smart.conf"), "w", encoding="utf-8") as handle:
            handle.write(f"PHONE_HOME_TOKEN={self.SECRET}\n")
        self.run_dir = os.path.join(self.site.home.runs, "20261127T210947")
        os.makedirs(self.run_dir)
        with open(os.path.join(self.run_dir, "baseline.csv"), "w", encoding="utf-8") as handle:
            handle.write("timestamp,latency_ms,response_code\n2026-11-27T21:10:00.000Z,17.8,200\n")
        os.makedirs(os.path.join(self.site.home.runs, "20261127T203951"))
        outside = tempfile.mkdtemp(prefix="smart-outside-")
        self.addCleanup(shutil.rmtree, outside, True)
        with open(os.path.join(outside, "secret.txt"), "w", encoding="utf-8") as handle:
            handle.write(self.SECRET)
        os.symlink(outside, os.path.join(self.site.home.runs, "escape"))
        os.symlink(os.path.join(outside, "secret.txt"), os.path.join(self.run_dir, "leak.csv"))
        os.symlink(os.path.join(root, "smart.conf"), os.path.join(self.run_dir, "conf.log"))

    def assertRefused(self, path):
        status, _, body = self.site.get(path)
        self.assertIn(status, (403, 404), path)
        self.assertNotIn(self.SECRET.encode(), body, path)
        self.assertNotIn(b"root:", body, path)

    def test_state_and_history_are_not_cached(self):
        for path in ("/state.json", "/history.json"):
            status, headers, body = self.site.get(path)
            self.assertEqual(status, 200, path)
            self.assertEqual(headers["Cache-Control"], "no-cache", path)
            self.assertEqual(headers["Content-Type"], "application/json", path)
            json.loads(body)

    def test_index_is_served_at_root(self):
        status, headers, body = self.site.get("/")
        self.assertEqual(status, 200)
        self.assertTrue(headers["Content-Type"].startswith("text/html"))
        with open(INDEX, "rb") as handle:
            self.assertEqual(body, handle.read())

    def test_traversal_out_of_runs_is_refused(self):
        for path in ("/runs/../state.json", "/runs/%2e%2e/smart.conf", "/runs/..%2fsmart.conf",
                     "/runs/%2E%2E/%2E%2E/smart.conf", "/runs/..%2f..%2fsmart.conf", "/runs/..\\smart.conf",
                     "/runs/20261127T210947/../../../smart.conf", "/runs/%00"):
            self.assertRefused(path)

    def test_symlinks_out_of_the_home_are_refused(self):
        for path in ("/runs/escape/secret.txt", "/runs/escape/", "/runs/20261127T210947/leak.csv",
                     "/runs/20261127T210947/conf.log"):
            self.assertRefused(path)

    def test_runs_lists_run_folders(self):
        status, headers, body = self.site.get("/runs/")
        self.assertEqual(status, 200)
        self.assertTrue(headers["Content-Type"].startswith("text/html"))
        page = body.decode()
        self.assertIn('href="20261127T210947/"', page)
        self.assertIn('href="20261127T203951/"', page)
        self.assertLess(page.index("20261127T210947"), page.index("20261127T203951"))   # newest first
        status, headers, _ = self.site.get("/runs")
        self.assertEqual(status, 301)
        self.assertEqual(headers["Location"], "/runs/")
        status, _, body = self.site.get("/runs/20261127T210947/")
        self.assertEqual(status, 200)
        self.assertIn(b'href="baseline.csv"', body)

    def test_csv_is_served_as_text(self):
        status, headers, body = self.site.get("/runs/20261127T210947/baseline.csv")
        self.assertEqual(status, 200)
        self.assertEqual(headers["Content-Type"], "text/plain; charset=utf-8")
        self.assertTrue(body.startswith(b"timestamp,latency_ms,response_code\n"))

    def test_paths_outside_www_are_not_found(self):
        for path in ("/etc/passwd", "/../../../../etc/passwd", "/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
                     "/..%2f..%2f..%2fetc%2fpasswd", "//etc/passwd", "/smart.conf", "/var/state.json",
                     "/smart.py", "/www/index.html", "/index.html/../../smart.conf"):
            status, _, body = self.site.get(path)
            self.assertEqual(status, 404, path)
            self.assertNotIn(self.SECRET.encode(), body, path)
            self.assertNotIn(b"root:", body, path)


if __name__ == "__main__":
    unittest.main()
