"""The Glance v2 image vocabulary, shared by the image service and the client CLI.

(A light module: the CLI names these values in ``--help`` without importing the server.)
"""

from __future__ import annotations

from cowfleet.formats.inspection import GLANCE_DISK_FORMATS

DISK_FORMATS = tuple(GLANCE_DISK_FORMATS)
CONTAINER_FORMATS = ("bare", "ovf", "ova", "aki", "ari", "ami", "docker", "compressed")
VISIBILITIES = ("public", "private", "shared", "community")
# Every status Glance v2 reports (the embedded service uses queued, saving, active).
STATUSES = (
    "queued",
    "saving",
    "uploading",
    "importing",
    "active",
    "deactivated",
    "killed",
    "deleted",
    "pending_delete",
)
