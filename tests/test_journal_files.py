"""
The journal's file going wrong under the daemon: deleted or replaced while it runs,
not writable, damaged inside. Each was a 2xx for something not durable, a `/readyz`
that said ok, or a traceback at start; now it is an error the journal reports (503s)
or one line and exit 2.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog

from listener.exceptions import JournalCorrupt, JournalError
from listener.journal import Journal
from listener.journal import connections as journal_connections
from listener.journal import lock as journal_lock
from listener.journal import schema as journal_schema
from listener.service import Service
from tests.conftest import make_config, running
from tests.test_config import run_cli, write
from tests.test_journal import config, entry
from tests.test_webhooks import gst_source
from tests.webhook_sender import Sender, gst_event


@pytest.mark.parametrize("how", ["deleted", "replaced", "wal deleted"])
async def test_a_journal_file_gone_while_running_fails_appends(tmp_path: Path, how: str) -> None:
    """SQLite went on writing to the unlinked file: 200s for events gone at the next start."""
    path = tmp_path / "j.db"
    async with Journal(config=config(tmp_path)) as journal:
        assert await journal.append([entry(1)]) == [True]
        if how == "deleted":
            for name in ("j.db", "j.db-wal", "j.db-shm"):
                (tmp_path / name).unlink()
        elif how == "replaced":
            copy = tmp_path / "copy.db"
            copy.write_bytes(path.read_bytes())
            copy.replace(path)
        else:
            (tmp_path / "j.db-wal").unlink()
        with pytest.raises(JournalError, match=r"the journal file .* was (deleted|replaced)"):
            await journal.append([entry(2)])
        assert journal.state()["status"] == "error"
        assert journal.over_limit() == "journal_error"
        with pytest.raises(JournalError):  # and so on: nothing more is taken
            await journal.append([entry(3)])


async def write_read_only(journal: Journal) -> None:
    """
    Give the writer what SQLite opens when it may not write the file, on the writer
    thread between commits (closed under the maintenance round's feet, it crashed).
    """

    def swap() -> None:
        assert journal._writer is not None
        journal._writer.close()
        journal._writer = sqlite3.connect(
            f"file:{journal.path}?mode=ro", uri=True, isolation_level=None, check_same_thread=False
        )

    await journal._on_writer(swap)


async def test_a_journal_that_cannot_be_written_fails_as_a_whole(tmp_path: Path) -> None:
    """A read-only database failed each append alone, while /readyz said the journal was ok."""
    async with Journal(config=config(tmp_path)) as journal:
        assert await journal.append([entry(1)]) == [True]
        await write_read_only(journal)
        with pytest.raises(JournalError, match="readonly"):
            await journal.append([entry(2)])
        assert journal.state()["status"] == "error"
        assert journal.over_limit() == "journal_error"


async def test_a_journal_opened_read_only_does_not_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite opens a file it may not write read-only, silently: the daemon said it was ready."""
    async with Journal(config=config(tmp_path)) as journal:
        await journal.append([entry(1)])
    connect = sqlite3.connect

    def read_only(path: Any, *args: Any, **kwargs: Any) -> sqlite3.Connection:
        return connect(f"file:{path}?mode=ro", *args, uri=True, **kwargs)

    monkeypatch.setattr(journal_schema.sqlite3, "connect", read_only)
    with pytest.raises(JournalError, match=r"cannot be written .*readonly"):
        async with Journal(config=config(tmp_path)):
            pass


def damage_index(path: Path, index: str) -> None:
    with sqlite3.connect(path) as conn:
        (root,) = conn.execute(
            "SELECT rootpage FROM sqlite_master WHERE name = ?", (index,)
        ).fetchone()
        (page_size,) = conn.execute("PRAGMA page_size").fetchone()
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    with path.open("r+b") as file:
        file.seek((root - 1) * page_size)
        file.write(b"\xff" * page_size)


async def test_a_damaged_journal_is_named_at_start_not_a_traceback(tmp_path: Path) -> None:
    """A file whose header reads but whose pending index is damaged: exit 1 and two tracebacks."""
    async with Journal(config=config(tmp_path)) as journal:
        await journal.append([entry(i) for i in range(500)])
    damage_index(tmp_path / "j.db", "events_pending")
    with pytest.raises(JournalCorrupt, match="move it aside"):
        async with Journal(config=config(tmp_path)):
            pass
    config_file = write(
        tmp_path,
        f"""
broker: {{url: "amqp://guest:guest@127.0.0.1:1/", exchange: journal-files}}
journal: {{path: {tmp_path / "j.db"}}}
http: {{host: 127.0.0.1, port: 0}}
admin: {{host: 127.0.0.1, port: 0}}
sources: []
""",
    )
    result = run_cli("run", "--config", str(config_file))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    (line,) = [line for line in result.stderr.splitlines() if "move it aside" in line]
    assert line.startswith("listener: cannot start: the journal ") and str(tmp_path) in line


@pytest.mark.usefixtures("cleanup_topology")
async def test_webhooks_refused_by_a_failing_journal_say_so(
    tmp_path: Path, broker_url: str, exchange_name: str
) -> None:
    """A disk error was counted, and answered, as the journal being over its size limit."""
    config = make_config(
        tmp_path, broker_url=broker_url, exchange=exchange_name, sources=[gst_source()]
    )
    async with running(config) as service, aiohttp.ClientSession() as session:
        sender = Sender(session, f"http://127.0.0.1:{service.public_port}/webhooks/gst")
        assert (await sender.post(gst_event()))[0] == 200
        journal = service.journal
        assert journal is not None
        await write_read_only(journal)
        assert journal.over_limit() is None
        with structlog.testing.capture_logs() as logs:
            statuses = [(await sender.post(gst_event()))[0] for _ in range(3)]
        assert statuses == [503, 503, 503]
        assert journal.appending == 0  # (a failed append is no longer on its way)
        # The first 503 is its append's own failure, not the shedding that follows it.
        assert [e["source"] for e in logs if e["event"] == "journal_append_failed"] == ["gst"]
        intake = f"http://127.0.0.1:{service.admin_port}/readyz?for=intake"
        async with session.get(intake) as response:  # (a load balancer sends elsewhere)
            assert response.status == 503
            assert (await response.json())["journal"]["status"] == "error"
        rejected = service.metrics.registry.get_sample_value(
            "listener_webhook_rejected_total", {"source": "gst", "reason": "journal_error"}
        )
        assert rejected == 3
        full = service.metrics.registry.get_sample_value(
            "listener_webhook_rejected_total", {"source": "gst", "reason": "journal_full"}
        )
        assert not full


@contextlib.contextmanager
def write_transaction(path: Path) -> Iterator[None]:
    """Another process's write lock on the journal (a sqlite3 shell left in a transaction)."""
    other = sqlite3.connect(path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        other.execute("DELETE FROM cursors WHERE 0")
        yield
    finally:
        other.close()


async def test_a_journal_held_by_another_write_says_so_and_opens_once_it_ends(
    tmp_path: Path,
) -> None:
    """The daemon's journal waits for another process's write lock, says so, then opens."""
    async with Journal(config=config(tmp_path)):
        pass
    path = tmp_path / "j.db"
    with write_transaction(path), structlog.testing.capture_logs() as logs:
        journal = Journal(config=config(tmp_path), lock=True)
        opening = asyncio.ensure_future(journal.open())
        await asyncio.sleep(1.0)
        assert not opening.done()
        assert [e["path"] for e in logs if e["event"] == "journal_busy"] == [str(path)]
    await asyncio.wait_for(opening, 5)  # the transaction ended: it opens
    try:
        assert await journal.append([entry(1)]) == [True]
    finally:
        await journal.close()


async def test_a_journal_held_too_long_is_one_error_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Held past the busy timeout (30 s; 1 s here): an error naming the file and the cause."""
    async with Journal(config=config(tmp_path)):
        pass
    monkeypatch.setattr(journal_lock, "BUSY_TIMEOUT_MS", 1000)
    with write_transaction(tmp_path / "j.db"), pytest.raises(JournalError) as raised:
        await Journal(config=config(tmp_path), lock=True).open()
    assert "stayed locked by another process's write transaction" in str(raised.value)
    assert str(tmp_path / "j.db") in str(raised.value)


async def test_a_stop_while_the_journal_waits_for_a_lock_ends_the_service(
    tmp_path: Path,
) -> None:
    """SIGTERM while the journal waits for another's write lock: the service ends at once."""
    cfg = make_config(tmp_path)
    async with Journal(config=cfg.journal):
        pass
    with write_transaction(Path(cfg.journal.path)):
        service = Service(cfg)
        task = asyncio.create_task(service.run())
        await asyncio.sleep(0.7)
        service.stop()
        await asyncio.wait_for(task, 3)  # (before: 30 s, then "database is locked")
    assert not service.started.is_set()


async def test_a_run_cancelled_as_its_journal_opens_closes_it(tmp_path: Path) -> None:
    """
    The service's run cancelled in the very turn its journal finished opening (an
    embedding program's task): the journal is closed, its lock given back (it stayed
    open, the writer task running, and the next open was refused as locked).
    """
    cfg = make_config(tmp_path)
    service = Service(cfg)
    journal = Journal(config=cfg.journal, lock=True)
    opening = journal.open
    task: asyncio.Task[bool] | None = None

    async def open_then_cancelled() -> None:
        await opening()
        assert task is not None
        task.cancel()

    journal.open = open_then_cancelled  # type: ignore[method-assign]  # (the race, made sure)
    task = asyncio.create_task(service._opened(journal))
    with pytest.raises(asyncio.CancelledError):
        await task
    async with Journal(config=cfg.journal, lock=True):
        pass  # (before: JournalLocked)


async def test_an_open_cancelled_while_a_connection_opens_closes_that_connection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    ``open()`` cancelled while its reader connection was being made on the reader's
    thread: the connection that thread went on to make is closed with the rest (it was
    left open, for the garbage collector to find).
    """
    made: list[sqlite3.Connection] = []
    started, go = threading.Event(), threading.Event()

    def slow_connect(path: Path, **kwargs: Any) -> sqlite3.Connection:
        conn = journal_schema.connect(path, **kwargs)
        made.append(conn)
        if not kwargs.get("writer"):
            started.set()
            go.wait(5)
        return conn

    monkeypatch.setattr(journal_connections, "connect", slow_connect)
    journal = Journal(config=config(tmp_path), lock=True)
    task = asyncio.create_task(journal.open())
    try:
        assert await asyncio.to_thread(started.wait, 5)
        task.cancel()
        threading.Timer(0.05, go.set).start()  # the connect ends after the cancel
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        go.set()
    assert len(made) == 2  # the writer's, the reader's
    for conn in made:
        with pytest.raises(sqlite3.ProgrammingError, match="closed database"):
            conn.execute("SELECT 1")
    await journal.close()  # (closed already: nothing to do, no error)
    async with Journal(config=config(tmp_path), lock=True):
        pass  # and the lock was given back


async def test_a_close_cancelled_again_still_closes_everything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    The task closing the journal cancelled while a connection's close waits behind a
    slow job on its thread (``Service._opened`` cancels an open, then may be cancelled
    itself): every connection is still closed and the lock given back (the second
    cancellation took the queued close back, and the lock stayed held).
    """
    journal = Journal(config=config(tmp_path), lock=True)
    await journal.open()
    conns = [journal._writer, journal._reader, journal._querier]
    go = threading.Event()
    journal._read_thread.submit(go.wait, 5)  # (a slow read ahead of the close)
    task = asyncio.create_task(journal.close())
    try:
        await asyncio.sleep(0.05)
        task.cancel()
        threading.Timer(0.05, go.set).start()
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        go.set()
    for conn in conns:
        assert conn is not None
        with pytest.raises(sqlite3.ProgrammingError, match="closed database"):
            conn.execute("SELECT 1")
    async with Journal(config=config(tmp_path), lock=True):
        pass  # the lock was given back
