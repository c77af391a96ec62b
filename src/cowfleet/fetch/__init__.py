"""The one fetch engine: resumable, verifying downloads of image bytes into a sink.

- :mod:`.engine`: :func:`~.engine.fetch`, the sink and source interfaces;
- :mod:`.retry`: the retry and backoff policy;
- :mod:`.buffers`: reused chunk buffers;
- :mod:`.partsink`: a ``.part`` file sink (sparse writes, resume, fsync);
- :mod:`.tofile`: ``image download`` into a user's file;
- :mod:`.sources`: several sources for one fetch (peers first, the origin last), each
  hash-tree leaf checked as it lands.

The ``_base`` entry's sink is :mod:`cowfleet.cache.basesink`; the verifiers are in
:mod:`cowfleet.digest`; the data-plane HTTP transport is
:mod:`cowfleet.images.transport`.
"""
