"""``cowfleet serve node``: the node agent (docs/node-agent.md)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from cowfleet.cli.common import add_command, add_instances_path
from cowfleet.config import DRIVERS, VIRT_TYPES, Config


def serve_node(args: argparse.Namespace, cfg: Config) -> int:
    from cowfleet.node.service import NodeService

    if args.verbose == 0:  # a daemon says what it does
        logging.getLogger("cowfleet").setLevel(logging.INFO)
    return NodeService(cfg).run()


def add_serve_node(cmds: argparse._SubParsersAction, name: str) -> None:  # type: ignore[type-arg]
    p = add_command(
        cmds,
        name,
        serve_node,
        "run the node agent: register with the compute API, build servers, manage the cache",
        output=False,
    )
    p.add_argument("--api-url", dest="node_api_url", metavar="URL", help="compute API URL")
    p.add_argument(
        "--token-file",
        dest="node_token_file",
        type=Path,
        metavar="FILE",
        help="file holding the node token (mode 0600)",
    )
    p.add_argument("--image-url", dest="image_url", metavar="URL", help="image service URL")
    p.add_argument(
        "--host", dest="node_host", metavar="ADDR", help="address to bind (default 127.0.0.1)"
    )
    p.add_argument("--port", dest="node_port", type=int, metavar="PORT", help="port (default 8775)")
    add_instances_path(p)
    p.add_argument("--driver", dest="driver", choices=DRIVERS, help="hypervisor driver")
    p.add_argument("--libvirt-uri", dest="libvirt_uri", metavar="URI", help="libvirt URI")
    p.add_argument("--virt-type", dest="virt_type", choices=VIRT_TYPES, help="domain type")
    p.add_argument(
        "--hostname", dest="node_hostname", metavar="NAME", help="node name (default: host's)"
    )
    p.add_argument(
        "--vcpus", dest="node_vcpus", type=int, metavar="N", help="vCPUs offered (default: host's)"
    )
    p.add_argument(
        "--ram-mb",
        dest="node_ram_mb",
        type=int,
        metavar="MIB",
        help="memory offered, MiB (default: host's)",
    )
    p.add_argument(
        "--disk-gb",
        dest="node_disk_gb",
        type=int,
        metavar="GIB",
        help="disk offered, GiB (default: the instances path's filesystem)",
    )
    p.add_argument(
        "--build-workers",
        dest="node_build_workers",
        type=int,
        metavar="N",
        help="builds that run at once (default 8)",
    )
