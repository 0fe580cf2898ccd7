"""`./forge`'s last step: run invoke on tasks.py, taking `cluster.ssh NODE COMMAND...` as ssh does.

invoke has no trailing arguments, so `./forge cluster.ssh s1 ceph -s` would read `ceph`
as another task. Everything after the node (an optional `--` first) becomes --cmd.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

SSH_TASK = "cluster.ssh"
# cluster.ssh's options that take a value (long and short forms, as invoke names them).
VALUE_OPTIONS = {"--inventory", "-i", "--out", "-o", "--state", "-s", "--runs", "-r", "--cmd", "-c", "--node", "-n"}


def rewrite(argv: list[str]) -> list[str]:
    if SSH_TASK not in argv:
        return argv
    at = argv.index(SSH_TASK)
    head, rest = argv[:at + 1], argv[at + 1:]
    options: list[str] = []
    node = None
    i = 0
    while i < len(rest) and node is None:
        word = rest[i]
        if word == "--":
            break
        if word.startswith("-"):
            options.append(word)
            if word in VALUE_OPTIONS and i + 1 < len(rest):
                options.append(rest[i + 1])
                i += 1
            if word in ("--node", "-n"):
                node = options[-1]
        else:
            node = word
            options.append(word)
        i += 1
    command = rest[i:]
    if command[:1] == ["--"]:
        command = command[1:]
    return head + options + (["--cmd", " ".join(command)] if command else [])


def main() -> None:
    invoke = Path(sys.executable).parent / "invoke"
    os.execv(invoke, [str(invoke), *rewrite(sys.argv[1:])])


if __name__ == "__main__":
    main()
