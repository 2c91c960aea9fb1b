"""
The journal package: every line of SQL the listener runs lives here.

* :mod:`listener.journal.schema` - tables, :class:`Status`, typed rows, connections;
* :mod:`listener.journal.store` - :class:`Journal`, the daemon's group-committed store;
* :mod:`listener.journal.lock` - one daemon per journal file.
"""

from listener.journal.checkpoints import Checkpoint
from listener.journal.schema import SCHEMA, Cursor, Status, StoredEntry, row_to_entry
from listener.journal.store import Journal

__all__ = ["SCHEMA", "Checkpoint", "Cursor", "Journal", "Status", "StoredEntry", "row_to_entry"]
