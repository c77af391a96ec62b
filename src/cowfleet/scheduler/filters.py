"""Host filters: each says whether one host can take one request (pure functions)."""

from __future__ import annotations

from collections.abc import Callable

from cowfleet.scheduler.model import HostState, Ratios, Request

Filter = Callable[[HostState, Request, Ratios], bool]

# Hypervisor types that run the same guests (an image for "kvm" runs on a QEMU host).
_SAME_HYPERVISOR = {"kvm": "qemu", "qemu": "qemu"}


def compute_filter(host: HostState, req: Request, ratios: Ratios) -> bool:
    """The node is enabled and its heartbeats are recent."""
    return host.enabled and host.alive


def retry_filter(host: HostState, req: Request, ratios: Ratios) -> bool:
    """The node has not already failed this server's build."""
    return host.hostname not in req.exclude


def vcpu_filter(host: HostState, req: Request, ratios: Ratios) -> bool:
    return req.need.vcpus <= host.free_vcpus(ratios)


def ram_filter(host: HostState, req: Request, ratios: Ratios) -> bool:
    return req.need.ram_mb <= host.free_ram_mb(ratios)


def disk_filter(host: HostState, req: Request, ratios: Ratios) -> bool:
    return req.need.disk_gb <= host.free_disk_gb(ratios)


def _hv(name: str) -> str:
    low = name.strip().lower()
    return _SAME_HYPERVISOR.get(low, low)


def image_properties_filter(host: HostState, req: Request, ratios: Ratios) -> bool:
    """The image's ``hypervisor_type`` and ``hw_architecture`` match the node.

    A node that does not report its architecture cannot take an image that names one.
    """
    wanted_hv = req.image_props.get("hypervisor_type")
    if wanted_hv and _hv(wanted_hv) != _hv(host.hypervisor_type):
        return False
    wanted_arch = req.image_props.get("hw_architecture")
    if wanted_arch:
        return host.arch is not None and host.arch.lower() == wanted_arch.strip().lower()
    return True


FILTERS: tuple[tuple[str, Filter], ...] = (
    ("ComputeFilter", compute_filter),
    ("RetryFilter", retry_filter),
    ("VCPUFilter", vcpu_filter),
    ("RamFilter", ram_filter),
    ("DiskFilter", disk_filter),
    ("ImagePropertiesFilter", image_properties_filter),
)
