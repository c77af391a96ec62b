"""Every doctor check, in the order an operator would fix things."""

from __future__ import annotations

from pathlib import Path

from cowfleet.config import Config
from cowfleet.doctor import checks
from cowfleet.doctor.checks import DoctorSettings
from cowfleet.doctor.model import Finding
from cowfleet.doctor.probes import HttpAnswer, Probes
from cowfleet.errors import CowfleetError

# The compute API route that tells a token's role (node tokens included).
WHOAMI = "/internal/whoami"


def settings_from(cfg: Config, arch: str | None = None) -> DoctorSettings:
    from cowfleet.node.inventory import host_arch

    return DoctorSettings(
        driver=cfg.driver,
        virt_type=cfg.virt_type,
        instances_path=cfg.instances_path,
        max_cache_bytes=cfg.max_cache_bytes,
        min_free_percent=cfg.min_free_percent,
        api_url=cfg.node_api_url.rstrip("/") if cfg.node_api_url else None,
        image_url=cfg.endpoint.rstrip("/"),
        arch=arch or host_arch() or "x86_64",
    )


def _token(p: Probes, path: Path | None, allow_insecure: bool) -> tuple[str | None, str | None]:
    """(token, problem): the token a file holds, or why it cannot be used."""
    if path is None:
        return None, None
    try:
        return p.read_token(path, allow_insecure), None
    except CowfleetError as exc:
        return None, str(exc)


def run_checks(cfg: Config, p: Probes, *, arch: str | None = None) -> list[Finding]:
    s = settings_from(cfg, arch)
    allow = cfg.images_allow_insecure_token_file
    node_token, node_problem = _token(p, cfg.node_token_file, allow)
    if cfg.node_token_file is not None:  # a node agent: one token for both services
        image_token, image_problem = node_token, node_problem
    elif cfg.image_token:
        image_token, image_problem = cfg.image_token, None
    else:
        image_token, image_problem = _token(p, cfg.token_file, allow)
    findings = checks.check_programs(s, p)
    who, source = checks.qemu_identity(p)
    findings.append(checks.check_kvm(s, p, who))
    findings.append(checks.check_instances_access(s, p, who, source))
    findings.append(checks.check_space(s, p))
    api: HttpAnswer | None = None
    if s.api_url is not None:
        api = p.http_get(s.api_url + WHOAMI, node_token)
    findings.append(checks.check_clock(api))
    findings.append(checks.check_api(s, api, node_problem))
    images = p.http_get(s.image_url + "/v2/images?limit=1", image_token)
    findings.append(checks.check_images(s, images, image_problem))
    findings.extend(checks.check_strays(s, p))
    return findings
