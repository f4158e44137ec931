"""The test stack of tests/stack.py: a real nginx + PHP-FPM 8.2 + MariaDB + WordPress on 127.0.0.1.

One stack serves the whole StackTest class; LifecycleTest starts its own to check that stop() (and a
start() that fails half-way) leaves no process behind.  Without the stack's packages, or not as
root, the tests skip, except under CI=true where they fail.
"""

from __future__ import annotations

import os
import re
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import stack as stack_module  # noqa: E402
from stack import ADMIN_NAME, STATIC_PATH, Stack, StackError  # noqa: E402

GENERATOR = b'<meta name="generator" content="WordPress 6.'
PROBE = ("<?php echo php_ini_loaded_file(), ' ', ini_get('realpath_cache_size'), ' ',"
         " ini_get('opcache.enable') ? 'on' : 'off';\n")
CACHE_DROP_IN = """# conf.d/smart.conf: a test's drop-in (tests/test_stack.py)
fastcgi_cache_path {cache} levels=1:2 keys_zone=test:1m max_size=16m inactive=1m use_temp_path=off;
map $http_cookie $test_skip_cache {{ default 0; ~*wordpress_logged_in_ 1; }}
fastcgi_cache test;
fastcgi_cache_key $scheme$request_method$host$request_uri;
fastcgi_cache_valid 200 1m;
fastcgi_cache_bypass $test_skip_cache;
fastcgi_no_cache $test_skip_cache;
add_header X-Cache $upstream_cache_status;
"""


def alive(pid) -> bool:
    """Whether pid is a live (not zombie) process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            return handle.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


class StackTest(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        stack_module.require()
        cls.stack = Stack().start()

    @classmethod
    def tearDownClass(cls):
        cls.stack.stop()

    def get_ok(self, url, **kwargs):
        status, headers, body = self.stack.get(url, **kwargs)
        self.assertEqual(status, 200, f"{url}: {body[:300]!r}")
        return headers, body

    def test_front_page_and_article_are_wordpress_pages(self):
        _, front = self.get_ok(self.stack.front_url)
        self.assertIn(GENERATOR, front)
        self.assertIn(b"Smart Stack", front)
        self.assertIn(self.stack.article_url.encode(), front)
        _, article = self.get_ok(self.stack.article_url)
        self.assertIn(GENERATOR, article)
        self.assertIn(b"<title>A long article", article)
        self.assertIn(b"Section 6", article)
        self.assertGreater(len(re.findall(rb"<p>", article)), 20)

    def test_every_installed_url_answers(self):
        urls = self.stack.installed["urls"]
        for url in [*urls["posts"], *urls["pages"], urls["article"]]:
            self.get_ok(url)

    def test_static_asset_comes_from_nginx(self):
        _, front = self.get_ok(self.stack.front_url)
        self.assertIn(STATIC_PATH.encode(), front, "the front page links the static asset")
        headers, body = self.get_ok(self.stack.static_url)
        with open(self.stack.static_file, "rb") as handle:
            self.assertEqual(body, handle.read())
        self.assertEqual(headers["content-type"], "text/css")
        stat = os.stat(self.stack.static_file)
        # nginx's static module: ETag "mtime-size" in hex and Last-Modified; PHP would send neither
        self.assertEqual(headers["etag"], f'"{int(stat.st_mtime):x}-{stat.st_size:x}"')
        self.assertIn("last-modified", headers)

    def test_https_serves_the_site_with_the_self_signed_certificate(self):
        _, front = self.get_ok(self.stack.https_url + "/")
        self.assertIn(GENERATOR, front)
        self.assertIn(f"{self.stack.https_url}/{stack_module.ARTICLE_SLUG}/".encode(), front)
        _, article = self.get_ok(self.stack.https_url + f"/{stack_module.ARTICLE_SLUG}/")
        self.assertIn(b"Section 6", article)

    def test_anonymous_responses_set_no_cookie(self):
        for url in (self.stack.front_url, self.stack.article_url, self.stack.static_url,
                    self.stack.https_url + "/", *self.stack.installed["urls"]["pages"]):
            headers, _ = self.get_ok(url)
            self.assertNotIn("set-cookie", headers, url)

    def test_logged_in_front_page_shows_the_admin_bar(self):
        cookies = self.stack.login()
        self.assertTrue(any(name.startswith("wordpress_logged_in_") for name in cookies), cookies)
        _, logged_in = self.get_ok(self.stack.front_url, cookies=cookies)
        self.assertIn(b'id="wpadminbar"', logged_in)
        self.assertIn(ADMIN_NAME.encode(), logged_in)
        _, anonymous = self.get_ok(self.stack.front_url)
        self.assertNotIn(b'id="wpadminbar"', anonymous)
        self.assertNotIn(ADMIN_NAME.encode(), anonymous)

    def test_a_wrong_password_is_refused(self):
        with self.assertRaises(StackError):
            self.stack.login(password="not the password")

    def test_layout_is_debians(self):
        s = self.stack
        for path in (s.nginx_conf, s.nginx_site, s.php_fpm_conf, s.php_pool_conf, s.php_ini, s.wp_config,
                     s.ssl_certificate, s.ssl_certificate_key, s.mysql_cnf):
            self.assertTrue(os.path.isfile(path), path)
        self.assertEqual(os.listdir(s.nginx_conf_d), [])
        self.assertEqual(os.listdir(s.nginx_sites_enabled), ["wordpress"])
        with open(s.nginx_conf) as handle:
            conf = handle.read()
        for line in ("worker_processes auto;", "worker_connections 768;", "sendfile on;", "gzip on;",
                     f"include {s.nginx_conf_d}/*.conf;", f"include {s.nginx_sites_enabled}/*;"):
            self.assertIn(line, conf)
        with open(s.php_pool_conf) as handle:
            pool = handle.read()
        for line in ("pm = dynamic", "pm.max_children = 5", "pm.start_servers = 2", "pm.min_spare_servers = 1",
                     "pm.max_spare_servers = 3", f"listen = {s.php_socket}"):
            self.assertIn(line + "\n", pool)
        self.assertEqual(s.php_scan_dirs, ("/etc/php/8.2/fpm/conf.d", s.php_conf_d))
        self.assertFalse(os.path.islink(os.path.join(s.wordpress_dir, "wp-load.php")))
        self.assertTrue(os.path.islink(os.path.join(s.wordpress_dir, "wp-includes")))

    def test_nginx_t_and_php_fpm_t_pass(self):
        ok, output = self.stack.nginx_test()
        self.assertTrue(ok, output)
        self.assertIn("syntax is ok", output)
        ok, output = self.stack.php_test()
        self.assertTrue(ok, output)
        self.assertIn("test is successful", output)
        ok, output = self.stack.php_test(dump=True)
        self.assertTrue(ok, output)
        self.assertIn("pm.max_children = 5", output)

    def test_reloads_keep_it_serving(self):
        masters = self.stack.pids()
        for reload in (self.stack.reload_nginx, self.stack.reload_php, self.stack.reload_nginx, self.stack.reload_php):
            reload()
            _, body = self.get_ok(self.stack.article_url)
            self.assertIn(GENERATOR, body)
        self.assertEqual(self.stack.pids(), masters, "a reload keeps each master's PID")

    def test_a_php_drop_in_overrides_debians_ini_after_a_reload(self):
        s = self.stack
        probe = os.path.join(s.wordpress_dir, "stack-probe.php")
        drop_in = os.path.join(s.php_conf_d, "99-smart.ini")
        with open(probe, "w") as handle:
            handle.write(PROBE)
        self.addCleanup(os.remove, probe)
        self.assertEqual(self.get_ok("/stack-probe.php")[1], f"{s.php_ini} 4096K on".encode())
        with open(drop_in, "w") as handle:
            handle.write("; a test's drop-in (tests/test_stack.py)\nrealpath_cache_size = 8M\nopcache.enable = 0\n")
        self.addCleanup(s.reload_php)
        self.addCleanup(os.remove, drop_in)
        s.reload_php()
        self.assertEqual(self.get_ok("/stack-probe.php")[1], f"{s.php_ini} 8M off".encode())

    def test_a_later_pool_file_overrides_www_conf(self):
        # what an experiment's pool.d/zz-*.conf relies on: php-fpm merges sections of the same name, the
        # file read last (include's glob is sorted) winning, and [global] is accepted there too
        drop_in = os.path.join(self.stack.php_pool_d, "zz-smart.conf")
        with open(drop_in, "w") as handle:
            handle.write("; a test's drop-in (tests/test_stack.py)\n[global]\nprocess_control_timeout = 10s\n\n"
                         "[www]\npm = static\npm.max_children = 4\n")
        self.addCleanup(os.remove, drop_in)
        ok, output = self.stack.php_test(dump=True)
        self.assertTrue(ok, output)
        self.assertEqual(output.count("NOTICE: [www]"), 1)
        for setting in ("process_control_timeout = 10s", "pm = static", "pm.max_children = 4"):
            self.assertIn(f"\t{setting}\n", output)

    def test_an_http_drop_in_caches_the_site_without_touching_it(self):
        # what an experiment's conf.d/*.conf relies on: http-level fastcgi_cache* and maps reach the
        # site's PHP location by inheritance
        drop_in = os.path.join(self.stack.nginx_conf_d, "smart.conf")
        with open(drop_in, "w") as handle:
            handle.write(CACHE_DROP_IN.format(cache=os.path.join(self.stack.nginx_dir, "cache")))
        self.addCleanup(self.stack.reload_nginx)
        self.addCleanup(os.remove, drop_in)
        self.stack.reload_nginx()
        seen = [self.get_ok(self.stack.article_url)[0].get("x-cache") for _ in range(2)]
        self.assertEqual(seen, ["MISS", "HIT"])
        headers, body = self.get_ok(self.stack.article_url, cookies=self.stack.login())
        self.assertEqual(headers.get("x-cache"), "BYPASS")
        self.assertIn(b'id="wpadminbar"', body)

    def test_php_fpm_rss_sums_the_master_and_its_workers(self):
        self.assertGreaterEqual(len(self.stack.php_workers()), 1)
        self.assertGreater(self.stack.php_fpm_rss(), 0)


class LifecycleTest(unittest.TestCase):

    def setUp(self):
        stack_module.require()

    def assert_all_gone(self, stack, pids):
        for pid in pids:
            self.assertFalse(alive(pid), f"process {pid} of the stack is still alive")
        self.assertFalse(os.path.exists(stack.dir), "the stack's folder is removed")

    def test_stop_leaves_no_process(self):
        with Stack() as stack:
            pids = stack.all_pids()
            self.assertEqual(set(stack.pids()), {"mariadb", "php-fpm", "nginx"})
            self.assertGreaterEqual(len(pids), 7, "3 masters, 2 nginx and 2 PHP-FPM workers at least")
            self.assertTrue(all(alive(pid) for pid in pids))
        self.assertEqual(stack.all_pids(), set())
        self.assert_all_gone(stack, pids)

    def test_a_start_that_fails_half_way_leaves_no_process(self):
        seen = set()

        class Failing(Stack):
            def _install_wordpress(self):
                seen.update(self.all_pids())
                raise StackError("made to fail after the servers started")

        stack = Failing()
        with self.assertRaisesRegex(StackError, "made to fail"):
            stack.start()
        self.assertGreaterEqual(len(seen), 7)
        self.assert_all_gone(stack, seen)


if __name__ == "__main__":
    unittest.main()
