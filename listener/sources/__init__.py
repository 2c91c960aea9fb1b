"""
Sources: one runtime per transport, and the one intake step every source takes.

* :mod:`listener.sources.intake` - handler result → journal entry → metrics and log.
"""
