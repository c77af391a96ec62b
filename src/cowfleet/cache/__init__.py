"""The node image cache: `_base`, fetched once per node, verified, crash-safe."""
