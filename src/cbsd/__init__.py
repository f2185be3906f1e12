"""cbsd: CBSD's bhyve VM commands (checkpoints, hibernation, pause) on QEMU for Linux hosts."""

__version__ = "0.1.0"
