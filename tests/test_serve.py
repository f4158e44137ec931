"""`smart.py serve` under abuse: idle and half-sent connections, the connection cap, symlinks, big
files, foreign Host names, and the security headers on every answer (smart.DashboardServer).

Each test has its own temporary home and a server on 127.0.0.1 (a port the OS picks) in a thread of
this process, stopped in cleanup; every socket a test opens is closed in cleanup.  Nothing here
asserts a duration: waits are bounded, and a test fails only when the bound passes.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import http.client
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
import tracemalloc
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from helpers import REPO_ROOT, SMART_PY, clean_env, import_smart  # noqa: E402

smart = import_smart()

SECRET = "SECRET-c0ach-t0ken"
NGINX_SITE = os.path.join(REPO_ROOT, "deploy", "nginx", "smart.conf")
PAGES = [os.path.join(REPO_ROOT, "www", name) for name in ("index.html", "fleet.html")]


def csp_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode() + "'"


class Site:
    """A temporary home (www/ copied from the repository, a state, a run, smart.conf holding SECRET)
    served by smart.make_dashboard_server on a free port; stopped and removed by the test's cleanups."""

    def __init__(self, test: unittest.TestCase, **server_args):
        self.test = test
        self.root = tempfile.mkdtemp(prefix="smart-serve-")
        test.addCleanup(shutil.rmtree, self.root, True)
        shutil.copytree(os.path.join(REPO_ROOT, "www"), os.path.join(self.root, "www"))
        self.home = smart.Home(self.root)
        self.run_dir = os.path.join(self.home.runs, "20261127T210947")
        os.makedirs(self.run_dir)
        smart.write_json(self.home.state, {"run_id": "20261127T210947", "status": "done"})
        smart.write_json(os.path.join(self.home.var, "history.json"), {"runs": []})
        with open(os.path.join(self.run_dir, "baseline.csv"), "w", encoding="utf-8") as handle:
            handle.write("timestamp,latency_ms,response_code\n1764274326.0,17.8,200\n")
        self.conf = os.path.join(self.root, "smart.conf")
        with open(self.conf, "w", encoding="utf-8") as handle:
            handle.write(f"PHONE_HOME_TOKEN={SECRET}\n")
        self.server = smart.make_dashboard_server(self.home, "127.0.0.1", 0, **server_args)
        self.thread = threading.Thread(target=self.server.serve_forever, name="dashboard", daemon=True)
        self.thread.start()
        test.addCleanup(self.thread.join, 10)
        test.addCleanup(self.server.server_close)
        test.addCleanup(self.server.shutdown)
        self.port = self.server.server_address[1]

    def get(self, path, host=None, method="GET"):
        """(status, headers, body) of one request on a fresh connection, the path sent as written."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=20)
        try:
            conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
            conn.putheader("Host", host or f"127.0.0.1:{self.port}")
            conn.endheaders()
            response = conn.getresponse()
            return response.status, response.headers, response.read()
        finally:
            conn.close()

    def connect(self) -> socket.socket:
        """A raw client socket to the server, closed in cleanup."""
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=20)
        self.test.addCleanup(sock.close)
        return sock


def read_until_closed(sock: socket.socket, limit=1 << 20) -> bytes:
    """Everything the server sends until it closes the connection (or the socket's timeout passes)."""
    data = b""
    while len(data) < limit:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    return data


class ConnectionTests(unittest.TestCase):
    """A connection costs no thread while it is idle or half-sent; the cap answers 503; timeouts close."""

    def test_idle_half_open_connections_do_not_stop_a_normal_request(self):
        site = Site(self)
        self.assertEqual(site.get("/state.json")[0], 200)
        threads = threading.active_count()
        idle = []
        for _ in range(300):
            sock = site.connect()
            sock.sendall(b"GET /state.json HTTP/1.1\r\nHost: 127.0.0.1\r\n")     # never finished
            idle.append(sock)
        status, _, body = site.get("/state.json")
        self.assertEqual(status, 200)
        self.assertIn(b"20261127T210947", body)
        self.assertLessEqual(threading.active_count(), threads, "the idle connections took threads")
        for sock in idle[:5]:                  # still open: nobody answered or dropped them yet
            sock.setblocking(False)
            with self.assertRaises(BlockingIOError):
                sock.recv(1)

    def test_beyond_the_cap_a_connection_is_answered_503_and_closed(self):
        site = Site(self, max_connections=4)
        held = [site.connect() for _ in range(4)]
        for sock in held:
            sock.sendall(b"GET / HTTP/1.1\r\n")
        extra = site.connect()
        answer = read_until_closed(extra)
        self.assertTrue(answer.startswith(b"HTTP/1.1 503 "), answer[:80])
        for name in (b"Content-Security-Policy: ", b"X-Content-Type-Options: nosniff", b"Referrer-Policy: no-referrer"):
            self.assertIn(name, answer)
        for sock in held:
            sock.close()
        deadline = time.monotonic() + 20       # the server sees the four close, then has room again
        while True:
            status = site.get("/")[0]
            if status == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        self.assertEqual(status, 200)

    def test_a_head_that_never_ends_is_closed(self):
        site = Site(self, head_seconds=0.5)
        sock = site.connect()
        sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        self.assertEqual(read_until_closed(sock), b"", "a half-sent head was answered instead of closed")

    def test_an_idle_keep_alive_connection_is_closed(self):
        site = Site(self, idle_seconds=0.5)
        sock = site.connect()
        sock.sendall(b"GET /state.json HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        answer = read_until_closed(sock)       # the answer, then the close once the connection idles
        self.assertTrue(answer.startswith(b"HTTP/1.1 200 "), answer[:80])
        self.assertIn(b"20261127T210947", answer)

    def test_keep_alive_and_pipelined_requests_are_answered_in_order(self):
        site = Site(self)
        sock = site.connect()
        sock.sendall(b"GET /state.json HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
                     b"GET /nothing HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
                     b"GET /history.json HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        answer = read_until_closed(sock)
        self.assertEqual(re.findall(rb"HTTP/1.1 (\d+) ", answer), [b"200", b"404", b"200"])

    def test_a_head_too_large_is_refused(self):
        site = Site(self)
        sock = site.connect()
        sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 40000)
        self.assertTrue(read_until_closed(sock).startswith(b"HTTP/1.1 431 "))


class FileTests(unittest.TestCase):
    """Files are opened without following symlinks, must be regular, and are streamed."""

    def assertRefused(self, site, path, statuses=(403, 404)):
        status, _, body = site.get(path)
        self.assertIn(status, statuses, path)
        self.assertNotIn(SECRET.encode(), body, path)

    def test_a_symlinked_state_json_is_not_served(self):
        site = Site(self)
        os.unlink(site.home.state)
        os.symlink(site.conf, site.home.state)
        history = os.path.join(site.home.var, "history.json")
        os.unlink(history)
        os.symlink(site.conf, history)
        for path in ("/state.json", "/history.json"):
            self.assertRefused(site, path, (403,))

    def test_symlinks_under_runs_and_www_are_not_followed(self):
        site = Site(self)
        os.symlink(site.conf, os.path.join(site.run_dir, "run.log"))
        os.symlink(site.root, os.path.join(site.home.runs, "home"))
        os.symlink(site.conf, os.path.join(site.root, "www", "conf.txt"))
        for path in ("/runs/20261127T210947/run.log", "/runs/home/smart.conf", "/runs/home/"):
            self.assertRefused(site, path, (403,))
        self.assertRefused(site, "/conf.txt", (404,))
        status, _, listing = site.get("/runs/20261127T210947/")
        self.assertEqual(status, 200)
        self.assertIn(b"baseline.csv", listing)
        self.assertNotIn(b"run.log", listing, "a symlink is listed")
        # var/runs itself replaced by a symlink to the home: nothing under it is served
        runs = site.home.runs
        os.rename(runs, runs + ".real")
        os.symlink(site.root, runs)
        for path in ("/runs/", "/runs/smart.conf"):
            self.assertRefused(site, path, (403,))

    def test_a_fifo_is_refused_without_hanging(self):
        site = Site(self)
        os.mkfifo(os.path.join(site.run_dir, "pipe.csv"))
        self.assertRefused(site, "/runs/20261127T210947/pipe.csv", (403,))
        self.assertEqual(site.get("/")[0], 200)

    def test_a_finished_runs_compressed_csv_is_served_as_text(self):
        site = Site(self)
        rows = "timestamp,latency_ms,response_code\n" + "1764274326.0,17.8,200\n" * 500
        os.unlink(os.path.join(site.run_dir, "baseline.csv"))
        with gzip.open(os.path.join(site.run_dir, "baseline.csv.gz"), "wt") as handle:
            handle.write(rows)
        status, headers, body = site.get("/runs/20261127T210947/baseline.csv")    # sent without Accept-Encoding
        self.assertEqual((status, headers["Content-Type"]), (200, "text/plain; charset=utf-8"))
        self.assertIsNone(headers["Content-Encoding"])
        self.assertEqual(body.decode(), rows)
        conn = http.client.HTTPConnection("127.0.0.1", site.port, timeout=20)
        try:
            conn.request("GET", "/runs/20261127T210947/baseline.csv",
                         headers={"Host": f"127.0.0.1:{site.port}", "Accept-Encoding": "gzip"})
            response = conn.getresponse()
            packed = response.read()
        finally:
            conn.close()
        self.assertEqual(response.getheader("Content-Encoding"), "gzip")
        self.assertEqual(gzip.decompress(packed).decode(), rows)
        self.assertLess(len(packed), len(rows) // 5)

    def test_a_big_file_is_streamed_intact(self):
        site = Site(self)
        size = 50 * 1024 * 1024
        block = os.urandom(1 << 20)
        digest = hashlib.sha256()
        with open(os.path.join(site.run_dir, "big.csv"), "wb") as handle:
            for index in range(size // len(block)):
                piece = block[index:] + block[:index]
                handle.write(piece)
                digest.update(piece)
        status, headers, body = site.get("/runs/20261127T210947/big.csv", method="HEAD")
        self.assertEqual((status, headers["Content-Length"], body), (200, str(size), b""))
        results = []

        def download():
            conn = http.client.HTTPConnection("127.0.0.1", site.port, timeout=60)
            try:
                conn.request("GET", "/runs/20261127T210947/big.csv")
                response = conn.getresponse()
                got, length = hashlib.sha256(), 0
                while chunk := response.read(1 << 20):
                    got.update(chunk)
                    length += len(chunk)
                results.append((response.status, length, got.hexdigest()))
            finally:
                conn.close()
        tracemalloc.start()
        self.addCleanup(tracemalloc.stop)
        downloads = [threading.Thread(target=download) for _ in range(4)]
        for thread in downloads:
            thread.start()
        for thread in downloads:
            thread.join(120)
        _, peak = tracemalloc.get_traced_memory()
        self.assertEqual(results, [(200, size, digest.hexdigest())] * 4)
        # a whole-file read would hold 50 MB per download; chunks keep the server's part small
        self.assertLess(peak, size // 2, "the downloads were not streamed")


class HostTests(unittest.TestCase):
    """Only loopback names, the bound address and --allow-host names are answered (DNS rebinding)."""

    def test_a_foreign_host_is_refused_and_an_allowed_one_served(self):
        site = Site(self, allow_hosts=["Dash.Example.org"])
        port = site.port
        for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example", "dash.example.org.evil",
                     "[::2]", f"[::ffff:127.0.0.1]:{port}"):
            status, _, body = site.get("/state.json", host=host)
            self.assertEqual(status, 421, host)
            self.assertNotIn(b"20261127T210947", body, host)
        for host in (f"127.0.0.1:{port}", "127.0.0.1", f"localhost:{port}", "LOCALHOST", f"[::1]:{port}",
                     "dash.example.org", f"DASH.example.org.:{port}"):
            status, _, body = site.get("/state.json", host=host)
            self.assertEqual(status, 200, host)
            self.assertIn(b"20261127T210947", body, host)

    def test_a_request_without_host_is_refused(self):
        site = Site(self)
        sock = site.connect()
        sock.sendall(b"GET /state.json HTTP/1.0\r\n\r\n")
        answer = read_until_closed(sock)
        self.assertTrue(answer.startswith(b"HTTP/1.1 400 "), answer[:80])
        self.assertNotIn(b"20261127T210947", answer)

    def test_names_of_the_host_header(self):
        for header, name in (("Example.ORG:8080", "example.org"), ("[::1]:8080", "::1"), ("::1", "::1"),
                             ("example.org.", "example.org"), ("", ""), (None, ""), (" 127.0.0.1 ", "127.0.0.1")):
            self.assertEqual(smart.host_name(header), name, header)


class HeaderTests(unittest.TestCase):
    """Every answer carries the Content-Security-Policy, nosniff and no-referrer."""

    def assertSecure(self, headers, what):
        self.assertEqual(headers["Content-Security-Policy"], smart.DASHBOARD_CSP, what)
        self.assertEqual(headers["X-Content-Type-Options"], "nosniff", what)
        self.assertEqual(headers["Referrer-Policy"], "no-referrer", what)

    def test_on_every_kind_of_answer(self):
        site = Site(self)
        os.symlink(site.conf, os.path.join(site.run_dir, "run.log"))
        for path, host, expected in (("/", None, 200), ("/state.json", None, 200), ("/runs/", None, 200),
                                     ("/runs/20261127T210947/baseline.csv", None, 200), ("/nothing", None, 404),
                                     ("/runs/20261127T210947/run.log", None, 403), ("/runs", None, 301),
                                     ("/state.json", "evil.example", 421), ("*", None, 400)):
            status, headers, _ = site.get(path, host=host)
            self.assertEqual(status, expected, path)
            self.assertSecure(headers, f"{status} {path}")
        status, headers, _ = site.get("/", method="POST")
        self.assertEqual(status, 501)
        self.assertSecure(headers, "501")

    def test_the_policy_allows_exactly_the_pages_inline_script_and_style(self):
        allowed = set(re.findall(r"'sha256-[^']+'", smart.DASHBOARD_CSP))
        needed = set()
        for page in PAGES:
            with open(page, encoding="utf-8") as handle:
                source = handle.read()
            blocks = re.findall(r"<(script|style)>(.*?)</\1>", source, re.S)
            self.assertEqual(sorted(tag for tag, _ in blocks), ["script", "style"], page)
            self.assertNotRegex(source, r"<(script|style)\s[^>]*>", f"{page}: a script or style the test cannot hash")
            needed |= {csp_hash(text) for _, text in blocks}
            needed |= {csp_hash(value) for value in re.findall(r'\bstyle: "([^"]*)"', source)}
        self.assertEqual(allowed, needed, "DASHBOARD_CSP (smart.py) and deploy/nginx/smart.conf need the hashes "
                                          f"of the pages' inline script and style: {sorted(needed)}")
        for directive in ("default-src 'self'", "frame-ancestors 'none'", "base-uri 'none'", "form-action 'none'"):
            self.assertIn(directive, smart.DASHBOARD_CSP)
        self.assertNotIn("unsafe-inline", smart.DASHBOARD_CSP)
        self.assertNotIn("unsafe-eval", smart.DASHBOARD_CSP)

    def test_the_nginx_site_sends_the_same_policy(self):
        with open(NGINX_SITE, encoding="utf-8") as handle:
            policies = set(re.findall(r'add_header Content-Security-Policy "([^"]*)" always;', handle.read()))
        self.assertEqual(policies, {smart.DASHBOARD_CSP})


class ServeCommandTests(unittest.TestCase):
    """`smart.py serve --port 0 --allow-host NAME` as a process, stopped by SIGTERM."""

    def test_allow_host_flag(self):
        home = tempfile.mkdtemp(prefix="smart-serve-cli-")
        self.addCleanup(shutil.rmtree, home, True)
        out = open(os.path.join(home, "serve.out"), "w+", encoding="utf-8")
        self.addCleanup(out.close)
        proc = subprocess.Popen([sys.executable, SMART_PY, "--home", home, "serve", "--port", "0",
                                 "--allow-host", "dash.example.org"], env=clean_env(), stdin=subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

        def stop():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        self.addCleanup(stop)
        deadline = time.monotonic() + 30
        found = None
        while not found and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
            out.seek(0)
            found = re.search(r"http://127\.0\.0\.1:(\d+)/", out.read())
        self.assertIsNotNone(found, "serve printed no URL")
        port = int(found.group(1))

        def status(host):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
            try:
                conn.request("GET", "/", headers={"Host": host})
                return conn.getresponse().status
            finally:
                conn.close()
        self.assertEqual(status("dash.example.org"), 200)
        self.assertEqual(status(f"127.0.0.1:{port}"), 200)
        self.assertEqual(status("other.example.org"), 421)
        proc.send_signal(signal.SIGTERM)
        self.assertEqual(proc.wait(30), 0)
        out.seek(0)
        printed = out.read()
        self.assertIn("dash.example.org", printed)
        self.assertIn("stopped", printed)


if __name__ == "__main__":
    unittest.main()
