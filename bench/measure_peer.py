#!/usr/bin/env python3
"""How smart.py's built-in prober compares with wrk, on loopback, in one run (stdlib only).

  (a) p50 latency against a backend that answers each request after 10 ms:
      `smart.py measure --concurrency 1` vs `wrk -t1 -c1 --latency`; accept |ratio - 1| <= 5 %.
  (b) requests/s against our own nginx serving a small static file:
      `smart.py measure --concurrency 16` vs `wrk -t2 -c16`; accept smart/wrk >= 0.25.
  (c) a backend that stalls 1 s once (requests arriving 2-3 s after the first wait until 3 s) during
      `measure --rate 100 --duration 5`: accept p90 >= 200 ms and 500 rows +-2 %.
  (d) with --rss: peak RSS of `measure --rate 200 --duration D` (D = --long-seconds, default 600)
      against the 10 ms backend, from the child's VmHWM; accept < 50 MB.
  (e) open-loop latency against our own nginx (static page) at 100/s and 500/s: `measure --rate R`,
      `measure --interval 1/R`, a minimal stdlib open-loop client (one blocking keep-alive socket,
      sleeps until each request is due, latency from the due time), and the closed-loop floor
      (`measure --concurrency 1`, `wrk -t1 -c1`); p50/p90/p99 each.  Accept smart --rate p50 within
      1.5x (or +0.1 ms) of the minimal client's at the same rate.
  (f) peak RSS of `measure --duration 3` against a server whose body never ends (VmHWM), next to
      the same against a server answering "ok"; accept < 50 MB (the body is counted and dropped).

Prints the figures; exits 1 when a bound is missed.  Without wrk or nginx it says so and exits 0,
unless CI=true, then 1.  Usage:
    python3 bench/measure_peer.py [--seconds 10] [--rss [--long-seconds 600]]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SMART = os.path.join(ROOT, "smart.py")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import smart  # noqa: E402
from servers import ScriptedServer, endless_body, ok_handler, respond  # noqa: E402

UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


# -- backends --

def vm_hwm_kib(pid):
    """The process's peak resident set (VmHWM in /proc/PID/status) in KiB; 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def delayed(seconds):
    """A handler that answers every request after `seconds`."""
    def handler(server, request, sock):
        time.sleep(seconds)
        return respond(sock, 200, b"hello from the 10 ms backend\n")
    return handler


def stall_once(start, end):
    """A handler that holds requests arriving in [start, end) s after the first one until `end`."""
    first = []

    def handler(server, request, sock):
        if not first:
            first.append(request.arrived)
        t0 = first[0]
        if start <= request.arrived - t0 < end:
            server.sleep(t0 + end - time.monotonic())
        return respond(sock, 200, b"ok\n")
    return handler


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Nginx:
    """Our own nginx (master + 2 workers) on 127.0.0.1:<free port>, serving a small static file."""

    def __init__(self, binary, workdir):
        self.binary, self.dir = binary, workdir
        self.port = free_port()
        self.proc = None
        os.chmod(workdir, 0o755)              # workers may run as nobody
        with open(os.path.join(workdir, "index.html"), "w") as handle:
            handle.write("<!doctype html><title>smart bench</title><p>" + "small static file. " * 20 + "</p>\n")
        os.chmod(os.path.join(workdir, "index.html"), 0o644)
        self.conf = os.path.join(workdir, "nginx.conf")
        with open(self.conf, "w") as handle:
            handle.write(
                "daemon off;\nmaster_process on;\nworker_processes 2;\n"
                f"pid {workdir}/nginx.pid;\nerror_log {workdir}/error.log;\n"
                "events {}\n"
                "http {\n  access_log off;\n"
                f"  server {{ listen 127.0.0.1:{self.port}; root {workdir}; }}\n"
                "}\n")

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}/index.html"

    def start(self):
        self.proc = subprocess.Popen([self.binary, "-c", self.conf, "-p", self.dir + "/", "-e", f"{self.dir}/error.log"],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited {self.proc.returncode}: {self.proc.stderr.read().decode()[-500:]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("nginx did not listen within 10 s")

    def stop(self):
        if self.proc is None or self.proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGQUIT, 5), (signal.SIGTERM, 5), (signal.SIGKILL, 5)):
            self.proc.send_signal(sig)
            try:
                self.proc.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue


# -- the two clients --

def run_smart(url, seconds, out, *shape):
    """`smart.py measure`; returns (rows, errors, elapsed s, p50, p90, ok latencies sorted)."""
    command = [sys.executable, SMART, "measure", "--url", url, "--duration", str(seconds), "--out", out, *shape]
    done = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=seconds + 120)
    if done.returncode != 0:
        raise RuntimeError(f"smart.py measure exited {done.returncode}: {done.stderr.strip()[-500:]}")
    match = re.search(r"(\d+) requests in ([\d.]+) s", done.stderr)
    arm = smart.read_measurements(out)
    latencies = sorted(arm.latencies)
    codes = {}
    with open(out, encoding="utf-8") as handle:
        next(handle, None)
        for line in handle:
            code = line.rstrip("\n").rpartition(",")[2]
            codes[code] = codes.get(code, 0) + 1
    elapsed = float(match.group(2)) if match else float(seconds)
    return dict(rows=arm.total, errors=arm.errors, elapsed=elapsed, latencies=latencies, codes=codes,
                non200=arm.total - codes.get("200", 0),
                p50=smart.percentile(latencies, 50), p90=smart.percentile(latencies, 90),
                summary=done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "")


def parse_duration_ms(text):
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text.strip())
    if not match:
        raise ValueError(f"wrk time {text!r}")
    return float(match.group(1)) * UNITS[match.group(2)]


def run_wrk(wrk, url, threads, connections, seconds, latency=False):
    """wrk; returns dict(rps, p50 ms or None, requests, errors text)."""
    command = [wrk, f"-t{threads}", f"-c{connections}", f"-d{seconds}s", *(["--latency"] if latency else []), url]
    done = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=seconds + 60)
    if done.returncode != 0:
        raise RuntimeError(f"wrk exited {done.returncode}: {done.stderr.strip()[-500:]}")
    out = done.stdout
    rps = re.search(r"Requests/sec:\s*([\d.]+)", out)
    p50, p90, p99 = (re.search(rf"^\s*{p}(?:\.0+)?%\s+(\S+)", out, re.M) for p in (50, 90, 99))
    requests = re.search(r"(\d+) requests in", out)
    problems = [line.strip() for line in out.splitlines() if "Non-2xx" in line or "Socket errors" in line]
    if not rps:
        raise RuntimeError(f"cannot read wrk's output:\n{out}")
    return dict(rps=float(rps.group(1)), p50=parse_duration_ms(p50.group(1)) if p50 else None,
                p90=parse_duration_ms(p90.group(1)) if p90 else None,
                p99=parse_duration_ms(p99.group(1)) if p99 else None,
                requests=int(requests.group(1)) if requests else None, problems=problems, raw=out)


def minimal_open_loop(port, path, rate, seconds):
    """The yardstick: one blocking keep-alive socket, a sleep until each request is due, latency
    from the due time to the body's last byte (Content-Length); sorted latencies in ms."""
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()

    def connect():
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    sock = connect()
    latencies = []
    start = time.perf_counter()
    try:
        for n in range(int(rate * seconds)):
            due = start + n / rate
            wait = due - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            sock.sendall(request)
            buf = b""
            while True:
                data = sock.recv(65536)
                if not data:
                    raise RuntimeError("the server closed the connection mid-response")
                buf += data
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    continue
                head = buf[:end].decode("latin-1").lower()
                length = int(re.search(r"content-length: *(\d+)", head).group(1))
                if len(buf) >= end + 4 + length:
                    break
            latencies.append((time.perf_counter() - due) * 1e3)
            if not head.startswith("http/1.1 200"):
                raise RuntimeError(f"the minimal client got {head.splitlines()[0]!r}")
            if "connection: close" in head:            # nginx's keepalive_requests
                sock.close()
                sock = connect()
    finally:
        sock.close()
    return sorted(latencies)


def figures(latencies):
    return " ".join(f"p{p} {smart.percentile(latencies, p):.3f}" for p in (50, 90, 99)) + " ms"


def peak_rss_kib(command):
    """Run command; (exit code, its peak VmHWM in KiB, stderr's last line)."""
    proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    # ru_maxrss from wait4 would carry this (large) parent's size across fork and exec, so
    # read the child's own high-water mark (VmHWM, per address space) while it runs.
    peak_kib = 0
    while proc.poll() is None:
        peak_kib = max(peak_kib, vm_hwm_kib(proc.pid))
        time.sleep(0.1)
    stderr = proc.stderr.read().decode(errors="replace").strip()
    return proc.returncode, peak_kib, stderr.splitlines()[-1] if stderr else ""


# -- the checks --

class Bench:
    def __init__(self, args, wrk, nginx, tmp):
        self.args, self.wrk, self.nginx, self.tmp = args, wrk, nginx, tmp
        self.failures = []
        self.results = []

    def verdict(self, name, ok, text):
        self.results.append((name, ok, text))
        print(f"  -> {'PASS' if ok else 'FAIL'}: {text}", flush=True)
        if not ok:
            self.failures.append(name)

    def latency(self):
        seconds = self.args.seconds
        print(f"(a) p50 against a 10 ms backend, 1 connection, {seconds} s each", flush=True)
        with ScriptedServer(delayed(0.010)) as server:
            ours = run_smart(server.url + "/", seconds, os.path.join(self.tmp, "a.csv"), "--concurrency", "1")
            theirs = run_wrk(self.wrk, server.url + "/", 1, 1, seconds, latency=True)
        ratio = ours["p50"] / theirs["p50"]
        print(f"  smart: {ours['rows']} requests, codes {ours['codes']}, p50 {ours['p50']:.3f} ms, "
              f"p90 {ours['p90']:.3f} ms", flush=True)
        print(f"  wrk:   {theirs['requests']} requests, p50 {theirs['p50']:.3f} ms {' '.join(theirs['problems'])}")
        self.verdict("a", abs(ratio - 1) <= 0.05 and ours["non200"] == 0 and not theirs["problems"],
                     f"p50 ratio smart/wrk = {ratio:.4f} (bound |ratio-1| <= 0.05)")

    def throughput(self):
        seconds = self.args.seconds
        print(f"(b) requests/s against nginx (2 workers, small static file), 16 connections, {seconds} s each",
              flush=True)
        workdir = tempfile.mkdtemp(prefix="measure-peer-nginx-")
        nginx = Nginx(self.nginx, workdir)
        try:
            nginx.start()
            with urllib.request.urlopen(nginx.url, timeout=5) as answer:
                if answer.status != 200:
                    raise RuntimeError(f"nginx answered {answer.status} for {nginx.url}")
            ours = run_smart(nginx.url, seconds, os.path.join(self.tmp, "b.csv"), "--concurrency", "16")
            theirs = run_wrk(self.wrk, nginx.url, 2, 16, seconds)
        finally:
            nginx.stop()
            shutil.rmtree(workdir, True)
        our_rps = ours["rows"] / ours["elapsed"]
        ratio = our_rps / theirs["rps"]
        print(f"  smart: {ours['rows']} requests in {ours['elapsed']:.1f} s = {our_rps:.0f}/s, "
              f"codes {ours['codes']}, p50 {ours['p50']:.3f} ms")
        print(f"  wrk:   {theirs['rps']:.0f}/s {' '.join(theirs['problems'])}")
        self.verdict("b", ratio >= 0.25 and ours["non200"] == 0 and not theirs["problems"],
                     f"requests/s ratio smart/wrk = {ratio:.3f} (bound >= 0.25)")

    def stall(self):
        print("(c) --rate 100 --duration 5 with a 1 s stall once (requests arriving 2-3 s in wait until 3 s)",
              flush=True)
        with ScriptedServer(stall_once(2.0, 3.0)) as server:
            ours = run_smart(server.url + "/", 5, os.path.join(self.tmp, "c.csv"), "--rate", "100")
        rows_ok = abs(ours["rows"] - 500) <= 10
        print(f"  smart: {ours['rows']} rows, codes {ours['codes']}, p50 {ours['p50']:.1f} ms, "
              f"p90 {ours['p90']:.1f} ms, max {ours['latencies'][-1]:.1f} ms")
        self.verdict("c", ours["p90"] >= 200 and rows_ok and ours["non200"] == 0,
                     f"p90 {ours['p90']:.1f} ms (bound >= 200), rows {ours['rows']} (bound 500 +-2%)")

    def rss(self):
        seconds = self.args.long_seconds
        print(f"(d) peak RSS of measure --rate 200 --duration {seconds:g} against the 10 ms backend", flush=True)
        out = os.path.join(self.tmp, "d.csv")
        with ScriptedServer(delayed(0.010)) as server:
            code, peak_kib, last = peak_rss_kib([sys.executable, SMART, "measure", "--url", server.url + "/",
                                                 "--rate", "200", "--duration", str(seconds), "--out", out])
        peak_mb = peak_kib / 1024
        arm = smart.read_measurements(out)
        print(f"  smart: exit {code}, {arm.total} rows, {arm.errors} errors; {last}")
        self.verdict("d", code == 0 and peak_mb < 50 and abs(arm.total - 200 * seconds) <= 0.02 * 200 * seconds,
                     f"peak RSS {peak_mb:.1f} MB (bound < 50 MB) over {arm.total} rows")

    def open_loop(self):
        seconds = self.args.seconds
        print(f"(e) latency against nginx (static page), open loop vs a minimal client, {seconds} s each", flush=True)
        workdir = tempfile.mkdtemp(prefix="measure-peer-nginx-")
        nginx = Nginx(self.nginx, workdir)
        bound = []
        try:
            nginx.start()
            for rate in (100, 500):
                floor = minimal_open_loop(nginx.port, "/index.html", rate, seconds)
                ours = run_smart(nginx.url, seconds, os.path.join(self.tmp, f"e{rate}.csv"), "--rate", str(rate))
                spaced = run_smart(nginx.url, seconds, os.path.join(self.tmp, f"e{rate}i.csv"),
                                   "--interval", f"{1 / rate:g}")
                print(f"  {rate}/s  minimal open loop:        {figures(floor)}")
                print(f"  {rate}/s  smart --rate {rate}:{' ' * (12 - len(str(rate)))}{figures(ours['latencies'])}"
                      f"  codes {ours['codes']}")
                print(f"  {rate}/s  smart --interval {1 / rate:g}:{' ' * (8 - len(f'{1 / rate:g}'))}"
                      f"{figures(spaced['latencies'])}  codes {spaced['codes']}")
                mine, theirs = ours["p50"], smart.percentile(floor, 50)
                ratio = mine / theirs
                print(f"  {rate}/s  ratio smart --rate / minimal: p50 {ratio:.2f}, "
                      f"p90 {ours['p90'] / smart.percentile(floor, 90):.2f}, "
                      f"p99 {smart.percentile(ours['latencies'], 99) / smart.percentile(floor, 99):.2f}", flush=True)
                bound.append((rate, ratio, (mine <= 1.5 * theirs or mine <= theirs + 0.1)
                              and ours["non200"] == 0 and spaced["non200"] == 0))
            closed = run_smart(nginx.url, seconds, os.path.join(self.tmp, "e1.csv"), "--concurrency", "1")
            theirs = run_wrk(self.wrk, nginx.url, 1, 1, seconds, latency=True)
        finally:
            nginx.stop()
            shutil.rmtree(workdir, True)
        print(f"  closed loop  smart --concurrency 1:    {figures(closed['latencies'])}")
        print(f"  closed loop  wrk -t1 -c1:              p50 {theirs['p50']:.3f} p90 {theirs['p90']:.3f} "
              f"p99 {theirs['p99']:.3f} ms {' '.join(theirs['problems'])}")
        self.verdict("e", all(ok for _, _, ok in bound),
                     "smart --rate p50 / minimal p50: " + ", ".join(f"{ratio:.2f} at {rate}/s" for rate, ratio, _ in bound)
                     + " (bound <= 1.5, or within +0.1 ms)")

    def hostile_rss(self):
        print("(f) peak RSS of measure --duration 3 --interval 0.5 --timeout 1: a body that never ends vs 'ok'",
              flush=True)
        peaks = {}
        for name, handler in (("ok", ok_handler), ("endless", endless_body)):
            out = os.path.join(self.tmp, f"f-{name}.csv")
            with ScriptedServer(handler) as server:
                code, peak_kib, last = peak_rss_kib([sys.executable, SMART, "measure", "--url", server.url + "/",
                                                     "--duration", "3", "--interval", "0.5", "--timeout", "1",
                                                     "--out", out])
            arm = smart.read_measurements(out)
            peaks[name] = (code, peak_kib / 1024, arm)
            print(f"  {name:8} peak RSS {peak_kib / 1024:.1f} MB; exit {code}; {last}")
        code, peak_mb, arm = peaks["endless"]
        self.verdict("f", code == 0 and peak_mb < 50 and arm.total == arm.errors > 0,
                     f"peak RSS {peak_mb:.1f} MB against the endless body, {peaks['ok'][1]:.1f} MB against 'ok' "
                     "(bound < 50 MB), every endless row code 0")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10, help="length of (a) and (b) runs (default 10)")
    parser.add_argument("--rss", action="store_true", help="also run (d), the long peak-RSS run")
    parser.add_argument("--long-seconds", type=float, default=600, help="length of (d) (default 600)")
    args = parser.parse_args(argv)
    if args.seconds != int(args.seconds):
        parser.error("--seconds must be whole (wrk takes whole seconds)")
    args.seconds = int(args.seconds)

    wrk = shutil.which("wrk")
    nginx = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx")
                                           if os.access(p, os.X_OK)), None)
    missing = [name for name, path in (("wrk", wrk), ("nginx", nginx)) if not path]
    if missing:
        ci = os.environ.get("CI", "").lower() == "true"
        print(f"measure_peer: skipped: {' and '.join(missing)} not installed"
              f"{' (CI=true: failing)' if ci else ''}")
        return 1 if ci else 0

    print(f"measure_peer: smart.py {smart.__version__} vs {subprocess.run([wrk, '-v'], capture_output=True, text=True).stdout.splitlines()[0][:40]}"
          f", nginx at {nginx}, {os.cpu_count()} CPUs")
    tmp = tempfile.mkdtemp(prefix="measure-peer-")
    bench = Bench(args, wrk, nginx, tmp)
    started = time.monotonic()
    try:
        for step in (bench.latency, bench.throughput, bench.stall, bench.open_loop, bench.hostile_rss):
            try:
                step()
            except (RuntimeError, OSError, subprocess.SubprocessError, smart.SmartError) as exc:
                bench.verdict(step.__name__, False, f"could not run: {exc}")
        if args.rss:
            try:
                bench.rss()
            except (RuntimeError, OSError, subprocess.SubprocessError, smart.SmartError) as exc:
                bench.verdict("d", False, f"could not run: {exc}")
        else:
            print("(d) peak RSS: skipped; run `python3 bench/measure_peer.py --rss` "
                  "(600 s; --long-seconds D to shorten)")
    finally:
        shutil.rmtree(tmp, True)
    print(f"measure_peer: {len(bench.results) - len(bench.failures)} passed, {len(bench.failures)} failed "
          f"in {time.monotonic() - started:.0f} s")
    return 1 if bench.failures else 0


if __name__ == "__main__":
    sys.exit(main())
