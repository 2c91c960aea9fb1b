"""
Retention's cost per row: the journal's own ``prune`` on a journal of published ~1 KiB
events with random (UUID) ids, on an otherwise idle process, in two cases:

* **ids kept**: every pruned event was received within ``dedupe_window`` (2 h against a
  retention of 1 h), so each leaves a tombstone, which a later round forgets: the cost
  is both rounds';
* **ids outside the window**: every pruned event was received before ``dedupe_window``
  began, so none leaves a tombstone (with ``dedupe_window`` equal to ``retention``,
  every round is this case).

Prints the process's CPU time (the writer thread's, mostly) and the wall time per
deleted row, and the ratio of the two cases. No broker needed.

``python -m bench.retention [--events N]`` runs it alone; ``python -m bench --only
retention`` likewise.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import shutil
import tempfile
import time
import uuid
from pathlib import Path

from bench.common import fmt_ratio, say, table
from bench.replay import badge_entries
from listener.config import JournalConfig
from listener.journal import Journal

__all__ = ["run"]

EVENTS = 100_000
CHUNK = 2000
RETENTION, WINDOW = 3600.0, 7200.0


@dataclasses.dataclass(frozen=True)
class Cost:
    """What pruning one journal cost."""

    rows: int
    cpu: float
    wall: float

    def per_row(self, seconds: float) -> str:
        return f"{seconds / self.rows * 1e6:,.1f}" if self.rows else "-"


def _config(path: Path) -> JournalConfig:
    return JournalConfig(path=path, retention=RETENTION, dedupe_window=WINDOW)


async def _fill(path: Path, events: int) -> float:
    """Journal ``events`` published events with UUID ids; the latest receipt time."""
    latest = 0.0
    async with Journal(config=_config(path)) as journal:
        for start in range(0, events, CHUNK):
            entries = [
                dataclasses.replace(e, event_id=uuid.uuid4().hex)
                for e in badge_entries(start, min(start + CHUNK, events))
            ]
            latest = max(latest, *(e.received_at for e in entries))
            await journal.append(entries)
            rows = await journal.pending(after_seq=0, limit=CHUNK)
            await journal.mark_published([r.seq for r in rows], wait=True)
    return latest


async def _prune(path: Path, *moments: float) -> Cost:
    """Prune at each of ``moments`` in turn; the rows deleted and what it all took."""
    async with Journal(config=_config(path)) as journal:
        cpu, wall = time.process_time(), time.perf_counter()
        rows = 0
        for moment in moments:
            # No rest between transactions: what they cost, not how a round spreads them.
            rows += await journal.prune(now=moment, rest=0.0)
        return Cost(rows, time.process_time() - cpu, time.perf_counter() - wall)


def _copy(source: Path, target: Path) -> Path:
    for suffix in ("", "-wal"):
        if Path(f"{source}{suffix}").exists():
            shutil.copy(f"{source}{suffix}", f"{target}{suffix}")
    return target


async def _run(events: int) -> tuple[Cost, Cost]:
    with tempfile.TemporaryDirectory(prefix="bench-retention-") as tmp:
        directory = Path(tmp)
        say(f"retention: journaling {events:,} published events")
        latest = await _fill(directory / "base.db", events)
        published = time.time()  # every row was published by now
        say("retention: pruning, ids kept as tombstones, then forgotten")
        # Past retention of every publish, inside the window of every receipt; then
        # past the window of that prune.
        due = published + RETENTION + 60
        kept = await _prune(
            _copy(directory / "base.db", directory / "kept.db"), due, due + WINDOW + 60
        )
        say("retention: pruning, ids received before the window began")
        outside = await _prune(
            _copy(directory / "base.db", directory / "outside.db"), latest + WINDOW + 60
        )
        return kept, outside


def run(events: int = EVENTS) -> tuple[Cost, Cost]:
    """Measure and print both cases."""
    kept, outside = asyncio.run(_run(events))
    rows = [
        [name, f"{c.rows:,}", c.per_row(c.cpu), c.per_row(c.wall)]
        for name, c in (("ids kept (tombstones)", kept), ("ids outside the window", outside))
    ]
    print(table(rows, ["case", "rows", "CPU us/row", "wall us/row"]))
    ratio = None
    if kept.rows and outside.rows and kept.cpu > 0:
        ratio = (outside.cpu / outside.rows) / (kept.cpu / kept.rows)
    print(f"  CPU per row, outside the window / ids kept: {fmt_ratio(ratio)}")
    return kept, outside


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.retention", description=__doc__)
    parser.add_argument("--events", type=int, default=EVENTS, help=f"rows to prune ({EVENTS:,})")
    args = parser.parse_args(argv)
    if args.events <= 0:
        parser.error("--events must be positive")
    run(args.events)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
