"""The QEMU backend: host probing, the argv builder, process control, QMP and qemu-img."""
