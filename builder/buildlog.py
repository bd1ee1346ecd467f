"""What the build says: short timed lines on the terminal, everything in the build log file."""

import collections
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator, Sequence

from rich.console import Console
from rich.text import Text

from builder.errors import UserError


class CommandFailed(UserError):
    """A command the build runs exited non-zero; the message carries its last lines."""


class BuildLog:
    """Terminal progress (rich) and a log file that keeps every line of every command."""

    def __init__(self, path: Path | None, console: Console | None = None):
        self.console = console or Console(stderr=True, highlight=False, soft_wrap=True)
        self.path = path
        self._file: IO[str] | None = None
        if path:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = path.open("w", buffering=1)
        self._depth = 0
        self.durations: dict[str, float] = {}  # seconds each finished step took

    def close(self) -> None:
        if self._file:
            self._file.close()
            self._file = None

    def write(self, line: str) -> None:
        """A line for the log file only."""
        if self._file:
            self._file.write(f"[{time.strftime('%H:%M:%S')}] {line.rstrip()}\n")

    def info(self, message: str) -> None:
        """A line for the terminal (rich markup) and the log file (plain text)."""
        self.console.print(f"{'  ' * self._depth}{message}")
        self.write(Text.from_markup(message).plain)

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        """Log a step's start, its end and how long it took; a failure is marked and re-raised."""
        start = time.monotonic()
        self.info(f"[bold]{name}[/bold]")
        self._depth += 1
        try:
            yield
        except BaseException:
            self._depth -= 1
            self.info(f"[red]✗[/red] {name} failed after {time.monotonic() - start:.1f} s")
            raise
        self._depth -= 1
        self.durations[name.split(":")[0]] = round(time.monotonic() - start, 1)
        self.info(f"[green]✓[/green] {name} ({time.monotonic() - start:.1f} s)")

    def run(self, argv: Sequence[str | Path], what: str, env: dict | None = None,
            cwd: Path | None = None, stdin: IO | None = None) -> None:
        """Run a command with its output going to the log; on failure raise CommandFailed.

        `what` names the command for the error line ("substage 10-system/00-boot: 00-run.sh").
        `stdin`, when given, is the command's standard input.
        """
        argv = [str(arg) for arg in argv]
        self.write("$ " + " ".join(argv))
        tail: collections.deque[str] = collections.deque(maxlen=15)
        proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            stdin=stdin or subprocess.DEVNULL, env=env, cwd=cwd, text=True, errors="replace")
        try:
            for line in proc.stdout:
                self.write(line)
                tail.append(line.rstrip())
            code = proc.wait()
        except BaseException:
            _stop(proc)
            raise
        if code != 0:
            last = " | ".join(line for line in tail if line.strip())[-600:]
            raise CommandFailed(f"{what} failed (exit {code}): {last}",
                                f"full log: {self.path}" if self.path else None)

    def output(self, argv: Sequence[str | Path], what: str, env: dict | None = None) -> str:
        """Run a command and return its standard output; failures as in `run`."""
        argv = [str(arg) for arg in argv]
        self.write("$ " + " ".join(argv))
        result = subprocess.run(argv, capture_output=True, text=True, env=env,
                                stdin=subprocess.DEVNULL)
        for line in result.stderr.splitlines():
            self.write(line)
        if result.returncode != 0:
            raise CommandFailed(f"{what} failed (exit {result.returncode}): "
                                f"{result.stderr.strip()[-600:]}")
        return result.stdout


def _stop(proc: subprocess.Popen) -> None:
    """End a child we are abandoning (Ctrl-C, an error), so nothing is left running."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
