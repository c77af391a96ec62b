"""Disk image formats: streaming inspection, the safety policy, qcow2 overlays, disk info."""
