"""Looking an image up in the image service with the caller's own token.

The image service decides what the caller may see (its project, public and shared
images), so an image another project keeps private is "not found" here too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import httpx

from cowfleet.api.faults import ApiFault
from cowfleet.logs import httpx_hooks

# Image properties the scheduler reads.
SCHEDULER_PROPS = ("hypervisor_type", "hw_architecture")


@dataclass(frozen=True)
class ImageInfo:
    id: str
    status: str
    min_disk: int
    min_ram: int
    props: dict[str, str] = field(default_factory=dict)


def _info(doc: dict[str, Any]) -> ImageInfo:
    props = {k: str(doc[k]) for k in SCHEDULER_PROPS if doc.get(k) not in (None, "")}
    return ImageInfo(
        id=str(doc.get("id", "")),
        status=str(doc.get("status", "")),
        min_disk=int(doc.get("min_disk") or 0),
        min_ram=int(doc.get("min_ram") or 0),
        props=props,
    )


class ImageLookup:
    """``GET /v2/images/{id}`` on the image service, as the caller."""

    def __init__(self, image_url: str, *, timeout: float = 10.0) -> None:
        self._client = httpx.Client(
            base_url=image_url.rstrip("/"), timeout=timeout, event_hooks=httpx_hooks()
        )

    def close(self) -> None:
        self._client.close()

    def get(self, image_id: str, token: str) -> ImageInfo:
        try:
            resp = self._client.get(f"/v2/images/{image_id}", headers={"X-Auth-Token": token})
        except httpx.HTTPError as exc:
            raise ApiFault(503, f"The image service cannot be reached: {exc}") from exc
        if resp.status_code in (401, 403, 404):
            raise ApiFault(400, f"Image {image_id} could not be found.")
        if resp.status_code != 200:
            raise ApiFault(503, f"The image service answered HTTP {resp.status_code}.")
        try:
            doc = resp.json()
        except ValueError:
            raise ApiFault(503, "The image service answered something that is not JSON.") from None
        if not isinstance(doc, dict):
            raise ApiFault(503, "The image service answered an unexpected document.")
        return _info(doc)

    # -- createImage (api/snapshots.py): the whole document, a new image, a delete ----

    def doc(self, image_id: str, token: str) -> dict[str, Any] | None:
        """The image's whole document as the caller sees it; None when it is gone."""
        try:
            resp = self._client.get(f"/v2/images/{image_id}", headers={"X-Auth-Token": token})
        except httpx.HTTPError as exc:
            raise ApiFault(503, f"The image service cannot be reached: {exc}") from exc
        if resp.status_code in (401, 403, 404):
            return None
        if resp.status_code != 200:
            raise ApiFault(503, f"The image service answered HTTP {resp.status_code}.")
        return _doc(resp)

    def create_image(self, body: dict[str, Any], token: str) -> dict[str, Any]:
        """``POST /v2/images`` as the caller: a new ``queued`` image."""
        try:
            resp = self._client.post("/v2/images", json=body, headers={"X-Auth-Token": token})
        except httpx.HTTPError as exc:
            raise ApiFault(503, f"The image service cannot be reached: {exc}") from exc
        if resp.status_code in (400, 403, 409, 413):
            raise ApiFault(
                403 if resp.status_code == 403 else 400,
                f"The image service refused the snapshot image: {resp.text[:300]}",
            )
        if resp.status_code not in (200, 201):
            raise ApiFault(503, f"The image service answered HTTP {resp.status_code}.")
        return _doc(resp)

    def delete_image(self, image_id: str, token: str) -> bool:
        """``DELETE /v2/images/{id}`` as the caller; True when it is gone."""
        try:
            resp = self._client.delete(f"/v2/images/{image_id}", headers={"X-Auth-Token": token})
        except httpx.HTTPError:
            return False
        return resp.status_code in (204, 404)


def _doc(resp: httpx.Response) -> dict[str, Any]:
    try:
        doc = resp.json()
    except ValueError:
        raise ApiFault(503, "The image service answered something that is not JSON.") from None
    if not isinstance(doc, dict):
        raise ApiFault(503, "The image service answered an unexpected document.")
    return doc
