"""Every runtime dependency is pinned to a range, and the installed versions (those the
tests run on) are inside it."""

from __future__ import annotations

import os
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def runtime_requirements() -> list[Requirement]:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    specs = list(project["dependencies"])
    for name, extra in project["optional-dependencies"].items():
        if name != "test":  # tools, not what the product runs on
            specs.extend(extra)
    return [Requirement(s) for s in specs]


@pytest.mark.parametrize("req", runtime_requirements(), ids=str)
def test_dependency_has_a_lower_and_an_upper_bound(req: Requirement) -> None:
    ops = {spec.operator for spec in req.specifier}
    assert ">=" in ops and "<" in ops, f"{req}: pin it as >=TESTED,<NEXT"


@pytest.mark.parametrize("req", runtime_requirements(), ids=str)
def test_installed_version_is_in_the_pinned_range(req: Requirement) -> None:
    try:
        version = metadata.version(req.name)
    except metadata.PackageNotFoundError:
        if os.environ.get("CI") == "true":  # CI installs every extra
            pytest.fail(f"{req.name} is not installed")
        pytest.skip(f"{req.name} is not installed here (an optional extra)")
    assert req.specifier.contains(version, prereleases=True), f"{req.name} {version} not in {req}"
