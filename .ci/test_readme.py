"""Tests of .ci/readme.py on small synthetic READMEs (echo, printf, sleep, cat only).

Run: python3 -m unittest discover -s .ci -p 'test_*.py' -v   (or: python3 .ci/readme.py --self-test)

The parser is tested in-process; runs go through the script as a subprocess, with --workdir
pointing at a temporary directory, so no git clone is involved.
"""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import unittest
from pathlib import Path

SCRIPT = Path(__file__).resolve().with_name("readme.py")
FENCE = "```"


def load_module():
    spec = importlib.util.spec_from_file_location("readme", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["readme"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


readme = load_module()


def markdown(text: str) -> str:
    """Dedented markdown, with ~~~ standing for ``` so the tests read clearly."""
    return textwrap.dedent(text).lstrip("\n").replace("~~~", FENCE)


def line_of(text: str, needle: str) -> int:
    """The 1-based number of the line of `text` containing `needle`."""
    for number, line in enumerate(text.splitlines(), start=1):
        if needle in line:
            return number
    raise AssertionError(f"{needle!r} not in the text")


def pid_gone(pid: int) -> bool:
    """Whether `pid` no longer names a live process (zombies count as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


class ParseTest(unittest.TestCase):
    def test_marked_blocks_only_in_order(self) -> None:
        text = markdown(
            """
            # Title

            ~~~sh
            echo unmarked
            ~~~

            <!-- ci: run -->

            ~~~sh
            echo one
            echo two
            ~~~

            <!-- ci: background ready="READY on port \\d+" timeout=5 -->
            ~~~sh
            server --up
            ~~~

            ~~~bash
            echo not sh
            ~~~

            ~~~markdown
            <!-- ci: run -->
            ~~~

            <!--ci:run-->
            ~~~sh
            echo three
            ~~~
            """
        )
        blocks = readme.parse_blocks(text)
        self.assertEqual([block.kind for block in blocks], ["run", "background", "run"])
        self.assertEqual(blocks[0].lines, ("echo one", "echo two"))
        self.assertEqual(blocks[0].line, line_of(text, "echo one"))
        self.assertEqual(blocks[1].title, "server --up")
        self.assertEqual(blocks[1].timeout, 5.0)
        self.assertTrue(blocks[1].ready.search("READY on port 8080"))
        self.assertEqual(blocks[2].lines, ("echo three",))

    def test_background_timeout_defaults(self) -> None:
        text = markdown(
            """
            <!-- ci: background ready="up" -->
            ~~~sh
            server
            ~~~
            """
        )
        (block,) = readme.parse_blocks(text)
        self.assertEqual(block.timeout, readme.DEFAULT_READY_TIMEOUT)

    def test_no_marker_no_block(self) -> None:
        text = markdown(
            """
            ~~~sh
            echo a
            ~~~
            ~~~rust
            fn main() {}
            ~~~
            """
        )
        self.assertEqual(readme.parse_blocks(text), [])

    def test_marker_errors(self) -> None:
        cases = {
            "unknown": "<!-- ci: runn -->\n~~~sh\necho\n~~~\n",
            "not sh": "<!-- ci: run -->\n~~~bash\necho\n~~~\n",
            "text between": "<!-- ci: run -->\nSome text.\n~~~sh\necho\n~~~\n",
            "bad regex": '<!-- ci: background ready="(" timeout=1 -->\n~~~sh\nx\n~~~\n',
            "at the end": "text\n\n<!-- ci: run -->\n",
            "unclosed": "<!-- ci: run -->\n~~~sh\necho\n",
        }
        for name, text in cases.items():
            with self.subTest(name), self.assertRaises(readme.Failure):
                readme.parse_blocks(text.replace("~~~", FENCE))

    def test_rewrite_check_lines(self) -> None:
        line, checked = readme.rewrite_line("  echo 'a b' | cat   # => a b", 7, "")
        self.assertTrue(checked)
        self.assertEqual(
            line,
            "  __readme_out=$( echo 'a b' | cat ); __readme_check 7 \"$__readme_out\" 'a b' "
            "'echo '\"'\"'a b'\"'\"' | cat'",
        )
        for plain in ["echo hi", "echo hi # a comment", "# => comment only", "echo a#=>b"]:
            with self.subTest(plain):
                self.assertEqual(readme.rewrite_line(plain, 1, ""), (plain, False))
        # The last marker of the line counts.
        _, checked = readme.rewrite_line("echo x # => y # => z", 1, "")
        self.assertTrue(checked)
        with self.assertRaises(readme.Failure):
            readme.rewrite_line("  second part   # => x", 3, "echo first \\")


class RunTest(unittest.TestCase):
    """Runs of readme.py as a subprocess, in a temporary working directory."""

    def setUp(self) -> None:
        temp = tempfile.TemporaryDirectory(prefix="test-readme-")
        self.addCleanup(temp.cleanup)
        self.dir = Path(temp.name)
        self.work = self.dir / "work"
        self.work.mkdir()

    def run_readme(self, text: str, *extra: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
        path = self.dir / "README.md"
        path.write_text(text)
        return subprocess.run(
            [sys.executable, str(SCRIPT), "--workdir", str(self.work), *extra, str(path)],
            capture_output=True, text=True, timeout=timeout,
        )

    def assert_ok(self, result: subprocess.CompletedProcess[str]) -> None:
        self.assertEqual(result.returncode, 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}")

    def assert_failed_at(self, result: subprocess.CompletedProcess[str], line: int) -> None:
        self.assertEqual(result.returncode, 1, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}")
        self.assertEqual(result.stderr.splitlines()[-1], f"readme: FAILED at README line {line}")

    def test_expected_outputs(self) -> None:
        text = markdown(
            """
            <!-- ci: run -->
            ~~~sh
            echo hello                                # => hello
            printf 'a|b\\n' | cut -d'|' -f2            # => b
            printf 'version 1.2.3 (abc)\\n\\n  '        # => version 1.2...
            echo "it's \\"quoted\\""                    # => it's "quoted"
            echo plain # a comment, not a check
            printf '%s\\n' one \\
              two
            for i in 1 2; do
              echo "item $i"                          # => item ...
            done
            ~~~
            """
        )
        result = self.run_readme(text)
        self.assert_ok(result)
        self.assertIn(f"readme: line {line_of(text, 'echo hello')}: echo hello", result.stdout)
        self.assertIn("one\ntwo\n", result.stdout)
        self.assertEqual(result.stdout.splitlines()[-1], "readme: 1 blocks run, 6 outputs checked")

    def test_mismatch_names_line_command_and_outputs(self) -> None:
        text = markdown(
            """
            Intro.

            <!-- ci: run -->
            ~~~sh
            echo fine        # => fine
            echo actual-out  # => expected-out
            echo never-printed
            ~~~
            """
        )
        result = self.run_readme(text)
        line = line_of(text, "actual-out")
        self.assert_failed_at(result, line)
        self.assertIn(f"README line {line}: unexpected output from: echo actual-out", result.stderr)
        self.assertIn("expected: expected-out", result.stderr)
        self.assertIn("actual:   actual-out", result.stderr)
        self.assertNotIn("never-printed", result.stdout)

    def test_prefix_mismatch(self) -> None:
        text = markdown(
            """
            <!-- ci: run -->
            ~~~sh
            echo abcdef  # => abd...
            ~~~
            """
        )
        self.assert_failed_at(self.run_readme(text), line_of(text, "abcdef"))

    def test_exported_variables_carry_over(self) -> None:
        text = markdown(
            """
            <!-- ci: run -->
            ~~~sh
            mkdir -p bin
            printf '#!/bin/sh\\necho tool ran\\n' > bin/tool
            chmod +x bin/tool
            export PATH="$PWD/bin:$PATH"
            export GREETING="hello   world"
            NOT_EXPORTED=1
            cd bin
            ~~~

            <!-- ci: run -->
            ~~~sh
            tool                              # => tool ran
            echo "$GREETING"                  # => hello   world
            echo "${NOT_EXPORTED:-unset}"     # => unset
            test -x bin/tool && echo same-dir # => same-dir
            ~~~
            """
        )
        result = self.run_readme(text)
        self.assert_ok(result)
        self.assertIn("readme: 2 blocks run, 4 outputs checked", result.stdout)

    def test_failing_command_fails_the_run(self) -> None:
        text = markdown(
            """
            <!-- ci: run -->
            ~~~sh
            echo first
            for i in 1 2; do
              test "$i" = 1
            done
            echo never-printed
            ~~~

            <!-- ci: run -->
            ~~~sh
            echo next-block-never-run
            ~~~
            """
        )
        result = self.run_readme(text)
        self.assert_failed_at(result, line_of(text, 'test "$i" = 1'))
        self.assertIn("first", result.stdout)
        self.assertNotIn("never", result.stdout)

    def test_pipeline_failure_fails_the_run(self) -> None:
        text = markdown(
            """
            <!-- ci: run -->
            ~~~sh
            cat does-not-exist | cat
            ~~~
            """
        )
        self.assert_failed_at(self.run_readme(text), line_of(text, "does-not-exist"))

    def test_block_timeout(self) -> None:
        text = markdown(
            """
            <!-- ci: run -->
            ~~~sh
            sleep 30
            ~~~
            """
        )
        started = time.monotonic()
        result = self.run_readme(text, "--timeout-block", "1")
        self.assert_failed_at(result, line_of(text, "sleep 30"))
        self.assertIn("timed out", result.stderr)
        self.assertLess(time.monotonic() - started, 10)

    def test_background_waits_for_ready_and_is_stopped(self) -> None:
        text = markdown(
            """
            <!-- ci: run -->
            ~~~sh
            export SERVER_NAME=demo
            ~~~

            <!-- ci: background ready="^READY \\w+$" timeout=10 -->
            ~~~sh
            echo $$ > server.pid; sleep 60 & echo $! > child.pid; sleep 0.5; echo "READY $SERVER_NAME"; wait
            ~~~

            <!-- ci: run -->
            ~~~sh
            kill -0 "$(cat server.pid)" && echo alive   # => alive
            ~~~
            """
        )
        result = self.run_readme(text)
        self.assert_ok(result)
        self.assertRegex(result.stdout, r"ready after \d+\.\d s")
        for name in ["server.pid", "child.pid"]:
            pid = int((self.work / name).read_text())
            self.assertTrue(pid_gone(pid), f"{name}: {pid} still runs")

    def test_background_exiting_before_ready_fails(self) -> None:
        text = markdown(
            """
            <!-- ci: background ready="READY" timeout=15 -->
            ~~~sh
            echo "cannot bind"; exit 3
            ~~~
            """
        )
        started = time.monotonic()
        result = self.run_readme(text)
        self.assert_failed_at(result, line_of(text, "cannot bind"))
        self.assertIn("exited with status 3", result.stderr)
        self.assertIn("cannot bind", result.stderr)  # the log's tail
        self.assertLess(time.monotonic() - started, 5)

    def test_background_timeout_fails(self) -> None:
        text = markdown(
            """
            <!-- ci: background ready="READY" timeout=1 -->
            ~~~sh
            echo $$ > server.pid; echo starting; sleep 30
            ~~~
            """
        )
        result = self.run_readme(text)
        self.assert_failed_at(result, line_of(text, "echo starting"))
        self.assertIn("within 1 s", result.stderr)
        self.assertTrue(pid_gone(int((self.work / "server.pid").read_text())))

    def test_sigterm_stops_background(self) -> None:
        text = markdown(
            """
            <!-- ci: background ready="READY" timeout=10 -->
            ~~~sh
            echo $$ > server.pid; echo READY; sleep 60
            ~~~

            <!-- ci: run -->
            ~~~sh
            echo running-forever; sleep 60
            ~~~
            """
        )
        path = self.dir / "README.md"
        path.write_text(text)
        process = subprocess.Popen(
            [sys.executable, str(SCRIPT), "--workdir", str(self.work), str(path)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        deadline = time.monotonic() + 10
        while not (self.work / "server.pid").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1)  # into the second block's sleep
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=15)
        self.assertEqual(process.returncode, 128 + signal.SIGTERM, stderr)
        self.assertIn("interrupted", stderr)
        self.assertTrue(pid_gone(int((self.work / "server.pid").read_text())))

    def test_no_marked_block_fails(self) -> None:
        result = self.run_readme("~~~sh\necho hi\n~~~\n".replace("~~~", FENCE))
        self.assertEqual(result.returncode, 1)
        self.assertIn("no marked", result.stderr)


class StopGroupsTest(unittest.TestCase):
    def test_sigkill_after_grace(self) -> None:
        process = subprocess.Popen(
            ["bash", "-c", "trap '' TERM; sleep 30 & wait; sleep 30"], start_new_session=True
        )
        time.sleep(0.2)
        started = time.monotonic()
        readme.stop_groups([process], grace=0.5)
        self.assertLess(time.monotonic() - started, 5)
        self.assertEqual(process.returncode, -signal.SIGKILL)
        self.assertFalse(readme.group_alive(process.pid))


if __name__ == "__main__":
    unittest.main()
