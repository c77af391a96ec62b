#!/usr/bin/env bash
# Sourced by scripts/test.sh (never call exit here). Idempotent (skips when built).
#
# Builds the tiny offline test guest for the e2e tier (field notes §5) into
# ${COWFLEET_TEST_GUEST_DIR:-/opt/cowfleet-test/guest} and exports
# COWFLEET_TEST_GUEST_DIR. Contents:
#   vmlinuz        the kernel of Debian's linux-image-cloud-amd64 (an "aki" image)
#   initramfs.img  busybox-static + the virtio modules of that kernel (an "ari" image).
#                  Its /init loads the modules, prints "cowfleet-guest: ..." lines to
#                  the serial console, writes "COWFLEET-MARKER <token>" (token from the
#                  kernel command line option cowfleet.marker=) into the first sector
#                  of /dev/vda, syncs, waits cowfleet.hold= seconds (default 0) and
#                  powers off.
#   root.img       a 16 MiB raw disk holding an ext4 filesystem (mkfs.ext4 -d): the root
#                  disk image, the one the instance's qcow2 overlay is backed by.
#   kernel-version the kernel release the files were built from.
#   guest-version  the version of this recipe (a different one triggers a rebuild).
# Needs: apt-get (download only), dpkg, busybox-static, cpio, gzip, e2fsprogs.

_cowfleet_guest_build() {
  local dest="${COWFLEET_TEST_GUEST_DIR:-/opt/cowfleet-test/guest}"
  local version=2  # bump when the guest changes: a rebuild follows
  if [[ -s "$dest/vmlinuz" && -s "$dest/initramfs.img" && -s "$dest/root.img" \
        && "$(cat "$dest/guest-version" 2>/dev/null)" == "$version" ]]; then
    export COWFLEET_TEST_GUEST_DIR="$dest"
    return 0
  fi
  local busybox
  busybox="$(command -v busybox || true)"
  if [[ -z "$busybox" ]] || ! file -b "$busybox" 2>/dev/null | grep -q 'statically linked'; then
    busybox=/bin/busybox
  fi
  local mkfs
  mkfs="$(command -v mkfs.ext4 || echo /usr/sbin/mkfs.ext4)"
  if [[ ! -x "$busybox" || ! -x "$mkfs" ]] || ! command -v cpio >/dev/null; then
    echo "guest.sh: need busybox-static, cpio and e2fsprogs (scripts/setup/system.sh --full)" >&2
    return 0
  fi
  local work
  work="$(mktemp -d /tmp/cowfleet-guest.XXXXXX)"
  # The metapackage depends on the versioned image package, which holds the files.
  local pkg
  pkg="$(apt-cache depends linux-image-cloud-amd64 2>/dev/null \
         | awk '/Depends: linux-image-[0-9]/ && !found {print $2; found = 1}')"
  if [[ -z "$pkg" ]]; then
    apt-get update -qq >/dev/null 2>&1 || true
    pkg="$(apt-cache depends linux-image-cloud-amd64 2>/dev/null \
           | awk '/Depends: linux-image-[0-9]/ && !found {print $2; found = 1}')"
  fi
  if [[ -z "$pkg" ]]; then
    echo "guest.sh: cannot resolve linux-image-cloud-amd64 with apt-cache" >&2
    rm -rf "$work"
    return 0
  fi
  if ! (cd "$work" && apt-get download -qq "$pkg" >/dev/null 2>&1); then
    echo "guest.sh: apt-get download $pkg failed" >&2
    rm -rf "$work"
    return 0
  fi
  dpkg -x "$work"/"$pkg"_*.deb "$work/pkg"
  local kver
  kver="$(basename "$(find "$work/pkg/lib/modules" -mindepth 1 -maxdepth 1 -print -quit)")"
  local mods="$work/pkg/lib/modules/$kver/kernel"

  # initramfs tree
  local root="$work/initramfs"
  mkdir -p "$root"/{bin,dev,proc,sys,lib/modules}
  cp "$busybox" "$root/bin/busybox"
  local m f
  # Dependency order: each module only needs the ones before it.
  for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk; do
    f="$(find "$mods" \( -name "$m.ko" -o -name "$m.ko.xz" \) -print -quit)"
    if [[ -z "$f" ]]; then
      echo "guest.sh: module $m not found in $pkg" >&2
      rm -rf "$work"
      return 0
    fi
    cp "$f" "$root/lib/modules/"
    echo "$(basename "$f")" >>"$root/lib/modules/order"
  done
  cat >"$root/init" <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo "cowfleet-guest: booted $(uname -r)"
for m in $(cat /lib/modules/order); do insmod "/lib/modules/$m" || echo "cowfleet-guest: insmod $m failed"; done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
token=none
hold=0
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    cowfleet.marker=*) token="${arg#cowfleet.marker=}" ;;
    cowfleet.hold=*) hold="${arg#cowfleet.hold=}" ;;
  esac
done
if [ -b /dev/vda ]; then
  magic="$(dd if=/dev/vda bs=1 skip=1080 count=2 2>/dev/null | od -An -tx1 | tr -d ' \n')"
  echo "cowfleet-guest: vda sectors $(cat /sys/block/vda/size) ext4-magic $magic"
  printf 'COWFLEET-MARKER %s\n' "$token" | dd of=/dev/vda bs=512 count=1 conv=sync,notrunc 2>/dev/null
  sync
  echo "cowfleet-guest: marker written $token"
else
  echo "cowfleet-guest: no /dev/vda"
fi
for d in vdb vdc; do
  [ -b /dev/$d ] && echo "cowfleet-guest: $d sectors $(cat /sys/block/$d/size)"
done
if [ "$hold" -gt 0 ] 2>/dev/null; then
  echo "cowfleet-guest: holding $hold s"
  sleep "$hold"
fi
echo "cowfleet-guest: powering off"
poweroff -f
EOF
  chmod 0755 "$root/init"
  (cd "$root" && find . | cpio -o -H newc --quiet | gzip -1) >"$work/initramfs.img"

  # root disk: ext4 built from a directory, no loop mount needed
  mkdir -p "$work/rootfs/etc"
  echo "cowfleet test guest root disk" >"$work/rootfs/etc/cowfleet-guest"
  truncate -s 16M "$work/root.img"
  "$mkfs" -q -F -L cowfleet-root -d "$work/rootfs" "$work/root.img"

  local stage="$dest.tmp.$$"
  rm -rf "$stage"
  mkdir -p "$stage"
  cp "$work/pkg/boot/vmlinuz-$kver" "$stage/vmlinuz"
  mv "$work/initramfs.img" "$stage/initramfs.img"
  mv "$work/root.img" "$stage/root.img"
  echo "$kver" >"$stage/kernel-version"
  echo "$version" >"$stage/guest-version"
  chmod 0644 "$stage"/*
  rm -rf "$dest"
  mkdir -p "$(dirname "$dest")"
  mv "$stage" "$dest"
  rm -rf "$work"
  export COWFLEET_TEST_GUEST_DIR="$dest"
}

_cowfleet_guest_build
unset -f _cowfleet_guest_build
