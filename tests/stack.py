"""A real nginx + PHP-FPM 8.2 + MariaDB + WordPress stack from Debian 12's packages, for tests (stdlib only).

    with Stack() as stack:                      # or stack = Stack().start() ... stack.stop()
        status, headers, body = stack.get(stack.article_url)

Everything lives under one temporary folder (Stack.dir) and listens on 127.0.0.1 only, on ports the
OS picked; MariaDB has no TCP port at all.  The files are laid out like Debian's, so that code which
edits /etc/nginx or /etc/php/8.2/fpm on a real box can edit the same files here:

    DIR/nginx/nginx.conf                 Debian 12's stock nginx.conf, with DIR for /etc/nginx, /run, /var/log,
                                         plus *_temp_path lines into DIR/nginx/tmp (Debian's: /var/lib/nginx)
    DIR/nginx/conf.d/                    empty: http-context drop-ins (*.conf)
    DIR/nginx/sites-enabled/wordpress    the WordPress site: one HTTP and one HTTPS server
    DIR/nginx/{mime.types,fastcgi.conf,fastcgi_params,snippets/fastcgi-php.conf}   copies of Debian's
    DIR/nginx/ssl/stack.{crt,key}        a self-signed certificate for 127.0.0.1
    DIR/php/php-fpm.conf                 [global] pid, error_log, include=DIR/php/pool.d/*.conf
    DIR/php/pool.d/www.conf              Debian's [www] pool on the unix socket DIR/php/php-fpm.sock
    DIR/php/php.ini                      Debian's php.ini-production (what /etc/php/8.2/fpm/php.ini is)
    DIR/php/conf.d/                      empty: ini drop-ins, scanned after /etc/php/8.2/fpm/conf.d
    DIR/wordpress/                       the site root: Debian's /usr/share/wordpress, see below
    DIR/mysql/                           my.cnf, datadir, socket, pid and log of MariaDB

PHP reads DIR/php/php.ini, then PHP_INI_SCAN_DIR = /etc/php/8.2/fpm/conf.d:DIR/php/conf.d, so a
DIR/php/conf.d/99-smart.ini overrides Debian's extension ini files (opcache.*, realpath_cache_size...).

WordPress runs from Debian's /usr/share/wordpress without writing there or in /etc/wordpress: Debian's
own wp-config.php reads /etc/wordpress/config-HOST.php, and PHP resolves symlinks in __DIR__, so
DIR/wordpress holds copies of the PHP files of the folders that hold entry points (/, wp-admin and
its maint, network and user folders; they find wp-load.php and wp-config.php through __DIR__), our
own wp-config.php, symlinks for everything else (wp-includes, wp-admin/includes, css, js...), and a
wp-content laid out like Debian's /var/lib/wordpress/wp-content (themes and plugins as symlinks into
/usr/share/wordpress/wp-content, its own uploads).  It is installed by php-cli (wp_install) with a
few posts and pages, a long article, an administrator (ADMIN_USER / ADMIN_PASSWORD) and pretty
permalinks; WP-Cron and every HTTP request to another host are off.

Processes: mariadbd, `php-fpm8.2 --nodaemonize` and nginx (`daemon off`) are children of the
caller, each in a session of its own; stop() ends them by PID (SIGTERM, then SIGKILL to the process
group, so no worker survives) and waits until none of them is left.  start() stops what it started
when it fails half-way, and an interpreter exit stops every stack still running.

available() says whether this machine can run a stack, naming the missing package; require() turns
that into a unittest skip, or a failure under CI=true.  The stack needs root, as on the real box:
nginx and PHP-FPM workers run as www-data.

What a started Stack offers:
    http_url, https_url, front_url, article_url, static_url (static_file: its path on disk),
    installed["urls"] (every post and page), ADMIN_USER / ADMIN_PASSWORD / ADMIN_NAME
    nginx_conf, nginx_conf_d, nginx_sites_enabled, nginx_site, nginx_error_log, nginx_access_log,
    php_fpm_conf, php_pool_d, php_pool_conf, php_ini, php_conf_d, php_scan_dirs, php_socket,
    php_error_log, wordpress_dir, wp_config, mysql_cnf, mysql_socket ... (see _lay_out)
    pids() masters by name; all_pids() masters and workers; nginx_workers(); php_workers()
    reload_nginx(); reload_php(); nginx_test() and php_test(dump=False) -> (ok, output); php_env()
    login(user, password) -> cookies; get(url, cookies=...) -> (status, headers, body)
    php_fpm_rss() -> bytes; timings -> seconds of each start phase, of the whole start and of stop
"""

from __future__ import annotations

import atexit
import html
import http.client
import http.cookies
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import unittest
import urllib.parse

NGINX = "/usr/sbin/nginx"
PHP_FPM = "/usr/sbin/php-fpm8.2"
PHP_CLI = "/usr/bin/php8.2"
MARIADBD = "/usr/sbin/mariadbd"
MARIADB_INSTALL_DB = "/usr/bin/mariadb-install-db"
MARIADB = "/usr/bin/mariadb"
OPENSSL = "/usr/bin/openssl"

DEBIAN_NGINX = "/etc/nginx"
DEBIAN_PHP_INI = "/usr/lib/php/8.2/php.ini-production"
DEBIAN_PHP_SCAN_DIR = "/etc/php/8.2/fpm/conf.d"
DEBIAN_WORDPRESS = "/usr/share/wordpress"
THEME = "twentytwentythree"

ADMIN_USER = "admin"
ADMIN_PASSWORD = "smart-stack-admin-password"
ADMIN_NAME = "Stack Admin"
ARTICLE_SLUG = "a-long-article"
STATIC_PATH = "/wp-includes/blocks/navigation/style.min.css"
# Every name deploy/smart-nginx and deploy/smart-php can set, in their tables' order.
NGINX_NAMES = ("microcache", "open_file_cache", "ssl_session_cache", "ssl_session_tickets", "ssl_session_timeout",
               "worker_connections", "worker_processes")
PHP_NAMES = ("opcache.enable", "opcache.interned_strings_buffer", "opcache.max_accelerated_files",
             "opcache.memory_consumption", "opcache.revalidate_freq", "opcache.validate_timestamps", "pm",
             "pm.max_children", "pm.max_requests", "pm.max_spare_servers", "pm.min_spare_servers",
             "pm.process_idle_timeout", "pm.start_servers", "realpath_cache_size", "realpath_cache_ttl")

# Folders of /usr/share/wordpress whose PHP files are copied (entry points that find wp-load.php
# and wp-config.php through __DIR__); everything else is a symlink.
ENTRY_FOLDERS = ("", "wp-admin", "wp-admin/maint", "wp-admin/network", "wp-admin/user")

START_TIMEOUT = 20.0
STOP_TIMEOUT = 15.0
COMMAND_TIMEOUT = 60.0
PORT_ATTEMPTS = 5

# (path that must exist, Debian package that ships it)
REQUIREMENTS = (
    (NGINX, "nginx"),
    (PHP_FPM, "php8.2-fpm"),
    (PHP_CLI, "php8.2-cli"),
    (os.path.join(DEBIAN_PHP_SCAN_DIR, "10-opcache.ini"), "php8.2-opcache"),
    (os.path.join(DEBIAN_PHP_SCAN_DIR, "20-mysqli.ini"), "php8.2-mysql"),
    ("/etc/php/8.2/cli/conf.d/20-mysqli.ini", "php8.2-mysql"),
    (DEBIAN_PHP_INI, "php8.2-common"),
    (MARIADBD, "mariadb-server"),
    (MARIADB_INSTALL_DB, "mariadb-server"),
    (MARIADB, "mariadb-client"),
    (os.path.join(DEBIAN_WORDPRESS, "wp-load.php"), "wordpress"),
    (os.path.join(DEBIAN_WORDPRESS, "wp-content", "themes", THEME, "theme.json"), f"wordpress-theme-{THEME}"),
    (OPENSSL, "openssl"),
)


class StackError(Exception):
    """The stack could not start, reload or stop; the message carries the service's own words."""


def available():
    """(True, "") when this machine can run a Stack, else (False, reason naming what is missing)."""
    if os.geteuid() != 0:
        return False, "the stack needs root (nginx and PHP-FPM workers run as www-data)"
    missing = []
    for path, package in REQUIREMENTS:
        if not os.path.exists(path) and package not in missing:
            missing.append(package)
    if missing:
        return False, f"missing {', '.join(missing)} (apt-get install -y --no-install-recommends {' '.join(missing)})"
    return True, ""


def require():
    """Skip the calling test without a stack's packages; under CI=true fail instead."""
    ok, reason = available()
    if not ok:
        if os.environ.get("CI") == "true":
            raise AssertionError(f"{reason} and CI=true: this test cannot be skipped")
        raise unittest.SkipTest(reason)


def insecure_context() -> ssl.SSLContext:
    """A TLS client context that accepts the stack's self-signed certificate."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def fetch_failure(url, timeout=10):
    """One GET of url (http or https, any certificate) on a new connection: None when it answered
    200 with its whole body, else what went wrong ("HTTP 502", "IncompleteRead(...)")."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "https":
        conn = http.client.HTTPSConnection(parts.hostname, parts.port, timeout=timeout, context=insecure_context())
    else:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        conn.request("GET", parts.path or "/")
        response = conn.getresponse()
        response.read()
        return None if response.status == 200 else f"HTTP {response.status}"
    except (OSError, http.client.HTTPException) as exc:
        return repr(exc)
    finally:
        conn.close()


def cookie_header(cookies: dict) -> str:
    """The Cookie header value for a {name: value} dict such as Stack.login() returns."""
    return "; ".join(f"{name}={value}" for name, value in cookies.items())


def reload_noting_nginx(folder) -> tuple:
    """(wrapper, log) in folder: an nginx for smart-nginx's NGINX_BIN that appends `reload EPOCH` to log
    at each `-s reload` and runs the real one, so that a caller counts reloads exactly."""
    log = os.path.join(folder, "nginx-reloads")
    wrapper = os.path.join(folder, "nginx")
    _write(wrapper, f'#!/bin/sh\n# nginx for smart-nginx under test: notes each reload\n'
                    f'case " $* " in *" reload "*) echo "reload $(date +%s.%N)" >> {log} ;; esac\n'
                    f'exec {NGINX} "$@"\n', 0o755)
    return wrapper, log


def free_port() -> int:
    """A port the OS says is free now on 127.0.0.1 (bind port 0, read it, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _write(path, text, mode=0o644):
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.chmod(path, mode)
    return path


def _tail(path, lines=20) -> str:
    try:
        with open(path, "rb") as handle:
            return b"\n".join(handle.read().splitlines()[-lines:]).decode("utf-8", "replace")
    except OSError:
        return ""


def _group_pids(pgid) -> list:
    """PIDs of the live (not zombie) processes in process group pgid, from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as handle:
                fields = handle.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != b"Z" and int(fields[2]) == pgid:
            found.append(int(entry))
    return found


def _children(pid) -> list:
    """PIDs of the live children of pid, from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as handle:
                fields = handle.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != b"Z" and int(fields[1]) == pid:
            found.append(int(entry))
    return found


def _rss_bytes(pid) -> int:
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _connects(address, family=socket.AF_INET) -> bool:
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.settimeout(0.5)
            sock.connect(address)
        return True
    except OSError:
        return False


class _Service:
    """One server process started by the stack: a child in a session (and process group) of its own."""

    def __init__(self, name, argv, log_path, env=None):
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.env = env
        self.process = None

    def start(self):
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                            env=self.env, start_new_session=True)
        return self

    @property
    def pid(self):
        return self.process.pid if self.process else None

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait_until(self, ready, what, timeout=START_TIMEOUT, logs=()):
        """Poll ready() until true; StackError when the process exits or the time is up."""
        deadline = time.monotonic() + timeout
        while True:
            if not self.running():
                raise StackError(f"{self.name} exited {self.process.returncode} before {what}:\n{self.logs(logs)}")
            if ready():
                return
            if time.monotonic() > deadline:
                raise StackError(f"{self.name} not {what} after {timeout:.0f} s:\n{self.logs(logs)}")
            time.sleep(0.02)

    def logs(self, extra=()) -> str:
        return "\n".join(text for text in (_tail(path) for path in (self.log_path, *extra)) if text)

    def stop(self, timeout=STOP_TIMEOUT):
        """SIGTERM the process, wait for it, then SIGKILL whatever is left of its process group."""
        if self.process is None:
            return
        pgid = self.process.pid
        if self.process.poll() is None:
            try:
                self.process.send_signal(signal.SIGTERM)
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        deadline = time.monotonic() + timeout
        while True:
            left = _group_pids(pgid)
            if self.process.poll() is None:
                left.append(pgid)
            if not left:
                return
            if time.monotonic() > deadline:
                raise StackError(f"{self.name}: processes {sorted(set(left))} still alive after SIGKILL")
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                self.process.wait(0.05)
            except subprocess.TimeoutExpired:
                pass
            time.sleep(0.02)


_running = set()
_running_lock = threading.Lock()


@atexit.register
def _stop_all_at_exit():
    with _running_lock:
        stacks = list(_running)
    for stack in stacks:
        try:
            stack.stop()
        except StackError:
            pass


class Stack:
    """nginx + PHP-FPM 8.2 + MariaDB + WordPress under one temporary folder; see the module's docstring.

    Usable as a context manager, or start() in setUpClass and stop() in tearDownClass (start() cleans up
    after itself when it fails, so a failed setUpClass leaves nothing running).  keep=True leaves the
    folder on disk after stop() (its logs and configuration), for a look after a failure.
    """

    def __init__(self, keep=False):
        self.keep = keep
        self.dir = None
        self.http_port = self.https_port = None
        self.services = {}
        self.timings = {}       # seconds: each phase of start(), "start" in all, "stop"

    # ------------------------------------------------------------------ lifecycle --

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def start(self):
        """Lay the files out, start MariaDB, PHP-FPM and nginx, install WordPress; returns self."""
        if self.dir is not None:
            raise StackError("this stack was started already")
        started = time.monotonic()
        self.dir = tempfile.mkdtemp(prefix="smart-stack-")
        with _running_lock:
            _running.add(self)
        try:
            os.chmod(self.dir, 0o755)
            for phase, step in (("layout", self._lay_out), ("mariadb", self._start_mariadb),
                                ("php-fpm", self._start_php_fpm), ("nginx", self._start_nginx),
                                ("wordpress", self._install_wordpress)):
                begun = time.monotonic()
                step()
                self.timings[phase] = time.monotonic() - begun
        except BaseException:
            self.stop()
            raise
        self.timings["start"] = time.monotonic() - started
        return self

    def stop(self):
        """Stop nginx, PHP-FPM and MariaDB by PID and wait until none of their processes is left."""
        begun = time.monotonic()
        errors = []
        for name in ("nginx", "php-fpm", "mariadb"):
            service = self.services.get(name)
            if service is not None:
                try:
                    service.stop()
                except StackError as error:
                    errors.append(str(error))
        with _running_lock:
            _running.discard(self)
        if self.dir is not None and not self.keep and not errors:
            shutil.rmtree(self.dir, ignore_errors=True)
        self.timings["stop"] = time.monotonic() - begun
        if errors:
            raise StackError("; ".join(errors))

    # ------------------------------------------------------------------ what a test uses --

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def https_url(self) -> str:
        return f"https://127.0.0.1:{self.https_port}"

    @property
    def front_url(self) -> str:
        return self.http_url + "/"

    @property
    def article_url(self) -> str:
        return f"{self.http_url}/{ARTICLE_SLUG}/"

    @property
    def static_url(self) -> str:
        """A CSS file shipped by WordPress (and linked from its pages), served by nginx from disk."""
        return self.http_url + STATIC_PATH

    @property
    def static_file(self) -> str:
        return self.wordpress_dir + STATIC_PATH

    def pids(self) -> dict:
        """{"mariadb": pid, "php-fpm": pid, "nginx": pid} of the running masters."""
        return {name: service.pid for name, service in self.services.items() if service.running()}

    def all_pids(self) -> set:
        """Every live process of the stack: the masters and their workers."""
        found = set()
        for service in self.services.values():
            if service.pid is not None:
                found.update(_group_pids(service.pid))
        return found

    def php_fpm_rss(self) -> int:
        """Resident memory in bytes of the PHP-FPM master and its workers, summed from /proc."""
        master = self.services["php-fpm"].pid
        return sum(_rss_bytes(pid) for pid in [master, *_children(master)])

    def php_workers(self) -> list:
        return _children(self.services["php-fpm"].pid)

    def nginx_workers(self) -> list:
        return _children(self.services["nginx"].pid)

    def nginx_test(self):
        """(ok, output) of `nginx -t` on the stack's nginx.conf."""
        done = subprocess.run([NGINX, "-t", "-c", self.nginx_conf], capture_output=True, text=True,
                              timeout=COMMAND_TIMEOUT, stdin=subprocess.DEVNULL)
        return done.returncode == 0, done.stdout + done.stderr

    def php_test(self, dump=False):
        """(ok, output) of `php-fpm8.2 -t` (-tt with dump=True: every setting) on the stack's config."""
        done = subprocess.run(self._php_fpm_argv("-tt" if dump else "-t"), capture_output=True, text=True,
                              timeout=COMMAND_TIMEOUT, env=self.php_env(), stdin=subprocess.DEVNULL)
        return done.returncode == 0, done.stdout + done.stderr

    def reload_nginx(self, timeout=START_TIMEOUT):
        """`nginx -c DIR/nginx/nginx.conf -s reload`, then wait until new workers serve and the old ones
        are gone.  A stock reload like this one may cut a PHP page in flight (nginx 1.22's ticket #2367:
        "open socket #N left in connection", "aborting" in error.log); deploy/smart-nginx's reloads wait
        for such requests."""
        old = set(self.nginx_workers())
        done = subprocess.run([NGINX, "-c", self.nginx_conf, "-s", "reload"], capture_output=True, text=True,
                              timeout=COMMAND_TIMEOUT, stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            raise StackError(f"nginx -s reload exited {done.returncode}: {done.stderr.strip()}")

        def reloaded():
            workers = set(self.nginx_workers())
            return bool(workers) and not workers & old
        self.services["nginx"].wait_until(reloaded, "reloaded (old workers still running)", timeout,
                                          (self.nginx_error_log,))

    def reload_php(self, timeout=START_TIMEOUT):
        """SIGUSR2 to the PHP-FPM master (it re-executes itself with the same PID), then wait until it
        has new workers and accepts on its socket again."""
        service = self.services["php-fpm"]
        old = set(self.php_workers())
        os.kill(service.pid, signal.SIGUSR2)
        service.wait_until(lambda: bool(set(self.php_workers()) - old) and
                           _connects(self.php_socket, socket.AF_UNIX), "reloaded", timeout, (self.php_error_log,))

    def php_env(self) -> dict:
        """The environment PHP-FPM runs with: PHP_INI_SCAN_DIR = Debian's conf.d, then DIR/php/conf.d."""
        return dict(os.environ, PHP_INI_SCAN_DIR=os.pathsep.join(self.php_scan_dirs))

    def get(self, url, cookies=None, headers=None, method="GET", body=None, timeout=10):
        """(status, headers as a dict of lower-case names, body bytes) of one request on a new connection.
        url is absolute or a path on the HTTP server; https URLs accept the self-signed certificate."""
        parts = urllib.parse.urlsplit(url if "://" in url else self.http_url + url)
        if parts.scheme == "https":
            conn = http.client.HTTPSConnection(parts.hostname, parts.port, timeout=timeout, context=insecure_context())
        else:
            conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
        sent = dict(headers or {})
        if cookies:
            sent["Cookie"] = cookie_header(cookies)
        try:
            target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            conn.request(method, target, body=body, headers=sent)
            response = conn.getresponse()
            received = {}
            for name, value in response.getheaders():
                name = name.lower()
                received[name] = f"{received[name]}\n{value}" if name in received else value
            return response.status, received, response.read()
        finally:
            conn.close()

    def login(self, user=ADMIN_USER, password=ADMIN_PASSWORD, https=False) -> dict:
        """Log in through wp-login.php as a browser does; returns {name: value} of the cookies the
        browser then sends with a front-end request (path /).  StackError when WordPress refuses."""
        base = self.https_url if https else self.http_url
        form = urllib.parse.urlencode({"log": user, "pwd": password, "wp-submit": "Log In",
                                       "redirect_to": base + "/wp-admin/", "testcookie": "1"})
        test_cookie = {"wordpress_test_cookie": "WP%20Cookie%20check"}
        status, headers, body = self.get(base + "/wp-login.php", cookies=test_cookie, method="POST", body=form,
                                         headers={"Content-Type": "application/x-www-form-urlencoded"})
        cookies = dict(test_cookie)
        for line in headers.get("set-cookie", "").split("\n"):
            jar = http.cookies.SimpleCookie()
            jar.load(line)
            for name, morsel in jar.items():
                if morsel["path"] == "/" and morsel.value not in ("", " ", "deleted"):
                    cookies[name] = morsel.value
        if status != 302 or not any(name.startswith("wordpress_logged_in_") for name in cookies):
            raise StackError(f"login as {user} refused: HTTP {status}, cookies {sorted(cookies)}")
        return cookies

    # ------------------------------------------------------------------ layout --

    def _lay_out(self):
        d = self.dir
        self.nginx_dir = os.path.join(d, "nginx")
        self.nginx_conf = os.path.join(self.nginx_dir, "nginx.conf")
        self.nginx_conf_d = os.path.join(self.nginx_dir, "conf.d")
        self.nginx_sites_enabled = os.path.join(self.nginx_dir, "sites-enabled")
        self.nginx_site = os.path.join(self.nginx_sites_enabled, "wordpress")
        self.nginx_modules_enabled = os.path.join(self.nginx_dir, "modules-enabled")
        self.nginx_snippets = os.path.join(self.nginx_dir, "snippets")
        self.nginx_log_dir = os.path.join(self.nginx_dir, "log")
        self.nginx_error_log = os.path.join(self.nginx_log_dir, "error.log")
        self.nginx_access_log = os.path.join(self.nginx_log_dir, "access.log")
        self.nginx_pid_file = os.path.join(self.nginx_dir, "nginx.pid")
        self.nginx_temp_dir = os.path.join(self.nginx_dir, "tmp")
        self.ssl_dir = os.path.join(self.nginx_dir, "ssl")
        self.ssl_certificate = os.path.join(self.ssl_dir, "stack.crt")
        self.ssl_certificate_key = os.path.join(self.ssl_dir, "stack.key")
        self.php_dir = os.path.join(d, "php")
        self.php_fpm_conf = os.path.join(self.php_dir, "php-fpm.conf")
        self.php_pool_d = os.path.join(self.php_dir, "pool.d")
        self.php_pool_conf = os.path.join(self.php_pool_d, "www.conf")
        self.php_ini = os.path.join(self.php_dir, "php.ini")
        self.php_conf_d = os.path.join(self.php_dir, "conf.d")
        self.php_scan_dirs = (DEBIAN_PHP_SCAN_DIR, self.php_conf_d)
        self.php_socket = os.path.join(self.php_dir, "php-fpm.sock")
        self.php_pid_file = os.path.join(self.php_dir, "php-fpm.pid")
        self.php_log_dir = os.path.join(self.php_dir, "log")
        self.php_error_log = os.path.join(self.php_log_dir, "php-fpm.log")
        self.wordpress_dir = os.path.join(d, "wordpress")
        self.wp_config = os.path.join(self.wordpress_dir, "wp-config.php")
        self.wp_content_dir = os.path.join(self.wordpress_dir, "wp-content")
        self.mysql_dir = os.path.join(d, "mysql")
        self.mysql_cnf = os.path.join(self.mysql_dir, "my.cnf")
        self.mysql_datadir = os.path.join(self.mysql_dir, "data")
        self.mysql_socket = os.path.join(self.mysql_dir, "mysqld.sock")
        self.mysql_pid_file = os.path.join(self.mysql_dir, "mysqld.pid")
        self.mysql_error_log = os.path.join(self.mysql_dir, "error.log")
        self.db_password = secrets.token_hex(12)
        for folder in (self.nginx_conf_d, self.nginx_sites_enabled, self.nginx_modules_enabled, self.nginx_snippets,
                       self.nginx_log_dir, self.nginx_temp_dir, self.ssl_dir, self.php_pool_d, self.php_conf_d,
                       self.php_log_dir, self.mysql_dir):
            os.makedirs(folder, mode=0o755)
        for name in ("mime.types", "fastcgi.conf", "fastcgi_params", "snippets/fastcgi-php.conf"):
            shutil.copyfile(os.path.join(DEBIAN_NGINX, name), os.path.join(self.nginx_dir, name))
        shutil.copyfile(DEBIAN_PHP_INI, self.php_ini)
        self._make_certificate()
        _write(self.nginx_conf, self._nginx_conf_text())
        _write(self.php_fpm_conf, self._php_fpm_conf_text())
        _write(self.php_pool_conf, self._pool_text())
        _write(self.mysql_cnf, self._mysql_cnf_text())
        self._lay_out_wordpress()

    def _make_certificate(self):
        done = subprocess.run([OPENSSL, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "7",
                               "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
                               "-keyout", self.ssl_certificate_key, "-out", self.ssl_certificate],
                              capture_output=True, text=True, timeout=COMMAND_TIMEOUT, stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            raise StackError(f"openssl req exited {done.returncode}: {done.stderr.strip()}")

    def _nginx_conf_text(self) -> str:
        return f"""# nginx.conf of the test stack (tests/stack.py): Debian 12's stock /etc/nginx/nginx.conf, with this
# stack's folder in place of /etc/nginx, /run and /var/log/nginx, and its own temporary folders.
user www-data;
worker_processes auto;
pid {self.nginx_pid_file};
error_log {self.nginx_error_log};
include {self.nginx_modules_enabled}/*.conf;

events {{
	worker_connections 768;
	# multi_accept on;
}}

http {{

	##
	# Basic Settings
	##

	sendfile on;
	tcp_nopush on;
	types_hash_max_size 2048;
	# server_tokens off;

	include {self.nginx_dir}/mime.types;
	default_type application/octet-stream;

	##
	# SSL Settings
	##

	ssl_protocols TLSv1 TLSv1.1 TLSv1.2 TLSv1.3; # Dropping SSLv3, ref: POODLE
	ssl_prefer_server_ciphers on;

	##
	# Logging Settings
	##

	access_log {self.nginx_access_log};

	##
	# Gzip Settings
	##

	gzip on;

	##
	# Temporary files (not in Debian's file: Debian's nginx keeps them in /var/lib/nginx)
	##

	client_body_temp_path {self.nginx_temp_dir}/body;
	fastcgi_temp_path {self.nginx_temp_dir}/fastcgi;
	proxy_temp_path {self.nginx_temp_dir}/proxy;
	scgi_temp_path {self.nginx_temp_dir}/scgi;
	uwsgi_temp_path {self.nginx_temp_dir}/uwsgi;

	##
	# Virtual Host Configs
	##

	include {self.nginx_conf_d}/*.conf;
	include {self.nginx_sites_enabled}/*;
}}
"""

    def _site_text(self) -> str:
        def server(listen, tls):
            return f"""server {{
	listen {listen};
	server_name _;
{tls}
	root {self.wordpress_dir};
	index index.php;

	location / {{
		try_files $uri $uri/ /index.php?$args;
	}}

	location ~ \\.php$ {{
		include {self.nginx_snippets}/fastcgi-php.conf;
		fastcgi_pass unix:{self.php_socket};
	}}
}}
"""
        tls = f"\tssl_certificate {self.ssl_certificate};\n\tssl_certificate_key {self.ssl_certificate_key};\n"
        return ("# sites-enabled/wordpress of the test stack (tests/stack.py): Debian's WordPress behind PHP-FPM,\n"
                "# PHP as in Debian's sites-available/default (snippets/fastcgi-php.conf), static files from disk.\n"
                + server(f"127.0.0.1:{self.http_port}", "") + "\n"
                + server(f"127.0.0.1:{self.https_port} ssl", tls))

    def _php_fpm_conf_text(self) -> str:
        return f"""; php-fpm.conf of the test stack (tests/stack.py): Debian's /etc/php/8.2/fpm/php-fpm.conf settings,
; with this stack's folder in place of /run/php, /var/log and /etc/php/8.2/fpm.
[global]
pid = {self.php_pid_file}
error_log = {self.php_error_log}
include={self.php_pool_d}/*.conf
"""

    def _pool_text(self) -> str:
        return f"""; pool.d/www.conf of the test stack (tests/stack.py): the settings of Debian's
; /etc/php/8.2/fpm/pool.d/www.conf, listening on this stack's socket.
[www]
user = www-data
group = www-data
listen = {self.php_socket}
listen.owner = www-data
listen.group = www-data
pm = dynamic
pm.max_children = 5
pm.start_servers = 2
pm.min_spare_servers = 1
pm.max_spare_servers = 3
"""

    def _mysql_cnf_text(self) -> str:
        return f"""# my.cnf of the test stack (tests/stack.py): MariaDB on a socket of its own, no TCP.
[mariadbd]
user = root
datadir = {self.mysql_datadir}
socket = {self.mysql_socket}
pid-file = {self.mysql_pid_file}
log-error = {self.mysql_error_log}
skip-networking
skip-name-resolve

[client]
socket = {self.mysql_socket}
"""

    def _lay_out_wordpress(self):
        for folder in ENTRY_FOLDERS:
            source = os.path.join(DEBIAN_WORDPRESS, folder)
            target = os.path.join(self.wordpress_dir, folder)
            os.makedirs(target, mode=0o755, exist_ok=True)
            for name in sorted(os.listdir(source)):
                path = os.path.join(source, name)
                inner = f"{folder}/{name}".lstrip("/")
                if name.startswith(".") or inner in ("wp-config.php", "wp-content") or inner in ENTRY_FOLDERS:
                    continue
                if name.endswith(".php") and os.path.isfile(path):
                    shutil.copy2(path, os.path.join(target, name))
                else:
                    os.symlink(path, os.path.join(target, name))
        content = os.path.join(DEBIAN_WORDPRESS, "wp-content")
        for kind in ("themes", "plugins"):
            os.makedirs(os.path.join(self.wp_content_dir, kind), mode=0o755)
            for name in sorted(os.listdir(os.path.join(content, kind))):
                os.symlink(os.path.join(content, kind, name), os.path.join(self.wp_content_dir, kind, name))
        uploads = os.path.join(self.wp_content_dir, "uploads")
        os.makedirs(uploads, mode=0o755)
        shutil.chown(uploads, "www-data", "www-data")
        shutil.copy2(os.path.join(content, "plugins", "index.php"), os.path.join(self.wp_content_dir, "index.php"))

    def _wp_config_text(self) -> str:
        keys = "".join(f"define('{name}', '{secrets.token_hex(32)}');\n" for name in (
            "AUTH_KEY", "SECURE_AUTH_KEY", "LOGGED_IN_KEY", "NONCE_KEY",
            "AUTH_SALT", "SECURE_AUTH_SALT", "LOGGED_IN_SALT", "NONCE_SALT"))
        return f"""<?php
/* wp-config.php of the test stack (tests/stack.py): this stack's database and URLs; what Debian's
 * /etc/wordpress/config-HOST.php would hold.  No WP-Cron on page views, no HTTP to other hosts. */
define('DB_NAME', 'wordpress');
define('DB_USER', 'wordpress');
define('DB_PASSWORD', '{self.db_password}');
define('DB_HOST', 'localhost:{self.mysql_socket}');
define('DB_CHARSET', 'utf8mb4');
define('DB_COLLATE', '');
{keys}$table_prefix = 'wp_';

$stack_https = isset($_SERVER['HTTPS']) && $_SERVER['HTTPS'] !== '' && $_SERVER['HTTPS'] !== 'off';
define('WP_HOME', $stack_https ? '{self.https_url}' : '{self.http_url}');
define('WP_SITEURL', WP_HOME);

define('DISABLE_WP_CRON', true);
define('WP_HTTP_BLOCK_EXTERNAL', true);
define('AUTOMATIC_UPDATER_DISABLED', true);
define('WP_AUTO_UPDATE_CORE', false);
define('WP_DEBUG', false);

if (!defined('ABSPATH')) {{
    define('ABSPATH', __DIR__ . '/');
}}
require_once ABSPATH . 'wp-settings.php';
"""

    # ------------------------------------------------------------------ services --

    def _start_mariadb(self):
        # --rpm, as Debian's postinst does: without it, as root, the script chowns mariadb-server's
        # /usr/lib/mysql/plugin/auth_pam_tool_dir to the datadir's user
        done = subprocess.run([MARIADB_INSTALL_DB, f"--defaults-file={self.mysql_cnf}", "--rpm",
                               "--auth-root-authentication-method=socket", "--skip-test-db"],
                              capture_output=True, text=True, timeout=COMMAND_TIMEOUT, stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            raise StackError(f"mariadb-install-db exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
        service = self.services["mariadb"] = _Service(
            "mariadb", [MARIADBD, f"--defaults-file={self.mysql_cnf}"], os.path.join(self.mysql_dir, "mariadbd.out"))
        service.start()
        service.wait_until(lambda: os.path.exists(self.mysql_pid_file) and _connects(self.mysql_socket, socket.AF_UNIX),
                           f"listening on {self.mysql_socket}", logs=(self.mysql_error_log,))
        sql = (f"CREATE DATABASE wordpress DEFAULT CHARACTER SET utf8mb4;"
               f"CREATE USER 'wordpress'@'localhost' IDENTIFIED BY '{self.db_password}';"
               f"GRANT ALL PRIVILEGES ON wordpress.* TO 'wordpress'@'localhost';")
        done = subprocess.run([MARIADB, f"--defaults-file={self.mysql_cnf}", "-uroot", "-e", sql],
                              capture_output=True, text=True, timeout=COMMAND_TIMEOUT, stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            raise StackError(f"creating the wordpress database failed: {done.stderr.strip()}")

    def _php_fpm_argv(self, *extra) -> list:
        return [PHP_FPM, "--fpm-config", self.php_fpm_conf, "-c", self.php_ini, *extra]

    def _start_php_fpm(self):
        service = self.services["php-fpm"] = _Service(
            "php-fpm", self._php_fpm_argv("--nodaemonize"), os.path.join(self.php_log_dir, "php-fpm.out"),
            env=self.php_env())
        service.start()
        service.wait_until(lambda: _connects(self.php_socket, socket.AF_UNIX), f"listening on {self.php_socket}",
                           logs=(self.php_error_log,))

    def _start_nginx(self):
        """Start nginx on two free ports; on a port taken meanwhile by someone else, try new ones."""
        for attempt in range(PORT_ATTEMPTS):
            self.http_port, self.https_port = free_port(), free_port()
            while self.https_port == self.http_port:
                self.https_port = free_port()
            _write(self.nginx_site, self._site_text())
            ok, output = self.nginx_test()
            if not ok:
                raise StackError(f"nginx -t fails on the stack's configuration:\n{output}")
            service = self.services["nginx"] = _Service(
                "nginx", [NGINX, "-c", self.nginx_conf, "-g", "daemon off;"],
                os.path.join(self.nginx_log_dir, "nginx.out"))
            service.start()
            try:
                service.wait_until(lambda: _connects(("127.0.0.1", self.http_port)) and
                                   _connects(("127.0.0.1", self.https_port)) and os.path.exists(self.nginx_pid_file),
                                   "listening", logs=(self.nginx_error_log,))
                return
            except StackError as error:
                service.stop()
                if "Address already in use" not in str(error) or attempt == PORT_ATTEMPTS - 1:
                    raise

    def _install_wordpress(self):
        _write(self.wp_config, self._wp_config_text())
        spec = {
            "wordpress": self.wordpress_dir, "title": "Smart Stack", "user": ADMIN_USER,
            "password": ADMIN_PASSWORD, "name": ADMIN_NAME, "email": "admin@example.com",
            "article": {"slug": ARTICLE_SLUG, "title": "A long article", "content": _long_article()},
            "posts": [{"title": f"Post number {n}", "content": _paragraphs(n, 3)} for n in range(1, 6)],
            "pages": [{"title": title, "content": _paragraphs(len(title), 2)} for title in ("About", "Contact")],
        }
        spec_path = _write(os.path.join(self.dir, "install.json"), json.dumps(spec), 0o600)
        script = _write(os.path.join(self.dir, "install.php"), INSTALL_PHP, 0o600)
        done = subprocess.run([PHP_CLI, script, spec_path], capture_output=True, text=True, timeout=COMMAND_TIMEOUT,
                              stdin=subprocess.DEVNULL, cwd=self.dir)
        if done.returncode != 0 or not done.stdout.strip().startswith("{"):
            raise StackError(f"installing WordPress failed (exit {done.returncode}):\n{done.stdout}\n{done.stderr}")
        self.installed = json.loads(done.stdout)
        status, _, body = self.get(self.article_url)
        if status != 200:
            raise StackError(f"the article answers {status} after the install:\n{body[:500]!r}\n"
                             f"{_tail(self.nginx_error_log)}")


INSTALL_PHP = r"""<?php
/* Installs the test stack's WordPress from the command line: php8.2 install.php SPEC.json
 * (written and run by tests/stack.py).  Prints a JSON object: the user's id and the content's URLs. */
$spec = json_decode(file_get_contents($argv[1]), true);
define('WP_INSTALLING', true);
function wp_new_blog_notification($blog_title, $blog_url, $user_id, $password) {
    /* no mail from a test */
}
require $spec['wordpress'] . '/wp-load.php';
require_once ABSPATH . 'wp-admin/includes/upgrade.php';

/* a permalink structure during the install stops it probing the site over HTTP for one */
$structure = function () { return '/%postname%/'; };
add_filter('pre_option_permalink_structure', $structure);
$installed = wp_install($spec['title'], $spec['user'], $spec['email'], 0, '', $spec['password']);
remove_filter('pre_option_permalink_structure', $structure);
$user_id = $installed['user_id'];
wp_update_user(array('ID' => $user_id, 'display_name' => $spec['name'], 'first_name' => $spec['name']));

global $wp_rewrite;
$wp_rewrite->set_permalink_structure('/%postname%/');
$wp_rewrite->flush_rules(false);

$urls = array();
foreach ($spec['posts'] as $i => $post) {
    $urls['posts'][] = get_permalink(wp_insert_post(array(
        'post_title' => $post['title'], 'post_content' => $post['content'], 'post_status' => 'publish',
        'post_author' => $user_id,
        'post_date' => gmdate('Y-m-d H:i:s', time() - 86400 * (count($spec['posts']) - $i + 1)),
    ), true));
}
foreach ($spec['pages'] as $page) {
    $urls['pages'][] = get_permalink(wp_insert_post(array(
        'post_title' => $page['title'], 'post_content' => $page['content'], 'post_status' => 'publish',
        'post_type' => 'page', 'post_author' => $user_id,
    ), true));
}
$article = $spec['article'];
$urls['article'] = get_permalink(wp_insert_post(array(
    'post_title' => $article['title'], 'post_name' => $article['slug'], 'post_content' => $article['content'],
    'post_status' => 'publish', 'post_author' => $user_id,
), true));
echo json_encode(array('user_id' => $user_id, 'urls' => $urls)), "\n";
"""

WORDS = ("server", "cache", "request", "latency", "worker", "process", "memory", "socket", "measure",
         "variant", "baseline", "config", "reload", "nginx", "php", "opcache", "page", "visitor")


def _paragraphs(seed, count) -> str:
    """count block-editor paragraphs of plain words, the same for the same seed."""
    blocks = []
    for p in range(count):
        words = [WORDS[(seed * 7 + p * 13 + i * (i + seed)) % len(WORDS)] for i in range(60)]
        text = html.escape(" ".join(words).capitalize() + ".")
        blocks.append(f"<!-- wp:paragraph -->\n<p>{text}</p>\n<!-- /wp:paragraph -->")
    return "\n\n".join(blocks)


def _long_article() -> str:
    """An article of some length: headings, paragraphs and a list, in block-editor markup."""
    parts = []
    for section in range(1, 7):
        parts.append(f"<!-- wp:heading -->\n<h2>Section {section}</h2>\n<!-- /wp:heading -->")
        parts.append(_paragraphs(section * 11, 4))
    items = "".join(f"<li>{word}</li>" for word in WORDS[:8])
    parts.append(f"<!-- wp:list -->\n<ul>{items}</ul>\n<!-- /wp:list -->")
    return "\n\n".join(parts)
