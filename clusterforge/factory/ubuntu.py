"""os: ubuntu-24.04: the node image installed by Ubuntu's own installer from the user's ISO.

Packer boots the ISO, serves the autoinstall over its HTTP server, waits for SSH as the
build user, then lays in the same payload, provisioning and identity reset as the Debian
image. No Ubuntu ISO can be had on the machines this is developed on: the template is
checked with `packer validate` in tests, the build itself is not run there.
"""

from __future__ import annotations

import os
from pathlib import Path

from .. import templates
from ..fsutil import atomic_path
from ..inventory import OS, Service, image_name
from ..log import die, stage
from ..packages import AGENT_SET, disable_units_command, packages_of, unit_patterns
from ..run import run, which
from ..vm import accel as accel_mod
from .context import BuildContext
from .packer import PAYLOAD_DEST, provision_dir, reset_script, stream
from .payload import write_payload

TEMPLATE = "ubuntu-24.04.pkr.json.j2"
AUTOINSTALL = "ubuntu-autoinstall.yaml.j2"
NAME = image_name(OS.UBUNTU_2404)
DISK_MIB = 8192
MEMORY_MIB = 4096  # subiquity wants more than the Debian build's 2 GiB


def _render(name: str, values: dict[str, object], root: Path) -> str:
    return templates.render(templates.environment([root / "images"]), name, **values)


def _check_iso(iso: Path) -> None:
    if not iso.is_file():
        die(f"Ubuntu ISO not found: {iso}", hint="pass --iso PATH to an Ubuntu 24.04 server ISO")


def prepare(ctx: BuildContext, iso: Path, work: Path, accel: accel_mod.Accel) -> Path:
    """Write the Packer template, the autoinstall it serves, the build key and the payload
    into work/; returns the template's path."""
    _check_iso(iso)
    work.mkdir(parents=True, exist_ok=True)
    key = work / "build-key"
    if not key.exists():
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "clusterforge-build", "-f", key])
    http = work / "http"
    http.mkdir(exist_ok=True)
    # The same sets as the Debian image, but its OS base: Ubuntu's installer brings that.
    packages = packages_of((AGENT_SET, *(str(s) for s in Service), "ubuntu-24.04"))
    (http / "user-data").write_text(_render(AUTOINSTALL, {
        "packages": packages, "disable_units": disable_units_command(unit_patterns()),
        "build_key": key.with_suffix(".pub").read_text().strip()}, ctx.root))
    (http / "meta-data").write_text("instance-id: clusterforge-ubuntu-build\n")
    payload = work / "payload.tar"
    write_payload(payload, ctx.root)
    template = work / "packer.json"
    template.write_text(_render(TEMPLATE, {
        "vm_name": f"{NAME}.qcow2", "output_dir": str(work / "out"), "iso": str(iso.resolve()),
        "disk_size_mib": DISK_MIB, "accelerator": accel.name,
        "cpu": accel.args[accel.args.index("-cpu") + 1], "cpus": 2, "memory_mib": MEMORY_MIB,
        "http_dir": str(http), "ssh_key": str(key), "serial_log": str(work / "serial.log"),
        "payload": str(payload), "payload_dest": PAYLOAD_DEST,
        "provision_scripts": [str(p) for p in sorted(provision_dir(ctx).glob("*.sh"))],
        "reset_script": str(reset_script(ctx)),
    }, ctx.root))
    return template


def build_ubuntu_qcow2(ctx: BuildContext, iso: Path) -> Path:
    out = ctx.out / "images" / f"{NAME}.qcow2"
    work = ctx.cache / "packer-ubuntu"
    _check_iso(iso)
    accel = accel_mod.choose(ctx.out)
    with stage(f"packer: {out.name} from {iso.name} ({accel.name})"), atomic_path(out) as tmp:
        template = prepare(ctx, iso, work, accel)
        env = {k: v for k, v in os.environ.items() if k not in ("PACKER_LOG", "PACKER_LOG_PATH")}
        env.update(CHECKPOINT_DISABLE="1", PACKER_NO_COLOR="1")
        code, tail = stream([which("packer"), "build", "-color=false", str(template)], env, cwd=work,
                            log=work / "packer.log")
        built = work / "out" / f"{NAME}.qcow2"
        if code != 0 or not built.is_file():
            die("packer build of the Ubuntu image failed:\n" + "".join(tail).rstrip(),
                hint=f"packer's output: {work / 'packer.log'}; the VM's console: {work / 'serial.log'}")
        os.replace(built, tmp)
    return out

