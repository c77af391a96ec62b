#!/usr/bin/env bash
# Debian packages cowfleet needs at run time and in tests. Idempotent.
set -euo pipefail
PKGS=(
  qemu-utils                    # qemu-img: conversion, checks, the agreement tests
  e2fsprogs dosfstools util-linux  # mkfs.* and mkswap for ephemeral/swap bases; prlimit
                                # (resource limits of qemu-img on untrusted images)
  curl                          # benchmark baseline
)
if [[ "${1:-}" == "--full" ]]; then
  PKGS+=(
    qemu-system-x86             # QEMU for real guests
    libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients
    libvirt-daemon-system libvirt-daemon-system-sysv
    libvirt-dev pkg-config      # to build libvirt-python from PyPI
    postgresql                  # the catalog's second backend
    busybox-static cpio         # the offline test guest
    dmsetup                     # a device-mapper error target under a base (I/O fault tests)
    btrfs-progs                 # ... or a btrfs checksum error where the kernel has no dm
    prometheus                  # the metrics integration test scrapes all three services
    systemd                     # systemd-analyze verify of deploy/systemd (no running systemd needed)
  )
fi
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
