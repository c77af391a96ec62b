"""Reconcile instance folders with the hypervisor's domains (pure, no I/O).

The folders say which instances exist on this node; the hypervisor says what
state they are in. Whatever does not match is reported as a row of its own:

- ``missing-domain``: a folder whose instance uses libvirt, but libvirt has no domain;
- ``orphan-domain``: a domain cowfleet defined for this instances path whose folder is gone;
- ``broken-folder``: a ``<uuid>/`` folder without a readable ``instance.json``;
- ``incomplete``: a ``.<uuid>.tmp/`` folder: a creation running now, or killed half-way.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cowfleet.compute.drivers.base import NO_HYPERVISOR, DomainInfo
from cowfleet.compute.instance import FolderEntry

MISSING_DOMAIN = "missing-domain"
ORPHAN_DOMAIN = "orphan-domain"
BROKEN_FOLDER = "broken-folder"
INCOMPLETE = "incomplete"


@dataclass(frozen=True)
class ServerRow:
    uuid: str
    name: str
    id: int | None
    state: str
    image_id: str | None
    image_name: str | None
    flavor: str | None
    driver: str | None
    problem: str | None = None

    @property
    def image(self) -> str:
        return self.image_name or self.image_id or "-"

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "uuid": self.uuid,
            "name": self.name,
            "state": self.state,
            "image": {"id": self.image_id, "name": self.image_name},
            "flavor": self.flavor,
            "driver": self.driver,
            "problem": self.problem,
        }


def reconcile(
    entries: Iterable[FolderEntry],
    domains: Mapping[str, DomainInfo] | None,
    instances_path: Path,
) -> list[ServerRow]:
    """One row per folder and per cowfleet domain of ``instances_path`` without a folder.

    ``domains`` maps UUID -> domain; None when the hypervisor was not consulted
    (then libvirt instances cannot be placed and show ``unknown``).
    """
    rows: list[ServerRow] = []
    seen: set[str] = set()
    for e in entries:
        seen.add(e.uuid)
        dom = domains.get(e.uuid) if domains is not None else None
        rec = e.record
        if rec is None:
            rows.append(
                ServerRow(
                    uuid=e.uuid,
                    name=dom.name if dom else "-",
                    id=dom.id if dom else None,
                    state=INCOMPLETE if e.incomplete else BROKEN_FOLDER,
                    image_id=None,
                    image_name=None,
                    flavor=None,
                    driver=None,
                    problem=e.problem,
                )
            )
            continue
        problem = None
        if dom is not None:
            state, dom_id = dom.state, dom.id
        elif rec.driver == "none":
            state, dom_id = NO_HYPERVISOR, None
        elif domains is None:
            state, dom_id = "unknown", None
            problem = "the hypervisor was not consulted"
        else:
            state, dom_id = MISSING_DOMAIN, None
            problem = "instance folder exists but the hypervisor has no domain for it"
        rows.append(
            ServerRow(
                uuid=rec.uuid,
                name=rec.name,
                id=dom_id,
                state=state,
                image_id=rec.image_id,
                image_name=rec.image_name,
                flavor=rec.flavor.name,
                driver=rec.driver,
                problem=problem,
            )
        )
    for uuid, dom in sorted((domains or {}).items(), key=lambda kv: kv[1].name):
        if uuid in seen or dom.metadata is None:
            continue
        if dom.metadata.instances_path != str(instances_path):
            continue  # another node's (or another instances path's) domain
        rows.append(
            ServerRow(
                uuid=uuid,
                name=dom.name,
                id=dom.id,
                state=ORPHAN_DOMAIN,
                image_id=dom.metadata.image_id,
                image_name=None,
                flavor=dom.metadata.flavor,
                driver="libvirt",
                problem=f"domain is {dom.state} but its instance folder is gone",
            )
        )
    return rows
