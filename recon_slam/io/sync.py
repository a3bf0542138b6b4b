"""Approximate-time synchronisation of N message streams (no ROS imports).

One small synchroniser serves the offline bag reader and the ROS node: stream 0 is the
*reference* (the colour or left image); every reference message is paired with the
message of each other stream whose stamp is closest to it, when that is within
``tolerance`` seconds. Matches come out in reference stamp order. Messages that can no
longer be matched are dropped and counted per reason (:attr:`StampSynchronizer.drops`):

* ``'backwards'``: stamp older than the previous one on the same stream (the caller
  decides whether to warn: bag loops, clock resets, ``ros2 bag play --loop``);
* ``'duplicate'``: the same stamp again on the same stream;
* ``'unmatched'``: no partner within ``tolerance`` (reference messages), or too old to
  pair with any pending or future reference message (other streams);
* ``'overflow'``: a queue went past ``queue_size`` (a stream stopped or lags far behind);
* ``'flushed'``: left over when :meth:`flush` ended the streams.

Pick a tolerance below half the frame period: then the closest-stamp pairing is unique.
"""

from __future__ import annotations

from collections import Counter, deque
from typing import Any, Hashable, NamedTuple, Optional, Sequence


class Match(NamedTuple):
    """One synchronised set: ``stamp`` of the reference message and one item per stream."""

    stamp: float
    items: tuple
    stamps: tuple


class StampSynchronizer:
    """Approximate-time synchroniser of ``n`` streams with bounded queues.

    Args:
        streams: number of streams, or their names (stream 0 is the reference).
        tolerance: largest allowed ``|stamp_s - stamp_ref|`` in seconds.
        queue_size: most messages kept waiting per stream.

    Use :meth:`add` for every message (stream index or name, stamp in seconds, any item);
    it returns the :class:`Match` es completed by that message. :meth:`flush` matches what
    is left when no more messages will come.
    """

    def __init__(self, streams: int | Sequence[Hashable], tolerance: float = 0.02, queue_size: int = 30) -> None:
        names = list(range(streams)) if isinstance(streams, int) else list(streams)
        if len(names) < 1:
            raise ValueError("StampSynchronizer needs at least one stream")
        if len(set(names)) != len(names):
            raise ValueError(f"stream names must be unique, got {names}")
        if tolerance < 0:
            raise ValueError(f"tolerance must be >= 0 seconds, got {tolerance}")
        if queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, got {queue_size}")
        self.names = names
        self.tolerance = float(tolerance)
        self.queue_size = int(queue_size)
        self._index = {name: i for i, name in enumerate(names)}
        self._queues: list[deque] = [deque() for _ in names]  # (stamp, item), stamps strictly increasing
        self._last: list[Optional[float]] = [None] * len(names)
        #: drop counts per reason, over all streams
        self.drops: Counter = Counter()
        #: drop counts per stream name, then per reason
        self.drops_by_stream: dict[Hashable, Counter] = {name: Counter() for name in names}
        #: number of matches emitted
        self.matched = 0

    # ------------------------------------------------------------------ public
    @property
    def n_streams(self) -> int:
        """Number of streams."""
        return len(self.names)

    def queue_lengths(self) -> tuple[int, ...]:
        """Number of messages waiting per stream."""
        return tuple(len(q) for q in self._queues)

    def last_stamp(self, stream: Hashable) -> Optional[float]:
        """Newest accepted stamp (seconds) of ``stream``; None before the first message."""
        return self._last[self._stream(stream)]

    def add(self, stream: Hashable, stamp: float, item: Any = None) -> list[Match]:
        """Offer one message; returns the matches it completes (oldest first).

        Args:
            stream: stream index (0..n-1) or name.
            stamp: message stamp in seconds.
            item: anything (the message, an index); returned inside the match.
        """
        s = self._stream(stream)
        stamp = float(stamp)
        last = self._last[s]
        if last is not None and stamp <= last:
            self._drop(s, "duplicate" if stamp == last else "backwards")
            return []
        self._last[s] = stamp
        q = self._queues[s]
        q.append((stamp, item))
        if len(q) > self.queue_size:
            q.popleft()
            self._drop(s, "overflow")
        return self._process(final=False)

    def flush(self) -> list[Match]:
        """End of all streams: emit the matches still possible and drop the rest."""
        out = self._process(final=True)
        for s, q in enumerate(self._queues):
            for _ in range(len(q)):
                self._drop(s, "flushed")
            q.clear()
        return out

    def reset(self) -> None:
        """Forget queued messages and last stamps (e.g. after a bag loop); keeps the counters."""
        for q in self._queues:
            q.clear()
        self._last = [None] * len(self.names)

    # ------------------------------------------------------------------ internals
    def _stream(self, stream: Hashable) -> int:
        if stream in self._index:
            return self._index[stream]
        if isinstance(stream, int) and 0 <= stream < len(self.names):
            return stream
        raise KeyError(f"unknown stream {stream!r}; streams are {self.names}")

    def _drop(self, s: int, reason: str) -> None:
        self.drops[reason] += 1
        self.drops_by_stream[self.names[s]][reason] += 1

    def _process(self, final: bool) -> list[Match]:
        out: list[Match] = []
        ref = self._queues[0]
        tol = self.tolerance
        while ref:
            t_ref, ref_item = ref[0]
            chosen: list[Optional[int]] = [None] * len(self._queues)
            decided = True
            failed = False
            for s in range(1, len(self._queues)):
                q = self._queues[s]
                # older than any reference still to come: can never match
                while q and q[0][0] < t_ref - tol:
                    q.popleft()
                    self._drop(s, "unmatched")
                # first index at or after the reference stamp
                k = next((i for i, (t, _) in enumerate(q) if t >= t_ref), None)
                if k is None and not final:
                    # a closer message may still come (unless this stream is far ahead)
                    decided = False
                    continue
                candidates = [i for i in ((k - 1) if k else None, k) if i is not None and 0 <= i < len(q)]
                if k is None:
                    candidates = [len(q) - 1] if q else []
                best = min(candidates, key=lambda i: abs(q[i][0] - t_ref), default=None)
                if best is None or abs(q[best][0] - t_ref) > tol:
                    failed = True
                else:
                    chosen[s] = best
            if failed:
                ref.popleft()
                self._drop(0, "unmatched")
                continue
            if not decided:
                break
            ref.popleft()
            items = [ref_item]
            stamps = [t_ref]
            for s in range(1, len(self._queues)):
                q = self._queues[s]
                best = chosen[s]
                for _ in range(best):  # older ones lost their chance
                    q.popleft()
                    self._drop(s, "unmatched")
                t, it = q.popleft()
                items.append(it)
                stamps.append(t)
            self.matched += 1
            out.append(Match(t_ref, tuple(items), tuple(stamps)))
        return out


__all__ = ["Match", "StampSynchronizer"]
