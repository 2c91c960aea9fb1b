"""
Throughput benchmark of the listener against its two ceilings (``python -m bench``).

* Ceiling A: a bare aiohttp handler answering 200 to POST, driven by the same load
  generator as the end-to-end run (:mod:`bench.ceilings`).
* Ceiling B: a bare aio-pika publisher, persistent ~1 KiB messages, publisher confirms
  with a sliding window of 256 (:mod:`bench.ceilings`).
* End to end: the real listener in its own process, signed webhooks in, confirmed
  CloudEvents out (:mod:`bench.webhooks`).

Figures are printed, never asserted: absolute numbers drift between machines, the
ratios measured in one run are what to compare (see ``bench/README.md``).
"""
