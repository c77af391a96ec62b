"""The real ``cowfleet serve images --tokens-file`` on loopback: projects, visibility and
image members over HTTP, on SQLite and PostgreSQL, across a restart; and the refusals
of a bad tokens file at start."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from cowfleet.cli.main import main
from cowfleet.images.client import ImageClient
from tests.conftest import require_env
from tests.fixtures.images import ImageService

pytestmark = pytest.mark.integration

TOKENS = {
    "alpha": "it-alpha-member-token-1",
    "beta": "it-beta-member-token-01",
    "admin": "it-admin-token-00000001",
    "node": "it-node-token-000000001",
}
ROLES = {"alpha": "member", "beta": "member", "admin": "admin", "node": "node"}
DATA = os.urandom(64 * 1024)
PATCH = {"Content-Type": "application/openstack-images-v2.1-json-patch"}


def write_tokens(path: Path, mode: int = 0o600) -> Path:
    text = "".join(
        f'[[token]]\ntoken = "{TOKENS[who]}"\nproject = "{who}"\nrole = "{ROLES[who]}"\n\n'
        for who in TOKENS
    )
    path.write_text(text)
    path.chmod(mode)
    return path


def as_(svc: ImageService, who: str) -> httpx.Client:
    return httpx.Client(base_url=svc.url, headers={"X-Auth-Token": TOKENS[who]}, timeout=30)


def listed(http: httpx.Client, **query: str) -> set[str]:
    r = http.get("/v2/images", params={"limit": "1000", **query})
    assert r.status_code == 200, r.text
    return {img["id"] for img in r.json()["images"]}


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_projects_over_http(
    backend: str, image_service_factory: Callable[..., ImageService], tmp_path: Path
) -> None:
    database = require_env("COWFLEET_TEST_POSTGRES_URL") if backend == "postgresql" else None
    tokens = write_tokens(tmp_path / "tokens.toml")
    svc = image_service_factory(database=database, tokens_file=tokens)
    assert not svc.token_file.exists()  # no single token in this mode
    tag = uuid.uuid4().hex  # PostgreSQL is shared with other tests: find ours by name
    with as_(svc, "alpha") as alpha, as_(svc, "beta") as beta:
        with as_(svc, "admin") as admin, as_(svc, "node") as node:
            # Images of project alpha, made with cowfleet's own client.
            with ImageClient(svc.url, TOKENS["alpha"]) as client:
                private = client.create(
                    name=f"private-{tag}",
                    disk_format="raw",
                    container_format="bare",
                    visibility="private",
                )
                client.upload(private.id, iter([DATA]), size=len(DATA))
                shared = client.create(
                    name=f"shared-{tag}", disk_format="raw", container_format="bare"
                )
                client.upload(shared.id, iter([DATA]), size=len(DATA))
            assert alpha.get(f"/v2/images/{private.id}").json()["owner"] == "alpha"

            # beta sees neither until alpha shares one; then reads it, lists it once accepted.
            assert beta.get(f"/v2/images/{private.id}").status_code == 404
            assert beta.get(f"/v2/images/{shared.id}/file").status_code == 404
            r = alpha.post(f"/v2/images/{shared.id}/members", json={"member": "beta"})
            assert r.status_code == 200 and r.json()["status"] == "pending", r.text
            assert beta.get(f"/v2/images/{shared.id}/file").content == DATA
            # A member id no project can have is no member (not a database error).
            assert alpha.get(f"/v2/images/{shared.id}/members/%00").status_code == 404
            assert shared.id not in listed(beta, name=f"shared-{tag}")
            r = beta.put(f"/v2/images/{shared.id}/members/beta", json={"status": "accepted"})
            assert r.status_code == 200, r.text
            assert listed(beta, name=f"shared-{tag}") == {shared.id}
            r = beta.patch(
                f"/v2/images/{shared.id}",
                json=[{"op": "add", "path": "/x", "value": "y"}],
                headers=PATCH,
            )
            assert r.status_code == 403
            assert beta.delete(f"/v2/images/{private.id}").status_code == 404

            # A node reads everything and changes nothing; an admin lists everything.
            assert node.get(f"/v2/images/{private.id}/file").content == DATA
            assert node.delete(f"/v2/images/{private.id}").status_code == 403
            assert listed(admin, name=f"private-{tag}") == {private.id}
            r = httpx.get(f"{svc.url}/v2/images", headers={"X-Auth-Token": "x" * 20})
            assert r.status_code == 401

        svc.stop()
        svc.start()  # memberships are in the catalog: they survive a restart
        assert listed(beta, name=f"shared-{tag}") == {shared.id}
        assert beta.get(f"/v2/images/{private.id}").status_code == 404
        assert alpha.delete(f"/v2/images/{shared.id}/members/beta").status_code == 204
        assert beta.get(f"/v2/images/{shared.id}").status_code == 404
        for image_id in (private.id, shared.id):
            assert alpha.delete(f"/v2/images/{image_id}").status_code == 204


def test_image_member_commands(
    image_service_factory: Callable[..., ImageService],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    svc = image_service_factory(tokens_file=write_tokens(tmp_path / "tokens.toml"))
    monkeypatch.setenv("COWFLEET_HOME", str(tmp_path / "cli-home"))
    monkeypatch.setenv("COWFLEET_IMAGE_URL", svc.url)

    def run(who: str, *argv: str) -> str:
        monkeypatch.setenv("COWFLEET_IMAGE_TOKEN", TOKENS[who])
        capsys.readouterr()
        assert main(list(argv)) == 0
        return capsys.readouterr().out

    image = json.loads(
        run(
            "alpha", "image", "create", "--name", "cli-shared", "--disk-format", "raw", "-o", "json"
        )
    )
    added = json.loads(run("alpha", "image", "member", "add", "cli-shared", "beta", "-o", "json"))
    assert [(m["member_id"], m["status"]) for m in added] == [("beta", "pending")]
    assert "cli-shared" not in run("beta", "image", "list")
    run("beta", "image", "member", "set", image["id"], "beta", "accepted")
    assert "cli-shared" in run("beta", "image", "list")
    listed_members = json.loads(run("alpha", "image", "member", "list", image["id"], "-o", "json"))
    assert [(m["member_id"], m["status"]) for m in listed_members] == [("beta", "accepted")]
    assert "accepted" in run("alpha", "image", "member", "list", image["id"])  # the table
    run("alpha", "image", "member", "remove", image["id"], "beta")
    assert "cli-shared" not in run("beta", "image", "list")
    # beta may not share alpha's image further: 403, exit 2.
    monkeypatch.setenv("COWFLEET_IMAGE_TOKEN", TOKENS["alpha"])
    run("alpha", "image", "member", "add", image["id"], "beta")
    monkeypatch.setenv("COWFLEET_IMAGE_TOKEN", TOKENS["beta"])
    rc = main(["image", "member", "add", image["id"], "gamma"])
    err = capsys.readouterr().err
    assert rc == 2 and "HTTP 403" in err and "only its owner may change it" in err, err


def test_single_token_mode_still_one_admin_token(image_service: ImageService) -> None:
    with httpx.Client(base_url=image_service.url, headers=image_service.headers) as http:
        r = http.post("/v2/images", json={"name": "p", "visibility": "private"})
        assert r.status_code == 201 and r.json()["owner"] is None
        assert r.json()["id"] in listed(http)
    r = httpx.get(f"{image_service.url}/v2/images", headers={"X-Auth-Token": TOKENS["admin"]})
    assert r.status_code == 401


def _serve(tmp_path: Path, tokens: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COWFLEET_")}
    env["COWFLEET_HOME"] = str(tmp_path / "home")
    argv = [
        sys.executable,
        "-m",
        "cowfleet",
        "serve",
        "images",
        "--port",
        "1",
        "--data-dir",
        str(tmp_path / "data"),
        "--tokens-file",
        str(tokens),
    ]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)


def test_bad_tokens_file_stops_the_start(tmp_path: Path) -> None:
    r = _serve(tmp_path, tmp_path / "missing.toml")
    assert r.returncode == 2 and "missing.toml does not exist" in r.stderr, r.stderr
    loose = write_tokens(tmp_path / "loose.toml", mode=0o644)
    r = _serve(tmp_path, loose)
    assert r.returncode == 2 and "loose.toml" in r.stderr, r.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text('[[token]]\ntoken = "short"\nproject = "p"\nrole = "member"\n')
    bad.chmod(0o600)
    r = _serve(tmp_path, bad)
    assert r.returncode == 2 and "token #1" in r.stderr, r.stderr
