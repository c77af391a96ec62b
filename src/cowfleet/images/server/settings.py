"""The values the image server runs with (the CLI builds them from the Config)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cowfleet.config import (
    DEFAULT_CACHE_MIN_USES,
    DEFAULT_HEADER_TIMEOUT,
    DEFAULT_MAX_HEADER_BYTES,
    DEFAULT_MAX_IMAGE_SIZE,
    DEFAULT_MAX_UPLOADS,
    DEFAULT_MAX_UPLOADS_PER_TOKEN,
    DEFAULT_MAX_VIRTUAL_SIZE,
    DEFAULT_ORPHAN_GRACE,
    DEFAULT_PROPERTY_QUOTA,
    Config,
)
from cowfleet.metrics import metrics_open
from cowfleet.tokens import TokenTable

# Bytes per block handed to the hashing/writing threads during an upload.
DEFAULT_UPLOAD_BLOCK = 4 * 1024 * 1024
# Bytes per read when serving a file.
DEFAULT_DOWNLOAD_CHUNK = 1024 * 1024
# Seconds an upload may go without receiving a byte before it is dropped.
DEFAULT_UPLOAD_IDLE_TIMEOUT = 300.0
# Page size of image lists when the client gives no limit, and the largest allowed.
DEFAULT_PAGE_SIZE = 25
MAX_PAGE_SIZE = 1000


@dataclass(frozen=True)
class ServerSettings:
    """Everything :func:`~cowfleet.images.server.app.create_app` needs.

    ``token`` None disables authentication (only for in-process tests; the CLI always
    sets one). ``tokens``, the shared tokens file, replaces ``token`` when set: each
    token speaks for a project and a role (see :mod:`.access`). ``owner`` is the
    ``owner`` field given to images made with the single ``token``.
    """

    data_dir: Path
    database_url: str
    token: str | None
    tokens: TokenTable | None = None
    max_image_size: int = DEFAULT_MAX_IMAGE_SIZE
    max_virtual_size: int = DEFAULT_MAX_VIRTUAL_SIZE
    owner: str | None = None
    upload_block: int = DEFAULT_UPLOAD_BLOCK
    download_chunk: int = DEFAULT_DOWNLOAD_CHUNK
    upload_idle_timeout: float = DEFAULT_UPLOAD_IDLE_TIMEOUT
    # Write uploads with O_DIRECT where the filesystem allows it (see ...server.store).
    direct_io: bool = True
    # Keep an image in the page cache from its N-th download on; 0: never (see
    # ...server.download).
    cache_min_uses: int = DEFAULT_CACHE_MIN_USES
    default_page_size: int = DEFAULT_PAGE_SIZE
    max_page_size: int = MAX_PAGE_SIZE
    # Free-form properties per image (413 above; Glance's image_property_quota).
    property_quota: int = DEFAULT_PROPERTY_QUOTA
    # Uploads in flight on the whole server, and per X-Auth-Token (503 above).
    max_uploads: int = DEFAULT_MAX_UPLOADS
    max_uploads_per_token: int = DEFAULT_MAX_UPLOADS_PER_TOKEN
    # Request line + headers of one request (431 above), and the time to send them (s);
    # enforced by ...server.guard around the HTTP protocol.
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
    header_timeout: float = DEFAULT_HEADER_TIMEOUT
    # A store file no catalog record explains is removed at start once this old (s).
    orphan_grace: float = DEFAULT_ORPHAN_GRACE
    # /metrics without a token (bound to loopback, or the metrics_public setting).
    metrics_open: bool = False

    @property
    def images_dir(self) -> Path:
        return self.data_dir / "images"

    @property
    def staging_dir(self) -> Path:
        return self.data_dir / "staging"

    @classmethod
    def from_config(
        cls, cfg: Config, token: str | None, tokens: TokenTable | None = None
    ) -> ServerSettings:
        return cls(
            data_dir=cfg.data_dir,
            database_url=cfg.database_url,
            token=token,
            tokens=tokens,
            max_image_size=cfg.max_image_size,
            max_virtual_size=cfg.max_virtual_size,
            direct_io=cfg.images_direct_io,
            cache_min_uses=cfg.images_cache_min_uses,
            property_quota=cfg.images_property_quota,
            max_uploads=cfg.images_max_uploads,
            max_uploads_per_token=cfg.images_max_uploads_per_token,
            max_header_bytes=cfg.images_max_header_bytes,
            header_timeout=cfg.images_header_timeout,
            orphan_grace=cfg.images_orphan_grace,
            metrics_open=metrics_open(cfg.images_host, cfg.metrics_public),
        )
