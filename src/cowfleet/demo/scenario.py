"""The demo scenario: service, images, two nodes, six instances, transcript, cleanup.

Every user-visible step runs the real ``cowfleet`` CLI as a subprocess (the
transcript shows the command line, so a user can repeat it with ``--keep``);
the numbers (fetches, bytes) come from the cache's own metadata records and
from the image service process's I/O counters, not from assumptions.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from cowfleet import proc
from cowfleet.demo import guest as guest_mod
from cowfleet.demo.fleet import FleetState, FleetTour, new_node_token, node_token_file
from cowfleet.demo.nodes import (
    FLAVOR,
    NodeSpec,
    node_toml,
    server_names,
    service_toml,
    tokens_toml,
)
from cowfleet.demo.service import PREFERRED_PORT, ImageService, pick_port
from cowfleet.demo.transcript import (
    FetchSummary,
    Transcript,
    console_lines,
    console_tail,
    fetch_table,
    guest_finished,
    table,
)
from cowfleet.errors import (
    BackendUnavailableError,
    CommandError,
    CowfleetError,
    TimeoutError_,
    ValidationError,
)
from cowfleet.units import human_bytes

MARKER = "demo"
HOLD = 120  # seconds each guest stays up after its marker (cleanup destroys it earlier)
BOOT_TIMEOUT = 240.0


@dataclass(frozen=True)
class Options:
    keep: bool = False
    driver: str | None = None  # None: libvirt when it answers, else none
    home: Path | None = None
    libvirt_uri: str = "qemu:///system"
    guest_cache: Path | None = None
    per_node: int = 3


@dataclass
class Server:
    node: NodeSpec
    name: str
    uuid: str | None = None


@dataclass
class State:
    home: Path  # a folder the demo made for itself (mkdtemp); cleanup removes just it
    parent: Path | None  # the --home folder, when the demo created it (removed if left empty)
    run_id: str
    driver: str
    service: ImageService | None = None
    servers: list[Server] = field(default_factory=list)
    fleet: FleetState | None = None


def default_guest_cache() -> Path:
    if os.geteuid() == 0:
        return Path("/var/cache/cowfleet/demo-guest")
    return Path("~/.cache/cowfleet/demo-guest").expanduser()


def child_env() -> dict[str, str]:
    """The environment of every child: no COWFLEET_* (the demo's config files rule)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("COWFLEET_")}
    env["LC_ALL"] = "C"
    return env


def libvirt_problem(uri: str) -> str | None:
    """Why libvirt cannot be used here, or None when it answers on ``uri``."""
    virsh = shutil.which("virsh")
    if virsh is None:
        return "virsh is not installed (Debian package libvirt-clients)"
    if shutil.which("qemu-system-x86_64") is None:
        return "qemu-system-x86_64 is not installed (Debian package qemu-system-x86)"
    try:
        import libvirt  # noqa: F401
    except ImportError:
        return "the libvirt Python binding is missing (pip install 'cowfleet[libvirt]')"
    done = proc.run([virsh, "-c", uri, "-q", "list"], check=False, timeout=30)
    if done.returncode != 0:
        return f"libvirtd does not answer on {uri}: {done.stderr.strip()}"
    return None


class Demo:
    def __init__(self, opts: Options, t: Transcript) -> None:
        self.opts = opts
        self.t = t
        self.env = child_env()
        self.tour = FleetTour(t, self.cli, self.cli_json, self.env)

    # -- running the CLI ---------------------------------------------------------
    def cli(
        self, args: Sequence[str], *, show: bool = True, check: bool = True, timeout: float = 300
    ) -> proc.Completed:
        done = proc.run(
            [sys.executable, "-m", "cowfleet", *args],
            env=self.env,
            timeout=timeout,
            check=False,
        )
        if show:
            self.t.command(["cowfleet", *args], done.stdout + done.stderr)
        if check and done.returncode != 0:
            raise CommandError(
                f"cowfleet {' '.join(args)} exited with {done.returncode}: "
                f"{done.stderr.strip()[-500:]}",
                argv=list(args),
                returncode=done.returncode,
            )
        return done

    def cli_json(self, args: Sequence[str]) -> Any:
        return json.loads(self.cli([*args, "--output", "json"], show=False).stdout)

    # -- the scenario ------------------------------------------------------------
    def run(self) -> int:
        t = self.t
        started = time.monotonic()
        with self._session() as st:
            driver_note = self._pick_driver(st)
            self._start_service(st)
            guest = self._build_guest(st)
            if st.driver == "libvirt" and not guest.bootable:
                st.driver = "none"
                t.warn(
                    "DRIVER: none. The generated disk image has no kernel, so nothing could "
                    "boot it; the demo continues with the `none` driver (disks only)."
                )
            elif driver_note:
                t.warn(driver_note)
            ids = self._upload(st, guest)
            self._hostile(st)
            nodes = self._nodes(st)
            summaries = [self._boot_node(st, node, ids) for node in nodes]
            self._show_fetches(summaries, ids)
            self._show_disks(st, nodes)
            self._show_lists(st, nodes)
            if st.driver == "libvirt":
                self._show_consoles(st)
            for node in nodes:
                t.step(f"The image cache of {node.name}: one base per image, used by 3 instances")
                self.cli(["cache", "list", "--config", str(node.config_file)])
            self._show_clean(nodes[0])
            self._fleet(st, ids)
            t.step("What this showed")
            t.say(
                f"{len(nodes) * self.opts.per_node} instances on {len(nodes)} nodes cost "
                f"{len(nodes)} downloads of each image: every node fetched each image once "
                "into its _base, and each instance's disks are thin qcow2 overlays on those "
                "bases. Through the compute API, one request booted several servers, and the "
                "scheduler sent servers to the node that already held their image while it had "
                f"room. The demo took {time.monotonic() - started:.0f} s before cleanup."
            )
        return 0

    @contextlib.contextmanager
    def _session(self) -> Iterator[State]:
        """Owns everything the demo creates; undoes it on success, error and Ctrl-C."""
        opts = self.opts
        parent, made_parent = Path("/var/tmp"), False
        if opts.home is not None:
            # DIR may hold the user's own state (its images/ is the default image-service
            # data folder): the demo works only in a fresh folder of its own inside it.
            parent = opts.home.resolve()
            made_parent = not parent.exists()
            parent.mkdir(parents=True, exist_ok=True)
        home = Path(tempfile.mkdtemp(prefix="cowfleet-demo-", dir=parent))
        home.chmod(0o755)  # QEMU runs as libvirt-qemu and must reach the instance folders
        st = State(
            home=home,
            parent=parent if made_parent else None,
            run_id=secrets.token_hex(2),
            driver="none",
        )
        previous = signal.getsignal(signal.SIGTERM)

        def on_term(signum: int, frame: FrameType | None) -> None:
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, on_term)
        try:
            yield st
        except KeyboardInterrupt:
            self.t.say("Interrupted: cleaning up.")
            raise
        finally:
            old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)  # let cleanup finish
            try:
                if opts.keep:
                    self._kept(st)
                else:
                    self._cleanup(st)
            finally:
                signal.signal(signal.SIGINT, old_int)
                signal.signal(signal.SIGTERM, previous)

    def _pick_driver(self, st: State) -> str | None:
        t, opts = self.t, self.opts
        t.step("Where the demo runs")
        t.say(
            f"Everything lives under {st.home}: the image service's data, and two compute "
            "nodes, node-a and node-b, each with its own instances path and its own _base "
            "cache, as two Nova compute hosts would have."
        )
        problem = libvirt_problem(opts.libvirt_uri) if opts.driver != "none" else None
        if not problem and opts.driver != "none" and not traversable(st.home):
            problem = (
                f"{st.home} (--home) or a folder above it is not searchable by others, and "
                "QEMU runs as libvirt-qemu; use a directory under /var/tmp"
            )
        if opts.driver == "libvirt" and problem:
            raise BackendUnavailableError(f"--driver libvirt: {problem}")
        if opts.driver == "none":
            st.driver = "none"
            return (
                "DRIVER: none (asked for with --driver none). Instance disks are built exactly "
                "as for libvirt, but no hypervisor runs them and nothing boots."
            )
        if problem:
            st.driver = "none"
            return (
                f"DRIVER: none. libvirt cannot be used here ({problem}). Instance disks are "
                "built exactly as for libvirt, but nothing boots. Run `sudo bash "
                "scripts/demo.sh` to install and start libvirt."
            )
        st.driver = "libvirt"
        t.say(
            f"Driver: libvirt on {opts.libvirt_uri}, domain type 'qemu' (TCG: no KVM "
            "needed). The guests really boot."
        )
        return None

    def _fleet(self, st: State, ids: dict[str, str]) -> None:
        assert st.service is not None
        st.fleet = FleetState(client_config=st.home / "fleet.toml")
        self.tour.start(
            st.fleet,
            st.home,
            image_url=st.service.url,
            tokens_file=st.home / "tokens.toml",
            admin_token_file=st.home / "images" / "token",
            driver=st.driver,
            uri=self.opts.libvirt_uri,
        )
        self.tour.boot(st.fleet, st.run_id, len(ids))

    def _start_service(self, st: State) -> None:
        t = self.t
        port = pick_port(PREFERRED_PORT)
        data = st.home / "images"
        token = data / "token"
        # One tokens file for the image service and the compute API: the demo's token
        # (admin; also in the token file its commands read) and the node agents' token.
        data.mkdir(mode=0o700, exist_ok=True)
        admin, node = secrets.token_urlsafe(32), new_node_token()
        for path, text in (
            (token, admin + "\n"),
            (node_token_file(st.home), node + "\n"),
            (st.home / "tokens.toml", tokens_toml(admin, node)),
        ):
            path.write_text(text)
            path.chmod(0o600)
        cfg = st.home / "service.toml"
        cfg.write_text(service_toml(st.home, data, port, token, st.home / "tokens.toml"))
        url = f"http://127.0.0.1:{port}"
        svc = ImageService(cfg, url, st.home / "images-serve.log", self.env)
        t.step("Start the image service (Glance v2 API) in the background")
        if port != PREFERRED_PORT:
            t.say(f"Port {PREFERRED_PORT} is taken on this machine; using free port {port}.")
        t.command(svc.argv, "")
        svc.start()
        st.service = svc
        t.say(
            f"Listening on {url} (loopback only), pid {svc.pid}. Every request needs the "
            f"X-Auth-Token held in {token} (mode 0600), one of the tokens of tokens.toml."
        )

    def _build_guest(self, st: State) -> guest_mod.GuestSet:
        t = self.t
        t.step("Build the sample image set")
        cache = self.opts.guest_cache or default_guest_cache()
        t0 = time.monotonic()
        built = guest_mod.build_debian_guest(cache, guest_mod.guest_script())
        if isinstance(built, guest_mod.GuestSet):
            how = "built now" if built.built_now else "reused from the cache"
            t.say(
                f"The test guest ({built.detail}; {how} in {time.monotonic() - t0:.1f} s, "
                f"kept in {cache}): a kernel (aki), a busybox initramfs (ari) whose /init "
                "prints 'cowfleet-guest: ...' on the serial console and writes a marker into "
                "its root disk, and a 16 MiB ext4 root disk made with mkfs.ext4 -d."
            )
            return built
        gen = guest_mod.generated_disk(st.home / "work")
        t.warn(
            f"IMAGE: generated. The bootable test guest could not be built ({built}); using a "
            f"generated 16 MiB disk image instead ({gen.detail}). It has no kernel: nothing "
            "will boot from it."
        )
        return gen

    def _upload(self, st: State, g: guest_mod.GuestSet) -> dict[str, str]:
        t = self.t
        assert st.service is not None
        cfg = str(st.home / "service.toml")
        t.step("Upload the images (each one is inspected and hashed on the way in)")
        ids: dict[str, str] = {}
        uploads: list[tuple[str, str, Path, list[str]]] = []
        if g.kernel is not None and g.ramdisk is not None:
            uploads += [("kernel", "aki", g.kernel, []), ("ramdisk", "ari", g.ramdisk, [])]
        for key, fmt, path, _ in uploads:
            ids[key] = self._upload_one(cfg, f"demo-{key}", fmt, path, [])
        props: list[str] = []
        if "kernel" in ids:
            props = [
                f"kernel_id={ids['kernel']}",
                f"ramdisk_id={ids['ramdisk']}",
                f"os_command_line=console=ttyS0 cowfleet.marker={MARKER} cowfleet.hold={HOLD}",
            ]
        ids["root"] = self._upload_one(cfg, "demo-root", "raw", g.root, props)
        self.cli(["image", "list", "--config", cfg])
        return ids

    def _upload_one(self, cfg: str, name: str, fmt: str, path: Path, props: list[str]) -> str:
        args = ["image", "upload", "--config", cfg, "--name", name, "--disk-format", fmt]
        args += ["--container-format", fmt if fmt in ("aki", "ari") else "bare"]
        for p in props:
            args += ["--property", p]
        args.append(str(path))
        done = self.cli([*args, "--output", "json"], show=False)
        image = json.loads(done.stdout)
        self.t.command(
            ["cowfleet", *args],
            f"{image['id']}  {image['status']}  {human_bytes(int(image['size']))}  "
            f"{image['os_hash_algo']} {str(image['os_hash_value'])[:16]}...",
        )
        return str(image["id"])

    def _hostile(self, st: State) -> None:
        from cowfleet.formats.overlay import create_overlay

        t = self.t
        t.step("A hostile image is refused at upload (HTTP 415)")
        evil = st.home / "work" / "evil.qcow2"
        evil.parent.mkdir(parents=True, exist_ok=True)
        secret = Path("/etc/hostname") if Path("/etc/hostname").is_file() else Path("/etc/passwd")
        size = secret.stat().st_size
        create_overlay(evil, secret, "raw", size=max(size, 1 << 20), backing_virtual_size=size)
        t.say(
            f"{evil.name} is a qcow2 file whose backing file is the host's {secret}: a node "
            "that booted it would hand that file to the guest. The service reads the header "
            "and refuses it."
        )
        cfg = str(st.home / "service.toml")
        args = ["image", "upload", "--config", cfg, "--name", "evil", "--disk-format", "qcow2"]
        done = self.cli([*args, str(evil)], check=False)
        if done.returncode == 0 or "415" not in done.stderr:
            raise ValidationError(f"the hostile image was not refused with 415: {done.stderr}")
        t.say(f"Refused (exit code {done.returncode}).")

    def _nodes(self, st: State) -> list[NodeSpec]:
        t = self.t
        assert st.service is not None
        nodes = []
        for short in ("a", "b"):
            node = NodeSpec(
                name=f"node-{short}",
                short=short,
                instances_path=st.home / f"node-{short}",
                config_file=st.home / f"node-{short}.toml",
            )
            node.instances_path.mkdir(exist_ok=True)
            node.instances_path.chmod(0o755)
            node.config_file.write_text(
                node_toml(
                    node,
                    home=st.home,
                    url=st.service.url,
                    token_file=st.home / "images" / "token",
                    driver=st.driver,
                    uri=self.opts.libvirt_uri,
                    virt_type="qemu",
                )
            )
            nodes.append(node)
        t.step("Two compute nodes on this machine")
        t.say(
            "Each node is a configuration file naming its own instances path. The flavor "
            f"{FLAVOR} (1 vCPU, 256 MiB, 1 GiB root, 1 GiB ephemeral, 64 MiB swap) gives every "
            "instance a disk, a disk.local and a disk.swap, as Nova does. node-a.toml:"
        )
        t.block(nodes[0].config_file.read_text())
        return nodes

    def _boot_node(self, st: State, node: NodeSpec, ids: dict[str, str]) -> FetchSummary:
        t = self.t
        assert st.service is not None
        names = server_names(st.run_id, node, self.opts.per_node)
        verb = "Boot" if st.driver == "libvirt" else "Create"
        t.step(f"{verb} {len(names)} instances on {node.name}, in parallel")
        servers = [Server(node, n) for n in names]
        st.servers.extend(servers)
        sent_before = st.service.written_bytes()
        since = time.time()
        t0 = time.monotonic()

        def create(s: Server) -> tuple[Server, list[str], proc.Completed]:
            args = ["server", "create", "--config", str(node.config_file)]
            args += ["--image", "demo-root", "--flavor", FLAVOR, s.name]
            return s, args, self.cli(args, show=False)

        with ThreadPoolExecutor(max_workers=len(servers)) as pool:
            results = list(pool.map(create, servers))
        seconds = time.monotonic() - t0
        for s, args, done in results:
            t.command(["cowfleet", *args], done.stdout)
            s.uuid = created_uuid(done.stdout)
        sent_after = st.service.written_bytes()
        fetched = fetch_records(node.instances_path, since)
        t.say(f"{len(names)} instances in {seconds:.1f} s.")
        return FetchSummary(
            node=node.name,
            instances=len(names),
            fetches=len(fetched),
            images=len(ids),
            bytes_fetched=sum(int(r["image_size"]) for r in fetched),
            service_bytes=(
                None if sent_before is None or sent_after is None else sent_after - sent_before
            ),
        )

    def _show_fetches(self, rows: list[FetchSummary], ids: dict[str, str]) -> None:
        t = self.t
        t.step("Bytes fetched per node: one fetch per image per node, not per instance")
        t.say(
            "Fetches and Fetched come from each node's cache records (_base/.cowfleet/*.json, "
            "written once per download); Service sent is what the image service process wrote "
            "to its sockets meanwhile (/proc/PID/io). Per-instance fetch is what fetching for "
            "every instance would have cost."
        )
        t.block(fetch_table(rows))
        for r in rows:
            if r.fetches != r.images:
                t.warn(f"UNEXPECTED: {r.node} fetched {r.fetches} times for {r.images} images.")
            else:
                t.say(
                    f"{r.node}: {r.fetches} downloads for {r.images} images and "
                    f"{r.instances} instances."
                )

    def _show_disks(self, st: State, nodes: list[NodeSpec]) -> None:
        t = self.t
        first = st.servers[0]
        assert first.uuid is not None
        folder = first.node.instances_path / first.uuid
        t.step(f"Inside an instance folder ({first.node.name}, {first.name})")
        rows = []
        for p in sorted(folder.iterdir()):
            stt = p.stat()
            rows.append([p.name, stt.st_size, human_bytes(stt.st_blocks * 512)])
        t.block(table(["File", "Apparent size", "On disk"], rows))
        t.say(
            "The boot disk is a small qcow2 overlay; its backing file is the image in _base, "
            "as in `qemu-img info` on a Nova node:"
        )
        self.cli(["disk", "info", str(folder / "disk")])
        self.cli(["disk", "info", str(folder / "disk.local")])

    def _show_lists(self, st: State, nodes: list[NodeSpec]) -> None:
        t = self.t
        t.step("The instances, as virsh shows them")
        for node in nodes:
            self.cli(["server", "list", "--config", str(node.config_file)])
        first = st.servers[0]
        self.cli(["server", "disks", "--config", str(first.node.config_file), first.name])
        if st.driver == "libvirt":
            t.say(
                "The same, asked of libvirt itself (both nodes share this machine's libvirtd, "
                "so virsh lists the domains of both):"
            )
            virsh = ["virsh", "-c", self.opts.libvirt_uri]
            for args in (["list"], ["domblklist", first.name]):
                done = proc.run([*virsh, *args], check=False, timeout=60)
                t.command([*virsh, *args], done.stdout + done.stderr)
        else:
            t.say("With the none driver there is no hypervisor: the state is 'no hypervisor'.")

    def _show_consoles(self, st: State) -> None:
        t = self.t
        t.step("Each guest's serial console (console.log) proves it booted")
        deadline = time.monotonic() + BOOT_TIMEOUT
        rows = []
        markers = 0
        for s in st.servers:
            assert s.uuid is not None
            log = s.node.instances_path / s.uuid / "console.log"
            while True:
                text = log.read_bytes().decode(errors="replace") if log.exists() else ""
                if guest_finished(text) or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            lines = console_lines(text)
            booted = next((ln for ln in lines if "booted" in ln), None)
            if booted is None:
                raise TimeoutError_(
                    f"{s.name} did not boot in {BOOT_TIMEOUT:.0f} s; its console ({log}) "
                    f"ends with: {console_tail(text)}"
                )
            marker = next((ln for ln in lines if "marker written" in ln), None)
            markers += marker is not None
            rows.append([s.node.name, s.name, booted, marker or "-"])
        t.block(table(["Node", "Server", "Console: boot", "Console: root disk"], rows))
        if markers == len(rows):
            t.say(
                "Each guest read the ext4 root disk through its overlay and wrote a marker "
                "into its first sector: the write landed in the guest's own overlay; the "
                "shared base in _base stays read-only."
            )
        else:
            t.say(
                f"{len(rows)} guests booted; {markers} of them wrote their marker (a guest "
                "that did not see its vda in time says so on its console)."
            )

    def _show_clean(self, node: NodeSpec) -> None:
        t = self.t
        t.step(
            f"What is safe to delete on {node.name}? A dry run of the cache manager, with no age "
            "limit: it reads every disk's backing chain and changes nothing"
        )
        args = ["cache", "clean", "--dry-run", "--min-age", "0", "--config", str(node.config_file)]
        self.cli(args)
        report = self.cli_json(args)
        doomed = [d["name"] for d in report["decisions"] if d["action"] != "keep"]
        if doomed:
            t.say(f"Not in use, so a real pass would remove: {', '.join(doomed)}.")
        else:
            t.say(
                "Nothing: every base backs an instance's disk, or is the kernel or "
                "ramdisk of an image that does. `cowfleet node run` applies these rules on an "
                "interval, with the configured age and byte budget."
            )

    # -- cleanup -----------------------------------------------------------------
    def _kept(self, st: State) -> None:
        t = self.t
        t.step("Kept (--keep)")
        lines = [f"state:          {st.home}"]
        if st.service is not None and st.service.running:
            lines.append(f"image service:  pid {st.service.pid} on {st.service.url}")
        for s in st.servers:
            lines.append(f"server:         {s.name} ({s.node.name})")
        fleet_cmds: list[str] = []
        if st.fleet is not None:
            fleet_lines, fleet_cmds = self.tour.kept(st.fleet)
            lines += fleet_lines
        t.block("\n".join(lines))
        cmds = fleet_cmds + [
            f"cowfleet server delete --config {s.node.config_file} {s.name}" for s in st.servers
        ]
        if st.service is not None and st.service.running:
            cmds.append(f"kill {st.service.pid}")
        cmds.append(f"rm -rf {st.home}")
        t.say("Try `cowfleet server list --config <node>.toml` and friends. To remove it all:")
        t.block("\n".join(cmds))

    def _cleanup(self, st: State) -> None:
        t = self.t
        t.step("Clean up")

        def delete(s: Server) -> None:
            with contextlib.suppress(CowfleetError):
                self.cli(
                    ["server", "delete", "--config", str(s.node.config_file), s.name],
                    show=False,
                    check=False,
                    timeout=120,
                )

        if st.fleet is not None:
            self.tour.cleanup(st.fleet)
        with ThreadPoolExecutor(max_workers=3) as pool:
            list(pool.map(delete, st.servers))
        if st.driver == "libvirt" and st.servers:
            leftover = undefine_leftovers(self.opts.libvirt_uri, f"demo-{st.run_id}-")
            if leftover:
                t.say(f"Removed leftover domains: {', '.join(leftover)}")
        if st.servers:
            t.say(f"Deleted {len(st.servers)} instances (domains destroyed and undefined).")
        if st.service is not None:
            st.service.stop()
            t.say(f"Stopped the image service (pid {st.service.pid}).")
        shutil.rmtree(st.home, ignore_errors=True)
        t.say(f"Removed {st.home}.")
        if st.parent is not None:
            with contextlib.suppress(OSError):  # only when nothing else was put there meanwhile
                st.parent.rmdir()


def traversable(path: Path) -> bool:
    """True when every folder from / to ``path`` lets other users through (o+x)."""
    for folder in (path, *path.parents):
        try:
            if not folder.stat().st_mode & 0o001:
                return False
        except OSError:
            return False
    return True


def created_uuid(output: str) -> str:
    """The instance UUID in ``server create``'s line ``created server NAME (UUID) in DIR``."""
    m = re.search(r"\(([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})\)", output)
    if m is None:
        raise CommandError(f"cannot find the new server's UUID in: {output.strip()!r}")
    return m.group(1)


def fetch_records(instances_path: Path, since: float) -> list[dict[str, Any]]:
    """The cache's metadata records of bases downloaded at or after ``since``."""
    meta = instances_path / "_base" / ".cowfleet"
    out: list[dict[str, Any]] = []
    if not meta.is_dir():
        return out
    for p in sorted(meta.glob("*.json")):
        if p.name.endswith(".part.json"):
            continue
        try:
            rec = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(rec, dict) and float(rec.get("fetched_at", 0)) >= since:
            out.append(rec)
    return out


def undefine_leftovers(uri: str, prefix: str) -> list[str]:
    """Destroy and undefine domains whose name starts with ``prefix`` (cleanup fallback)."""
    virsh = shutil.which("virsh")
    if virsh is None:
        return []
    done = proc.run([virsh, "-c", uri, "list", "--all", "--name"], check=False, timeout=60)
    names = [n.strip() for n in done.stdout.splitlines() if n.strip().startswith(prefix)]
    for name in names:
        proc.run([virsh, "-c", uri, "destroy", name], check=False, timeout=60)
        proc.run([virsh, "-c", uri, "undefine", name], check=False, timeout=60)
    return names
