"""Stage 2: a raw GPT disk that boots the rootfs with BIOS and UEFI firmware.

Layout: 1 MiB BIOS boot partition (GRUB's core.img), an EFI system partition
(FAT, GRUB as the removable-media path /EFI/BOOT/BOOTX64.EFI, so no NVRAM entry
is needed) and the ext4 root. Nothing is mounted and no loop device is used: the
filesystems are built in files (mkfs.ext4 -d, mkfs.vfat + mtools) and copied in
at their partition offsets, and the BIOS boot code is written the way
grub-bios-setup writes it. Both GRUBs embed only how to find the root filesystem;
the menu is the rootfs's /boot/grub/grub.cfg (written by stage 1).
"""

from __future__ import annotations

import re
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..log import human_bytes
from ..node.layout import BIOS_BOOT_PARTITION, ESP_PARTITION, ROOT_PARTITION
from ..run import run
from .context import BuildContext, cached_stage, content_hash, input_key

RECIPE = 1  # bump when make_disk() changes what it lays out

SECTOR = 512
BIOS_BOOT_START = 2048  # 1 MiB: the usual alignment, and what partitioners expect
BIOS_BOOT_SECTORS = 2048

# Enough to find and read the rootfs; everything else loads from /boot/grub/<platform>.
GRUB_MODULES = [
    "part_gpt", "part_msdos", "ext2", "fat", "search", "search_fs_uuid", "regexp",
    "normal", "configfile", "linux", "echo", "test", "serial", "terminal",
]  # fmt: skip
GRUB_PLATFORM_MODULES = {"i386-pc": ["biosdisk"], "x86_64-efi": ["efi_gop"]}

# Offsets in GRUB's boot.img and diskboot.img (grub/i386/pc/boot.h).
BOOT_BPB = slice(0x03, 0x5A)
BOOT_KERNEL_SECTOR = 0x5C
BOOT_DRIVE = 0x64
BOOT_DRIVE_CHECK = slice(0x66, 0x68)
MBR_TABLE = slice(0x1B8, 0x1FE)  # disk signature + partition table (GPT's protective one)
DISKBOOT_BLOCKLIST = 0x1F4  # u64 start sector, u16 sector count, u16 load segment


@dataclass(frozen=True)
class Partition:
    number: int
    first: int  # sectors
    last: int

    @property
    def offset(self) -> int:
        return self.first * SECTOR

    @property
    def size(self) -> int:
        return (self.last - self.first + 1) * SECTOR


def disk_key(ctx: BuildContext) -> str:
    return content_hash(
        input_key(ctx.rootfs_dir, "rootfs"),
        str(RECIPE), str(GRUB_MODULES), str(GRUB_PLATFORM_MODULES), root_config(ctx.root_uuid),
        str(ctx.disk_size),
        str(ctx.esp_size),
        ctx.root_uuid,
        ctx.esp_volume_id,
    )


def build_base_disk(ctx: BuildContext) -> Path:
    def build(tmp: Path) -> None:
        with tempfile.TemporaryDirectory(dir=ctx.cache, prefix="disk-work-") as work:
            make_disk(ctx, tmp, Path(work))

    return cached_stage("disk", ctx.base_disk, disk_key(ctx), build, f"{human_bytes(ctx.disk_size)} GPT image")


def make_disk(ctx: BuildContext, disk: Path, work: Path) -> None:
    rootfs = ctx.rootfs_dir
    with open(disk, "wb") as f:
        f.truncate(ctx.disk_size)
    bios, esp, root = partition(ctx, disk)

    root_img = work / "root.ext4"
    with open(root_img, "wb") as f:
        f.truncate(root.size)
    # -d copies the tree with owners, modes and xattrs (file capabilities): no mount.
    run(["mkfs.ext4", "-q", "-F", "-L", "root", "-U", ctx.root_uuid, "-d", rootfs, root_img])
    copy_into(root_img, disk, root.offset)
    root_img.unlink()

    efi = work / "BOOTX64.EFI"
    core = work / "core.img"
    mkimage(rootfs, "x86_64-efi", root_config(ctx.root_uuid), efi)
    mkimage(rootfs, "i386-pc", root_config(ctx.root_uuid), core)

    esp_img = work / "esp.img"
    run(["mkfs.vfat", "-F", "32", "-n", "ESP", "-i", ctx.esp_volume_id,
         "-C", esp_img, str(esp.size // 1024)])  # fmt: skip
    mtools = {"MTOOLS_SKIP_CHECK": "1"}
    run(["mmd", "-i", esp_img, "::/EFI", "::/EFI/BOOT"], env=mtools)
    run(["mcopy", "-i", esp_img, efi, "::/EFI/BOOT/BOOTX64.EFI"], env=mtools)
    copy_into(esp_img, disk, esp.offset)

    boot_img = (rootfs / "usr/lib/grub/i386-pc/boot.img").read_bytes()
    install_bios_boot(disk, boot_img, core.read_bytes(), bios)


def partition(ctx: BuildContext, disk: Path) -> tuple[Partition, Partition, Partition]:
    esp_start = BIOS_BOOT_START + BIOS_BOOT_SECTORS
    # Fixed GUIDs: the same inputs give the same image, and PARTUUIDs are known.
    numbers = (BIOS_BOOT_PARTITION, ESP_PARTITION, ROOT_PARTITION)
    b, e, r = numbers
    ids = {n: ctx.stable_uuid(f"part{n}") for n in numbers}
    run([
        "sgdisk", "--clear", f"--disk-guid={ctx.stable_uuid('disk')}",
        f"--new={b}:{BIOS_BOOT_START}:{esp_start - 1}", f"--typecode={b}:EF02",
        f"--change-name={b}:bios-boot", f"--partition-guid={b}:{ids[b]}",
        f"--new={e}:{esp_start}:+{ctx.esp_size // 1024}K", f"--typecode={e}:EF00",
        f"--change-name={e}:esp", f"--partition-guid={e}:{ids[e]}",
        # 8304: "Linux root (x86-64)" of the discoverable partitions spec.
        f"--new={r}:0:0", f"--typecode={r}:8304", f"--change-name={r}:root",
        f"--partition-guid={r}:{ids[r]}",
        disk,
    ])  # fmt: skip
    parts = []
    for number in numbers:
        text = run(["sgdisk", f"--info={number}", disk]).stdout
        first = re.search(r"First sector: (\d+)", text)
        last = re.search(r"Last sector: (\d+)", text)
        if not first or not last:
            raise RuntimeError(f"cannot read partition {number} from sgdisk:\n{text}")
        parts.append(Partition(number, int(first[1]), int(last[1])))
    return parts[0], parts[1], parts[2]


def copy_into(image: Path, disk: Path, offset: int) -> None:
    # conv=sparse skips zero blocks, so the disk stays as sparse as the filesystem.
    run(["dd", f"if={image}", f"of={disk}", "bs=4M", f"seek={offset}", "oflag=seek_bytes",
         "conv=notrunc,sparse", "status=none"])  # fmt: skip


def root_config(root_uuid: str) -> str:
    """GRUB's embedded config: find the root filesystem by UUID, not (hd0,gpt3), because the
    disk is not always the first one; then its /boot/grub/grub.cfg, the menu.

    The search looks first on the disk GRUB was loaded from ($root starts as that disk, or
    its ESP under UEFI), so a USB installer stick still plugged in is not probed through
    the firmware on every boot; only if the root is not there does it try every disk.
    """
    search = "search --no-floppy --fs-uuid --set=root"
    return (f"if regexp --set=1:bootdisk '^([^,]+)' \"$root\"; then\n"
            f"  {search} --hint=\"$bootdisk,\" {root_uuid}\n"
            f"else\n"
            f"  {search} {root_uuid}\n"
            f"fi\n"
            f"set prefix=($root)/boot/grub\n")


def mkimage(rootfs: Path, platform: str, config: str, output: Path, modules: list[str] | None = None) -> None:
    """A GRUB image with config embedded, from the image's own GRUB, so boot code and
    /boot/grub modules match."""
    modules = (GRUB_MODULES if modules is None else modules) + GRUB_PLATFORM_MODULES[platform]
    fmt = "x86_64-efi" if platform == "x86_64-efi" else "i386-pc"
    with tempfile.NamedTemporaryFile("w", suffix=".cfg") as early:
        early.write(config)
        early.flush()
        run(["grub-mkimage", "-d", rootfs / "usr/lib/grub" / platform, "-O", fmt,
             "-o", output, "-c", early.name, "-p", "/boot/grub", *modules])  # fmt: skip


def install_bios_boot(disk: Path, boot_img: bytes, core_img: bytes, bios: Partition) -> None:
    """What grub-bios-setup does for a GPT disk: core.img into the BIOS boot
    partition, boot.img into the MBR pointing at it, protective MBR kept."""
    core = bytearray(core_img + b"\0" * (-len(core_img) % SECTOR))
    sectors = len(core) // SECTOR
    if sectors > bios.last - bios.first + 1:
        raise RuntimeError(f"core.img ({sectors} sectors) does not fit the BIOS boot partition")
    # diskboot.img (core.img's first sector) loads the rest from one blocklist that
    # grub-mkimage fills in for the MBR-gap layout (start sector 2): move it.
    start, count, _segment = struct.unpack_from("<QHH", core, DISKBOOT_BLOCKLIST)
    if start != 2 or count != sectors - 1:
        raise RuntimeError(f"unexpected core.img blocklist: start={start} count={count}")
    struct.pack_into("<Q", core, DISKBOOT_BLOCKLIST, bios.first + 1)

    with open(disk, "r+b") as f:
        mbr = f.read(SECTOR)
        boot = bytearray(boot_img)
        boot[BOOT_BPB] = mbr[BOOT_BPB]
        struct.pack_into("<Q", boot, BOOT_KERNEL_SECTOR, bios.first)
        boot[BOOT_DRIVE] = 0xFF  # use the drive the BIOS booted from
        # NOPs over the jump that trusts the BIOS's drive number only when it looks
        # like a hard disk: some BIOSes pass 0x00 when booting one (grub-setup does it).
        boot[BOOT_DRIVE_CHECK] = b"\x90\x90"
        boot[MBR_TABLE] = mbr[MBR_TABLE]
        f.seek(0)
        f.write(boot)
        f.seek(bios.offset)
        f.write(core)
