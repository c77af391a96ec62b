"""The shared tokens file: which token speaks for which project, in which role.

One TOML file, read by the image service, the compute API and (for its own token) a
node agent, so one token works everywhere without Keystone::

    [[token]]
    token = "9f1c...e2"        # at least 16 characters
    project = "demo"           # project id: letters, digits, '-', '_', '.'
    role = "member"            # "admin", "member" or "node"

An admin sees every project (with ``all_tenants`` where the API asks for it); a member
only its own project; a node token is what the controller and node agents use between
themselves (never a user's). The file holds credentials, so it is read with the same
checks as the image service's token file (no symlink, a regular file, no access for
group or others unless allowed). Lookups compare every token in constant time.
"""

from __future__ import annotations

import hmac
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cowfleet.errors import ConfigError
from cowfleet.images.token_file import read_token_file

Role = Literal["admin", "member", "node"]
ROLES: tuple[Role, ...] = ("admin", "member", "node")

# Largest tokens file read: a few thousand tokens.
MAX_TOKENS_FILE = 1 << 20
MIN_TOKEN_LENGTH = 16
_PROJECT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}")
_TOKEN = re.compile(r"[\x21-\x7e]+")  # printable ASCII, no spaces: it travels in a header


@dataclass(frozen=True)
class Principal:
    """Who a request speaks for: the project and the role its token carries."""

    project: str
    role: Role

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    @property
    def is_node(self) -> bool:
        return self.role == "node"


@dataclass(frozen=True)
class TokenEntry:
    token: str
    principal: Principal


@dataclass(frozen=True)
class TokenTable:
    """Every token of the file, looked up in constant time per entry."""

    entries: tuple[TokenEntry, ...]
    source: str = "<memory>"

    def lookup(self, token: str | None) -> Principal | None:
        """The principal ``token`` speaks for, or None for an unknown or empty token."""
        if not token:
            return None
        given = token.encode("utf-8", "surrogateescape")
        found: Principal | None = None
        for entry in self.entries:  # no early exit: time does not depend on the match
            if hmac.compare_digest(entry.token.encode(), given):
                found = entry.principal
        return found

    def first(self, role: Role) -> str | None:
        """The first token with ``role`` (how a controller finds the token nodes accept)."""
        for entry in self.entries:
            if entry.principal.role == role:
                return entry.token
        return None


def parse_tokens(text: str, source: str = "<memory>") -> TokenTable:
    """The table described by the TOML ``text``; ConfigError naming ``source`` and entry."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"tokens file {source} is not valid TOML: {exc}") from exc
    unknown = set(doc) - {"token"}
    if unknown:
        raise ConfigError(f"tokens file {source}: unknown key(s) {', '.join(sorted(unknown))}")
    raw = doc.get("token", [])
    if not isinstance(raw, list):
        raise ConfigError(f"tokens file {source}: 'token' must be an array of tables ([[token]])")
    entries: list[TokenEntry] = []
    seen: set[str] = set()
    for index, item in enumerate(raw, start=1):
        entries.append(_entry(item, index, source))
        if entries[-1].token in seen:
            raise ConfigError(f"tokens file {source}: token #{index} repeats an earlier token")
        seen.add(entries[-1].token)
    return TokenTable(tuple(entries), source)


def _entry(item: Any, index: int, source: str) -> TokenEntry:
    where = f"tokens file {source}, token #{index}"
    if not isinstance(item, dict):
        raise ConfigError(f"{where}: must be a table")
    extra = set(item) - {"token", "project", "role"}
    if extra:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(extra))}")
    token, project, role = item.get("token"), item.get("project"), item.get("role")
    if not isinstance(token, str) or not _TOKEN.fullmatch(token):
        raise ConfigError(f"{where}: 'token' must be printable ASCII without spaces")
    if len(token) < MIN_TOKEN_LENGTH:
        raise ConfigError(f"{where}: 'token' must be at least {MIN_TOKEN_LENGTH} characters")
    if not isinstance(project, str) or not _PROJECT.fullmatch(project):
        raise ConfigError(
            f"{where}: 'project' must be 1-64 letters, digits, '-', '_' or '.' "
            "starting with a letter or digit"
        )
    if role not in ROLES:
        raise ConfigError(f"{where}: 'role' must be one of {', '.join(ROLES)}, not {role!r}")
    return TokenEntry(token, Principal(project, role))


def load_tokens(path: Path, *, allow_insecure: bool = False) -> TokenTable:
    """Read and parse the tokens file at ``path`` (permission-checked, no symlink)."""
    try:
        text = read_token_file(path, allow_insecure=allow_insecure, limit=MAX_TOKENS_FILE)
    except FileNotFoundError as exc:
        raise ConfigError(f"tokens file {path} does not exist", path=str(path)) from exc
    return parse_tokens(text, str(path))
