"""Scripted HTTP/1.1 servers on 127.0.0.1 for the prober tests and benches (stdlib only).

ScriptedServer listens on a port the OS picks, serves each connection in its own thread and hands
every request to a handler that decides, byte by byte if it wants, what the client gets:

    def handler(server, request, sock) -> bool      # True: keep the connection for another request
        return respond(sock, 200, b"ok")

It counts what a test needs to assert on: connections accepted, every request (method, target,
headers, which connection, its number on that connection, when it arrived), and the most requests
it was answering at once.  Accepted sockets get TCP_NODELAY.  stop() (or leaving a `with` block)
ends every thread: handlers that wait should wait with server.sleep() or server.stopping.

Hostile handlers for the prober's bounds: endless_body, huge_length, endless_chunks, slowloris.
"""

from __future__ import annotations

import socket
import ssl
import struct
import threading
import time

__all__ = ["ScriptedServer", "Request", "respond", "ok_handler", "reset", "hang", "response_bytes",
           "endless_body", "huge_length", "endless_chunks", "slowloris"]

REASONS = {100: "Continue", 103: "Early Hints", 200: "OK", 204: "No Content", 304: "Not Modified",
           404: "Not Found", 500: "Internal Server Error", 503: "Service Unavailable"}


class Request:
    """One request as the server read it."""

    __slots__ = ("method", "target", "version", "headers", "raw", "conn_id", "index", "arrived")

    def __init__(self, head: bytes, conn_id: int, index: int):
        lines = head.decode("latin-1").split("\r\n")
        self.method, self.target, self.version = (lines[0].split(" ") + ["", "", ""])[:3]
        self.headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            self.headers[name.strip().lower()] = value.strip()
        self.raw = head
        self.conn_id = conn_id          # 0 for the first connection accepted, 1 for the next...
        self.index = index              # 0 for the first request on its connection
        self.arrived = time.monotonic()


def response_bytes(status=200, body=b"ok", headers=(), reason=None, length=True) -> bytes:
    """A complete response: status line, headers (+ Content-Length unless length=False), body."""
    lines = [f"HTTP/1.1 {status} {reason or REASONS.get(status, 'Status')}"]
    lines += list(headers)
    if length:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def respond(sock, status=200, body=b"ok", headers=(), reason=None) -> bool:
    """Send a keep-alive response with Content-Length; returns True (keep the connection)."""
    sock.sendall(response_bytes(status, body, headers, reason))
    return True


def ok_handler(server, request, sock) -> bool:
    """200 "ok" with Content-Length, connection kept."""
    return respond(sock)


def reset(sock) -> bool:
    """Make the coming close an RST (SO_LINGER 0); returns False so the server closes now."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    return False


def hang(server, request, sock) -> bool:
    """Never answer (until the server stops)."""
    server.stopping.wait()
    return False


def _stream(server, sock, block: bytes) -> bool:
    while not server.stopping.is_set():
        sock.sendall(block)         # raises once the client closes; stop() shuts the socket down
    return False


def endless_body(server, request, sock) -> bool:
    """200 without a length, then a body that never ends."""
    sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n")
    return _stream(server, sock, b"x" * 65536)


def huge_length(server, request, sock) -> bool:
    """200 with a Content-Length of 17 GiB, then a body streaming towards it."""
    sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (17 << 30))
    return _stream(server, sock, b"x" * 65536)


def endless_chunks(server, request, sock) -> bool:
    """200 chunked, then 1-byte chunks that never end."""
    sock.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    return _stream(server, sock, b"1\r\nx\r\n" * 10000)


def slowloris(server, request, sock) -> bool:
    """A status line, then header bytes dripped one every 10 ms: the head never ends."""
    sock.sendall(b"HTTP/1.1 200 OK\r\nX-Drip: ")
    while not server.sleep(0.01):
        sock.sendall(b"x")
    return False


class ScriptedServer:
    """A threaded HTTP/1.1 server on 127.0.0.1:<free port> whose answers a handler scripts."""

    def __init__(self, handler=ok_handler, *, tls_context: ssl.SSLContext | None = None,
                 keepalive_timeout: float | None = None, backlog: int = 512):
        self.handler = handler
        self.tls_context = tls_context
        self.keepalive_timeout = keepalive_timeout   # close a connection idle this long after a response
        self.backlog = backlog
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.connections = 0
        self.requests: list[Request] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.errors: list[BaseException] = []        # unexpected exceptions in handlers
        self._threads: list[threading.Thread] = []
        self._socks: set = set()
        self._listener = None
        self.port = None

    # -- life cycle --
    def start(self) -> "ScriptedServer":
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen(self.backlog)
        listener.settimeout(0.05)
        self._listener = listener
        self.port = listener.getsockname()[1]
        thread = threading.Thread(target=self._accept_loop, name=f"server-{self.port}", daemon=True)
        self._threads.append(thread)
        thread.start()
        return self

    def stop(self, timeout: float = 3.0) -> None:
        """Stop accepting, cut every connection, and join every thread (bounded by timeout)."""
        self.stopping.set()
        with self.lock:
            socks = list(self._socks)
        for sock in socks:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        deadline = time.monotonic() + timeout
        for thread in list(self._threads):
            thread.join(max(0.0, deadline - time.monotonic()))
        if self._listener is not None:
            self._listener.close()

    def __enter__(self):
        return self.start() if self.port is None else self

    def __exit__(self, *exc):
        self.stop()

    @property
    def url(self) -> str:
        return f"{'https' if self.tls_context else 'http'}://127.0.0.1:{self.port}"

    def sleep(self, seconds: float) -> bool:
        """Wait that long unless the server stops first; True when it is stopping."""
        return self.stopping.wait(max(0.0, seconds))

    @property
    def methods(self):
        with self.lock:
            return [r.method for r in self.requests]

    # -- serving --
    def _accept_loop(self):
        while not self.stopping.is_set():
            try:
                sock, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            sock.settimeout(None)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self.lock:
                conn_id = self.connections
                self.connections += 1
                self._socks.add(sock)
            thread = threading.Thread(target=self._serve, args=(sock, conn_id), daemon=True)
            with self.lock:
                self._threads = [t for t in self._threads if t.is_alive()] + [thread]
            thread.start()

    def _serve(self, sock, conn_id):
        raw = sock
        try:
            if self.tls_context is not None:
                sock = self.tls_context.wrap_socket(sock, server_side=True)
            buf = b""
            index = 0
            while not self.stopping.is_set():
                if index and self.keepalive_timeout is not None:
                    sock.settimeout(self.keepalive_timeout)
                while b"\r\n\r\n" not in buf:
                    try:
                        data = sock.recv(65536)
                    except socket.timeout:
                        return          # idle too long: close the keep-alive connection
                    if not data:
                        return
                    buf += data
                sock.settimeout(None)
                head, _, buf = buf.partition(b"\r\n\r\n")
                request = Request(head, conn_id, index)
                length = int(request.headers.get("content-length", "0") or 0)
                while len(buf) < length:
                    data = sock.recv(65536)
                    if not data:
                        return
                    buf += data
                buf = buf[length:]
                with self.lock:
                    self.requests.append(request)
                    self.in_flight += 1
                    self.max_in_flight = max(self.max_in_flight, self.in_flight)
                try:
                    keep = self.handler(self, request, sock)
                finally:
                    with self.lock:
                        self.in_flight -= 1
                index += 1
                if not keep:
                    return
        except (OSError, ssl.SSLError):
            pass                        # the client went away, or the server is stopping
        except Exception as exc:        # a broken handler: keep it for the test to see
            with self.lock:
                self.errors.append(exc)
        finally:
            with self.lock:
                self._socks.discard(raw)
            try:
                sock.close()
            except OSError:
                pass
