"""``cowfleet demo``: a guided tour on one machine.

An image service on loopback, a sample image set, two compute nodes (two
instances paths) with three instances each, and a narrated transcript of what
happened: one fetch per node, qcow2 overlays on ``_base``, what virsh sees.
"""
