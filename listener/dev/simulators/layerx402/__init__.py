"""A Layerx402-compatible WebSocket server (CONTRACT §6): see :mod:`.server`."""

from listener.dev.simulators.layerx402.feed import Rate
from listener.dev.simulators.layerx402.server import (
    Layerx402Simulator,
    run_standalone,
    serve_forever,
)

__all__ = ["Layerx402Simulator", "Rate", "run_standalone", "serve_forever"]
