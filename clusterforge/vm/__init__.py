"""QEMU machines over QMP, consoles, cluster networks."""

