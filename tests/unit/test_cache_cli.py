from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest

from cowfleet.cache.cache import ImageCache
from cowfleet.cli.main import main
from cowfleet.config import Config
from tests.unit._cache_fakes import FakeClient, image_for


def _populate(inst: Path) -> str:
    data = os.urandom(100_000)
    client = FakeClient()
    iid = str(uuid.uuid4())
    client.add(image_for(iid, data, name="tiny"), data)
    ImageCache(Config(home=inst.parent, instances_path=inst), client).ensure_cached(iid)  # type: ignore[arg-type]
    return iid


def test_list_json_and_verify(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inst = tmp_path / "inst"
    iid = _populate(inst)
    (inst / "_base" / "stray.part").write_text("x")
    common = ["--home", str(tmp_path), "--instances-path", str(inst)]
    assert main(["cache", "list", "--output", "json", *common]) == 0
    entries = {e["name"]: e for e in json.loads(capsys.readouterr().out)}
    [base] = [e for e in entries.values() if e["kind"] == "base"]
    assert base["image_id"] == iid and base["image_name"] == "tiny"
    assert base["state"] == "verified" and base["allocated"] > 0
    assert entries["stray.part"]["state"] == "stray"
    assert main(["cache", "list", *common]) == 0
    assert iid in capsys.readouterr().out
    assert main(["cache", "verify", *common]) == 0
    with open(base["path"], "r+b") as fh:
        fh.write(b"\x00\x01\x02")
    assert main(["cache", "verify", iid, *common]) == 7
    assert "FAILED" in capsys.readouterr().out


def test_fetch_rejects_non_uuid_without_network(tmp_path: Path) -> None:
    # a name needs the image service; none is reachable: "unavailable" (exit 8)
    rc = main(
        [
            "cache",
            "fetch",
            "no-such-name",
            "--home",
            str(tmp_path),
            "--instances-path",
            str(tmp_path / "i"),
            "--image-url",
            "http://127.0.0.1:9",
        ]
    )
    assert rc == 8


def test_clean_dry_run_then_real_pass_through_the_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inst = tmp_path / "inst"
    iid = _populate(inst)
    common = ["--home", str(tmp_path), "--instances-path", str(inst)]
    base = next(p for p in (inst / "_base").iterdir() if p.is_file())
    # young: kept with its age; --min-age 0: any unused base goes
    assert main(["cache", "clean", "--dry-run", *common]) == 0
    out = capsys.readouterr().out
    assert "kept" in out and "removed after 1.0 d" in out and "dry run:" in out
    assert main(["cache", "clean", "--dry-run", "--min-age", "0", "-o", "json", *common]) == 0
    report = json.loads(capsys.readouterr().out)
    [d] = [d for d in report["decisions"] if d["image_id"] == iid]
    assert (d["action"], d["done"], report["dry_run"]) == ("remove", False, True)
    assert base.exists()
    assert main(["cache", "clean", "--min-age", "0", *common]) == 0
    assert "removed" in capsys.readouterr().out
    assert not base.exists()


@pytest.mark.parametrize("bad", ["-1", "soon", "inf", "nan"])
def test_clean_refuses_a_bad_min_age(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], bad: str
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["cache", "clean", "--home", str(tmp_path), "--min-age", bad])
    assert exc.value.code == 2
    assert "--min-age" in capsys.readouterr().err


def test_node_run_once_json_on_an_empty_node(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inst = tmp_path / "inst"
    rc = main(["node", "run", "--once", "-o", "json", "--home", str(tmp_path),
               "--instances-path", str(inst)])  # fmt: skip
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["number"] == 1 and report["clean"]["decisions"] == []
    assert not inst.exists()  # a pass on nothing creates nothing
