"""
Print the chaos table: ``python -m tests.chaos.report [RESULTS] [--all]``.

Reads the JSON lines the ledger wrote (default: :func:`tests.chaos.ledger.results_path`)
and prints the rows of the last run (every run with ``--all``) as a Markdown table:
scenario, acknowledged, delivered, lost, duplicates, time to recover, failover (the
replica scenarios: a unit held again and delivering), and the
scenario's own figures (notes; ``extra`` = delivered but never acknowledged). Exits 1 when a
row shows a loss or a scenario that never reached its check, so CI can gate on it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import orjson

from tests.chaos.ledger import results_path

COLUMNS = (
    ("scenario", "scenario"),
    ("acknowledged", "acknowledged"),
    ("delivered", "delivered"),
    ("lost", "lost"),
    ("duplicates", "duplicates"),
    ("recover_s", "time to recover (s)"),
    ("failover_s", "failover (s)"),
    ("outcome", "outcome"),
    ("notes", "notes"),
)


def load_rows(path: Path, *, every_run: bool = False) -> list[dict[str, Any]]:
    """The rows of the last run in ``path`` (or of every run)."""
    if not path.exists():
        return []
    rows = [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]
    if every_run or not rows:
        return rows
    last = max(row["run"] for row in rows)
    return [row for row in rows if row["run"] == last]


def _cell(row: dict[str, Any], key: str) -> str:
    value = row.get(key)
    if key == "failover_s":  # the replica scenarios' own figure, kept in their notes
        value = (row.get("notes") or {}).get("failover_s")
    if key == "notes":
        notes = {**({"extra": row["extra"]} if row.get("extra") else {}), **(value or {})}
        notes.pop("failover_s", None)
        return ", ".join(f"{k}={v}" for k, v in notes.items()) or "-"
    if value is None:
        return "-"
    if key == "recover_s":
        return f"{value:.2f}"
    return str(value)


def render(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of ``rows``."""
    header = [title for _, title in COLUMNS]
    body = [[_cell(row, key) for key, _ in COLUMNS] for row in rows]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    numeric = {
        i for i, (key, _) in enumerate(COLUMNS) if key not in ("scenario", "outcome", "notes")
    }

    def line(cells: list[str]) -> str:
        padded = [
            c.rjust(widths[i]) if i in numeric else c.ljust(widths[i]) for i, c in enumerate(cells)
        ]
        return "| " + " | ".join(padded) + " |"

    rule = (
        "|"
        + "|".join(
            "-" * (w + 1) + ":" if i in numeric else "-" * (w + 2) for i, w in enumerate(widths)
        )
        + "|"
    )
    return "\n".join([line(header), rule, *(line(cells) for cells in body)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("results", nargs="?", type=Path, default=None)
    parser.add_argument("--all", action="store_true", help="every run, not only the last")
    args = parser.parse_args(argv)
    path = args.results or results_path()
    rows = load_rows(path, every_run=args.all)
    if not rows:
        print(f"no chaos results in {path}; run `make chaos` (pytest -m chaos) first")
        return 1
    print(f"chaos run {rows[-1]['run']} ({len(rows)} scenarios; results in {path})\n")
    print(render(rows))
    bad = [row for row in rows if row.get("lost") or row.get("outcome") != "ok"]
    if bad:
        print(f"\n{len(bad)} scenario(s) lost events or did not reach their check")
        return 1
    print(
        "\nlost = acknowledged events that never reached the exchange (must be 0);"
        " duplicates are allowed (at-least-once: consumers deduplicate on message_id)."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
