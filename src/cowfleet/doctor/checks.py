"""The doctor's checks: pure functions of the settings and the probes' answers.

Each returns :class:`~cowfleet.doctor.model.Finding` objects whose ``fix`` says what
to do. Thresholds are named constants below.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from cowfleet.doctor import qemuconf
from cowfleet.doctor.access import Identity, R, W, X, walk
from cowfleet.doctor.model import Finding, fail, ok, skip, warn
from cowfleet.doctor.probes import HttpAnswer, Probes

QEMU_CONF = "/etc/libvirt/qemu.conf"
KVM_DEVICE = "/dev/kvm"
# Clock skew against the API: above WARN a warning, above FAIL a failure (seconds).
SKEW_WARN = 5.0
SKEW_FAIL = 60.0
_VERSION = re.compile(r"(\d+\.\d+(?:\.\d+)?)")


@dataclass(frozen=True)
class DoctorSettings:
    """The part of the configuration the checks read."""

    driver: str
    virt_type: str
    instances_path: Path
    max_cache_bytes: int
    min_free_percent: float
    api_url: str | None
    image_url: str
    arch: str = "x86_64"


def version_of(output: str) -> str | None:
    m = _VERSION.search(output)
    return m.group(1) if m else None


def _program(p: Probes, check: str, argv: list[str], needed: bool, why: str) -> Finding:
    path = p.which(argv[0])
    if path is None:
        if needed:
            return fail(check, f"{argv[0]} not found on PATH", f"install it ({why})")
        return warn(check, f"{argv[0]} not found on PATH", f"install it if needed ({why})")
    run = p.run(argv)
    version = version_of(run.output) if run is not None else None
    if run is None or run.returncode != 0 or version is None:
        said = " ".join((run.output if run else "").split())[:200]
        return fail(
            check,
            f"{path} does not report a version ({said or 'no output'})",
            f"reinstall {argv[0]}",
            path=path,
        )
    return ok(check, f"{argv[0]} {version} ({path})", path=path, version=version)


def check_programs(s: DoctorSettings, p: Probes) -> list[Finding]:
    """qemu-img always; QEMU and libvirt when the ``libvirt`` driver runs guests."""
    libvirt = s.driver == "libvirt"
    qemu = f"qemu-system-{s.arch}"
    return [
        _program(p, "qemu-img", ["qemu-img", "--version"], True, "Debian package qemu-utils"),
        _program(p, "qemu", [qemu, "--version"], libvirt, "Debian package qemu-system-x86 or -arm"),
        _program(p, "libvirt", ["virsh", "--version"], libvirt, "Debian package libvirt-clients"),
    ]


def qemu_identity(p: Probes, conf_path: str = QEMU_CONF) -> tuple[Identity | None, str]:
    """Who QEMU runs as: a running QEMU process, else qemu.conf, else Debian's default."""
    uids = p.qemu_uids()
    if uids:
        who = p.user(f"+{uids[0]}")
        if who is not None:
            return who, f"a running QEMU process (uid {uids[0]})"
    text = p.read_text(conf_path)
    conf = qemuconf.parse(text or "")
    name = conf.user or qemuconf.DEBIAN_DEFAULT
    who = p.user(name)
    source = f"{conf_path} (user = {name!r})" if conf.user else f"libvirt's default ({name})"
    if who is None:
        return None, f"user {name!r} from {source} does not exist"
    if conf.group:
        gid = p.group_id(conf.group)
        if gid is not None:
            who = Identity(who.name, who.uid, who.gids | {gid})
    return who, source


def check_kvm(s: DoctorSettings, p: Probes, who: Identity | None) -> Finding:
    if s.driver != "libvirt":
        return skip("kvm", f"driver {s.driver}: no guests run here")
    if s.virt_type == "qemu":
        return ok("kvm", "TCG in use (virt_type = qemu): no KVM needed, guests run slower")
    node = p.stat(KVM_DEVICE)
    if node is None:
        return fail(
            "kvm",
            f"virt_type = kvm but {KVM_DEVICE} does not exist",
            "enable virtualization (VT-x/AMD-V) and load kvm_intel or kvm_amd, "
            'or set compute.virt_type = "qemu" (TCG)',
        )
    if who is not None:
        if walk(KVM_DEVICE, who, p.stat, last=R | W):
            return fail(
                "kvm",
                f"{who.name} (uid {who.uid}), the QEMU user, cannot open {KVM_DEVICE}",
                f"add {who.name} to the device's group (usually: adduser {who.name} kvm)",
            )
        return ok("kvm", f"KVM usable: {who.name} can open {KVM_DEVICE}")
    if not p.can_rw(KVM_DEVICE):
        return fail(
            "kvm",
            f"{KVM_DEVICE} is not readable and writable by this user",
            'add the user to the kvm group, or set compute.virt_type = "qemu"',
        )
    return ok("kvm", f"KVM usable: {KVM_DEVICE} opens")


def check_instances_access(
    s: DoctorSettings, p: Probes, who: Identity | None, source: str
) -> Finding:
    """QEMU opens disks by path: every folder down to ``_base`` must let it search."""
    if s.driver != "libvirt":
        return skip("instances-access", f"driver {s.driver}: QEMU does not open the disks")
    if who is None:
        return fail(
            "instances-access",
            f"cannot tell which user QEMU runs as: {source}",
            f"set user and group in {QEMU_CONF}",
        )
    base = str(s.instances_path / "_base")
    blocked = walk(str(s.instances_path), who, p.stat, last=X)
    if not blocked:
        blocked = walk(base, who, p.stat, last=R | X)
    if blocked:
        first = blocked[0]
        where = "; ".join(f"{b.path} ({b.mode}) needs {b.need}" for b in blocked)
        fix = (
            f"create it (cowfleet serve node does) or fix instances_path: {first.path}"
            if first.need == "exist"
            else f"chmod o+x {first.path} (or give {who.name} that folder's group)"
        )
        return fail(
            "instances-access",
            f"{who.name} (uid {who.uid}, from {source}) cannot reach {base}: {where}",
            fix,
            blocked=[b.path for b in blocked],
        )
    return ok("instances-access", f"{who.name} (from {source}) can reach {base}")


def check_space(s: DoctorSettings, p: Probes) -> Finding:
    space = p.space(s.instances_path)
    if space is None or space.total <= 0:
        return fail(
            "free-space",
            f"cannot read the filesystem of {s.instances_path}",
            "check instances_path",
        )
    cache = p.cache_bytes(s.instances_path)
    free_pct = 100.0 * space.free / space.total
    detail = {"free": space.free, "total": space.total, "cache": cache}
    gib = 1024**3
    if free_pct < s.min_free_percent:
        return fail(
            "free-space",
            f"{free_pct:.1f}% free on {s.instances_path}, under min_free_percent "
            f"{s.min_free_percent:g}%",
            "free space (or grow the filesystem); `cowfleet cache clean --dry-run` shows "
            "what the cache can give back",
            **detail,
        )
    if s.max_cache_bytes and cache + space.free < s.max_cache_bytes:
        return warn(
            "free-space",
            f"the cache budget ({s.max_cache_bytes / gib:.1f} GiB) is more than the cache "
            f"({cache / gib:.1f} GiB) plus free space ({space.free / gib:.1f} GiB)",
            "lower cache.max_cache_bytes, or free space: the budget can never be used",
            **detail,
        )
    budget = f"budget {s.max_cache_bytes / gib:.1f} GiB" if s.max_cache_bytes else "no budget"
    return ok(
        "free-space",
        f"{space.free / gib:.1f} GiB free ({free_pct:.1f}%), cache {cache / gib:.2f} GiB, {budget}",
        **detail,
    )


def check_clock(answer: HttpAnswer | None) -> Finding:
    """Skew of the local clock against the API's ``Date`` header (1 s resolution)."""
    if answer is None or answer.status is None or answer.date is None:
        return skip("clock", "no answer with a Date header from the compute API")
    middle = (answer.sent_at + answer.received_at) / 2
    skew = middle - answer.date
    # the header has whole seconds: up to 1 s of skew is the header's own rounding
    slack = 1.0 + (answer.received_at - answer.sent_at) / 2
    size = max(0.0, abs(skew) - slack)
    said = f"local clock {'ahead of' if skew > 0 else 'behind'} the API by {abs(skew):.1f} s"
    if size > SKEW_FAIL:
        return fail(
            "clock",
            said,
            "run NTP on every node and the API host (chrony, systemd-timesyncd)",
            skew=skew,
        )
    if size > SKEW_WARN:
        return warn("clock", said, "check NTP on this node and the API host", skew=skew)
    return ok("clock", f"{said} (within {SKEW_WARN:g} s)", skew=skew)


def check_api(s: DoctorSettings, answer: HttpAnswer | None, token_problem: str | None) -> Finding:
    if s.api_url is None:
        return skip("api", "node.api_url is not set (not a node agent's configuration)")
    if token_problem is not None:
        return fail("api", f"node token: {token_problem}", "fix node.token_file (mode 0600)")
    assert answer is not None
    url = s.api_url
    if answer.status is None:
        return fail(
            "api",
            f"{url} does not answer: {answer.error}",
            "start cowfleet-api, or fix node.api_url",
        )
    if answer.status == 200 and answer.body.get("role") == "node":
        return ok("api", f"{url} answers and accepts the node token")
    if answer.status == 401:
        return fail(
            "api",
            f"{url} refuses the node token (401)",
            'put this token in the API\'s tokens file with role = "node", or fix node.token_file',
        )
    if answer.status in (200, 403):
        return fail(
            "api",
            f"{url} accepts the token but not as a node token",
            'node.token_file must hold a role = "node" token',
        )
    return fail("api", f"{url} answered HTTP {answer.status}", "see the API's log")


def check_images(s: DoctorSettings, answer: HttpAnswer, token_problem: str | None) -> Finding:
    url = s.image_url
    if token_problem is not None:
        return fail("images", f"image token: {token_problem}", "fix the token file (mode 0600)")
    if answer.status is None:
        return fail(
            "images",
            f"{url} does not answer: {answer.error}",
            "start cowfleet-images, or fix images.url",
        )
    if answer.status == 200:
        return ok("images", f"{url} answers and accepts the token")
    if answer.status in (401, 403):
        return fail(
            "images",
            f"{url} refuses the token ({answer.status})",
            "add the token to the image service's tokens file, or fix the token file",
        )
    return fail("images", f"{url} answered HTTP {answer.status}", "see the image service's log")


def check_strays(s: DoctorSettings, p: Probes) -> list[Finding]:
    base = s.instances_path / "_base"
    try:
        strays = p.strays(s.instances_path)
    except OSError as exc:
        return [fail("base-files", f"cannot list {base}: {exc}", "check instances_path")]
    if not strays:
        return [ok("base-files", f"every file in {base} is explained by cache metadata")]
    return [
        fail(
            "base-files",
            f"{base / f.name}: {f.reason} ({f.state}, {f.bytes} bytes)",
            "find out who put it there; `cowfleet cache list --long` shows whether anything "
            "uses it; remove it if nothing does",
            name=f.name,
            state=f.state,
        )
        for f in strays
    ]
