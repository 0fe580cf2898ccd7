"""`./forge`'s last step: run invoke on tasks.py, taking `cluster.ssh NODE COMMAND...` as ssh does.

invoke has no trailing arguments, so `./forge cluster.ssh s1 ceph -s` would read `ceph`
as another task. As with ssh, options may come before or after the node; the first word
after the node that is not an option (or everything after `--`) starts the command, which
becomes --cmd.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

SSH_TASK = "cluster.ssh"
# cluster.ssh's options that take a value (long and short forms, as invoke names them).
VALUE_OPTIONS = {"--inventory", "-i", "--out", "-o", "--state", "-s", "--runs", "-r", "--cmd", "-c", "--node", "-n"}
CMD_OPTIONS = ("--cmd", "-c")
NODE_OPTIONS = ("--node", "-n")


class UsageError(Exception):
    pass


def rewrite(argv: list[str]) -> list[str]:
    if SSH_TASK not in argv:
        return argv
    at = argv.index(SSH_TASK)
    head, rest = argv[:at + 1], argv[at + 1:]
    options: list[str] = []
    node = False
    i = 0
    while i < len(rest):
        word = rest[i]
        if word == "--":
            i += 1
            break
        if word.startswith("-"):
            options.append(word)
            if word in VALUE_OPTIONS and i + 1 < len(rest):
                i += 1
                options.append(rest[i])
            node = node or _is(word, NODE_OPTIONS)
        elif not node:
            node = True
            options.append(word)
        else:
            break
        i += 1
    command = rest[i:]
    if not command:
        return head + options
    if any(_is(word, CMD_OPTIONS) for word in options):
        raise UsageError("cluster.ssh: give the command after NODE or with --cmd, not both")
    return head + options + ["--cmd", " ".join(command)]


def _is(word: str, option: tuple[str, ...]) -> bool:
    """The word is the option, as `--cmd` or `--cmd=VALUE`."""
    return word in option or word.startswith(tuple(f"{name}=" for name in option))


def main() -> None:
    invoke = Path(sys.executable).parent / "invoke"
    try:
        argv = rewrite(sys.argv[1:])
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    os.execv(invoke, [str(invoke), *argv])


if __name__ == "__main__":
    main()
