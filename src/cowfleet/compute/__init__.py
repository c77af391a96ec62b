"""Instances: flavors, overlay disks on cached bases, hypervisor drivers."""
