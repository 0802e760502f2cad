#!/usr/bin/env python3
"""Run the README's marked shell blocks, verbatim, on a fresh clone, and check their outputs.

Why: the README's quick start is the first thing a reader runs. CI runs it the same way, on a
fresh clone of the repository, so the README cannot drift from the code: a renamed flag, a
changed output or a missing build step fails CI instead of the reader.

Which blocks run
----------------
Only fenced blocks whose opening fence is exactly ```sh and whose previous non-blank line is a
marker comment (invisible on GitHub). Every other block is documentation only. Blocks run in
document order.

    <!-- ci: run -->
        Run the block in the foreground. Any failing command fails the run (the block runs as
        one `bash -euo pipefail` script).

    <!-- ci: background ready="REGEX" timeout=SECONDS -->
        The block is one long-running command (`cargo run --release -- up`). Start it in the
        background in a process group of its own, with its stdout and stderr in a log file, and
        go on once a line of that log matches REGEX (Python `re.search`; it cannot contain a
        double quote). Fail if it exits first or SECONDS (default 600) pass. At the end of the
        run, whatever its outcome, every background group gets SIGTERM, then SIGKILL 20 s later.

A `<!-- ci: ... -->` marker that is not one of these, or that is not followed by a ```sh block,
is an error: a misspelt marker must not silently skip a block.

Expected outputs
----------------
In a foreground block, a line

    COMMAND   # => EXPECTED

runs COMMAND, takes its stdout without trailing whitespace and compares it with EXPECTED
(stripped). An EXPECTED ending in `...` only needs to be a prefix of the output. A mismatch
fails the run, naming the README line, the command, and both outputs. Rules:

* the marker is the LAST ` # => ` of the line (one space or more before `#`), so it must not
  appear inside COMMAND itself, nor in a heredoc's text;
* COMMAND must fit on one line: no `\\` continuation into or out of a checked line;
* a line that is only a comment (`# note # => x`) is left alone, as are plain `# comments`.

How blocks run
--------------
The current directory is the clone (`--workdir DIR` instead: run there, no clone). The shell
state does not carry from one block to the next (a `cd` ends with its block), except exported
variables: each block ends by saving `export -p` and the next block sources it, so
`export PATH="$PWD/target/release:$PATH"` in one block makes `squall` found in the next.
Aliases do not carry over (and bash does not expand them in scripts): export PATH instead.
Lines continued with `\\` and multi-line loops are kept as they are.

The clone is of the repository's committed HEAD (`git clone`), not of the working tree; the
README itself is read from the path given. The clone's `target` is a symbolic link to the
repository's own `target`, so CI builds once; `../shared` (the SqueezeNet model) is linked next
to the clone when it exists.

Usage
-----
    python3 .ci/readme.py [--repo DIR] [--workdir DIR] [--keep] [--timeout-block S] README.md
    python3 .ci/readme.py --self-test        # the unit tests in .ci/test_readme.py

Exit status: 0 when every block ran and every output matched, 1 otherwise (the last line then
says `readme: FAILED at README line N`), 128 + signal number when interrupted.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

RUN_MARKER = re.compile(r"<!--\s*ci:\s*run\s*-->")
BACKGROUND_MARKER = re.compile(
    r'<!--\s*ci:\s*background\s+ready="(?P<ready>[^"]*)"'
    r"(?:\s+timeout=(?P<timeout>\d+(?:\.\d+)?))?\s*-->"
)
ANY_MARKER = re.compile(r"<!--\s*ci:")
FENCE = re.compile(r" {0,3}(?P<ticks>`{3,})(?P<info>.*)")
# The last " # => " of a line: greedy COMMAND, then the marker followed by a blank or the end.
CHECK = re.compile(r"(?P<indent>[ \t]*)(?P<command>.*\S)[ \t]+# =>(?P<expected>(?:[ \t].*)?)")

DEFAULT_READY_TIMEOUT = 600.0
DEFAULT_BLOCK_TIMEOUT = 1800.0
STOP_GRACE = 20.0  # seconds between SIGTERM and SIGKILL for background groups
POLL = 0.2  # seconds between two looks at a background log
LOG_TAIL = 50  # lines of a background log shown on failure
# Exported by bash itself or read-only: saving them would make the next block lie about them.
NOT_CARRIED = "PWD OLDPWD SHLVL _ SHELLOPTS BASHOPTS"


class Failure(Exception):
    """The run fails at a README line, for a reason."""

    def __init__(self, line: int, reason: str) -> None:
        super().__init__(f"README line {line}: {reason}")
        self.line = line
        self.reason = reason


class Terminated(Exception):
    """SIGTERM arrived: unwind so that background processes are stopped."""


@dataclass(frozen=True)
class Block:
    """A marked ```sh block: `line` is the README line of its first line of code."""

    kind: str  # "run" or "background"
    line: int
    lines: tuple[str, ...]
    ready: re.Pattern[str] | None = None
    timeout: float = DEFAULT_READY_TIMEOUT

    @property
    def title(self) -> str:
        return next((text.strip() for text in self.lines if text.strip()), "")


# --- Reading the README ---------------------------------------------------------------------


def parse_marker(text: str, line: int) -> Block | None:
    """The block kind and settings a marker line asks for (lines empty), or None if no marker."""
    stripped = text.strip()
    if RUN_MARKER.fullmatch(stripped):
        return Block("run", line, ())
    found = BACKGROUND_MARKER.fullmatch(stripped)
    if found:
        try:
            ready = re.compile(found["ready"])
        except re.error as error:
            raise Failure(line, f"bad ready regex {found['ready']!r}: {error}") from None
        timeout = float(found["timeout"] or DEFAULT_READY_TIMEOUT)
        return Block("background", line, (), ready, timeout)
    if ANY_MARKER.match(stripped):
        raise Failure(line, f"unknown ci marker: {stripped}")
    return None


def parse_blocks(text: str) -> list[Block]:
    """The marked ```sh blocks of a markdown text, in document order."""
    lines = text.splitlines()
    blocks: list[Block] = []
    pending: Block | None = None  # a marker waiting for its block
    index = 0
    while index < len(lines):
        line = lines[index]
        fence = FENCE.fullmatch(line.rstrip())
        if fence:
            end = closing_fence(lines, index, len(fence["ticks"]))
            if pending and line.rstrip() == "```sh":
                code = tuple(lines[index + 1 : end])
                blocks.append(Block(pending.kind, index + 2, code, pending.ready, pending.timeout))
            elif pending:
                raise Failure(pending.line, "ci marker not followed by a ```sh block")
            pending = None
            index = end + 1
            continue
        if line.strip():
            if pending:
                raise Failure(pending.line, "ci marker not followed by a ```sh block")
            marker = parse_marker(line, index + 1)
            pending = marker
        index += 1
    if pending:
        raise Failure(pending.line, "ci marker not followed by a ```sh block")
    return blocks


def closing_fence(lines: Sequence[str], start: int, ticks: int) -> int:
    """The index of the line closing the fence opened at `start`."""
    for index in range(start + 1, len(lines)):
        stripped = lines[index].strip()
        if len(stripped) >= ticks and stripped == "`" * len(stripped):
            return index
    raise Failure(start + 1, "code block never closed")


# --- Writing the scripts --------------------------------------------------------------------


@dataclass(frozen=True)
class StateFiles:
    """Files shared by the generated scripts and this runner."""

    env: Path  # `export -p` of the last successful block
    checks: Path  # one line per output that matched
    directory: Path  # scripts, failure notes and logs

    def failure_note(self, block: Block) -> Path:
        return self.directory / f"failed-{block.line}"


def rewrite_line(text: str, readme_line: int, previous: str) -> tuple[str, bool]:
    """The line to run for a README line, and whether it checks an output."""
    found = CHECK.fullmatch(text)
    if not found or found["command"].lstrip().startswith("#"):
        return text, False
    if previous.rstrip().endswith("\\"):
        raise Failure(readme_line, "an output check must be a single line, not a continuation")
    command = found["command"].strip()
    expected = found["expected"].strip()
    return (
        f"{found['indent']}__readme_out=$( {command} ); "
        f"__readme_check {readme_line} \"$__readme_out\" {shlex.quote(expected)} "
        f"{shlex.quote(command)}",
        True,
    )


def check_helpers(state: StateFiles, block: Block) -> str:
    """Bash functions for output checks and for noting the line where the block failed."""
    note = shlex.quote(str(state.failure_note(block)))
    checks = shlex.quote(str(state.checks))
    return f"""\
__readme_check() {{
  local line=$1 actual=$2 expected=$3 command=$4
  actual=${{actual%"${{actual##*[![:space:]]}}"}}
  if [[ $expected == *... ]]; then
    if [[ $actual == "${{expected%...}}"* ]]; then echo "$line" >> {checks}; return 0; fi
  elif [[ $actual == "$expected" ]]; then
    echo "$line" >> {checks}; return 0
  fi
  {{
    printf 'readme: README line %s: unexpected output from: %s\\n' "$line" "$command"
    printf '  expected: %s\\n' "$expected"
    printf '  actual:   %s\\n' "${{actual//$'\\n'/$'\\n'            }}"
  }} >&2
  [ -s {note} ] || echo "readme $line" > {note}
  exit 1
}}
__readme_failed() {{ [ -s {note} ] || echo "script $1" > {note}; }}
trap '__readme_failed "$LINENO"' ERR
"""


def source_env(state: StateFiles) -> str:
    env = shlex.quote(str(state.env))
    return f"if [ -f {env} ]; then source {env}; fi\n"


def foreground_script(block: Block, state: StateFiles) -> tuple[str, int]:
    """The script for a foreground block, and how many lines come before the block's code."""
    preamble = check_helpers(state, block) + source_env(state)
    body: list[str] = []
    previous = ""
    for offset, text in enumerate(block.lines):
        line, _ = rewrite_line(text, block.line + offset, previous)
        body.append(line)
        previous = text
    trailer = f"\nexport -n {NOT_CARRIED}\nexport -p > {shlex.quote(str(state.env))}\n"
    return preamble + "\n".join(body) + trailer, preamble.count("\n")


def background_script(block: Block, state: StateFiles) -> str:
    for offset, text in enumerate(block.lines):
        if rewrite_line(text, block.line + offset, "")[1]:
            raise Failure(block.line + offset, "no output checks in a background block")
    return source_env(state) + "\n".join(block.lines) + "\n"


# --- Processes ------------------------------------------------------------------------------


def start_group(script: Path, cwd: Path, log: Path | None = None) -> subprocess.Popen[bytes]:
    """Run `bash -euo pipefail script` in a new session, hence a process group of its own."""
    output = open(log, "wb") if log else None
    try:
        return subprocess.Popen(
            ["bash", "-euo", "pipefail", str(script)],
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT if output else None,
            start_new_session=True,
        )
    finally:
        if output:
            output.close()


def group_alive(pgid: int) -> bool:
    """Whether a process group still has a member that is not a zombie."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    proc = Path("/proc")
    if not proc.is_dir():
        return True
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        if fields[0] != "Z" and int(fields[2]) == pgid:
            return True
    return False


def signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def stop_groups(processes: Sequence[subprocess.Popen[bytes]], grace: float) -> None:
    """SIGTERM each process's group, wait up to `grace` seconds for all, then SIGKILL."""
    for process in processes:
        signal_group(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    alive = list(processes)
    while alive and time.monotonic() < deadline:
        for process in alive:
            process.poll()  # reap the leader, or it stays a zombie
        alive = [process for process in alive if group_alive(process.pid)]
        if alive:
            time.sleep(0.1)
    for process in alive:
        signal_group(process.pid, signal.SIGKILL)
    for process in processes:
        process.wait()


class LogWatcher:
    """Reads a growing log, line by line, looking for a pattern."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.partial = b""  # the last line, while it has no newline yet

    def saw(self, pattern: re.Pattern[str]) -> bool:
        with open(self.path, "rb") as log:
            log.seek(self.offset)
            data = log.read()
        self.offset += len(data)
        *lines, self.partial = (self.partial + data).split(b"\n")
        return any(pattern.search(line.decode(errors="replace")) for line in lines + [self.partial])


def tail(path: Path, count: int = LOG_TAIL) -> str:
    lines = path.read_bytes().decode(errors="replace").splitlines()
    return "\n".join(lines[-count:])


# --- Running the blocks ---------------------------------------------------------------------


class Runner:
    """Runs blocks in order in `cwd`, and owns the background processes they start."""

    def __init__(self, cwd: Path, state: StateFiles, block_timeout: float) -> None:
        self.cwd = cwd
        self.state = state
        self.block_timeout = block_timeout
        self.background: list[tuple[Block, subprocess.Popen[bytes], Path]] = []

    def run(self, block: Block) -> None:
        kind = " (background)" if block.kind == "background" else ""
        print(f"readme: line {block.line}: {block.title}{kind}", flush=True)
        if block.kind == "background":
            self.run_background(block)
        else:
            self.run_foreground(block)

    def run_foreground(self, block: Block) -> None:
        text, preamble_lines = foreground_script(block, self.state)
        script = self.write(block, text)
        process = start_group(script, self.cwd)
        try:
            status = process.wait(timeout=self.block_timeout)
        except subprocess.TimeoutExpired:
            raise Failure(block.line, f"block timed out after {self.block_timeout:g} s") from None
        finally:
            stop_groups([process], grace=5)  # on timeout, interrupt, or what it left running
        if status != 0:
            line = self.failed_line(block, preamble_lines)
            raise Failure(line, f"exit status {status}")

    def failed_line(self, block: Block, preamble_lines: int) -> int:
        """The README line the failing script noted, else the block's first line."""
        note = self.state.failure_note(block)
        if not note.exists():
            return block.line
        where, number = note.read_text().split()
        if where == "readme":
            return int(number)
        offset = int(number) - preamble_lines - 1
        return block.line + offset if 0 <= offset < len(block.lines) else block.line

    def run_background(self, block: Block) -> None:
        assert block.ready is not None
        script = self.write(block, background_script(block, self.state))
        log = self.state.directory / f"background-{block.line}.log"
        process = start_group(script, self.cwd, log)
        self.background.append((block, process, log))
        print(f"readme: line {block.line}: log in {log}", flush=True)
        started = time.monotonic()
        self.wait_ready(block, process, log)
        print(f"readme: line {block.line}: ready after {time.monotonic() - started:.1f} s",
              flush=True)

    def wait_ready(self, block: Block, process: subprocess.Popen[bytes], log: Path) -> None:
        assert block.ready is not None
        watcher = LogWatcher(log)
        deadline = time.monotonic() + block.timeout
        wanted = f"a line matching /{block.ready.pattern}/"
        while not watcher.saw(block.ready):
            if process.poll() is not None:
                if watcher.saw(block.ready):
                    return
                raise Failure(block.line, f"exited with status {process.returncode} before {wanted}")
            if time.monotonic() >= deadline:
                raise Failure(block.line, f"no {wanted} within {block.timeout:g} s")
            time.sleep(POLL)

    def write(self, block: Block, text: str) -> Path:
        script = self.state.directory / f"block-{block.line}.sh"
        script.write_text(text)
        return script

    def show_logs(self) -> None:
        for block, _, log in self.background:
            print(f"readme: last {LOG_TAIL} lines of {log} (README line {block.line}):",
                  file=sys.stderr)
            print(tail(log), file=sys.stderr, flush=True)

    def stop(self) -> None:
        stop_groups([process for _, process, _ in self.background], STOP_GRACE)

    def checks(self) -> int:
        if not self.state.checks.exists():
            return 0
        return len(self.state.checks.read_text().splitlines())


# --- The fresh directory --------------------------------------------------------------------


def git_toplevel(directory: Path) -> Path:
    result = subprocess.run(
        ["git", "-C", str(directory), "rev-parse", "--show-toplevel"],
        capture_output=True, text=True, check=False,
    )
    if result.returncode != 0:
        raise SystemExit(f"readme: {directory} is not in a git repository; pass --repo")
    return Path(result.stdout.strip())


def fresh_clone(repo: Path, temp: Path) -> Path:
    """Clone `repo` into temp/squall, sharing repo/target and linking ../shared."""
    clone = temp / "squall"
    cloned = subprocess.run(["git", "clone", "--quiet", "--no-hardlinks", str(repo), str(clone)])
    if cloned.returncode != 0:
        raise SystemExit(f"readme: git clone of {repo} failed")
    target = repo / "target"
    target.mkdir(exist_ok=True)
    (clone / "target").symlink_to(target.resolve(), target_is_directory=True)
    shared = repo.parent / "shared"
    if shared.exists():
        (temp / "shared").symlink_to(shared.resolve(), target_is_directory=True)
    return clone


# --- Main -----------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Run the README's marked ```sh blocks and check their outputs.",
        epilog="See the module docstring for the marker syntax.",
    )
    parser.add_argument("readme", nargs="?", type=Path, help="the markdown file (README.md)")
    parser.add_argument("--repo", type=Path, help="repository to clone (default: README's)")
    parser.add_argument("--workdir", type=Path, help="run in DIR, without cloning")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--timeout-block", type=float, default=DEFAULT_BLOCK_TIMEOUT,
                        metavar="SECONDS", help="time limit of a foreground block (1800)")
    parser.add_argument("--self-test", action="store_true", help="run .ci/test_readme.py")
    args = parser.parse_args(argv)
    if not args.self_test and args.readme is None:
        parser.error("README is required")
    return args


def self_test() -> int:
    import unittest

    here = Path(__file__).resolve().parent
    suite = unittest.defaultTestLoader.discover(str(here), pattern="test_readme.py")
    result = unittest.TextTestRunner(verbosity=2).run(suite)
    return 0 if result.wasSuccessful() else 1


def on_sigterm(signum: int, frame: object) -> None:
    raise Terminated()


def run_all(blocks: Sequence[Block], runner: Runner) -> int:
    """Run every block; the exit status."""
    try:
        for block in blocks:
            runner.run(block)
    except Failure as failure:
        print(f"readme: {failure}", file=sys.stderr)
        runner.show_logs()
        print(f"readme: FAILED at README line {failure.line}", file=sys.stderr, flush=True)
        return 1
    print(f"readme: {len(blocks)} blocks run, {runner.checks()} outputs checked", flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.self_test:
        return self_test()
    readme: Path = args.readme.resolve()
    try:
        blocks = parse_blocks(readme.read_text())
    except Failure as failure:
        print(f"readme: {failure}\nreadme: FAILED at README line {failure.line}", file=sys.stderr)
        return 1
    if not blocks:
        print(f"readme: no marked ```sh block in {readme}", file=sys.stderr)
        return 1

    temp = Path(tempfile.mkdtemp(prefix="readme-"))
    signal.signal(signal.SIGTERM, on_sigterm)
    runner: Runner | None = None
    try:
        if args.workdir:
            cwd = args.workdir.resolve()
        else:
            cwd = fresh_clone((args.repo or git_toplevel(readme.parent)).resolve(), temp)
        state_dir = temp / "state"
        state_dir.mkdir()
        state = StateFiles(state_dir / "env.sh", state_dir / "checks", state_dir)
        runner = Runner(cwd, state, args.timeout_block)
        return run_all(blocks, runner)
    except (KeyboardInterrupt, Terminated) as stop:
        print("readme: interrupted", file=sys.stderr, flush=True)
        return 128 + (signal.SIGINT if isinstance(stop, KeyboardInterrupt) else signal.SIGTERM)
    finally:
        # No second interrupt half-way through stopping the servers and removing the clone.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if runner:
            runner.stop()
        if args.keep:
            print(f"readme: kept {temp}", flush=True)
        else:
            shutil.rmtree(temp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
