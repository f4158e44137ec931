"""The prober's bounds and its newer features (smart.py "Measure: the built-in prober").

Hostile servers (an endless body, a 17 GiB Content-Length, endless 1-byte chunks, a slowloris)
end as code-0 rows at the timeout and never hold the loop past should_stop; a given header
replaces the default one; a page mix in smooth weighted round-robin order with a url column; the
connection modes and TLS resumption; content checks and the check column; the CSV columns and
on_row.  Scripted servers on 127.0.0.1 (tests/servers.py) stop in cleanup; probes last < 1 s
unless they test a bound.
"""

from __future__ import annotations

import os
import sys
import resource
import shutil
import signal
import ssl
import subprocess
import tempfile
import threading
import time
import unittest
from unittest import mock

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from helpers import import_smart, run_cli
from servers import (ScriptedServer, endless_body, endless_chunks, huge_length, ok_handler, respond,
                     response_bytes, slowloris)

smart = import_smart()


def need(tool):
    """The tool's path; skip without it, fail under CI=true."""
    path = shutil.which(tool) or next((p for p in (f"/usr/sbin/{tool}", f"/usr/bin/{tool}")
                                       if os.access(p, os.X_OK)), None)
    if path:
        return path
    if os.environ.get("CI") == "true":
        raise AssertionError(f"{tool} is not installed and CI=true: this test cannot be skipped")
    raise unittest.SkipTest(f"{tool} is not installed")


def self_signed(folder):
    """(cert, key) paths of a fresh self-signed certificate for localhost / 127.0.0.1."""
    cert, key = os.path.join(folder, "cert.pem"), os.path.join(folder, "key.pem")
    subprocess.run([need("openssl"), "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
                    "-keyout", key, "-out", cert], check=True, capture_output=True, timeout=60)
    return cert, key


def read_csv(path):
    """(header fields, rows as lists of fields) of a measurement CSV."""
    with open(path, encoding="utf-8", newline="") as handle:
        lines = handle.read().splitlines()
    return lines[0].split(","), [line.split(",") for line in lines[1:]]


class Case(unittest.TestCase):
    """Scripted servers stopped in cleanup; probes into a temporary folder."""

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="smart-prober-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.count = 0

    def serve(self, handler=ok_handler, **options) -> ScriptedServer:
        server = ScriptedServer(handler, **options).start()
        self.addCleanup(server.stop)
        return server

    def probe(self, url, duration, **options):
        """measure_url into a fresh CSV; returns (ProbeResult, header fields, rows)."""
        self.count += 1
        path = os.path.join(self.tmp, f"probe{self.count}.csv")
        options.setdefault("timeout", 2.0)
        result = smart.measure_url(url, duration, path, **options)
        header, rows = read_csv(path)
        self.assertEqual(result.rows, len(rows), "ProbeResult.rows disagrees with the CSV")
        return result, header, rows

    def codes(self, rows):
        return {int(row[2]) for row in rows}


###### Headers: a given header replaces the default ######

def host_lines(request):
    return [line for line in request.raw.decode("latin-1").split("\r\n") if line.lower().startswith("host:")]


class HeaderTests(Case):

    def test_a_given_header_replaces_the_default_of_its_name(self):
        target = smart.Target("http://127.0.0.1:8080/", headers=["host: www.example.org", "User-Agent: probe/2",
                                                                 "ACCEPT: text/html"])
        lines = target.request.decode("latin-1").split("\r\n")
        self.assertEqual(lines[:4], ["GET / HTTP/1.1", "host: www.example.org", "User-Agent: probe/2",
                                     "ACCEPT: text/html"])
        self.assertEqual(sum(line.lower().startswith(("host:", "user-agent:", "accept:")) for line in lines), 3)

    def test_other_headers_are_added_and_may_repeat(self):
        lines = smart.Target("http://h/", headers=["X-A: 1", "X-A: 2", "Accept: a", "Accept: b"]).request \
            .decode("latin-1").split("\r\n")
        self.assertEqual([line for line in lines if line.startswith(("X-A", "Accept"))],
                         ["Accept: a", "X-A: 1", "X-A: 2", "Accept: b"])
        self.assertIn("Host: h", lines)

    def test_a_second_host_header_is_bad_input(self):
        for headers in (["Host: a", "Host: b"], ["Host: a", "host: a"]):
            with self.subTest(headers=headers), self.assertRaises(smart.BadInput):
                smart.Target("http://h/", headers=headers)

    def test_the_server_sees_one_host_header_the_given_one(self):
        server = self.serve()
        result, _, rows = self.probe(server.url + "/", 0.3, interval=0.1, headers=["Host: www.example.org"])
        self.assertEqual(self.codes(rows), {200})
        for request in server.requests:
            self.assertEqual(host_lines(request), ["Host: www.example.org"])
        plain = self.serve()
        self.probe(plain.url + "/", 0.2, interval=0.1)
        self.assertEqual(host_lines(plain.requests[0]), [f"Host: 127.0.0.1:{plain.port}"])

    def test_cli_second_host_exits_2_and_sends_nothing(self):
        server = self.serve()
        out = os.path.join(self.tmp, "two-hosts.csv")
        code, _, err = run_cli("measure", "--url", server.url, "--duration", "0.3", "--out", out,
                               "--header", "Host: a", "--header", "host: b")
        self.assertEqual(code, 2, err)
        self.assertIn("Host", err)
        self.assertEqual(server.connections, 0)
        self.assertFalse(os.path.exists(out))


###### Bounds: hostile and huge responses ######

class HostileTests(Case):

    def test_hostile_responses_end_as_code_0_rows_at_the_timeout(self):
        cases = {"endless body": endless_body, "17 GiB Content-Length": huge_length,
                 "endless 1-byte chunks": endless_chunks, "slowloris head": slowloris}
        for name, handler in cases.items():
            with self.subTest(name):
                server = self.serve(handler)
                started = time.monotonic()
                result, _, rows = self.probe(server.url + "/", 0.5, interval=0.25, timeout=0.4)
                # A generous bound (duration + timeout + slack), not a timing benchmark: before
                # the bounds these ran for minutes, or until memory ran out.
                self.assertLess(time.monotonic() - started, 5.0)
                self.assertEqual(len(rows), 2)
                self.assertEqual(self.codes(rows), {0})
                self.assertEqual(result.errors, 2)
                timed_out = sum(float(row[1]) >= 400.0 for row in rows)
                if handler is huge_length:
                    self.assertEqual(result.oversized, 2, "the over-cap length was not refused at the head")
                elif handler is endless_body:
                    self.assertEqual(result.oversized + timed_out, 2, "ended by neither the cap nor the timeout")
                else:
                    self.assertEqual(timed_out, 2, "ended before the timeout")
                if handler in (endless_body, endless_chunks):
                    self.assertGreater(result.bytes_received, 100_000)

    def test_should_stop_ends_a_streaming_response_promptly(self):
        for handler in (endless_body, endless_chunks):
            with self.subTest(handler=handler.__name__):
                server = self.serve(handler)
                started = time.monotonic()
                stop_at = started + 0.3
                result, _, rows = self.probe(server.url + "/", 60, interval=1.0, timeout=60,
                                             should_stop=lambda: time.monotonic() > stop_at)
                # The server would stream for the 60 s timeout; should_stop ends it within moments.
                self.assertLess(time.monotonic() - started, 5.0)
                self.assertTrue(result.stopped_early)
                self.assertGreater(result.bytes_received, 0)

    def test_sigterm_during_a_streaming_body_ends_the_probe(self):
        # A run's StopFlag (set by SIGTERM) is its should_stop: a real run ignored SIGTERM for
        # 40 s while a body streamed, because the read loop never came back to ask.
        server = self.serve(endless_chunks)
        stop = smart.StopFlag()
        self.addCleanup(stop.install())
        timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM))
        self.addCleanup(timer.cancel)
        started = time.monotonic()
        timer.start()
        result, _, rows = self.probe(server.url + "/", 60, interval=1.0, timeout=60, should_stop=lambda: bool(stop))
        self.assertLess(time.monotonic() - started, 5.0)
        self.assertEqual(stop.signal_name, "SIGTERM")
        self.assertTrue(result.stopped_early)

    def test_should_stop_is_asked_while_the_loop_waits(self):
        # interval 60 s: the loop would sleep a minute between probes without asking.
        server = self.serve()
        started = time.monotonic()
        stop_at = started + 0.3
        result, _, rows = self.probe(server.url + "/", 120, interval=60,
                                     should_stop=lambda: time.monotonic() > stop_at)
        self.assertLess(time.monotonic() - started, 5.0)
        self.assertTrue(result.stopped_early)
        self.assertEqual(len(rows), 1)

    def test_a_body_over_the_cap_is_a_failed_row_and_the_connection_closes(self):
        sizes = {"under": 512 * 1024, "over": 2 << 20}

        def body(server, request, sock):
            size = sizes[request.target.strip("/").split("-")[0]]
            if request.target.endswith("-chunked"):
                sock.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                for _ in range(size // 8192):
                    sock.sendall(b"2000\r\n" + b"y" * 8192 + b"\r\n")
                sock.sendall(b"0\r\n\r\n")
                return True
            if request.target.endswith("-close"):
                sock.sendall(b"HTTP/1.0 200 OK\r\n\r\n" + b"y" * size)
                return False
            return respond(sock, 200, b"y" * size)

        server = self.serve(body)
        with mock.patch.object(smart, "MAX_BODY", 1 << 20):
            for framing in ("length", "chunked", "close"):
                for size in sizes:
                    with self.subTest(framing=framing, size=size):
                        before = server.connections
                        result, _, rows = self.probe(f"{server.url}/{size}-{framing}", 0.3, interval=0.1)
                        self.assertEqual(len(rows), 3)
                        if size == "over":
                            self.assertEqual(self.codes(rows), {0})
                            self.assertEqual(result.oversized, 3)
                            self.assertEqual(server.connections - before, 3, "an over-cap connection was kept")
                        else:
                            self.assertEqual(self.codes(rows), {200})
                            self.assertEqual(result.oversized, 0)
                            self.assertGreaterEqual(result.bytes_received, 3 * sizes["under"])

    def test_measures_in_a_process_with_over_a_thousand_files_open(self):
        # select() cannot take a descriptor past 1023: the precise wait falls back to epoll's.
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard != resource.RLIM_INFINITY and hard < 1200:
            self.skipTest(f"the open-file limit is {hard}")
        if soft != resource.RLIM_INFINITY and soft < 1200:
            resource.setrlimit(resource.RLIMIT_NOFILE, (1200, hard))
            self.addCleanup(resource.setrlimit, resource.RLIMIT_NOFILE, (soft, hard))
        server = self.serve()
        files = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
        try:
            result, _, rows = self.probe(server.url + "/", 0.3, rate=50)
        finally:
            for fd in files:
                os.close(fd)
        self.assertGreaterEqual(len(rows), 13)
        self.assertEqual(self.codes(rows), {200})


###### A page mix ######

class MixTests(Case):

    def test_smooth_weighted_round_robin_is_nginx_order(self):
        def first(weights, n):
            order = smart.smooth_weighted(weights)
            return [next(order) for _ in range(n)]
        self.assertEqual(first([5, 1, 1], 14), [0, 0, 1, 0, 2, 0, 0] * 2)    # nginx's a a b a c a a
        self.assertEqual(first([1, 1, 1], 6), [0, 1, 2, 0, 1, 2])
        self.assertEqual(first([3, 2], 10), [0, 1, 0, 1, 0] * 2)
        self.assertEqual(first([1], 3), [0, 0, 0])

    def test_weighted_url(self):
        self.assertEqual(smart.weighted_url("http://h/a@3"), ("http://h/a", 3))
        self.assertEqual(smart.weighted_url("http://h/a"), ("http://h/a", 1))
        self.assertEqual(smart.weighted_url("http://user@h/a"), ("http://user@h/a", 1))
        self.assertEqual(smart.weighted_url("http://h/@2@1"), ("http://h/@2", 1))
        for weight in (0, 1001, True, 1.5):
            with self.subTest(weight=weight), self.assertRaises(smart.BadInput):
                smart.Target("http://h/", weight=weight)

    def test_requests_follow_the_weights_and_rows_name_their_url(self):
        server = self.serve()
        base = server.url
        result, header, rows = self.probe([(base + "/a", 3), (base + "/b", 2), base + "/c"], 0.6, interval=0.05)
        self.assertEqual(header, ["timestamp", "latency_ms", "response_code", "url"])
        order = smart.smooth_weighted([3, 2, 1])
        expected = [["/a", "/b", "/c"][next(order)] for _ in rows]
        self.assertEqual([request.target for request in server.requests], expected)
        self.assertEqual([row[3] for row in rows], [base + path for path in expected])
        self.assertEqual(server.connections, 1, "one origin: one keep-alive connection")

    def test_a_comma_in_a_url_is_escaped_in_the_csv(self):
        server = self.serve()
        result, header, rows = self.probe([server.url + "/a?x=1,2", server.url + "/b"], 0.2, interval=0.05)
        self.assertEqual({len(row) for row in rows}, {4})
        self.assertIn(server.url + "/a?x=1%2C2", {row[3] for row in rows})
        self.assertEqual(server.requests[0].target, "/a?x=1,2")

    def test_a_mix_over_two_origins_in_each_shape(self):
        for shape in (dict(interval=0.05), dict(rate=100), dict(concurrency=2)):
            with self.subTest(**shape):
                one, two = self.serve(), self.serve()
                result, _, rows = self.probe([one.url + "/one", two.url + "/two"], 0.4, **shape)
                self.assertEqual(self.codes(rows), {200})
                self.assertEqual({r.target for r in one.requests}, {"/one"})
                self.assertEqual({r.target for r in two.requests}, {"/two"})
                self.assertLessEqual(abs(len(one.requests) - len(two.requests)), 2)
                self.assertEqual([row[3].rsplit("/", 1)[1] for row in rows].count("one"), len(one.requests))

    def test_cli_repeated_url_with_weights(self):
        server = self.serve()
        out = os.path.join(self.tmp, "mix.csv")
        code, _, err = run_cli("measure", "--url", server.url + "/a@2", "--url", server.url + "/b",
                               "--duration", "0.6", "--interval", "0.05", "--out", out)
        self.assertEqual(code, 0, err)
        header, rows = read_csv(out)
        self.assertEqual(header[-1], "url")
        paths = [row[3].rsplit("/", 1)[1] for row in rows]
        self.assertEqual(paths[:6], ["a", "b", "a"] * 2)
        self.assertEqual([r.target for r in server.requests], ["/" + p for p in paths])

    def test_cli_single_url_keeps_the_three_columns(self):
        server = self.serve()
        out = os.path.join(self.tmp, "one.csv")
        code, _, err = run_cli("measure", "--url", server.url + "/", "--duration", "0.3", "--interval", "0.1",
                               "--out", out)
        self.assertEqual(code, 0, err)
        header, rows = read_csv(out)
        self.assertEqual(header, ["timestamp", "latency_ms", "response_code"])
        self.assertEqual({len(row) for row in rows}, {3})


###### Connection modes ######

class ConnectionModeTests(Case):

    def test_new_opens_a_connection_per_request_and_asks_to_close(self):
        for mode in ("new", "resume"):            # plain http: resume is new
            for shape in (dict(interval=0.05), dict(rate=100), dict(concurrency=2)):
                with self.subTest(mode=mode, **shape):
                    server = self.serve()
                    result, _, rows = self.probe(server.url + "/", 0.3, connections=mode, **shape)
                    self.assertEqual(self.codes(rows), {200})
                    self.assertEqual(server.connections, len(rows))
                    self.assertEqual(result.connections, len(rows))
                    self.assertEqual({r.index for r in server.requests}, {0})
                    self.assertEqual({r.headers.get("connection") for r in server.requests}, {"close"})
                    self.assertEqual(result.handshakes, 0)

    def test_reuse_sends_no_connection_header(self):
        server = self.serve()
        result, _, rows = self.probe(server.url + "/", 0.3, interval=0.05)
        self.assertEqual(server.connections, 1)
        self.assertNotIn("connection", server.requests[0].headers)

    def test_a_given_connection_header_replaces_close(self):
        target = smart.Target("http://h/", headers=["Connection: keep-alive"])
        self.assertEqual(target.request_close.count(b"Connection:"), 1)
        self.assertIn(b"\r\nConnection: close\r\n", smart.Target("http://h/").request_close)

    def test_bad_mode_is_bad_input_before_anything(self):
        server = self.serve()
        path = os.path.join(self.tmp, "bad.csv")
        with self.assertRaises(smart.BadInput):
            smart.measure_url(server.url, 0.3, path, connections="sometimes")
        self.assertFalse(os.path.exists(path))
        self.assertEqual(server.connections, 0)
        out = os.path.join(self.tmp, "bad-cli.csv")
        code, _, err = run_cli("measure", "--url", server.url, "--duration", "0.3", "--out", out,
                               "--connections", "sometimes")
        self.assertEqual(code, 2, err)


class TLSModeTests(Case):

    @classmethod
    def setUpClass(cls):
        cls.certdir = tempfile.mkdtemp(prefix="smart-prober-tls-")
        try:
            cls.cert, cls.key = self_signed(cls.certdir)
        except (subprocess.SubprocessError, OSError) as exc:
            shutil.rmtree(cls.certdir, True)
            raise AssertionError(f"openssl could not make a certificate: {exc}")
        except unittest.SkipTest:
            shutil.rmtree(cls.certdir, True)
            raise

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.certdir, True)

    def tls_server(self, version=None):
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert, self.key)
        if version is not None:
            context.minimum_version = context.maximum_version = version
        return self.serve(tls_context=context)

    def test_modes_count_handshakes_and_resumptions(self):
        for version in (ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2):
            with self.subTest(version=version.name):
                for mode, shape in (("reuse", dict(interval=0.05)), ("new", dict(interval=0.05)),
                                    ("resume", dict(interval=0.05)), ("resume", dict(concurrency=1)),
                                    ("resume", dict(rate=50))):
                    with self.subTest(mode=mode, **shape):
                        server = self.tls_server(version)
                        result, _, rows = self.probe(server.url + "/", 0.4, insecure=True, connections=mode, **shape)
                        self.assertEqual(self.codes(rows), {200})
                        self.assertGreaterEqual(len(rows), 8)
                        if mode == "reuse":
                            self.assertEqual((result.handshakes, result.resumed), (1, 0))
                        elif mode == "new":
                            self.assertEqual((result.handshakes, result.resumed), (len(rows), 0))
                        else:
                            # Every handshake after the first offers the last session and resumes it;
                            # in an open loop on a loaded box a second connection can start before the
                            # first handshake has given a session to offer (then it too is a full one).
                            self.assertEqual(result.handshakes, len(rows))
                            if "rate" in shape:
                                self.assertGreaterEqual(result.resumed, len(rows) - 3)
                            else:
                                self.assertEqual(result.resumed, len(rows) - 1)
                        self.assertEqual(server.connections, 1 if mode == "reuse" else len(rows))

    def test_cli_summary_counts_resumptions(self):
        server = self.tls_server()
        out = os.path.join(self.tmp, "resume.csv")
        code, _, err = run_cli("measure", "--url", server.url + "/", "--duration", "0.5", "--interval", "0.1",
                               "--insecure", "--connections", "resume", "--out", out)
        self.assertEqual(code, 0, err)
        self.assertIn("4 of 5 TLS handshakes resumed", err)


###### Content checks and the check column ######

def pieces(*parts, gap=0.05, chunked=False):
    """A handler sending the body in separate writes `gap` apart (so they arrive in separate reads)."""
    body = b"".join(parts)

    def handler(server, request, sock):
        if chunked:
            sock.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            for part in parts:
                server.sleep(gap)
                sock.sendall(b"%x\r\n%s\r\n" % (len(part), part))
            sock.sendall(b"0\r\n\r\n")
            return True
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body))
        for part in parts:
            server.sleep(gap)
            sock.sendall(part)
        return True
    return handler


class CheckTests(Case):

    def test_expected_text_split_across_reads_is_found(self):
        for chunked in (False, True):
            with self.subTest(chunked=chunked):
                server = self.serve(pieces(b"<title>Welcome to Word", b"Press</title>", chunked=chunked))
                result, header, rows = self.probe(server.url + "/", 0.4, interval=0.2,
                                                  expect_body="Welcome to WordPress")
                self.assertEqual(header[-1], "check")
                self.assertEqual([row[2:] for row in rows], [["200", ""]] * 2)
                self.assertEqual(result.check_failures, 0)

    def test_a_response_failing_its_check_keeps_its_status_and_says_what_failed(self):
        server = self.serve(lambda server, request, sock: respond(sock, 404 if "missing" in request.target else 200,
                                                                  b"Caf\xc3\xa9 menu"))
        cases = [
            ("/ok", dict(expect_status=200, expect_body="Café"), "200", ""),
            ("/ok", dict(expect_body="Tea"), "200", "body"),
            ("/missing", dict(expect_status=200), "404", "status"),
            ("/missing", dict(expect_status=200, expect_body="Tea"), "404", "status"),
            ("/missing", dict(expect_status=404, expect_body="menu"), "404", ""),
        ]
        for path, check, code, word in cases:
            with self.subTest(path=path, **check):
                result, header, rows = self.probe(server.url + path, 0.3, interval=0.1, **check)
                self.assertEqual(header, ["timestamp", "latency_ms", "response_code", "check"])
                self.assertEqual({tuple(row[2:]) for row in rows}, {(code, word)})
                self.assertEqual(result.check_failures, len(rows) if word else 0)

    def test_code_0_rows_carry_no_check_word(self):
        result, _, rows = self.probe("http://127.0.0.1:1/", 0.3, interval=0.1, expect_status=200)
        self.assertEqual({tuple(row[2:]) for row in rows}, {("0", "")})
        self.assertEqual(result.check_failures, 0)

    def test_bad_checks_are_bad_input(self):
        for check in (dict(expect_status=99), dict(expect_status=1000), dict(expect_status="200"),
                      dict(expect_body=""), dict(expect_body="x", method="HEAD")):
            with self.subTest(**check), self.assertRaises(smart.BadInput):
                smart.Target("http://h/", **check)

    def test_cli_checks_and_summary(self):
        server = self.serve(lambda server, request, sock: respond(sock, 200, b"hello"))
        out = os.path.join(self.tmp, "check.csv")
        code, _, err = run_cli("measure", "--url", server.url + "/", "--duration", "0.3", "--interval", "0.1",
                               "--expect-status", "200", "--expect-body", "goodbye", "--out", out)
        self.assertEqual(code, 0, err)
        header, rows = read_csv(out)
        self.assertEqual(header[-1], "check")
        self.assertEqual({row[3] for row in rows}, {"body"})
        self.assertIn("3 failed checks", err)
        code, _, err = run_cli("measure", "--url", server.url + "/", "--duration", "0.3", "--out", out,
                               "--expect-status", "two hundred")
        self.assertEqual(code, 2, err)


###### The CSV columns, csv_header and on_row ######

class ColumnTests(Case):

    def test_csv_header_names_the_columns_in_order(self):
        one, checked = smart.Target("http://h/a"), smart.Target("http://h/b", expect_status=200)
        cases = [
            (([one], False), "timestamp,latency_ms,response_code\n"),
            ((one, True), "timestamp,latency_ms,response_code,block\n"),
            (([one, one], False), "timestamp,latency_ms,response_code,url\n"),
            (([checked], False), "timestamp,latency_ms,response_code,check\n"),
            (([one, checked], True), "timestamp,latency_ms,response_code,block,url,check\n"),
        ]
        for (targets, block), header in cases:
            with self.subTest(header=header):
                self.assertEqual(smart.csv_header(targets, block=block), header)

    def test_rows_match_the_header_and_on_row_gets_the_csv_values(self):
        server = self.serve(lambda server, request, sock: respond(sock, 200 if request.target == "/a" else 503))
        targets = [smart.Target(server.url + "/a", expect_status=200),
                   smart.Target(server.url + "/b,c", expect_status=200)]
        path = os.path.join(self.tmp, "columns.csv")
        seen = []
        with open(path, "w", encoding="utf-8", newline="") as handle:
            handle.write(smart.csv_header(targets, block=7))
            result = smart.Prober(targets, 0.4, handle, interval=0.05, block=7,
                                  on_row=lambda *row: seen.append(row)).run()
        header, rows = read_csv(path)
        self.assertEqual(header, ["timestamp", "latency_ms", "response_code", "block", "url", "check"])
        self.assertEqual(len(rows), result.rows)
        self.assertEqual(len(seen), len(rows))
        for row, (latency, code, at, url, check) in zip(rows, seen):
            self.assertEqual(len(row), 6)
            self.assertEqual(latency, float(row[1]))      # exactly the CSV's value
            self.assertEqual((str(code), "7", url, check), (row[2], row[3], row[4], row[5]))
            self.assertIsInstance(at, float)
        self.assertEqual({(row[2], row[4], row[5]) for row in rows},
                         {("200", server.url + "/a", ""), ("503", server.url + "/b%2Cc", "status")})
        self.assertEqual(result.errors, sum(row[2] == "503" for row in rows))
        self.assertEqual(result.check_failures, result.errors)

    def test_cli_summary_reports_bytes(self):
        for size, figure in ((1 << 20, "3.0 MiB received"), (10_000, "29.3 KiB received")):
            with self.subTest(size=size):
                body = b"z" * (2 * size - len(response_bytes(200, b"z" * size)))     # response = size bytes
                server = self.serve(lambda server, request, sock: respond(sock, 200, body))
                out = os.path.join(self.tmp, "bytes.csv")
                code, _, err = run_cli("measure", "--url", server.url + "/", "--duration", "0.3", "--interval",
                                       "0.1", "--out", out)
                self.assertEqual(code, 0, err)
                self.assertIn(figure, err)


if __name__ == "__main__":
    unittest.main()
