"""SSH to nodes with clusterforge's own key (state/<cluster>/ssh/id_ed25519)."""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from .run import CommandError, run, which

OPTIONS = ("-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
           "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=5")


@dataclass(frozen=True)
class Target:
    host: str
    key: Path
    port: int = 22
    user: str = "root"
    netns: str | None = None  # reach the node from inside this network namespace

    def argv(self, command: str, tty: bool = False) -> list[str]:
        argv = [which("ssh"), *OPTIONS, "-i", str(self.key), "-p", str(self.port)]
        argv += ["-t"] if tty else []
        argv += [f"{self.user}@{self.host}", command] if command else [f"{self.user}@{self.host}"]
        return [which("ip"), "netns", "exec", self.netns, *argv] if self.netns else argv

    def run(self, command: str, check: bool = True, timeout: float = 120,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        return run(self.argv(command), check=check, timeout=timeout, input=input)

    def wait(self, timeout: float) -> None:
        """Until the node accepts our key, or timeout."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            try:
                self.run("true", timeout=15)
                return
            except CommandError as exc:
                last = str(exc)
            time.sleep(2)  # sshd not up yet: nothing to wait on but the next attempt
        raise TimeoutError(f"ssh {self.user}@{self.host}:{self.port} not reachable in {timeout:.0f}s: {last}")
