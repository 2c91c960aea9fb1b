"""
websockets' ``connect``, following a redirect of the handshake only within the origin.

A stream authenticates in its first frame after the handshake (the API key), sent to
whoever answered it: websockets follows up to ten redirects, to any host (it refuses
only ``wss`` to ``ws``), so a 3xx from a proxy, a CDN or an open redirect on the
provider's domain handed the key to another host. A redirect to the same scheme, host
and port is followed; any other is the 3xx it was (retried with backoff like any
failed handshake) and a warning names where it pointed.
"""

from __future__ import annotations

import contextlib
import urllib.parse

import structlog
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus, InvalidURI
from websockets.uri import parse_uri

__all__ = ["SameOriginConnect"]

log = structlog.get_logger("listener.streams")


class SameOriginConnect(connect):
    """``connect`` whose redirects stay on the URL's origin."""

    def process_redirect(self, exc: Exception) -> Exception | str:
        """websockets' own check, then the origin's (a new URI, or the error to raise)."""
        try:
            followed = super().process_redirect(exc)
        except (InvalidURI, ValueError):  # (not ws or wss, a bad port: the source crashed)
            assert isinstance(exc, InvalidStatus)  # (only a 3xx with a Location gets here)
            followed = urllib.parse.urljoin(self.uri, exc.response.headers["Location"])
            port = None
            with contextlib.suppress(ValueError):
                port = urllib.parse.urlsplit(followed).port
        else:
            if not isinstance(followed, str):
                return followed
            old, new = self.ws_uri, parse_uri(followed)
            if (new.secure, new.host, new.port) == (old.secure, old.host, old.port):
                return followed
            port = new.port
        location = urllib.parse.urlsplit(followed)
        log.warning(
            "stream_redirect_refused",
            url_host=self.ws_uri.host,
            location=f"{location.scheme}://{location.hostname}" + (f":{port}" if port else ""),
            note="the handshake was redirected to another origin; the API key is not sent"
            " there: fix the source's url",
        )
        return exc
