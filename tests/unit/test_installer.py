"""The installer's decisions, on data: which seed, which disk. (It runs for real in tests/vm.)"""

from __future__ import annotations

import gzip
import os
import subprocess
from pathlib import Path

import pytest

from clusterforge.node import installer
from clusterforge.node.installer import Disk, InstallError, choose_target

GiB = 1024**3


def test_kernel_args() -> None:
    args = installer.kernel_args("BOOT_IMAGE=/vmlinuz boot=live clusterforge.mode=install "
                                 "clusterforge.seed=http://10.0.0.2:8080/lab/nodes/s1/ quiet")
    assert args == {"mode": "install", "seed": "http://10.0.0.2:8080/lab/nodes/s1/"}


DISKS = [
    Disk("/dev/sdb", 64 * GiB, removable=True, readonly=False, transport="usb"),
    Disk("/dev/vdb", 12 * GiB, removable=False, readonly=False, transport=""),
    Disk("/dev/vda", 8 * GiB, removable=False, readonly=False, transport=""),
    Disk("/dev/sr0", 1 * GiB, removable=True, readonly=True, transport="sata"),
]


def test_target_is_first_fixed_disk_by_name() -> None:
    assert choose_target(DISKS, boot="/dev/sr0", reserved=[], image_size=4 * GiB).path == "/dev/vda"


def test_target_skips_ceph_disks_and_boot_device() -> None:
    assert choose_target(DISKS, boot="/dev/sr0", reserved=["/dev/vda"], image_size=0).path == "/dev/vdb"
    with pytest.raises(InstallError, match="no disk to install on"):
        choose_target(DISKS, boot="/dev/vda", reserved=["/dev/vdb"], image_size=0)


def test_target_skips_small_disks() -> None:
    small = [Disk("/dev/vda", 2 * GiB, False, False, "")]
    with pytest.raises(InstallError, match="vda \\(2 GiB\\)"):
        choose_target(small, boot=None, reserved=[], image_size=0)


def test_seed_found_by_mac_and_node_info(rendered: Path, tmp_path: Path) -> None:
    seeds = tmp_path / "seeds"
    (seeds / "52-54-00-00-00-12").mkdir(parents=True)
    for name in installer.NOCLOUD_FILES:
        (seeds / "52-54-00-00-00-12" / name).write_bytes((rendered / "nodes/s2" / name).read_bytes())
    found = installer.find_seed(["52:54:00:aa:aa:aa", "52:54:00:00:00:12"], str(seeds))
    assert found is not None
    mac, files = found
    assert mac == "52:54:00:00:00:12"
    node = installer.node_info(files["user-data"])
    assert (node.cluster, node.name, node.disks) == ("lab", "s2", ["/dev/vdb"])
    assert installer.find_seed(["52:54:00:aa:aa:aa"], str(seeds)) is None


def test_copy_image_writes_every_block(tmp_path: Path) -> None:
    payload = b"\0" * (5 * 1024**2) + b"clusterforge" + b"\0" * 100
    image = tmp_path / "image.raw.gz"
    image.write_bytes(gzip.compress(payload))
    disk = tmp_path / "disk"
    disk.write_bytes(b"\xff" * len(payload))  # a used disk: old data everywhere
    assert installer.copy_image(str(image), str(disk)) == len(payload)
    assert disk.read_bytes() == payload


def test_partition_path() -> None:
    assert installer.partition_path("/dev/vda", 3) == "/dev/vda3"
    assert installer.partition_path("/dev/nvme0n1", 3) == "/dev/nvme0n1p3"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for a loop device")
def test_copy_image_onto_a_block_device_zeroes_old_data(tmp_path: Path) -> None:
    payload = b"head" + b"\0" * (9 * 1024**2) + b"tail"
    image = tmp_path / "image.raw.gz"
    image.write_bytes(gzip.compress(payload))
    backing = tmp_path / "disk"
    backing.write_bytes(b"\xff" * (16 * 1024**2))
    device = subprocess.run(["losetup", "--find", "--show", str(backing)], check=True, capture_output=True,
                            text=True).stdout.strip()
    try:
        assert installer.copy_image(str(image), device) == len(payload)
    finally:
        subprocess.run(["losetup", "--detach", device], check=True)
    data = backing.read_bytes()
    assert data[:len(payload)] == payload
    assert data[len(payload):] == b"\xff" * (len(data) - len(payload))
