"""The GRUB scripts the build embeds or writes parse (grub-script-check), and the embedded
one looks on its own disk first."""

from __future__ import annotations

import subprocess
from pathlib import Path

from clusterforge.factory import disk, netboot, rootfs
from clusterforge.factory.context import BuildContext


def script_check(tmp_path: Path, script: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "check.cfg"
    path.write_text(script)
    return subprocess.run(["grub-script-check", str(path)], capture_output=True, text=True)


def test_grub_scripts_parse(tmp_path: Path) -> None:
    ctx = BuildContext.create(out=tmp_path / "dist")
    root = tmp_path / "root"
    for platform in ("i386-pc", "x86_64-efi"):
        (root / "usr/lib/grub" / platform).mkdir(parents=True)
    (root / "etc/default").mkdir(parents=True)
    rootfs.write_boot_config(ctx, root)
    for script in (disk.root_config(ctx.root_uuid), netboot.LOCALBOOT_CONFIG.format(esp_uuid=ctx.esp_uuid),
                   (root / "boot/grub/grub.cfg").read_text()):
        proc = script_check(tmp_path, script)
        assert proc.returncode == 0, script + proc.stdout + proc.stderr
    assert script_check(tmp_path, "if true; then\n  echo unterminated\n").returncode != 0


def test_root_is_searched_on_the_boot_disk_first() -> None:
    config = disk.root_config("1234-abcd")
    assert "regexp" in disk.GRUB_MODULES
    assert '--hint="$bootdisk," 1234-abcd' in config
    assert config.endswith("set prefix=($root)/boot/grub\n")
