"""A throwaway redis-server on 127.0.0.1, for tests and benchmarks that need a real one."""

import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def accepts_connections(port: int) -> bool:
    """True when something accepts TCP connections on 127.0.0.1:`port`."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


class LocalRedisServer:
    """Debian's redis-server in the foreground, given its whole command line.

    `arguments` follow `redis-server` (a config file and/or `--directive value` pairs) and must
    make it listen on 127.0.0.1:`port` and keep its files inside `workdir`, where its log goes.
    """

    def __init__(self, workdir: Path, port: int, arguments: list[str]):
        self.workdir = workdir
        self.port = port
        self.arguments = arguments
        self.log_path = workdir / "redis-server.out"
        self._process: subprocess.Popen | None = None

    def start(self, timeout: float = 10.0) -> "LocalRedisServer":
        """Start it and wait until it accepts connections; raise with its output if it can't."""
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (Debian package redis-server)")
        with open(self.log_path, "ab") as output:
            self._process = subprocess.Popen([binary, *self.arguments], cwd=self.workdir,
                                             stdout=output, stderr=subprocess.STDOUT)

        deadline = time.monotonic() + timeout
        while not accepts_connections(self.port):
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not start on port {self.port}:\n"
                                   + self.output())
            time.sleep(0.02)
        return self

    def stop(self) -> int | None:
        """Shut it down as systemd would (SIGTERM) and return its exit status."""
        if self._process is None:
            return None
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        status = self._process.returncode
        self._process = None
        return status

    def output(self) -> str:
        """What redis-server has printed so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> "LocalRedisServer":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
