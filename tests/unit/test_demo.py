"""Pure parts of ``cowfleet demo``: transcript formatting, parsing, config files."""

from __future__ import annotations

import io
import json
import tomllib
from pathlib import Path

import pytest

from cowfleet import config
from cowfleet.demo.nodes import FLAVOR, NodeSpec, node_toml, server_names, service_toml
from cowfleet.demo.scenario import created_uuid, fetch_records, traversable
from cowfleet.demo.transcript import (
    FetchSummary,
    Transcript,
    boot_proof,
    console_lines,
    console_tail,
    fetch_table,
    guest_finished,
    shell_line,
    table,
    virsh_table,
)
from cowfleet.errors import CommandError
from cowfleet.units import human_bytes


def test_human_bytes() -> None:
    assert human_bytes(0) == "0 B"
    assert human_bytes(1023) == "1023 B"
    assert human_bytes(1536) == "1.5 KiB"
    assert human_bytes(30 * (1 << 20) + (1 << 19)) == "30.5 MiB"
    assert human_bytes(3 << 30) == "3.0 GiB"


def test_shell_line_quotes_arguments_with_spaces() -> None:
    line = shell_line(["cowfleet", "image", "upload", "--property", "a=b c"])
    assert line == "$ cowfleet image upload --property 'a=b c'"


CONSOLE = (
    "SeaBIOS (version 1.16)\r\n"
    "[    1.2] Run /init as init process\r\n"
    "cowfleet-guest: booted 6.1.0-56-cloud-amd64\r\n"
    "[    2.0] virtio_blk virtio1: [vda] 2097152 512-byte logical blocks\r\n"
    "cowfleet-guest: vda sectors 2097152 ext4-magic 53ef\r\n"
    "cowfleet-guest: marker written demo\r\n"
)


def test_console_lines_keep_only_the_guests_own_lines() -> None:
    assert console_lines(CONSOLE) == [
        "cowfleet-guest: booted 6.1.0-56-cloud-amd64",
        "cowfleet-guest: vda sectors 2097152 ext4-magic 53ef",
        "cowfleet-guest: marker written demo",
    ]


def test_boot_proof_prefers_the_marker_then_the_boot_line() -> None:
    assert boot_proof(CONSOLE) == "cowfleet-guest: marker written demo"
    booted_only = CONSOLE.split("[    2.0]")[0]
    assert boot_proof(booted_only) == "cowfleet-guest: booted 6.1.0-56-cloud-amd64"
    assert boot_proof("SeaBIOS\nNo bootable device.\n") is None
    assert boot_proof("") is None


def test_virsh_table_parses_rows_below_the_rule() -> None:
    text = (
        " Id   Name           State\n"
        "------------------------------\n"
        " 5    demo-2c26-a1   running\n"
        " -    demo-2c26-a2   shut off\n"
    )
    assert virsh_table(text) == [
        ["5", "demo-2c26-a1", "running"],
        ["-", "demo-2c26-a2", "shut off"],
    ]


def test_table_round_trips_through_virsh_table() -> None:
    text = table(["Target", "Source"], [["vda", "/x/disk"], ["vdb", "/x/disk.local"]])
    assert virsh_table(text) == [["vda", "/x/disk"], ["vdb", "/x/disk.local"]]


def test_fetch_table_shows_the_per_instance_cost() -> None:
    row = FetchSummary("node-a", 3, 3, 3, 30 << 20, (30 << 20) + 900)
    assert row.naive_bytes == 90 << 20
    rows = virsh_table(fetch_table([row, FetchSummary("node-b", 3, 3, 3, 30 << 20, None)]))
    assert rows[0] == ["node-a", "3", "3", "3", "30.0 MiB", "30.0 MiB", "90.0 MiB"]
    assert rows[1][5] == "-"


def test_transcript_numbers_steps_and_indents_output() -> None:
    buf = io.StringIO()
    t = Transcript(buf)
    t.step("First")
    t.command(["cowfleet", "server", "list"], "a\nb\n")
    t.step("Second")
    t.warn("DRIVER: none. " + "word " * 40)
    text = buf.getvalue()
    assert "== 1. First\n$ cowfleet server list\n    a\n    b\n" in text
    assert "== 2. Second" in text
    bang = [ln for ln in text.splitlines() if ln.startswith("!")]
    assert bang[0] == "!" * 96 and bang[-1] == "!" * 96 and "DRIVER: none." in bang[1]
    assert "\033[" not in text  # no escapes unless asked (a pipe, a test)


def test_created_uuid() -> None:
    out = "created server demo-1-a1 (2c11f785-7412-4643-a07f-cbe4369d336f) in /v/node-a/2c1\n"
    assert created_uuid(out) == "2c11f785-7412-4643-a07f-cbe4369d336f"
    with pytest.raises(CommandError):
        created_uuid("created server x in (somewhere)")


def test_fetch_records_counts_downloads_since_a_time(tmp_path: Path) -> None:
    meta = tmp_path / "_base" / ".cowfleet"
    meta.mkdir(parents=True)
    (meta / "old.json").write_text(json.dumps({"fetched_at": 100.0, "image_size": 5}))
    (meta / "new.json").write_text(json.dumps({"fetched_at": 200.0, "image_size": 7}))
    (meta / "new.part.json").write_text(json.dumps({"started_at": 200.0}))
    (meta / "broken.json").write_text("{")
    recs = fetch_records(tmp_path, 150.0)
    assert [r["image_size"] for r in recs] == [7]
    assert fetch_records(tmp_path / "nowhere", 0.0) == []


def test_node_config_is_loadable_and_defines_the_flavor(tmp_path: Path) -> None:
    node = NodeSpec("node-a", "a", tmp_path / "node-a", tmp_path / "node-a.toml")
    text = node_toml(
        node,
        home=tmp_path,
        url="http://127.0.0.1:9300",
        token_file=tmp_path / "images" / "token",
        driver="libvirt",
        uri="qemu:///system",
        virt_type="qemu",
    )
    node.config_file.write_text(text)
    cfg = config.load(node.config_file, env={})
    assert cfg.instances_path == tmp_path / "node-a"
    assert cfg.base_dir == tmp_path / "node-a" / "_base"
    assert (cfg.driver, cfg.virt_type, cfg.endpoint) == ("libvirt", "qemu", "http://127.0.0.1:9300")
    assert cfg.token_file == tmp_path / "images" / "token"
    (flavor,) = cfg.flavors
    assert flavor.name == FLAVOR and flavor.ephemeral_gb > 0 and flavor.swap_mb > 0


def test_service_config_quotes_paths(tmp_path: Path) -> None:
    odd = tmp_path / 'with "quote" and space'
    data = tomllib.loads(service_toml(odd, odd / "images", 9292, odd / "t"))
    assert data["images"]["data_dir"] == str(odd / "images")
    assert data["images"]["port"] == 9292


def test_server_names_are_unique_across_nodes() -> None:
    a = NodeSpec("node-a", "a", Path("/a"), Path("/a.toml"))
    b = NodeSpec("node-b", "b", Path("/b"), Path("/b.toml"))
    names = server_names("1f2e", a, 3) + server_names("1f2e", b, 3)
    assert len(set(names)) == 6
    assert names[0] == "demo-1f2e-a1" and names[-1] == "demo-1f2e-b3"


def test_guest_finished_on_marker_or_power_off_only() -> None:
    assert guest_finished(CONSOLE)
    assert not guest_finished("cowfleet-guest: booted 6.1\r\n[ 3.0] virtio_blk\r\n")
    assert guest_finished("cowfleet-guest: booted 6.1\ncowfleet-guest: no /dev/vda\n")
    assert guest_finished("cowfleet-guest: booted 6.1\ncowfleet-guest: powering off\n")


def test_console_tail() -> None:
    assert console_tail("") == "(console empty)"
    assert console_tail("a\r\n\r\nb\r\nc\n", lines=2) == "b | c"


def test_traversable() -> None:
    import shutil
    import tempfile

    root = Path(tempfile.mkdtemp(dir="/var/tmp"))  # /var/tmp is 1777: others may pass
    try:
        inner = root / "a" / "b"
        inner.mkdir(parents=True)
        for folder in (root, root / "a", inner):
            folder.chmod(0o755)
        assert traversable(inner)
        (root / "a").chmod(0o750)
        assert not traversable(inner)
        assert traversable(root)
        assert not traversable(root / "missing")
    finally:
        shutil.rmtree(root)
