"""The fleet status page in a real headless Chromium (Debian's ``chromium``).

A real image service, compute API and two node agents (``none`` driver) on loopback;
servers booted through the API; a download in progress planted on one node (a
``.part`` with its resume record, as the fetch engine leaves it). The browser signs
in through the page's form (the cookie), the DOM shows the nodes, the cache matrix,
the pre-cache row and the builds; the pre-cache row moves on its own when the
``.part`` grows (the page polls ``/status/data``); a hostile image name stays text.
The screenshot is saved in the test's folder, and to ``docs/status-page.png`` when
``COWFLEET_SAVE_SCREENSHOT=1``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from cowfleet.cache import metadata as md
from cowfleet.cache.layout import Layout
from tests.conftest import missing, wait_until
from tests.fixtures.chromium import Chromium, dump_dom
from tests.fixtures.fleet import FleetBase
from tests.fixtures.images import ImageService

pytestmark = pytest.mark.e2e

ADMIN_TOKEN = "admin-token-" + "s" * 16
HOSTILE = "<img src=x onerror=alert(1)>"
PNG = b"\x89PNG\r\n\x1a\n"
DOCS_PNG = Path(__file__).resolve().parents[2] / "docs" / "status-page.png"
MIB = 1024**2


def _chromium() -> str:
    binary = os.environ.get("COWFLEET_TEST_CHROMIUM") or shutil.which("chromium")
    if not binary:
        missing("chromium not installed (scripts/setup/chromium.sh)")
    assert binary is not None
    return binary


class Fleet(FleetBase):
    def __init__(self, root: Path, factory: Callable[..., ImageService]) -> None:
        super().__init__(root, factory, ADMIN_TOKEN)
        self.cirros = self.images.upload("cirros", b"\3" * MIB, visibility="public")
        self.hostile = self.images.upload(HOSTILE, b"\1" * MIB, visibility="public")
        self.big = self.images.upload("debian-12", b"\2" * (4 * MIB), visibility="public")
        self.start_api(
            {"COWFLEET_API_HEARTBEAT_INTERVAL": "1", "COWFLEET_API_NODE_DOWN_AFTER": "5"}
        )
        self.start_agents()

    def api_call(self, method: str, path: str, **kw: object) -> httpx.Response:
        headers = {"X-Auth-Token": ADMIN_TOKEN}
        return httpx.request(method, self.api.url + path, headers=headers, timeout=30, **kw)  # type: ignore[arg-type]

    def boot(self, name: str, image: str) -> str:
        body = {"server": {"name": name, "imageRef": image, "flavorRef": "1", "networks": "none"}}
        resp = self.api_call("POST", "/v2.1/servers", json=body)
        assert resp.status_code == 202, resp.text
        return str(resp.json()["server"]["id"])

    def status(self, server: str) -> str:
        return str(self.api_call("GET", f"/v2.1/servers/{server}").json()["server"]["status"])


@pytest.fixture
def fleet(tmp_path: Path, image_service_factory: Callable[..., ImageService]) -> Iterator[Fleet]:
    f = Fleet(tmp_path, image_service_factory)
    yield f
    f.close()


def plant_download(instances: Path, image_id: str, have: int, total: int) -> Path:
    """A download in progress, as the fetch engine leaves it: ``.part`` + resume record."""
    paths = Layout(instances).paths(image_id)
    paths.part.parent.mkdir(parents=True, exist_ok=True)
    paths.part_meta.parent.mkdir(parents=True, exist_ok=True)
    md.write_atomic(
        paths.part_meta,
        md.PartMeta(image_id, total, "sha512", "0" * 128, "http://images", 0.0).to_json(),
    )
    paths.part.write_bytes(b"\2" * have)
    return paths.part


def test_status_page_in_headless_chromium(fleet: Fleet, tmp_path: Path) -> None:
    binary = _chromium()
    url = fleet.api.url + "/status"

    # unauthenticated: --dump-dom shows the sign-in form and nothing of the fleet
    dom = dump_dom(binary, url, tmp_path / "profile-dump")
    assert 'action="/status/login"' in dom and "node-a" not in dom

    servers = [
        fleet.boot("web-1", fleet.cirros),
        fleet.boot("web-2", fleet.cirros),
        fleet.boot("evil", fleet.hostile),
    ]
    wait_until(lambda: all(fleet.status(s) in ("ACTIVE", "ERROR") for s in servers), timeout=120)
    assert [fleet.status(s) for s in servers] == ["ACTIVE"] * 3
    part = plant_download(fleet.agents[0].instances, fleet.big, MIB, 4 * MIB)

    def precache() -> list[dict[str, object]]:
        doc = fleet.api_call("GET", "/status/data").json()
        rows: list[dict[str, object]] = doc["precache"]
        return rows

    wait_until(lambda: [r["percent"] for r in precache()] == [25.0], timeout=30)

    def instances() -> int:  # as the nodes last reported them (heartbeats)
        doc = fleet.api_call("GET", "/status/data").json()
        return sum(int(n["instances"]) for n in doc["nodes"])

    # A server is ACTIVE before its node's next heartbeat lists it: wait for both nodes'.
    wait_until(lambda: instances() == 3, timeout=30)

    browser = Chromium(binary, tmp_path / "profile")
    try:
        browser.navigate(url)
        assert browser.evaluate("!!document.getElementById('login')")
        # sign in as a person would: type the token, submit the form
        browser.evaluate(
            f"document.querySelector('input[name=token]').value = {ADMIN_TOKEN!r};"
            "document.getElementById('login').submit(); true"
        )
        browser.wait_for("!!document.getElementById('nodes')")
        cookie = browser.call("Network.getCookies", urls=[fleet.api.url + "/status"])["cookies"]
        assert [(c["name"], c["httpOnly"], c["sameSite"]) for c in cookie] == [
            ("cowfleet_status", True, "Strict")
        ]
        assert browser.evaluate("document.cookie") == ""  # HttpOnly: no script sees it

        text = browser.evaluate("document.body.innerText")
        assert "admin (admin)" in text
        nodes = browser.evaluate(
            "[...document.querySelectorAll('#nodes tbody tr')].map(r => r.innerText)"
        )
        assert len(nodes) == 2 and nodes[0].startswith("node-a") and nodes[1].startswith("node-b")
        assert all("\tup" in n for n in nodes)
        assert sum(int(n.rsplit("\t", 1)[1]) for n in nodes) == 3  # three instances in all
        heads = browser.evaluate(
            "[...document.querySelectorAll('#cache thead th')].map(h => h.innerText)"
        )
        # a download in progress has no name yet (its resume record keeps the id)
        assert heads[1:] == [HOSTILE, "cirros", fleet.big]
        states = browser.evaluate(
            "[...document.querySelectorAll('#cache td[data-state]')].map(c => c.dataset.state)"
        )
        assert "verified" in states and "fetching" in states
        assert browser.evaluate("document.querySelectorAll('img').length") == 0  # stayed text
        rows = browser.evaluate(
            "[...document.querySelectorAll('#precache-rows tr')].map(r => r.innerText)"
        )
        assert len(rows) == 1 and "node-a" in rows[0] and fleet.big in rows[0]
        assert "25%" in rows[0]
        builds = browser.evaluate(
            "[...document.querySelectorAll('#builds tbody tr')].map(r => r.innerText)"
        )
        assert len(builds) == 3 and all("active" in b and " s" in b for b in builds)
        assert any(HOSTILE in b for b in builds)

        # the download moves on; the page follows without a reload
        marker = browser.evaluate("window.__same_page = 1")
        with part.open("ab") as f:
            f.write(b"\2" * (2 * MIB))
        browser.wait_for(
            "[...document.querySelectorAll('#precache-rows tr')]"
            ".some(r => r.innerText.includes('75%'))",
            timeout=30,
        )
        assert marker == 1 and browser.evaluate("window.__same_page") == 1
        fetching = browser.evaluate(
            "[...document.querySelectorAll('#cache td[data-state=fetching]')].map(c => c.innerText)"
        )
        assert fetching == ["fetching 75%\n3.0 MiB"]
        assert "4.0 MiB" in browser.evaluate("document.getElementById('precache-rows').innerText")
        assert int(browser.evaluate("document.body.dataset.polls")) >= 1

        shot = browser.screenshot(tmp_path / "status-page.png")
        assert shot.startswith(PNG) and len(shot) > 10_000
        if os.environ.get("COWFLEET_SAVE_SCREENSHOT") == "1":
            DOCS_PNG.write_bytes(shot)
    finally:
        browser.close()
