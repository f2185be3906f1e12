"""Managing VMs: the lifecycle, settings, disks, cloud-init seeds, listings."""
