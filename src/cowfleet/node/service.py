"""``cowfleet serve node``: wire the agent's parts together and run them until SIGTERM.

Threads: the HTTP API (uvicorn, main thread), the heartbeat loop, the event
sender, the cache manager loop, and the build pool. SIGTERM/SIGINT stop the API,
then the loops; running builds finish, queued ones are recorded as failed, and
a last heartbeat tells the API what is left.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cowfleet.config import Config
from cowfleet.errors import ConfigError, CowfleetError
from cowfleet.metrics import NodeMetrics, metrics_open
from cowfleet.node import inventory
from cowfleet.node.spec import validate_hostname
from cowfleet.serving import graceful_server

log = logging.getLogger(__name__)

HYPERVISOR_TYPES = {"libvirt": "QEMU", "none": "none"}


@dataclass(frozen=True)
class NodeSettings:
    """What ``serve node`` needs, checked once at start."""

    api_url: str
    token_file: Path
    image_url: str
    host: str
    port: int
    hostname: str

    @classmethod
    def from_config(cls, cfg: Config) -> NodeSettings:
        missing = [
            flag
            for flag, value in (
                ("--api-url (node.api_url)", cfg.node_api_url),
                ("--token-file (node.token_file)", cfg.node_token_file),
                ("--image-url (images.url)", cfg.image_url),
            )
            if not value
        ]
        if missing:
            raise ConfigError(f"serve node needs {', '.join(missing)}")
        hostname = cfg.node_hostname or socket.gethostname()
        try:
            validate_hostname(hostname)
        except CowfleetError as exc:
            raise ConfigError(f"{exc} (set --hostname)") from exc
        return cls(
            api_url=str(cfg.node_api_url),
            token_file=Path(str(cfg.node_token_file)),
            image_url=str(cfg.image_url),
            host=cfg.node_host,
            port=cfg.node_port,
            hostname=hostname,
        )

    @property
    def url(self) -> str:
        """Where the controller reaches this node's API."""
        host = self.host
        if host in ("0.0.0.0", "::", ""):
            host = socket.getfqdn()
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}"


def read_node_token(cfg: Config, path: Path) -> str:
    from cowfleet.images.token_file import read_token_file

    try:
        token = read_token_file(path, allow_insecure=cfg.images_allow_insecure_token_file)
    except FileNotFoundError as exc:
        raise ConfigError(f"node token file not found: {path}", path=str(path)) from exc
    if not token:
        raise ConfigError(f"node token file {path} is empty", path=str(path))
    return token


class NodeService:
    """Every part of one node agent; :meth:`run` blocks until a stop signal."""

    def __init__(self, cfg: Config) -> None:
        from cowfleet.cache import ImageCache
        from cowfleet.compute.drivers import make_driver
        from cowfleet.compute.manager import ServerManager
        from cowfleet.compute.provision import Provisioner
        from cowfleet.images.client import ImageClient
        from cowfleet.node.agent import ControllerClient, EventSender, Heartbeat
        from cowfleet.node.builds import Builds
        from cowfleet.node.lookup import SharedLookups

        self.cfg = cfg
        self.settings = s = NodeSettings.from_config(cfg)
        self.token = read_node_token(cfg, s.token_file)
        try:
            cfg.instances_path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(
                f"cannot create the instances path {cfg.instances_path}: {exc.strerror}"
            ) from exc
        self.capacity = inventory.capacity(cfg)
        self.arch = inventory.host_arch()
        self.metrics = NodeMetrics(cfg.instances_path)
        self.images = ImageClient(s.image_url, self.token)
        from cowfleet.cache.peering import Peering

        self.peering = Peering(
            self.token,
            stall=cfg.node_peer_stall_timeout,
            report=self._report_peer,
            host=s.hostname,
        )
        self.cache = ImageCache(cfg, self.images, peering=self.peering, metrics=self.metrics)
        self.driver = make_driver(cfg.driver, cfg)

        def drivers(name: str) -> Any:
            return self.driver if name == self.driver.name else make_driver(name, cfg)

        self.manager = ServerManager(cfg, drivers=drivers)
        self.provisioner = Provisioner(
            cfg,
            images=SharedLookups(self.images),
            cache=self.cache,
            driver=self.driver,
            observe=self.metrics.phase,
        )
        self.controller = ControllerClient(s.api_url, self.token, s.hostname)
        self.events = EventSender(self.controller)
        self.builds = Builds(
            cfg.instances_path,
            provisioner=self.provisioner,
            manager=self.manager,
            driver=self.driver,
            notify=self.events.post,
            workers=cfg.node_build_workers,
        )
        from cowfleet.node.snapshots import Snapshots

        self.snapshots = Snapshots(
            cfg.instances_path,
            self.driver,
            lambda token: ImageClient(s.image_url, token),
            fmt=cfg.snapshot_format,
            compression=cfg.snapshot_compression,
            compress_workers=cfg.snapshot_compress_workers,
            can_start=self.builds.check_idle,
        )
        self.snapshots.recover()
        self.heartbeat = Heartbeat(self.controller, self.status)
        from cowfleet.node.precache import Precacher

        self.precacher = Precacher(
            self.cache, self.controller.precache_progress, workers=cfg.fetch_concurrency
        )
        self.stop = threading.Event()
        self._last_instances: list[dict[str, Any]] = []

    def _report_peer(self, peer: str, image_id: str, reason: str) -> None:
        try:
            self.controller.peer_report(peer, image_id, reason)
        except CowfleetError as exc:  # logged; this node does not ask that peer again anyway
            log.warning("cannot report peer %s to the API: %s", peer, exc)

    def status(self) -> dict[str, Any]:
        """The heartbeat body (also ``GET /v1/status``)."""
        s, cfg = self.settings, self.cfg
        try:
            instances = [v.to_dict() for v in self.builds.list()]
            self._last_instances = instances
        except CowfleetError as exc:  # libvirt down: say what was last known
            log.warning("cannot list instances (%s); reporting the last list", exc)
            instances = self._last_instances
        try:
            cache = inventory.cache_inventory(cfg.instances_path)
        except (CowfleetError, OSError) as exc:
            log.warning("cannot list the cache: %s", exc)
            cache = []
        return {
            "hostname": s.hostname,
            "url": s.url,
            "hypervisor_type": HYPERVISOR_TYPES.get(cfg.driver, cfg.driver),
            "arch": self.arch,
            "vcpus": self.capacity.vcpus,
            "ram_mb": self.capacity.ram_mb,
            "disk_gb": self.capacity.disk_gb,
            "disk_free_gb": inventory.disk_free_gb(cfg.instances_path),
            "cache": cache,
            "instances": instances,
        }

    # -- threads -----------------------------------------------------------------
    def _cache_loop(self) -> None:
        from cowfleet.cache.manager import CacheManager
        from cowfleet.images.client import ImageClient

        s = self.settings

        def client() -> ImageClient:
            return ImageClient(s.image_url, self.token)

        manager = CacheManager(self.cfg, client=client, metrics=self.metrics)
        while not self.stop.is_set():
            try:
                manager.run(self.stop)
                return
            except Exception as exc:  # a configuration error: log it, try again later
                log.error("cache manager stopped: %s: %s", type(exc).__name__, exc)
                log.debug("cache manager: traceback", exc_info=True)
                self.stop.wait(self.cfg.node_interval)

    def _heartbeat_loop(self) -> None:
        self.heartbeat.run(self.stop)

    def run(self) -> int:
        import uvicorn

        from cowfleet.node.app import create_app

        s = self.settings
        from cowfleet.cache.layout import Layout
        from cowfleet.node.peers import add_peer_routes

        def peer_routes(app: Any) -> None:
            add_peer_routes(
                app,
                Layout(self.cfg.instances_path),
                self.peering.live,
                wait=self.cfg.node_peer_stall_timeout,
                expecting=self.builds.building,
            )

        app = create_app(
            self.builds,
            self.status,
            self.token,
            self.precacher,
            self.snapshots,
            metrics=self.metrics,
            metrics_open=metrics_open(s.host, self.cfg.metrics_public),
            peer_routes=peer_routes,
        )
        config = uvicorn.Config(
            app,
            host=s.host,
            port=s.port,
            loop="asyncio",
            ws="none",
            lifespan="off",
            access_log=False,
            log_level="warning",
            timeout_graceful_shutdown=10,
            server_header=False,
        )
        server = graceful_server(config)
        threads = [
            threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True),
            threading.Thread(target=self._cache_loop, name="cache-manager", daemon=True),
        ]
        self.events.start()
        for t in threads:
            t.start()
        log.warning(
            "node agent %s on %s (driver %s, instances %s, API %s, %d vCPUs, %d MiB, %d GiB)",
            s.hostname,
            s.url,
            self.cfg.driver,
            self.cfg.instances_path,
            s.api_url,
            self.capacity.vcpus,
            self.capacity.ram_mb,
            self.capacity.disk_gb,
        )
        try:
            server.run()
        finally:
            self.shutdown(threads)
        return 0 if server.started else 1

    def shutdown(self, threads: list[threading.Thread] | None = None) -> None:
        log.info("node agent stopping: %d jobs in flight", self.builds.in_flight)
        self.stop.set()
        self.builds.close(wait=True)
        self.precacher.close()
        self.snapshots.close()
        for t in threads or ():
            t.join(timeout=30)
        with contextlib.suppress(Exception):  # a last word: what is left, and how
            self.controller.heartbeat(self.status())
        self.events.close()
        self.controller.close()
        self.provisioner.close()
        self.peering.close()
        self.manager.close()
        self.driver.close()
        self.images.close()
        log.warning("node agent stopped")
