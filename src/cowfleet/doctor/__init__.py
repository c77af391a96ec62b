"""``cowfleet doctor``: checks a node and says what to fix.

- :mod:`.model`: :class:`Finding` (check, verdict, what was seen, what to do) and
  the overall verdict;
- :mod:`.access`: whether a user can reach a path (pure permission walk);
- :mod:`.qemuconf`: the QEMU user and group from ``/etc/libvirt/qemu.conf`` (sans-I/O);
- :mod:`.checks`: one pure function per check, fed by injected probes;
- :mod:`.probes`: the probes' real implementations (programs, files, HTTP, clock);
- :mod:`.runner`: every check in order.
"""
