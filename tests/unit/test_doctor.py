"""`cowfleet doctor`: each check's verdicts, fed by fake probes."""

from __future__ import annotations

import dataclasses
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from cowfleet.doctor import access, checks, qemuconf
from cowfleet.doctor.access import Identity, Node
from cowfleet.doctor.checks import DoctorSettings
from cowfleet.doctor.model import EXIT_FAILED, EXIT_OK, exit_code, ok, warn
from cowfleet.doctor.probes import HttpAnswer, Probes, ProgramRun, Space, StrayFile
from cowfleet.errors import ConfigError

GIB = 1024**3
DIR = stat.S_IFDIR
QEMU = Identity("libvirt-qemu", 64055, frozenset({64055, 108}))

TREE = {
    "/": Node(DIR | 0o755, 0, 0),
    "/srv": Node(DIR | 0o755, 0, 0),
    "/srv/nova": Node(DIR | 0o755, 0, 0),
    "/srv/nova/_base": Node(DIR | 0o755, 0, 0),
    "/dev": Node(DIR | 0o755, 0, 0),
    "/dev/kvm": Node(stat.S_IFCHR | 0o660, 0, 108),
}


def settings(**kw: Any) -> DoctorSettings:
    base: dict[str, Any] = dict(
        driver="libvirt",
        virt_type="kvm",
        instances_path=Path("/srv/nova"),
        max_cache_bytes=0,
        min_free_percent=5.0,
        api_url="http://api:8774",
        image_url="http://images:9292",
    )
    base.update(kw)
    return DoctorSettings(**base)


def probes(**kw: Any) -> Probes:
    tree = dict(TREE)
    tree.update(kw.pop("tree", {}))
    versions = kw.pop(
        "versions",
        {
            "qemu-img": "qemu-img version 7.2.22 (Debian 1:7.2+dfsg-7)",
            "qemu-system-x86_64": "QEMU emulator version 7.2.22",
            "virsh": "9.0.0",
        },
    )

    def run(argv: Sequence[str]) -> ProgramRun | None:
        out = versions.get(argv[0])
        return None if out is None else ProgramRun(0, out)

    users = {"libvirt-qemu": QEMU, "+64055": QEMU, "root": Identity("root", 0, frozenset({0}))}
    base: dict[str, Any] = dict(
        which=lambda name: f"/usr/bin/{name}" if name in versions else None,
        run=run,
        read_text=lambda path: None,
        stat=lambda path: tree.get(path),
        can_rw=lambda path: True,
        user=lambda name: users.get(name),
        group_id=lambda name: {"kvm": 108, "disk": 6}.get(name),
        qemu_uids=lambda: (),
        space=lambda path: Space(100 * GIB, 50 * GIB),
        cache_bytes=lambda path: 10 * GIB,
        strays=lambda path: (),
        http_get=lambda url, token: HttpAnswer(200),
        read_token=lambda path, allow: "node-token-xxxxxxxxxxxx",
        now=lambda: 1000.0,
    )
    base.update(kw)
    return Probes(**base)


def verdicts(findings: Sequence[Any]) -> dict[str, str]:
    return {f.check: f.verdict for f in findings}


def test_programs_present_with_versions_missing_fails_only_where_needed() -> None:
    found = checks.check_programs(settings(), probes())
    assert verdicts(found) == {"qemu-img": "ok", "qemu": "ok", "libvirt": "ok"}
    assert found[0].detail["version"] == "7.2.22" and found[2].detail["version"] == "9.0.0"
    bare = probes(versions={"qemu-img": "qemu-img version 8.0.0"})
    assert verdicts(checks.check_programs(settings(), bare)) == {
        "qemu-img": "ok",
        "qemu": "fail",
        "libvirt": "fail",
    }
    assert verdicts(checks.check_programs(settings(driver="none"), bare)) == {
        "qemu-img": "ok",
        "qemu": "warn",
        "libvirt": "warn",
    }
    none = checks.check_programs(settings(driver="none"), probes(versions={}))
    assert none[0].verdict == "fail" and "qemu-utils" in (none[0].fix or "")
    garbled = probes(versions={"qemu-img": "segfault", "qemu-system-x86_64": "x", "virsh": "y"})
    assert checks.check_programs(settings(), garbled)[0].verdict == "fail"


def test_qemu_user_from_a_running_qemu_then_qemu_conf_then_the_default() -> None:
    who, source = checks.qemu_identity(probes(qemu_uids=lambda: (64055,)))
    assert who == QEMU and "running QEMU" in source
    conf = 'user = "root"  # run as root\ngroup = "disk"\n#user = "nobody"\n'
    who, source = checks.qemu_identity(probes(read_text=lambda p: conf))
    assert who is not None and who.uid == 0 and 6 in who.gids and "qemu.conf" in source
    who, source = checks.qemu_identity(probes())
    assert who == QEMU and "default" in source
    who, source = checks.qemu_identity(probes(user=lambda n: None))
    assert who is None and "does not exist" in source
    assert qemuconf.parse('user = "+107"\n') == qemuconf.QemuIdentity("+107", None)


def test_kvm_usable_tcg_or_what_to_fix() -> None:
    s, p = settings(), probes()
    assert checks.check_kvm(s, p, QEMU).verdict == "ok"
    assert checks.check_kvm(settings(virt_type="qemu"), p, QEMU).message.startswith("TCG")
    assert checks.check_kvm(settings(driver="none"), p, QEMU).verdict == "skip"
    gone = probes(stat=lambda path: None if path == "/dev/kvm" else TREE.get(path))
    missing = checks.check_kvm(s, gone, QEMU)
    assert missing.verdict == "fail" and 'virt_type = "qemu"' in (missing.fix or "")
    outsider = Identity("libvirt-qemu", 64055, frozenset({64055}))
    denied = checks.check_kvm(s, p, outsider)
    assert denied.verdict == "fail" and "adduser libvirt-qemu kvm" in (denied.fix or "")
    assert checks.check_kvm(s, probes(can_rw=lambda path: False), None).verdict == "fail"


def test_instances_path_walk_names_the_folder_qemu_cannot_search() -> None:
    s = settings()
    assert checks.check_instances_access(s, probes(), QEMU, "x").verdict == "ok"
    closed = probes(tree={"/srv": Node(DIR | 0o700, 0, 0)})
    found = checks.check_instances_access(s, closed, QEMU, "qemu.conf")
    assert found.verdict == "fail"
    assert found.detail["blocked"] == ["/srv"] and found.fix == (
        "chmod o+x /srv (or give libvirt-qemu that folder's group)"
    )
    # group access is enough; root passes
    grouped = probes(tree={"/srv": Node(DIR | 0o710, 0, 108)})
    assert checks.check_instances_access(s, grouped, QEMU, "x").verdict == "ok"
    root = Identity("root", 0, frozenset({0}))
    assert checks.check_instances_access(s, closed, root, "x").verdict == "ok"
    nobase = probes(stat=lambda p: None if p.endswith("_base") else TREE.get(p))
    found = checks.check_instances_access(s, nobase, QEMU, "x")
    assert found.verdict == "fail" and "needs exist" in found.message
    assert checks.check_instances_access(s, probes(), None, "gone").verdict == "fail"
    assert checks.check_instances_access(settings(driver="none"), closed, QEMU, "x").verdict == (
        "skip"
    )


def test_access_walk_modes() -> None:
    f = Node(stat.S_IFREG | 0o640, 5, 7)
    assert access.allowed(f, Identity("o", 5, frozenset({5})), access.R | access.W)
    assert access.allowed(f, Identity("g", 6, frozenset({7})), access.R)
    assert not access.allowed(f, Identity("g", 6, frozenset({7})), access.W)
    assert not access.allowed(f, Identity("x", 9, frozenset({9})), access.R)
    assert not access.allowed(f, Identity("root", 0, frozenset({0})), access.X)


def test_free_space_against_floor_and_budget() -> None:
    s = settings()
    assert checks.check_space(s, probes()).verdict == "ok"
    low = probes(space=lambda p: Space(100 * GIB, 3 * GIB))
    found = checks.check_space(s, low)
    assert found.verdict == "fail" and "min_free_percent" in found.message
    big = settings(max_cache_bytes=80 * GIB)  # 10 cached + 50 free < 80
    found = checks.check_space(big, probes())
    assert found.verdict == "warn" and "max_cache_bytes" in (found.fix or "")
    assert checks.check_space(settings(max_cache_bytes=40 * GIB), probes()).verdict == "ok"
    assert checks.check_space(s, probes(space=lambda p: None)).verdict == "fail"


@pytest.mark.parametrize(
    ("skew", "verdict"), [(0.0, "ok"), (3.0, "ok"), (-20.0, "warn"), (120.0, "fail")]
)
def test_clock_skew_against_the_api_date(skew: float, verdict: str) -> None:
    answer = HttpAnswer(200, date=1000.0, sent_at=1000.0 + skew, received_at=1000.2 + skew)
    found = checks.check_clock(answer)
    assert found.verdict == verdict
    if skew:
        assert ("ahead" if skew > 0 else "behind") in found.message
    assert checks.check_clock(None).verdict == "skip"
    assert checks.check_clock(HttpAnswer(None, error="refused")).verdict == "skip"


def test_api_reachable_with_the_node_token() -> None:
    s = settings()
    node = HttpAnswer(200, body={"role": "node", "project": "service"})
    assert checks.check_api(s, node, None).verdict == "ok"
    refused = checks.check_api(s, HttpAnswer(401), None)
    assert refused.verdict == "fail" and "401" in refused.message
    user = checks.check_api(s, HttpAnswer(200, body={"role": "member"}), None)
    assert user.verdict == "fail" and "not as a node token" in user.message
    down = checks.check_api(s, HttpAnswer(None, error="connection refused"), None)
    assert down.verdict == "fail" and "connection refused" in down.message
    assert checks.check_api(s, None, "token file not found: /x").verdict == "fail"
    assert checks.check_api(settings(api_url=None), None, None).verdict == "skip"
    assert checks.check_api(s, HttpAnswer(500), None).verdict == "fail"


def test_image_service_reachable_with_the_token() -> None:
    s = settings()
    assert checks.check_images(s, HttpAnswer(200), None).verdict == "ok"
    assert checks.check_images(s, HttpAnswer(401), None).verdict == "fail"
    assert checks.check_images(s, HttpAnswer(None, error="timeout"), None).verdict == "fail"
    assert checks.check_images(s, HttpAnswer(200), "empty").verdict == "fail"


def test_base_files_no_metadata_explains_are_each_a_failure() -> None:
    s = settings()
    assert verdicts(checks.check_strays(s, probes())) == {"base-files": "ok"}
    strays = (
        StrayFile("deadbeef" * 5, "foreign", "no cowfleet metadata", 4096),
        StrayFile("notes.txt", "stray", "unknown file in _base", 3),
    )
    found = checks.check_strays(s, probes(strays=lambda p: strays))
    assert [f.verdict for f in found] == ["fail", "fail"]
    assert "/srv/nova/_base/notes.txt: unknown file in _base" in found[1].message
    assert exit_code(found) == EXIT_FAILED


def test_exit_code_fails_only_on_failures() -> None:
    assert exit_code([ok("a", "fine"), warn("b", "meh", "do x")]) == EXIT_OK
    assert EXIT_FAILED == 11


def test_runner_uses_the_node_token_for_both_services(tmp_path: Path) -> None:
    from cowfleet import config
    from cowfleet.doctor.runner import WHOAMI, run_checks

    calls: list[tuple[str, str | None]] = []

    def get(url: str, token: str | None) -> HttpAnswer:
        calls.append((url, token))
        body = {"role": "node"} if url.endswith(WHOAMI) else {}
        return HttpAnswer(200, date=1000.0, sent_at=1000.0, received_at=1000.0, body=body)

    cfg = config.load(
        None,
        env={
            "COWFLEET_HOME": str(tmp_path),
            "COWFLEET_NODE_API_URL": "http://api:8774/",
            "COWFLEET_NODE_TOKEN_FILE": str(tmp_path / "t"),
            "COWFLEET_IMAGE_URL": "http://images:9292",
            "COWFLEET_DRIVER": "none",
        },
    )
    found = run_checks(cfg, probes(http_get=get), arch="x86_64")
    assert calls == [
        ("http://api:8774/internal/whoami", "node-token-xxxxxxxxxxxx"),
        ("http://images:9292/v2/images?limit=1", "node-token-xxxxxxxxxxxx"),
    ]
    assert exit_code(found) == EXIT_OK, [f for f in found if f.verdict == "fail"]

    def bad(path: Path, allow: bool) -> str:
        raise ConfigError(f"token file {path} is empty")

    found = run_checks(cfg, probes(http_get=get, read_token=bad), arch="x86_64")
    assert verdicts(found)["api"] == "fail" and verdicts(found)["images"] == "fail"
    assert dataclasses.is_dataclass(found[0])


def test_whoami_tells_unknown_from_node_and_user_tokens(tmp_path: Path) -> None:
    from tests.unit._api_fakes import MEMBER_A, NODE, api

    with api(tmp_path) as (client, _nodes, _clock):
        assert client.get("/internal/whoami").status_code == 401
        assert client.get("/internal/whoami", headers={"X-Auth-Token": "x" * 20}).status_code == 401
        node = client.get("/internal/whoami", headers={"X-Auth-Token": NODE})
        assert node.json() == {"role": "node", "project": "service"}
        member = client.get("/internal/whoami", headers={"X-Auth-Token": MEMBER_A}).json()
        assert member == {"role": "member", "project": "alpha"}
