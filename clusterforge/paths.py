"""Where clusterforge reads and writes: one object, resolved once, passed down.

Paths the user gives resolve against the directory the command was typed in (`./forge`
changes into the repository before it runs, and passes that directory as FORGE_CWD);
the defaults are the repository's own dist/, state/ and runs/. Everything is absolute
from here on, so any program handed a path (dnsmasq, QEMU, ssh) finds it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .log import die

REPO = Path(__file__).resolve().parent.parent
DEFAULT_INVENTORY = REPO / "examples" / "cluster.yaml"


def user_cwd() -> Path:
    return Path(os.environ.get("FORGE_CWD") or os.getcwd())


def user_path(text: str | os.PathLike[str], default: Path | None = None) -> Path:
    """A path the user typed, made absolute; the default (already absolute) when none was given."""
    if not str(text):
        assert default is not None
        return default
    return Path(os.path.normpath(user_cwd() / Path(text).expanduser()))


@dataclass(frozen=True)
class Paths:
    out: Path  # rendered trees (<out>/<cluster>/) and images (<out>/images/)
    state: Path  # secrets and records (<state>/<cluster>/)
    runs: Path  # VM run directories (<runs>/<cluster>/)

    @classmethod
    def resolve(cls, out: str = "", state: str = "", runs: str = "") -> Paths:
        paths = cls(out=user_path(out, REPO / "dist"), state=user_path(state, REPO / "state"),
                    runs=user_path(runs, REPO / "runs"))
        for name, path in vars(paths).items():
            if path.exists() and not path.is_dir():
                die(f"--{name} {path}: exists and is not a directory")
        return paths

    def rendered(self, cluster: str) -> Path:
        return self.out / cluster

    def cluster_state(self, cluster: str) -> Path:
        return self.state / cluster

    def cluster_runs(self, cluster: str) -> Path:
        return self.runs / cluster

    @property
    def images(self) -> Path:
        return self.out / "images"


def writable_dir(path: Path, what: str) -> None:
    """Create a directory the command will write into, or say clearly why it cannot."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        die(f"{path}: exists and is not a directory", hint=f"{what} must be a directory")
    except OSError as exc:
        die(f"{path}: cannot create it: {exc.strerror}", hint=f"{what} must be a writable directory")
    if not os.access(path, os.W_OK | os.X_OK):
        die(f"{path}: not writable", hint=f"{what} must be a writable directory")
