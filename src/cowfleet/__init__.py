"""cowfleet: copy-on-write VM disk provisioning on a node image cache."""

__version__ = "0.1.0"
