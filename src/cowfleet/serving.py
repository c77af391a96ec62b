"""Running an ASGI app under uvicorn the way every cowfleet service stops.

``serve images``, ``serve api`` and ``serve node`` all run one uvicorn server in the
main thread. On SIGTERM or SIGINT it finishes the requests in flight, then returns:
uvicorn itself re-raises the signal after its graceful shutdown, so the process would
end with 143, but a stop on request is no failure here. The subclass overrides
``capture_signals``, uvicorn's public hook for installing its handlers.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any


def graceful_server(config: Any) -> Any:
    """A ``uvicorn.Server`` for ``config`` whose SIGTERM/SIGINT end ``run()`` normally."""
    import uvicorn  # the CLI's other commands do not pay for importing it

    class GracefulServer(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            sigs = (signal.SIGINT, signal.SIGTERM)
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in sigs}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    return GracefulServer(config)


# A full collection walks every object the process holds (the ORM's, the app's); with
# pages of 1,000 servers a request allocates enough to set one off, which added 70-90 ms
# to one page in three of GET /servers/detail (bench/server_list.py). Objects made at
# start-up are moved out of the collector's reach and young collections run less often;
# reference cycles are still collected.
GC_THRESHOLDS = (20_000, 20, 50)


def settle_gc() -> None:
    """Freeze what start-up made and widen the young generation (call before serving)."""
    import gc

    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
