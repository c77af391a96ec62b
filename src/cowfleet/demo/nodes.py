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


def service_toml(
    home: Path, data_dir: Path, port: int, token_file: Path, tokens_file: Path | None = None
) -> str:
    images: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": port,
        "data_dir": str(data_dir),
        "token_file": str(token_file),
    }
    if tokens_file is not None:  # the shared tokens file: the fleet's node token works too
        images["tokens_file"] = str(tokens_file)
    return render_toml({"images": images}, {"home": str(home)})


# The demo's projects and roles in the shared tokens file (image service and compute API).
DEMO_PROJECT = "demo"


def tokens_toml(admin_token: str, node_token: str) -> str:
    """The shared tokens file: the demo's own token (admin) and the node agents' token."""
    return (
        f'[[token]]\ntoken = "{admin_token}"\nproject = "{DEMO_PROJECT}"\nrole = "admin"\n\n'
        f'[[token]]\ntoken = "{node_token}"\nproject = "service"\nrole = "node"\n'
    )


@dataclass(frozen=True)
class AgentSpec:
    """A node agent of the demo's fleet: its name, loopback address, port and folders."""

    name: str  # "fleet-a"
    address: str  # "127.0.0.2"
    port: int
    instances_path: Path
    config_file: Path

    @property
    def url(self) -> str:
        return f"http://{self.address}:{self.port}"


# What each agent offers: room for three demo.small servers (RAM and disk bound it).
AGENT_CAPACITY = {"vcpus": 2, "ram_mb": 768, "disk_gb": 9}


def api_toml(home: Path, data_dir: Path, port: int, tokens_file: Path, image_url: str) -> str:
    tables: dict[str, dict[str, Any]] = {
        "api": {
            "host": "127.0.0.1",
            "port": port,
            "data_dir": str(data_dir),
            "tokens_file": str(tokens_file),
            "heartbeat_interval": 2,
        },
        "images": {"url": image_url},
    }
    return render_toml(tables, {"home": str(home)})


def agent_toml(
    agent: AgentSpec,
    *,
    home: Path,
    api_url: str,
    image_url: str,
    token_file: Path,
    driver: str,
    uri: str,
    virt_type: str,
) -> str:
    node = {
        "api_url": api_url,
        "token_file": str(token_file),
        "host": agent.address,
        "port": agent.port,
        "hostname": agent.name,
        **AGENT_CAPACITY,
    }
    tables: dict[str, dict[str, Any]] = {
        "node": node,
        "images": {"url": image_url},
        "compute": {"driver": driver, "libvirt_uri": uri, "virt_type": virt_type},
    }
    return render_toml(tables, {"home": str(home), "instances_path": str(agent.instances_path)})


def client_toml(home: Path, api_url: str, token_file: Path, image_url: str) -> str:
    """What the ``cowfleet`` CLI needs to work through the compute API."""
    tables: dict[str, dict[str, Any]] = {
        "client": {"api_url": api_url, "api_token_file": str(token_file)},
        "images": {"url": image_url, "token_file": str(token_file)},
    }
    return render_toml(tables, {"home": str(home)})


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
