#!/usr/bin/env python3
"""Smart Server on a real stack: Debian defaults, an unattended cycle over the catalogue, and a hand-tuned box.

Starts the nginx + PHP-FPM 8.2 + MariaDB + WordPress stack of tests/stack.py, installs
deploy/install.sh into a temporary prefix pointed at it (as tests/test_helpers.py does) and pins
nginx, PHP-FPM, MariaDB, this script and everything it starts (smart.py's prober, wrk, the second
prober) to ONE CPU, as a stand-in for a 1 vCPU box.  The services are pinned from birth (they inherit
this process's affinity, and reloaded workers inherit their master's), and a watcher re-applies the
pin to every process of the services once a second and counts any process it found unpinned.

Three configurations, measured in this one command on the same page mix (MIX below):
  1. Debian defaults: the stack as started (measured first, and again at the end);
  2. the Smart Server cycle: `smart.py --home PREFIX/opt/smart run EXP` for 001..008 in order,
     production settings (BASELINE_SECONDS=300, EXPERIMENT_SECONDS=300, WARMUP_SECONDS=5) divided
     by F; kept variants stay applied, as on a real box;
  3. hand-tuned: bench/HAND_TUNED.md's settings, applied through the same helpers.
For each: p50 and p99 of an open loop at PROBE_RATE requests/s (repeated), the highest open-loop
rate of a short ramp whose p99 stays <= 200 ms with no failed request, and PHP-FPM's memory.  For the
cycle also: failed requests of a second prober (a new connection per request) across the whole
cycle, what a keep-alive wrk -c 4 saw, the reloads, each experiment's verdicts, and the A/A
variants (`run --dry-run` names them) that were kept.  Then the dashboard of that cycle is
published, served and photographed with headless Chromium into docs/dashboard.png.

    python3 bench/stack.py [--factor 15] [--cpu 1] [--out bench/results/stack.txt] [--quick]

Needs root and the stack's packages, wrk and chromium.  Everything listens on 127.0.0.1; every
process started here is stopped by its PID at the end.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))
import stack as stack_module  # noqa: E402

SMART = os.path.join(REPO, "smart.py")
EXPERIMENTS = ("001_nginx_workers", "002_fastcgi_microcache", "003_php_opcache", "004_php_fpm_pm",
               "005_nginx_open_file_cache", "006_php_realpath_cache", "007_tls_session_reuse",
               "008_php_fpm_children")
PRODUCTION = {"BASELINE_SECONDS": 300.0, "EXPERIMENT_SECONDS": 300.0, "WARMUP_SECONDS": 5.0}
BLOCKS = 12                 # kept: BLOCKS/F would fall under the 2 pairs the setting allows
PROBE_RATE = 10             # requests/s of the fixed-rate open loop (the experiments' own rate)
PROBE_SECONDS = 20
PROBE_REPEATS = 3
RAMP = (5, 10, 15, 20, 30, 45, 60, 90, 130, 180, 250, 350, 500)
RAMP_SECONDS = 6
P99_LIMIT_MS = 200.0
JS_PATH = "/wp-includes/js/wp-embed.min.js"

NGINX_NAMES, PHP_NAMES = stack_module.NGINX_NAMES, stack_module.PHP_NAMES
# bench/HAND_TUNED.md says where each value comes from.
HAND_TUNED = {
    "nginx": {"microcache": "10", "open_file_cache": "10000", "ssl_session_cache": "10",
              "ssl_session_timeout": "86400", "ssl_session_tickets": "off"},
    "php": {"opcache.revalidate_freq": "60", "opcache.memory_consumption": "256",
            "opcache.interned_strings_buffer": "16", "opcache.max_accelerated_files": "20000",
            "pm": "static", "pm.max_children": "4", "pm.max_requests": "500",
            "realpath_cache_size": "16384", "realpath_cache_ttl": "600"},
}


def log(text):
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def run(argv, env=None, timeout=120, check=True):
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, env=env)
    if check and done.returncode != 0:
        raise SystemExit(f"Error: {' '.join(argv)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
    return done


def clean_env(**extra):
    env = {key: value for key, value in os.environ.items()
           if key in ("PATH", "HOME", "LANG", "LC_ALL", "TERM", "TMPDIR")}
    env.setdefault("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
    env.update({key: str(value) for key, value in extra.items()})
    return env


# ---------------------------------------------------------------- one CPU --

class Pinner(threading.Thread):
    """Once a second: every thread of every process of the stack on CPU `cpu`; counts what was not."""

    def __init__(self, stack, cpu):
        super().__init__(daemon=True)
        self.stack, self.cpu = stack, cpu
        self.unpinned = 0
        self.checks = 0
        self.halt = threading.Event()

    def pin_all(self) -> int:
        found = 0
        for pid in self.stack.all_pids():
            try:
                tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
            except OSError:
                continue
            for tid in tids:
                try:
                    if os.sched_getaffinity(tid) != {self.cpu}:
                        found += 1
                        os.sched_setaffinity(tid, {self.cpu})
                except OSError:
                    pass
        self.checks += 1
        self.unpinned += found
        return found

    def run(self):
        while not self.halt.wait(1.0):
            self.pin_all()


# ---------------------------------------------------------------- measuring --

def mix(stack) -> list:
    """(label, url, weight): the page mix every configuration is measured on."""
    posts = stack.installed["urls"]["posts"]
    return [("front page", stack.front_url, 4), ("long article", stack.article_url, 2),
            ("post 1", posts[0], 1), ("post 2", posts[1], 1),
            ("CSS", stack.static_url, 1), ("JS", stack.http_url + JS_PATH, 1)]


def measure(urls, rate, seconds, out) -> dict:
    """smart.py's open-loop prober over the weighted mix: p50/p99 of the answers, failures, n."""
    argv = [sys.executable, SMART, "measure", "--rate", str(rate), "--duration", str(seconds), "--timeout", "5",
            "--out", out]
    for _, url, weight in urls:
        argv += ["--url", f"{url}@{weight}"]
    run(argv, env=clean_env(), timeout=seconds + 60)
    return summarise([out])


def summarise(paths) -> dict:
    latencies, failed = [], 0
    for path in paths:
        with open(path, newline="") as handle:
            for row in csv.DictReader(handle):
                code = int(row["response_code"])
                if code == 0 or code >= 500 or row.get("check"):
                    failed += 1
                else:
                    latencies.append(float(row["latency_ms"]))
    latencies.sort()

    def pct(q):
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else float("nan")
    return {"n": len(latencies) + failed, "failed": failed, "p50": pct(0.50), "p99": pct(0.99)}


def measure_config(stack, pinner, name, work) -> dict:
    """Warm up, then the fixed-rate probe (repeated, pooled) and the ramp; PHP-FPM's RSS."""
    pinner.pin_all()
    urls = mix(stack)
    measure(urls, PROBE_RATE, 5, os.path.join(work, f"{name}-warmup.csv"))
    paths, p50s = [], []
    for repeat in range(PROBE_REPEATS):
        path = os.path.join(work, f"{name}-probe{repeat}.csv")
        p50s.append(measure(urls, PROBE_RATE, PROBE_SECONDS, path)["p50"])
        paths.append(path)
    fixed = summarise(paths)
    rss = stack.php_fpm_rss()
    held, ramp = None, []
    for rate in RAMP:
        step = measure(urls, rate, RAMP_SECONDS, os.path.join(work, f"{name}-ramp{rate}.csv"))
        ok = step["p99"] <= P99_LIMIT_MS and step["failed"] == 0
        if not ok:      # one noisy step (the other agent on the box) is tried again before the ramp ends
            step = measure(urls, rate, RAMP_SECONDS, os.path.join(work, f"{name}-ramp{rate}b.csv"))
            ok = step["p99"] <= P99_LIMIT_MS and step["failed"] == 0
        ramp.append((rate, round(step["p99"], 1), step["failed"]))
        if not ok:
            break
        held = rate
    result = dict(fixed, p50s=p50s, rss=rss, held=held, top=held == RAMP[-1], ramp=ramp)
    log(f"{name}: p50 {fixed['p50']:.1f} ms (repeats {', '.join(f'{v:.1f}' for v in p50s)}), "
        f"p99 {fixed['p99']:.1f} ms, failed {fixed['failed']}/{fixed['n']}, held {held}/s, "
        f"PHP-FPM {rss / 2**20:.0f} MB; ramp {ramp}")
    return result


class Prober(threading.Thread):
    """A request every `every` s on a new connection, round the mix; notes each failure with its time."""

    def __init__(self, urls, every=0.25):
        super().__init__(daemon=True)
        self.urls, self.every = [url for _, url, _ in urls], every
        self.requests = 0
        self.failures = []
        self.halt = threading.Event()

    def run(self):
        index = 0
        while not self.halt.wait(self.every):
            url = self.urls[index % len(self.urls)]
            index += 1
            failure = stack_module.fetch_failure(url)
            self.requests += 1
            if failure:
                self.failures.append((time.strftime("%H:%M:%S"), urllib.parse.urlsplit(url).path, failure))


def start_wrk(url, work):
    """wrk -t1 -c4 with keep-alive, each connection pausing 1 s between requests, until SIGINT."""
    script = os.path.join(work, "pause.lua")
    with open(script, "w") as handle:
        handle.write("function delay()\n  return 1000\nend\n")
    out = open(os.path.join(work, "wrk.out"), "w")
    return subprocess.Popen(["wrk", "-t1", "-c4", "-d3600s", "--timeout", "10s", "-s", script, url],
                            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)


def stop(process, sig, timeout):
    """Send sig; SIGKILL what has not ended timeout seconds later."""
    process.send_signal(sig)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def stop_wrk(process, work) -> dict:
    stop(process, signal.SIGINT, 20)
    with open(os.path.join(work, "wrk.out")) as handle:
        text = handle.read()
    found = {"requests": int(m.group(1)) if (m := re.search(r"(\d+) requests in", text)) else None,
             "non2xx": int(m.group(1)) if (m := re.search(r"Non-2xx or 3xx responses: (\d+)", text)) else 0,
             "socket": {"connect": 0, "read": 0, "write": 0, "timeout": 0}}
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text):
        found["socket"] = dict(zip(("connect", "read", "write", "timeout"), map(int, m.groups())))
    found["text"] = text
    return found


# ---------------------------------------------------------------- the box --

class Box:
    """The stack with smart.py installed into a temporary prefix, its helpers and its settings."""

    def __init__(self, stack, tmp, factor):
        self.stack, self.tmp, self.factor = stack, tmp, factor
        wrapper, self.reload_log = stack_module.reload_noting_nginx(tmp)
        self.prefix = os.path.join(tmp, "prefix")
        run(["bash", os.path.join(REPO, "deploy", "install.sh"), "--prefix", self.prefix,
             "--nginx-conf", stack.nginx_conf, "--nginx-bin", wrapper, "--reload", "signal",
             "--nginx-cache-dir", os.path.join(stack.nginx_dir, "cache", "smart-micro"),
             "--php-fpm-conf", stack.php_fpm_conf, "--php-reload", "signal", "--server-name", "smart.test"],
            env=clean_env())
        self.home = os.path.join(self.prefix, "opt", "smart")
        self.sbin = os.path.join(self.prefix, "usr", "local", "sbin")
        stack.reload_nginx()        # the probes' snippet and the conditional access_log, installed above
        # 001's target_url is the absolute http://127.0.0.1/ (port 80, the box's site on a real box),
        # which SITE_URL does not move: the installed copy is pointed at the stack's front page.
        meta_path = os.path.join(self.home, "experiments", "001_nginx_workers", "meta.json")
        with open(meta_path) as handle:
            meta = json.load(handle)
        meta["target_url"] = stack.front_url
        with open(meta_path, "w") as handle:
            json.dump(meta, handle, indent=2)
        self.settings = {key: round(value / factor, 3) for key, value in PRODUCTION.items()}
        self.settings.update(BLOCKS=BLOCKS, SITE_URL=stack.http_url, SITE_TLS_URL=stack.https_url,
                             HELPER_COMMAND=self.sbin + "/")

    def smart(self, *argv, timeout=3600, check=True):
        return run([sys.executable, SMART, "--home", self.home, *argv], env=clean_env(**self.settings),
                   timeout=timeout, check=check)

    def helper(self, name, *argv):
        old = set(self.workers(name))
        reloads = self.reloads()
        done = run([os.path.join(self.sbin, f"smart-{name}"), *argv], env=clean_env())
        if self.reloads() != reloads:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and (set(self.workers(name)) & old or not self.workers(name)):
                time.sleep(0.05)
        return done.stdout

    def workers(self, name):
        return self.stack.nginx_workers() if name == "nginx" else self.stack.php_workers()

    def get(self) -> dict:
        values = {}
        for name, names in (("nginx", NGINX_NAMES), ("php", PHP_NAMES)):
            values.update(line.split(" ", 1) for line in self.helper(name, "get", *names).splitlines())
        return values

    def reset(self):
        self.helper("nginx", "reset", *NGINX_NAMES)
        self.helper("php", "reset", *PHP_NAMES)

    def reloads(self) -> tuple:
        try:
            with open(self.reload_log) as handle:
                nginx = handle.read().count("reload ")
        except FileNotFoundError:
            nginx = 0
        with open(self.stack.php_error_log, errors="replace") as handle:
            php = handle.read().count("Reloading in progress")
        return nginx, php


# ---------------------------------------------------------------- the cycle --

def aa_variants(box, experiment) -> list:
    """The variants `run --dry-run` names A/A trials (equal to what is in effect now)."""
    plan = box.smart("run", "--dry-run", experiment).stdout
    return re.findall(r"^  variant  (\S+): .*an A/A trial", plan, re.M)


def cycle(box, pinner, work, experiments) -> dict:
    urls = mix(box.stack)
    prober = Prober(urls)
    wrk = start_wrk(box.stack.front_url, work)
    reloads_before = box.reloads()
    unpinned_before = pinner.unpinned
    prober.start()
    began = time.monotonic()
    results = []
    try:
        for experiment in experiments:
            aa = aa_variants(box, experiment)
            started = time.monotonic()
            done = box.smart("run", experiment, check=False)
            with open(os.path.join(box.home, "var", "history.jsonl")) as handle:
                last = json.loads(handle.read().splitlines()[-1])
            entry = {"experiment": experiment, "rc": done.returncode, "seconds": time.monotonic() - started,
                     "kept": last.get("kept_variant") if last.get("experiment") == experiment else None,
                     "status": last.get("status"), "aa": aa,
                     "variants": [(v["name"], v["decision"], v.get("reason") or "",
                                   (v.get("metrics") or {}).get("improve_pct")) for v in last.get("variants") or []]
                     if last.get("experiment") == experiment else []}
            if done.returncode != 0:
                entry["stderr"] = done.stderr.strip()[-500:]
            results.append(entry)
            log(f"{experiment}: rc {done.returncode}, {entry['seconds']:.0f} s, kept {entry['kept']}, A/A {aa}, "
                f"{[(n, d, None if i is None else round(i, 1)) for n, d, _, i in entry['variants']]}")
    finally:
        wall = time.monotonic() - began
        prober.halt.set()
        prober.join(15)
        seen = stop_wrk(wrk, work)
    nginx, php = (after - before for after, before in zip(box.reloads(), reloads_before))
    return {"experiments": results, "wall": wall, "prober": prober, "wrk": seen, "reloads": (nginx, php),
            "unpinned": pinner.unpinned - unpinned_before}


# ---------------------------------------------------------------- the dashboard --

def screenshot(box, out_png, work):
    box.smart("dashboard")
    serve = subprocess.Popen([sys.executable, SMART, "--home", box.home, "serve", "--port", "0"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=clean_env(),
                             stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        line = serve.stdout.readline()
        match = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        if not match:
            raise SystemExit(f"Error: smart.py serve said {line!r}")
        url = f"http://127.0.0.1:{match.group(1)}/"
        profile = os.path.join(work, "chromium-profile")
        chromium = subprocess.Popen(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                                     f"--user-data-dir={profile}", f"--screenshot={out_png}",
                                     "--window-size=1280,1600", "--virtual-time-budget=8000", url],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        try:
            chromium.wait(90)
        finally:
            if chromium.poll() is None:
                os.killpg(chromium.pid, signal.SIGKILL)
                chromium.wait()
            try:                              # its zygote and helpers share its process group
                os.killpg(chromium.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return url
    finally:
        stop(serve, signal.SIGTERM, 10)


# ---------------------------------------------------------------- the report --

def gain(base, other):
    return base - other


def table(configs, facts) -> str:
    lines = [f"{'configuration':<26} {'p50 ms':>7} {'p99 ms':>7} {'failed':>7} {'held/s':>8} {'PHP-FPM MB':>10}"]
    for name, result in configs:
        held = "none" if result["held"] is None else (f">={result['held']}" if result["top"] else str(result["held"]))
        lines.append(f"{name:<26} {result['p50']:>7.1f} {result['p99']:>7.1f} {result['failed']:>7} {held:>8} "
                     f"{result['rss'] / 2**20:>10.0f}")
    return "\n".join(lines + [""] + facts)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--factor", type=float, default=15, help="production lengths divided by this (default 15)")
    parser.add_argument("--cpu", type=int, default=1, help="the one CPU everything runs on (default 1)")
    parser.add_argument("--out", default=os.path.join(REPO, "bench", "results", "stack.txt"))
    parser.add_argument("--png", default=os.path.join(REPO, "docs", "dashboard.png"))
    parser.add_argument("--quick", action="store_true", help="a smoke run: 001 and 003, short measures")
    args = parser.parse_args(argv)
    global PROBE_SECONDS, PROBE_REPEATS, RAMP, RAMP_SECONDS
    experiments = EXPERIMENTS
    if args.quick:
        PROBE_SECONDS, PROBE_REPEATS, RAMP, RAMP_SECONDS = 4, 1, (10, 40), 3
        experiments = ("001_nginx_workers", "003_php_opcache")
    ok, reason = stack_module.available()
    if not ok:
        raise SystemExit(f"Error: {reason}")
    os.sched_setaffinity(0, {args.cpu})     # the stack's services and every prober inherit it
    began = time.monotonic()
    tmp = tempfile.mkdtemp(prefix="smart-bench-stack-")
    os.chmod(tmp, 0o755)
    work = os.path.join(tmp, "work")
    os.makedirs(work)
    stack = stack_module.Stack().start()
    pinner = Pinner(stack, args.cpu)
    try:
        pinner.pin_all()
        pinner.unpinned = 0
        pinner.start()
        log(f"stack up in {stack.timings['start']:.1f} s at {stack.http_url}; everything on CPU {args.cpu}; "
            f"F = {args.factor:g}")
        box = Box(stack, tmp, args.factor)
        log(f"installed into {box.prefix}; cycle settings {box.settings}")
        defaults = measure_config(stack, pinner, "defaults", work)
        facts = cycle(box, pinner, work, experiments)
        cycle_values = box.get()
        shot = screenshot(box, args.png, work)
        log(f"dashboard served at {shot} and photographed into {args.png}")
        kept = measure_config(stack, pinner, "cycle", work)
        box.reset()
        for name in ("nginx", "php"):
            box.helper(name, "set", *[word for key in sorted(HAND_TUNED[name])
                                      for word in (key, HAND_TUNED[name][key])])
        hand = measure_config(stack, pinner, "hand-tuned", work)
        box.reset()
        again = measure_config(stack, pinner, "defaults-again", work)
    finally:
        pinner.halt.set()
        pinner.join(5)
        stack.stop()
    base_p50 = (defaults["p50"] + again["p50"]) / 2
    cycle_gain, hand_gain = gain(base_p50, kept["p50"]), gain(base_p50, hand["p50"])
    ratio = cycle_gain / hand_gain if hand_gain > 0 else float("nan")
    aa_kept = [(e["experiment"], e["kept"]) for e in facts["experiments"] if e["kept"] and e["kept"] in e["aa"]]
    prober, seen = facts["prober"], facts["wrk"]
    facts_lines = [
        "page mix (weights): " + ", ".join(f"{label} {weight}" for label, _, weight in mix(stack)) +
        f"; open loop {PROBE_RATE}/s, {PROBE_REPEATS} x {PROBE_SECONDS} s pooled; held/s: highest rate of the ramp "
        f"{RAMP[0]}..{RAMP[-1]}/s ({RAMP_SECONDS} s steps) with p99 <= {P99_LIMIT_MS:g} ms and no failure",
        f"one CPU: nginx, PHP-FPM, MariaDB, probers and wrk on CPU {args.cpu} (of {os.cpu_count()}); "
        f"threads found unpinned and re-pinned during the cycle: {facts['unpinned']}",
        f"cycle: F = {args.factor:g} (BASELINE_SECONDS {box.settings['BASELINE_SECONDS']:g}, EXPERIMENT_SECONDS "
        f"{box.settings['EXPERIMENT_SECONDS']:g}, WARMUP_SECONDS {box.settings['WARMUP_SECONDS']:g}, BLOCKS {BLOCKS}); "
        f"wall time {facts['wall'] / 60:.1f} min; reloads: nginx {facts['reloads'][0]}, PHP-FPM {facts['reloads'][1]}",
        f"second prober (new connection each, 4/s round the mix): {len(prober.failures)} failed of {prober.requests}"
        + (f": {prober.failures[:5]}" if prober.failures else ""),
        f"keep-alive wrk -t1 -c4 (1 s pause per connection) on the front page: {seen['requests']} requests, "
        f"socket errors connect {seen['socket']['connect']}, read {seen['socket']['read']}, write "
        f"{seen['socket']['write']}, timeout {seen['socket']['timeout']}; non-2xx {seen['non2xx']}",
        "verdicts:",
    ]
    for e in facts["experiments"]:
        verdicts = ", ".join(f"{name} {decision}" + ("" if imp is None else f" ({imp:+.1f} %)")
                             for name, decision, _, imp in e["variants"])
        facts_lines.append(f"  {e['experiment']:<27} kept {e['kept'] or '-':<14} {verdicts}"
                           + (f"  [A/A: {', '.join(e['aa'])}]" if e["aa"] else "")
                           + (f"  rc {e['rc']}: {e.get('stderr', '')}" if e["rc"] else ""))
    facts_lines += [
        "cycle kept (helpers' get, non-default): " + ", ".join(f"{k} {v}" for k, v in cycle_values.items()
                                                             if v not in ("default", "off")),
        "hand-tuned: " + ", ".join(f"{k} {v}" for part in HAND_TUNED.values() for k, v in part.items()),
        f"p50 gain over defaults (mean of both default runs, {base_p50:.1f} ms): cycle {cycle_gain:.1f} ms, "
        f"hand-tuned {hand_gain:.1f} ms; cycle / hand-tuned = {ratio * 100:.0f} % (acceptance >= 90 %): "
        + ("pass" if ratio >= 0.9 else "FAIL"),
        f"A/A variants kept: {len(aa_kept)}" + (f" {aa_kept}" if aa_kept else "") + " (acceptance 0): "
        + ("pass" if not aa_kept else "FAIL"),
        f"bench wall time {(time.monotonic() - began) / 60:.1f} min; python3 bench/stack.py"
        + (" --quick" if args.quick else ""),
    ]
    report = table([("Debian defaults", defaults), ("Smart Server cycle", kept), ("hand-tuned", hand),
                    ("Debian defaults (again)", again)], facts_lines)
    print("\n" + report)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as handle:
        handle.write(report + "\n")
    shutil.rmtree(tmp, True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
