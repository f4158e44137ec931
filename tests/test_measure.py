"""The built-in prober of smart.py (SPEC.md "Command line" measure, "Measurement CSV").

Unit cases for the URL/request builder and the response parser, then the prober driven against
scripted servers on 127.0.0.1 (tests/servers.py): the three load shapes, keep-alive reuse and
retry, TLS, error rows, body framing, and `smart.py measure` as a process.  Every server stops in
cleanup and every probe lasts 0.3-3 s.
"""

from __future__ import annotations

import os
import sys
import re
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import unittest
from datetime import datetime
from unittest import mock

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from helpers import HEADER, import_smart, run_cli
from servers import ScriptedServer, hang, ok_handler, reset, respond, response_bytes

smart = import_smart()

ISO_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def read_rows(path):
    """The CSV at path as (timestamp, latency_ms, code) tuples; asserts the SPEC header."""
    with open(path, encoding="utf-8", newline="") as handle:
        lines = handle.read().splitlines()
    if not lines or lines[0] != HEADER:
        raise AssertionError(f"{path}: first line {lines[:1]!r} is not the SPEC header {HEADER!r}")
    rows = []
    for line in lines[1:]:
        stamp, latency, code = line.split(",")
        rows.append((stamp, float(latency), int(code)))
    return rows


def epoch(stamp):
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def p90(rows):
    ok = sorted(latency for _, latency, code in rows if 0 < code < 500)
    return smart.percentile(ok, 90)


def free_port():
    """A port nobody listens on (bound by the OS, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stall_once(start, end):
    """A handler that holds requests arriving in [start, end) s after the first one until `end`."""
    lock = threading.Lock()
    first = []

    def handler(server, request, sock):
        with lock:
            if not first:
                first.append(request.arrived)
        t0 = first[0]
        if start <= request.arrived - t0 < end:
            server.sleep(t0 + end - time.monotonic())
        return respond(sock)
    return handler


class ProberCase(unittest.TestCase):
    """Starts scripted servers (stopped in cleanup) and runs probes into a temporary folder."""

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="smart-measure-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.count = 0

    def serve(self, handler=ok_handler, **options) -> ScriptedServer:
        server = ScriptedServer(handler, **options).start()
        self.addCleanup(server.stop)
        return server

    def probe(self, url, duration, **options):
        """measure_url into a fresh CSV; returns (ProbeResult, rows)."""
        self.count += 1
        path = os.path.join(self.tmp, f"probe{self.count}.csv")
        options.setdefault("timeout", 2.0)
        result = smart.measure_url(url, duration, path, **options)
        rows = read_rows(path)
        self.assertEqual(result.rows, len(rows), "ProbeResult.rows disagrees with the CSV")
        return result, rows

    def assertAllCodes(self, rows, code):
        self.assertTrue(rows, "no rows at all")
        self.assertEqual({c for _, _, c in rows}, {code}, rows[:10])


###### Unit: Target (URL and request bytes) ######

class TargetTests(unittest.TestCase):

    def test_request_line_host_and_default_headers(self):
        target = smart.Target("http://example.com/")
        self.assertEqual((target.host, target.port, target.tls), ("example.com", 80, False))
        lines = target.request.decode("latin-1").split("\r\n")
        self.assertEqual(lines[0], "GET / HTTP/1.1")
        self.assertEqual(lines[1], "Host: example.com")
        self.assertTrue(target.request.endswith(b"\r\n\r\n"))
        self.assertIn("User-Agent: smart.py/", target.request.decode())

    def test_host_header_carries_a_non_default_port(self):
        cases = {
            "http://example.com:8080/": "example.com:8080",
            "https://example.com:8443/": "example.com:8443",
            "https://example.com:443/": "example.com",
            "http://example.com:80/": "example.com",
            "http://[::1]:8080/": "[::1]:8080",
        }
        for url, host in cases.items():
            with self.subTest(url=url):
                request = smart.Target(url).request.decode("latin-1")
                self.assertIn(f"\r\nHost: {host}\r\n", request)

    def test_path_query_method_and_headers(self):
        target = smart.Target("https://example.com:8443/a/b?x=1&y=2", method="post",
                              headers=["X-One: 1", "X-Two:two words "])
        self.assertEqual((target.port, target.tls, target.method), (8443, True, "POST"))
        request = target.request.decode("latin-1")
        self.assertTrue(request.startswith("POST /a/b?x=1&y=2 HTTP/1.1\r\n"), request)
        self.assertIn("\r\nX-One: 1\r\n", request)
        self.assertIn("\r\nX-Two: two words\r\n", request)
        self.assertEqual(smart.Target("http://h").request.split(b"\r\n")[0], b"GET / HTTP/1.1")

    def test_tls_verification_on_unless_insecure(self):
        strict = smart.Target("https://example.com/").ssl_context
        self.assertEqual(strict.verify_mode, ssl.CERT_REQUIRED)
        self.assertTrue(strict.check_hostname)
        loose = smart.Target("https://example.com/", insecure=True).ssl_context
        self.assertEqual(loose.verify_mode, ssl.CERT_NONE)
        self.assertFalse(loose.check_hostname)
        self.assertIsNone(smart.Target("http://example.com/").ssl_context)

    def test_bad_urls_methods_and_headers_are_bad_input(self):
        bad = [
            dict(url="ftp://example.com/"),
            dict(url="example.com:80"),
            dict(url="http:///path"),
            dict(url="http://:8080/"),
            dict(url="http://example.com:99999/"),
            dict(url="http://example.com:http/"),
            dict(url="http://exa mple.com/"),
            dict(url="http://example.com/", method="GE T"),
            dict(url="http://example.com/", method=""),
            dict(url="http://example.com/", headers=["NoColon"]),
            dict(url="http://example.com/", headers=["Bad Name: x"]),
            dict(url="http://example.com/", headers=["X-A: 1\r\nX-Injected: 2"]),
        ]
        for case in bad:
            with self.subTest(**case):
                with self.assertRaises(smart.BadInput):
                    smart.Target(**case)

    def test_port_zero_is_a_bad_port(self):
        # ':0' cannot be connected to; today it silently becomes port 80 (and Host loses the port).
        with self.assertRaises(smart.BadInput):
            smart.Target("http://127.0.0.1:0/")


###### Unit: _Response (head, then the body fed as it arrives) ######

def head(text: str) -> bytearray:
    return bytearray(text.replace("\n", "\r\n").encode("latin-1"))


def body_of(buf: bytearray, response):
    """The bytes after the head, as the prober feeds them."""
    return bytes(buf[response.body_start:])


class ParseHeadTests(unittest.TestCase):

    def parse(self, text, head_request=False):
        return smart._Response.parse_head(head(text), head_request)

    def test_incomplete_head_is_none_and_oversized_head_is_an_error(self):
        self.assertIsNone(self.parse("HTTP/1.1 200 OK\nContent-Length: 5\n"))
        self.assertIsNone(smart._Response.parse_head(bytearray(b""), False))
        with self.assertRaises(ValueError):
            smart._Response.parse_head(bytearray(b"HTTP/1.1 200 OK\r\nX: " + b"a" * 70000), False)
        # A complete head is refused too when it is over the cap.
        with self.assertRaises(ValueError):
            smart._Response.parse_head(bytearray(b"HTTP/1.1 200 OK\r\nX: " + b"a" * 70000 + b"\r\n\r\n"), False)

    def test_a_head_searched_in_steps_is_found_across_the_step(self):
        buf = head("HTTP/1.1 200 OK\nContent-Length: 0\n\n")
        for since in range(len(buf)):
            with self.subTest(since=since):
                response = smart._Response.parse_head(buf, False, since)
                self.assertIsNotNone(response)
                self.assertEqual(response.body_start, len(buf))

    def test_status_length_and_body_start(self):
        buf = head("HTTP/1.1 404 Not Found\nContent-Length: 5\n\nhello")
        response = smart._Response.parse_head(buf, False)
        self.assertEqual(response.status, 404)
        self.assertEqual(response.length, 5)
        self.assertFalse(response.chunked)
        self.assertEqual(body_of(buf, response), b"hello")
        self.assertTrue(response.keep_alive)
        self.assertEqual(response.feed(b"hell"), None)
        # Extra bytes after the body do not move the end.
        self.assertEqual(response.feed(b"oHTTP/1.1"), 1)
        self.assertEqual(response.received, 5)

    def test_header_names_and_values_are_case_insensitive(self):
        response = self.parse("HTTP/1.1 200 OK\nCONTENT-LENGTH: 3\nconnection: CLOSE\n\n")
        self.assertEqual(response.length, 3)
        self.assertFalse(response.keep_alive)
        response = self.parse("HTTP/1.1 200 OK\nTransfer-Encoding: Chunked\n\n")
        self.assertTrue(response.chunked)

    def test_keep_alive_rules(self):
        cases = [
            ("HTTP/1.1 200 OK\nContent-Length: 0\n\n", True),
            ("HTTP/1.1 200 OK\nContent-Length: 0\nConnection: close\n\n", False),
            ("HTTP/1.0 200 OK\nContent-Length: 0\n\n", False),
            ("HTTP/1.0 200 OK\nContent-Length: 0\nConnection: keep-alive\n\n", True),
            ("HTTP/1.1 200 OK\nContent-Length: 0\nConnection: Keep-Alive\n\n", True),
            # No length and not chunked: the body runs to the close, so the connection cannot be kept.
            ("HTTP/1.1 200 OK\n\n", False),
            ("HTTP/1.1 200 OK\nConnection: keep-alive\n\n", False),
        ]
        for text, keep in cases:
            with self.subTest(text=text):
                self.assertIs(self.parse(text).keep_alive, keep)

    def test_read_to_close_has_no_length_and_never_ends_by_itself(self):
        buf = head("HTTP/1.0 200 OK\nContent-Type: text/plain\n\nsome body")
        response = smart._Response.parse_head(buf, False)
        self.assertIsNone(response.length)
        self.assertFalse(response.chunked)
        self.assertTrue(response.to_close)
        self.assertIsNone(response.feed(body_of(buf, response)))
        self.assertIsNone(response.feed(b"x" * 10000))
        self.assertEqual(response.received, 9 + 10000)

    def test_bodyless_responses_end_with_the_head(self):
        for text, head_request in [
            ("HTTP/1.1 200 OK\nContent-Length: 1000\n\n", True),
            ("HTTP/1.1 200 OK\nTransfer-Encoding: chunked\n\n", True),
            ("HTTP/1.1 204 No Content\n\n", False),
            ("HTTP/1.1 304 Not Modified\nContent-Length: 1000\n\n", False),
        ]:
            with self.subTest(text=text, head_request=head_request):
                response = self.parse(text, head_request)
                self.assertEqual(response.length, 0)
                self.assertFalse(response.chunked)
                self.assertTrue(response.keep_alive)
                self.assertEqual(response.feed(b""), 0)

    def test_chunked_takes_precedence_over_content_length(self):
        body = b"5\r\nhello\r\n0\r\n\r\n"
        response = self.parse("HTTP/1.1 200 OK\nContent-Length: 3\nTransfer-Encoding: chunked\n\n")
        self.assertTrue(response.chunked)
        self.assertEqual(response.feed(body), len(body))

    def test_garbage_is_a_value_error(self):
        for text in ["SSH-2.0-OpenSSH_9.6\n\n", "HTTP/2 200\n\n", "HTTP/1.1 abc OK\n\n",
                     "HTTP/1.1 200 OK\nContent-Length: many\n\n", "HTTP/1.1 200 OK\nContent-Length: -1\n\n"]:
            with self.subTest(text=text):
                with self.assertRaises(ValueError):
                    self.parse(text)

    def test_a_content_length_over_the_cap_is_refused_at_the_head(self):
        with self.assertRaises(smart._BodyTooLarge):
            self.parse(f"HTTP/1.1 200 OK\nContent-Length: {17 << 30}\n\n")
        self.assertEqual(self.parse(f"HTTP/1.1 200 OK\nContent-Length: {smart.MAX_BODY}\n\n").length, smart.MAX_BODY)


def chunked():
    return smart._Response.parse_head(head("HTTP/1.1 200 OK\nTransfer-Encoding: chunked\n\n"), False)


class ChunkedBodyTests(unittest.TestCase):

    BODY = b"5\r\nhello\r\n6;name=value\r\n world\r\n1a\r\n" + b"z" * 26 + b"\r\n0\r\n\r\n"
    CASES = [
        b"0\r\n\r\n",
        b"5\r\nhello\r\n0\r\n\r\n",
        BODY,
        b"5\r\nhello\r\n0\r\nX-Trailer: 1\r\nX-Other: 2\r\n\r\n",
        b"A\r\n0123456789\r\n0\r\n\r\n",
        b"5\nhello\n0\n\n",                        # bare LF line ends, as RFC 9112 lets a client accept
    ]

    def test_complete_bodies_end_at_the_last_chunk(self):
        for body in self.CASES:
            with self.subTest(body=body):
                self.assertEqual(chunked().feed(body), len(body))
                # Whatever follows (the next response) does not count.
                self.assertEqual(chunked().feed(body + b"HTTP/1.1 200"), len(body))

    def test_fed_in_two_pieces_at_every_split(self):
        for body in self.CASES:
            for cut in range(len(body)):
                with self.subTest(body=body, cut=cut):
                    response = chunked()
                    self.assertIsNone(response.feed(body[:cut]))
                    self.assertEqual(response.feed(body[cut:] + b"next"), len(body) - cut)
                    self.assertEqual(response.received, len(body))

    def test_fed_byte_by_byte(self):
        response = chunked()
        ends = [response.feed(self.BODY[i:i + 1]) for i in range(len(self.BODY))]
        self.assertEqual(ends, [None] * (len(self.BODY) - 1) + [1])

    def test_every_prefix_is_incomplete(self):
        for body in self.CASES:
            for cut in range(len(body)):
                with self.subTest(body=body, cut=cut):
                    self.assertIsNone(chunked().feed(body[:cut]))

    def test_bad_chunk_framing_is_a_value_error(self):
        for body in (b"zz\r\nhello\r\n", b"\r\nhello\r\n", b"5 5\r\nhello\r\n", b"-5\r\nhello\r\n0\r\n\r\n",
                     b"3\r\n-2 \r\n-b\r\n", b"0x5\r\nhello\r\n", b"5\r\nhello world\r\n",
                     b"11111111111111111\r\n"):
            with self.subTest(body=body):
                with self.assertRaises(ValueError):
                    chunked().feed(body)

    def test_an_endless_size_line_or_trailer_is_an_error_not_a_buffer(self):
        for start in (b"", b"0\r\nX-Trailer: "):
            with self.subTest(start=start):
                response = chunked()
                with self.assertRaises(ValueError):
                    response.feed(start)
                    for _ in range(10):
                        response.feed(b"1" * 1000)

    def test_a_body_over_the_cap_is_refused_as_it_streams(self):
        with mock.patch.object(smart, "MAX_BODY", 1000):
            for response, piece in ((chunked(), b"10\r\n" + b"x" * 16 + b"\r\n"),
                                    (smart._Response.parse_head(head("HTTP/1.0 200 OK\n\n"), False), b"x" * 22)):
                with self.subTest(chunked=response.chunked):
                    with self.assertRaises(smart._BodyTooLarge):
                        for _ in range(50):
                            response.feed(piece)
                    self.assertGreater(response.received, 1000)
                    self.assertLess(response.received, 1000 + len(piece) + 1)


class BodyCheckTests(unittest.TestCase):
    """The expected text is looked for in the body as it streams, keeping only a short window."""

    def feed_split(self, response, body, cuts):
        pieces = [body[a:b] for a, b in zip((0, *cuts), (*cuts, len(body)))]
        ends = [response.feed(piece) for piece in pieces]
        return ends[-1]

    def test_found_across_every_split(self):
        body = b"<html><title>Welcome to WordPress</title></html>"
        for cut in range(len(body) + 1):
            with self.subTest(cut=cut):
                response = smart._Response.parse_head(head(f"HTTP/1.1 200 OK\nContent-Length: {len(body)}\n\n"), False)
                response.expect = b"WordPress"
                self.assertEqual(self.feed_split(response, body, [cut]), len(body) - cut if cut < len(body) else 0)
                self.assertTrue(response.found)
                self.assertLessEqual(len(response.window), len(b"WordPress") - 1)

    def test_found_across_chunks_and_not_in_the_framing(self):
        response = chunked()
        response.expect = b"hello world"
        body = b"6\r\nhello \r\n5\r\nworld\r\n0\r\n\r\n"
        self.assertEqual(response.feed(body), len(body))
        self.assertTrue(response.found)
        # "a\r\nb" spans the framing between chunks "a" and "b": not body text.
        response = chunked()
        response.expect = b"a1\r\nb"
        response.feed(b"1\r\na\r\n1\r\nb\r\n0\r\n\r\n")
        self.assertFalse(response.found)

    def test_missing_text_is_not_found(self):
        response = smart._Response.parse_head(head("HTTP/1.1 200 OK\nContent-Length: 12\n\n"), False)
        response.expect = b"WordPress"
        self.assertEqual(response.feed(b"Word" + b"press!!!"), 12)   # the text is matched case and all
        self.assertFalse(response.found)
        one = smart._Response.parse_head(head("HTTP/1.1 200 OK\nContent-Length: 3\n\n"), False)
        one.expect = b"b"
        one.feed(b"abc")
        self.assertTrue(one.found)


###### Load shapes ######

class LoadShapeTests(ProberCase):

    def test_interval_probes_one_at_a_time_over_one_connection(self):
        server = self.serve()
        result, rows = self.probe(server.url + "/", 1.0, interval=0.1)
        self.assertLessEqual(abs(len(rows) - 10), 1, f"{len(rows)} rows for 1 s at 0.1 s")
        self.assertAllCodes(rows, 200)
        self.assertEqual(result.connections, 1)
        self.assertEqual(server.connections, 1)
        self.assertEqual(server.max_in_flight, 1)
        self.assertEqual(len(server.requests), len(rows))
        # Rows are stamped with the due time: one every interval.
        stamps = [epoch(stamp) for stamp, _, _ in rows]
        for a, b in zip(stamps, stamps[1:]):
            self.assertAlmostEqual(b - a, 0.1, delta=0.0025)
        for stamp, _, _ in rows:
            self.assertRegex(stamp, ISO_MS)
        self.assertLess(abs(stamps[0] - time.time()), 10)

    def test_concurrency_keeps_n_requests_in_flight(self):
        def slow(server, request, sock):
            server.sleep(0.05)
            return respond(sock)
        server = self.serve(slow)
        result, rows = self.probe(server.url + "/", 1.0, concurrency=4)
        self.assertEqual(server.max_in_flight, 4, "the server never saw 4 requests at once")
        self.assertEqual(result.max_in_flight, 4)
        self.assertEqual(server.connections, 4)
        self.assertEqual(result.connections, 4)
        self.assertAllCodes(rows, 200)
        # Closed loop: ~4 * 1 s / 50 ms = 80 requests, each counted from its send (>= 50 ms).
        self.assertTrue(55 <= len(rows) <= 88, len(rows))
        self.assertGreaterEqual(min(latency for _, latency, _ in rows), 49.0)

    def test_rate_sends_r_times_duration_requests(self):
        server = self.serve()
        result, rows = self.probe(server.url + "/", 1.5, rate=200)
        self.assertLessEqual(abs(len(rows) - 300), 6, f"{len(rows)} rows for 200/s over 1.5 s")
        self.assertAllCodes(rows, 200)
        self.assertEqual(len(server.requests), len(rows))
        stamps = sorted(epoch(stamp) for stamp, _, _ in rows)
        self.assertAlmostEqual(stamps[-1] - stamps[0], 1.5, delta=0.03)
        # An idle keep-alive connection is reused rather than one per request (a loaded box needs a
        # few more in flight, never anything near one per request).
        self.assertLessEqual(result.connections, 30)

    def test_rate_counts_latency_from_the_due_time_through_a_stall(self):
        # Requests arriving between 0.5 s and 1.5 s wait until 1.5 s: a 1 s stall, once.
        server = self.serve(stall_once(0.5, 1.5))
        result, rows = self.probe(server.url + "/", 2.5, rate=100, timeout=3.0)
        self.assertLessEqual(abs(len(rows) - 250), 5, f"{len(rows)} rows for 100/s over 2.5 s")
        self.assertAllCodes(rows, 200)
        self.assertGreaterEqual(p90(rows), 200.0)
        self.assertGreaterEqual(max(latency for _, latency, _ in rows), 800.0)

    def test_rate_behind_the_in_flight_cap_still_counts_from_due(self):
        # One request at a time: a 1 s stall delays the ~50 requests queued behind it.  Counted from
        # when they were sent (coordinated omission) they would look fast; from due they are not.
        server = self.serve(stall_once(0.3, 1.3))
        result, rows = self.probe(server.url + "/", 2.0, rate=50, max_in_flight=1, timeout=3.0)
        self.assertLessEqual(abs(len(rows) - 100), 2, len(rows))
        self.assertAllCodes(rows, 200)
        self.assertEqual(server.max_in_flight, 1)
        self.assertGreater(result.cap_hits, 0)
        self.assertGreaterEqual(p90(rows), 200.0)
        slow = [latency for _, latency, _ in rows if latency >= 100.0]
        self.assertGreaterEqual(len(slow), 30, "requests queued behind the stall were not counted from due")

    def test_two_shapes_at_once_is_bad_input_before_anything(self):
        server = self.serve()
        path = os.path.join(self.tmp, "two.csv")
        target = smart.Target(server.url)
        with open(os.devnull, "w") as sink, self.assertRaises(smart.BadInput):
            smart.Prober(target, 1.0, sink, interval=1.0, rate=5.0)
        with self.assertRaises(smart.BadInput):
            smart.measure_url(server.url, 1.0, path, concurrency=2, rate=5.0)
        self.assertEqual(server.connections, 0)
        self.assertFalse(os.path.exists(path), "measure_url created the CSV before rejecting its arguments")


###### Keep-alive ######

class KeepAliveTests(ProberCase):

    def test_many_probes_over_exactly_one_connection(self):
        for shape in (dict(interval=0.02), dict(concurrency=1)):
            with self.subTest(**shape):
                server = self.serve()
                result, rows = self.probe(server.url + "/", 0.6, **shape)
                self.assertGreaterEqual(len(rows), 25)
                self.assertAllCodes(rows, 200)
                self.assertEqual(server.connections, 1)
                self.assertEqual(result.connections, 1)
                self.assertEqual([r.conn_id for r in server.requests], [0] * len(rows))

    def test_idle_connection_closed_by_the_server_is_replaced(self):
        # The server drops a connection 50 ms after each response; probes come every 250 ms.
        server = self.serve(keepalive_timeout=0.05)
        result, rows = self.probe(server.url + "/", 1.0, interval=0.25)
        self.assertEqual(len(rows), 4)
        self.assertAllCodes(rows, 200)
        self.assertEqual(result.errors, 0)
        self.assertEqual(server.connections, 4)

    def test_connection_closed_on_the_next_request_is_retried(self):
        # The race of a keep-alive timeout: the server closes (FIN or RST) when the next request
        # arrives on a connection, without answering.  The prober retries once on a new connection.
        def close_on_second(server, request, sock):
            if request.index >= 1:
                return False
            return respond(sock)

        def reset_on_second(server, request, sock):
            if request.index >= 1:
                return reset(sock)
            return respond(sock)

        for name, handler in (("fin", close_on_second), ("rst", reset_on_second)):
            for shape in (dict(interval=0.05), dict(concurrency=1), dict(rate=40)):
                with self.subTest(close=name, **shape):
                    server = self.serve(handler)
                    result, rows = self.probe(server.url + "/", 0.5, **shape)
                    self.assertGreaterEqual(len(rows), 10)
                    self.assertAllCodes(rows, 200)
                    self.assertEqual(result.errors, 0)
                    self.assertGreaterEqual(server.connections, len(rows))

    def test_reset_right_after_a_response_in_open_loop(self):
        # The server answers with keep-alive, then resets the connection at once.  With a backlog
        # (--rate above what one connection serves) the prober reuses that connection before it has
        # seen the reset: it must retry or write an error row, never raise out of run().
        def answer_then_reset(server, request, sock):
            server.sleep(0.002)
            respond(sock)
            return reset(sock)
        for attempt in range(3):
            with self.subTest(attempt=attempt):
                server = self.serve(answer_then_reset)
                try:
                    result, rows = self.probe(server.url + "/", 0.4, rate=1000, max_in_flight=1)
                except OSError as exc:
                    self.fail(f"Prober.run raised {exc!r} (send on a reset keep-alive connection)")
                self.assertTrue(rows)
                self.assertEqual(result.rows, len(rows))


###### TLS ######

class TLSTests(ProberCase):

    @classmethod
    def setUpClass(cls):
        openssl = shutil.which("openssl")
        if not openssl:
            raise unittest.SkipTest("openssl is not installed")
        cls.certdir = tempfile.mkdtemp(prefix="smart-tls-")
        cls.cert = os.path.join(cls.certdir, "cert.pem")
        cls.key = os.path.join(cls.certdir, "key.pem")
        try:
            subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                            "-subj", "/CN=localhost", "-keyout", cls.key, "-out", cls.cert],
                           check=True, capture_output=True, timeout=60)
        except (subprocess.SubprocessError, OSError) as exc:
            shutil.rmtree(cls.certdir, True)
            raise unittest.SkipTest(f"openssl could not make a certificate: {exc}")

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.certdir, True)

    def tls_server(self, handler=ok_handler):
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert, self.key)
        return self.serve(handler, tls_context=context)

    def test_insecure_probes_a_self_signed_server(self):
        server = self.tls_server()
        for shape in (dict(interval=0.05), dict(concurrency=2), dict(rate=50)):
            with self.subTest(**shape):
                before = server.connections
                result, rows = self.probe(server.url + "/", 0.5, insecure=True, **shape)
                self.assertGreaterEqual(len(rows), 10)
                self.assertAllCodes(rows, 200)
                self.assertEqual(result.errors, 0)
                if "interval" in shape:
                    self.assertEqual(server.connections - before, 1, "TLS keep-alive not reused")

    def test_verification_failure_is_an_error_row_not_a_crash(self):
        server = self.tls_server()
        for url in (server.url + "/", f"https://localhost:{server.port}/"):
            with self.subTest(url=url):
                result, rows = self.probe(url, 0.5, interval=0.1)
                self.assertEqual(len(rows), 5)
                self.assertAllCodes(rows, 0)
                self.assertEqual(result.errors, 5)
        self.assertEqual(server.requests, [], "a request went out over an unverified connection")

    def test_cli_insecure(self):
        server = self.tls_server()
        out = os.path.join(self.tmp, "tls.csv")
        code, _, err = run_cli("measure", "--url", server.url + "/", "--duration", "0.5", "--interval", "0.1",
                               "--insecure", "--out", out)
        self.assertEqual(code, 0, err)
        self.assertAllCodes(read_rows(out), 200)


###### Error rows ######

class ErrorRowTests(ProberCase):

    def test_closed_port_gives_code_0_rows_and_exit_0(self):
        out = os.path.join(self.tmp, "closed.csv")
        code, _, err = run_cli("measure", "--url", f"http://127.0.0.1:{free_port()}/", "--duration", "0.5",
                               "--interval", "0.1", "--out", out)
        self.assertEqual(code, 0, err)
        self.assertNotIn("Traceback", err)
        rows = read_rows(out)
        self.assertEqual(len(rows), 5)
        self.assertAllCodes(rows, 0)
        arm = smart.read_measurements(out)
        self.assertEqual((arm.total, arm.errors, arm.ok), (5, 5, 0))

    def test_closed_port_in_a_closed_loop_does_not_spin(self):
        result, rows = self.probe(f"http://127.0.0.1:{free_port()}/", 0.5, concurrency=2)
        self.assertAllCodes(rows, 0)
        self.assertEqual(result.errors, len(rows))
        self.assertLess(len(rows), 500, "a refused port became a busy loop")

    def test_server_that_never_answers_gives_timeout_rows(self):
        server = self.serve(hang)
        started = time.monotonic()
        result, rows = self.probe(server.url + "/", 1.0, interval=0.5, timeout=0.3)
        self.assertLess(time.monotonic() - started, 3.0)
        self.assertEqual(len(rows), 2)
        self.assertAllCodes(rows, 0)
        for _, latency, _ in rows:
            self.assertTrue(295.0 <= latency <= 450.0, f"timeout row latency {latency} ms, timeout 300 ms")
        self.assertEqual(len(server.requests), 2)

    def test_reset_mid_body_is_code_0(self):
        def truncated(server, request, sock):
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n0123456789")
            return False

        def truncated_rst(server, request, sock):
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n0123456789")
            server.sleep(0.01)
            return reset(sock)

        for name, handler in (("fin", truncated), ("rst", truncated_rst)):
            with self.subTest(close=name):
                server = self.serve(handler)
                result, rows = self.probe(server.url + "/", 0.5, interval=0.1)
                self.assertEqual(len(rows), 5)
                self.assertAllCodes(rows, 0)
                self.assertEqual(len(server.requests), 5, "a partly answered request was sent again")

    def test_truncated_response_on_a_reused_connection_is_not_retried(self):
        # First request on each connection answered, the second cut mid-body: 200, 0, 200, 0...
        def second_truncated(server, request, sock):
            if request.index == 0:
                return respond(sock)
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n0123456789")
            return False
        server = self.serve(second_truncated)
        result, rows = self.probe(server.url + "/", 0.6, interval=0.1)
        self.assertEqual([code for _, _, code in rows], [200, 0] * 3)
        self.assertEqual(result.errors, 3)

    def test_5xx_counts_as_errors(self):
        server = self.serve(lambda server, request, sock: respond(sock, 503, b"busy"))
        result, rows = self.probe(server.url + "/", 0.3, concurrency=1)
        self.assertAllCodes(rows, 503)
        self.assertEqual(result.errors, len(rows))
        arm = smart.read_measurements(os.path.join(self.tmp, f"probe{self.count}.csv"))
        self.assertEqual((arm.errors, arm.ok), (len(rows), 0))

        flip = self.serve(lambda server, request, sock: respond(sock, 500 if len(server.requests) % 2 == 0 else 200))
        result, rows = self.probe(flip.url + "/", 0.3, concurrency=1)
        codes = [code for _, _, code in rows]
        self.assertEqual(set(codes), {200, 500})
        self.assertEqual(result.errors, codes.count(500))
        self.assertEqual(flip.connections, 1, "a 5xx with keep-alive should not cost the connection")

        four = self.serve(lambda server, request, sock: respond(sock, 404, b"no"))
        result, rows = self.probe(four.url + "/", 0.3, interval=0.1)
        self.assertAllCodes(rows, 404)
        self.assertEqual(result.errors, 0, "4xx is an HTTP answer, not an error (SPEC: 5xx and 0)")

    def test_garbage_instead_of_http_is_code_0(self):
        def garbage(server, request, sock):
            sock.sendall(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
            return False
        server = self.serve(garbage)
        result, rows = self.probe(server.url + "/", 0.5, interval=0.1)
        self.assertEqual(len(rows), 5)
        self.assertAllCodes(rows, 0)


###### Body framing, methods, headers ######

class FramingTests(ProberCase):

    def test_chunked_response_ends_at_the_last_chunk(self):
        def chunked(server, request, sock):
            sock.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
            server.sleep(0.15)
            sock.sendall(b"6;ext=1\r\n world\r\n0\r\nX-Trailer: yes\r\n\r\n")
            return True
        server = self.serve(chunked)
        result, rows = self.probe(server.url + "/", 0.6, interval=0.3)
        self.assertEqual(len(rows), 2)
        self.assertAllCodes(rows, 200)
        for _, latency, _ in rows:
            self.assertTrue(150.0 <= latency < 1000.0, f"latency {latency} ms: not the end of the body")
        self.assertEqual(server.connections, 1, "keep-alive lost after a chunked body")

    def test_many_small_chunked_responses_back_to_back(self):
        body = b"".join(b"%x\r\n%s\r\n" % (n, b"x" * n) for n in range(1, 40)) + b"0\r\n\r\n"
        server = self.serve(lambda server, request, sock: sock.sendall(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + body) or True)
        result, rows = self.probe(server.url + "/", 0.4, concurrency=1)
        self.assertGreaterEqual(len(rows), 20)
        self.assertAllCodes(rows, 200)
        self.assertEqual(server.connections, 1)

    def test_content_length_body_ends_at_its_last_byte(self):
        def slow_body(server, request, sock):
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello")
            server.sleep(0.15)
            sock.sendall(b"world")
            return True
        server = self.serve(slow_body)
        result, rows = self.probe(server.url + "/", 0.6, interval=0.3)
        self.assertAllCodes(rows, 200)
        self.assertEqual(len(rows), 2)
        self.assertGreaterEqual(min(latency for _, latency, _ in rows), 150.0)
        self.assertEqual(server.connections, 1)

    def test_response_without_length_is_read_to_close(self):
        def to_close(version, extra):
            def handler(server, request, sock):
                sock.sendall(f"HTTP/{version} 200 OK\r\n{extra}Content-Type: text/plain\r\n\r\npart one, ".encode())
                server.sleep(0.15)
                sock.sendall(b"part two")
                return False
            return handler
        for version, extra in (("1.0", ""), ("1.1", "Connection: close\r\n"), ("1.1", "")):
            with self.subTest(version=version, extra=extra):
                server = self.serve(to_close(version, extra))
                result, rows = self.probe(server.url + "/", 0.6, interval=0.3)
                self.assertEqual(len(rows), 2)
                self.assertAllCodes(rows, 200)
                self.assertGreaterEqual(min(latency for _, latency, _ in rows), 150.0)
                self.assertEqual(server.connections, 2)
                self.assertEqual(result.connections, 2)

    def test_head_request_expects_no_body(self):
        def head_only(server, request, sock):
            if request.method != "HEAD":
                return respond(sock, 405, b"")
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
            return True
        server = self.serve(head_only)
        result, rows = self.probe(server.url + "/", 0.5, interval=0.1, method="HEAD", timeout=1.0)
        self.assertEqual(len(rows), 5)
        self.assertAllCodes(rows, 200)
        self.assertLess(max(latency for _, latency, _ in rows), 500.0, "waited for a body after HEAD")
        self.assertEqual(server.connections, 1)
        self.assertEqual(set(server.methods), {"HEAD"})

    def test_method_headers_path_and_host_reach_the_server(self):
        server = self.serve()
        result, rows = self.probe(server.url + "/some/path?q=1&r=two", 0.3, interval=0.1, method="put",
                                  headers=["X-Smart-Test: yes", "Authorization: Bearer abc"])
        self.assertAllCodes(rows, 200)
        request = server.requests[0]
        self.assertEqual(request.method, "PUT")
        self.assertEqual(request.target, "/some/path?q=1&r=two")
        self.assertEqual(request.version, "HTTP/1.1")
        self.assertEqual(request.headers.get("host"), f"127.0.0.1:{server.port}")
        self.assertEqual(request.headers.get("x-smart-test"), "yes")
        self.assertEqual(request.headers.get("authorization"), "Bearer abc")
        self.assertTrue(request.headers.get("user-agent", "").startswith("smart.py/"))

    def test_host_header_with_a_name(self):
        server = self.serve()
        self.probe(f"http://localhost:{server.port}/", 0.2, interval=0.1)
        self.assertEqual(server.requests[0].headers.get("host"), f"localhost:{server.port}")

    def test_interim_1xx_response_is_skipped(self):
        # RFC 9110 15.2: a client must accept 1xx responses before the final one (e.g. 103 Early Hints).
        def early_hints(server, request, sock):
            sock.sendall(response_bytes(103, b"", ["Link: </style.css>; rel=preload"], length=False)
                         + response_bytes(200, b"ok"))
            return True
        server = self.serve(early_hints)
        result, rows = self.probe(server.url + "/", 0.3, interval=0.1)
        self.assertEqual([code for _, _, code in rows], [200] * 3)


###### The command line ######

class CommandLineTests(ProberCase):

    def fresh(self, name):
        """A path in the temporary folder that no earlier call returned."""
        self.count += 1
        return os.path.join(self.tmp, f"{self.count}-{name}")

    def assertUsageError(self, args, out, server=None):
        code, stdout, err = run_cli("measure", *args)
        self.assertEqual(code, 2, f"args {args}: exit {code}, stderr {err!r}")
        self.assertNotIn("Traceback", err)
        lines = err.strip().splitlines()
        self.assertEqual(len(lines), 1, f"args {args}: stderr {err!r}")
        self.assertTrue(lines[0].startswith("error:"), lines[0])
        self.assertFalse(os.path.exists(out), f"args {args}: {out} was created")
        if server is not None:
            self.assertEqual(server.connections, 0, f"args {args}: something was sent")

    def test_measure_writes_a_spec_csv(self):
        server = self.serve()
        out = os.path.join(self.tmp, "f.csv")
        code, stdout, err = run_cli("measure", "--url", server.url + "/", "--duration", "1", "--out", out)
        self.assertEqual(code, 0, err)
        self.assertNotIn("Traceback", err)
        with open(out, encoding="utf-8") as handle:
            self.assertEqual(handle.readline(), "timestamp,latency_ms,response_code\n")
        rows = read_rows(out)
        self.assertGreaterEqual(len(rows), 1)
        self.assertAllCodes(rows, 200)
        for stamp, latency, _ in rows:
            self.assertRegex(stamp, ISO_MS)
            self.assertGreaterEqual(latency, 0.0)
        arm = smart.read_measurements(out)
        self.assertEqual((arm.total, arm.errors, arm.ok), (len(rows), 0, len(rows)))
        self.assertIn("requests", err)

    def test_each_shape_from_the_command_line(self):
        def slow(server, request, sock):
            server.sleep(0.02)
            return respond(sock)
        cases = [
            (["--interval", "0.1"], lambda rows, server: self.assertLessEqual(abs(len(rows) - 10), 1)),
            (["--concurrency", "3"], lambda rows, server: self.assertEqual(server.max_in_flight, 3)),
            (["--rate", "100"], lambda rows, server: self.assertLessEqual(abs(len(rows) - 100), 2)),
        ]
        for shape, check in cases:
            with self.subTest(shape=shape):
                server = self.serve(slow)
                out = os.path.join(self.tmp, f"shape{shape[0]}.csv")
                code, _, err = run_cli("measure", "--url", server.url + "/", "--duration", "1", "--out", out, *shape)
                self.assertEqual(code, 0, err)
                rows = read_rows(out)
                self.assertAllCodes(rows, 200)
                check(rows, server)

    def test_method_and_header_flags(self):
        server = self.serve()
        out = os.path.join(self.tmp, "m.csv")
        code, _, err = run_cli("measure", "--url", server.url + "/x", "--duration", "0.3", "--interval", "0.1",
                               "--method", "PATCH", "--header", "X-Smart-Test: 1", "--header", "X-Two:2",
                               "--timeout", "1", "--out", out)
        self.assertEqual(code, 0, err)
        self.assertEqual(set(server.methods), {"PATCH"})
        self.assertEqual(server.requests[0].headers.get("x-smart-test"), "1")
        self.assertEqual(server.requests[0].headers.get("x-two"), "2")
        self.assertEqual(server.requests[0].headers.get("host"), f"127.0.0.1:{server.port}")

    def test_bad_urls_exit_2_and_send_nothing(self):
        server = self.serve()
        port = server.port
        for url in (f"ftp://127.0.0.1:{port}/", f"127.0.0.1:{port}", "http:///path", f"http://:{port}/",
                    "http://127.0.0.1:99999/", "http://127.0.0.1:port/", "http://127.0.0.1:-1/",
                    f"http://127.0.0.1:{port}/a b"):
            with self.subTest(url=url):
                out = self.fresh("bad-url.csv")
                self.assertUsageError(["--url", url, "--duration", "1", "--out", out], out, server)

    def test_port_zero_exits_2(self):
        out = os.path.join(self.tmp, "port0.csv")
        self.assertUsageError(["--url", "http://127.0.0.1:0/", "--duration", "0.3", "--out", out], out)

    def test_bad_duration_exits_2_and_sends_nothing(self):
        server = self.serve()
        for duration in ("abc", "", "0", "-1", "nan", "inf", "1e300"):
            with self.subTest(duration=duration):
                out = self.fresh("bad-duration.csv")
                self.assertUsageError(["--url", server.url, "--duration", duration, "--out", out], out, server)

    def test_two_shapes_exit_2(self):
        server = self.serve()
        for shape in (["--interval", "1", "--rate", "5"], ["--concurrency", "2", "--rate", "5"],
                      ["--interval", "1", "--concurrency", "2"]):
            with self.subTest(shape=shape):
                out = self.fresh("two.csv")
                self.assertUsageError(["--url", server.url, "--duration", "1", "--out", out, *shape], out, server)

    def test_bad_shape_and_request_values_exit_2_and_send_nothing(self):
        server = self.serve()
        for extra in (["--rate", "0"], ["--rate", "-5"], ["--concurrency", "0"], ["--concurrency", "two"],
                      ["--interval", "0"], ["--timeout", "0"], ["--timeout", "nan"], ["--max-in-flight", "0"],
                      ["--rate", "1e-300"], ["--timeout", "1e300"], ["--interval", "1e300"],
                      ["--method", "GE T"], ["--header", "NoColon"]):
            with self.subTest(extra=extra):
                out = self.fresh("bad-value.csv")
                self.assertUsageError(["--url", server.url, "--duration", "1", "--out", out, *extra], out, server)

    def test_missing_required_flags_exit_2(self):
        for make in (lambda out: ["--duration", "1", "--out", out],
                     lambda out: ["--url", "http://127.0.0.1:1/", "--out", out],
                     lambda out: ["--url", "http://127.0.0.1:1/", "--duration", "1"]):
            out = self.fresh("missing.csv")
            args = make(out)
            with self.subTest(args=args):
                self.assertUsageError(args, out)

    def test_unwritable_out_exits_2(self):
        server = self.serve()
        out = os.path.join(self.tmp, "no-such-dir", "f.csv")
        self.assertUsageError(["--url", server.url, "--duration", "1", "--out", out], out, server)


if __name__ == "__main__":
    unittest.main()
