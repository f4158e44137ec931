"""The command line as a newcomer meets it: every command's --help, and usage mistakes as one line."""

import os
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from helpers import import_smart, run_cli  # noqa: E402

smart = import_smart()


def commands():
    """The parser's own list of commands, so a new one is covered the day it is added."""
    parser = smart.build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return sorted(action.choices)


class HelpTests(unittest.TestCase):
    def test_every_command_has_a_working_help(self):
        names = commands()
        self.assertIn("decide", names)
        self.assertGreaterEqual(len(names), 12)
        for name in names:
            with self.subTest(command=name):
                rc, out, err = run_cli(name, "--help")
                self.assertEqual(rc, 0, err)
                self.assertIn(f"usage: smart.py {name}", out)
                self.assertEqual(err, "")

    def test_the_top_level_help_lists_every_command(self):
        rc, out, err = run_cli("--help")
        self.assertEqual(rc, 0, err)
        for name in commands():
            self.assertIn(name, out)

    def test_a_usage_mistake_is_one_line_and_exit_2(self):
        for args in (("no-such-command",), ("decide",), ("measure", "--url", "http://127.0.0.1:9/")):
            with self.subTest(args=args):
                rc, out, err = run_cli(*args)
                self.assertEqual(rc, 2, out + err)
                self.assertEqual(len(err.strip().splitlines()), 1, err)
                self.assertNotIn("Traceback", err)


if __name__ == "__main__":
    unittest.main()
