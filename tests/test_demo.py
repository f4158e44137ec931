"""`smart.py demo`: the first command a new user runs, as a process, end to end."""

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import unittest
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from helpers import import_smart

smart = import_smart()
SMART = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "smart.py")


class DemoTest(unittest.TestCase):
    def setUp(self):
        self.home = tempfile.mkdtemp(prefix="smart-demo-test-")

    def test_demo_keeps_the_helpful_variant_and_reverts_the_others(self):
        started = time.monotonic()
        done = subprocess.run([sys.executable, SMART, "--home", self.home, "demo", "--no-serve", "--seconds", "30"],
                              capture_output=True, text=True, timeout=120)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertLess(time.monotonic() - started, 120)
        state = json.load(open(os.path.join(self.home, "var", "state.json")))
        self.assertEqual(state["status"], "done")
        self.assertEqual(state["kept_variant"], "response_cache")
        decisions = {v["name"]: v["decision"] for v in state["variants"]}
        self.assertEqual(decisions, {"noop": "revert", "slow_backend": "revert", "response_cache": "keep"})
        self.assertEqual(open(os.path.join(self.home, "target", "mode")).read().strip(), "cached")
        self.assertFalse(os.path.exists(os.path.join(self.home, "var", "applied.json")))
        self.assertIn("done, kept response_cache", done.stdout)

    def test_demo_then_serves_a_page_that_shows_it_and_stops_on_ctrl_c(self):
        child = subprocess.Popen([sys.executable, SMART, "demo", "--home", self.home, "--seconds", "15", "--port", "0"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.addCleanup(lambda: child.poll() is None and os.killpg(child.pid, signal.SIGKILL))
        url = None
        deadline = time.monotonic() + 110
        while time.monotonic() < deadline:
            line = child.stdout.readline()
            if not line:
                break
            found = re.search(r"dashboard: (http://127\.0\.0\.1:\d+/)", line)
            if found:
                url = found.group(1)
                break
        self.assertIsNotNone(url, "demo printed no dashboard URL")
        page = urllib.request.urlopen(url, timeout=10).read().decode()
        self.assertIn("state.json", page)
        with urllib.request.urlopen(url + "state.json", timeout=10) as response:
            self.assertEqual(response.headers["Cache-Control"], "no-cache")
            state = json.load(response)
        self.assertEqual(state["kept_variant"], "response_cache")
        child.send_signal(signal.SIGINT)
        self.assertEqual(child.wait(timeout=15), 0)


if __name__ == "__main__":
    unittest.main()
