"""deploy/prometheus/cowfleet-alerts.yml names only metrics that exist.

Each ``cowfleet_*`` identifier of the rules (PromQL parsed loosely: the histogram and
summary suffixes ``_bucket``, ``_sum`` and ``_count`` stripped) must be a family listed
in docs/metrics.md and exposed by a registry of :mod:`cowfleet.metrics`. An alert on a
renamed or misspelt metric never fires, and nothing else would tell.
"""

from __future__ import annotations

import re
from pathlib import Path

from prometheus_client import CollectorRegistry

from cowfleet.metrics import ApiMetrics, ImageMetrics, NodeMetrics

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "deploy" / "prometheus" / "cowfleet-alerts.yml"
DOC = ROOT / "docs" / "metrics.md"
NAME = re.compile(r"\bcowfleet_[a-zA-Z0-9_]*[a-zA-Z0-9]")
DOC_ROW = re.compile(r"^\|\s*`(cowfleet_[a-zA-Z0-9_]+)`\s*\|", re.MULTILINE)
SUFFIXES = ("_bucket", "_sum", "_count")


def family_of(name: str) -> str:
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def names_in_rules(text: str) -> set[str]:
    return {family_of(m.group(0)) for m in NAME.finditer(text)}


def exposed(registry: CollectorRegistry) -> set[str]:
    """The names a scrape shows for each family (a counter with its ``_total``)."""
    out = set()
    for family in registry.collect():
        out.add(family.name + "_total" if family.type == "counter" else family.name)
    return out


def defined_families(tmp_path: Path) -> set[str]:
    names: set[str] = set()
    names |= exposed(NodeMetrics(tmp_path).registry)
    names |= exposed(ApiMetrics(heartbeats=lambda: [("n1", 0.0)], clock=lambda: 1.0).registry)
    names |= exposed(ImageMetrics().registry)
    return names


def test_loose_parsing_strips_histogram_suffixes_and_ignores_other_words() -> None:
    expr = (
        'histogram_quantile(0.9, rate(cowfleet_fetch_duration_seconds_bucket{job="cowfleet-node"}'
        "[5m])) + cowfleet_x_sum / cowfleet_x_count > up"
    )
    assert names_in_rules(expr) == {"cowfleet_fetch_duration_seconds", "cowfleet_x"}


def test_every_metric_of_the_alert_rules_is_documented_and_defined(tmp_path: Path) -> None:
    used = names_in_rules(ALERTS.read_text())
    assert used, f"no cowfleet_ metric found in {ALERTS}"
    documented = set(DOC_ROW.findall(DOC.read_text()))
    defined = defined_families(tmp_path)
    assert not used - documented, (
        f"alert rules use metrics docs/metrics.md does not list: {sorted(used - documented)}"
    )
    assert not used - defined, (
        f"alert rules use metrics cowfleet.metrics does not define: {sorted(used - defined)}"
    )


def test_every_documented_family_is_defined(tmp_path: Path) -> None:
    documented = set(DOC_ROW.findall(DOC.read_text()))
    assert documented
    assert documented <= defined_families(tmp_path), sorted(documented - defined_families(tmp_path))
