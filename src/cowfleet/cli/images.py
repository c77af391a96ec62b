"""``cowfleet serve images``: run the embedded Glance v2-compatible image service."""

from __future__ import annotations

import argparse
import logging

from cowfleet.cli.common import add_command, add_group, add_setting
from cowfleet.config import Config
from cowfleet.serving import graceful_server

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """The old spelling ``cowfleet images serve``: a hidden alias of ``serve images``."""
    cmds = add_group(sub, "images")
    add_serve_images(cmds, "serve")


def add_serve_images(cmds: argparse._SubParsersAction, name: str) -> None:  # type: ignore[type-arg]
    """The command that runs the image service, named ``name`` in the group ``cmds``."""
    p = add_command(cmds, name, serve, "serve the Glance v2-compatible image API", output=False)
    for setting in ("images_host", "images_port", "images_data_dir", "images_database"):
        add_setting(p, setting)
    add_setting(p, "image_token_file")
    add_setting(p, "images_tokens_file")


def serve(args: argparse.Namespace, cfg: Config) -> int:
    import uvicorn
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    from cowfleet.images.server import ServerSettings, create_app
    from cowfleet.images.server.guard import guarded
    from cowfleet.images.server.token import load_or_create_token
    from cowfleet.tokens import load_tokens

    insecure = cfg.images_allow_insecure_token_file
    if cfg.images_tokens_file is not None:
        tokens = load_tokens(cfg.images_tokens_file, allow_insecure=insecure)
        settings = ServerSettings.from_config(cfg, None, tokens)
        auth = f"tokens file {cfg.images_tokens_file} ({len(tokens.entries)} tokens)"
    else:
        token = load_or_create_token(cfg.token_file, allow_insecure=insecure)
        settings = ServerSettings.from_config(cfg, token)
        auth = f"token file {cfg.token_file}"
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=cfg.images_host,
        port=cfg.images_port,
        loop="asyncio",  # its loop.sendfile serves downloads zero-copy (uvloop has none)
        # httptools, behind limits on header size and time (uvicorn has none for it).
        http=guarded(
            HttpToolsProtocol,
            max_header_bytes=settings.max_header_bytes,
            header_timeout=settings.header_timeout,
        ),
        ws="none",
        lifespan="on",
        access_log=False,
        log_level="warning",
        timeout_graceful_shutdown=10,
        server_header=False,
    )
    server = graceful_server(config)
    host = f"[{cfg.images_host}]" if ":" in cfg.images_host else cfg.images_host
    logging.getLogger("cowfleet").warning(
        "image service on http://%s:%d (data %s, %s)",
        host,
        cfg.images_port,
        cfg.data_dir,
        auth,
    )
    server.run()
    logging.getLogger("cowfleet").info("image service stopped")
    return 0
