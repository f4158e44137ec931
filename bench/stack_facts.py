#!/usr/bin/env python3
"""Facts about the real nginx + PHP-FPM 8.2 + WordPress stack that the experiments build on.

Starts the test stack of tests/stack.py (root, Debian 12's packages) and prints, with the output
that shows each:

  pools     whether a second pool file (pool.d/zz-smart.conf, or aa-smart.conf) with [www] overrides
            www.conf's [www] values, and whether a [global] section there sets process_control_timeout
            (php-fpm8.2 -tt)
  nginx     which of Debian's stock http directives are "duplicate" when set again in a conf.d
            drop-in (nginx -t), and whether a drop-in's fastcgi_cache* with maps, open_file_cache*
            and ssl_session_* apply to the WordPress site without touching the site file
  reloads   what wrk -t1 -c4 sees while nginx, or PHP-FPM, is reloaded once per second, with
            PHP-FPM's process_control_timeout 0 (Debian's default) and 10s
  latency   anonymous front page and article p50 over sequential requests, OPcache on and off, and
            from the FastCGI cache

Stdlib only; wrk for `reloads`.  Everything on 127.0.0.1, bounded in time; the stack stops at the end.

    python3 bench/stack_facts.py [--only pools,nginx,reloads,latency] [--seconds 10] [--samples 60]
"""

from __future__ import annotations

import argparse
import http.client
import os
import re
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
import stack as stack_module  # noqa: E402

SECTIONS = ("pools", "nginx", "reloads", "latency")

STOCK_HTTP_DIRECTIVES = ("sendfile on;", "tcp_nopush on;", "types_hash_max_size 2048;",
                         "default_type application/octet-stream;", "ssl_protocols TLSv1.2 TLSv1.3;",
                         "ssl_prefer_server_ciphers on;", "access_log {log}/second.log;", "gzip on;",
                         "gzip_vary on;", "error_log {log}/second-error.log;")

CACHE_DROP_IN = """# conf.d/smart.conf: an http-context drop-in (bench/stack_facts.py)
fastcgi_cache_path {cache} levels=1:2 keys_zone=smart:10m max_size=64m inactive=10m use_temp_path=off;
map $http_cookie $smart_skip_cookie {{ default 0; ~*wordpress_logged_in_ 1; ~*comment_author 1; ~*wp-postpass 1; }}
map $request_method $smart_skip_method {{ default 1; GET 0; HEAD 0; }}
map $args $smart_skip_args {{ default 1; "" 0; }}
map $request_uri $smart_skip_uri {{ default 0; ~^/wp-admin/ 1; ~^/wp-login\\.php 1; ~^/xmlrpc\\.php 1; ~^/wp-json/ 1; }}
fastcgi_cache smart;
fastcgi_cache_key $scheme$request_method$host$request_uri;
fastcgi_cache_valid 200 301 302 10s;
fastcgi_cache_bypass $smart_skip_cookie $smart_skip_method $smart_skip_args $smart_skip_uri;
fastcgi_no_cache $smart_skip_cookie $smart_skip_method $smart_skip_args $smart_skip_uri;
add_header X-Smart-Cache $upstream_cache_status;
open_file_cache max=1000 inactive=60s;
open_file_cache_valid 60s;
open_file_cache_min_uses 1;
open_file_cache_errors on;
ssl_session_cache shared:SMART:10m;
ssl_session_timeout 1h;
ssl_session_tickets off;
"""


def say(text=""):
    print(text, flush=True)


def write(path, text):
    with open(path, "w") as handle:
        handle.write(text)


# ---------------------------------------------------------------------------------------- pools --

def pools(stack):
    say("== PHP-FPM: a second pool file with [www] (php-fpm8.2 -tt)")
    wanted = re.compile(r"NOTICE: (\[\w+\]|\s+(pm|pm\.max_children|process_control_timeout) = )")
    for name in ("zz-smart.conf", "aa-smart.conf"):
        path = os.path.join(stack.php_pool_d, name)
        text = "[global]\nprocess_control_timeout = 10s\n\n[www]\npm = static\npm.max_children = 4\n"
        write(path, text)
        ok, output = stack.php_test(dump=True)
        say(f"-- pool.d/{name}:\n{text.rstrip()}")
        say(f"-- php-fpm8.2 -tt ({'ok' if ok else 'FAILED'}), the lines that matter:")
        for line in output.splitlines():
            if wanted.search(line):
                say("   " + line)
        stack.reload_php()
        time.sleep(1.0)
        say(f"-- after a reload: {len(stack.php_workers())} workers, {stack.php_fpm_rss() / 2**20:.0f} MiB RSS")
        os.remove(path)
    stack.reload_php()
    say()


# ---------------------------------------------------------------------------------------- nginx --

def tls_reuse(stack, version):
    """session_reused of three TLS connections in a row, each offering the previous one's session."""
    context = stack_module.insecure_context()
    context.minimum_version = context.maximum_version = version
    session, reused = None, []
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", stack.https_port), timeout=10) as raw:
            with context.wrap_socket(raw, server_hostname="127.0.0.1", session=session) as tls:
                tls.sendall(f"GET {stack_module.STATIC_PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                            "Connection: close\r\n\r\n".encode())
                while tls.recv(65536):
                    pass
                reused.append(tls.session_reused)
                session = tls.session
    return reused


def open_file_cache_probe(stack):
    """Status of a static file, then of the same URL after the file is removed, on one connection."""
    path = os.path.join(stack.wordpress_dir, "stack-facts-probe.css")
    write(path, "body {}\n")
    conn = http.client.HTTPConnection("127.0.0.1", stack.http_port, timeout=10)
    try:
        conn.request("GET", "/stack-facts-probe.css")
        first = conn.getresponse()
        first.read()
        os.remove(path)
        conn.request("GET", "/stack-facts-probe.css")
        second = conn.getresponse()
        second.read()
        return first.status, second.status
    finally:
        conn.close()


def site_probe(stack):
    cookies = stack.login()
    form = {"method": "POST", "body": "a=1", "headers": {"Content-Type": "application/x-www-form-urlencoded"}}
    for label, url, options in (
            ("anonymous GET /", stack.front_url, {}), ("anonymous GET / again", stack.front_url, {}),
            ("anonymous GET article", stack.article_url, {}), ("anonymous GET article again", stack.article_url, {}),
            ("https GET /", stack.https_url + "/", {}), ("https GET / again", stack.https_url + "/", {}),
            ("GET /?s=cache", stack.http_url + "/?s=cache", {}), ("HEAD /", stack.front_url, {"method": "HEAD"}),
            ("POST /", stack.front_url, form), ("logged-in GET /", stack.front_url, {"cookies": cookies}),
            ("GET /wp-login.php", stack.http_url + "/wp-login.php", {}), ("static css", stack.static_url, {})):
        status, headers, _ = stack.get(url, **options)
        say(f"   {label:28} {status}  X-Smart-Cache: {headers.get('x-smart-cache', '(none)')}")
    say(f"   TLS 1.2 session reused, 3 connections: {tls_reuse(stack, ssl.TLSVersion.TLSv1_2)}")
    say(f"   TLS 1.3 session reused, 3 connections: {tls_reuse(stack, ssl.TLSVersion.TLSv1_3)}")
    first, second = open_file_cache_probe(stack)
    say(f"   open_file_cache: a static file {first}, the same URL after rm {second} (one keep-alive connection)")


def nginx(stack):
    say("== nginx: Debian's stock http directives set again in conf.d/dup.conf (nginx -t)")
    dup = os.path.join(stack.nginx_conf_d, "dup.conf")
    for directive in STOCK_HTTP_DIRECTIVES:
        write(dup, directive.format(log=stack.nginx_log_dir) + "\n")
        ok, output = stack.nginx_test()
        notes = [line.split("] ", 1)[1] for line in output.splitlines() if "[emerg]" in line or "[warn]" in line]
        say(f"   {'ok    ' if ok else 'FAILS '} {directive.split()[0]:26} {notes[0] if notes else ''}")
    os.remove(dup)
    say()
    say("== nginx: the site without a drop-in")
    site_probe(stack)
    drop_in = os.path.join(stack.nginx_conf_d, "smart.conf")
    write(drop_in, "ssl_session_tickets off;\n")
    stack.reload_nginx()
    say("== nginx: conf.d/smart.conf holding only `ssl_session_tickets off;`")
    say(f"   TLS 1.2 session reused, 3 connections: {tls_reuse(stack, ssl.TLSVersion.TLSv1_2)}")
    say(f"   TLS 1.3 session reused, 3 connections: {tls_reuse(stack, ssl.TLSVersion.TLSv1_3)}")
    write(drop_in, CACHE_DROP_IN.format(cache=os.path.join(stack.nginx_dir, "cache")))
    ok, output = stack.nginx_test()
    say(f"== nginx: conf.d/smart.conf below, site file untouched; nginx -t: {output.strip().splitlines()[-1]}")
    say("   " + "\n   ".join(CACHE_DROP_IN.format(cache=os.path.join(stack.nginx_dir, "cache")).splitlines()))
    stack.reload_nginx()
    site_probe(stack)
    os.remove(drop_in)
    stack.reload_nginx()
    say()


# -------------------------------------------------------------------------------------- reloads --

def reload_scenario(stack, label, url, reload, seconds, close=False):
    """wrk -t1 -c4 against url for `seconds` (keep-alive, or Connection: close with close=True),
    calling reload() once per second meanwhile."""
    error_log_at = os.path.getsize(stack.nginx_error_log)
    header = ["-H", "Connection: close"] if close else []
    wrk = subprocess.Popen(["wrk", "-t1", "-c4", f"-d{seconds}s", "--timeout", "5s", *header, url],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL)
    reloads = 0
    if reload is not None:
        time.sleep(0.5)
        deadline = time.monotonic() + seconds - 1
        while time.monotonic() < deadline:
            reload()
            reloads += 1
            time.sleep(1.0)
    output, _ = wrk.communicate(timeout=seconds + 30)
    with open(stack.nginx_error_log) as handle:
        handle.seek(error_log_at)
        new_errors = handle.read().splitlines()
    kinds = {}
    for line in new_errors:
        match = re.search(r"\[(\w+)\] \d+#\d+: (?:\*\d+ )?(.*?)(?:, client:|$)", line)
        if match and match.group(1) != "notice":
            message = re.sub(r"#\d+|connection \d+", lambda m: m.group(0).rstrip("0123456789") + "N", match.group(2))
            key = f"[{match.group(1)}] {message.strip()}"
            kinds[key] = kinds.get(key, 0) + 1
    say(f"-- {label}: {reloads} reloads")
    for line in output.splitlines():
        if re.search(r"requests in|Socket errors|Non-2xx|Requests/sec|50%|99%", line):
            say("   wrk: " + line.strip())
    if not re.search(r"Socket errors|Non-2xx", output):
        say("   wrk: (no socket errors, no non-2xx responses)")
    for key, count in sorted(kinds.items()):
        say(f"   nginx error.log: {count} x {key}")


def reloads(stack, seconds):
    if not shutil.which("wrk"):
        say("== reloads: wrk is not installed, skipped\n")
        return
    say(f"== reloads under wrk -t1 -c4 -d{seconds}s (keep-alive unless said), one reload per second")

    def nginx_reload():
        subprocess.run([stack_module.NGINX, "-c", stack.nginx_conf, "-s", "reload"], check=True,
                       capture_output=True, timeout=30)

    def php_reload():
        os.kill(stack.pids()["php-fpm"], signal.SIGUSR2)

    front, static = stack.front_url, stack.static_url
    reload_scenario(stack, "front page, no reload", front, None, seconds)
    reload_scenario(stack, "static file, nginx -s reload", static, nginx_reload, seconds)
    reload_scenario(stack, "front page, nginx -s reload", front, nginx_reload, seconds)
    reload_scenario(stack, "front page, Connection: close, nginx -s reload", front, nginx_reload, seconds,
                    close=True)
    reload_scenario(stack, "front page, php-fpm SIGUSR2, process_control_timeout 0 (Debian's)", front,
                    php_reload, seconds)
    drop_in = os.path.join(stack.php_pool_d, "zz-smart.conf")
    write(drop_in, "[global]\nprocess_control_timeout = 10s\n")
    stack.reload_php()
    reload_scenario(stack, "front page, php-fpm SIGUSR2, process_control_timeout 10s", front, php_reload, seconds)
    os.remove(drop_in)
    stack.reload_php()
    say()


# -------------------------------------------------------------------------------------- latency --

def p50_ms(stack, url, samples):
    """Median wall time of `samples` sequential GETs on new connections, after 5 warm-up requests."""
    times = []
    for index in range(samples + 5):
        begun = time.perf_counter()
        status, _, _ = stack.get(url)
        elapsed = (time.perf_counter() - begun) * 1000
        if status != 200:
            raise RuntimeError(f"{url} answered {status}")
        if index >= 5:
            times.append(elapsed)
    return statistics.median(times), min(times), max(times)


def latency(stack, samples):
    say(f"== latency: {samples} sequential anonymous GETs each, new connection each (ms: p50, min, max)")
    drop_in = os.path.join(stack.php_conf_d, "99-smart.ini")
    for label in ("OPcache on (Debian's default)", "OPcache off (opcache.enable = 0)"):
        for name, url in (("front page", stack.front_url), ("article", stack.article_url)):
            p50, low, high = p50_ms(stack, url, samples)
            say(f"   {label:34} {name:10} p50 {p50:7.1f}  min {low:7.1f}  max {high:7.1f}")
        write(drop_in, "opcache.enable = 0\n")
        stack.reload_php()
    os.remove(drop_in)
    stack.reload_php()
    cache_drop_in = os.path.join(stack.nginx_conf_d, "smart.conf")
    write(cache_drop_in, CACHE_DROP_IN.format(cache=os.path.join(stack.nginx_dir, "cache")))
    stack.reload_nginx()
    for name, url in (("front page", stack.front_url), ("article", stack.article_url),
                      ("static css", stack.static_url)):
        p50, low, high = p50_ms(stack, url, samples)
        say(f"   {'FastCGI cache HIT (static: nginx)':34} {name:10} p50 {p50:7.1f}  min {low:7.1f}  max {high:7.1f}")
    os.remove(cache_drop_in)
    stack.reload_nginx()
    say(f"   PHP-FPM RSS now: {stack.php_fpm_rss() / 2**20:.0f} MiB in {1 + len(stack.php_workers())} processes")
    say()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(SECTIONS), help="comma-separated: " + ",".join(SECTIONS))
    parser.add_argument("--seconds", type=int, default=10, help="wrk duration per reload scenario")
    parser.add_argument("--samples", type=int, default=60, help="requests per latency figure")
    args = parser.parse_args(argv)
    chosen = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(chosen) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown section(s): {', '.join(unknown)}")
    ok, reason = stack_module.available()
    if not ok:
        say(f"cannot run the stack: {reason}")
        return 2
    with stack_module.Stack() as stack:
        say(f"stack up in {stack.timings['start']:.1f} s "
            f"({', '.join(f'{k} {v:.2f}' for k, v in stack.timings.items() if k != 'start')}); "
            f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
        say()
        for name in chosen:
            if name == "pools":
                pools(stack)
            elif name == "nginx":
                nginx(stack)
            elif name == "reloads":
                reloads(stack, args.seconds)
            elif name == "latency":
                latency(stack, args.samples)
    say(f"stack stopped in {stack.timings['stop']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
