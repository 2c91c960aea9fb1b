"""
The Layerx402 simulator's data and wire pieces: what each subscription key produces
(derived from the key and ``seq`` alone, so ids are reproducible), and the frames and
connection records the server (:mod:`.server`) uses.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections import deque
from collections.abc import Mapping
from typing import Any, Final, Literal, TypeAlias

import orjson
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from handlers.layerx402 import subscription_key

# Events per second for a channel: > 0 paced, 0 as fast as subscribers read,
# "manual" only through Layerx402Simulator.emit().
Rate: TypeAlias = float | Literal["manual"]

# CONTRACT §6 table: channel → required params (the only params accepted).
CHANNELS: Final[Mapping[str, tuple[str, ...]]] = {
    "token": ("mint",),
    "trades": ("mint",),
    "portfolio": ("wallet",),
}
# 2026-01-01T00:00:00Z: event times are derived from seq, so ids are reproducible.
DEFAULT_TIME_BASE_MS: Final = 1_767_225_600_000
STEP_MS: Final = 250
# A subscriber's outbound queue above HIGH pauses production until it drains to LOW,
# so a slow reader gets TCP backpressure, not an unbounded queue (NOTES: websockets traps).
HIGH: Final = 1024
LOW: Final = 256
# A paced producer catches up at most this many events per wake-up.
MAX_BURST: Final = 1000
B58: Final = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
SOL: Final = "So11111111111111111111111111111111111111112"
USDC: Final = "EPjFWdd5AufqSSqeM2qN1xzybapC8G4wEGGkZwyTDt1v"
VENUES: Final = ("raydium", "orca", "meteora", "pumpswap")


def b58(raw: bytes) -> str:
    """Base58 (Bitcoin alphabet), the spelling of Solana keys and signatures."""
    n = int.from_bytes(raw, "big")
    out: list[str] = []
    while n:
        n, r = divmod(n, 58)
        out.append(B58[r])
    return "1" * (len(raw) - len(raw.lstrip(b"\0"))) + "".join(reversed(out))


def digest(text: str, size: int = 64) -> bytes:
    return hashlib.blake2b(text.encode(), digest_size=size).digest()


def decimal_text(units: int, places: int) -> str:
    """``units`` of 10**-places as a decimal string (CONTRACT §6: decimals are strings)."""
    whole, frac = divmod(units, 10**places)
    return f"{whole}.{frac:0{places}d}"


class Close:
    __slots__ = ("code", "reason")

    def __init__(self, code: int, reason: str) -> None:
        self.code = code
        self.reason = reason


class Raw:
    __slots__ = ("payload",)

    def __init__(self, payload: str | bytes) -> None:
        self.payload = payload


# Outbound items: bytes = a UTF-8 JSON text frame (the fast path); Raw = sent as given
# (str text, bytes binary); Close = close with a code; None = stop writing.
_Out: TypeAlias = bytes | Raw | Close | None


class Conn:
    """One authenticated-or-not connection and its outbound queue."""

    __slots__ = ("closed", "out", "room", "subs", "ws")

    def __init__(self, ws: ServerConnection) -> None:
        self.ws = ws
        self.out: asyncio.Queue[_Out] = asyncio.Queue()
        self.room = asyncio.Event()
        self.room.set()
        self.closed = asyncio.Event()
        self.subs: dict[str, Key] = {}


class Key:
    """State of one subscription key; it outlives connections (CONTRACT §6)."""

    def __init__(self, channel: str, params: Mapping[str, str], buffer_size: int) -> None:
        self.channel = channel
        self.params = dict(params)
        self.name = subscription_key(channel, params)
        self.seq = 0
        self.buffer: deque[tuple[int, bytes]] = deque(maxlen=buffer_size)
        self.subscribers: dict[str, Conn] = {}
        self.active = asyncio.Event()
        self._head = b'","channel":"' + channel.encode() + b'","seq":'
        seed = digest(self.name)
        # A price of 0.0001 to ~167 USD, in micro-dollars, per key.
        self.price_micro = 100 + int.from_bytes(seed[:3], "big") * 10
        self.wallets = [b58(digest(f"{self.name}/wallet/{i}", 32)) for i in range(16)]
        self.mints = [SOL, USDC, *(b58(digest(f"{self.name}/mint/{i}", 32)) for i in range(4))]

    def frame(self, subscription: str, seq: int, data_json: bytes) -> bytes:
        """``{"type": "event", ...}`` for one subscriber, without re-serialising data."""
        return (
            b'{"type":"event","subscription":"'
            + subscription.encode()
            + self._head
            + str(seq).encode()
            + b',"data":'
            + data_json
            + b"}"
        )

    def generate(self, seq: int, time_base_ms: int) -> dict[str, Any]:
        """The data of event ``seq``: a function of (key, seq) only."""
        d = digest(f"{self.name}#{seq}")
        ts = time_base_ms + seq * STEP_MS
        # ±1% around the key's price, so a chart of it looks like a market.
        price = decimal_text(self.price_micro + self.price_micro * (d[5] - 128) // 12800, 6)
        if self.channel == "token":
            return {
                "mint": self.params["mint"],
                "price_usd": price,
                "updated_at": ts,
                "volume_24h_usd": decimal_text(int.from_bytes(d[8:13], "big"), 2),
                "holders": int.from_bytes(d[13:16], "big"),
            }
        if self.channel == "trades":
            return {
                "signature": b58(d),
                "mint": self.params["mint"],
                "side": "buy" if d[0] & 1 else "sell",
                "amount": decimal_text(int.from_bytes(d[1:5], "big"), 6),
                "price_usd": price,
                "wallet": self.wallets[d[6] % len(self.wallets)],
                "ts": ts,
                "slot": 300_000_000 + seq,
                "venue": VENUES[d[7] % len(VENUES)],
            }
        return {
            "wallet": self.params["wallet"],
            "mint": self.mints[d[0] % len(self.mints)],
            "balance": decimal_text(int.from_bytes(d[1:7], "big"), 9),
            "ts": ts,
            "value_usd": decimal_text(int.from_bytes(d[8:12], "big"), 2),
        }


def loads(message: str | bytes) -> dict[str, Any] | None:
    try:
        frame = orjson.loads(message)
    except orjson.JSONDecodeError:
        return None
    return frame if isinstance(frame, dict) else None


def frame_request_id(frame: Mapping[str, Any]) -> str | None:
    request_id = frame.get("id")
    return request_id if isinstance(request_id, str) else None


def error_frame(request_id: str | None, code: str, message: str) -> bytes:
    frame: dict[str, Any] = {"type": "error", "code": code, "message": message}
    if request_id is not None:
        frame = {"type": "error", "id": request_id, "code": code, "message": message}
    return orjson.dumps(frame)


def rate_limited_frame(retry_after: float) -> bytes:
    return orjson.dumps(
        {
            "type": "error",
            "code": "RATE_LIMITED",
            "message": "too many requests",
            "retry_after": round(retry_after, 3),
        }
    )


def check_subscribe(request_id: str | None, channel: object, params: object, since: object) -> str:
    """The INVALID_PARAMS message for a bad subscribe, or "" when it is fine."""
    if not request_id:
        return "id must be a non-empty string"
    if not isinstance(channel, str) or channel not in CHANNELS:
        return f"unknown channel; expected one of {sorted(CHANNELS)}"
    if not isinstance(params, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in params.items()
    ):
        return "params must be an object of strings"
    required = CHANNELS[channel]
    missing = [name for name in required if not params.get(name)]
    if missing:
        return f"missing params: {', '.join(missing)}"
    unknown = sorted(set(params) - set(required))
    if unknown:
        return f"unknown params: {', '.join(unknown)}"
    if since is not None and (not isinstance(since, int) or isinstance(since, bool) or since < 0):
        return "since_seq must be a non-negative integer"
    return ""


async def refuse(ws: ServerConnection, code: int, error: bytes) -> None:
    with contextlib.suppress(ConnectionClosed):
        await ws.send(error, text=True)
        await ws.close(code, "unauthorized" if code == 4001 else "rate limited")


# --- standalone ----------------------------------------------------------------------
