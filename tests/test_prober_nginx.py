"""The prober against a real nginx: a name-based virtual host reached by a given Host header, and
TLS session resumption (session cache and tickets, TLS 1.3 and 1.2).

nginx runs as a child of the test from a temporary nginx.conf (`daemon off`, 127.0.0.1, a port
the OS picked, every path in the temporary folder) and stops in cleanup.  Without nginx or openssl
the tests skip, except under CI=true where they fail.
"""

from __future__ import annotations

import os
import sys
import shutil
import socket
import subprocess
import tempfile
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from helpers import import_smart
from test_prober import need, read_csv, self_signed

smart = import_smart()


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Nginx:
    """nginx from a temporary folder, serving the given server blocks ({port} is its port)."""

    def __init__(self, test, servers: str):
        self.binary = need("nginx")
        self.root = tempfile.mkdtemp(prefix="smart-prober-nginx-")
        test.addCleanup(shutil.rmtree, self.root, True)
        os.chmod(self.root, 0o755)              # workers may run as nobody
        self.port = free_port()
        temp = os.path.join(self.root, "tmp")
        os.makedirs(temp)
        self.conf = os.path.join(self.root, "nginx.conf")
        with open(self.conf, "w") as handle:
            handle.write(f"""daemon off;
worker_processes 1;
pid {self.root}/nginx.pid;
error_log {self.root}/error.log;
events {{ worker_connections 128; }}
http {{
    access_log off;
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
{servers.replace("{port}", str(self.port))}
}}
""")
        self.process = subprocess.Popen([self.binary, "-c", self.conf, "-p", self.root + "/",
                                         "-e", f"{self.root}/error.log"],
                                        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        test.addCleanup(self.stop)
        deadline = time.monotonic() + 10
        while True:
            if self.process.poll() is not None:
                raise AssertionError(f"nginx exited {self.process.returncode}: {self.process.stderr.read().decode()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError("nginx did not listen within 10 s")
                time.sleep(0.02)

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process.stderr.close()


class NginxProberTests(unittest.TestCase):

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="smart-prober-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.count = 0

    def probe(self, url, duration, **options):
        self.count += 1
        path = os.path.join(self.tmp, f"probe{self.count}.csv")
        result = smart.measure_url(url, duration, path, timeout=2.0, **options)
        header, rows = read_csv(path)
        self.assertEqual(result.rows, len(rows))
        return result, rows

    def test_a_given_host_header_reaches_the_name_based_vhost(self):
        nginx = Nginx(self, """
    server { listen 127.0.0.1:{port} default_server; return 404 "default\\n"; }
    server { listen 127.0.0.1:{port}; server_name www.example.org; return 200 "vhost www.example.org\\n"; }
""")
        url = f"http://127.0.0.1:{nginx.port}/"
        # Two Host headers (the default and the given one) made nginx answer 400 to every probe.
        result, rows = self.probe(url, 0.3, interval=0.1, headers=["Host: www.example.org"],
                                  expect_body="vhost www.example.org")
        self.assertEqual({(row[2], row[3]) for row in rows}, {("200", "")})
        result, rows = self.probe(url, 0.3, interval=0.1)
        self.assertEqual({row[2] for row in rows}, {"404"})

    def test_tls_sessions_resume_against_nginx(self):
        cert, key = self_signed(self.tmp)
        for protocols in ("TLSv1.3", "TLSv1.2"):
            with self.subTest(protocols=protocols):
                nginx = Nginx(self, f"""
    server {{
        listen 127.0.0.1:{{port}} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols {protocols};
        ssl_session_cache shared:SSL:1m;
        ssl_session_tickets on;
        return 200 "tls\\n";
    }}
""")
                url = f"https://127.0.0.1:{nginx.port}/"
                result, rows = self.probe(url, 0.5, interval=0.05, insecure=True, connections="resume")
                self.assertEqual({row[2] for row in rows}, {"200"})
                self.assertGreaterEqual(len(rows), 8)
                self.assertEqual(result.handshakes, len(rows))
                self.assertEqual(result.resumed, len(rows) - 1, "a returning visitor did not resume")
                result, rows = self.probe(url, 0.3, interval=0.05, insecure=True, connections="new")
                self.assertEqual({row[2] for row in rows}, {"200"})
                self.assertEqual((result.handshakes, result.resumed), (len(rows), 0))
                nginx.stop()


if __name__ == "__main__":
    unittest.main()
