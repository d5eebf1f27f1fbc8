"""Per-holder limits of the coordinator's gRPC service: wasted calls, Joins, waiting polls.

Mutual TLS keeps strangers out, but a holder with a valid certificate (buggy, or
compromised) can still flood the coordinator: every call costs a worker thread, a decode,
and usually the coordinator's lock, which every other holder's round waits on. What a
flood is follows from the protocol. A well-behaved holder, however fast, makes calls that
move the run forward: a PullTask that hands it a task it has not had yet (or the end of
the run), a PushAnswer the coordinator accepts. Everything else (a task or answer sent
again, a poll that returns nothing, a call the coordinator rejects) is rare for it and is
all a flood is made of. So the service gives every holder identity:

- a token bucket for PullTask, PushAnswer and Leave (``server.rate_limit_per_s``, burst
  ``server.rate_limit_burst``): each call takes a token once the caller is authenticated,
  and a call that moved the run forward gives its token back, so progress is never
  throttled, at any speed, and only wasted calls are counted;
- a token bucket for Join (``server.join_rate_limit_per_s``, ``..._burst``), keyed by the
  peer's proven identity (its certificate's common name; the claimed id over insecure
  loopback), charged before the claim is compared with the certificate, so a flood of
  refused Joins is limited too; every Join counts (each one replaces a session);
- a cap on its PullTasks waiting at once (``server.max_polls_per_holder``): a waiting
  long-poll costs a coroutine and a wake-up registration (and, for an endpoint that
  blocks, a worker thread), so one holder must not pile them up;
- a token bucket for *rejected* calls of every method (the call rate and burst), keyed by
  the best identity there is before a request is even parsed: the certificate's common
  name under mutual TLS, else the peer's address (a connection: insecure transport is for
  loopback and tests). Every refusal (malformed bytes or fields, no or a wrong session, a
  certificate that is not the claimed holder, a call the coordinator rejects, a limit
  hit) takes a token, and a caller with none left is refused before its request is
  decoded, so a flood of malformed or unauthenticated calls costs its sender, and only
  its sender.

A call over a limit is refused before it reaches the coordinator (RESOURCE_EXHAUSTED,
which the holder's loop retries with backoff) and changes no coordinator state; only the
limiter's own bookkeeping moves.

The worker pool is sized here too (``server.max_workers``): it serves endpoints that may
block (tests' fakes, wrappers), one thread per waiting long-poll, by default twice the
holders the run expects and never fewer than 64; the served ``Coordinator`` runs on the
event loop and uses none. Four times the pool caps the calls in flight for such an
endpoint; the served Coordinator allows 65,536 (every holder's waiting polls).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from sottovoce.common.config import ServerSection

DEFAULT_MAX_WORKERS = 64  # the least the pool is sized for (each waiting long-poll holds one)
WORKERS_PER_HOLDER = 2  # one long-poll each, and as many again for holders beyond min_holders
SPARE_WORKERS = 16  # for Join, Leave and health checks while every holder waits
MAX_TRACKED_KEYS = 100_000  # buckets kept; beyond, the least recently used is forgotten

Clock = Callable[[], float]


@dataclass(frozen=True)
class RateLimit:
    """``burst`` calls at once, then ``per_s`` calls a second on average."""

    per_s: float
    burst: int

    def describe(self) -> str:
        return f"{self.per_s:g}/s, burst {self.burst}"


class TokenBucket:
    """A bucket of ``limit.burst`` tokens refilled at ``limit.per_s``; a call takes one."""

    def __init__(self, limit: RateLimit, now: float):
        self._limit = limit
        self._tokens = float(limit.burst)
        self._stamp = now

    def take(self, now: float) -> bool:
        """Take a token if there is one; a refused call takes nothing."""
        self._refill(now)
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True

    def has_token(self, now: float) -> bool:
        """Whether a call would be let through now (takes nothing)."""
        self._refill(now)
        return self._tokens >= 1.0

    def give_back(self, now: float) -> None:
        """Return a token a call took (never above the burst)."""
        self._refill(now)
        self._tokens = min(float(self._limit.burst), self._tokens + 1.0)

    def full(self, now: float) -> bool:
        """Whether the bucket has refilled: forgetting it then changes nothing."""
        refilled = self._tokens + max(0.0, now - self._stamp) * self._limit.per_s
        return refilled >= self._limit.burst

    def _refill(self, now: float) -> None:
        elapsed = max(0.0, now - self._stamp)
        self._tokens = min(float(self._limit.burst), self._tokens + elapsed * self._limit.per_s)
        self._stamp = now


class KeyedRateLimiter:
    """One :class:`TokenBucket` per key (a holder identity), thread-safe, bounded in memory.

    At most ``max_keys`` buckets are kept: full ones are dropped first (a fresh bucket is
    the same), then the least recently used, which can only ever loosen a limit.
    """

    def __init__(
        self, limit: RateLimit, *, clock: Clock = time.monotonic, max_keys: int = MAX_TRACKED_KEYS
    ):
        self.limit = limit
        self._clock = clock
        self._max_keys = max_keys
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()
        self._lock = threading.Lock()

    def try_acquire(self, key: str) -> bool:
        """Whether ``key`` may make one more call now (and if so, count it)."""
        with self._lock:
            now = self._clock()
            bucket = self._buckets.get(key)
            if bucket is None:
                self._make_room(now)
                bucket = self._buckets[key] = TokenBucket(self.limit, now)
            else:
                self._buckets.move_to_end(key)
            return bucket.take(now)

    def allows(self, key: str) -> bool:
        """Whether ``key`` has a token now, without taking one (an unknown key has a full
        bucket); for checking a caller before the work that may cost it a token."""
        with self._lock:
            bucket = self._buckets.get(key)
            return bucket is None or bucket.has_token(self._clock())

    def refund(self, key: str) -> None:
        """Give back the token of a call that turned out not to count."""
        with self._lock:
            bucket = self._buckets.get(key)
            if bucket is not None:
                bucket.give_back(self._clock())

    def __len__(self) -> int:
        return len(self._buckets)

    def _make_room(self, now: float) -> None:
        """Keep at most ``max_keys - 1`` buckets, so a new one fits."""
        if len(self._buckets) < self._max_keys:
            return
        for key in [k for k, bucket in self._buckets.items() if bucket.full(now)]:
            del self._buckets[key]
        while len(self._buckets) >= self._max_keys:
            self._buckets.popitem(last=False)


class ConcurrencyCap:
    """At most ``limit`` calls per key in progress at once (thread-safe).

    Only keys with a call in progress are kept, so memory follows the calls, not the keys.
    """

    def __init__(self, limit: int):
        self.limit = limit
        self._active: dict[str, int] = {}
        self._lock = threading.Lock()

    def try_acquire(self, key: str) -> bool:
        """Take one of ``key``'s slots if one is free; pair a True with :meth:`release`."""
        with self._lock:
            active = self._active.get(key, 0)
            if active >= self.limit:
                return False
            self._active[key] = active + 1
            return True

    def release(self, key: str) -> None:
        with self._lock:
            remaining = self._active[key] - 1
            if remaining:
                self._active[key] = remaining
            else:
                del self._active[key]

    def active(self, key: str) -> int:
        with self._lock:
            return self._active.get(key, 0)


class Deliveries:
    """What each holder was last handed (a task id, or the end of the run), so that only
    the first delivery of each counts as progress and a re-sent one costs a token."""

    def __init__(self) -> None:
        self._last: dict[str, str] = {}
        self._lock = threading.Lock()

    def first(self, holder_id: str, item: str) -> bool:
        """Record ``item`` as handed to ``holder_id``; True if it was not the last one."""
        with self._lock:
            if self._last.get(holder_id) == item:
                return False
            self._last[holder_id] = item
            return True

    def forget(self, holder_id: str) -> None:
        with self._lock:
            self._last.pop(holder_id, None)


@dataclass(frozen=True)
class ServiceLimits:
    """Everything the gRPC service bounds per holder, and its worker pool's size."""

    calls: RateLimit
    joins: RateLimit
    max_polls_per_holder: int
    max_workers: int

    @classmethod
    def from_config(cls, server: ServerSection) -> ServiceLimits:
        """The run config's ``[server]`` limits; the pool sized from its holders if unset."""
        expected_holders = max(server.min_holders, len(server.allowed_holders))
        workers = server.max_workers or max(
            DEFAULT_MAX_WORKERS, WORKERS_PER_HOLDER * expected_holders + SPARE_WORKERS
        )
        return cls(
            calls=RateLimit(server.rate_limit_per_s, server.rate_limit_burst),
            joins=RateLimit(server.join_rate_limit_per_s, server.join_rate_limit_burst),
            max_polls_per_holder=server.max_polls_per_holder,
            max_workers=workers,
        )

    @classmethod
    def defaults(cls) -> ServiceLimits:
        """The limits of a run config that sets none (one holder expected)."""
        return cls.from_config(ServerSection())
