"""Configuration files of the demo: one for the image service, one per node (pure)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FLAVOR = "demo.small"
FLAVOR_SPEC: dict[str, int] = {
    "vcpus": 1,
    "ram_mb": 256,
    "root_gb": 1,
    "ephemeral_gb": 1,
    "swap_mb": 64,
}


def _q(value: object) -> str:
    """A TOML scalar (JSON strings are valid TOML basic strings)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return json.dumps(str(value))


def render_toml(tables: dict[str, dict[str, Any]], top: dict[str, Any]) -> str:
    lines = [f"{k} = {_q(v)}" for k, v in top.items()]
    for name, table in tables.items():
        lines.append("")
        lines.append(f"[{name}]")
        lines.extend(f"{k} = {_q(v)}" for k, v in table.items())
    return "\n".join(lines) + "\n"


def service_toml(home: Path, data_dir: Path, port: int, token_file: Path) -> str:
    return render_toml(
        {
            "images": {
                "host": "127.0.0.1",
                "port": port,
                "data_dir": str(data_dir),
                "token_file": str(token_file),
            }
        },
        {"home": str(home)},
    )


@dataclass(frozen=True)
class NodeSpec:
    name: str  # "node-a"
    short: str  # "a": used in domain names
    instances_path: Path
    config_file: Path


def node_toml(
    node: NodeSpec, *, home: Path, url: str, token_file: Path, driver: str, uri: str, virt_type: str
) -> str:
    """A compute node: its own instances path (with its own ``_base``), same image service."""
    tables: dict[str, dict[str, Any]] = {
        "images": {"url": url, "token_file": str(token_file)},
        "compute": {"driver": driver, "libvirt_uri": uri, "virt_type": virt_type},
        f"flavors.{FLAVOR}": dict(FLAVOR_SPEC),
    }
    return render_toml(tables, {"home": str(home), "instances_path": str(node.instances_path)})


def server_names(run_id: str, node: NodeSpec, count: int) -> list[str]:
    """Domain names unique across both nodes (they share one libvirtd) and across runs."""
    return [f"demo-{run_id}-{node.short}{i}" for i in range(1, count + 1)]
