"""
The chaos kit (issue 5): fault scenarios against the real listener, a real RabbitMQ
and real local webhook senders and stream servers, each ending with a ledger check.

* :mod:`tests.chaos.ledger`: the oracle. It records every event the listener
  acknowledged (a 2xx to a webhook sender, a stream cursor that advanced) and reads
  the exchange back through a durable tap queue; each acknowledged event is
  delivered, lost or duplicated. Lost must be 0; duplicates are counted.
* :mod:`tests.chaos.rabbit`: ``rabbitmqctl`` faults (stop_app/start_app, a memory
  alarm), always undone, even when a test fails.
* :mod:`tests.chaos.load`: a webhook load generator feeding the ledger.
* :mod:`tests.chaos.report`: prints the table of the last run
  (``python -m tests.chaos.report``).

Run with ``pytest -m chaos`` (``make chaos``); every scenario is bounded by timeouts.
"""
