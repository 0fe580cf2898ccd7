"""Stage 3: the node image, made by Packer's qemu builder from the base disk.

Packer boots the base disk (which holds no key: the build VM gets a throwaway
one from a NoCloud seed on an extra CD-ROM), uploads the payload (overlays/ and the
node package, see payload.py) as one tar, runs images/provision/*.sh in order and then
images/reset-identity.sh and shuts the VM down; its disk is then compressed
(zstd) into the qcow2.

This stage, not the rootfs, carries everything that changes often (node code,
overlays, provisioning), so editing them costs a Packer run, never mmdebstrap. It is
keyed on those alone: factory code (this module included) rebuilds nothing.
Work files and logs live in dist/cache/packer/; only the finished image is
renamed into dist/images/.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
from collections import deque
from pathlib import Path

from .. import templates
from ..fsutil import remove_path
from ..log import die, human_bytes, info
from ..run import run, which
from ..seediso import write_seed_iso
from ..vm import accel as accel_mod
from .context import BuildContext, MiB, cached_stage, content_hash, input_key
from .payload import payload_bytes, write_payload

TEMPLATE = "debian-12.pkr.json.j2"
PAYLOAD_DEST = "/tmp/clusterforge-payload.tar"
CPUS = 2
MEMORY_MIB = 2048
# Boot to sshd takes ~35 s under TCG; the margin is for a loaded build machine.
SSH_TIMEOUT = "15m"
# Packer cancels the build, stops QEMU and removes its output on SIGINT; give it
# this long before the whole process group is killed.
CANCEL_SECONDS = 60
TAIL_LINES = 20
# The build VM's NIC, pinned so the seed's network config can match it: cloud-init
# 22.4's networkd renderer ignores `match: name:` globs (it writes Name=<config id>,
# which matches no link, and systemd-networkd-wait-online then stalls boot 2 min).
BUILD_MAC = "52:54:00:cf:00:01"


def images_dir(ctx: BuildContext) -> Path:
    return ctx.out / "images"


def qcow2_image(ctx: BuildContext) -> Path:
    return images_dir(ctx) / f"{ctx.name}.qcow2"


def work_dir(ctx: BuildContext) -> Path:
    return ctx.cache / "packer"


def template_path(ctx: BuildContext) -> Path:
    return ctx.root / "images" / TEMPLATE


def provision_dir(ctx: BuildContext) -> Path:
    return ctx.root / "images" / "provision"


def reset_script(ctx: BuildContext) -> Path:
    return ctx.root / "images" / "reset-identity.sh"


def packer_key(ctx: BuildContext) -> str:
    """The base disk's key (package lists and units), the payload (node code, overlays,
    provisioning), the template and reset script, and the build VM's size."""
    return content_hash(
        input_key(ctx.base_disk, "disk"),
        payload_bytes(ctx.root),
        template_path(ctx),
        reset_script(ctx),
        str(MEMORY_MIB),
    )


def build_qcow2(ctx: BuildContext) -> Path:
    """dist/images/<name>.qcow2, rebuilt only when one of its inputs changed."""
    key = packer_key(ctx)
    out = qcow2_image(ctx)

    def build(tmp: Path) -> None:
        work = work_dir(ctx)
        remove_path(work)
        work.mkdir(parents=True)
        built = run_packer(ctx, work, accel_mod.choose(ctx.out), instance=key[:12])
        compress(built, tmp)
        # The key is throwaway and the image no longer trusts it; don't keep it around.
        for leftover in ("out", "packer_cache", "payload.tar", "build-key", "build-key.pub"):
            remove_path(work / leftover)
        info(f"packer: {human_bytes(tmp.stat().st_size)}")

    return cached_stage("packer", out, key, build, f"{out.name} ({accel_mod.choose(ctx.out).name})")


def compress(built: Path, out: Path) -> None:
    """Packer's disk, compressed with zstd: four times faster than Packer's own zlib
    compaction, as small. Reading it needs QEMU 5.1 or later."""
    run(["qemu-img", "convert", "-c", "-O", "qcow2", "-o", "compression_type=zstd", built, out])


def run_packer(ctx: BuildContext, work: Path, accel: accel_mod.Accel, instance: str) -> Path:
    key = work / "build-key"
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "clusterforge-build", "-f", key])
    seed = work / "seed.iso"
    write_seed_iso(seed, build_seed(key.with_suffix(".pub").read_text().strip(), instance))
    payload = work / "payload.tar"
    write_payload(payload, ctx.root)

    serial_log = work / "serial.log"
    template = work / "packer.json"
    template.write_text(render_template(ctx, {
        "vm_name": qcow2_image(ctx).name,
        "output_dir": str(work / "out"),
        "base_disk": str(ctx.base_disk),
        # Packer's default is 40 GiB; anything but the base disk's size resizes it.
        "disk_size_mib": ctx.base_disk.stat().st_size // MiB,
        "accelerator": accel.name,
        "cpu": accel.args[accel.args.index("-cpu") + 1],
        "mac": BUILD_MAC,
        "cpus": CPUS,
        "memory_mib": MEMORY_MIB,
        "ssh_key": str(key),
        "ssh_timeout": SSH_TIMEOUT,
        # Absolute paths: Packer runs QEMU from its own working directory.
        "seed_iso": str(seed),
        "serial_log": str(serial_log),
        "payload": str(payload),
        "payload_dest": PAYLOAD_DEST,
        "provision_scripts": [str(p) for p in sorted(provision_dir(ctx).glob("*.sh"))],
        "reset_script": str(reset_script(ctx)),
    }))

    env = {k: v for k, v in os.environ.items() if k not in ("PACKER_LOG", "PACKER_LOG_PATH")}
    env.update(CHECKPOINT_DISABLE="1", PACKER_NO_COLOR="1", PACKER_CACHE_DIR=str(work / "packer_cache"))
    log = work / "packer.log"
    argv = [which("packer"), "build", "-color=false", str(template)]
    code, tail = stream(argv, env, cwd=work, log=log)
    built = work / "out" / qcow2_image(ctx).name
    if code != 0 or not built.is_file():
        status = f"exit code {code}" if code != 0 else f"no {built.name} in its output"
        die(f"packer build failed ({status}):\n" + "".join(tail).rstrip(),
            hint=f"packer's output: {log}; the build VM's serial console: {serial_log}")
    return built


def build_seed(public_key: str, instance: str) -> dict[str, bytes]:
    """NoCloud seed for the build VM: root login with the build key, DHCP."""
    user_data = {
        "disable_root": False,  # else cloud-init prefixes root's key with a refusal
        "ssh_pwauth": False,
        "users": [],  # no default user: only root, and only for the build
        "ssh_authorized_keys": [public_key],
    }
    meta_data = {"instance-id": f"clusterforge-build-{instance}", "local-hostname": "clusterforge"}
    network = {"version": 2, "ethernets": {"build": {"match": {"macaddress": BUILD_MAC}, "dhcp4": True}}}
    # JSON is YAML; cloud-init wants the #cloud-config header on user-data only.
    return {
        "user-data": ("#cloud-config\n" + json.dumps(user_data, indent=2) + "\n").encode(),
        "meta-data": (json.dumps(meta_data, indent=2) + "\n").encode(),
        "network-config": (json.dumps(network, indent=2) + "\n").encode(),
    }


def render_template(ctx: BuildContext, values: dict[str, object]) -> str:
    text = templates.render(templates.environment([template_path(ctx).parent]), TEMPLATE, **values)
    try:
        json.loads(text)
    except json.JSONDecodeError as exc:
        raise RuntimeError(f"{template_path(ctx)} renders invalid JSON: {exc}\n{text}") from None
    return text


def stream(argv: list[str], env: dict[str, str], cwd: Path, log: Path) -> tuple[int, deque[str]]:
    """Run argv showing its output as it comes and copying it to log.

    Not run(): that captures output until the end, and on Ctrl-C kills only its
    child. Packer runs in its own process group (with the QEMU it starts), gets
    SIGINT to cancel cleanly (on Ctrl-C or SIGTERM here), and the group is killed
    whatever happens, so no QEMU outlives the build.
    """
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    on_main = threading.current_thread() is threading.main_thread()
    # SIGTERM (a CI job cancelled) would otherwise end Python with no cleanup at all.
    previous = signal.signal(signal.SIGTERM, _interrupt) if on_main else None
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        with open(log, "w") as f:
            assert proc.stdout is not None
            for line in proc.stdout:
                f.write(line)
                f.flush()
                tail.append(line)
                info("    " + line.rstrip("\n"))
        return proc.wait(), tail
    except BaseException:
        _signal_group(proc.pid, signal.SIGINT)
        try:
            proc.wait(CANCEL_SECONDS)
        except subprocess.TimeoutExpired:
            pass
        raise
    finally:
        _signal_group(proc.pid, signal.SIGKILL)
        proc.wait()
        if on_main:
            signal.signal(signal.SIGTERM, previous)


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass
