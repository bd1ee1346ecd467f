"""A booted image under qemu-system-aarch64, and the verbs tests use to talk to it.

The guest runs on a copy of the image (the image itself is never touched) with the kernel and
initrd taken from the image's own boot partition. Its network is QEMU user networking with
`restrict=on`: the guest reaches nothing outside, and the host reaches the guest only through
the forwards below, all on 127.0.0.1. A guest forward makes one address of the guest's network
lead to a port on the host's loopback (a stub gateway, say), one socat per connection.
"""

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import paramiko

from builder import bootpart
from builder.errors import UserError
from builder.hosttools import BOOT_TOOLS, require_tools


class MachineError(AssertionError):
    """A guest did not do what a test asked; the message names the machine and the command."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kernel_and_initrd(image: Path) -> tuple[str, str]:
    """The kernel and initramfs the Raspberry Pi firmware would load, named in config.txt."""
    kernel = initrd = None
    for line in bootpart.read_boot_file(image, "config.txt").decode().splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith("kernel="):
            kernel = line.split("=", 1)[1].strip()
        elif line.startswith("initramfs "):
            initrd = line.split()[1]
    if not kernel or not initrd:
        raise UserError(f"{image}: config.txt names no kernel or no initramfs")
    return kernel, initrd


def guest_cmdline(image: Path) -> str:
    """cmdline.txt as the card has it, with the console moved to the virt machine's UART."""
    words = bootpart.read_boot_file(image, "cmdline.txt").decode().split()
    return " ".join([w for w in words if not w.startswith("console=")] + ["console=ttyAMA0"])


@dataclass
class Machine:
    """One guest. Use as a context manager: leaving it stops QEMU and removes its files."""

    image: Path
    name: str = "node"
    memory_mib: int = 1024
    cpus: int = 2
    identity: dict[str, bytes] = field(default_factory=dict)
    guest_forwards: list[tuple[str, int, int]] = field(default_factory=list)
    forward_ports: list[int] = field(default_factory=list)
    network: str | None = None
    user: str = "okome"
    serial_to_terminal: bool = False
    work_dir: Path | None = None
    # A flashed card boots with the identity `flash` wrote: keep_identity leaves the copy's
    # okome/ as it is, ssh_key is a private key its authorized_keys accept, and guest_address
    # is its static address, where the forwards must lead (QEMU's default is the address its
    # DHCP would hand out).
    keep_identity: bool = False
    # Room beyond the image, as on a card bigger than the image: the root grows into it.
    extra_disk_mib: int = 1024
    ssh_key: Path | None = None
    guest_address: str | None = None
    # More QEMU arguments (a second NIC, say) and the descriptors they name (a tap's, opened
    # by the caller in the namespace the tap lives in); QEMU inherits only these.
    extra_qemu_args: list[str] = field(default_factory=list)
    pass_fds: tuple[int, ...] = ()
    # QEMU in a session of its own, so it outlives the command that started it (`lab up`).
    detach: bool = False

    def __post_init__(self):
        self.process: subprocess.Popen | None = None
        self.host_ports: dict[int, int] = {}
        self._ssh: paramiko.SSHClient | None = None
        self._own_work_dir = self.work_dir is None

    # -- life cycle -------------------------------------------------------------------------

    def __enter__(self) -> "Machine":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def console_log(self) -> Path:
        return self.work_dir / "console.log"

    @property
    def key_path(self) -> Path:
        return self.ssh_key or self.work_dir / "id_ed25519"

    def start(self) -> None:
        """Copy the image, write the identity onto the copy, start QEMU."""
        require_tools(BOOT_TOOLS)
        if self.guest_forwards:
            require_tools({"socat": "socat"})
        if not self.image.is_file():
            raise UserError(f"{self.image}: no such image", "build it first: okome-image build")
        bootpart.read_boot_file(self.image, "config.txt")  # not an image: said before copying
        if self.work_dir is None:
            self.work_dir = Path(tempfile.mkdtemp(prefix=f"okome-boot-{self.name}-"))
        disk = self.work_dir / "disk.img"
        subprocess.run(["cp", "--sparse=always", "--reflink=auto", str(self.image), str(disk)],
                       check=True)
        os.truncate(disk, disk.stat().st_size + self.extra_disk_mib * 2**20)

        if self.ssh_key is None:
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C",
                            f"okome-image throwaway key for {self.name}", "-f",
                            str(self.key_path)], check=True)
        if not self.keep_identity:
            identity = {"hostname": self.name.encode() + b"\n",
                        "authorized_keys": self.key_path.with_suffix(".pub").read_bytes(),
                        **self.identity}
            bootpart.write_boot_files(disk, "okome", identity, self.work_dir)

        kernel, initrd = kernel_and_initrd(disk)
        bootpart.copy_boot_file(disk, kernel, self.work_dir / "kernel")
        bootpart.copy_boot_file(disk, initrd, self.work_dir / "initrd")
        self.host_ports = {port: free_port() for port in [22, *self.forward_ports]}
        self.launch()

    @property
    def disk(self) -> Path:
        return self.work_dir / "disk.img"

    @property
    def qmp_socket(self) -> Path:
        return self.work_dir / "qmp.sock"

    def launch(self) -> None:
        """Start QEMU on the prepared disk: at first boot, or again after a crash.

        A detached QEMU writes what it says to qemu.log in the work folder: holding the
        starting command's output open would keep whoever reads it (a pipe, `tee`) waiting
        for as long as the guest runs."""
        self._ssh = None
        output = (self.work_dir / "qemu.log").open("ab") if self.detach else None
        try:
            self.process = subprocess.Popen(
                self.qemu_argv(self.disk, guest_cmdline(self.disk)),
                stdin=None if self.serial_to_terminal else subprocess.DEVNULL,
                stdout=output, stderr=output, pass_fds=self.pass_fds,
                start_new_session=self.detach)
        finally:
            if output:
                output.close()

    def qemu_argv(self, disk: Path, cmdline: str) -> list[str]:
        netdev = "user,id=net0,restrict=on"
        if self.network:
            netdev += f",net={self.network}"
        for guest_port, host_port in self.host_ports.items():
            guest = self.guest_address or ""
            netdev += f",hostfwd=tcp:127.0.0.1:{host_port}-{guest}:{guest_port}"
        for guest_address, guest_port, host_port in self.guest_forwards:
            netdev += (f",guestfwd=tcp:{guest_address}:{guest_port}"
                       f"-cmd:socat - TCP:127.0.0.1:{host_port}")
        serial = "mon:stdio" if self.serial_to_terminal else f"file:{self.console_log}"
        return [
            "qemu-system-aarch64", "-M", "virt", "-cpu", "cortex-a72",
            "-smp", str(self.cpus), "-m", str(self.memory_mib),
            "-kernel", str(self.work_dir / "kernel"), "-initrd", str(self.work_dir / "initrd"),
            "-append", cmdline,
            "-drive", f"if=none,id=disk,format=raw,cache=unsafe,file={disk}",
            "-device", "virtio-blk-pci,drive=disk",
            # romfile=: no PXE option ROM (the kernel is given), so no ipxe-qemu is needed
            "-netdev", netdev, "-device", "virtio-net-pci,netdev=net0,romfile=",
            "-device", "virtio-rng-pci",
            "-display", "none", "-serial", serial, "-no-reboot",
            "-qmp", f"unix:{self.qmp_socket},server=on,wait=off",
            *self.extra_qemu_args,
        ]

    def stop(self) -> None:
        """Stop QEMU (it is only a copy, so no clean shutdown is needed) and remove files."""
        if self._ssh:
            self._ssh.close()
            self._ssh = None
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._own_work_dir and self.work_dir:
            shutil.rmtree(self.work_dir, ignore_errors=True)

    @property
    def ssh_port(self) -> int:
        return self.host_ports[22]

    def console_tail(self, lines: int = 30) -> str:
        try:
            text = self.console_log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    # -- faults -----------------------------------------------------------------------------

    def qmp(self, command: str, **arguments) -> dict:
        """One command on QEMU's machine protocol socket; returns its answer's `return`."""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(10)
            sock.connect(str(self.qmp_socket))
            stream = sock.makefile("rwb")
            json.loads(stream.readline())  # the greeting
            for request in ({"execute": "qmp_capabilities"},
                            {"execute": command, "arguments": arguments}):
                stream.write(json.dumps(request).encode() + b"\n")
                stream.flush()
                while True:
                    answer = json.loads(stream.readline())
                    if "event" not in answer:
                        break
                if "error" in answer:
                    raise MachineError(f"{self.name}: QEMU refused {command}: "
                                       f"{answer['error'].get('desc')}")
            return answer.get("return", {})

    def set_link(self, netdev: str, up: bool) -> None:
        """Plug or unplug the cable of one NIC: the guest sees its carrier go and come."""
        self.qmp("set_link", name=netdev, up=up)

    def crash(self) -> None:
        """Pull the plug: QEMU is killed at once, the guest gets no chance to shut down."""
        if self._ssh:
            self._ssh.close()
            self._ssh = None
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    # -- the test vocabulary ----------------------------------------------------------------

    def wait_for_ssh(self, timeout: float = 300) -> float:
        """Block until the admin user can log in with the throwaway key; returns the seconds."""
        started = time.monotonic()
        deadline = started + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise MachineError(f"{self.name}: QEMU exited ({self.process.returncode}) "
                                   f"before SSH came up; console:\n{self.console_tail()}")
            if not self._ssh_banner_ready():
                time.sleep(1)
                continue
            client = paramiko.SSHClient()
            client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
            try:
                client.connect("127.0.0.1", port=self.ssh_port, username=self.user,
                               key_filename=str(self.key_path), timeout=5, banner_timeout=10,
                               auth_timeout=10, allow_agent=False, look_for_keys=False)
                self._ssh = client
                return time.monotonic() - started
            except (OSError, paramiko.SSHException):
                client.close()
                time.sleep(1)
        raise MachineError(f"{self.name}: no SSH after {timeout:.0f} s; console:\n"
                           f"{self.console_tail()}")

    def _ssh_banner_ready(self) -> bool:
        """Whether sshd answers: QEMU accepts on the forward even before the guest listens."""
        try:
            with socket.create_connection(("127.0.0.1", self.ssh_port), timeout=5) as sock:
                return sock.recv(4).startswith(b"SSH-")
        except OSError:
            return False

    def execute(self, command: str, timeout: float = 120) -> tuple[int, str]:
        """Run a shell command as root (through sudo); returns exit status and output."""
        if self._ssh is None:
            self.wait_for_ssh()
        wrapped = f"sudo -n sh -c {shlex.quote(command)} 2>&1"
        _, stdout, _ = self._ssh.exec_command(wrapped, timeout=timeout)
        output = stdout.read().decode(errors="replace")
        return stdout.channel.recv_exit_status(), output

    def succeed(self, command: str, timeout: float = 120) -> str:
        """Run a command that must succeed; returns its output."""
        status, output = self.execute(command, timeout)
        if status != 0:
            raise MachineError(f"{self.name}: `{command}` failed ({status}):\n{output}")
        return output

    def fail(self, command: str, timeout: float = 120) -> str:
        """Run a command that must fail; returns its output."""
        status, output = self.execute(command, timeout)
        if status == 0:
            raise MachineError(f"{self.name}: `{command}` succeeded but should fail:\n{output}")
        return output

    def wait_until_succeeds(self, command: str, timeout: float = 120) -> str:
        """Retry a command each second until it succeeds."""
        deadline = time.monotonic() + timeout
        while True:
            status, output = self.execute(command)
            if status == 0:
                return output
            if time.monotonic() > deadline:
                raise MachineError(f"{self.name}: `{command}` still failing after "
                                   f"{timeout:.0f} s:\n{output}")
            time.sleep(1)

    def wait_for_unit(self, unit: str, timeout: float = 120) -> None:
        """Wait until a unit is active; fail at once if it failed."""
        deadline = time.monotonic() + timeout
        while True:
            state = self.execute(f"systemctl is-active {shlex.quote(unit)}")[1].strip()
            if state == "active":
                return
            if state == "failed" or time.monotonic() > deadline:
                status = self.execute(f"systemctl status --no-pager {shlex.quote(unit)}")[1]
                raise MachineError(f"{self.name}: unit {unit} is {state}:\n{status}")
            time.sleep(1)

    def wait_for_running(self, timeout: float = 300) -> str:
        """Wait for boot to finish; returns systemd's state: `running` means no failed unit."""
        output = self.execute(f"timeout {int(timeout)} systemctl is-system-running --wait",
                              timeout=timeout + 10)[1].strip()
        return output.splitlines()[-1] if output else ""

    def testinfra_host(self):
        """A pytest-testinfra host for this guest, connected over the SSH forward."""
        import testinfra

        return testinfra.get_host(
            f"paramiko://{self.user}@127.0.0.1:{self.ssh_port}",
            ssh_identity_file=str(self.key_path), sudo=True)
