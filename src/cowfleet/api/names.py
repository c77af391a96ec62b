"""The check of a resource name in a request body (a server's, a snapshot image's)."""

from __future__ import annotations

import re
from typing import Any

from cowfleet.api.faults import ApiFault

MAX_NAME = 255
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def check_name(name: Any) -> str:
    """``name`` when it is a usable name; a 400 naming the problem otherwise."""
    if not isinstance(name, str) or not name.strip():
        raise ApiFault(400, "Invalid input for field 'name': a non-empty string is required.")
    if len(name) > MAX_NAME:
        raise ApiFault(400, f"Invalid input for field 'name': longer than {MAX_NAME} characters.")
    if _CONTROL.search(name):
        raise ApiFault(400, "Invalid input for field 'name': control characters.")
    return name
