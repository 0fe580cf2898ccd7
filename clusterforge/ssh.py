"""SSH to nodes with clusterforge's own key (state/<cluster>/ssh/id_ed25519)."""

from __future__ import annotations

import functools
import os
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .run import CommandError, in_netns, run, which

OPTIONS = ("-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
           "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=5")
# One connection per node, kept for a minute and shared by the commands that follow: under
# emulation a new SSH connection costs the guest seconds (key exchange, PAM, a logind session),
# a command over a shared one a fraction of that. A master whose node stopped answering (powered
# off, cut off, paused) gives up after MUX_ALIVE and the next command connects anew.
MUX_PERSIST = 60
MUX_ALIVE = ("-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=6")
SSH_FAILED = 255  # ssh's own exit code: it never reached the command


@functools.cache
def mux_folder() -> Path:
    """Where the shared connections' sockets live: private to this user, made once per process."""
    folder = Path(tempfile.gettempdir()) / f"clusterforge-ssh-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    return folder


@dataclass(frozen=True)
class Target:
    host: str
    key: Path
    port: int = 22
    user: str = "root"
    netns: str | None = None  # reach the node from inside this network namespace

    def argv(self, command: str, tty: bool = False) -> list[str]:
        argv = [which("ssh"), *OPTIONS, *self.mux_options(), "-i", str(self.key), "-p", str(self.port)]
        argv += ["-t"] if tty else []
        argv += [f"{self.user}@{self.host}", command] if command else [f"{self.user}@{self.host}"]
        return in_netns(self.netns, argv)

    def mux_options(self) -> tuple[str, ...]:
        # Sockets named by network namespace too: two QEMU clusters may use the same addresses.
        path = mux_folder() / f"{self.netns or 'direct'}-%C"
        return ("-o", "ControlMaster=auto", "-o", f"ControlPath={path}", "-o", f"ControlPersist={MUX_PERSIST}",
                *MUX_ALIVE)

    def run(self, command: str, check: bool = True, timeout: float = 120,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        return run(self.argv(command), check=check, timeout=timeout, input=input)

    def wait(self, timeout: float, command: str = "true",
             command_timeout: float = 15) -> subprocess.CompletedProcess[str]:
        """Run command once the node accepts our key, or TimeoutError. Only ssh's own failures
        (exit 255: refused, no route, a banner that did not come) and a try that timed out are
        tried again; a failing command raises at once."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            try:
                return self.run(command, timeout=command_timeout)
            except CommandError as exc:
                if exc.code not in (SSH_FAILED, None):
                    raise
                last = str(exc)
            time.sleep(2)  # sshd not up yet, or too busy to answer: nothing to wait on but the next attempt
        raise TimeoutError(f"ssh {self.user}@{self.host}:{self.port} not reachable in {timeout:.0f}s: {last}")
