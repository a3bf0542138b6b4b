"""A small TF buffer without tf2 (no ROS imports).

tf2_ros is not installable everywhere this package runs (not on PyPI), yet the node and
``recon-slam replay`` both need two look-ups from the TF tree:

* the camera-to-base extrinsic ``T_base_cam`` (a chain of static transforms), and
* the robot's own odometry ``T_odom_base`` at an image stamp (dynamic transforms), when
  another node publishes ``odom -> base_link``.

:class:`TfBuffer` stores ``geometry_msgs/TransformStamped`` messages (rclpy or rosbags,
read by field access) per ``(parent, child)`` edge and answers :meth:`TfBuffer.lookup`
along the tree, interpolating dynamic edges in time (linear translation, slerp rotation).
Poses follow the package convention: ``T_a_b`` maps frame ``b`` coordinates into ``a``.
"""

from __future__ import annotations

import bisect
import threading
from collections import deque
from typing import Any, Iterable, Optional

import numpy as np
from scipy.spatial.transform import Rotation, Slerp

from recon_slam.errors import InputError
from recon_slam.geometry.transforms import invert_pose

__all__ = ["TfBuffer", "TfLookupError"]


class TfLookupError(InputError):
    """A transform is not (yet) known: unknown frame, no path, or the stamp is out of range."""


def _strip(frame: str) -> str:
    return str(frame).lstrip("/")


def _matrix(transform_stamped: Any) -> np.ndarray:
    tr = transform_stamped.transform.translation
    r = transform_stamped.transform.rotation
    q = np.array([r.x, r.y, r.z, r.w], dtype=np.float64)
    n = np.linalg.norm(q)
    if not np.isfinite(n) or n < 1e-9:
        raise InputError(
            f"transform {transform_stamped.header.frame_id} -> {transform_stamped.child_frame_id} has an invalid "
            "quaternion (zero or non-finite)"
        )
    T = np.eye(4)
    T[:3, :3] = Rotation.from_quat(q / n).as_matrix()
    T[:3, 3] = (tr.x, tr.y, tr.z)
    return T


class _Edge:
    """Samples of one ``parent -> child`` edge: static (one pose) or dynamic (time series)."""

    def __init__(self, static: bool, cache_s: float) -> None:
        self.static = static
        self.cache_s = cache_s
        self.stamps: deque = deque()  # float seconds, increasing
        self.poses: deque = deque()  # (4, 4) T_parent_child

    def add(self, stamp: float, T: np.ndarray) -> None:
        if self.static:
            self.stamps.clear()
            self.poses.clear()
            self.stamps.append(stamp)
            self.poses.append(T)
            return
        if self.stamps and stamp <= self.stamps[-1]:
            if stamp == self.stamps[-1]:
                self.poses[-1] = T
                return
            # time went backwards (bag loop, clock reset): start again
            self.stamps.clear()
            self.poses.clear()
        self.stamps.append(stamp)
        self.poses.append(T)
        while self.stamps and self.stamps[0] < stamp - self.cache_s:
            self.stamps.popleft()
            self.poses.popleft()

    def at(self, stamp: Optional[float], tolerance: float) -> np.ndarray:
        if self.static or stamp is None:
            return self.poses[-1]
        stamps = self.stamps
        if stamp > stamps[-1] + tolerance or stamp < stamps[0] - tolerance:
            raise TfLookupError(
                f"stamp {stamp:.3f} s is outside the buffered range [{stamps[0]:.3f}, {stamps[-1]:.3f}] s"
            )
        k = bisect.bisect_left(list(stamps), stamp)
        if k == 0:
            return self.poses[0]
        if k >= len(stamps):
            return self.poses[-1]
        t0, t1 = stamps[k - 1], stamps[k]
        T0, T1 = self.poses[k - 1], self.poses[k]
        a = (stamp - t0) / (t1 - t0)
        rot = Slerp([0.0, 1.0], Rotation.from_matrix(np.stack([T0[:3, :3], T1[:3, :3]])))([a]).as_matrix()[0]
        T = np.eye(4)
        T[:3, :3] = rot
        T[:3, 3] = (1 - a) * T0[:3, 3] + a * T1[:3, 3]
        return T


class TfBuffer:
    """Transforms by edge, with look-ups along the tree (thread-safe).

    Args:
        cache_s: how many seconds of dynamic transforms to keep per edge.
        tolerance: how far (s) past the newest / before the oldest sample a dynamic edge
            may be extrapolated (it is held constant there).
    """

    def __init__(self, cache_s: float = 10.0, tolerance: float = 0.05) -> None:
        self.cache_s = float(cache_s)
        self.tolerance = float(tolerance)
        self._edges: dict[tuple[str, str], _Edge] = {}
        self._parent: dict[str, str] = {}  # child -> parent (a tree: one parent per child)
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ input
    def add(self, transform_stamped: Any, static: bool = False) -> None:
        """Store one ``TransformStamped`` (``header.frame_id`` -> ``child_frame_id``)."""
        parent = _strip(transform_stamped.header.frame_id)
        child = _strip(transform_stamped.child_frame_id)
        if not parent or not child or parent == child:
            return
        stamp = float(transform_stamped.header.stamp.sec) + int(transform_stamped.header.stamp.nanosec) * 1e-9
        T = _matrix(transform_stamped)
        with self._lock:
            key = (parent, child)
            edge = self._edges.get(key)
            if edge is None or edge.static != static:
                old = self._parent.get(child)
                if old is not None and old != parent:
                    self._edges.pop((old, child), None)
                edge = _Edge(static, self.cache_s)
                self._edges[key] = edge
                self._parent[child] = parent
            edge.add(stamp, T)

    def add_message(self, tf_message: Any, static: bool = False) -> None:
        """Store every transform of a ``tf2_msgs/TFMessage``."""
        for t in tf_message.transforms:
            self.add(t, static=static)

    def clear(self) -> None:
        """Forget everything (e.g. after the clock jumped back)."""
        with self._lock:
            self._edges.clear()
            self._parent.clear()

    # ------------------------------------------------------------------ queries
    def frames(self) -> set[str]:
        """All frame names seen."""
        with self._lock:
            return set(self._parent) | set(self._parent.values())

    def _chain_to_root(self, frame: str) -> list[str]:
        chain = [frame]
        seen = {frame}
        while chain[-1] in self._parent:
            nxt = self._parent[chain[-1]]
            if nxt in seen:  # a loop in the published tree: stop
                break
            chain.append(nxt)
            seen.add(nxt)
        return chain

    def lookup(self, target: str, source: str, stamp: Optional[float] = None, static_only: bool = False) -> np.ndarray:
        """``T_target_source`` (4, 4): maps ``source`` coordinates into ``target``.

        Args:
            target, source: frame names (a leading '/' is ignored).
            stamp: time in seconds for dynamic edges (None: their newest sample).
            static_only: only follow static edges (the extrinsic look-up).

        Raises:
            TfLookupError: a frame is unknown, the frames are not connected, or a dynamic
                edge has no sample near ``stamp``.
        """
        target, source = _strip(target), _strip(source)
        if target == source:
            return np.eye(4)
        with self._lock:
            known = set(self._parent) | set(self._parent.values())
            for f in (target, source):
                if f not in known:
                    raise TfLookupError(
                        f"frame {f!r} is not in the TF tree (known frames: {sorted(known) or 'none'})"
                    )
            up_s = self._chain_to_root(source)
            up_t = self._chain_to_root(target)
            common = next((f for f in up_s if f in set(up_t)), None)
            if common is None:
                raise TfLookupError(f"frames {target!r} and {source!r} are not connected in the TF tree")

            def to_ancestor(chain: list[str]) -> np.ndarray:
                # T_common_frame for chain[0]
                T = np.eye(4)
                for child in chain[: chain.index(common)]:
                    edge = self._edges[(self._parent[child], child)]
                    if static_only and not edge.static:
                        raise TfLookupError(
                            f"transform {self._parent[child]} -> {child} is dynamic (/tf), expected a static one "
                            "(/tf_static) for a sensor extrinsic"
                        )
                    T = edge.at(stamp, self.tolerance) @ T
                return T

            T_common_source = to_ancestor(up_s)
            T_common_target = to_ancestor(up_t)
        return invert_pose(T_common_target) @ T_common_source

    def can_lookup(self, target: str, source: str, stamp: Optional[float] = None, static_only: bool = False) -> bool:
        """Whether :meth:`lookup` would succeed."""
        try:
            self.lookup(target, source, stamp, static_only)
            return True
        except TfLookupError:
            return False


def fill_from_messages(buffer: TfBuffer, messages: Iterable[tuple[str, Any]]) -> TfBuffer:
    """Add ``(topic, TFMessage)`` pairs to ``buffer`` (``/tf_static`` ones as static)."""
    for topic, msg in messages:
        buffer.add_message(msg, static=topic.rstrip("/").endswith("tf_static"))
    return buffer
