"""Facts about the node image that the factory (which builds it) and the nodes (which run
it) share. Declared once here; node code, so standard library only."""

from __future__ import annotations

# Partitions of the image's disk, in order: BIOS boot, EFI system partition, root.
BIOS_BOOT_PARTITION, ESP_PARTITION, ROOT_PARTITION = 1, 2, 3

# The kernel command line of every boot (disk, ISO, PXE): console on screen and serial.
KERNEL_ARGS = "console=tty0 console=ttyS0,115200"

# Where cloud-init looks for a NoCloud seed on the installed disk (relative to its root).
NOCLOUD_SEED_DIR = "var/lib/cloud/seed/nocloud"

# Where the image's python3 finds the package (Debian's dist-packages; no venv on nodes).
SITE_PACKAGES = "/usr/lib/python3/dist-packages"
ROLE_OVERLAYS = "/usr/share/clusterforge/overlays"  # overlays/<role>/, laid over / by the agent
