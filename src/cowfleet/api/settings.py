"""The compute API's settings, taken once from :class:`cowfleet.config.Config`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cowfleet.config import Config
from cowfleet.metrics import metrics_open
from cowfleet.scheduler.model import Ratios, Weighing
from cowfleet.scheduler.select import DEFAULT_RATIOS, DEFAULT_WEIGHING

DEFAULT_API_PORT = 8774
MAX_SERVERS_PER_REQUEST = 1000


@dataclass(frozen=True)
class ApiSettings:
    database_url: str
    tokens_file: Path
    image_url: str
    ratios: Ratios = DEFAULT_RATIOS
    weighing: Weighing = DEFAULT_WEIGHING
    build_attempts: int = 3
    build_timeout: float = 3600.0  # s a node may take to build a server
    node_timeout: float = 30.0  # s for one request to a node agent
    node_down_after: float = 60.0  # s without a heartbeat before a node counts as down
    heartbeat_interval: float = 10.0  # s between heartbeats, told to the nodes
    max_body: int = 1 << 20  # bytes of a request body (413 above)
    build_workers: int = 32  # builds dispatched to nodes at once, per replica
    page_limit: int = 1000  # the largest page of a list (Nova's osapi_max_limit)
    precache_concurrency: int = 0  # nodes a pre-cache asks at once (0: all)
    metrics_open: bool = False  # /metrics without a token (loopback, or metrics_public)
    peer_fanout: int = 2  # nodes one holder feeds at once (0: origin only)
    peer_stripes: int = 2  # stripes of a peer plan (1: one tree)
    peer_stripe_fanout: int = 3  # nodes one feeder serves per stripe tree

    @classmethod
    def from_config(cls, cfg: Config) -> ApiSettings:
        return cls(
            database_url=cfg.api_database_url,
            tokens_file=cfg.api_tokens_path,
            image_url=cfg.endpoint,
            ratios=Ratios(
                cpu=cfg.api_cpu_allocation_ratio,
                ram=cfg.api_ram_allocation_ratio,
                disk=cfg.api_disk_allocation_ratio,
            ),
            weighing=Weighing(
                cache=cfg.api_cache_weight, ram=cfg.api_ram_weight, mode=cfg.api_placement
            ),
            build_attempts=cfg.api_build_attempts,
            build_timeout=cfg.api_build_timeout,
            node_timeout=cfg.api_node_timeout,
            node_down_after=cfg.api_node_down_after,
            heartbeat_interval=cfg.api_heartbeat_interval,
            max_body=cfg.api_max_body,
            build_workers=cfg.api_build_workers,
            precache_concurrency=cfg.api_precache_concurrency,
            metrics_open=metrics_open(cfg.api_host, cfg.metrics_public),
            peer_fanout=cfg.api_peer_fanout,
            peer_stripes=cfg.api_peer_stripes,
            peer_stripe_fanout=cfg.api_peer_stripe_fanout,
        )
