"""The scheduler's pure half: filters, weighers and select, property-tested."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from cowfleet.scheduler.filters import image_properties_filter
from cowfleet.scheduler.model import HostState, Need, Ratios, Request, Weighing
from cowfleet.scheduler.select import select

IMAGE = "11111111-1111-1111-1111-111111111111"

ratios_st = st.builds(
    Ratios,
    cpu=st.sampled_from([0.5, 1.0, 4.0, 16.0]),
    ram=st.sampled_from([0.5, 1.0, 1.5]),
    disk=st.sampled_from([1.0, 2.0]),
)


@st.composite
def hosts_st(draw: st.DrawFn) -> list[HostState]:
    n = draw(st.integers(0, 8))
    out = []
    for i in range(n):
        vcpus = draw(st.integers(0, 64))
        ram = draw(st.integers(0, 65536))
        disk = draw(st.integers(0, 2000))
        out.append(
            HostState(
                hostname=f"node-{i}",
                enabled=draw(st.booleans()),
                alive=draw(st.booleans()),
                hypervisor_type=draw(st.sampled_from(["QEMU", "none"])),
                vcpus=vcpus,
                ram_mb=ram,
                disk_gb=disk,
                vcpus_used=draw(st.integers(0, vcpus * 2)),
                ram_used_mb=draw(st.integers(0, ram)),
                disk_used_gb=draw(st.integers(0, disk)),
                arch=draw(st.sampled_from([None, "x86_64", "aarch64"])),
                images=frozenset([IMAGE]) if draw(st.booleans()) else frozenset(),
            )
        )
    return out


request_st = st.builds(
    Request,
    need=st.builds(
        Need, vcpus=st.integers(1, 16), ram_mb=st.integers(1, 16384), disk_gb=st.integers(0, 200)
    ),
    image_id=st.just(IMAGE),
    image_props=st.fixed_dictionaries(
        {},
        optional={
            "hypervisor_type": st.sampled_from(["qemu", "kvm", "none"]),
            "hw_architecture": st.sampled_from(["x86_64", "aarch64"]),
        },
    ),
    exclude=st.frozensets(st.sampled_from([f"node-{i}" for i in range(8)]), max_size=3),
)


def fits(h: HostState, req: Request, r: Ratios) -> bool:
    return (
        h.enabled
        and h.alive
        and h.hostname not in req.exclude
        and h.vcpus_used + req.need.vcpus <= h.vcpus * r.cpu
        and h.ram_used_mb + req.need.ram_mb <= h.ram_mb * r.ram
        and h.disk_used_gb + req.need.disk_gb <= h.disk_gb * r.disk
        and image_properties_filter(h, req, r)
    )


@settings(max_examples=300, deadline=None)
@given(hosts=hosts_st(), req=request_st, ratios=ratios_st)
def test_select_returns_exactly_the_hosts_with_room_best_first(
    hosts: list[HostState], req: Request, ratios: Ratios
) -> None:
    sel = select(req, hosts, ratios)
    chosen = [c.hostname for c in sel.candidates]
    assert sorted(chosen) == sorted(h.hostname for h in hosts if fits(h, req, ratios))
    weights = [c.weight for c in sel.candidates]
    assert weights == sorted(weights, reverse=True)
    assert sum(sel.rejected.values()) == len(hosts) - len(chosen)
    if not chosen:
        assert sel.why_none()


@settings(max_examples=200, deadline=None)
@given(hosts=hosts_st(), req=request_st, ratios=ratios_st)
def test_a_host_holding_the_image_outranks_every_host_without_it(
    hosts: list[HostState], req: Request, ratios: Ratios
) -> None:
    sel = select(req, hosts, ratios, Weighing(cache=2.0, ram=1.0))
    by_name = {h.hostname: h for h in hosts}
    cached = [IMAGE in by_name[c.hostname].images for c in sel.candidates]
    # Every cached candidate comes before every uncached one.
    assert cached == sorted(cached, reverse=True)


def _twins(n: int, cached: int) -> list[HostState]:
    return [
        HostState(
            f"node-{i}",
            True,
            True,
            "QEMU",
            8,
            8192,
            100,
            images=(frozenset([IMAGE]) if i == cached else frozenset()),
        )
        for i in range(n)
    ]


def test_the_cache_weigher_wins_a_tie_and_can_be_turned_off() -> None:
    req = Request(Need(1, 512, 1), IMAGE)
    assert select(req, _twins(4, cached=2)).candidates[0].hostname == "node-2"
    off = select(req, _twins(4, cached=2), weighing=Weighing(cache=0.0))
    assert off.candidates[0].hostname == "node-0"  # ties go to the name that sorts first


def test_spread_prefers_free_ram_and_pack_the_fullest_host() -> None:
    hosts = [
        HostState("a", True, True, "QEMU", 8, 8192, 100, ram_used_mb=4096),
        HostState("b", True, True, "QEMU", 8, 8192, 100, ram_used_mb=0),
    ]
    req = Request(Need(1, 512, 1), IMAGE)
    assert select(req, hosts, weighing=Weighing(mode="spread")).candidates[0].hostname == "b"
    assert select(req, hosts, weighing=Weighing(mode="pack")).candidates[0].hostname == "a"


def test_image_properties_must_match_the_node() -> None:
    host = HostState("a", True, True, "QEMU", 8, 8192, 100, arch="x86_64")
    ok = Request(Need(1, 1, 1), IMAGE, {"hypervisor_type": "kvm", "hw_architecture": "x86_64"})
    bad_hv = Request(Need(1, 1, 1), IMAGE, {"hypervisor_type": "xen"})
    bad_arch = Request(Need(1, 1, 1), IMAGE, {"hw_architecture": "aarch64"})
    assert [len(select(r, [host]).candidates) for r in (ok, bad_hv, bad_arch)] == [1, 0, 0]
    unknown_arch = HostState("b", True, True, "QEMU", 8, 8192, 100)
    assert not select(bad_arch, [unknown_arch]).candidates
    assert select(bad_arch, [host]).rejected["ImagePropertiesFilter"] == 1


def test_no_host_gives_a_reason() -> None:
    sel = select(Request(Need(1, 1, 1), IMAGE), [])
    assert "no compute hosts" in sel.why_none()
    full = HostState("a", True, True, "QEMU", 1, 512, 1, vcpus_used=4)
    assert "VCPUFilter" in select(Request(Need(1, 1, 1), IMAGE), [full]).why_none()
