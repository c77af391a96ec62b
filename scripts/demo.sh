#!/usr/bin/env bash
# Install what cowfleet needs, then run the demo on embedded defaults:
#   an embedded image service on loopback, one image uploaded to it, two instances whose
#   boot disks are qcow2 overlays on ONE cached base that crossed the "network" once.
# Uses the libvirt driver when COWFLEET_DRIVER=libvirt is set and libvirtd runs; otherwise
# the `none` driver (disks only), so it works on any Debian 12 machine.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup/system.sh
bash scripts/setup/python.sh

export COWFLEET_HOME="${COWFLEET_HOME:-$(mktemp -d /tmp/cowfleet-demo.XXXXXX)}"
export COWFLEET_DRIVER="${COWFLEET_DRIVER:-none}"
port="${COWFLEET_DEMO_PORT:-9292}"
export COWFLEET_IMAGE_URL="http://127.0.0.1:${port}"
src="$COWFLEET_HOME/demo-src"
mkdir -p "$src/rootfs/etc"

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }

step "Build a small root disk image (ext4 in a 256 MiB disk, stored as compressed qcow2)"
echo "cowfleet demo guest" > "$src/rootfs/etc/motd"
truncate -s 256M "$src/root.raw"
mkfs.ext4 -q -F -L cloudimg-rootfs -d "$src/rootfs" "$src/root.raw"
qemu-img convert -q -c -f raw -O qcow2 "$src/root.raw" "$src/root.qcow2"
rm -f "$src/root.raw"

step "Start the embedded image service on 127.0.0.1:${port} (token in \$COWFLEET_HOME/images/token)"
cowfleet images serve --port "$port" >"$COWFLEET_HOME/images-serve.log" 2>&1 &
server_pid=$!
trap 'kill "$server_pid" 2>/dev/null || true' EXIT
for _ in $(seq 100); do
  curl -fsS -o /dev/null "http://127.0.0.1:${port}/versions" 2>/dev/null && break
  sleep 0.1
done

step "Upload the image (inspected and hashed on the way in)"
run cowfleet image upload --name demo-root --disk-format qcow2 --container-format bare \
  --property os_type=linux "$src/root.qcow2"

step "A hostile image is refused: a qcow2 whose backing file is the host's /etc/passwd"
qemu-img create -q -f qcow2 -F raw -b /etc/passwd "$src/evil.qcow2" 1M
if cowfleet image upload --name evil --disk-format qcow2 "$src/evil.qcow2"; then
  echo "unexpected: hostile image accepted" >&2; exit 1
fi

step "Boot two instances of it (driver: $COWFLEET_DRIVER)"
run cowfleet server create --image demo-root --flavor m1.small web1
run cowfleet server create --image demo-root --flavor m1.small web2

step "What virsh list would show"
run cowfleet server list

step "What virsh domblklist would show"
run cowfleet server disks web1

disk="$(cowfleet server disks web1 --output json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["source"])')"
step "What qemu-img info shows for the boot disk (read by cowfleet, no qemu-img)"
run cowfleet disk info "$disk"

step "The whole backing chain"
run cowfleet disk info --backing-chain "$disk"

step "The node cache: one base, fetched once, used by both instances"
run cowfleet cache list

step "Delete the instances: the base stays"
run cowfleet server delete web1
run cowfleet server delete web2
run cowfleet cache list

step "Done. State is in $COWFLEET_HOME"
