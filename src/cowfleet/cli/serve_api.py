"""``cowfleet serve api``: run the Nova-compatible compute API."""

from __future__ import annotations

import argparse
import logging

from cowfleet.cli.common import add_command, add_setting
from cowfleet.config import Config
from cowfleet.serving import graceful_server, settle_gc

API_SETTINGS = (
    "api_host",
    "api_port",
    "api_data_dir",
    "api_database",
    "api_tokens_file",
    "image_url",
)


def add_serve_api(cmds: argparse._SubParsersAction, name: str) -> None:  # type: ignore[type-arg]
    """The command that runs the compute API, named ``name`` in the group ``cmds``."""
    p = add_command(cmds, name, serve, "serve the Nova-compatible compute API", output=False)
    for setting in API_SETTINGS:
        add_setting(p, setting)


def serve(args: argparse.Namespace, cfg: Config) -> int:
    import uvicorn

    from cowfleet.api.app import create_app
    from cowfleet.api.settings import ApiSettings
    from cowfleet.compute.flavors import all_flavors
    from cowfleet.tokens import load_tokens

    settings = ApiSettings.from_config(cfg)
    tokens = load_tokens(settings.tokens_file)
    if settings.database_url.startswith("sqlite:///"):
        cfg.api_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    app = create_app(settings, tokens, flavors_extra=tuple(all_flavors(cfg)))
    config = uvicorn.Config(
        app,
        host=cfg.api_host,
        port=cfg.api_port,
        loop="asyncio",
        http="httptools",
        ws="none",
        lifespan="on",
        access_log=False,
        log_level="warning",
        timeout_graceful_shutdown=10,
        server_header=False,
    )
    host = f"[{cfg.api_host}]" if ":" in cfg.api_host else cfg.api_host
    logging.getLogger("cowfleet").warning(
        "compute API on http://%s:%d/v2.1 (database %s, tokens file %s, images %s)",
        host,
        cfg.api_port,
        _redacted(settings.database_url),
        settings.tokens_file,
        settings.image_url,
    )
    settle_gc()
    graceful_server(config).run()
    return 0


def _redacted(url: str) -> str:
    from cowfleet.api.db.engine import redact

    return redact(url)
