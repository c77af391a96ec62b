"""The node agent (``cowfleet serve node``): one long-running process per compute node.

It registers with the compute API and heartbeats its capacity, cache inventory and
instances (:mod:`.agent`), answers the controller's build, delete and power requests
on its own HTTP API (:mod:`.app`), runs builds in-process on the project's one
provisioning path (:mod:`.builds`, :mod:`cowfleet.compute.provision`), and runs the
cache manager loop. The node is the truth for what exists on its disk and in libvirt:
it keeps no database, and rebuilds its instance list from the instances path and the
driver when it starts. See docs/node-agent.md and docs/fleet-protocol.md.
"""
