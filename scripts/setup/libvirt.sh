#!/usr/bin/env bash
# Sourced by scripts/test.sh (never call exit here). Idempotent.
#
# Starts libvirt by hand on a host without systemd (field notes §5) and exports
# what the e2e tier needs:
#   COWFLEET_TEST_LIBVIRT_URI   the connection URI the tests use (qemu:///system)
#   COWFLEET_TEST_VIRT_TYPE     the domain type that boots here (qemu = TCG)
#
# The Debian packages come from scripts/setup/system.sh --full and the Python
# binding from scripts/setup/python.sh (extra "libvirt"). qemu.conf is left at
# its defaults: cowfleet's domain XML marks every shared base "relabel=no" and
# keeps bases world-readable (see docs/instances.md), so no global switch of
# libvirt's dynamic ownership is needed.

_cowfleet_libvirt_setup() {
  local uri="qemu:///system" i
  if ! command -v libvirtd >/dev/null 2>&1 && [[ ! -x /usr/sbin/libvirtd ]]; then
    echo "libvirt.sh: libvirtd is not installed (run scripts/setup/system.sh --full)" >&2
    return 0
  fi
  # Without udev /dev/kvm is root-only; libvirt then re-probes QEMU on every call.
  if [[ -e /dev/kvm ]] && getent group kvm >/dev/null; then
    chgrp kvm /dev/kvm 2>/dev/null || true
    chmod 0660 /dev/kvm 2>/dev/null || true
  fi
  if ! pgrep -x virtlogd >/dev/null 2>&1; then
    /usr/sbin/virtlogd -d
  fi
  if ! pgrep -x libvirtd >/dev/null 2>&1; then
    /usr/sbin/libvirtd -d
  fi
  for i in $(seq 1 100); do
    if virsh -q -c "$uri" list >/dev/null 2>&1; then
      break
    fi
    sleep 0.1
  done
  if ! virsh -q -c "$uri" list >/dev/null 2>&1; then
    echo "libvirt.sh: libvirtd did not answer on $uri" >&2
    return 0
  fi
  export COWFLEET_TEST_LIBVIRT_URI="$uri"
  export COWFLEET_TEST_VIRT_TYPE="qemu"
}

_cowfleet_libvirt_setup
unset -f _cowfleet_libvirt_setup
