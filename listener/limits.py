"""
The process's limit of open files, raised to fit ``http.max_connections``.

Every public connection holds a file descriptor, and so do the journal, the broker
connection, the streams and the admin port. The soft limit is often 1,024 while the
hard one is far higher: the daemon raises its own soft limit (up to the hard one) to
hold ``max_connections`` with room to spare, and says so when it cannot.
"""

from __future__ import annotations

import resource

import structlog

__all__ = ["SPARE", "fit_file_limit"]

log = structlog.get_logger("listener.service")

SPARE = 1024  # descriptors beside the public connections


def fit_file_limit(connections: int) -> int:
    """Raise the soft limit of open files toward ``connections + SPARE``; the limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = connections + SPARE
    if hard != resource.RLIM_INFINITY:
        wanted = min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError):  # (macOS: at most OPEN_MAX, whatever the hard limit)
            pass
    if soft != resource.RLIM_INFINITY and soft < connections + SPARE:
        log.warning(
            "file_limit_low",
            limit=soft,
            max_connections=connections,
            note="the hard limit of open files is below http.max_connections + 1024:"
            " raise it (ulimit -n, LimitNOFILE, ulimits) or lower http.max_connections",
        )
    return int(soft)
