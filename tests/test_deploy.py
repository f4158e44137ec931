"""The deployment (issue 6): deploy/install.sh into a temporary prefix, the sudoers drop-in generated
from the installed experiments, the systemd units, the root-owned nginx helper deploy/smart-nginx's
in-place names against a real nginx on loopback, and the dashboard's nginx site.  (Both helpers'
every name against a real nginx + PHP-FPM + WordPress stack: tests/test_helpers.py.)

A real nginx runs from a temporary nginx.conf (`daemon off`, a child of the test, on a port the OS
picked) and is reloaded by `nginx -s reload -c CONF`, as on a box without systemd; it stops in
cleanup.  nginx, visudo, systemd-analyze and /usr/bin/python3 (the helper's interpreter) are needed:
without one a test skips, except under CI=true where it fails.  The nginx tests run as root (the
helper's trust checks and nginx's worker user assume it).

The support code at the top (NginxUnderTest, install, run_helper...) is shared with
test_nginx_experiment.py.
"""

from __future__ import annotations

import contextlib
import glob
import gzip
import hashlib
import http.client
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from helpers import REPO_ROOT, clean_env, import_smart  # noqa: E402

smart = import_smart()

DEPLOY = os.path.join(REPO_ROOT, "deploy")
INSTALL_SH = os.path.join(DEPLOY, "install.sh")
UNINSTALL_SH = os.path.join(DEPLOY, "uninstall.sh")
EXPERIMENT_001 = os.path.join(REPO_ROOT, "experiments", "001_nginx_workers")
HELPER_PYTHON = "/usr/bin/python3"          # the helper's #! line


# ---------------------------------------------------------------- support (shared) --

def need(tool_or_path):
    """The tool's path; skip the test without it (fail under CI=true)."""
    path = tool_or_path if os.path.isabs(tool_or_path) else shutil.which(tool_or_path)
    if not path or not os.access(path, os.X_OK):
        for folder in ("/usr/sbin", "/sbin"):
            candidate = os.path.join(folder, tool_or_path)
            if not os.path.isabs(tool_or_path) and os.access(candidate, os.X_OK):
                return candidate
        message = f"{tool_or_path} is not installed"
        if os.environ.get("CI") == "true":
            raise AssertionError(f"{message} and CI=true: this test cannot be skipped")
        raise unittest.SkipTest(message)
    return path


def need_root():
    if os.geteuid() != 0:
        message = "needs root (nginx workers, the helper's root-owned files)"
        if os.environ.get("CI") == "true":
            raise AssertionError(f"{message} and CI=true")
        raise unittest.SkipTest(message)


def free_port() -> int:
    """A port the OS says is free now: bind port 0, read it, close."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def install(prefix, *args, check=True):
    """Run deploy/install.sh --prefix PREFIX ARGS; returns the CompletedProcess."""
    done = subprocess.run(["bash", INSTALL_SH, "--prefix", prefix, *args], capture_output=True, text=True,
                          timeout=60, env=clean_env(), stdin=subprocess.DEVNULL)
    if check and done.returncode != 0:
        raise AssertionError(f"install.sh exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
    return done


def uninstall(prefix, *args):
    return subprocess.run(["bash", UNINSTALL_SH, "--prefix", prefix, *args], capture_output=True, text=True,
                          timeout=60, env=clean_env(), stdin=subprocess.DEVNULL)


def read_bytes(path) -> bytes:
    with open(path, "rb") as handle:
        return handle.read()


def worker_value(conf_bytes: bytes):
    """The argument of the (uncommented) worker_processes directive."""
    found = re.findall(rb"^\s*worker_processes\s+([^;\s]+)\s*;", conf_bytes, re.M)
    return found[0].decode() if len(found) == 1 else found


def without_workers(conf_bytes: bytes) -> bytes:
    return re.sub(rb"^(\s*worker_processes\s+)[^;\s]+", rb"\1X", conf_bytes, flags=re.M)


def http_get(port, path="/", host="127.0.0.1", timeout=5):
    """(status, headers as a dict of lower-case names, body) of one GET on a fresh connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Host": host})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


class NginxUnderTest:
    """A real nginx on 127.0.0.1:<free port> from a temporary nginx.conf, run as a child (`daemon off`).

    The main context includes ROOT/extra.conf (empty at first) so a test can make `nginx -t` fail
    without touching worker_processes; `sites` are extra files included in the http block.
    """

    def __init__(self, root, workers="1", sites=()):
        self.nginx = need("nginx")
        self.root = root
        os.chmod(root, 0o755)                       # workers run as nobody and must read html/
        self.port = free_port()
        self.conf = os.path.join(root, "nginx.conf")
        self.pid_file = os.path.join(root, "nginx.pid")
        self.error_log = os.path.join(root, "error.log")
        self.extra = os.path.join(root, "extra.conf")
        html = os.path.join(root, "html")
        os.makedirs(html, exist_ok=True)
        with open(os.path.join(html, "index.html"), "w") as handle:
            handle.write("<html><body>hello from the test nginx</body></html>\n")
        with open(self.extra, "w") as handle:
            handle.write("# main-context include; a test writes a bad directive here to break nginx -t\n")
        temp = os.path.join(root, "tmp")
        os.makedirs(temp, exist_ok=True)
        includes = "".join(f"    include {site};\n" for site in sites)
        text = f"""# nginx.conf of a test (tests/test_deploy.py)
worker_processes {workers};
daemon off;
pid {self.pid_file};
error_log {self.error_log} notice;
include {self.extra};

events {{
    worker_connections 512;
}}

http {{
    access_log off;
    types {{ text/html html; application/json json; text/css css; text/javascript js; }}
    default_type application/octet-stream;
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
    keepalive_timeout 30s;

    server {{
        listen 127.0.0.1:{self.port};
        root {html};
    }}
{includes}}}
"""
        with open(self.conf, "w") as handle:
            handle.write(text)
        self.original = text.encode()
        self.process = None

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}/"

    def start(self):
        test = subprocess.run([self.nginx, "-t", "-q", "-c", self.conf], capture_output=True, text=True, timeout=20)
        if test.returncode != 0:
            raise AssertionError(f"the test nginx.conf fails nginx -t:\n{test.stderr}")
        self.log = open(os.path.join(self.root, "nginx.out"), "wb")
        self.process = subprocess.Popen([self.nginx, "-c", self.conf], stdout=self.log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"nginx exited {self.process.returncode}: {self.errors()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    pass
                if os.path.exists(self.pid_file):
                    return self
            except OSError:
                pass
            time.sleep(0.02)
        raise AssertionError(f"nginx did not listen on {self.port}: {self.errors()}")

    def stop(self):
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process is not None:
            self.log.close()

    def errors(self):
        try:
            with open(self.error_log, errors="replace") as handle:
                return handle.read()[-2000:]
        except OSError:
            return "(no error log)"

    def workers(self):
        """Command lines of the master's live worker processes (not those shutting down)."""
        master = self.process.pid
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    ppid = int(handle.read().rsplit(")", 1)[1].split()[1])
                with open(f"/proc/{entry}/cmdline", "rb") as handle:
                    cmdline = handle.read().replace(b"\0", b" ").decode(errors="replace").strip()
            except (OSError, IndexError, ValueError):
                continue
            if ppid == master and "worker process" in cmdline and "shutting down" not in cmdline:
                found.append(cmdline)
        return found

    def wait_workers(self, count, timeout=10):
        """Wait until exactly `count` live workers run; returns the last count seen."""
        deadline = time.monotonic() + timeout
        while True:
            seen = len(self.workers())
            if seen == count or time.monotonic() > deadline:
                return seen
            time.sleep(0.05)


def expected_auto_workers():
    """What nginx's `worker_processes auto` may start here (online CPUs, or the affinity mask)."""
    counts = {os.cpu_count() or 1}
    try:
        counts.add(len(os.sched_getaffinity(0)))
    except AttributeError:
        pass
    return counts


class Prober(threading.Thread):
    """GET / every `period` seconds on a fresh connection until stopped: records every failure."""

    def __init__(self, port, period=0.01):
        super().__init__(daemon=True)
        self.port, self.period = port, period
        self.requests = 0
        self.failures = []
        self.halt = threading.Event()

    def run(self):
        while not self.halt.is_set():
            try:
                status, _, _ = http_get(self.port, timeout=3)
                if status != 200:
                    self.failures.append(f"HTTP {status}")
            except OSError as exc:
                self.failures.append(repr(exc))
            self.requests += 1
            self.halt.wait(self.period)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.halt.set()
        self.join(10)


class Deployed:
    """install.sh into ROOT/prefix, with the helper pointed at a test nginx's nginx.conf."""

    def __init__(self, root, nginx: NginxUnderTest, *extra_args, nginx_bin=None):
        self.prefix = os.path.join(root, "prefix")
        self.result = install(self.prefix, "--nginx-conf", nginx.conf, "--reload", "signal",
                              "--nginx-bin", nginx_bin or nginx.nginx, "--server-name", "smart.test",
                              *extra_args)
        self.opt = os.path.join(self.prefix, "opt", "smart")
        self.helper = os.path.join(self.prefix, "usr", "local", "sbin", "smart-nginx")
        self.state_dir = os.path.join(self.prefix, "var", "lib", "smart-nginx")
        self.site = os.path.join(self.prefix, "etc", "nginx", "sites-enabled", "smart")


def run_helper(helper, *args, env=None):
    """Run the installed helper through its own #! line (python3 -I); (code, stdout, stderr)."""
    done = subprocess.run([helper, *args], capture_output=True, text=True, timeout=90,
                          env=env if env is not None else clean_env(), stdin=subprocess.DEVNULL)
    return done.returncode, done.stdout, done.stderr


def tree(root):
    """Every path under root, relative, with a / after folders."""
    found = set()
    for folder, dirs, files in os.walk(root):
        rel = os.path.relpath(folder, root)
        for name in dirs:
            found.add(os.path.normpath(os.path.join(rel, name)) + "/")
        for name in files:
            found.add(os.path.normpath(os.path.join(rel, name)))
    return found


def unit_settings(path):
    """{key: [values]} of a unit file (comments and section headers left out)."""
    settings = {}
    with open(path) as handle:
        for line in handle:
            line = line.strip()
            if not line or line.startswith(("#", ";", "[")):
                continue
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def seconds(value: str) -> float:
    """A systemd time span ('25min', '90s', '1h 5min') in seconds."""
    units = {"h": 3600, "min": 60, "m": 60, "s": 1, "sec": 1, "": 1}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value):
        total += float(number) * units[unit]
    return total


# ---------------------------------------------------------------- install.sh --

class InstallTest(unittest.TestCase):
    """install.sh --prefix: the layout, the files it renders, idempotence, conffiles, dry run, uninstall."""

    def setUp(self):
        self.root = tempfile.mkdtemp(prefix="smart-deploy-")
        self.addCleanup(shutil.rmtree, self.root, True)
        self.prefix = os.path.join(self.root, "prefix")
        self.nginx_conf = os.path.join(self.root, "nginx.conf")
        with open(self.nginx_conf, "w") as handle:
            handle.write("worker_processes 1;\nevents {}\n")

    def install(self, *args, check=True):
        return install(self.prefix, "--nginx-conf", self.nginx_conf, "--reload", "signal", *args, check=check)

    def path(self, *parts):
        return os.path.join(self.prefix, *parts)

    def test_layout(self):
        result = self.install("--server-name", "smart.test", "--port", "8081")
        expected = {
            "opt/smart/", "opt/smart/smart.py", "opt/smart/smart.conf", "opt/smart/smart.conf.example",
            "opt/smart/www/", "opt/smart/experiments/", "opt/smart/experiments/001_nginx_workers/",
            "opt/smart/experiments/001_nginx_workers/meta.json", "opt/smart/experiments/001_nginx_workers/README.md",
            "opt/smart/docs/SPEC.md",
            "opt/smart/var/",
            "etc/systemd/system/smart-experiment.service", "etc/systemd/system/smart-experiment.timer",
            "etc/sudoers.d/smart-server", "usr/local/sbin/smart-nginx", "etc/smart/nginx-helper.conf",
            "var/lib/smart-nginx/", "etc/nginx/sites-available/smart", "etc/nginx/sites-enabled/smart",
            "usr/local/sbin/smart-php", "etc/smart/php-helper.conf", "var/lib/smart-php/",
        }
        found = tree(self.prefix)
        self.assertFalse(expected - found, f"missing after install: {sorted(expected - found)}")
        modes = {
            "opt/smart/smart.py": 0o755, "opt/smart/smart.conf": 0o640, "etc/sudoers.d/smart-server": 0o440,
            "usr/local/sbin/smart-nginx": 0o755, "etc/smart/nginx-helper.conf": 0o644,
            "var/lib/smart-nginx": 0o700, "opt/smart/var": 0o755, "usr/local/sbin/smart-php": 0o755,
            "etc/smart/php-helper.conf": 0o644, "var/lib/smart-php": 0o700,
            "opt/smart/experiments/001_nginx_workers/meta.json": 0o644,
        }
        for rel, mode in modes.items():
            self.assertEqual(stat.S_IMODE(os.stat(self.path(rel)).st_mode), mode, rel)
        for rel in os.listdir(self.path("opt", "smart", "www")):
            self.assertTrue(os.path.isfile(self.path("opt", "smart", "www", rel)))
        # The repository's files, copied as they are.
        self.assertEqual(read_bytes(self.path("opt/smart/smart.py")), read_bytes(os.path.join(REPO_ROOT, "smart.py")))
        for name in os.listdir(EXPERIMENT_001):
            self.assertEqual(read_bytes(self.path("opt/smart/experiments/001_nginx_workers", name)),
                             read_bytes(os.path.join(EXPERIMENT_001, name)), name)
        self.assertEqual(read_bytes(self.path("opt/smart/smart.conf")),
                         read_bytes(os.path.join(DEPLOY, "smart.conf.example")))
        # The helper's fixed config path now names the prefix's copy, and nothing else changed.
        for name in ("nginx", "php"):
            helper = read_bytes(self.path(f"usr/local/sbin/smart-{name}")).decode()
            config_path = self.path(f"etc/smart/{name}-helper.conf")
            self.assertIn(f'\nCONFIG = "{config_path}"\n', helper)
            self.assertEqual(helper.replace(config_path, f"/etc/smart/{name}-helper.conf"),
                             read_bytes(os.path.join(DEPLOY, f"smart-{name}")).decode())
            self.assertTrue(helper.startswith("#!/usr/bin/python3 -I\n"))
        config_path = self.path("etc/smart/nginx-helper.conf")
        with open(config_path) as handle:
            settings = dict(line.strip().split("=", 1) for line in handle if "=" in line and not line.startswith("#"))
        self.assertEqual(settings["NGINX_CONF"], self.nginx_conf)
        self.assertEqual(settings["RELOAD"], "signal")
        self.assertEqual(settings["STATE_DIR"], self.path("var/lib/smart-nginx"))
        self.assertEqual(settings["DROPIN"], os.path.join(self.root, "conf.d", "zz-smart-tuning.conf"))
        self.assertEqual(settings["CACHE_DIR"], self.path("var/cache/nginx/smart-micro"))
        with open(self.path("etc/smart/php-helper.conf")) as handle:
            php = dict(line.strip().split("=", 1) for line in handle if "=" in line and not line.startswith("#"))
        self.assertEqual(php, {"FPM_CONF": self.path("etc/php/8.2/fpm/php-fpm.conf"), "FPM_BIN": php["FPM_BIN"],
                               "POOL": "www", "POOL_DROPIN": self.path("etc/php/8.2/fpm/pool.d/zz-smart.conf"),
                               "INI_DROPIN": self.path("etc/php/8.2/fpm/conf.d/99-smart.ini"), "PID_FILE": "",
                               "RELOAD": "auto", "SERVICE": "php8.2-fpm", "STATE_DIR": self.path("var/lib/smart-php")})
        # no php-fpm.conf in the prefix: the install says smart-php cannot work here
        self.assertIn("smart-php: not usable here", result.stdout)
        # The units and the site name the prefix's paths.
        service = unit_settings(self.path("etc/systemd/system/smart-experiment.service"))
        self.assertEqual(service["ExecStart"], [f"/usr/bin/python3 {self.path('opt/smart/smart.py')} run"])
        self.assertEqual(service["WorkingDirectory"], [self.path("opt/smart")])
        with open(self.path("etc/nginx/sites-enabled/smart")) as handle:
            site = handle.read()
        self.assertIn("server_name smart.test;", site)
        self.assertIn("listen 8081;", site)
        self.assertNotIn("/opt/smart/", site.replace(self.path("opt/smart/"), ""))
        self.assertEqual(os.readlink(self.path("etc/nginx/sites-enabled/smart")),
                         self.path("etc/nginx/sites-available/smart"))
        self.assertIn("http://smart.test:8081/", result.stdout)
        self.assertTrue(os.path.isfile(self.path("opt/smart/var/history.json")), "first dashboard files published")

    def test_second_run_changes_nothing_and_keeps_what_is_yours(self):
        self.install("--server-name", "smart.test", "--port", "8081")
        before = {rel: read_bytes(self.path(rel)) for rel in tree(self.prefix) if not rel.endswith("/")
                  and not os.path.islink(self.path(rel))}
        again = self.install()            # an upgrade without options keeps the site's name and port
        for line in again.stdout.splitlines():
            self.assertNotRegex(line, r"^\s+(install|update|create|link) ", f"second run changed something:\n{again.stdout}")
        after = {rel: read_bytes(self.path(rel)) for rel in before}
        changed = [rel for rel in before if before[rel] != after[rel] and rel != "opt/smart/var/history.json"]
        self.assertEqual(changed, [])
        # Your smart.conf, your edit of a shipped experiment, your helper config: all kept.
        conf = self.path("opt/smart/smart.conf")
        with open(conf, "a") as handle:
            handle.write("KEEP_RUNS=50\n")
        meta = self.path("opt/smart/experiments/001_nginx_workers/meta.json")
        edited = read_bytes(meta).replace(b'"rate": 20', b'"rate": 30')
        self.assertNotEqual(edited, read_bytes(meta))
        with open(meta, "wb") as handle:
            handle.write(edited)
        upgrade = self.install(check=False)
        self.assertEqual(upgrade.returncode, 0, upgrade.stderr)
        self.assertTrue(read_bytes(conf).endswith(b"KEEP_RUNS=50\n"))
        self.assertEqual(read_bytes(meta), edited)
        self.assertEqual(read_bytes(meta + ".dist"), read_bytes(os.path.join(EXPERIMENT_001, "meta.json")))
        self.assertIn("kept", upgrade.stderr)
        # An unedited shipped file that the new version changes is updated.
        readme = self.path("opt/smart/experiments/001_nginx_workers/README.md")
        with open(os.path.join(self.path("opt/smart"), ".shipped")) as handle:
            self.assertIn("experiments/001_nginx_workers/README.md", handle.read())
        self.assertEqual(read_bytes(readme), read_bytes(os.path.join(EXPERIMENT_001, "README.md")))

    def test_dry_run_changes_nothing(self):
        result = self.install("--dry-run")
        self.assertFalse(os.path.exists(self.prefix), f"--dry-run created {sorted(tree(self.prefix))}")
        self.assertIn("would install", result.stdout)
        self.assertIn(self.path("usr/local/sbin/smart-nginx"), result.stdout)
        self.assertIn("nothing was changed", result.stdout)
        self.install()
        before = {rel: read_bytes(self.path(rel)) for rel in tree(self.prefix) if not rel.endswith("/")}
        result = self.install("--dry-run", "--port", "9999")
        self.assertIn("would update", result.stdout)
        self.assertEqual({rel: read_bytes(self.path(rel)) for rel in before}, before)

    def test_bad_options_are_refused(self):
        for args in (["--port", "0"], ["--port", "80;"], ["--server-name", "a b"], ["--reload", "sometimes"],
                     ["--bogus"], ["--nginx-conf", "/etc/nginx/nginx.conf;rm"]):
            result = self.install(*args, check=False)
            self.assertNotEqual(result.returncode, 0, args)
            self.assertIn("install.sh", result.stderr)
            self.assertFalse(os.path.exists(self.prefix), args)

    def test_uninstall_keeps_var_unless_purge(self):
        self.install()
        os.makedirs(self.path("opt/smart/var/runs/20260101T000000"))
        with open(self.path("opt/smart/var/state.json"), "w") as handle:
            handle.write("{}\n")
        dry = uninstall(self.prefix, "--dry-run")
        self.assertEqual(dry.returncode, 0, dry.stderr)
        self.assertTrue(os.path.exists(self.path("usr/local/sbin/smart-nginx")))
        done = uninstall(self.prefix)
        self.assertEqual(done.returncode, 0, done.stderr)
        left = tree(self.prefix)
        self.assertIn("opt/smart/var/state.json", left)
        self.assertIn("opt/smart/var/runs/20260101T000000/", left)
        self.assertIn("opt/smart/smart.conf", left)
        for gone in ("opt/smart/smart.py", "opt/smart/www/", "opt/smart/experiments/", "usr/local/sbin/smart-nginx",
                     "etc/sudoers.d/smart-server", "etc/smart/nginx-helper.conf", "etc/nginx/sites-enabled/smart",
                     "usr/local/sbin/smart-php", "etc/smart/php-helper.conf",
                     "etc/systemd/system/smart-experiment.service", "etc/systemd/system/smart-experiment.timer"):
            self.assertNotIn(gone, left)
        purge = uninstall(self.prefix, "--purge")
        self.assertEqual(purge.returncode, 0, purge.stderr)
        self.assertFalse(os.path.exists(self.path("opt/smart")))
        self.assertFalse(os.path.exists(self.path("var/lib/smart-nginx")))
        self.assertFalse(os.path.exists(self.path("var/lib/smart-php")))

    def test_probes_snippet_and_conditional_access_log_round_trip(self):
        logs = os.path.join(self.root, "logs")
        os.makedirs(logs)
        conf = (f"pid {self.root}/nginx.pid;\nerror_log {logs}/error.log;\nevents {{}}\nhttp {{\n"
                f"\taccess_log {logs}/access.log;\n\taccess_log {logs}/other.log combined;\n\taccess_log off;\n"
                f"\tinclude {self.root}/conf.d/*.conf;\n\tserver {{ listen 127.0.0.1:1; access_log {logs}/site.log; }}\n}}\n")
        with open(self.nginx_conf, "w") as handle:
            handle.write(conf)
        result = self.install()
        self.assertIn("made 2 access_log line(s) conditional", result.stdout)
        edited = read_bytes(self.nginx_conf).decode()
        self.assertIn(f"access_log {logs}/access.log combined if=$smart_visitor;", edited)
        self.assertIn(f"access_log {logs}/other.log combined if=$smart_visitor;", edited)
        self.assertIn("access_log off;", edited)
        self.assertIn(f"access_log {logs}/site.log; }}", edited, "a server's own access_log is left alone")
        probes = read_bytes(os.path.join(self.root, "conf.d", "smart-probes.conf")).decode()
        self.assertIn("map $http_user_agent $smart_visitor {\n    ~^smart\\.py/ 0;\n    default 1;\n}", probes)
        self.assertIn(f"access_log {logs}/smart-timing.log smart_timing if=$smart_visitor;", probes)
        test = subprocess.run([need("nginx"), "-t", "-c", self.nginx_conf], capture_output=True, text=True, timeout=20)
        self.assertEqual(test.returncode, 0, test.stderr)
        again = self.install()
        self.assertIn("access_log already conditional", again.stdout)
        self.assertEqual(read_bytes(self.nginx_conf).decode(), edited)
        done = uninstall(self.prefix)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual(read_bytes(self.nginx_conf).decode(),
                         conf.replace("other.log combined;", "other.log;"),
                         "nginx.conf back (an explicit `combined` comes back as the default it names)")
        self.assertFalse(os.path.exists(os.path.join(self.root, "conf.d", "smart-probes.conf")))

    def test_without_systemd_the_advice_is_cron_or_by_hand(self):
        result = self.install()
        self.assertNotIn("systemctl", result.stdout)
        self.assertIn(f"run now:    /usr/bin/python3 {self.path('opt/smart/smart.py')} run\n", result.stdout)
        self.assertIn(f"*/30 * * * * /usr/bin/python3 {self.path('opt/smart/smart.py')} run", result.stdout)

    def test_uninstall_help_is_a_usage(self):
        for flag in ("--help", "-h"):
            done = uninstall(self.prefix, flag)
            self.assertEqual(done.returncode, 0, done.stderr)
            self.assertTrue(done.stdout.startswith("usage: deploy/uninstall.sh "), done.stdout)
            for option in ("--dry-run", "--purge", "--force", "--wait S", "--prefix DIR"):
                self.assertIn(option, done.stdout)
            self.assertNotIn("set -", done.stdout)
        self.assertFalse(os.path.exists(self.prefix))


class UninstallLiveRunTest(unittest.TestCase):
    """uninstall.sh while a `smart.py run` started by hand (no systemd) holds the lock: it stops the
    run with SIGTERM, waits for its revert, and only then removes the helper; a run that does not
    end stops the uninstall, --force or not.

    The run measures a DemoTarget of this process; its experiment writes the variant to
    HOME/server.conf, and its revert notes in HOME/revert.log whether the helper was still there.
    """

    def setUp(self):
        need("flock")
        self.root = tempfile.mkdtemp(prefix="smart-uninstall-")
        self.addCleanup(shutil.rmtree, self.root, True)
        self.prefix = os.path.join(self.root, "prefix")
        nginx_conf = os.path.join(self.root, "nginx.conf")
        with open(nginx_conf, "w") as handle:
            handle.write("worker_processes 1;\nevents {}\n")
        install(self.prefix, "--nginx-conf", nginx_conf, "--reload", "signal")
        self.home = os.path.join(self.prefix, "opt", "smart")
        self.helper = os.path.join(self.prefix, "usr", "local", "sbin", "smart-nginx")
        target = smart.DemoTarget(os.path.join(self.root, "mode")).start()
        self.addCleanup(target.server_close)
        self.addCleanup(target.shutdown)
        self.target_url = target.url

    def home_path(self, *parts):
        return os.path.join(self.home, *parts)

    def start_run(self, revert):
        """`smart.py run 050_slow` from the prefix's home, in its own process group (killed in cleanup)."""
        folder = self.home_path("experiments", "050_slow")
        os.makedirs(folder)
        smart.write_json(os.path.join(folder, "meta.json"), {
            "id": "050_slow", "description": "a variant measured for two minutes",
            "variants": [{"name": "baseline", "apply": "echo baseline > ../../server.conf"},
                         {"name": "v1", "apply": "echo v1 > ../../server.conf"}],
            "revert": revert, "target_url": self.target_url, "measure": {"rate": 20, "timeout": 1}})
        env = clean_env({"DESIGN": "sequential", "BASELINE_SECONDS": "1", "EXPERIMENT_SECONDS": "120",
                         "COOLDOWN_SECONDS": "0", "EARLY_STOP": "no", "PHONE_HOME": "never",
                         "COMMAND_TIMEOUT_SECONDS": "30", "MIN_SAMPLES": "5"})
        self.log = open(os.path.join(self.root, "run.out"), "w+")
        self.addCleanup(self.log.close)
        proc = subprocess.Popen([sys.executable, self.home_path("smart.py"), "--home", self.home, "run", "050_slow"],
                                env=env, stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT,
                                start_new_session=True)

        def stop():
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
                proc.wait(10)
        self.addCleanup(stop)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and proc.poll() is None:
            state = smart.read_json(self.home_path("var", "state.json"), {}) or {}
            if state.get("phase") == "measuring v1":
                break
            time.sleep(0.05)
        self.assertEqual(smart.read_json(self.home_path("var", "state.json"), {}).get("phase"), "measuring v1",
                         f"the run never measured v1:\n{self.log_text()}")
        self.assertTrue(os.path.exists(self.home_path("var", "applied.json")), "v1 is applied: the journal says so")
        return proc

    def log_text(self):
        self.log.seek(0)
        return self.log.read()

    def test_stops_the_run_and_waits_for_its_revert_before_removing_the_helper(self):
        revert = ('echo baseline > ../../server.conf; '
                  f'if [ -e {self.helper} ]; then echo helper present; else echo helper missing; fi >> ../../revert.log')
        proc = self.start_run(revert)
        dry = uninstall(self.prefix, "--dry-run")
        self.assertEqual(dry.returncode, 0, dry.stderr)
        self.assertIn(f"would stop the live run (pid {proc.pid})", dry.stdout)
        self.assertIsNone(proc.poll(), "a dry run stopped the run")
        done = uninstall(self.prefix)
        self.assertEqual(done.returncode, 0, f"{done.stdout}\n{done.stderr}")
        self.assertIn(f"sent SIGTERM to the live run (pid {proc.pid})", done.stdout)
        self.assertEqual(proc.wait(10), 1, self.log_text())               # 1: interrupted
        with open(self.home_path("revert.log")) as handle:
            self.assertEqual(handle.read(), "helper present\n", "the revert ran before the helper was removed")
        with open(self.home_path("server.conf")) as handle:
            self.assertEqual(handle.read(), "baseline\n")
        self.assertFalse(os.path.exists(self.home_path("var", "applied.json")), "the journal is gone")
        self.assertEqual(smart.read_json(self.home_path("var", "state.json"))["status"], "interrupted")
        self.assertLess(done.stdout.index("ended"), done.stdout.index(f"remove {self.helper}"))
        self.assertFalse(os.path.exists(self.helper))
        self.assertFalse(os.path.exists(self.home_path("smart.py")))

    def test_a_run_that_does_not_end_stops_the_uninstall_even_with_force(self):
        # the revert hangs (SIGTERM starts it, it sleeps); its own session is killed in cleanup
        pid_file = self.home_path("revert.pid")

        def kill_revert():
            with contextlib.suppress(OSError, ValueError):
                with open(pid_file) as handle:
                    os.killpg(int(handle.read()), 9)
        self.addCleanup(kill_revert)
        proc = self.start_run("echo $$ > ../../revert.pid; sleep 25; echo baseline > ../../server.conf")
        done = uninstall(self.prefix, "--force", "--wait", "1")
        self.assertNotEqual(done.returncode, 0, done.stdout)
        self.assertIn(f"the run (pid {proc.pid}) still holds", done.stderr)
        self.assertIn("not even with --force", done.stderr)
        self.assertIsNone(proc.poll())
        for path in (self.helper, self.home_path("smart.py"), self.home_path("var", "applied.json")):
            self.assertTrue(os.path.exists(path), f"{path} removed under a live run")
        self.assertNotIn("remove ", done.stdout)


# ---------------------------------------------------------------- sudoers, units --

class SudoersTest(unittest.TestCase):
    """The drop-in is generated from the installed experiments: the helpers alone, each line one exact
    argument vector an experiment declares (checked by the helper's own parser), and visudo accepts it."""

    HEAD = ["Defaults:smart !requiretty"]

    @classmethod
    def setUpClass(cls):
        """One install of the shipped catalogue, kept aside; each test gets a copy at the same path."""
        cls.root = tempfile.mkdtemp(prefix="smart-sudoers-")
        cls.addClassCleanup(shutil.rmtree, cls.root, True)
        cls.prefix = os.path.join(cls.root, "prefix")
        cls.installed = os.path.join(cls.root, "installed")
        install(cls.prefix)
        os.rename(cls.prefix, cls.installed)

    def setUp(self):
        shutil.rmtree(self.prefix, ignore_errors=True)
        shutil.copytree(self.installed, self.prefix, symlinks=True)
        self.experiments = os.path.join(self.prefix, "opt", "smart", "experiments")
        self.nginx = os.path.join(self.prefix, "usr/local/sbin/smart-nginx")
        self.php = os.path.join(self.prefix, "usr/local/sbin/smart-php")
        self.sudoers = os.path.join(self.prefix, "etc/sudoers.d/smart-server")

    def rules(self, path=None):
        with open(path or self.sudoers) as handle:
            lines = [line.rstrip("\n") for line in handle]
        for line in lines:
            self.assertNotIn("*", line, "no wildcard anywhere in the drop-in")
        return [line for line in lines if line.strip() and not line.lstrip().startswith("#")]

    def rule(self, helper, *argv):
        return f"smart ALL=(root) NOPASSWD: {self.nginx if helper == 'nginx' else self.php} {' '.join(argv)}"

    def base(self):
        """The drop-in of the shipped catalogue, derived from its meta.json files: each helper's test,
        then for each experiment with a helper (name order) a set per variant (names sorted, a sweep's
        values expanded as smart.py does), the reset and the get of all its names; each vector once."""
        rules = self.HEAD + [self.rule("nginx", "test"), self.rule("php", "test")]
        for path in sorted(glob.glob(os.path.join(REPO_ROOT, "experiments", "*", "meta.json"))):
            with open(path) as handle:
                meta = json.load(handle)
            if not meta.get("helper"):
                continue
            helper = meta["helper"].split("-", 1)[1]
            variants = smart.sweep_variants(meta["sweep"]) if "sweep" in meta else meta["variants"]
            sets = [variant["set"] for variant in variants if variant.get("set")]
            names = sorted({name for pairs in sets for name in pairs})
            argvs = [["set", *(word for name in sorted(pairs) for word in (name, pairs[name]))] for pairs in sets]
            for argv in argvs + [["reset", *names], ["get", *names]]:
                if self.rule(helper, *argv) not in rules:
                    rules.append(self.rule(helper, *argv))
        self.assertIn(self.rule("nginx", "set", "worker_processes", "auto"), rules)     # 001's, for one
        return rules

    def add_experiment(self, name, helper, variants):
        folder = os.path.join(self.experiments, name)
        os.makedirs(folder)
        meta = {"id": name, "description": "sudoers test", "helper": helper, "target_url": "http://127.0.0.1/",
                "revert": "true", "variants": [{"name": "baseline", "apply": "true"}] + variants}
        with open(os.path.join(folder, "meta.json"), "w") as handle:
            json.dump(meta, handle)
        return folder

    def visudo(self, path=None):
        check = subprocess.run([need("visudo"), "-cf", path or self.sudoers], capture_output=True, text=True, timeout=20)
        self.assertEqual(check.returncode, 0, check.stdout + check.stderr)

    def test_generated_line_by_line_and_updated_when_an_experiment_is_added(self):
        self.visudo()
        self.assertEqual(self.rules(), self.base())
        self.add_experiment("050_php_pool", "smart-php", [
            {"name": "static5", "set": {"pm.max_children": "5", "pm": "static"}},
            {"name": "opcache_off", "set": {"opcache.enable": "0"}}])
        self.add_experiment("051_nginx_cache", "smart-nginx", [
            {"name": "micro5", "set": {"open_file_cache": "1000", "microcache": "5"}},
            {"name": "workers2", "set": {"worker_processes": "2"}}])     # the same vector as 001's: listed once
        again = install(self.prefix)
        self.assertIn("update " + self.sudoers, again.stdout)
        self.visudo()
        self.assertEqual(self.rules(), self.base() + [
            self.rule("php", "set", "pm", "static", "pm.max_children", "5"),
            self.rule("php", "set", "opcache.enable", "0"),
            self.rule("php", "reset", "opcache.enable", "pm", "pm.max_children"),
            self.rule("php", "get", "opcache.enable", "pm", "pm.max_children"),
            self.rule("nginx", "set", "microcache", "5", "open_file_cache", "1000"),
            self.rule("nginx", "reset", "microcache", "open_file_cache", "worker_processes"),
            self.rule("nginx", "get", "microcache", "open_file_cache", "worker_processes")])
        # every listed vector is one the installed helper accepts (check: validates, reads nothing)
        for rule in self.rules()[1:]:
            helper, *argv = rule.split("NOPASSWD: ", 1)[1].split()
            code, out, err = run_helper(helper, "check", *argv) if argv != ["test"] else (0, "", "")
            self.assertEqual(code, 0, f"{rule}: {err}")
        installed = read_bytes(self.sudoers)
        self.assertEqual(install(self.prefix).returncode, 0)
        self.assertEqual(read_bytes(self.sudoers), installed, "a re-run with nothing new changes nothing")

    def test_a_value_outside_a_grammar_stops_the_install(self):
        installed = read_bytes(self.sudoers)
        for name, helper, pairs, word in (
                ("060_bad_php", "smart-php", {"pm.max_children": "300"}, "pm.max_children takes 1..256"),
                ("061_bad_name", "smart-nginx", {"root": "/"}, "unknown name 'root'"),
                ("062_bad_combination", "smart-php", {"pm.min_spare_servers": "5", "pm.max_spare_servers": "2"},
                 "min_spare <= start"),
                ("063_not_a_string", "smart-nginx", {"worker_processes": 2}, "must be a string"),
                ("064_bad_helper", "sh", {"worker_processes": "2"}, "expected one of smart-nginx, smart-php")):
            with self.subTest(name=name):
                folder = self.add_experiment(name, helper, [{"name": "v", "set": pairs}])
                done = install(self.prefix, check=False)
                self.assertNotEqual(done.returncode, 0, done.stdout)
                self.assertIn(word, done.stderr)
                self.assertIn(name, done.stderr)
                self.assertEqual(read_bytes(self.sudoers), installed, "the installed drop-in is left as it was")
                shutil.rmtree(folder)

    def test_an_experiment_others_can_write_is_skipped(self):
        folder = self.add_experiment("070_writable", "smart-php", [{"name": "v", "set": {"pm.max_requests": "500"}}])
        os.chmod(os.path.join(folder, "meta.json"), 0o666)
        done = install(self.prefix)
        self.assertIn(f"skipped {folder}", done.stderr)
        self.assertEqual(self.rules(), self.base())

    def test_every_helper_call_smart_py_makes_is_an_allowed_vector(self):
        """For every shipped experiment with a helper, each command smart.py would run (apply of every
        variant, sweeps expanded, the revert and dry run's get) is a rule of the drop-in, word for word."""
        paths = {"smart-nginx": self.nginx, "smart-php": self.php}
        allowed = {rule.split("NOPASSWD: ", 1)[1] for rule in self.rules() if "NOPASSWD: " in rule}
        settings = dict(smart.load_settings(None, environ={}), HELPER_COMMAND="")
        checked = 0
        for experiment in smart.find_experiments(os.path.join(REPO_ROOT), [], settings):
            if not experiment.helper:
                continue
            commands = [experiment.apply_command(v) for v in experiment.candidates]
            commands += [experiment.revert, experiment.helper_call("get", experiment.helper_names)]
            for command in commands:
                with self.subTest(experiment=experiment.id, command=command):
                    helper, argv = command.split(" ", 1)
                    self.assertIn(f"{paths[helper]} {argv}", allowed)
                    checked += 1
        self.assertIn(f"{self.nginx} set worker_processes auto", allowed)
        self.assertGreaterEqual(checked, 4)

    def test_real_sudo_lists_exactly_these_vectors(self):
        """sudo -l -U for a throwaway user given the generated rules in /etc/sudoers.d (removed after)."""
        need_root()
        sudo, useradd, userdel = need("sudo"), need("useradd"), need("userdel")
        user = f"smarttest{os.getpid()}"
        created = subprocess.run([useradd, "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", user],
                                 capture_output=True, text=True, timeout=30)
        self.assertEqual(created.returncode, 0, created.stderr)
        self.addCleanup(subprocess.run, [userdel, user], capture_output=True, timeout=30)
        text = subprocess.run([sys.executable, os.path.join(DEPLOY, "install_tool.py"), "sudoers", user,
                               self.experiments, self.nginx, self.php], capture_output=True, text=True,
                              timeout=30, check=True).stdout
        drop_in = f"/etc/sudoers.d/zz-smart-test-{os.getpid()}"
        with open(drop_in + ".tmp", "w") as handle:
            handle.write(text)
        os.chmod(drop_in + ".tmp", 0o440)
        self.visudo(drop_in + ".tmp")
        os.rename(drop_in + ".tmp", drop_in)
        self.addCleanup(os.remove, drop_in)
        listed = subprocess.run([sudo, "-n", "-l", "-U", user], capture_output=True, text=True, timeout=30)
        self.assertEqual(listed.returncode, 0, listed.stderr)
        commands = [line.split("NOPASSWD: ", 1)[1].strip() for line in listed.stdout.splitlines() if "NOPASSWD:" in line]
        expected = [rule.split("NOPASSWD: ", 1)[1].replace("smart ALL", f"{user} ALL") for rule in self.base()[1:]]
        self.assertEqual(commands, expected, listed.stdout)
        self.assertNotIn("(ALL)", listed.stdout.split("may run the following commands", 1)[-1])
        # each an exact vector: any one word put outside the helper's grammar is refused (exit 2)
        for command in commands:
            helper, verb, *words = command.split()
            for index in range(len(words) if words else 1):
                with self.subTest(command=command, word=index):
                    if not words:
                        outside = [verb, "now"]                       # test takes no argument
                    elif verb == "set":
                        outside = [verb, *words[:index], "-1" if index % 2 else "root", *words[index + 1:]]
                    else:
                        outside = [verb, *words[:index], "root", *words[index + 1:]]
                    code, out, err = run_helper(helper, "check", *outside)
                    self.assertEqual(code, 2, f"{helper} check {' '.join(outside)}: {out}{err}")


class UnitsTest(unittest.TestCase):
    """The units pass systemd-analyze verify, and their settings keep the promises of the issue."""

    def setUp(self):
        self.root = tempfile.mkdtemp(prefix="smart-units-")
        self.addCleanup(shutil.rmtree, self.root, True)
        self.service = os.path.join(DEPLOY, "systemd", "smart-experiment.service")
        self.timer = os.path.join(DEPLOY, "systemd", "smart-experiment.timer")

    def test_systemd_analyze_verify(self):
        analyze = need("systemd-analyze")
        prefix = os.path.join(self.root, "prefix")
        install(prefix)
        units = os.path.join(prefix, "etc/systemd/system")
        for folder in (units, os.path.join(DEPLOY, "systemd")):
            with self.subTest(folder=folder):
                done = subprocess.run([analyze, "verify", "--man=no",
                                       os.path.join(folder, "smart-experiment.service"),
                                       os.path.join(folder, "smart-experiment.timer")],
                                      capture_output=True, text=True, timeout=60)
                ours = [line for line in (done.stdout + done.stderr).splitlines() if "smart-experiment" in line]
                self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
                self.assertEqual(ours, [], "systemd-analyze complained about our units")

    def test_service_settings(self):
        service = unit_settings(self.service)
        self.assertEqual(service["Type"], ["oneshot"])
        self.assertEqual(service["User"], ["smart"])
        self.assertEqual(service["WorkingDirectory"], ["/opt/smart"])
        self.assertEqual(service["ExecStart"], ["/usr/bin/python3 /opt/smart/smart.py run"])
        self.assertEqual(service["KillMode"], ["mixed"])
        self.assertEqual(service["KillSignal"], ["SIGTERM"])
        self.assertIn(service["ProtectSystem"][0], ("full", "strict"))
        self.assertEqual(service["PrivateTmp"], ["true"])
        self.assertEqual(service["ProtectHome"], ["true"])
        writable = " ".join(service["ReadWritePaths"]).split()
        self.assertIn("/opt/smart/var", writable)
        self.assertTrue({"/etc/nginx", "-/etc/nginx"} & set(writable), "the helper (run via sudo) must write /etc/nginx")
        # Nothing that sets no_new_privs (or takes root from sudo): every apply and revert would fail.
        breaks_sudo = {"NoNewPrivileges", "RestrictSUIDSGID", "SystemCallFilter", "SystemCallArchitectures",
                       "SystemCallLog", "RestrictAddressFamilies", "RestrictNamespaces", "RestrictRealtime",
                       "LockPersonality", "MemoryDenyWriteExecute", "PrivateDevices", "ProtectClock",
                       "ProtectHostname", "ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs",
                       "DynamicUser", "PrivateUsers", "CapabilityBoundingSet", "AmbientCapabilities"}
        self.assertEqual(breaks_sudo & set(service), set())
        # The stop must outlast one revert (COMMAND_TIMEOUT_SECONDS).
        self.assertGreater(seconds(service["TimeoutStopSec"][0]), smart.SETTINGS["COMMAND_TIMEOUT_SECONDS"][0])

    def test_time_box_covers_the_shipped_experiments_and_stays_under_the_period(self):
        """TimeoutStartSec >= what the longest shipped experiment measures at the defaults, plus its
        commands: the timer's pass runs one trial (docs/SPEC.md, "Settled experiments")."""
        service = unit_settings(self.service)
        timer = unit_settings(self.timer)
        settings = {key: spec[0] for key, spec in smart.SETTINGS.items()}
        per_command = 2.0              # a helper call: python start, nginx -t, reload (about 0.2 s here)
        root = os.path.join(REPO_ROOT, "experiments")
        worst = 0.0
        for folder in sorted(os.listdir(root)):
            experiment = smart.load_experiment(os.path.join(root, folder))
            length = lambda key: float(experiment.seconds.get(key.lower()) or settings.get(key, 0))  # noqa: E731
            variants = len(experiment.candidates)
            timeout = float(experiment.measure.get("timeout", 5))
            design = getattr(experiment, "design", None) or settings.get("DESIGN", "sequential")
            commands = 2               # the recovery revert and the baseline's apply
            if design == "switchback":
                blocks = int(getattr(experiment, "blocks", None) or settings["BLOCKS"])
                warmup = length("WARMUP_SECONDS")
                measuring = warmup + variants * (2 * blocks * warmup + length("BASELINE_SECONDS")
                                                 + length("EXPERIMENT_SECONDS") + timeout)
                commands += variants * (2 * blocks + 1)
            else:
                measuring = length("BASELINE_SECONDS") + timeout + variants * (
                    length("COOLDOWN_SECONDS") + length("EXPERIMENT_SECONDS") + timeout)
                commands += 2 * variants
            worst = max(worst, measuring + commands * per_command)
        box = seconds(service["TimeoutStartSec"][0])
        self.assertGreaterEqual(box, worst, f"TimeoutStartSec {box:g} s < {worst:g} s of measuring and commands")
        self.assertEqual(timer["OnCalendar"], ["*:00/30"])
        self.assertLess(box, 30 * 60, "a run must end before the timer's next start")
        self.assertEqual(timer["Persistent"], ["true"])
        self.assertIn("RandomizedDelaySec", timer)
        self.assertEqual(timer["WantedBy"], ["timers.target"])


# ---------------------------------------------------------------- the helper --

class HelperTest(unittest.TestCase):
    """deploy/smart-nginx, installed into a prefix, against a real nginx reloaded by nginx -s reload.

    install.sh runs once (setUpClass: into ROOT/d, with the helper pointed at ROOT/nginx.conf; a
    --prefix install writes nothing outside the prefix and reloads nothing); each test starts from an
    empty ROOT, a copy of that prefix at the same path, and a new nginx.conf and nginx of its own."""

    @classmethod
    def setUpClass(cls):
        need_root()
        need(HELPER_PYTHON)
        cls.base = tempfile.mkdtemp(prefix="smart-helper-")
        cls.addClassCleanup(shutil.rmtree, cls.base, True)
        os.chmod(cls.base, 0o755)                   # nginx's workers (nobody) go through it to ROOT/html
        cls.root = os.path.join(cls.base, "root")
        os.makedirs(cls.root)
        cls.deployed = Deployed(os.path.join(cls.root, "d"), NginxUnderTest(cls.root))
        cls.installed = os.path.join(cls.base, "installed")
        shutil.copytree(cls.deployed.prefix, cls.installed, symlinks=True)
        cls.helper = cls.deployed.helper

    def setUp(self):
        shutil.rmtree(self.root)
        os.makedirs(self.root)
        shutil.copytree(self.installed, self.deployed.prefix, symlinks=True)
        self.nginx = NginxUnderTest(self.root)
        self.nginx.start()
        self.addCleanup(self.nginx.stop)

    def helper_run(self, *args, env=None):
        return run_helper(self.helper, *args, env=env)

    def conf(self):
        return read_bytes(self.nginx.conf)

    def test_set_workers_then_reset_round_trips_byte_for_byte(self):
        original = self.conf()
        self.assertEqual(self.nginx.wait_workers(1), 1)
        code, out, err = self.helper_run("set", "worker_processes", "2")
        self.assertEqual(code, 0, err)
        self.assertIn("worker_processes 1 -> 2", out)
        self.assertEqual(worker_value(self.conf()), "2")
        self.assertEqual(without_workers(self.conf()), without_workers(original), "only worker_processes changed")
        self.assertEqual(self.nginx.wait_workers(2), 2, "nginx reloaded with 2 workers")
        self.assertEqual(self.helper_run("get", "worker_processes")[:2], (0, "worker_processes 2\n"))
        code, out, err = self.helper_run("set", "worker_processes", "auto")
        self.assertEqual(code, 0, err)
        self.assertEqual(worker_value(self.conf()), "auto")
        self.assertIn(self.nginx.wait_workers(min(expected_auto_workers())), expected_auto_workers())
        self.assertEqual(read_bytes(os.path.join(self.deployed.state_dir, "nginx.conf.original")), original)
        code, out, err = self.helper_run("reset", "worker_processes")
        self.assertEqual(code, 0, err)
        self.assertEqual(self.conf(), original)
        self.assertEqual(self.nginx.wait_workers(1), 1)
        # Reset again: nothing to do, still fine (a revert may run twice, e.g. by recovery).
        code, out, err = self.helper_run("reset", "worker_processes")
        self.assertEqual((code, self.conf()), (0, original), err)
        self.assertIn("nothing to reset", out)
        self.assertEqual(http_get(self.nginx.port)[0], 200)

    def test_worker_connections_in_the_events_block_and_one_reload_for_two_names(self):
        original = self.conf()
        code, out, err = self.helper_run("set", "worker_connections", "1024", "worker_processes", "2")
        self.assertEqual(code, 0, err)
        self.assertIn(b"events {\n    worker_connections 1024;\n}", self.conf())
        self.assertEqual(self.nginx.wait_workers(2), 2)
        code, out, err = self.helper_run("get", "worker_connections", "worker_processes")
        self.assertEqual(out, "worker_connections 1024\nworker_processes 2\n")
        workers = self.nginx.workers()
        code, out, err = self.helper_run("set", "worker_connections", "1024", "worker_processes", "2")
        self.assertEqual(code, 0, err)
        self.assertIn("already in effect", out)
        time.sleep(0.3)
        self.assertEqual(self.nginx.workers(), workers, "no reload when nothing changes")
        self.assertEqual(self.helper_run("reset", "worker_connections", "worker_processes")[0], 0)
        self.assertEqual(self.conf(), original)

    def test_mode_and_owner_of_nginx_conf_are_kept(self):
        os.chmod(self.nginx.conf, 0o640)
        before = os.stat(self.nginx.conf)
        self.assertEqual(self.helper_run("set", "worker_processes", "2")[0], 0)
        after = os.stat(self.nginx.conf)
        self.assertEqual((stat.S_IMODE(after.st_mode), after.st_uid, after.st_gid),
                         (0o640, before.st_uid, before.st_gid))
        self.assertEqual(self.helper_run("reset", "worker_processes")[0], 0)
        self.assertEqual(stat.S_IMODE(os.stat(self.nginx.conf).st_mode), 0o640)
        self.assertFalse([n for n in os.listdir(self.root) if n.startswith(".smart-nginx.")], "no temp file left")

    def test_a_failing_nginx_t_is_rolled_back_and_nginx_keeps_serving(self):
        original = self.conf()
        with open(self.nginx.extra, "w") as handle:
            handle.write("this_is_not_a_directive on;\n")
        with Prober(self.nginx.port) as prober:
            code, out, err = self.helper_run("set", "worker_processes", "2")
            time.sleep(0.3)
        self.assertEqual(code, 1, out + err)
        self.assertIn("nginx -t failed", err)
        self.assertIn("this_is_not_a_directive", err)
        self.assertEqual(self.conf(), original, "nginx.conf put back byte for byte")
        self.assertEqual(prober.failures, [])
        self.assertGreater(prober.requests, 5)
        self.assertEqual(self.nginx.wait_workers(1, timeout=1), 1, "nginx was never reloaded")
        self.assertEqual(http_get(self.nginx.port)[0], 200)
        # The revert that follows a failed apply is a harmless no-op.
        code, out, err = self.helper_run("reset", "worker_processes")
        self.assertEqual((code, self.conf()), (0, original), err)
        code, out, err = self.helper_run("test")
        self.assertEqual(code, 1)

    def test_a_failing_reload_is_rolled_back(self):
        # An nginx binary whose reload fails (after nginx -t passed): the helper puts the file back.
        wrapper = os.path.join(self.root, "nginx-no-reload")
        with open(wrapper, "w") as handle:
            handle.write(f'#!/bin/sh\nfor a in "$@"; do [ "$a" = reload ] && {{ echo "reload refused" >&2; exit 1; }}; done\n'
                         f'exec {self.nginx.nginx} "$@"\n')
        os.chmod(wrapper, 0o755)
        install(self.deployed.prefix, "--nginx-conf", self.nginx.conf, "--reload", "signal", "--nginx-bin", wrapper)
        original = self.conf()
        code, out, err = self.helper_run("set", "worker_processes", "2")
        self.assertEqual(code, 1, out + err)
        self.assertIn("reload failed", err)
        self.assertIn("reload refused", err)
        self.assertEqual(self.conf(), original)
        self.assertEqual(http_get(self.nginx.port)[0], 200)

    def test_every_argument_outside_the_verbs_is_refused(self):
        original = self.conf()
        refused = [
            [], ["set"], ["set", "worker_processes"], ["set", "worker_processes", "0"],
            ["set", "worker_processes", "65"], ["set", "worker_processes", "100"], ["set", "worker_processes", "02"],
            ["set", "worker_processes", "-1"], ["set", "worker_processes", "+2"], ["set", "worker_processes", " 2"],
            ["set", "worker_processes", "2 "], ["set", "worker_processes", "2\n"], ["set", "worker_processes", "2;"],
            ["set", "worker_processes", "1e1"], ["set", "worker_processes", "0x2"], ["set", "worker_processes", "AUTO"],
            ["set", "worker_processes", "auto;"], ["set", "worker_processes", "\u0663"], ["set", "worker_processes", "２"],
            ["set", "worker_processes", ""], ["set", "worker_processes", "auto", "2"],
            ["set", "worker_processes", "2", "--force"], ["set", "worker_processes", "2", "worker_connections", "1024"],
            ["set", "worker_processes", "2", "worker_processes", "2"], ["set", "worker_connections", "511"],
            ["set", "microcache", "61"], ["set", "ssl_session_tickets", "yes"], ["set", "root", "/"],
            ["set", "Worker_processes", "2"], ["Set", "worker_processes", "2"], ["set-workers", "2"],
            ["reset"], ["reset", "worker_processes", "microcache"], ["reset", "worker_processes", "2"],
            ["get"], ["get", "nope"], ["get", "worker_processes", "worker_processes"], ["test", "x"],
            ["accept", "now"], ["check"], ["check", "test"], ["check", "set", "worker_processes", "65"],
            ["reload"], ["backup"], ["restore"], ["-c", "/tmp/other.conf", "test"], ["--config", "/tmp/x", "reset"],
            ["--help"], ["help"], ["sh", "-c", "id"], ["rm", "-rf", "/"], ["set", "worker_processes", "$(id)"],
            ["set", "worker_processes", "`id`"], ["set", "worker_processes", "2", "-e", "s/x/y/"],
        ]
        for args in refused:
            with self.subTest(args=args):
                code, out, err = self.helper_run(*args)
                self.assertEqual(code, 2, f"{args}: {out} {err}")
                self.assertIn("usage", err)
                self.assertEqual(out, "")
                self.assertEqual(self.conf(), original)
        self.assertEqual(os.listdir(self.deployed.state_dir), [], "nothing was read or written")

    def test_the_callers_environment_cannot_redirect_the_helper(self):
        # python3 -I: PYTHONPATH, PYTHONSTARTUP... are ignored; the config path is the fixed one.
        evil = os.path.join(self.root, "evil")
        os.makedirs(evil)
        marker = os.path.join(self.root, "hijacked")
        for module in ("tempfile", "hashlib", "subprocess", "re"):
            with open(os.path.join(evil, f"{module}.py"), "w") as handle:
                handle.write(f"open({marker!r}, 'w').write('{module}')\n")
        other = os.path.join(self.root, "other-nginx.conf")
        with open(other, "w") as handle:
            handle.write("worker_processes 1;\nevents {}\n")
        env = clean_env({"PYTHONPATH": evil, "PYTHONSTARTUP": os.path.join(evil, "re.py"), "PYTHONHOME": "/nowhere",
                         "NGINX_CONF": other, "SMART_NGINX_CONF": other, "CONFIG": other, "PATH": evil + ":/usr/bin:/bin"})
        code, out, err = self.helper_run("set", "worker_processes", "2", env=env)
        self.assertEqual(code, 0, err)
        self.assertFalse(os.path.exists(marker), "a module from PYTHONPATH was imported")
        self.assertEqual(worker_value(self.conf()), "2")
        self.assertEqual(read_bytes(other), b"worker_processes 1;\nevents {}\n")
        self.assertEqual(self.helper_run("reset", "worker_processes")[0], 0)

    def test_reset_leaves_a_file_someone_else_changed(self):
        self.assertEqual(self.helper_run("set", "worker_processes", "2")[0], 0)
        with open(self.nginx.conf, "ab") as handle:
            handle.write(b"# an operator's edit\n")
        edited = self.conf()
        code, out, err = self.helper_run("reset", "worker_processes")
        self.assertEqual(code, 1)
        self.assertIn("changed by someone else", err)
        self.assertIn("smart-nginx accept", err)
        self.assertEqual(self.conf(), edited)
        code, out, err = self.helper_run("set", "worker_processes", "auto")
        self.assertEqual((code, self.conf()), (1, edited), "set does not overwrite the edit either")
        # The operator accepts the file as it is: worker_processes 2 is theirs, reset has nothing to do.
        self.assertEqual(self.helper_run("accept")[0], 0)
        self.assertEqual(self.helper_run("reset", "worker_processes")[0], 0)
        self.assertEqual(self.conf(), edited)
        self.assertEqual(self.helper_run("set", "worker_processes", "auto")[0], 0)
        self.assertEqual(self.helper_run("reset", "worker_processes")[0], 0)
        self.assertEqual(self.conf(), edited)

    def test_an_edit_cut_short_is_put_back_by_the_next_run(self):
        # What a SIGKILL between writing nginx.conf and committing leaves: the state names the edit
        # under way ("pending") and nginx.conf holds it, not reloaded.
        original = self.conf()
        self.assertEqual(self.helper_run("set", "worker_processes", "2")[0], 0)
        committed = self.conf()
        state_path = os.path.join(self.deployed.state_dir, "state.json")
        state = json.loads(read_bytes(state_path))
        half = committed.replace(b"worker_processes 2;", b"worker_processes auto;")
        state["pending"] = {"changes": {"worker_processes": "auto"},
                            "written": {self.nginx.conf: hashlib.sha256(half).hexdigest()}}
        with open(state_path, "w") as handle:
            json.dump(state, handle)
        with open(self.nginx.conf, "wb") as handle:
            handle.write(half)
        code, out, err = self.helper_run("reset", "worker_processes")
        self.assertEqual(code, 0, err)
        self.assertIn("cut short", err)
        self.assertEqual(self.conf(), original)
        self.assertIsNone(json.loads(read_bytes(state_path))["pending"])
        self.assertEqual(self.nginx.wait_workers(1), 1)

    def test_an_untrusted_config_is_refused(self):
        original = self.conf()
        config = os.path.join(self.deployed.prefix, "etc/smart/nginx-helper.conf")
        os.chmod(config, 0o666)
        code, out, err = self.helper_run("set", "worker_processes", "2")
        self.assertEqual(code, 1)
        self.assertIn("not be writable by group or others", err)
        self.assertEqual(self.conf(), original)
        os.chmod(config, 0o644)
        with open(config, "a") as handle:
            handle.write("NGINX_ARGS=-g daemon off;\n")
        code, out, err = self.helper_run("test")
        self.assertEqual(code, 1)
        self.assertIn("expected one of", err)

    def test_a_directive_in_a_comment_or_a_block_is_not_touched(self):
        text = self.conf().replace(
            b"worker_processes 1;",
            b"# worker_processes 8;\nworker_processes   1 ;  # the real one\nenv \"SMART_TEST=worker_processes 3;\";")
        with open(self.nginx.conf, "wb") as handle:
            handle.write(text)
        code, out, err = self.helper_run("set", "worker_processes", "2")
        self.assertEqual(code, 0, err)
        self.assertEqual(self.conf(), text.replace(b"worker_processes   1 ;", b"worker_processes   2 ;"))
        self.assertEqual(self.helper_run("reset", "worker_processes")[0], 0)
        self.assertEqual(self.conf(), text)


# ---------------------------------------------------------------- the dashboard site --

class SiteTest(unittest.TestCase):
    """deploy/nginx/smart.conf, installed into a prefix and included by a real nginx."""

    @classmethod
    def setUpClass(cls):
        """One install and one nginx for the class: the tests only read (one adds a CSV of its own)."""
        need_root()
        cls.root = tempfile.mkdtemp(prefix="smart-site-")
        cls.addClassCleanup(shutil.rmtree, cls.root, True)
        cls.port = free_port()
        prefix = os.path.join(cls.root, "prefix")
        os.makedirs(prefix)
        os.chmod(cls.root, 0o755)
        install(prefix, "--port", str(cls.port), "--server-name", "smart.test")
        cls.opt = os.path.join(prefix, "opt/smart")
        site = os.path.join(prefix, "etc/nginx/sites-enabled/smart")
        if not os.listdir(os.path.join(cls.opt, "www")):
            with open(os.path.join(cls.opt, "www", "index.html"), "w") as handle:
                handle.write("<html>dashboard</html>\n")
        var = os.path.join(cls.opt, "var")
        cls.run_dir = os.path.join(var, "runs", "20260101T000000")
        os.makedirs(cls.run_dir)
        with open(os.path.join(var, "state.json"), "w") as handle:
            json.dump({"run_id": "20260101T000000", "status": "done"}, handle)
        for name, text in (("run.log", "<script>alert(1)</script>\n"), ("baseline.csv", "timestamp,latency_ms,response_code\n"),
                           ("workers_2_decision.log", "revert\n")):
            with open(os.path.join(cls.run_dir, name), "w") as handle:
                handle.write(text)
        with open(os.path.join(var, "lock"), "w") as handle:
            handle.write("123\n")
        cls.site = site
        nginx_root = os.path.join(cls.root, "nginx")
        os.makedirs(nginx_root)
        cls.nginx = NginxUnderTest(nginx_root, sites=[site])
        cls.nginx.start()
        cls.addClassCleanup(cls.nginx.stop)

    def get(self, path):
        return http_get(self.port, path, host="smart.test")

    def test_a_runs_compressed_csv_is_served_as_text_to_every_client(self):
        rows = "timestamp,latency_ms,response_code\n" + "1764274326.0,17.8,200\n" * 500
        with gzip.open(os.path.join(self.run_dir, "workers_2.csv.gz"), "wt") as handle:
            handle.write(rows)
        for accept in ("gzip", None):
            with self.subTest(accept_encoding=accept):
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                try:
                    conn.putrequest("GET", "/runs/20260101T000000/workers_2.csv", skip_host=True, skip_accept_encoding=True)
                    conn.putheader("Host", "smart.test")
                    if accept:
                        conn.putheader("Accept-Encoding", accept)
                    conn.endheaders()
                    response = conn.getresponse()
                    body = response.read()
                finally:
                    conn.close()
                self.assertEqual(response.status, 200)
                self.assertTrue(response.getheader("Content-Type").startswith("text/plain"))
                text = gzip.decompress(body) if response.getheader("Content-Encoding") == "gzip" else body
                self.assertEqual(text.decode(), rows)
                self.assertEqual(response.getheader("Content-Encoding"), "gzip" if accept else None)
        status, _, body = self.get("/runs/20260101T000000/run.log")          # no .gz beside it: as it is
        self.assertEqual((status, body), (200, b"<script>alert(1)</script>\n"))

    def test_serves_the_dashboard_state_and_runs_and_nothing_else(self):
        status, headers, body = self.get("/")
        self.assertEqual(status, 200)
        self.assertIn("text/html", headers["content-type"])
        for path in ("/state.json", "/history.json"):
            status, headers, body = self.get(path)
            self.assertEqual(status, 200, path)
            self.assertEqual(headers.get("cache-control"), "no-cache", path)
            self.assertIn("application/json", headers["content-type"])
            json.loads(body)
        status, headers, body = self.get("/runs/")
        self.assertEqual(status, 200)
        self.assertIn(b"20260101T000000/", body)
        self.assertEqual(self.get("/runs")[0], 301)
        status, headers, body = self.get("/runs/20260101T000000/")
        self.assertEqual(status, 200)
        self.assertIn(b"run.log", body)
        for name in ("run.log", "baseline.csv", "workers_2_decision.log"):
            status, headers, body = self.get(f"/runs/20260101T000000/{name}")
            self.assertEqual(status, 200, name)
            self.assertTrue(headers["content-type"].startswith("text/plain"), headers["content-type"])
            self.assertEqual(headers.get("x-content-type-options"), "nosniff")
            self.assertEqual(headers.get("cache-control"), "no-cache")
        for path in ("/smart.conf", "/smart.py", "/var/state.json", "/experiments/001_nginx_workers/meta.json",
                     "/../smart.conf", "/runs/../../smart.conf", "/runs/../state.json/../../smart.conf",
                     "/lock", "/runs/.lock", "/.shipped", "/state.json/", "/var/", "/runs/%2e%2e/lock",
                     "/smart.conf.example", "/DEPLOYMENT.md"):
            with self.subTest(path=path):
                status, _, body = self.get(path)
                self.assertIn(status, (400, 403, 404), f"{path} served: {body[:80]!r}")
        # Not the default server: other host names on port 80 still reach the box's own site.
        with open(self.site) as handle:
            self.assertNotIn("default_server", handle.read())

    def test_every_location_sends_the_security_headers(self):
        # a location's add_header replaces the server's: each location must repeat all of them
        expected = {"content-security-policy": smart.DASHBOARD_CSP, "x-content-type-options": "nosniff",
                    "referrer-policy": "no-referrer"}
        for path, status in (("/", 200), ("/index.html", 200), ("/state.json", 200), ("/history.json", 200),
                             ("/runs/", 200), ("/runs/20260101T000000/run.log", 200), ("/runs", 301),
                             ("/nothing.html", 404), ("/.shipped", 404)):
            with self.subTest(path=path):
                got, headers, _ = self.get(path)
                self.assertEqual(got, status)
                self.assertEqual({name: headers.get(name) for name in expected}, expected)



# ---------------------------------------------------------------- install.sh --firewall --

class FirewallTest(unittest.TestCase):
    """install.sh --firewall (issue 9): ufw allows the SSH port in use, 80 and 443, denies the rest.

    ufw never runs here: every call is --dry-run or --prefix (which prints the commands and runs
    none), and a fake ufw first on PATH fails the test if anything calls it.  Under --prefix the
    SSH port comes from PREFIX/etc/ssh/sshd_config (sshd -T is not asked), else $SSH_CONNECTION.
    """

    ORDER_TAIL = ["ufw default deny incoming", "ufw default allow outgoing", "ufw --force enable"]

    def setUp(self):
        self.root = tempfile.mkdtemp(prefix="smart-firewall-")
        self.addCleanup(shutil.rmtree, self.root, True)
        self.prefix = os.path.join(self.root, "prefix")
        self.nginx_conf = os.path.join(self.root, "nginx.conf")
        with open(self.nginx_conf, "w") as handle:
            handle.write("worker_processes 1;\nevents {}\n")
        self.bin = os.path.join(self.root, "bin")
        os.makedirs(self.bin)
        self.ufw_called = os.path.join(self.root, "ufw-was-called")
        fake = os.path.join(self.bin, "ufw")
        with open(fake, "w") as handle:
            handle.write(f"#!/bin/sh\necho \"$@\" >> {self.ufw_called}\nexit 0\n")
        os.chmod(fake, 0o755)

    def tearDown(self):
        self.assertFalse(os.path.exists(self.ufw_called), "a test ran ufw")

    def install(self, *args, ssh_connection=None):
        env = clean_env({"PATH": self.bin + os.pathsep + os.environ.get("PATH", "/usr/bin:/bin")})
        env.pop("SSH_CONNECTION", None)
        if ssh_connection is not None:
            env["SSH_CONNECTION"] = ssh_connection
        return subprocess.run(["bash", INSTALL_SH, "--prefix", self.prefix, "--nginx-conf", self.nginx_conf,
                               "--reload", "signal", *args], capture_output=True, text=True, timeout=60,
                              env=env, stdin=subprocess.DEVNULL)

    def sshd_config(self, text, extra=None):
        folder = os.path.join(self.prefix, "etc", "ssh")
        os.makedirs(os.path.join(folder, "sshd_config.d"), exist_ok=True)
        with open(os.path.join(folder, "sshd_config"), "w") as handle:
            handle.write(text)
        for name, body in (extra or {}).items():
            with open(os.path.join(folder, "sshd_config.d", name), "w") as handle:
                handle.write(body)

    def commands(self, result):
        """The ufw commands install.sh says it would run, in order."""
        self.assertEqual(result.returncode, 0, f"{result.stdout}\n{result.stderr}")
        return [line.split("would run: ", 1)[1].strip() for line in result.stdout.splitlines()
                if "would run: ufw" in line]

    def assert_plan(self, commands, ssh_ports, web_ports=("80", "443")):
        allows = [f"ufw allow {port}/tcp" for port in (*ssh_ports, *web_ports)]
        self.assertEqual(commands, allows + self.ORDER_TAIL)
        for port in ssh_ports:            # SSH is allowed before the default deny and the enable
            self.assertLess(commands.index(f"ufw allow {port}/tcp"), commands.index("ufw default deny incoming"))
            self.assertLess(commands.index(f"ufw allow {port}/tcp"), commands.index("ufw --force enable"))

    def test_dry_run_prints_the_commands_with_ssh_before_enable(self):
        result = self.install("--firewall", "--dry-run", "--ssh-port", "22")
        self.assert_plan(self.commands(result), ["22"])
        self.assertIn("SSH stays open on 22/tcp", result.stdout)
        self.assertFalse(os.path.exists(self.prefix), "--dry-run created files")

    def test_ssh_port_flag(self):
        commands = self.commands(self.install("--firewall", "--dry-run", "--ssh-port", "2222"))
        self.assert_plan(commands, ["2222"])
        self.assertNotIn("ufw allow 22/tcp", commands)
        commands = self.commands(self.install("--firewall", "--dry-run", "--ssh-port", "2222", "--ssh-port", "22"))
        self.assert_plan(commands, ["22", "2222"])

    def test_refuses_when_the_ssh_port_is_unknown(self):
        result = self.install("--firewall", "--dry-run")           # no sshd_config, no $SSH_CONNECTION
        self.assertEqual(result.returncode, 1, result.stdout)
        self.assertIn("--ssh-port", result.stderr)
        self.assertIn("SSH", result.stderr)
        self.assertIn("install.sh: error: --firewall: cannot tell which port SSH listens on", result.stderr)
        self.assertNotIn("ufw", result.stdout)
        result = self.install("--firewall")                        # not a dry run: refused before any change
        self.assertEqual(result.returncode, 1)
        self.assertFalse(os.path.exists(os.path.join(self.prefix, "opt")), "installed although refused")

    def test_port_from_sshd_config_and_its_includes(self):
        self.sshd_config("Include /etc/ssh/sshd_config.d/*.conf\n#Port 22\n  port 2200   # mine\n"
                         "ListenAddress 0.0.0.0:2300\nMatch User backup\n    Port 9\n",
                         {"10-extra.conf": "Port 2201\n", "README": "Port 7\n"})
        self.assert_plan(self.commands(self.install("--firewall", "--dry-run")), ["2200", "2201", "2300"])

    def test_sshd_config_without_port_means_22(self):
        self.sshd_config("# Port 2222\nPermitRootLogin no\n")
        self.assert_plan(self.commands(self.install("--firewall", "--dry-run")), ["22"])

    def test_port_of_the_ssh_session(self):
        # No sshd_config: the server side of $SSH_CONNECTION.
        commands = self.commands(self.install("--firewall", "--dry-run", ssh_connection="192.0.2.7 51000 10.0.0.5 2022"))
        self.assert_plan(commands, ["2022"])
        # The session's port is kept open besides the configured or given one.
        self.sshd_config("Port 2200\n")
        commands = self.commands(self.install("--firewall", "--dry-run", ssh_connection="192.0.2.7 51000 10.0.0.5 22"))
        self.assert_plan(commands, ["22", "2200"])
        commands = self.commands(self.install("--firewall", "--dry-run", "--ssh-port", "2222",
                                              ssh_connection="192.0.2.7 51000 10.0.0.5 22"))
        self.assert_plan(commands, ["22", "2222"])

    def test_dashboard_port_is_allowed(self):
        commands = self.commands(self.install("--firewall", "--dry-run", "--ssh-port", "22", "--port", "8081"))
        self.assert_plan(commands, ["22"], ("80", "443", "8081"))

    def test_prefix_install_prints_and_never_runs_ufw(self):
        result = self.install("--firewall", "--ssh-port", "22")
        self.assert_plan(self.commands(result), ["22"])
        self.assertIn("leaves this box's firewall alone", result.stdout)
        self.assertTrue(os.path.isfile(os.path.join(self.prefix, "opt", "smart", "smart.py")))

    def test_without_firewall_no_ufw_and_bad_ports_refused(self):
        result = self.install("--dry-run")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertNotIn("ufw", result.stdout)
        for args in (["--ssh-port", "22"], ["--firewall", "--ssh-port", "0"], ["--firewall", "--ssh-port", "65536"],
                     ["--firewall", "--ssh-port", "22;reboot"], ["--firewall", "--ssh-port"]):
            with self.subTest(args=args):
                result = self.install("--dry-run", *args)
                self.assertNotEqual(result.returncode, 0)
                self.assertNotIn("would run: ufw", result.stdout)


if __name__ == "__main__":
    unittest.main()
