"""The demo's fleet part: a compute API, two node agents, boots through the API.

After the two hand-driven nodes, the demo starts ``cowfleet serve api`` and two
``cowfleet serve node`` agents (127.0.0.2 and 127.0.0.3, each with its own
instances path), and boots through the API with the ``cowfleet`` CLI: one request
for two servers (``--max 2``), then one more server that follows the cache to the
node that already holds the image although the other has more free RAM, then one
that no longer fits there and goes to the other node, which downloads the image
once. ``server show`` tells why (``cowfleet:placement``), ``server list`` has a
Host column, and the downloads are counted from each node's cache records.
"""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cowfleet import proc
from cowfleet.demo.nodes import (
    AGENT_CAPACITY,
    FLAVOR,
    FLAVOR_SPEC,
    AgentSpec,
    agent_toml,
    api_toml,
    client_toml,
)
from cowfleet.demo.service import Background, pick_port
from cowfleet.demo.transcript import Transcript, table
from cowfleet.errors import BackendUnavailableError, CowfleetError

API_PORT = 8774
AGENT_PORT = 8775
AGENTS = (("fleet-a", "127.0.0.2"), ("fleet-b", "127.0.0.3"))
REGISTER_TIMEOUT = 60.0

Cli = Callable[..., proc.Completed]


@dataclass
class FleetState:
    """What the fleet part started, for cleanup (and ``--keep``)."""

    client_config: Path
    api: Background | None = None
    agents: list[Background] = field(default_factory=list)
    specs: list[AgentSpec] = field(default_factory=list)
    servers: list[str] = field(default_factory=list)  # server names, as the API knows them

    def processes(self) -> list[Background]:
        return [*self.agents, *([self.api] if self.api is not None else [])]


def node_token_file(home: Path) -> Path:
    return home / "node-token"


def new_node_token() -> str:
    return "node-" + secrets.token_urlsafe(24)


class FleetTour:
    def __init__(
        self,
        t: Transcript,
        cli: Cli,
        cli_json: Callable[[Sequence[str]], Any],
        env: dict[str, str],
    ) -> None:
        self.t = t
        self.cli = cli
        self.cli_json = cli_json
        self.env = env

    # -- setting up ------------------------------------------------------------------
    def start(
        self,
        fs: FleetState,
        home: Path,
        *,
        image_url: str,
        tokens_file: Path,
        admin_token_file: Path,
        driver: str,
        uri: str,
    ) -> None:
        """Start the API and the agents, recording each in ``fs`` as it starts."""
        t = self.t
        port = pick_port(API_PORT)
        api_url = f"http://127.0.0.1:{port}"
        cfg = home / "api.toml"
        cfg.write_text(api_toml(home, home / "api", port, tokens_file, image_url))
        fs.client_config.write_text(client_toml(home, api_url, admin_token_file, image_url))
        t.step("The fleet: a compute API and two node agents on this machine")
        t.say(
            "The same machine now plays a small cloud. `cowfleet serve api` is a Nova-compatible "
            "compute API with a scheduler that knows which node already holds which image; "
            "`cowfleet serve node` is the agent of one compute node. Two agents, on "
            f"{AGENTS[0][1]} and {AGENTS[1][1]}, each with its own instances path and _base, "
            f"register with it and offer room for three {FLAVOR} servers each. One tokens file "
            "serves the API and the image service: the demo's token (admin) and the agents' "
            "node token."
        )
        api = Background(
            "the compute API",
            ["cowfleet", "serve", "api", "--config", str(cfg)],
            f"{api_url}/",
            home / "api-serve.log",
            self.env,
        )
        t.command(api.argv, "")
        fs.api = api
        api.start()
        for name, address in AGENTS:
            spec = AgentSpec(
                name=name,
                address=address,
                port=pick_port(AGENT_PORT, address),
                instances_path=home / name,
                config_file=home / f"{name}.toml",
            )
            spec.instances_path.mkdir(exist_ok=True)
            spec.instances_path.chmod(0o755)
            spec.config_file.write_text(
                agent_toml(
                    spec,
                    home=home,
                    api_url=api_url,
                    image_url=image_url,
                    token_file=node_token_file(home),
                    driver=driver,
                    uri=uri,
                    virt_type="qemu",
                )
            )
            agent = Background(
                f"node agent {name}",
                ["cowfleet", "serve", "node", "--config", str(spec.config_file)],
                f"{spec.url}/v1/status",
                home / f"{name}.log",
                self.env,
            )
            t.command(agent.argv, "")
            fs.agents.append(agent)
            fs.specs.append(spec)
            agent.start()
        t.say(f"{AGENTS[0][0]}.toml:")
        t.block(fs.specs[0].config_file.read_text())
        self._wait_registered(fs.client_config, len(AGENTS))
        cfg_arg = ["--config", str(fs.client_config)]
        t.say(
            "The CLI works through the API when one is configured ([client] api_url in "
            "fleet.toml, or COWFLEET_API_URL). The flavor the nodes used, now in the API:"
        )
        flavor = FLAVOR_SPEC
        self.cli(
            [
                "flavor", "create", *cfg_arg,
                "--vcpus", str(flavor["vcpus"]), "--ram", str(flavor["ram_mb"]),
                "--disk", str(flavor["root_gb"]), "--ephemeral", str(flavor["ephemeral_gb"]),
                "--swap", str(flavor["swap_mb"]), FLAVOR,
            ]
        )  # fmt: skip
        self.cli(["hypervisor", "list", *cfg_arg])

    def _wait_registered(self, client_config: Path, count: int) -> None:
        """Until ``count`` agents are registered and up (they register when they start)."""
        deadline = time.monotonic() + REGISTER_TIMEOUT
        while time.monotonic() < deadline:
            with contextlib.suppress(CowfleetError, ValueError, KeyError):
                hvs = self.cli_json(["hypervisor", "list", "--config", str(client_config)])
                if sum(h.get("state") == "up" for h in hvs) >= count:
                    return
            time.sleep(0.5)
        raise BackendUnavailableError(
            f"the node agents did not register with the compute API in {REGISTER_TIMEOUT:.0f} s"
        )

    # -- booting ---------------------------------------------------------------------
    def boot(self, fs: FleetState, run_id: str, images: int) -> None:
        t = self.t
        cfg_arg = ["--config", str(fs.client_config)]
        create = ["server", "create", *cfg_arg, "--image", "demo-root", "--flavor", FLAVOR]
        first, second, third = (f"demo-{run_id}-{n}" for n in ("web", "app", "db"))

        t.step("One request for two servers (max_count=2)")
        t.say(
            "Neither node holds demo-root yet. The scheduler filters the nodes (alive, room "
            "for the flavor, image properties), then weighs them: free RAM, plus a weight for "
            "a node that already holds the image, or is fetching it for an earlier server."
        )
        self.cli([*create, "--max", "2", "--wait", first])
        fs.servers += [f"{first}-1", f"{first}-2"]

        t.step("The next server follows the cache")
        self.cli([*create, "--wait", second])
        fs.servers.append(second)
        shown = self.cli_json(["server", "show", *cfg_arg, second])
        self.cli(["server", "show", *cfg_arg, second])
        placement = shown.get("cowfleet:placement") or {}
        cached_host = str(placement.get("host"))
        other = next((s.name for s in fs.specs if s.name != cached_host), "-")
        t.say(
            f"{other} has more free RAM, but {cached_host} already holds the image: its cache "
            f"weight ({_weight(placement, 'cache')}) outweighs the RAM weight, so {second} "
            "boots with no download at all."
        )

        t.step(f"A server that no longer fits on {cached_host}")
        self.cli([*create, "--wait", third])
        fs.servers.append(third)
        self.cli(["server", "list", *cfg_arg])
        self.cli(["hypervisor", "list", *cfg_arg])

        t.step("Downloads per node in the fleet")
        rows: list[tuple[str, int, int, int]] = []
        hosts = {s["name"]: s.get("OS-EXT-SRV-ATTR:host") for s in self._servers(fs)}
        for spec in fs.specs:
            on_node = sorted(n for n, h in hosts.items() if h == spec.name)
            fetched = _fetches(spec.instances_path)
            rows.append((spec.name, len(on_node), fetched, images))
        t.block(table(["Node", "Servers", "Downloads", "Images"], [list(r) for r in rows]))
        for name, servers, fetched, count in rows:
            if servers and fetched != count:
                t.warn(f"UNEXPECTED: {name} downloaded {fetched} times for {count} images.")
        t.say(
            "Each node downloaded each image once, for all of its servers; the scheduler "
            "sent servers where the image already was while they fit "
            f"(room per node: {AGENT_CAPACITY['ram_mb']} MiB, {AGENT_CAPACITY['disk_gb']} GiB)."
        )

    def _servers(self, fs: FleetState) -> list[dict[str, Any]]:
        servers: list[dict[str, Any]] = self.cli_json(
            ["server", "list", "--config", str(fs.client_config)]
        )
        return servers

    # -- cleanup -----------------------------------------------------------------------
    def cleanup(self, fs: FleetState) -> None:
        t = self.t
        api = fs.api
        if api is not None and api.running and fs.agents and all(a.running for a in fs.agents):
            for name in fs.servers:
                with contextlib.suppress(CowfleetError):
                    self.cli(
                        ["server", "delete", "--config", str(fs.client_config), "--wait", name],
                        show=False,
                        check=False,
                        timeout=120,
                    )
            if fs.servers:
                t.say(f"Deleted {len(fs.servers)} servers through the compute API.")
        for p in fs.processes():
            if p.pid is not None:
                p.stop()
                t.say(f"Stopped {p.name} (pid {p.pid}).")

    def kept(self, fs: FleetState) -> tuple[list[str], list[str]]:
        """Lines for the kept-state block, and the commands that remove the fleet."""
        lines = [f"{p.name}: pid {p.pid}" for p in fs.processes() if p.running]
        lines += [f"fleet server:   {n}" for n in fs.servers]
        cmds = [
            f"cowfleet server delete --config {fs.client_config} --wait {n}" for n in fs.servers
        ]
        cmds += [f"kill {p.pid}" for p in fs.processes() if p.running]
        return lines, cmds


def _weight(placement: dict[str, Any], key: str) -> str:
    weights = placement.get("weights") or {}
    try:
        return f"{float(weights[key]):.2f}"
    except (KeyError, TypeError, ValueError):
        return "?"


def _fetches(instances_path: Path) -> int:
    """Downloads into this node's _base: one metadata record per download."""
    from cowfleet.demo.scenario import fetch_records

    return len(fetch_records(instances_path, 0.0))
