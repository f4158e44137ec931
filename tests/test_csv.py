"""Measurement CSV (SPEC.md "Measurement CSV"): smart.read_measurements."""

import contextlib
import io
import os
import sys
import re
import shutil
import tempfile
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from helpers import import_smart, write_csv

smart = import_smart()

ISO = "2026-11-27T20:12:06.123Z"


class CsvTestCase(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="smart-csv-")
        self.addCleanup(shutil.rmtree, self.tmp, ignore_errors=True)

    def path(self, name="m.csv"):
        return os.path.join(self.tmp, name)

    def write_bytes(self, data, name="m.csv"):
        path = self.path(name)
        with open(path, "wb") as handle:
            handle.write(data)
        return path

    def read(self, path):
        """read_measurements, returning (arm, captured stderr)."""
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            result = smart.read_measurements(path)
        return result, err.getvalue()

    def assert_bad(self, path, line):
        """read_measurements raises BadInput naming path:line."""
        err = io.StringIO()
        with contextlib.redirect_stderr(err), self.assertRaises(smart.BadInput) as caught:
            smart.read_measurements(path)
        message = str(caught.exception)
        self.assertIn(f"{path}:{line}", message)
        self.assertEqual(caught.exception.exit_code, 2)
        self.assertNotIn("\n", message)
        return message


class ValidFilesTests(CsvTestCase):
    ROWS = [(ISO, "12.5", 200), (ISO, "7.25", 404), (ISO, "100", 200)]

    def test_with_header(self):
        arm, err = self.read(write_csv(self.path(), self.ROWS))
        self.assertEqual(list(arm.latencies), [12.5, 7.25, 100.0])
        self.assertEqual((arm.total, arm.errors), (3, 0))
        self.assertEqual(err, "")

    def test_header_optional(self):
        with_header, _ = self.read(write_csv(self.path("a.csv"), self.ROWS))
        without, err = self.read(write_csv(self.path("b.csv"), self.ROWS, header=False))
        self.assertEqual(list(with_header.latencies), list(without.latencies))
        self.assertEqual((with_header.total, with_header.errors), (without.total, without.errors))
        self.assertEqual(err, "")

    def test_header_with_spaces(self):
        path = self.path()
        with open(path, "w") as handle:
            handle.write(" timestamp , latency_ms , response_code\n1764274326,5,200\n")
        arm, _ = self.read(path)
        self.assertEqual(arm.total, 1)

    def test_empty_file(self):
        arm, _ = self.read(self.write_bytes(b""))
        self.assertEqual((arm.total, arm.errors, arm.ok), (0, 0, 0))

    def test_header_only(self):
        arm, _ = self.read(write_csv(self.path(), []))
        self.assertEqual((arm.total, arm.errors), (0, 0))

    def test_timestamp_forms(self):
        rows = [
            ("2026-11-27T20:12:06.123Z", 1, 200),
            ("2026-11-27T20:12:06Z", 2, 200),
            ("2026-11-27T20:12:06.123456+00:00", 3, 200),
            ("1764274326", 4, 200),
            ("1764274326.123", 5, 200),
            ("0", 6, 200),
        ]
        arm, _ = self.read(write_csv(self.path(), rows))
        self.assertEqual(list(arm.latencies), [1.0, 2.0, 3.0, 4.0, 5.0, 6.0])

    def test_errors_counted_and_excluded(self):
        rows = [
            (ISO, 10, 200), (ISO, 11, 301), (ISO, 12, 404), (ISO, 13, 499),
            (ISO, 5000, 0), (ISO, 9000, 500), (ISO, 9001, 502), (ISO, 9002, 503), (ISO, 9003, 599),
        ]
        arm, _ = self.read(write_csv(self.path(), rows))
        self.assertEqual(arm.total, 9)
        self.assertEqual(arm.errors, 5)
        self.assertEqual(sorted(arm.latencies), [10.0, 11.0, 12.0, 13.0])

    def test_latency_zero_and_float_forms(self):
        rows = [(ISO, "0", 200), (ISO, "0.001", 200), (ISO, "1e3", 200), (ISO, " 4.5 ", 200)]
        arm, _ = self.read(write_csv(self.path(), rows))
        self.assertEqual(list(arm.latencies), [0.0, 0.001, 1000.0, 4.5])

    def test_crlf_line_endings(self):
        path = self.write_bytes(b"timestamp,latency_ms,response_code\r\n1764274326,5,200\r\n1764274327,6,503\r\n")
        arm, err = self.read(path)
        self.assertEqual((arm.total, arm.errors, list(arm.latencies)), (2, 1, [5.0]))
        self.assertEqual(err, "")

    def test_blank_lines_ignored(self):
        path = self.write_bytes(b"1764274326,5,200\n\n1764274327,6,200\n\n")
        arm, _ = self.read(path)
        self.assertEqual(arm.total, 2)

    def test_complete_last_line_without_newline_is_kept(self):
        path = write_csv(self.path(), [(ISO, 5, 200), (ISO, 6, 200)], newline_at_end=False)
        arm, err = self.read(path)
        self.assertEqual(arm.total, 2)
        self.assertEqual(err, "")

    def test_block_column(self):
        rows = [(ISO, 10, 200, 1), (ISO, 11, 200, 1), (ISO, 99, 503, 1), (ISO, 20, 200, 2), (ISO, 0, 0, 2)]
        arm, _ = self.read(write_csv(self.path(), rows, block=True))
        self.assertEqual(list(arm.latencies), [10.0, 11.0, 20.0])
        self.assertEqual(list(arm.blocks), [1, 1, 2])
        self.assertEqual(arm.block_totals, {1: 3, 2: 2})
        self.assertEqual(arm.block_errors, {1: 1, 2: 1})
        self.assertEqual((arm.total, arm.errors), (5, 2))

    def test_block_column_without_header(self):
        rows = [(ISO, 10, 200, 3), (ISO, 11, 200, 4)]
        arm, _ = self.read(write_csv(self.path(), rows, header=False))
        self.assertEqual(list(arm.blocks), [3, 4])

    def test_unblocked_file_has_no_blocks(self):
        arm, _ = self.read(write_csv(self.path(), self.ROWS))
        self.assertIsNone(arm.blocks)

    def test_path_recorded(self):
        path = write_csv(self.path(), self.ROWS)
        arm, _ = self.read(path)
        self.assertEqual(arm.path, path)


class TruncatedLineTests(CsvTestCase):
    def test_truncated_final_line_skipped_with_warning(self):
        path = self.path()
        with open(path, "w", newline="") as handle:
            handle.write(f"timestamp,latency_ms,response_code\n{ISO},5,200\n{ISO},6,503\n{ISO},12.")
        arm, err = self.read(path)
        self.assertEqual((arm.total, arm.errors), (2, 1))
        self.assertTrue(err.startswith("warning:"), err)
        self.assertIn(f"{path}:4", err)
        self.assertIn("truncated", err)
        self.assertEqual(len(err.strip().splitlines()), 1)

    def test_truncated_after_comma(self):
        path = self.write_bytes(b"1764274326,5,200\n1764274327,")
        arm, err = self.read(path)
        self.assertEqual(arm.total, 1)
        self.assertIn("truncated", err)

    def test_truncated_mid_timestamp(self):
        path = self.write_bytes(b"1764274326,5,200\n2026-11-2")
        arm, err = self.read(path)
        self.assertEqual(arm.total, 1)
        self.assertIn(f"{path}:2", err)

    def test_truncated_final_line_of_blocked_file(self):
        # Each row of this file carries a block; the last one was cut off just before ",1".
        path = self.write_bytes(b"1764274326,5,200,1\n1764274327,6,200,1\n1764274328,7,200")
        arm, err = self.read(path)
        self.assertEqual(arm.total, 2)
        self.assertIn("truncated", err)

    def test_bad_last_line_with_newline_is_an_error(self):
        path = self.write_bytes(b"1764274326,5,200\n1764274327,oops,200\n")
        self.assert_bad(path, 2)


class MalformedTests(CsvTestCase):
    GOOD = f"{ISO},5,200\n"

    def bad_row(self, row, line=3):
        """A file whose third line is `row` (complete, with its newline) must be rejected naming it."""
        path = self.write_bytes(("timestamp,latency_ms,response_code\n" + self.GOOD + row + "\n" + self.GOOD)
                                .encode("utf-8"))
        return self.assert_bad(path, line)

    def test_too_few_fields(self):
        self.bad_row(f"{ISO},5")

    def test_too_many_fields(self):
        self.bad_row(f"{ISO},5,200,1,extra")

    def test_empty_fields(self):
        self.bad_row(",,")

    def test_non_numeric_latency(self):
        message = self.bad_row(f"{ISO},fast,200")
        self.assertIn("latency", message)

    def test_negative_latency(self):
        self.bad_row(f"{ISO},-1.5,200")

    def test_nan_and_inf_latency(self):
        for value in ("nan", "NaN", "inf", "-inf", "Infinity"):
            with self.subTest(value=value):
                self.bad_row(f"{ISO},{value},200")

    def test_bad_code(self):
        for value in ("OK", "200.0", "-1", "1000", ""):
            with self.subTest(value=value):
                message = self.bad_row(f"{ISO},5,{value}")
                self.assertIn("response_code", message)

    def test_bad_timestamp(self):
        for value in ("yesterday", "2026-13-45T00:00:00Z", "nan", "-5", "", "2026-11-27 20:12:06Z x"):
            with self.subTest(value=value):
                message = self.bad_row(f"{value},5,200")
                self.assertIn("timestamp", message)

    def test_bad_block(self):
        self.bad_row(f"{ISO},5,200,blockA")

    def test_header_not_on_first_line(self):
        self.bad_row("timestamp,latency_ms,response_code")

    def test_block_rows_then_plain_rows(self):
        path = self.write_bytes(f"{ISO},5,200,1\n{ISO},6,200,1\n{ISO},7,200\n".encode())
        self.assert_bad(path, 3)

    def test_plain_rows_then_block_rows(self):
        path = self.write_bytes(f"{ISO},5,200\n{ISO},6,200,2\n{ISO},7,200,2\n".encode())
        self.assert_bad(path, 2)

    def test_non_utf8_names_the_file(self):
        path = self.write_bytes(b"1764274326,5,200\n1764274327,\xff\xfe,200\n")
        with self.assertRaises(smart.BadInput) as caught:
            smart.read_measurements(path)
        self.assertRegex(str(caught.exception), re.escape(path) + r":\d+:")

    def test_non_utf8_names_the_right_line(self):
        # The undecodable byte is on line 3; the message must say :3, not where decoding started.
        path = self.write_bytes(b"1764274326,5,200\n1764274327,6,200\n1764274328,7\xff,200\n1764274329,8,200\n")
        self.assert_bad(path, 3)

    def test_binary_file(self):
        path = self.write_bytes(bytes(range(256)) * 4)
        with self.assertRaises(smart.BadInput) as caught:
            smart.read_measurements(path)
        self.assertIn(path, str(caught.exception))

    def test_missing_file(self):
        path = self.path("does-not-exist.csv")
        with self.assertRaises(smart.BadInput) as caught:
            smart.read_measurements(path)
        self.assertIn(path, str(caught.exception))
        self.assertEqual(caught.exception.exit_code, 2)

    def test_directory(self):
        with self.assertRaises(smart.BadInput) as caught:
            smart.read_measurements(self.tmp)
        self.assertIn(self.tmp, str(caught.exception))

    def test_first_bad_row_is_named(self):
        path = self.write_bytes(b"1764274326,5,200\n" * 10 + b"x,1,200\n" + b"y,1,200\n")
        self.assert_bad(path, 11)


if __name__ == "__main__":
    unittest.main()
