"""
Local stand-ins for the providers, for tests, ``listener demo`` and benchmarks.

Each simulator speaks its provider's side of CONTRACT.md on 127.0.0.1, keeps a ledger
of what it produced, and exposes fault controls that tests call directly:

* :mod:`listener.simulators.layerx402` - the Layerx402 WebSocket server (CONTRACT §6);
* :mod:`listener.simulators.getstoken` - a signing Get Smart Token webhook sender (§5).
"""
