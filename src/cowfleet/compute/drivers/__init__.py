"""Hypervisor drivers: ``libvirt`` (libvirt-python) and ``none`` (disks only)."""

from __future__ import annotations

from cowfleet.compute.drivers.base import DomainInfo, Driver
from cowfleet.config import Config
from cowfleet.errors import ConfigError


def make_driver(name: str, cfg: Config) -> Driver:
    """A new driver called ``name`` configured from ``cfg`` (the caller closes it)."""
    if name == "none":
        from cowfleet.compute.drivers.none import NoneDriver

        return NoneDriver()
    if name == "libvirt":
        from cowfleet.compute.drivers.libvirt import LibvirtDriver

        return LibvirtDriver(cfg.libvirt_uri)
    raise ConfigError(f"unknown driver {name!r} (use libvirt or none)")


__all__ = ["DomainInfo", "Driver", "make_driver"]
