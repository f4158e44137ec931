"""Judging from real traffic (issue 17): the access-log measurement source.

A real nginx (tests/test_prober_nginx.py's, from a temporary folder) proxies to a DemoTarget
whose page time the variants switch, and writes the timing log the shipped configuration writes
(`$msec $request_time $status "$request_method $request_uri" ...`, smart.py's own probes left
out by their User-Agent).  A Visitors thread replays requests at a steady rate, as a site's
visitors would.  The same switchback experiment is then judged from the prober and from the log:
the verdicts must agree on a clear gain and on a no-op (the gain and the no-op side by side, each in
a home of its own with its own target, nginx and visitors).

AccessLogReading covers the reader alone: the label of each request, a 499, a rotated or
truncated log, the thin-traffic check and the fallback to the prober.
"""

from __future__ import annotations

import concurrent.futures
import http.client
import os
import shutil
import sys
import tempfile
import threading
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from helpers import import_smart, run_cli  # noqa: E402
from test_adapting import SWITCHBACK, AdaptingTestCase, Paced  # noqa: E402
from test_prober_nginx import Nginx  # noqa: E402

smart = import_smart()

TIMING_FORMAT = "'$msec $request_time $status \"$request_method $request_uri\" $upstream_cache_status'"


class Visitors(threading.Thread):
    """Requests at a steady rate over one keep-alive connection (a new one after any failure),
    with a browser's User-Agent, cycling through a few pages; stopped in the test's cleanup."""

    PAGES = ("/", "/about/", "/blog/?p=1")

    def __init__(self, test, port: int, rate: float = 60.0):
        super().__init__(daemon=True)
        self.port, self.every = port, 1.0 / rate
        self.stopping = threading.Event()
        self.sent = 0
        test.addCleanup(self.stop)

    def run(self):
        conn = None
        due = time.monotonic()
        while not self.stopping.is_set():
            try:
                conn = conn or http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                conn.request("GET", self.PAGES[self.sent % len(self.PAGES)], headers={"User-Agent": "Mozilla/5.0"})
                conn.getresponse().read()
            except (OSError, http.client.HTTPException):
                if conn is not None:
                    conn.close()
                conn = None
            self.sent += 1
            due += self.every
            self.stopping.wait(max(0.0, due - time.monotonic()))
        if conn is not None:
            conn.close()

    def stop(self):
        self.stopping.set()
        if self.is_alive():
            self.join(5)


class AccessLogVerdicts(AdaptingTestCase):

    def setUp(self):
        super().setUp()
        self.site, self.nginx, self.log_path = self.start_site(self.home)
        self.env = dict(SWITCHBACK, ACCESS_LOG=self.log_path, EARLY_STOP="no")

    def start_site(self, home):
        """A Paced target on 45 ms pages (mode file HOME/target/mode) behind a real nginx that writes the
        timing log HOME/timing.log; (site URL, Nginx, log path)."""
        mode_path = os.path.join(home, "target", "mode")
        os.makedirs(os.path.dirname(mode_path), exist_ok=True)
        with open(mode_path, "w", encoding="utf-8") as handle:
            handle.write("ms45\n")
        target = Paced(mode_path).start()

        def stop():
            target.shutdown()
            target.server_close()
        self.addCleanup(stop)
        log_path = os.path.join(home, "timing.log")
        nginx = Nginx(self, f"""
    log_format smart_timing {TIMING_FORMAT};
    map $http_user_agent $smart_visitor {{ ~^smart\\.py/ 0; default 1; }}
    upstream demo {{ server 127.0.0.1:{target.server_address[1]}; keepalive 8; }}
    server {{
        listen 127.0.0.1:{{port}};
        access_log {log_path} smart_timing if=$smart_visitor;
        location / {{ proxy_pass http://demo; proxy_http_version 1.1; proxy_set_header Connection ""; }}
    }}
""")
        return f"http://127.0.0.1:{nginx.port}/", nginx, log_path

    def experiment_of(self, name, variant_mode, source, home=None, site=None):
        folder = os.path.join(home or self.home, "experiments", name)
        os.makedirs(folder, exist_ok=True)
        smart.write_json(os.path.join(folder, "meta.json"), {
            "id": name, "description": f"test experiment {name}", "target_url": site or self.site,
            "variants": [{"name": "baseline", "apply": "echo ms45 > ../../target/mode"},
                         {"name": "variant", "apply": f"echo {variant_mode} > ../../target/mode"}],
            "revert": "echo ms45 > ../../target/mode", "measure": {"rate": 40, "timeout": 2, "source": source}})

    def test_the_access_log_reaches_the_probers_verdict_on_a_gain_and_on_a_no_op(self):
        # the gain in this home, the no-op in a second one with its own target, nginx and visitors: side by side
        other = tempfile.mkdtemp(prefix="smart-run-test-")
        self.addCleanup(shutil.rmtree, other, True)
        shutil.copy(self.path("smart.conf"), os.path.join(other, "smart.conf"))
        other_site, other_nginx, other_log = self.start_site(other)
        sites = {"ms20": (self.home, self.site, self.nginx, self.log_path),
                 "ms45": (other, other_site, other_nginx, other_log)}
        visitors = {mode: Visitors(self, nginx.port) for mode, (_, _, nginx, _) in sites.items()}
        for crowd in visitors.values():
            crowd.start()
        time.sleep(1.0)

        def scenario(variant_mode, expected):
            """Prober, then access log, in that home: [(source, rc, out+err, state, variant.csv rows or None)]."""
            home, site, _, log_path = sites[variant_mode]
            env = dict(self.env, ACCESS_LOG=log_path)
            runs = []
            for source in ("prober", "access-log"):
                name = f"00{len(runs) + 1}_{variant_mode}_{source}".replace("-", "_")
                self.experiment_of(name, variant_mode, source, home=home, site=site)
                rc, out, err = run_cli("--home", home, "run", name, env=env)
                state = smart.read_json(os.path.join(home, "var", "state.json"))
                rows = None
                if rc == 0 and source == "access-log":
                    rows = smart.read_measurements(os.path.join(home, "var", "runs", state["run_id"], "variant.csv.gz"))
                runs.append((source, rc, out + err, state, rows))
                if expected == "keep":
                    rc, out, err = run_cli("--home", home, "revert", name, env=env)
                    runs.append(("revert", rc, out + err, None, None))
            return runs

        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            futures = {mode: (expected, pool.submit(scenario, mode, expected))
                       for mode, expected in (("ms20", "keep"), ("ms45", "revert"))}
            results = {mode: (expected, future.result()) for mode, (expected, future) in futures.items()}
        for variant_mode, (expected, runs) in results.items():
            decisions = {}
            for source, rc, output, state, rows in runs:
                self.assertEqual(rc, 0, output)
                if source == "revert":
                    continue
                self.assertEqual(state["source"], {"name": source, "note": None}, state["source"])
                decisions[source] = {v["name"]: v for v in state["variants"]}["variant"]["decision"]
                if source == "access-log":
                    self.assertGreater(rows.total, 3 * 10, "the log gave too few visitors' rows")
                    self.assertEqual({url for url, _ in rows.answers}, {"/", "/about/", "/blog/"})
            self.assertEqual(decisions, {"prober": expected, "access-log": expected}, variant_mode)
            with open(sites[variant_mode][3], encoding="utf-8") as handle:
                logged = handle.read()
            self.assertNotIn("smart.py", logged)
            self.assertGreater(visitors[variant_mode].sent, 0)

    def test_thin_traffic_falls_back_to_the_prober_and_says_so(self):
        self.experiment_of("001_thin", "ms20", "access-log")
        rc, out, err = self.cli("run", "001_thin", env=dict(self.env, EARLY_STOP="yes"))     # a clear gain: may stop early
        self.assertEqual(rc, 0, out + err)
        state = self.state()
        record = self.variants(state)["variant"]
        self.assertEqual(state["source"]["name"], "prober")
        self.assertIn("too thin", state["source"]["note"])
        self.assertEqual(record["decision"], "keep")           # the prober still judged it
        rc, out, _ = self.cli("status")
        self.assertIn("measured with the prober (the access log is too thin", out)


class AccessLogReading(unittest.TestCase):

    def setUp(self):
        self.folder = tempfile.mkdtemp(prefix="smart-access-log-")
        self.addCleanup(shutil.rmtree, self.folder, True)
        self.path = os.path.join(self.folder, "timing.log")

    def append(self, *lines):
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write("".join(line + "\n" for line in lines))

    def test_labels_statuses_rotation_and_truncation(self):
        self.append("1764274000.100 0.020 200 \"GET / HTTP/1.1\" -")
        log = smart.AccessLog(self.path)
        log.open_at_end()
        self.assertEqual(log.entries(), [])                   # what was there before is not measured
        self.append('1764274001.000 0.025 200 "GET /blog/?p=7 HTTP/1.1" MISS',
                    '1764274001.500 1.500 499 "POST /wp-login.php HTTP/1.1" -',
                    '1764274002.000 0.000 304 "GET /a,b.css HTTP/2.0" -',
                    "not a timing line at all")
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write('1764274003.000 0.010 200 "GET /half')      # a line still being written
        self.assertEqual(log.entries(), [(1764274001.0, 25.0, 200, "/blog/"),
                                         (1764274001.5, 1500.0, 0, "POST /wp-login.php"),
                                         (1764274002.0, 0.0, 304, "/a%2Cb.css")])
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(' HTTP/1.1" -\n')
        self.assertEqual(log.entries(), [(1764274003.0, 10.0, 200, "/half")])
        os.rename(self.path, self.path + ".1")                  # logrotate, then nginx reopens
        self.append('1764274004.000 0.030 200 "GET /new HTTP/1.1" -')
        self.assertEqual(log.entries(), [(1764274004.0, 30.0, 200, "/new")])
        with open(self.path, "w", encoding="utf-8"):
            pass                                                 # truncated (copytruncate)
        self.append('1764274005.000 0.040 503 "GET / HTTP/1.1" -')
        self.assertEqual(log.entries(), [(1764274005.0, 40.0, 503, "/")])
        log.close()

    def test_a_304_counts_as_the_200_it_stands_for_and_a_404_does_not(self):
        base, var = smart.Arm(), smart.Arm()
        for i in range(50):
            base.add(20.0, 200 if i % 3 else 304, url="/")
            var.add(10.0, 200 if i % 3 else 304, url="/")
        self.assertEqual(smart.figures(base, var, smart.Thresholds(smart.load_settings(None, environ={}))).var_ok, 50)
        var.add(1.0, 404, url="/")
        usual = base.usual_status()
        self.assertEqual(usual, {"/": 200})
        self.assertEqual(var.judged(usual).errors, 1)

    def test_the_recent_rate_is_taken_over_the_logs_age(self):
        now = time.time()
        self.append(*(f'{now - 2 + i / 50:.3f} 0.010 200 "GET / HTTP/1.1" -' for i in range(100)))
        count, rate = smart.AccessLog(self.path).recent_rate(now)
        self.assertEqual(count, 100)
        self.assertAlmostEqual(rate, 100 / smart.ACCESS_AGE_FLOOR)
        self.append(f'{now - 1000:.3f} 0.010 200 "GET / HTTP/1.1" -')     # older than the window: not counted
        self.assertEqual(smart.AccessLog(self.path).recent_rate(now)[0], 100)


if __name__ == "__main__":
    unittest.main()
