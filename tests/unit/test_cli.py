"""The command line: ./forge tasks as a user runs them (invoke from .venv)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from .conftest import REPO, write_inventory

INVOKE = Path(sys.executable).parent / "invoke"


def forge(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": f"{INVOKE.parent}:{os.environ['PATH']}"}
    return subprocess.run([str(INVOKE), "--search-root", str(REPO), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_render_prints_summary(tmp_path: Path) -> None:
    proc = forge("render", "--out", str(tmp_path / "dist"), "--state", str(tmp_path / "state"))
    assert proc.returncode == 0, proc.stderr
    assert "cluster lab (lab.internal, debian-12)" in proc.stdout
    assert "s3       52:54:00:00:00:13" in proc.stdout
    assert (tmp_path / "dist/lab/nodes/s3/seed.iso").is_file()


def test_bad_inventory_is_a_message_not_a_traceback(tmp_path: Path) -> None:
    bad = write_inventory(tmp_path, """
        cluster:
          name: lab
          nmae: x
        """)
    proc = forge("render", "--inventory", str(bad), "--out", str(tmp_path / "dist"),
                 "--state", str(tmp_path / "state"))
    assert proc.returncode == 1
    assert f"error: {bad}:3: cluster.nmae: unknown key 'nmae'" in proc.stderr
    assert "hint: did you mean 'name'?" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "dist").exists()
