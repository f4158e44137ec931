"""Phone home (SPEC.md "Phone home", issue 7): a coach outside the trust boundary, asked safely.

Every coach here is a stdlib http.server on 127.0.0.1 (OS-assigned port) started by the test, whose
behaviour each test sets: advice, 5xx, 4xx, hangs, slow drips, garbage, a 10 MB body, redirects, and
an Ollama-style /api/generate and /api/chat.  No traffic leaves 127.0.0.1: the plain-http warning
for a remote host is checked with the opener replaced, so nothing is sent anywhere.

Unit tests call smart.phone_home / parse_coach_reply / wants_coach in this process; the end-to-end
tests run `smart.py run` and `smart.py phone-home` as subprocesses against a smart.DemoTarget.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import http.server
import io
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
import unittest
import urllib.error
from unittest import mock

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from helpers import SMART_PY, clean_env, import_smart  # noqa: E402

smart = import_smart()

TOKEN = "s3cr3t-token-xyz"
DEFINED = ["baseline", "noop", "response_cache"]
ADVICE = "Keep response_cache; try a longer measurement next time."


# ---------------------------------------------------------------- the stdlib coach server

def send(handler, status, body: bytes, ctype="application/json", headers=()):
    handler.send_response(status)
    handler.send_header("Content-Type", ctype)
    handler.send_header("Content-Length", str(len(body)))
    for name, value in headers:
        handler.send_header(name, value)
    handler.end_headers()
    handler.wfile.write(body)


def reply_json(obj, status=200):
    data = json.dumps(obj).encode()
    return lambda handler, coach, index: send(handler, status, data)


def reply_raw(data: bytes, status=200, ctype="application/json"):
    return lambda handler, coach, index: send(handler, status, data, ctype)


def reply_status(status):
    return reply_json({"error": f"status {status}"}, status)


def sequence(*responders):
    """The n-th request gets the n-th responder; the last one repeats."""
    return lambda handler, coach, index: responders[min(index, len(responders) - 1)](handler, coach, index)


def hang(seconds=30.0):
    """Say nothing until the test ends (or `seconds`), then answer with advice."""
    def respond(handler, coach, index):
        coach.release.wait(seconds)
        send(handler, 200, json.dumps({"advice": "late"}).encode())
    return respond


def drip(seconds=5.0, every=0.25):
    """Headers at once, then one byte of body every `every` seconds: never silent long enough for a socket timeout."""
    def respond(handler, coach, index):
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", "100000")
        handler.end_headers()
        handler.wfile.flush()
        end = time.monotonic() + seconds
        while time.monotonic() < end and not coach.release.is_set():
            handler.wfile.write(b" ")
            handler.wfile.flush()
            time.sleep(every)
    return respond


def huge(total=10 * 1024 * 1024, content_length=True):
    """A 10 MB body written in 64 KiB pieces; counts what the client let through before it hung up."""
    piece = b"x" * 65536

    def respond(handler, coach, index):
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        if content_length:
            handler.send_header("Content-Length", str(total))
        handler.end_headers()
        sent = 0
        try:
            while sent < total:
                handler.wfile.write(piece)
                sent += len(piece)
        finally:
            coach.bytes_sent = sent
    return respond


def redirect(location, status=302):
    def respond(handler, coach, index):
        send(handler, status, b"", headers=[("Location", location)])
    return respond


def hang_up(handler, coach, index):
    """Accept the request, then close the connection without a response (a connection error)."""
    handler.close_connection = True
    handler.wfile.flush()
    with contextlib.suppress(OSError):
        handler.connection.shutdown(socket.SHUT_RDWR)


def ollama(text):
    """An Ollama-compatible fake: /api/generate -> {"response": text}, /api/chat -> {"message": {...}}."""
    def respond(handler, coach, index):
        if handler.path.endswith("/api/generate"):
            body = {"model": "m", "created_at": "2025-01-01T00:00:00Z", "response": text, "done": True}
        elif handler.path.endswith("/api/chat"):
            body = {"model": "m", "message": {"role": "assistant", "content": text}, "done": True}
        else:
            body = {"error": "not found"}
            return send(handler, 404, json.dumps(body).encode())
        send(handler, 200, json.dumps(body).encode())
    return respond


class _CoachHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        coach = self.server.coach
        index = coach.record(self, body)
        try:
            coach.respond(self, coach, index)
        except OSError:
            pass                      # the client hung up: expected for the large and slow replies

    do_GET = do_POST
    do_PUT = do_POST


class _CoachHTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass


class Coach:
    """A coach on 127.0.0.1 that records every request (method, path, headers, body, arrival time)."""

    def __init__(self, respond, cleanup, tls_context=None):
        self.respond = respond
        self.requests = []
        self.lock = threading.Lock()
        self.release = threading.Event()
        self.bytes_sent = None
        self.httpd = _CoachHTTPServer(("127.0.0.1", 0), _CoachHandler)
        self.httpd.coach = self
        if tls_context is not None:
            self.httpd.socket = tls_context.wrap_socket(self.httpd.socket, server_side=True)
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()
        cleanup(self.close)

    def record(self, handler, body: bytes) -> int:
        try:
            parsed = json.loads(body) if body else None
        except ValueError:
            parsed = None
        with self.lock:
            self.requests.append({"method": handler.command, "path": handler.path,
                                  "headers": {k.lower(): v for k, v in handler.headers.items()},
                                  "raw": body, "json": parsed, "at": time.monotonic()})
            return len(self.requests) - 1

    def url(self, path="/coach", scheme="http"):
        return f"{scheme}://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def close(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


def free_port() -> int:
    """A 127.0.0.1 port with nothing listening on it (a coach that is down)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def down_url() -> str:
    return f"http://127.0.0.1:{free_port()}/coach"


def coach_settings(url, token=TOKEN, **extra):
    environ = {"PHONE_HOME_URL": url, "PHONE_HOME_TOKEN": token, "PHONE_HOME": "always",
               "COMMAND_TIMEOUT_SECONDS": "5"}
    environ.update({key: str(value) for key, value in extra.items()})
    return smart.load_settings(None, environ=environ)


def make_state(borderline=True, run_id="20250121T143022"):
    return {
        "run_id": run_id, "experiment": "001_demo_cache", "description": "Does a cache help?",
        "kept_variant": None, "status": "done", "phase": "finished",
        "metrics": {"base_p50_ms": 45.2, "var_p50_ms": 41.6, "base_err_pct": 0.0, "var_err_pct": 0.0},
        "variants": [
            {"name": "noop", "decision": "revert", "reason": "no improvement", "borderline": False,
             "metrics": {"base_p50_ms": 45.2, "var_p50_ms": 45.0, "improve_pct": 0.4}},
            {"name": "response_cache", "decision": "revert", "reason": "8.0% < 10%", "borderline": borderline,
             "metrics": {"base_p50_ms": 45.2, "var_p50_ms": 41.6, "improve_pct": 8.0, "improve_ci": [2.1, 13.9]}},
        ],
        "defined_variants": list(DEFINED), "updated_at": "2025-01-21T14:35:22Z",
    }


class FakeClock:
    """clock()/sleep() for phone_home: sleeping advances the clock; nothing really waits."""

    def __init__(self):
        self.now = 1000.0
        self.sleeps = []

    def clock(self):
        return self.now

    def sleep(self, seconds):
        assert seconds >= 0, seconds
        self.sleeps.append(seconds)
        self.now += seconds


class CoachTestCase(unittest.TestCase):
    def coach(self, respond, **kwargs) -> Coach:
        return Coach(respond, self.addCleanup, **kwargs)

    def ask(self, settings, state=None, **kwargs):
        """phone_home -> (advice dict or the exception raised, stderr text, seconds taken)."""
        err = io.StringIO()
        start = time.monotonic()
        with contextlib.redirect_stderr(err):
            try:
                result = smart.phone_home(make_state() if state is None else state, settings, **kwargs)
            except Exception as exc:          # noqa: BLE001 - the tests check which exception
                result = exc
        return result, err.getvalue(), time.monotonic() - start

    def assertCoachError(self, result, *words):
        if not isinstance(result, smart.CoachError):
            self.fail(f"expected smart.CoachError, got {type(result).__name__}: {str(result)[:300]}")
        for word in words:
            self.assertIn(word, str(result))
        self.assertNotIn(TOKEN, str(result))
        return result

    def assertAdvice(self, result, stderr=""):
        if not isinstance(result, dict):
            self.fail(f"expected advice, got {type(result).__name__}: {str(result)[:300]}")
        self.assertNotIn(TOKEN, stderr)
        self.assertNotIn(TOKEN, json.dumps(result))
        return result


# ---------------------------------------------------------------- unit: the request

class RequestTest(CoachTestCase):
    def test_request_has_bearer_token_user_agent_and_payload(self):
        coach = self.coach(reply_json({"advice": ADVICE, "next_variant": "response_cache", "confidence": 0.85}))
        state = make_state()
        result, stderr, _ = self.ask(coach_settings(coach.url()), state)
        advice = self.assertAdvice(result, stderr)
        self.assertEqual(len(coach.requests), 1)
        request = coach.requests[0]
        self.assertEqual(request["method"], "POST")
        self.assertEqual(request["path"], "/coach")
        self.assertEqual(request["headers"].get("authorization"), f"Bearer {TOKEN}")
        agent = request["headers"].get("user-agent", "")
        self.assertIn("smart.py", agent)
        self.assertIn(smart.__version__, agent)
        self.assertTrue(request["headers"].get("content-type", "").startswith("application/json"))
        body = request["json"]
        self.assertIsInstance(body, dict, request["raw"][:200])
        self.assertEqual(body["run_id"], state["run_id"])
        self.assertEqual(body["state"], state)
        self.assertEqual(body["server_id"], socket.gethostname())
        self.assertNotIn(TOKEN, request["raw"].decode())      # the token travels in the header only
        self.assertEqual(advice["advice"], ADVICE)
        self.assertEqual(advice["next_variant"], "response_cache")
        self.assertEqual(advice["confidence"], 0.85)
        self.assertEqual(advice["coach"], coach.url())
        self.assertRegex(advice["at"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d")
        self.assertEqual(stderr, "")                           # loopback http: no warning

    def test_no_token_no_authorization_header(self):
        coach = self.coach(reply_json({"advice": ADVICE}))
        result, stderr, _ = self.ask(coach_settings(coach.url(), token=""))
        self.assertAdvice(result, stderr)
        self.assertNotIn("authorization", coach.requests[0]["headers"])

    def test_empty_url_is_bad_input(self):
        result, _, _ = self.ask(coach_settings(""))
        self.assertIsInstance(result, smart.BadInput)
        self.assertIn("PHONE_HOME_URL", str(result))

    def test_token_with_bad_header_characters_is_refused_without_the_token(self):
        # A token pasted with a stray newline or a non-Latin-1 character is refused when settings
        # load (exit 2 naming the key, value not shown); one that slips past (settings built by
        # hand) gives a CoachError, never a ValueError/UnicodeEncodeError carrying the token.
        coach = self.coach(reply_json({"advice": ADVICE}))
        for token in (TOKEN + "\r\nX-Injected: 1", TOKEN + "\u20ac"):
            with self.subTest(token=token):
                with self.assertRaises(smart.BadInput) as caught:
                    coach_settings(coach.url(), token=token)
                self.assertIn("PHONE_HOME_TOKEN", str(caught.exception))
                self.assertNotIn(TOKEN, str(caught.exception))
                settings = dict(coach_settings(coach.url()), PHONE_HOME_TOKEN=token)
                result, stderr, _ = self.ask(settings, sleep=lambda seconds: None)
                self.assertNotIn(TOKEN, str(result), "the token is in the error message")
                self.assertNotIn(TOKEN, stderr)
                self.assertCoachError(result)
        self.assertEqual([r for r in coach.requests if "x-injected" in r["headers"]], [])


class PlainHttpWarningTest(CoachTestCase):
    """No traffic leaves 127.0.0.1: the opener is replaced by one that records and refuses."""

    def ask_offline(self, url):
        opened = []

        class Refusing:
            def open(self, request, timeout=None):
                opened.append((request.full_url, timeout))
                raise urllib.error.URLError("offline in the test")

        with mock.patch.object(smart.urllib.request, "build_opener", lambda *handlers: Refusing()):
            result, stderr, _ = self.ask(coach_settings(url), sleep=lambda seconds: None)
        self.assertTrue(opened, "phone_home did not try to open the URL")
        self.assertTrue(all(full == url for full, _ in opened))
        self.assertCoachError(result)
        self.assertNotIn(TOKEN, stderr)
        return stderr

    def test_plain_http_to_a_remote_host_warns(self):
        stderr = self.ask_offline("http://coach.example.com/advice")
        self.assertIn("warning", stderr)
        self.assertIn("coach.example.com", stderr)
        self.assertIn("http", stderr)

    def test_no_warning_for_https_or_loopback(self):
        for url in ("https://coach.example.com/advice", "http://127.0.0.1:9/advice",
                    "http://localhost:9/advice", "http://[::1]:9/advice"):
            with self.subTest(url=url):
                self.assertNotIn("plain http", self.ask_offline(url))
                self.assertNotIn("warning", self.ask_offline(url))


@unittest.skipUnless(shutil.which("openssl"), "needs the openssl command to make a self-signed certificate")
class HttpsVerifiedTest(CoachTestCase):
    def test_self_signed_certificate_is_refused_and_no_request_is_sent(self):
        folder = tempfile.mkdtemp(prefix="coach-tls-")
        self.addCleanup(shutil.rmtree, folder, True)
        key, cert = os.path.join(folder, "key.pem"), os.path.join(folder, "cert.pem")
        made = subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key,
                               "-out", cert, "-days", "1", "-subj", "/CN=127.0.0.1",
                               "-addext", "subjectAltName=IP:127.0.0.1"],
                              capture_output=True, timeout=30)
        if made.returncode != 0:
            self.skipTest(f"openssl could not make a certificate: {made.stderr[-200:]!r}")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        coach = self.coach(reply_json({"advice": ADVICE}), tls_context=context)
        result, stderr, _ = self.ask(coach_settings(coach.url(scheme="https")), sleep=lambda seconds: None)
        self.assertCoachError(result)
        self.assertEqual(coach.requests, [], "the token went to a server whose certificate is not trusted")
        self.assertNotIn("warning", stderr)


# ---------------------------------------------------------------- unit: retries and time box

class RetryTest(CoachTestCase):
    def test_5xx_then_success_is_retried(self):
        coach = self.coach(sequence(reply_status(500), reply_status(503), reply_json({"advice": ADVICE})))
        fake = FakeClock()
        result, stderr, _ = self.ask(coach_settings(coach.url()), clock=fake.clock, sleep=fake.sleep)
        self.assertEqual(self.assertAdvice(result, stderr)["advice"], ADVICE)
        self.assertEqual(len(coach.requests), 3)
        self.assertEqual(len(fake.sleeps), 2)
        self.assertLessEqual(fake.sleeps[0], fake.sleeps[1], "backoff should not shrink")
        self.assertGreater(fake.sleeps[0], 0, "no backoff between retries")

    def test_always_500_bounded_in_count(self):
        coach = self.coach(reply_status(500))
        fake = FakeClock()
        result, _, _ = self.ask(coach_settings(coach.url(), COMMAND_TIMEOUT_SECONDS=60),
                                clock=fake.clock, sleep=fake.sleep)
        self.assertCoachError(result, "500")
        self.assertEqual(len(coach.requests), smart.COACH_ATTEMPTS)
        self.assertEqual(smart.COACH_ATTEMPTS, 3)
        self.assertEqual(len(fake.sleeps), 2)
        self.assertLessEqual(sum(fake.sleeps), 60)

    def test_always_500_bounded_in_total_time_fake_clock(self):
        coach = self.coach(reply_status(500))
        fake = FakeClock()
        start = fake.now
        result, _, _ = self.ask(coach_settings(coach.url(), COMMAND_TIMEOUT_SECONDS=1.5),
                                clock=fake.clock, sleep=fake.sleep)
        self.assertCoachError(result)
        self.assertLessEqual(len(coach.requests), 3)
        self.assertGreaterEqual(len(coach.requests), 2)
        self.assertLessEqual(fake.now - start, 1.5 + 1e-9, f"slept {fake.sleeps} past the time box")

    def test_always_500_bounded_in_total_time_real_clock(self):
        coach = self.coach(reply_status(502))
        result, _, elapsed = self.ask(coach_settings(coach.url(), COMMAND_TIMEOUT_SECONDS=1.5))
        self.assertCoachError(result)
        self.assertLessEqual(len(coach.requests), 3)
        self.assertLess(elapsed, 1.5 + 0.75)

    def test_4xx_is_not_retried(self):
        for status in (400, 401, 403, 404):
            with self.subTest(status=status):
                coach = self.coach(reply_status(status))
                fake = FakeClock()
                result, _, _ = self.ask(coach_settings(coach.url()), clock=fake.clock, sleep=fake.sleep)
                self.assertCoachError(result, str(status))
                self.assertEqual(len(coach.requests), 1, f"HTTP {status} was retried")
                self.assertEqual(fake.sleeps, [])

    def test_connection_errors_are_retried(self):
        coach = self.coach(hang_up)
        fake = FakeClock()
        result, _, _ = self.ask(coach_settings(coach.url()), clock=fake.clock, sleep=fake.sleep)
        self.assertCoachError(result)
        self.assertEqual(len(coach.requests), 3)

    def test_coach_down(self):
        fake = FakeClock()
        result, stderr, elapsed = self.ask(coach_settings(down_url()), clock=fake.clock, sleep=fake.sleep)
        self.assertCoachError(result, "unreachable")
        self.assertEqual(len(fake.sleeps), 2)
        self.assertLess(elapsed, 2)
        self.assertNotIn(TOKEN, stderr)

    def test_hanging_coach_returns_within_the_time_box(self):
        coach = self.coach(hang())
        result, _, elapsed = self.ask(coach_settings(coach.url(), COMMAND_TIMEOUT_SECONDS=1))
        self.assertCoachError(result)
        self.assertLess(elapsed, 1 + 1.0)
        self.assertGreaterEqual(len(coach.requests), 1)

    def test_hanging_ollama_coach_returns_within_the_time_box(self):
        coach = self.coach(hang())
        result, _, elapsed = self.ask(coach_settings(coach.url("/api/generate"), COMMAND_TIMEOUT_SECONDS=1))
        self.assertCoachError(result)
        self.assertLess(elapsed, 1 + 1.0)

    def test_slow_dripping_coach_returns_within_the_time_box(self):
        # "slow" (issue 7): one byte every 0.25 s never trips a per-read socket timeout; the time box
        # must still bound the whole exchange.
        coach = self.coach(drip(seconds=5.0))
        result, _, elapsed = self.ask(coach_settings(coach.url(), COMMAND_TIMEOUT_SECONDS=1))
        self.assertLess(elapsed, 1 + 1.0, f"a dripping coach held phone_home for {elapsed:.1f} s "
                                          f"with COMMAND_TIMEOUT_SECONDS=1")
        self.assertCoachError(result)


# ---------------------------------------------------------------- unit: untrusted replies

class ReplyTest(CoachTestCase):
    def reply(self, respond, state=None, **settings_extra):
        coach = self.coach(respond)
        fake = FakeClock()
        result, stderr, elapsed = self.ask(coach_settings(coach.url(), **settings_extra), state,
                                           clock=fake.clock, sleep=fake.sleep)
        return result, stderr, coach

    def test_malformed_replies_are_coach_errors(self):
        cases = {
            "garbage": b"<html>not json at all</html>",
            "empty": b"",
            "array": b'["advice", "keep it"]',
            "string": b'"just a string"',
            "number": b"42",
            "null": b"null",
            "not utf-8": b'{"advice": "\xff\xfe"}',
            "truncated": b'{"advice": "keep',
            "advice not text": b'{"advice": 42}',
            "advice object": b'{"advice": {"run": "rm -rf /"}}',
            "no advice": b'{"confidence": 0.9}',
            "deeply nested": b"[" * 30000 + b"]" * 30000,
            "deeply nested object": b'{"advice": ' + b'{"a":' * 10000 + b"1" + b"}" * 10001,
            "huge integer": b'{"advice": "x", "confidence": ' + b"9" * 20000 + b"}",
        }
        for name, data in cases.items():
            with self.subTest(name):
                result, stderr, coach = self.reply(reply_raw(data))
                self.assertCoachError(result)
                self.assertEqual(len(coach.requests), 1, "a bad reply is not a reason to retry")
                self.assertLess(len(str(result)), 400)

    def test_confidence_out_of_range_or_not_a_number_is_dropped_with_a_warning(self):
        for confidence in (1.5, -0.1, "high", True, None, [0.5]):
            with self.subTest(confidence=confidence):
                result, stderr, _ = self.reply(reply_json({"advice": ADVICE, "confidence": confidence}))
                advice = self.assertAdvice(result, stderr)
                self.assertEqual(advice["advice"], ADVICE)
                self.assertIsNone(advice["confidence"])
                if confidence is not None:
                    self.assertIn("warning", stderr)
                    self.assertIn("confidence", stderr)
        for confidence in (0, 1, 0.85):
            with self.subTest(confidence=confidence):
                result, stderr, _ = self.reply(reply_json({"advice": ADVICE, "confidence": confidence}))
                self.assertEqual(self.assertAdvice(result, stderr)["confidence"], confidence)
                self.assertEqual(stderr, "")

    def test_nan_confidence_is_dropped(self):
        result, stderr, _ = self.reply(reply_raw(b'{"advice": "a", "confidence": NaN}'))
        self.assertIsNone(self.assertAdvice(result, stderr)["confidence"])

    def test_unknown_next_variant_is_ignored_and_defined_one_kept(self):
        for name, expected in (("workers_auto", None), ("../../etc/passwd", None), ("; rm -rf /", None),
                               (42, None), ("noop", "noop"), ("response_cache", "response_cache")):
            with self.subTest(next_variant=name):
                result, stderr, _ = self.reply(reply_json({"advice": ADVICE, "next_variant": name}))
                advice = self.assertAdvice(result, stderr)
                self.assertEqual(advice["next_variant"], expected)
                if expected is None:
                    self.assertIn("next_variant", stderr)

    def test_unknown_next_variant_with_no_state_variants_is_ignored(self):
        state = make_state()
        del state["defined_variants"]
        result, stderr, _ = self.reply(reply_json({"advice": ADVICE, "next_variant": "noop"}), state=state)
        self.assertIsNone(self.assertAdvice(result, stderr)["next_variant"])

    def test_extra_fields_are_dropped_with_a_warning(self):
        result, stderr, _ = self.reply(reply_json({"advice": ADVICE, "command": "touch /tmp/pwned",
                                                   "apply": "rm -rf /", "settings": {"IMPROVE_PCT": 0}}))
        advice = self.assertAdvice(result, stderr)
        self.assertEqual(set(advice), {"advice", "next_variant", "confidence", "coach", "at"})
        self.assertIn("warning", stderr)
        self.assertIn("command", stderr)

    def test_advice_is_length_capped_text(self):
        result, stderr, _ = self.reply(reply_json({"advice": "a" * 20000}))
        advice = self.assertAdvice(result, stderr)["advice"]
        self.assertIsInstance(advice, str)
        self.assertEqual(len(advice), smart.COACH_ADVICE_LIMIT)
        self.assertLessEqual(smart.COACH_ADVICE_LIMIT, 10000)

    def test_a_10_mb_reply_is_cut_off_not_read_whole(self):
        for content_length in (True, False):
            with self.subTest(content_length=content_length):
                coach = self.coach(huge(content_length=content_length))
                tracemalloc.start()
                try:
                    result, stderr, elapsed = self.ask(coach_settings(coach.url()), sleep=lambda s: None)
                    _, peak = tracemalloc.get_traced_memory()
                finally:
                    tracemalloc.stop()
                self.assertCoachError(result, "larger than")
                self.assertLess(elapsed, 3.0)
                self.assertLess(peak, 2 * 1024 * 1024, f"peak {peak} bytes: the 10 MB reply was read whole")
                self.assertEqual(len(coach.requests), 1, "an oversized reply is not a reason to retry")

    def test_a_redirect_is_not_followed_and_the_token_stays_home(self):
        target = self.coach(reply_json({"advice": "from the redirect target"}))
        for status in (301, 302, 303, 307, 308):
            with self.subTest(status=status):
                result, stderr, coach = self.reply(redirect(target.url("/steal"), status))
                self.assertCoachError(result)
                self.assertEqual(target.requests, [], "the redirect was followed: the token went elsewhere")
                self.assertEqual(len(coach.requests), 1, "a redirect is not a reason to retry")

    def test_parse_coach_reply_directly(self):
        state = make_state()
        advice = smart.parse_coach_reply(json.dumps({"advice": "ok", "next_variant": "noop"}).encode(),
                                         state, "http://127.0.0.1/", False)
        self.assertEqual((advice["advice"], advice["next_variant"]), ("ok", "noop"))
        with self.assertRaises(smart.CoachError):
            smart.parse_coach_reply(b"[]", state, "http://127.0.0.1/", False)


# ---------------------------------------------------------------- unit: an Ollama-style local coach

class OllamaTest(CoachTestCase):
    def ask_ollama(self, path, text, **extra):
        coach = self.coach(ollama(text))
        result, stderr, _ = self.ask(coach_settings(coach.url(path), PHONE_HOME_MODEL="tinyllama", **extra),
                                     sleep=lambda s: None)
        self.assertEqual(len(coach.requests), 1)
        return result, stderr, coach.requests[0]

    def check_body(self, request, kind):
        body = request["json"]
        self.assertIsInstance(body, dict, request["raw"][:200])
        self.assertEqual(body.get("model"), "tinyllama")
        self.assertIs(body.get("stream"), False)
        if kind == "generate":
            prompt = body.get("prompt")
        else:
            messages = body.get("messages")
            self.assertIsInstance(messages, list)
            self.assertTrue(messages and messages[-1].get("role") == "user")
            prompt = messages[-1].get("content")
        self.assertIsInstance(prompt, str)
        # a prompt built from the run's figures
        for figure in ("001_demo_cache", "response_cache", "noop", "41.6"):
            self.assertIn(figure, prompt)
        self.assertLess(len(prompt), 8000, "the prompt should be short")
        self.assertNotIn(TOKEN, request["raw"].decode())

    def test_generate_json_reply(self):
        text = json.dumps({"advice": "Measure longer.", "next_variant": "response_cache", "confidence": 0.6})
        result, stderr, request = self.ask_ollama("/api/generate", text)
        advice = self.assertAdvice(result, stderr)
        self.assertEqual((advice["advice"], advice["next_variant"], advice["confidence"]),
                         ("Measure longer.", "response_cache", 0.6))
        self.check_body(request, "generate")

    def test_chat_json_reply(self):
        text = json.dumps({"advice": "Try the cache again.", "next_variant": "noop", "confidence": 0.3})
        result, stderr, request = self.ask_ollama("/api/chat", text)
        advice = self.assertAdvice(result, stderr)
        self.assertEqual((advice["advice"], advice["next_variant"], advice["confidence"]),
                         ("Try the cache again.", "noop", 0.3))
        self.check_body(request, "chat")

    def test_model_reply_not_json_is_kept_as_advice_text(self):
        for path in ("/api/generate", "/api/chat"):
            with self.subTest(path=path):
                result, stderr, _ = self.ask_ollama(path, "The cache looks promising; rerun it.")
                advice = self.assertAdvice(result, stderr)
                self.assertEqual(advice["advice"], "The cache looks promising; rerun it.")
                self.assertIsNone(advice["next_variant"])
                self.assertIsNone(advice["confidence"])

    def test_model_reply_unknown_variant_and_bad_confidence_dropped(self):
        text = json.dumps({"advice": "Use workers_auto.", "next_variant": "workers_auto", "confidence": "high"})
        result, stderr, _ = self.ask_ollama("/api/generate", text)
        advice = self.assertAdvice(result, stderr)
        self.assertEqual(advice["advice"], "Use workers_auto.")
        self.assertIsNone(advice["next_variant"])
        self.assertIsNone(advice["confidence"])
        self.assertIn("warning", stderr)

    def test_model_reply_long_text_is_capped(self):
        result, stderr, _ = self.ask_ollama("/api/chat", "word " * 5000)
        self.assertEqual(len(self.assertAdvice(result, stderr)["advice"]), smart.COACH_ADVICE_LIMIT)

    def test_ollama_envelope_malformed(self):
        for name, data in {"no response": b'{"done": true}', "response not text": b'{"response": 5}',
                           "message not object": b'{"message": "x"}', "garbage": b"nope"}.items():
            with self.subTest(name):
                coach = self.coach(reply_raw(data))
                result, _, _ = self.ask(coach_settings(coach.url("/api/generate")), sleep=lambda s: None)
                self.assertCoachError(result)


# ---------------------------------------------------------------- wants_coach

class WantsCoachTest(unittest.TestCase):
    def wants(self, mode, borderline, url="http://127.0.0.1:9/coach"):
        settings = smart.load_settings(None, environ={"PHONE_HOME": mode, "PHONE_HOME_URL": url})
        return smart.wants_coach(make_state(borderline=borderline), settings)

    def test_modes(self):
        self.assertFalse(self.wants("never", True))
        self.assertFalse(self.wants("never", False))
        self.assertTrue(self.wants("borderline", True))
        self.assertFalse(self.wants("borderline", False))
        self.assertTrue(self.wants("always", True))
        self.assertTrue(self.wants("always", False))

    def test_no_variants_borderline_is_no(self):
        settings = smart.load_settings(None, environ={"PHONE_HOME": "borderline",
                                                      "PHONE_HOME_URL": "http://127.0.0.1:9/"})
        self.assertFalse(smart.wants_coach({"run_id": "x", "variants": []}, settings))
        self.assertFalse(smart.wants_coach({"run_id": "x"}, settings))

    def test_empty_url_is_never(self):
        for mode in ("never", "borderline", "always"):
            for borderline in (True, False):
                with self.subTest(mode=mode, borderline=borderline):
                    self.assertFalse(self.wants(mode, borderline, url=""))

    def test_default_is_borderline(self):
        settings = smart.load_settings(None, environ={"PHONE_HOME_URL": "http://127.0.0.1:9/"})
        self.assertEqual(settings["PHONE_HOME"], "borderline")
        self.assertTrue(smart.wants_coach(make_state(borderline=True), settings))
        self.assertFalse(smart.wants_coach(make_state(borderline=False), settings))


# ---------------------------------------------------------------- helpers for the subprocess tests

def token_leaks(home: str) -> list:
    """Every file under home whose bytes contain the token; also the list of files looked at."""
    leaks, seen = [], []
    for folder, _, files in os.walk(home):
        for name in files:
            path = os.path.join(folder, name)
            seen.append(os.path.relpath(path, home))
            with open(path, "rb") as handle:
                if TOKEN.encode() in handle.read():
                    leaks.append(os.path.relpath(path, home))
    return leaks, seen


def run_env(coach_url, **extra):
    env = clean_env({
        "DESIGN": "sequential", "BASELINE_SECONDS": "1", "EXPERIMENT_SECONDS": "1", "COOLDOWN_SECONDS": "0",
        "COMMAND_TIMEOUT_SECONDS": "2", "MIN_SAMPLES": "10", "EARLY_STOP": "no",
        "PHONE_HOME": "always", "PHONE_HOME_URL": coach_url, "PHONE_HOME_TOKEN": TOKEN,
    })
    for key in ("PHONE_HOME_MODEL", "BLOCKS", "WARMUP_SECONDS", "LOOK_SECONDS", "KEEP_RUNS"):
        env.pop(key, None)
    env.update({key: str(value) for key, value in extra.items()})
    return env


def write_experiment(home: str, url: str) -> str:
    """experiments/001_coach: baseline, a no-op and a cache, switching the DemoTarget's mode file."""
    folder = os.path.join(home, "experiments", "001_coach")
    os.makedirs(folder)
    os.makedirs(os.path.join(home, "target"))
    with open(os.path.join(home, "target", "mode"), "w", encoding="utf-8") as handle:
        handle.write("plain\n")
    mode = "../../target/mode"
    meta = {
        "id": "001_coach", "description": "Does a cache make the demo faster?",
        "variants": [{"name": "baseline", "apply": f"echo plain > {mode}"},
                     {"name": "noop", "apply": "true"},
                     {"name": "response_cache", "apply": f"echo cached > {mode}"}],
        "revert": f"echo plain > {mode}", "target_url": url, "measure": {"rate": 40, "timeout": 1},
    }
    with open(os.path.join(folder, "meta.json"), "w", encoding="utf-8") as handle:
        json.dump(meta, handle)
    return folder


# ---------------------------------------------------------------- end to end: a real run

class RunEndToEndTest(unittest.TestCase):
    """Real short runs (`smart.py --home TMP run 001_coach`), one per coach behaviour, side by side."""

    CASES = {
        "advice": dict(respond=reply_json({"advice": ADVICE, "next_variant": "noop", "confidence": 0.7,
                                           "command": "touch PWNED", "apply": "touch PWNED"})),
        "advice_verbose": dict(respond=reply_json({"advice": ADVICE}), verbose=True),
        "error_500": dict(respond=reply_status(500)),
        "error_500_verbose": dict(respond=reply_status(500), verbose=True),
        "down": dict(respond=None),
        "down_verbose": dict(respond=None, verbose=True),
        "garbage": dict(respond=reply_raw(b"\x00\xffnot json")),
        "nested": dict(respond=reply_raw(b"[" * 30000 + b"]" * 30000)),
        "hang": dict(respond=hang()),
    }

    @classmethod
    def setUpClass(cls):
        cls.results = {}
        cls.coaches = {}
        cleanups = []
        cls.addClassCleanup(lambda: [close() for close in reversed(cleanups)])
        prepared = {}
        for name, case in cls.CASES.items():
            home = tempfile.mkdtemp(prefix=f"phone-{name}-")
            cls.addClassCleanup(shutil.rmtree, home, True)
            target = smart.DemoTarget(os.path.join(home, "target", "mode")).start()
            cleanups.append(target.server_close)
            cleanups.append(target.shutdown)
            write_experiment(home, target.url)
            if case["respond"] is None:
                coach, url = None, down_url()
            else:
                coach = Coach(case["respond"], cleanups.append)
                url = coach.url()
            cls.coaches[name] = coach
            argv = [sys.executable, SMART_PY, "--home", home] + (["--verbose"] if case.get("verbose") else [])
            prepared[name] = (home, argv + ["run", "001_coach"], run_env(url), url)

        def run(name):
            home, argv, env, url = prepared[name]
            start = time.monotonic()
            done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60,
                                  stdin=subprocess.DEVNULL)
            return {"home": home, "rc": done.returncode, "stdout": done.stdout, "stderr": done.stderr,
                    "start": start, "end": time.monotonic(), "url": url}

        with concurrent.futures.ThreadPoolExecutor(len(prepared)) as pool:
            for name, result in zip(prepared, pool.map(run, prepared)):
                cls.results[name] = result

    def result(self, name):
        result = self.results[name]
        self.assertTrue(os.path.exists(os.path.join(result["home"], "var", "state.json")),
                        f"{name}: no state.json; rc {result['rc']}, stderr {result['stderr'][-800:]}")
        return result

    def state(self, name):
        with open(os.path.join(self.results[name]["home"], "var", "state.json"), encoding="utf-8") as handle:
            return json.load(handle)

    def test_exit_code_is_0_whatever_the_coach_does(self):
        for name in self.CASES:
            with self.subTest(name):
                result = self.result(name)
                self.assertEqual(result["rc"], 0, f"{name}: rc {result['rc']}; stderr {result['stderr'][-1500:]}")
                self.assertNotIn("Traceback", result["stderr"] if "verbose" not in name else "")
                self.assertEqual(self.state(name)["status"], "done")

    def test_the_coach_was_asked_with_the_token(self):
        for name, coach in self.coaches.items():
            if coach is None:
                continue
            with self.subTest(name):
                self.result(name)
                self.assertGreaterEqual(len(coach.requests), 1, f"{name}: the coach was never asked")
                request = coach.requests[0]
                self.assertEqual(request["headers"].get("authorization"), f"Bearer {TOKEN}")
                self.assertEqual(request["json"]["run_id"], self.state(name)["run_id"])
                self.assertEqual(request["json"]["state"]["experiment"], "001_coach")

    def test_token_in_no_file_and_no_output(self):
        for name in self.CASES:
            with self.subTest(name):
                result = self.result(name)
                leaks, seen = token_leaks(result["home"])
                self.assertEqual(leaks, [], f"{name}: the token is written in {leaks}")
                self.assertTrue(any(path.endswith("run.log") for path in seen), seen)
                self.assertIn(os.path.join("var", "history.jsonl"), seen)
                self.assertNotIn(TOKEN, result["stdout"], f"{name}: the token is on stdout")
                self.assertNotIn(TOKEN, result["stderr"], f"{name}: the token is on stderr")

    def test_advice_recorded_in_state_and_run_log(self):
        for name in ("advice", "advice_verbose"):
            with self.subTest(name):
                result = self.result(name)
                coach = self.state(name).get("coach")
                self.assertIsInstance(coach, dict, f"state.json coach = {coach!r}")
                self.assertEqual(coach.get("advice"), ADVICE)
                self.assertRegex(coach.get("at") or "", r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d")
                self.assertEqual(coach.get("coach"), result["url"])
                run_logs = [os.path.join(folder, "run.log")
                            for folder, _, files in os.walk(os.path.join(result["home"], "var", "runs"))
                            if "run.log" in files]
                self.assertEqual(len(run_logs), 1)
                with open(run_logs[0], encoding="utf-8") as handle:
                    self.assertIn(ADVICE, handle.read())

    def test_advice_is_never_executed_nor_written_into_a_config(self):
        result = self.result("advice")
        coach = self.state("advice")["coach"]
        self.assertEqual(coach["next_variant"], "noop")
        self.assertEqual(coach["confidence"], 0.7)
        self.assertNotIn("command", coach)
        self.assertNotIn("apply", coach)
        for folder, _, files in os.walk(result["home"]):
            self.assertNotIn("PWNED", files, f"a coach's command ran in {folder}")
        with open(os.path.join(result["home"], "experiments", "001_coach", "meta.json"), encoding="utf-8") as handle:
            self.assertNotIn("PWNED", handle.read())

    def test_failed_coach_recorded_without_failing_the_run(self):
        for name in ("error_500", "down", "garbage", "hang"):
            with self.subTest(name):
                self.result(name)
                coach = self.state(name).get("coach")
                self.assertIsInstance(coach, dict)
                self.assertIsNone(coach.get("advice"))
                self.assertTrue(coach.get("error"))
                self.assertNotIn(TOKEN, coach.get("error"))

    def test_hanging_coach_does_not_extend_the_run_past_its_time_box(self):
        result = self.result("hang")
        coach = self.coaches["hang"]
        self.assertGreaterEqual(len(coach.requests), 1)
        asked = coach.requests[0]["at"]
        self.assertLess(result["end"] - asked, 2 + 1.5,
                        "the run went on for more than COMMAND_TIMEOUT_SECONDS (2) + 1.5 s after asking the coach")

    def test_retries_bounded_within_a_run(self):
        self.result("error_500")
        self.assertLessEqual(len(self.coaches["error_500"].requests), 3)


# ---------------------------------------------------------------- the phone-home command

class PhoneHomeCommandTest(CoachTestCase):
    LATEST, OLDER = "20250102T000000", "20250101T000000"

    def setUp(self):
        self.home = tempfile.mkdtemp(prefix="phone-cli-")
        self.addCleanup(shutil.rmtree, self.home, True)
        os.makedirs(os.path.join(self.home, "var", "runs"))
        with open(os.path.join(self.home, "var", "state.json"), "w", encoding="utf-8") as handle:
            json.dump(make_state(run_id=self.LATEST), handle)
        with open(os.path.join(self.home, "var", "history.jsonl"), "w", encoding="utf-8") as handle:
            for run_id in (self.OLDER, self.LATEST):
                entry = {key: value for key, value in make_state(run_id=run_id).items() if key != "defined_variants"}
                handle.write(json.dumps(entry) + "\n")

    def cli(self, *args, url=None, verbose=False, **extra):
        env = run_env(url if url is not None else "", **extra)
        if url is None:
            env.pop("PHONE_HOME_URL")
        argv = [sys.executable, SMART_PY, "--home", self.home] + (["--verbose"] if verbose else [])
        done = subprocess.run(argv + ["phone-home", *args], env=env, capture_output=True, text=True,
                              timeout=60, stdin=subprocess.DEVNULL)
        self.assertNotIn(TOKEN, done.stdout)
        self.assertNotIn(TOKEN, done.stderr)
        leaks, _ = token_leaks(self.home)
        self.assertEqual(leaks, [])
        return done.returncode, done.stdout, done.stderr

    def assertOneLineError(self, rc, stdout, stderr, code):
        self.assertEqual(rc, code, stderr)
        self.assertNotIn("Traceback", stderr)
        lines = stderr.strip().splitlines()
        self.assertEqual(len(lines), 1, stderr)
        self.assertTrue(lines[0].startswith("error:"), stderr)

    def test_sends_the_latest_run(self):
        coach = self.coach(reply_json({"advice": ADVICE, "next_variant": "noop", "confidence": 0.5}))
        rc, stdout, stderr = self.cli(url=coach.url())
        self.assertEqual(rc, 0, stderr)
        self.assertIn(ADVICE, stdout)
        self.assertEqual(len(coach.requests), 1)
        request = coach.requests[0]
        self.assertEqual(request["headers"].get("authorization"), f"Bearer {TOKEN}")
        self.assertEqual(request["json"]["run_id"], self.LATEST)
        self.assertEqual(request["json"]["state"]["run_id"], self.LATEST)
        with open(os.path.join(self.home, "var", "state.json"), encoding="utf-8") as handle:
            state = json.load(handle)
        self.assertEqual(state["coach"]["advice"], ADVICE)
        self.assertEqual(state["coach"]["next_variant"], "noop")

    def test_sends_a_named_run_from_history(self):
        coach = self.coach(reply_json({"advice": ADVICE}))
        rc, stdout, stderr = self.cli(self.OLDER, url=coach.url())
        self.assertEqual(rc, 0, stderr)
        self.assertEqual(coach.requests[0]["json"]["run_id"], self.OLDER)

    def test_unknown_run_id(self):
        coach = self.coach(reply_json({"advice": ADVICE}))
        self.assertOneLineError(*self.cli("19990101T000000", url=coach.url()), 2)
        self.assertEqual(coach.requests, [])

    def test_no_url(self):
        self.assertOneLineError(*self.cli(), 2)
        self.assertOneLineError(*self.cli(url=""), 2)

    def test_coach_down(self):
        self.assertOneLineError(*self.cli(url=down_url()), 1)

    def test_coach_500(self):
        coach = self.coach(reply_status(500))
        self.assertOneLineError(*self.cli(url=coach.url()), 1)
        self.assertLessEqual(len(coach.requests), 3)

    def test_coach_down_verbose_keeps_the_token_out(self):
        rc, _, stderr = self.cli(url=down_url(), verbose=True)   # cli() checks the token is absent
        self.assertEqual(rc, 1, stderr)


if __name__ == "__main__":
    unittest.main()
