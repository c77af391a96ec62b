"""The image service: an embedded Glance v2-compatible server and its client."""
