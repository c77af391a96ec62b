"""The version documents at ``/`` (a list) and ``/v2.1`` (one version)."""

from __future__ import annotations

from typing import Any

from cowfleet.api.microversion import MAX_VERSION, MIN_VERSION

UPDATED = "2013-07-23T11:33:21Z"  # when v2.1 appeared; clients only read it


def version_doc(base_url: str) -> dict[str, Any]:
    """The v2.1 entry; its ``self`` link is the versioned endpoint, with no trailing slash."""
    return {
        "id": "v2.1",
        "status": "CURRENT",
        "version": str(MAX_VERSION),
        "min_version": str(MIN_VERSION),
        "updated": UPDATED,
        "links": [{"rel": "self", "href": f"{base_url.rstrip('/')}/v2.1"}],
        "media-types": [
            {
                "base": "application/json",
                "type": "application/vnd.openstack.compute+json;version=2.1",
            }
        ],
    }


def versions_doc(base_url: str) -> dict[str, Any]:
    return {"versions": [version_doc(base_url)]}
