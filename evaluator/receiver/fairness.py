"""Fair admission: no client takes the whole in-flight byte budget, or every gRPC worker, while another client
is sending.

Without it admission is first come, first served: a client that sends big requests from many streams as fast as
it can keeps the budget full and the workers busy, and a client that sends one small run a second is refused, or
waits behind it.

A client is identified by what the request says, most specific first (`client_key`): the `client_header`
header / gRPC metadata (a Collector sets it with its exporter's `headers:`), else a fingerprint of its bearer
token, else its address without the port (every connection of a Collector counts as the same client).

The last `min_share` bytes of the budget (at most half of it) are kept for clients that hold nothing, so a client
that starts sending while another fills the budget is admitted at once; the rest is what the shares divide.

A client is *active* from its first request until it has held nothing for `idle_seconds`. While more than one
client is active, a client that already has requests in flight may add one only within its share of the bytes,
`max((budget - reserve) / active clients, min_share)`, and, on a transport with a fixed number of handlers
(gRPC's worker threads), while it has fewer calls being handled than `max(handlers / active clients, 1)`.
Beyond, the request is refused (`over_client_share`, retryable: the flood is refused first and retries later),
so the rest stays open to the others. A client that holds nothing is always let through by its share, so every
client can have one request in flight however large (up to `max_request_size`).

The shares hold while the other clients are active, whether or not they are sending at this instant: admission
cannot see a request before it arrives, and a light client's next request must find room when it does.
"""
from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass

from evaluator.receiver.errors import Refusal

DEFAULT_CLIENT_HEADER = "otel-evaluator-client"
MAX_CLIENT_NAME = 128  # characters of a header value used as a client name; longer values are cut
PRUNE_INTERVAL_SECONDS = 1.0  # idle clients are forgotten at most this often (the scan is over all clients)


@dataclass(frozen=True)
class FairnessSettings:
    enabled: bool = True
    client_header: str | None = DEFAULT_CLIENT_HEADER  # None: identify by token, else address
    min_share_bytes: int = 1024 * 1024  # a client's share never goes below this; also kept free for newcomers
    idle_seconds: float = 10.0  # a client counts as active this long after its last request


def client_key(header_value: str | None, bearer: bytes | None, peer_host: str) -> str:
    """The client's identity for fairness: header value, else token fingerprint, else address.

    The token itself is never kept: a truncated SHA-256 of it tells clients apart and reveals nothing."""
    name = (header_value or "").strip()
    if name:
        return "header:" + name[:MAX_CLIENT_NAME]
    if bearer:
        return "token:" + hashlib.sha256(bearer).hexdigest()[:16]
    return "peer:" + peer_host


def grpc_peer_host(peer: str) -> str:
    """'ipv4:10.0.0.7:51234' -> '10.0.0.7', 'ipv6:[::1]:51234' -> '::1'; anything else as it is."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rsplit(":", 1)[0]
    if kind == "ipv6":
        host = rest.rsplit(":", 1)[0] if rest.startswith("[") else rest
        return host.strip("[]")
    return peer


def describe_client(key: str) -> str:
    """The client as named in a refusal message (never the token fingerprint, which the client cannot use)."""
    kind, _, value = key.partition(":")
    if not value:
        return "the client"
    if kind == "header":
        return f"client {value!r}"
    if kind == "token":
        return "this token's client"
    return f"client at {value}"


class _Client:
    __slots__ = ("calls", "held", "last_seen")

    def __init__(self, now: float) -> None:
        self.held = 0  # request bytes admitted and not yet released
        self.calls: dict[str, int] = {}  # requests being handled, by transport
        self.last_seen = now


@dataclass(frozen=True)
class Admitted:
    """A reservation of `size` bytes and one handler of `transport` by `client`; give it back with
    Admission.release_client."""

    client: str
    size: int
    transport: str = ""


@dataclass(frozen=True)
class Denied:
    kind: Refusal
    message: str


class Admission:
    """The in-flight byte budget (and the handlers of transports that have a fixed number), shared fairly among
    active clients (see the module docstring).

    One lock guards the totals and the per-client table; an admission is a few dict operations under it. Time is
    passed in (`now`, seconds) so that the idle window follows the caller's clock."""

    def __init__(self, limit: int, settings: FairnessSettings) -> None:
        self.limit = limit
        self.settings = settings
        self._lock = threading.Lock()
        self._used = 0
        self._clients: dict[str, _Client] = {}
        self._handlers: dict[str, int] = {}
        self._next_prune = float("-inf")

    def set_handlers(self, transport: str, count: int) -> None:
        """`transport` handles at most `count` requests at once (the gRPC server's worker threads); while other
        clients are sending, a client may take only its share of them. Without it, a client with more streams
        than there are threads keeps them all busy, and everyone else's calls queue behind its calls."""
        with self._lock:
            self._handlers[transport] = count

    # -- the budget as a whole (ByteBudget's interface, for callers that are not a client) --------------------
    @property
    def used(self) -> int:
        with self._lock:
            return self._used

    def try_acquire(self, n: int) -> bool:
        """Take n bytes for no client in particular (no share applies); False when the budget is full."""
        with self._lock:
            if self._used and self._used + n > self.limit:
                return False
            self._used += n
            return True

    def release(self, n: int) -> None:
        with self._lock:
            self._used -= n

    # -- per client ------------------------------------------------------------------------------------------
    def active_clients(self, now: float) -> int:
        with self._lock:
            self._prune(now, force=True)
            return len(self._clients)

    def admit(self, client: str, n: int, now: float, transport: str = "") -> Admitted | Denied:
        """Reserve n bytes (and a handler of `transport`) for `client`, or say why not: over its share, or the
        budget is full."""
        with self._lock:
            self._prune(now)
            entry = self._clients.get(client)
            if entry is None:
                entry = self._clients[client] = _Client(now)
            entry.last_seen = now
            denied = self._over_share(client, entry, n, transport) if self.settings.enabled else None
            if denied is not None:
                return denied
            used, limit = self._used, self.limit
            if used and used + n > limit:
                return Denied(Refusal.OVERLOADED, self._overloaded(used))
            entry.held += n
            entry.calls[transport] = entry.calls.get(transport, 0) + 1
            self._used = used + n
            return Admitted(client, n, transport)

    def release_client(self, admitted: Admitted, now: float) -> None:
        with self._lock:
            self._used -= admitted.size
            entry = self._clients.get(admitted.client)
            if entry is not None:
                entry.held -= admitted.size
                entry.calls[admitted.transport] -= 1
                entry.last_seen = now

    def _over_share(self, client: str, entry: _Client, n: int, transport: str) -> Denied | None:
        """The fairness rules for a client that already holds something (one that holds nothing passes). Under
        the lock."""
        if not entry.held and not any(entry.calls.values()):
            return None
        limit, min_share = self.limit, self.settings.min_share_bytes
        shared = limit - min(min_share, limit // 2)  # the rest is kept for clients that hold nothing
        active = len(self._clients)
        if active > 1:
            share = max(shared // active, min_share)
            if entry.held + n > share:
                return Denied(Refusal.OVER_CLIENT_SHARE, (
                    f"over the client's share: {describe_client(client)} has {entry.held} request bytes in "
                    f"flight, its share is {share} ({active} clients sending, budget {limit}); retry later"))
            handlers = self._handlers.get(transport)
            calls = entry.calls.get(transport, 0)
            if handlers is not None and calls and calls >= max(handlers // active, 1):
                return Denied(Refusal.OVER_CLIENT_SHARE, (
                    f"over the client's share: {describe_client(client)} has {calls} requests being handled, its "
                    f"share is {max(handlers // active, 1)} of the {handlers} the {transport} receiver handles at "
                    f"once ({active} clients sending); retry later"))
        if self._used + n > shared:
            return Denied(Refusal.OVERLOADED, self._overloaded(self._used))
        return None

    def _overloaded(self, used: int) -> str:
        return f"overloaded: {used} request bytes in flight (limit {self.limit}); retry later"

    def _prune(self, now: float, force: bool = False) -> None:
        """Forget clients that hold nothing and were last seen over idle_seconds ago. Under the lock."""
        if now < self._next_prune and not force:
            return
        self._next_prune = now + PRUNE_INTERVAL_SECONDS
        horizon = now - self.settings.idle_seconds
        stale = [k for k, c in self._clients.items()
                 if not c.held and not any(c.calls.values()) and c.last_seen < horizon]
        for key in stale:
            del self._clients[key]
