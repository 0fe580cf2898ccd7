"""clusterforge tasks: `./forge <task>` (or `invoke <task>` inside .venv)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from invoke import task

from clusterforge import inventory as inventory_mod
from clusterforge import render as render_mod
from clusterforge.cli import render_summary, user_errors

DEFAULT_INVENTORY = "examples/cluster.yaml"
HELP = {"inventory": "inventory YAML (default examples/cluster.yaml)",
        "out": "output root (default dist/)", "verbose": "show every command run",
        "state": "where cluster secrets are kept (default state/)"}


@task(help=HELP)
@user_errors
def render(c, inventory=DEFAULT_INVENTORY, out="dist", state="state", verbose=False):
    """Render every node's seed, autoinstall and iPXE script, and the dnsmasq config."""
    cluster = inventory_mod.load(inventory)
    target = render_mod.render(cluster, Path(out), Path(state))
    print(render_summary(cluster, target))


@task(help=HELP)
@user_errors
def demo(c, inventory=DEFAULT_INVENTORY, out="dist", state="state", verbose=False):
    """The main job on the example inventory: render it and summarise what was produced."""
    render(c, inventory=inventory, out=out, state=state, verbose=verbose)


@task(help={"fast": "unit tests only", "k": "only tests matching this expression"})
def test(c, fast=False, k=""):
    """Run the test suite: unit tests, then the QEMU VM tests (unless --fast)."""
    args = [sys.executable, "-m", "pytest", "tests/unit" if fast else "tests"]
    if k:
        args += ["-k", k]
    os.execv(sys.executable, args)
