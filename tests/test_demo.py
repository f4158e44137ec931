"""`smart.py demo`: the first command a new user runs, as a process, end to end.

Two demos: one with --no-serve that must end by itself, and one that serves the dashboard until
Ctrl-C.  The serving one starts in setUpClass, in a home of its own, so that it runs while the other
does; its output goes to files that the test reads for the dashboard's URL.
"""

import json
import os
import re
import shutil
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
    @classmethod
    def setUpClass(cls):
        cls.serving_home = tempfile.mkdtemp(prefix="smart-demo-test-")
        cls.addClassCleanup(shutil.rmtree, cls.serving_home, True)
        cls.serving_out = open(os.path.join(cls.serving_home, "demo.out"), "w+", encoding="utf-8")
        cls.addClassCleanup(cls.serving_out.close)
        cls.serving = subprocess.Popen([sys.executable, SMART, "demo", "--home", cls.serving_home, "--seconds", "15",
                                        "--port", "0"], stdout=cls.serving_out, stderr=subprocess.DEVNULL,
                                       stdin=subprocess.DEVNULL, text=True, start_new_session=True)
        cls.addClassCleanup(cls.stop_serving)

    @classmethod
    def stop_serving(cls):
        if cls.serving.poll() is None:
            os.killpg(cls.serving.pid, signal.SIGKILL)
            cls.serving.wait()

    def setUp(self):
        self.home = tempfile.mkdtemp(prefix="smart-demo-test-")
        self.addCleanup(shutil.rmtree, self.home, True)

    def test_demo_keeps_the_helpful_variant_and_reverts_the_others(self):
        started = time.monotonic()
        done = subprocess.run([sys.executable, SMART, "--home", self.home, "demo", "--no-serve", "--seconds", "30"],
                              capture_output=True, text=True, timeout=120)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertLess(time.monotonic() - started, 120)
        with open(os.path.join(self.home, "var", "state.json"), encoding="utf-8") as handle:
            state = json.load(handle)
        self.assertEqual(state["status"], "done")
        self.assertEqual(state["kept_variant"], "response_cache")
        decisions = {v["name"]: v["decision"] for v in state["variants"]}
        self.assertEqual(decisions, {"noop": "revert", "slow_backend": "revert", "response_cache": "keep"})
        with open(os.path.join(self.home, "target", "mode"), encoding="utf-8") as handle:
            self.assertEqual(handle.read().strip(), "cached")
        self.assertFalse(os.path.exists(os.path.join(self.home, "var", "applied.json")))
        self.assertIn("done, kept response_cache", done.stdout)

    def test_demo_then_serves_a_page_that_shows_it_and_stops_on_ctrl_c(self):
        url = None
        deadline = time.monotonic() + 110
        while url is None and time.monotonic() < deadline and self.serving.poll() is None:
            with open(self.serving_out.name, encoding="utf-8") as handle:
                found = re.search(r"dashboard: (http://127\.0\.0\.1:\d+/)", handle.read())
            url = found and found.group(1)
            time.sleep(0.1)
        self.assertIsNotNone(url, "demo printed no dashboard URL")
        page = urllib.request.urlopen(url, timeout=10).read().decode()
        self.assertIn("state.json", page)
        with urllib.request.urlopen(url + "state.json", timeout=10) as response:
            self.assertEqual(response.headers["Cache-Control"], "no-cache")
            state = json.load(response)
        self.assertEqual(state["kept_variant"], "response_cache")
        self.serving.send_signal(signal.SIGINT)
        self.assertEqual(self.serving.wait(timeout=15), 0)


if __name__ == "__main__":
    unittest.main()
