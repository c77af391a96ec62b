"""The qemu-img wrapper's argv, limits and output parsing, with a recording fake runner."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from cowfleet import proc, qemuimg
from cowfleet.errors import CommandError, UsageError


class FakeRunner:
    """Records every call and answers with a canned exit code and stdout."""

    def __init__(self, stdout: Any = "", returncode: int = 0, stderr: str = "") -> None:
        self.stdout = stdout if isinstance(stdout, str) else json.dumps(stdout)
        self.returncode = returncode
        self.stderr = stderr
        self.calls: list[dict[str, Any]] = []

    def __call__(self, argv: Sequence[str], **kwargs: Any) -> proc.Completed:
        self.calls.append({"argv": list(argv), **kwargs})
        ok = kwargs.get("ok_codes", (0,))
        if kwargs.get("check", True) and self.returncode not in ok:
            raise CommandError(
                "qemu-img failed", argv=argv, returncode=self.returncode, stderr=self.stderr
            )
        return proc.Completed(tuple(argv), self.returncode, self.stdout, self.stderr, 0.01)


INFO = {
    "virtual-size": 21474836480,
    "filename": "disk",
    "cluster-size": 65536,
    "format": "qcow2",
    "actual-size": 200704,
    "format-specific": {"type": "qcow2", "data": {"compat": "1.1", "lazy-refcounts": False}},
    "full-backing-filename": "/base",
    "backing-filename": "/base",
    "backing-filename-format": "raw",
    "dirty-flag": False,
}


def test_info_argv_limits_and_parse() -> None:
    run = FakeRunner(INFO)
    info = qemuimg.info(Path("disk"), "qcow2", runner=run)
    call = run.calls[0]
    assert call["argv"] == [
        "qemu-img",
        "info",
        "-f",
        "qcow2",
        "--output=json",
        "--force-share",
        "disk",
    ]
    assert call["limits"] == proc.UNTRUSTED
    assert call["timeout"] > 0
    assert info.virtual_size == 21474836480
    assert info.actual_size == 200704
    assert info.cluster_size == 65536
    assert info.backing_filename == "/base"
    assert info.backing_filename_format == "raw"
    assert info.format_specific == INFO["format-specific"]
    assert info.dirty_flag is False
    assert info.chain == ()


def test_info_backing_chain() -> None:
    base = {
        "virtual-size": 1024,
        "filename": "/base",
        "format": "raw",
        "actual-size": 0,
        "dirty-flag": False,
    }
    run = FakeRunner([INFO, base])
    top = qemuimg.info(Path("disk"), "qcow2", backing_chain=True, runner=run)
    assert "--backing-chain" in run.calls[0]["argv"]
    assert top.format == "qcow2"
    assert [layer.format for layer in top.chain] == ["raw"]
    assert top.chain[0].cluster_size is None
    run2 = FakeRunner([INFO, base])
    assert [i.filename for i in qemuimg.info_chain(Path("disk"), "qcow2", runner=run2)] == [
        "disk",
        "/base",
    ]


def test_info_garbage_output_is_command_error() -> None:
    with pytest.raises(CommandError, match="not JSON"):
        qemuimg.info(Path("disk"), "raw", runner=FakeRunner("Formatting..."))
    with pytest.raises(CommandError, match="unexpected"):
        qemuimg.info(Path("disk"), "raw", runner=FakeRunner({"format": "raw"}))


@pytest.mark.parametrize("fmt", ["", "-b", "raw,file.driver=ssh"])
def test_format_is_always_explicit_and_sane(fmt: str) -> None:
    with pytest.raises(UsageError):
        qemuimg.info(Path("disk"), fmt, runner=FakeRunner(INFO))


CHECK_CLEAN = {
    "image-end-offset": 262144,
    "total-clusters": 16384,
    "check-errors": 0,
    "filename": "disk",
    "format": "qcow2",
}


def test_check_clean() -> None:
    run = FakeRunner(CHECK_CLEAN)
    res = qemuimg.check(Path("disk"), "qcow2", runner=run)
    assert run.calls[0]["argv"] == ["qemu-img", "check", "-f", "qcow2", "--output=json", "disk"]
    assert run.calls[0]["limits"] == proc.UNTRUSTED
    assert res.clean and not res.corrupt and not res.leaked
    assert res.image_end_offset == 262144


def test_check_leaks_are_fields() -> None:
    res = qemuimg.check(
        Path("disk"), "qcow2", runner=FakeRunner({**CHECK_CLEAN, "leaks": 3}, returncode=3)
    )
    assert res.returncode == 3 and res.leaks == 3
    assert res.leaked and not res.corrupt and not res.clean


def test_check_corruptions_are_fields() -> None:
    res = qemuimg.check(
        Path("disk"),
        "qcow2",
        runner=FakeRunner({**CHECK_CLEAN, "corruptions": 2, "leaks": 1}, returncode=2),
    )
    assert res.corrupt and res.corruptions == 2 and not res.clean


def test_check_could_not_check_raises_with_context() -> None:
    run = FakeRunner("", returncode=1, stderr="qemu-img: Could not open 'disk'")
    with pytest.raises(CommandError) as err:
        qemuimg.check(Path("disk"), "qcow2", runner=run)
    assert err.value.returncode == 1
    assert "Could not open" in err.value.stderr
    assert err.value.argv[:4] == ["qemu-img", "check", "-f", "qcow2"]


def test_convert_argv() -> None:
    run = FakeRunner()
    qemuimg.convert(Path("a.qcow2"), "qcow2", Path("b.raw"), runner=run)
    assert run.calls[0]["argv"] == [
        "qemu-img",
        "convert",
        "-f",
        "qcow2",
        "-O",
        "raw",
        "a.qcow2",
        "b.raw",
    ]
    assert run.calls[0]["limits"].address_space == proc.UNTRUSTED.address_space
    run = FakeRunner()
    qemuimg.convert(Path("a"), "vmdk", Path("b"), "qcow2", sparse=False, cache="none", runner=run)
    assert run.calls[0]["argv"] == [
        "qemu-img",
        "convert",
        "-f",
        "vmdk",
        "-O",
        "qcow2",
        "-t",
        "none",
        "-S",
        "0",
        "a",
        "b",
    ]


def test_create_argv() -> None:
    run = FakeRunner()
    qemuimg.create(
        Path("d"),
        "qcow2",
        1024,
        backing=Path("/b,c"),
        backing_fmt="raw",
        options={"cluster_size": "512", "backing_file": "/x,y"},
        runner=run,
    )
    assert run.calls[0]["argv"] == [
        "qemu-img",
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "/b,c",
        "-F",
        "raw",
        "-o",
        "cluster_size=512,backing_file=/x,,y",
        "d",
        "1024",
    ]
    with pytest.raises(UsageError, match="backing format"):
        qemuimg.create(Path("d"), "qcow2", 1, backing=Path("/b"), runner=FakeRunner())
