"""Frontend-first scheduling of background work on a live stream.

On a small CPU the per-frame work (tracking, fusion) and the background work of the same
process (the backend thread: features, retrieval, verification, pose-graph optimisation;
map snapshots for the ROS outputs) share one interpreter lock. Background work that runs
while a frame is processed slows that frame down far beyond its own cost: every torch call
of the frame releases the lock, the background thread takes it, and the frame waits up to
a switch interval (5 ms) to get it back, a few hundred times per frame. Measured on 2 CPU
cores at 320x240: frames took 30-60 ms instead of 15-20 ms while the backend worked.

:class:`FrontendGate` lets background work run in the frontend's idle time instead (a
30 Hz stream whose frames take ~20 ms leaves ~40 % of the time idle):

* the frontend wraps each frame in ``with gate.frontend(): ...``;
* a background thread registers the gate once (:func:`run_in_background_of`) and calls
  :func:`checkpoint` between small units of work (a few ms each); :func:`checkpoint` blocks
  while a frame is being processed, so a frame is delayed by at most the rest of the unit
  that was running when it arrived.

The gate is disabled by default (offline runs process frames back to back: there is no
idle time to wait for, and the backend simply runs alongside); a live caller (the ROS
node) enables it with ``SlamSystem(..., live=True)``. A frontend that is never idle (an
overloaded CPU) cannot starve the background work: :func:`checkpoint` waits at most
``max_wait_s``. Threads that did not register a gate (e.g. the frontend itself when it calls
verification helpers) pass :func:`checkpoint` at once.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Iterator, Optional

__all__ = ["FrontendGate", "checkpoint", "run_in_background_of"]

_local = threading.local()


class FrontendGate:
    """Tells background threads when the frontend is idle (see the module notes).

    Args:
        enabled: when False, :meth:`wait_idle` returns at once (background work runs
            concurrently with the frames, as without a gate).
        max_wait_s: longest wait of one :meth:`wait_idle` call (starvation guard).

    Read-only statistics: ``n_waits`` (waits that blocked), ``waited_s`` (total blocked
    time), ``n_timeouts`` (waits ended by ``max_wait_s``).
    """

    def __init__(self, enabled: bool = False, max_wait_s: float = 0.25) -> None:
        self.enabled = bool(enabled)
        self.max_wait_s = float(max_wait_s)
        self._cv = threading.Condition()
        self._busy = 0
        self.n_waits = 0
        self.n_timeouts = 0
        self.waited_s = 0.0

    @property
    def busy(self) -> bool:
        """A frame is being processed."""
        return self._busy > 0

    @contextmanager
    def frontend(self) -> Iterator[None]:
        """Mark the enclosed block as frontend work (re-entrant, thread-safe)."""
        with self._cv:
            self._busy += 1
        try:
            yield
        finally:
            with self._cv:
                self._busy -= 1
                if self._busy == 0:
                    self._cv.notify_all()

    def wait_idle(self, timeout: Optional[float] = None) -> bool:
        """Block while the frontend is busy (enabled gates only).

        Args:
            timeout: longest wait in seconds (default ``max_wait_s``).

        Returns:
            True when the frontend is idle (or the gate is disabled), False after a timeout.
        """
        if not self.enabled or self._busy == 0:
            return True
        t0 = time.monotonic()
        with self._cv:
            ok = self._cv.wait_for(lambda: self._busy == 0, self.max_wait_s if timeout is None else timeout)
        self.n_waits += 1
        self.waited_s += time.monotonic() - t0
        if not ok:
            self.n_timeouts += 1
        return ok

    def stats(self) -> dict:
        """Counters as a plain mapping (diagnostics)."""
        return {"gate_enabled": self.enabled, "gate_waits": self.n_waits, "gate_timeouts": self.n_timeouts,
                "gate_waited_s": round(self.waited_s, 3)}


@contextmanager
def run_in_background_of(gate: Optional[FrontendGate]) -> Iterator[None]:
    """Within the block, :func:`checkpoint` in this thread waits for ``gate``'s frontend to be idle."""
    prev = getattr(_local, "gate", None)
    _local.gate = gate
    try:
        yield
    finally:
        _local.gate = prev


def checkpoint() -> None:
    """A yield point of background work: returns at once unless this thread registered an
    enabled gate (:func:`run_in_background_of`) whose frontend is processing a frame, then
    waits until the frame is done (at most the gate's ``max_wait_s``)."""
    gate = getattr(_local, "gate", None)
    if gate is not None:
        gate.wait_idle()
