"""The SLAM engine in a process of its own, for the ROS node (parameter ``engine_process``).

Why: the engine (torch + NumPy, plus its backend thread) and the node (rclpy executor,
message handling, path / marker / cloud messages) each need most of a core; in one process
they share one interpreter lock, and every torch call that releases it may wait up to a
switch interval (5 ms) to get it back. Measured on 2 CPU cores: the engine ran 2-3x slower
inside the node than alone. In its own process the engine keeps its interpreter lock.

Pieces (no rclpy import here):

* :class:`FrameChannel` / :class:`ChannelReader`: a one-slot, newest-frame channel in shared
  memory (``memfd`` buffers handed over a Unix socket, a POSIX record lock; nothing to clean
  up, even after ``kill -9``). The node writes the raw message bytes of one synchronised set
  (image + depth or right image) and a small header; a newer frame replaces one the engine
  has not taken yet and is counted in :attr:`FrameChannel.skipped`. Decoding happens in the
  engine process, so skipped frames are never decoded.
* :class:`EngineClient` (node side): starts the engine process (``multiprocessing`` 'spawn':
  rclpy must not be forked after its init), feeds frames, sends commands (``reset``,
  ``save_map``, ``load_map``, ``stats``) with replies and timeouts, fetches map snapshots
  (trajectory, keyframes, cloud) on a separate pipe, and reads per-frame results in a
  thread that calls back into the node. The engine process dying is reported through
  ``on_exit`` (the node logs it, shows it in ``/diagnostics`` and restarts the engine).
* :func:`engine_main` (engine side): builds :class:`~recon_slam.system.SlamSystem` at the
  first decodable frame, processes the newest frame whenever it is rung, serves commands
  between frames and map snapshots in a helper thread, forwards ``logging`` records, and
  exits when the node goes away (pipe closed or parent pid changed), so no orphan is left.

Messages engine -> node on the main pipe (tuples, first item the kind):
``("ready", info)``, ``("result", dict)``, ``("error", dict)``, ``("stale", dict)``,
``("log", level, text)``, ``("reply", id, dict)``, ``("stopped",)``, and ``("done", dict)`` after
a ``result`` that was sent before the frame's map work was done (its total engine time).

Fault drills (tests): the environment variable ``RECON_SLAM_ENGINE_FAULT`` = ``raise@N``,
``exit@N`` or ``hang@N`` makes the engine process raise, exit or hang at its N-th frame.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import mmap
import os
import pickle
import signal
import struct
import sys
import threading
import time
import traceback
from types import SimpleNamespace
from typing import Any, Callable, Optional

import numpy as np

from recon_slam.io.ros_outputs import MapCloudCache

__all__ = [
    "FrameChannel",
    "ChannelReader",
    "EngineClient",
    "EngineUnavailable",
    "engine_main",
    "warm_up_torch",
    "freeze_heap",
    "LiveCloudCache",
    "pack_frame",
    "unpack_frame",
    "FAULT_ENV",
]

#: environment variable of the fault drills (see the module notes)
FAULT_ENV = "RECON_SLAM_ENGINE_FAULT"

log = logging.getLogger(__name__)


class EngineUnavailable(RuntimeError):
    """The engine process is not running, exited, or did not answer in time."""


# ================================================================================== packing
def _stamp_parts(stamp: Any) -> tuple[int, int]:
    nsec = getattr(stamp, "nanosec", None)
    if nsec is None:
        nsec = getattr(stamp, "nsec", 0)
    return int(stamp.sec), int(nsec)


def _byte_view(data: Any) -> memoryview:
    """Message byte sequence (array.array, bytes, ndarray, list) -> flat uint8 memoryview (no copy when possible)."""
    if isinstance(data, np.ndarray):
        return memoryview(np.ascontiguousarray(data).reshape(-1).view(np.uint8))
    if isinstance(data, (bytes, bytearray, memoryview)):
        return memoryview(data).cast("B")
    try:
        mv = memoryview(data)
        return mv.cast("B") if mv.format != "B" or mv.ndim != 1 else mv
    except TypeError:
        return memoryview(np.asarray(list(data), dtype=np.uint8))


def _pack_image(msg: Any) -> tuple[dict, memoryview]:
    h = msg.header
    d: dict[str, Any] = {"stamp": _stamp_parts(h.stamp), "frame_id": str(h.frame_id)}
    if hasattr(msg, "format") and not hasattr(msg, "encoding"):  # CompressedImage
        d["format"] = str(msg.format)
    else:
        d.update(encoding=str(msg.encoding), height=int(msg.height), width=int(msg.width), step=int(msg.step),
                 is_bigendian=int(msg.is_bigendian))
    return d, _byte_view(msg.data)


def _pack_info(msg: Any) -> Optional[dict]:
    if msg is None:
        return None

    def field(*names: str) -> list:
        for n in names:
            if hasattr(msg, n):
                return [float(x) for x in getattr(msg, n)]
        return []

    return {"stamp": _stamp_parts(msg.header.stamp), "frame_id": str(msg.header.frame_id),
            "width": int(msg.width), "height": int(msg.height), "distortion_model": str(msg.distortion_model),
            "k": field("k", "K"), "d": field("d", "D"), "p": field("p", "P"), "r": field("r", "R")}


def pack_frame(image: Any, info: Any, depth: Any = None, right: Any = None, right_info: Any = None,
               **extra: Any) -> tuple[dict, list[memoryview]]:
    """One synchronised set of ROS messages -> (header dict, raw byte buffers) for :class:`FrameChannel`.

    Args:
        image: colour/left ``sensor_msgs/Image`` or ``CompressedImage``; ``depth`` /
            ``right``: the depth or right image (same kinds); ``info`` / ``right_info``:
            their ``CameraInfo`` (None when not received).
        extra: more header entries (stamp, arrival, settings, ...), kept as they are.

    Returns:
        The header (small, pickled into the channel) and the data buffers (views of the
        messages' byte arrays, copied once into shared memory by :meth:`FrameChannel.put`).
    """
    meta: dict[str, Any] = dict(extra)
    parts: list[memoryview] = []
    for role, msg in (("image", image), ("depth", depth), ("right", right)):
        if msg is None:
            continue
        d, buf = _pack_image(msg)
        d["part"] = len(parts)
        meta[role] = d
        parts.append(buf)
    meta["info"] = _pack_info(info)
    meta["right_info"] = _pack_info(right_info)
    return meta, parts


def _ns_stamp(parts: tuple[int, int]) -> SimpleNamespace:
    return SimpleNamespace(sec=parts[0], nanosec=parts[1])


def unpack_frame(meta: dict, parts: list[np.ndarray]) -> dict[str, Any]:
    """Inverse of :func:`pack_frame`: message-like objects (field access, as the decoders in
    :mod:`recon_slam.io.messages` expect) for 'image', 'depth', 'right', 'info', 'right_info'
    (None when absent)."""
    out: dict[str, Any] = {}
    for role in ("image", "depth", "right"):
        d = meta.get(role)
        if d is None:
            out[role] = None
            continue
        fields = {k: v for k, v in d.items() if k not in ("stamp", "frame_id", "part")}
        out[role] = SimpleNamespace(header=SimpleNamespace(stamp=_ns_stamp(d["stamp"]), frame_id=d["frame_id"]),
                                    data=parts[d["part"]], **fields)
    for role in ("info", "right_info"):
        d = meta.get(role)
        if d is None:
            out[role] = None
            continue
        fields = {k: v for k, v in d.items() if k not in ("stamp", "frame_id")}
        out[role] = SimpleNamespace(header=SimpleNamespace(stamp=_ns_stamp(d["stamp"]), frame_id=d["frame_id"]),
                                    **fields)
    return out


# ================================================================================== map cloud
class LiveCloudCache(MapCloudCache):
    """:class:`~recon_slam.io.ros_outputs.MapCloudCache` (same cloud) in steps small enough for a live engine.

    ``MapCloudCache.cloud`` is one long step (each changed keyframe's confident points
    voxel-downsampled in its own frame, then all keyframes moved to the world and
    deduplicated: ~25 ms at 12 keyframes on a 2-core CPU, growing with the map; 0.1-0.26 s
    seen while frames were tracked next to it). Split here:

    * :meth:`refresh` (engine side): the per-keyframe step, one keyframe at a time with
      ``wait()`` between keyframes (the engine gate's ``wait_idle``: no frame is slowed down),
      cached by ``(keyframe id, n_fused)``;
    * :meth:`entries_since` / :meth:`merge`: only the keyframes that changed since the node's
      last copy travel to the node;
    * :meth:`compose` (node side for an engine process, else between frames): the world
      cloud of the cached keyframes at the given poses.

    ``cloud(engine)`` still gives the whole cloud in one call. :attr:`generation` changes when
    the cache starts over (new engine, reset, map load): a copy of another generation is
    dropped.

    Shapes and frames: points (N, 3) float32 in their keyframe's camera frame, colours (N, 3)
    uint8; poses (K, 4, 4) ``T_world_kf``; the composed cloud (M, 3) float32 in the world
    frame of the engine, colours (M, 3) uint8.
    """

    _generations = 0

    def __init__(self, voxel: float, min_confidence: float = 0.5, stride: int = 1) -> None:
        super().__init__(voxel, min_confidence, stride)
        LiveCloudCache._generations += 1
        self.generation = f"{os.getpid()}:{LiveCloudCache._generations}"
        self.n_refreshed = 0  # keyframes recomputed by the last refresh (statistics, tests)

    def clear(self) -> None:
        """Forget every cached keyframe (a new generation)."""
        super().clear()
        LiveCloudCache._generations += 1
        self.generation = f"{os.getpid()}:{LiveCloudCache._generations}"

    def refresh(self, engine: Any, wait: Optional[Callable[[], Any]] = None) -> tuple[list, np.ndarray]:
        """Bring every keyframe's local points up to date, one keyframe per step.

        Returns:
            ``(ids, T_world_kf (K, 4, 4))`` of the engine's keyframes (poses read last).
        """
        kmap = engine.keyframe_map
        present = set()
        self.n_refreshed = 0
        kfs = kmap.keyframes()
        for kf in kfs:
            present.add(kf.id)
            entry = self._cache.get(kf.id)
            if entry is None or entry[0] != kf.n_fused:
                if wait is not None:
                    wait()
                n_fused = kf.n_fused  # read before the pointmap: a later fusion bumps it again
                pts, col = self._local(kf)
                self._cache[kf.id] = (n_fused, pts, col)
                self.n_refreshed += 1
        for k in list(self._cache):
            if k not in present:
                del self._cache[k]
        ids = [kf.id for kf in kfs]  # the order of MapCloudCache.cloud (the first point of a voxel wins)
        _, poses = kmap.poses(ids) if ids else ([], np.zeros((0, 4, 4)))
        return ids, poses

    def entries_since(self, known: dict) -> dict:
        """``{id: (n_fused, points, colours)}`` of the cached keyframes whose version differs from ``known`` ({id: n_fused})."""
        return {k: e for k, e in self._cache.items() if known.get(k) != e[0]}

    def versions(self) -> dict:
        """``{id: n_fused}`` of the cached keyframes."""
        return {k: e[0] for k, e in self._cache.items()}

    def merge(self, generation: str, entries: dict, ids: list) -> None:
        """Node side: take the engine's changed ``entries`` (:meth:`entries_since`); keep only ``ids``."""
        if generation != self.generation:
            self._cache.clear()
            self.generation = generation
        self._cache.update(entries)
        keep = set(ids)
        for k in list(self._cache):
            if k not in keep:
                del self._cache[k]

    def compose(self, ids: list, poses: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """World cloud of the cached keyframes ``ids`` at ``poses`` (K, 4, 4): xyz (M, 3) float32, rgb (M, 3) uint8
        (what ``MapCloudCache.cloud`` returns)."""
        from recon_slam.io.ros_outputs import voxel_downsample

        xyz_all, rgb_all = [], []
        for kf_id, T in zip(ids, poses):
            entry = self._cache.get(kf_id)
            if entry is None or not len(entry[1]):
                continue
            xyz_all.append(entry[1].astype(np.float64) @ T[:3, :3].T + T[:3, 3])
            rgb_all.append(entry[2])
        if not xyz_all:
            return np.zeros((0, 3), np.float32), np.zeros((0, 3), np.uint8)
        xyz, rgb = voxel_downsample(np.concatenate(xyz_all), np.concatenate(rgb_all), self.voxel)
        return xyz.astype(np.float32), rgb

    def cloud(self, engine: Any) -> tuple[np.ndarray, np.ndarray]:
        """The whole world cloud of ``engine``'s keyframes in one call (as ``MapCloudCache.cloud``)."""
        return self.compose(*self.refresh(engine))


# ================================================================================== channel
# control block: int64 slots
_CTRL = struct.Struct("<8q")
_SEQ, _FULL, _GEN, _META_OFF, _META_LEN, _SKIPPED, _TAKEN, _CLEARED = range(8)
_CTRL_SIZE = 4096
_ALIGN = 64


def _memfd(name: str, size: int) -> int:
    """An anonymous shared-memory file of ``size`` bytes (freed when the last descriptor closes)."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create(name, getattr(os, "MFD_CLOEXEC", 0))
    else:  # pragma: no cover - Linux always has memfd_create
        import tempfile

        f = tempfile.TemporaryFile(dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
        fd = os.dup(f.fileno())
        f.close()
    os.ftruncate(fd, size)
    return fd


def _align(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


class FrameChannel:
    """Writer side of the one-slot newest-frame channel (lives in the node).

    Args:
        fd_conn: a ``multiprocessing`` Unix-socket connection to the reader; the control
            block and every (re)allocated data buffer are sent over it as file descriptors.

    :meth:`put` copies a frame's buffers into shared memory; when the slot still holds a
    frame the reader has not taken, that frame is replaced and counted in :attr:`skipped`.
    Thread-safe; the cross-process lock is a POSIX record lock, released by the kernel if
    the holder dies.
    """

    def __init__(self, fd_conn: Any) -> None:
        from multiprocessing.reduction import send_handle

        self._send_handle = send_handle
        self._conn = fd_conn
        self._lock = threading.Lock()
        self._ctrl_fd = _memfd("recon_slam_ctrl", _CTRL_SIZE)
        self._ctrl = mmap.mmap(self._ctrl_fd, _CTRL_SIZE)
        self._data_fd = -1
        self._data: Optional[mmap.mmap] = None
        self._cap = 0
        self._gen = 0
        self._closed = False
        send_handle(fd_conn, self._ctrl_fd, 0)

    # ---------------------------------------------------------------- counters
    def _read(self) -> list[int]:
        return list(_CTRL.unpack_from(self._ctrl, 0))

    @property
    def skipped(self) -> int:
        """Frames replaced before the engine took them."""
        return 0 if self._closed else self._read()[_SKIPPED]

    @property
    def offered(self) -> int:
        """Frames put."""
        return 0 if self._closed else self._read()[_SEQ]

    @property
    def taken(self) -> int:
        """Frames the engine took."""
        return 0 if self._closed else self._read()[_TAKEN]

    def __len__(self) -> int:
        return 0 if self._closed else int(self._read()[_FULL])

    # ---------------------------------------------------------------- writing
    def _grow(self, need: int) -> None:
        cap = max(need + need // 2, 1 << 20)
        fd = _memfd("recon_slam_frame", cap)
        mm = mmap.mmap(fd, cap)
        self._send_handle(self._conn, fd, 0)  # before the header names the new generation
        if self._data is not None:
            self._data.close()
            os.close(self._data_fd)
        self._data, self._data_fd, self._cap = mm, fd, cap
        self._gen += 1

    def put(self, meta: dict, parts: list) -> bool:
        """Offer a frame: ``meta`` (picklable header) and ``parts`` (byte buffers).

        Returns:
            True when the slot was empty (the reader must be told: ring its doorbell);
            False when an untaken frame was replaced (the reader was told already).
        """
        views = [p if isinstance(p, memoryview) else _byte_view(p) for p in parts]
        with self._lock:
            if self._closed:
                raise EngineUnavailable("frame channel closed")
            offsets, off = [], 0
            for v in views:
                offsets.append((off, v.nbytes))
                off = _align(off + v.nbytes)
            meta = dict(meta, parts=offsets)
            mb = pickle.dumps(meta, protocol=pickle.HIGHEST_PROTOCOL)
            need = off + len(mb)
            if need > self._cap:
                self._grow(need)
            assert self._data is not None
            fcntl.lockf(self._ctrl_fd, fcntl.LOCK_EX)
            try:
                for (o, n), v in zip(offsets, views):
                    self._data[o:o + n] = v
                self._data[off:off + len(mb)] = mb
                c = self._read()
                was_full = bool(c[_FULL])
                c[_SEQ] += 1
                c[_SKIPPED] += int(was_full)
                c[_FULL] = 1
                c[_GEN] = self._gen
                c[_META_OFF], c[_META_LEN] = off, len(mb)
                _CTRL.pack_into(self._ctrl, 0, *c)
            finally:
                fcntl.lockf(self._ctrl_fd, fcntl.LOCK_UN)
            return not was_full

    def clear(self) -> None:
        """Drop a waiting frame (not counted as skipped: used on reset)."""
        with self._lock:
            if self._closed:
                return
            fcntl.lockf(self._ctrl_fd, fcntl.LOCK_EX)
            try:
                c = self._read()
                if c[_FULL]:
                    c[_FULL] = 0
                    c[_CLEARED] += 1
                    _CTRL.pack_into(self._ctrl, 0, *c)
            finally:
                fcntl.lockf(self._ctrl_fd, fcntl.LOCK_UN)

    def close(self) -> None:
        """Unmap and close this side's buffers (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for mm, fd in ((self._data, self._data_fd), (self._ctrl, self._ctrl_fd)):
                if mm is not None:
                    mm.close()
                if fd >= 0:
                    os.close(fd)
            self._data = None


class ChannelReader:
    """Reader side of :class:`FrameChannel` (lives in the engine process).

    Args:
        fd_conn: the other end of the writer's ``fd_conn``; the control block descriptor
            is received at construction.
    """

    def __init__(self, fd_conn: Any) -> None:
        from multiprocessing.reduction import recv_handle

        self._recv_handle = recv_handle
        self._conn = fd_conn
        self._ctrl_fd = recv_handle(fd_conn)
        self._ctrl = mmap.mmap(self._ctrl_fd, _CTRL_SIZE)
        self._data: Optional[mmap.mmap] = None
        self._data_fd = -1
        self._gen = 0

    def take(self) -> Optional[tuple[dict, list[np.ndarray]]]:
        """The waiting frame as (header, [uint8 arrays, copies]) and the slot emptied; None when empty."""
        fcntl.lockf(self._ctrl_fd, fcntl.LOCK_EX)
        try:
            c = list(_CTRL.unpack_from(self._ctrl, 0))
            if not c[_FULL]:
                return None
            while self._gen < c[_GEN]:  # the writer reallocated: its descriptors are queued in order
                fd = self._recv_handle(self._conn)
                if self._data is not None:
                    self._data.close()
                    os.close(self._data_fd)
                self._data_fd = fd
                self._data = mmap.mmap(fd, os.fstat(fd).st_size)
                self._gen += 1
            assert self._data is not None
            mo, ml = c[_META_OFF], c[_META_LEN]
            meta = pickle.loads(self._data[mo:mo + ml])
            parts = []
            for o, n in meta.pop("parts"):
                view = np.frombuffer(self._data, np.uint8, count=n, offset=o)
                parts.append(view.copy())
                del view
            c[_FULL] = 0
            c[_TAKEN] += 1
            _CTRL.pack_into(self._ctrl, 0, *c)
            return meta, parts
        finally:
            fcntl.lockf(self._ctrl_fd, fcntl.LOCK_UN)


# ================================================================================== node side
class _Future:
    def __init__(self, on_reply: Optional[Callable[[dict], None]] = None) -> None:
        self._event = threading.Event()
        self.value: Optional[dict] = None
        self.error: Optional[str] = None
        self.on_reply = on_reply

    def set(self, value: Optional[dict], error: Optional[str] = None) -> None:
        self.value, self.error = value, error
        self._event.set()

    def wait(self, timeout: float) -> dict:
        if not self._event.wait(timeout):
            raise EngineUnavailable(f"the engine process did not answer within {timeout:.0f} s (busy or stuck; see "
                                    "/diagnostics)")
        if self.error is not None:
            raise EngineUnavailable(self.error)
        assert self.value is not None
        return self.value


class EngineClient:
    """Node-side handle of one engine process.

    Args:
        config: the engine's :class:`~recon_slam.config.SlamConfig`.
        mode: 'rgbd' or 'stereo'.
        on_message: called in the reader thread with every message of the engine process
            except replies (``("ready", info)``, ``("result", d)``, ``("error", d)``,
            ``("stale", d)``, ``("log", level, text)``), in the order they were sent.
        on_exit: called once in the reader thread with a description when the process ends
            without :meth:`stop` (crash, kill).
        cpu_threads: torch/OpenMP threads of the engine process (0 = library default).
    """

    def __init__(self, config: Any, mode: str, on_message: Callable[[tuple], None],
                 on_exit: Callable[[str], None], cpu_threads: int = 1) -> None:
        self.config = config
        self.mode = mode
        self._on_message = on_message
        self._on_exit = on_exit
        self._cpu_threads = int(cpu_threads)
        self._send_lock = threading.Lock()
        self._pending: dict[int, _Future] = {}
        self._pending_lock = threading.Lock()
        self._next_id = 0
        self._map_lock = threading.Lock()
        self._map_id = 0
        self._stopping = False
        self._exited = threading.Event()
        self.process: Any = None
        self.channel: Optional[FrameChannel] = None
        self.started_at = 0.0
        self.exit_description = ""

    # ---------------------------------------------------------------- life cycle
    def start(self) -> None:
        """Spawn the engine process (returns at once; it reports ``("ready", info)`` when up)."""
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self._conn, child_conn = ctx.Pipe(duplex=True)
        self._fd_conn, child_fd = ctx.Pipe(duplex=True)
        self._map_conn, child_map = ctx.Pipe(duplex=True)
        env_keys = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
        saved = {k: os.environ.get(k) for k in env_keys}
        if self._cpu_threads > 0:  # before torch / BLAS are imported in the child
            for k in env_keys:
                os.environ[k] = str(self._cpu_threads)
        try:
            self.process = ctx.Process(
                target=engine_main, name="recon_slam_engine", daemon=True,
                args=(child_conn, child_fd, child_map, self.config, self.mode,
                      {"parent_pid": os.getpid(), "cpu_threads": self._cpu_threads}),
            )
            self.process.start()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        for c in (child_conn, child_fd, child_map):
            c.close()  # the child holds them now: EOF here when it dies
        self.started_at = time.monotonic()
        self.channel = FrameChannel(self._fd_conn)
        self._reader = threading.Thread(target=self._read_loop, name="recon_slam_engine_results", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> Optional[int]:
        """Process id of the engine process (None before :meth:`start`)."""
        return None if self.process is None else self.process.pid

    def alive(self) -> bool:
        """The engine process runs and its pipe is open."""
        return self.process is not None and not self._exited.is_set() and self.process.is_alive()

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the engine to close (backend threads joined) and exit; kill it after ``timeout`` s. Idempotent."""
        if self.process is None:
            return
        self._stopping = True
        try:
            if not self._exited.is_set():
                self._send(("stop",))
        except (OSError, EngineUnavailable, ValueError):
            pass
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(2.0)
        if self.process.is_alive():  # pragma: no cover - terminate is enough normally
            self.process.kill()
            self.process.join(2.0)
        self._exited.wait(2.0)
        for c in (self._conn, self._fd_conn, self._map_conn):
            try:
                c.close()
            except OSError:
                pass
        if self.channel is not None:
            self.channel.close()
        self._fail_pending("the engine process was stopped")

    # ---------------------------------------------------------------- sending
    def _send(self, msg: tuple) -> None:
        if self._exited.is_set():
            raise EngineUnavailable(self.exit_description or "the engine process is not running")
        with self._send_lock:
            self._conn.send(msg)

    def submit(self, meta: dict, parts: list) -> None:
        """Put a frame into the newest-frame slot (see :func:`pack_frame`); rings the engine when needed.

        Raises:
            EngineUnavailable: the engine process is gone.
        """
        if self.channel is None or self._exited.is_set():
            raise EngineUnavailable(self.exit_description or "the engine process is not running")
        if self.channel.put(meta, parts):
            try:
                self._send(("frame",))
            except OSError as exc:
                raise EngineUnavailable(f"the engine process is not reachable ({exc})") from None

    def clear_frames(self) -> None:
        """Drop a frame waiting in the slot (on reset)."""
        if self.channel is not None:
            self.channel.clear()

    def command_async(self, name: str, args: Optional[dict] = None,
                      on_reply: Optional[Callable[[dict], None]] = None) -> _Future:
        """Send command ``name``; the returned future's :meth:`wait` gives the reply dict.

        ``on_reply`` runs in the reader thread when the reply arrives, before any later
        result is handled (state changes that must be in step with the result stream).
        """
        fut = _Future(on_reply)
        with self._pending_lock:
            self._next_id += 1
            cid = self._next_id
            self._pending[cid] = fut
        try:
            self._send(("cmd", cid, name, args or {}))
        except (OSError, EngineUnavailable, ValueError) as exc:
            with self._pending_lock:
                self._pending.pop(cid, None)
            fut.set(None, f"the engine process is not reachable ({exc})")
        return fut

    def command(self, name: str, args: Optional[dict] = None, timeout: float = 30.0,
                on_reply: Optional[Callable[[dict], None]] = None) -> dict:
        """Send command ``name`` and wait for its reply dict.

        Raises:
            EngineUnavailable: no reply within ``timeout`` s, or the process is gone.
        """
        return self.command_async(name, args, on_reply).wait(timeout)

    def map_data(self, request: dict, timeout: float = 30.0) -> dict:
        """A map snapshot from the engine process (served by its helper thread, off the frame path).

        Args:
            request: ``{"path": bool, "markers": bool, "cloud": bool, "cloud_params":
                (voxel m, min_confidence, stride)}``; ``"cloud_parts": True`` (with
                ``"cloud_known"``: ``{kf id: n_fused}`` and ``"cloud_generation"`` of the
                caller's :class:`LiveCloudCache`) asks for the keyframes' local clouds that
                changed since instead of the whole cloud (the caller composes it).

        Returns:
            ``{"path": (stamps (N,), T_world_cam (N, 4, 4)), "markers": (ids, T_world_kf
            (K, 4, 4), camera, edges), "cloud": (xyz (M, 3) float32, rgb (M, 3) uint8),
            "cloud_parts": {"generation": str, "ids": [kf ids], "poses": T_world_kf (K, 4, 4),
            "entries": {kf id: (n_fused, points (N, 3) float32 in the keyframe frame, colours
            (N, 3) uint8)}}, "cost": {item: seconds of work in the engine process}}`` for the
            requested items
            (missing when the engine has no map yet), or ``{"error": text}``.

        Raises:
            EngineUnavailable: the process is gone or did not answer in time.
        """
        with self._map_lock:
            if self._exited.is_set():
                raise EngineUnavailable(self.exit_description or "the engine process is not running")
            self._map_id += 1
            rid = self._map_id
            try:
                self._map_conn.send(dict(request, id=rid))
                end = time.monotonic() + timeout
                while True:
                    left = end - time.monotonic()
                    if left <= 0 or not self._map_conn.poll(left):
                        raise EngineUnavailable(f"no map snapshot from the engine process within {timeout:.0f} s")
                    reply = self._map_conn.recv()
                    if reply.get("id") == rid:  # older replies (after a timeout) are dropped
                        return reply
            except (EOFError, OSError) as exc:
                raise EngineUnavailable(f"the engine process is not reachable ({exc})") from None

    # ---------------------------------------------------------------- reader thread
    def _fail_pending(self, text: str) -> None:
        with self._pending_lock:
            pending, self._pending = self._pending, {}
        for fut in pending.values():
            fut.set(None, text)

    def _read_loop(self) -> None:
        stopped = False
        while True:
            try:
                msg = self._conn.recv()
            except (EOFError, OSError):
                break
            except Exception as exc:  # noqa: BLE001 - a message that cannot be unpickled
                self._on_message(("log", "error", f"unreadable message from the engine process: {exc}"))
                continue
            kind = msg[0]
            if kind == "reply":
                with self._pending_lock:
                    fut = self._pending.pop(msg[1], None)
                if fut is not None:
                    if fut.on_reply is not None:
                        try:
                            fut.on_reply(msg[2])
                        except Exception as exc:  # noqa: BLE001 - report, keep reading
                            self._on_message(("log", "error", f"handling the engine's reply failed: {exc}\n"
                                              + traceback.format_exc()))
                    fut.set(msg[2])
                continue
            if kind == "stopped":
                stopped = True
                break
            try:
                self._on_message(msg)
            except Exception as exc:  # noqa: BLE001 - the reader must survive the node's handler
                if self._stopping:
                    break
                log.error("handling an engine message failed: %s", exc)
        if self.process is not None:
            self.process.join(1.0 if not stopped else 5.0)
        code = self.process.exitcode if self.process is not None else None
        if code is None:
            desc = "the engine process closed its pipe"
        elif code < 0:
            try:
                desc = f"the engine process was killed by signal {signal.Signals(-code).name}"
            except ValueError:
                desc = f"the engine process was killed by signal {-code}"
        else:
            desc = f"the engine process exited with code {code}"
        self.exit_description = desc
        self._exited.set()
        self._fail_pending(desc)
        if not self._stopping and not stopped:
            self._on_exit(desc)


# ================================================================================== engine side
class _ConnLogHandler(logging.Handler):
    """Forwards log records of the engine process to the node (which logs them with rclpy)."""

    def __init__(self, send: Callable[[tuple], None]) -> None:
        super().__init__(logging.INFO)
        self._send = send

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level = "error" if record.levelno >= logging.ERROR else "warning" if record.levelno >= logging.WARNING \
                else "info"
            self._send(("log", level, f"[engine] {record.name}: {record.getMessage()}"))
        except Exception:  # noqa: BLE001 - logging must never raise
            pass


class _EngineServer:
    """State of the engine process (see :func:`engine_main`)."""

    def __init__(self, conn: Any, fd_conn: Any, map_conn: Any, config: Any, mode: str, options: dict) -> None:
        self.conn = conn
        self.map_conn = map_conn
        self.config = config
        self.mode = mode
        self.parent_pid = int(options.get("parent_pid") or os.getppid())
        self.engine: Any = None
        self.cloud_cache: Any = None
        self.cloud_params: Optional[tuple] = None
        self.pending_map: Any = None
        self.frame_index = 0
        self.n_frames = 0
        self.stale = 0
        self.cmd_lock = threading.RLock()  # commands vs. map snapshots (frames do not take it)
        self._send_lock = threading.Lock()
        self.reader = ChannelReader(fd_conn)
        fault = os.environ.get(FAULT_ENV, "")
        self.fault_kind, _, n = fault.partition("@")
        self.fault_at = int(n) if n.isdigit() else -1

    # ---------------------------------------------------------------- plumbing
    def send(self, msg: tuple) -> None:
        with self._send_lock:
            self.conn.send(msg)

    def parent_alive(self) -> bool:
        return os.getppid() == self.parent_pid

    # ---------------------------------------------------------------- main loop
    def run(self) -> None:
        while True:
            try:
                if not self.conn.poll(0.5):
                    if not self.parent_alive():
                        return
                    continue
                msg = self.conn.recv()
            except (EOFError, OSError):
                return  # the node is gone
            kind = msg[0]
            if kind == "frame":
                # busy from the doorbell on (taking and decoding the frame included): background work
                # (backend, map snapshots) holds back as early as possible
                with self.engine.gate.frontend() if self.engine is not None else contextlib.nullcontext():
                    item = self.reader.take()
                    if item is not None:
                        self.process_frame(*item)
            elif kind == "cmd":
                _, cid, name, args = msg
                with self.cmd_lock:
                    reply = self.command(name, args)
                self.send(("reply", cid, reply))
            elif kind == "stop":
                with self.cmd_lock:
                    self.close_engine()
                self.send(("stopped",))
                return

    def close_engine(self) -> None:
        if self.engine is not None:
            try:
                self.engine.close()
            finally:
                self.engine = None

    # ---------------------------------------------------------------- frames
    def _fault(self, index: int) -> None:
        """Fault drill at the ``index``-th decoded frame of this process (see ``FAULT_ENV``)."""
        if self.fault_at < 0 or index != self.fault_at:
            return
        if self.fault_kind == "raise":
            raise RuntimeError(f"fault drill: {FAULT_ENV}=raise@{self.fault_at}")
        if self.fault_kind == "exit":
            os._exit(3)
        if self.fault_kind == "hang":
            while self.parent_alive():
                time.sleep(0.2)
            os._exit(0)

    def ensure_engine(self, frame: Any, settings: dict, events: list) -> Any:
        if self.engine is not None:
            return self.engine
        from recon_slam.errors import ReconSlamError
        from recon_slam.system import SlamSystem

        self.engine = SlamSystem(self.config, frame.camera, live=True)  # backend works between frames
        self.cloud_cache = None
        if self.pending_map is not None or settings.get("load_map_at_start"):
            data, self.pending_map = self.pending_map, None
            try:
                events.append(("map_loaded", self.restore(data, settings.get("map_path", ""))))
            except ReconSlamError as exc:
                events.append(("map_error", f"could not load the map at start: {exc}"))
        return self.engine

    def process_frame(self, meta: dict, parts: list) -> None:
        from recon_slam.errors import ReconSlamError
        from recon_slam.io.ros_inputs import frame_from_messages

        taken = time.monotonic()
        settings = meta.get("settings", {})
        max_age = float(settings.get("max_frame_age", 0.0) or 0.0)
        if max_age > 0 and taken - float(meta.get("arrival", taken)) > max_age:
            self.stale += 1
            self.send(("stale", {"count": self.stale}))
            return
        events: list = []
        base = {"seq": meta.get("seq"), "arrival": meta.get("arrival"), "taken": taken, "events": events}
        try:
            msgs = unpack_frame(meta, parts)
            frame = frame_from_messages(
                self.frame_index, self.mode, msgs["image"], msgs["info"], depth_msg=msgs["depth"],
                right_msg=msgs["right"], right_info_msg=msgs["right_info"],
                camera_frame=settings.get("camera_frame", ""), baseline_m=settings.get("baseline_m"),
                topics=settings.get("topics"),
            )
            base["decoded"] = time.monotonic()
            engine = self.ensure_engine(frame, settings, events)
            self.frame_index += 1
            self.n_frames += 1
            self._fault(self.n_frames - 1)
            sent = []

            def on_pose(early: Any) -> None:  # the pose first, the frame's map work after it
                self.send(("result", dict(base, result=early, stamp=float(frame.stamp), frame_id=frame.frame_id,
                                          n_keyframes=engine.num_keyframes, done=time.monotonic())))
                sent.append(True)

            result = engine.process(frame, on_pose=on_pose)
            if not sent:
                on_pose(result)
            else:  # the frame's total engine time and keyframe decision (diagnostics)
                self.send(("done", {"seq": meta.get("seq"), "time_ms": float(result.time_ms),
                                    "is_keyframe": bool(result.is_keyframe), "n_keyframes": engine.num_keyframes}))
        except ReconSlamError as exc:
            self.send(("error", dict(base, input=True, type=type(exc).__name__, message=str(exc))))
        except Exception as exc:  # noqa: BLE001 - a bug: report it, keep serving
            self.send(("error", dict(base, input=False, type=type(exc).__name__, message=str(exc),
                                     traceback=traceback.format_exc())))

    # ---------------------------------------------------------------- commands
    def restore(self, data: Any, path: str) -> dict:
        from recon_slam.maps import load_map, restore_into_system

        if data is None:
            data = load_map(os.path.expanduser(path))
        n = restore_into_system(self.engine, data)
        self.cloud_cache = None
        return {"n": int(n), "T_map_world": np.asarray(data.T_map_world, dtype=np.float64),
                "warning": str(data.metadata.get("warning") or "")}

    def command(self, name: str, args: dict) -> dict:
        from recon_slam.errors import ReconSlamError

        try:
            if name == "reset":
                config = args.get("config")
                if config is not None and self.engine is not None and self.engine.config is not config:
                    self.close_engine()  # recreated with the new configuration at the next frame
                if config is not None:
                    self.config = config
                if self.engine is not None:
                    self.engine.reset()
                self.cloud_cache = None
                self.frame_index = 0
                return {"ok": True}
            if name == "save_map":
                from recon_slam.maps import MapError, save_system_map

                path = os.path.expanduser(args["path"])
                if self.engine is None or self.engine.num_keyframes == 0:
                    return {"ok": False, "message": "nothing to save yet: no keyframes (is the node tracking? see "
                                                    "/diagnostics)"}
                try:
                    save_system_map(self.engine, path, T_map_world=args.get("T_map_world"))
                except (MapError, OSError) as exc:
                    return {"ok": False, "message": f"save_map failed: {exc}"}
                return {"ok": True, "message": f"saved {self.engine.num_keyframes} keyframes to {path}"}
            if name == "load_map":
                from recon_slam.maps import MapError, load_map

                path = os.path.expanduser(args["path"])
                try:
                    data = load_map(path)
                    if data.mode != self.mode:
                        raise MapError(f"the map at {path} was built in mode {data.mode!r}, this node runs "
                                       f"{self.mode!r}")
                    if self.engine is None:
                        self.pending_map = data
                        return {"ok": True, "pending": True, "n": len(data.keyframes),
                                "message": f"map {path} ({len(data.keyframes)} keyframes) verified; it is loaded "
                                           "when the first frame arrives"}
                    out = self.restore(data, path)
                except (ReconSlamError, OSError) as exc:
                    return {"ok": False, "message": f"load_map failed: {exc}"}
                return dict(out, ok=True, pending=False,
                            message=f"loaded {out['n']} keyframes from {path}; relocalising in it")
            if name == "stats":
                out = {"ok": True, "pid": os.getpid(), "frames": self.n_frames, "stale": self.stale}
                if self.engine is not None:
                    out["engine"] = self.engine.stats()
                return out
            if name == "ping":
                return {"ok": True, "pid": os.getpid()}
            return {"ok": False, "message": f"unknown command {name!r}"}
        except Exception as exc:  # noqa: BLE001 - answer, do not die
            return {"ok": False, "message": f"{name} failed in the engine process: {type(exc).__name__}: {exc}",
                    "traceback": traceback.format_exc()}

    # ---------------------------------------------------------------- map snapshots (helper thread)
    def map_loop(self) -> None:
        while True:
            try:
                req = self.map_conn.recv()
            except (EOFError, OSError):
                return
            try:
                reply = self.map_snapshot(req)
            except Exception as exc:  # noqa: BLE001 - e.g. a reset raced with us
                reply = {"error": f"{type(exc).__name__}: {exc}"}
            reply["id"] = req.get("id")
            try:
                self.map_conn.send(reply)
            except (OSError, ValueError):
                return

    def map_snapshot(self, req: dict) -> dict:
        """Path, keyframe markers and cloud (whole or the keyframes changed since the node's copy)
        for :meth:`EngineClient.map_data`; every step waits until no frame is being processed."""
        from recon_slam.io.ros_outputs import graph_edges

        out: dict[str, Any] = {}
        cost: dict[str, float] = {}
        with self.cmd_lock:
            engine = self.engine
            if engine is None:
                return out
            # each step runs while no frame is being processed (the engine is live: its gate is
            # enabled), so snapshots never compete with tracking for the interpreter lock or a core
            gate = engine.gate
            waited = [0.0]

            def wait() -> None:
                t = time.perf_counter()
                gate.wait_idle()
                waited[0] += time.perf_counter() - t

            def timed(name: str, fn: Callable[[], Any]) -> Any:
                wait()
                w0, t0 = waited[0], time.perf_counter()
                value = fn()
                cost[name] = time.perf_counter() - t0 - (waited[0] - w0)  # work only, waits excluded
                return value

            if req.get("path"):
                out["path"] = timed("path", engine.trajectory)
            if req.get("markers"):
                def markers() -> Any:
                    ids, _, T_kf = engine.keyframes()
                    if not len(ids):
                        return None
                    camera = engine.keyframe_map.get(ids[0]).camera
                    return list(ids), np.asarray(T_kf), camera, graph_edges(engine, ids)

                m = timed("markers", markers)
                if m is not None:
                    out["markers"] = m
            if req.get("cloud") or req.get("cloud_parts"):
                params = tuple(req.get("cloud_params") or (0.02, 0.5, 1))
                if self.cloud_cache is None or self.cloud_params != params:
                    self.cloud_cache = LiveCloudCache(*params)
                    self.cloud_params = params
                cache = self.cloud_cache
                ids, poses = timed("cloud", lambda: cache.refresh(engine, wait))
                if req.get("cloud"):
                    c0 = cost["cloud"]
                    out["cloud"] = timed("cloud", lambda: cache.compose(ids, poses))
                    cost["cloud"] += c0
                if req.get("cloud_parts"):
                    known = req.get("cloud_known") or {}
                    if req.get("cloud_generation") != cache.generation:
                        known = {}
                    out["cloud_parts"] = {"generation": cache.generation, "ids": list(ids), "poses": np.asarray(poses),
                                          "entries": cache.entries_since(known)}
        out["cost"] = cost
        return out


def warm_up_torch() -> None:
    """Pay the engine's lazy one-time costs before the first frame, not next to tracking.

    * the first ``torch.broadcast_shapes`` (used by the Lie group helpers) imports sympy,
      ~1 s on a small CPU;
    * the engine's modules, and those the backend thread imports lazily at its first
      keyframes (``scipy.sparse`` for retrieval: ~0.2 s holding the interpreter lock next to
      a tracked frame; ``cholespy`` for the pose graph; OpenCV).
    """
    import importlib

    import torch

    try:
        torch.broadcast_shapes((2, 1), (1, 3))
    except Exception:  # noqa: BLE001 - an optimisation only
        pass
    for name in ("recon_slam.system", "recon_slam.backend", "scipy.sparse", "cholespy", "cv2"):
        try:
            importlib.import_module(name)
        except ImportError:  # optional dependencies: the code paths that need them say so
            pass


def freeze_heap() -> None:
    """Collect garbage once now and exempt every surviving object from later collections.

    After start-up a process holds hundreds of thousands of long-lived objects (torch, NumPy,
    rclpy, ...). A full (generation 2) collection walks all of them: 0.1-0.3 s measured on a
    2-core CPU, the whole process stopped, a frame or a pose publication late by as much.
    ``gc.freeze()`` moves them to a permanent generation, so later full collections only walk
    objects created afterwards. Call it once start-up is done (imports, node creation).
    """
    import gc

    gc.collect()
    gc.freeze()


def engine_main(conn: Any, fd_conn: Any, map_conn: Any, config: Any, mode: str, options: dict) -> None:
    """Entry point of the engine process (``multiprocessing`` 'spawn' target).

    Args:
        conn: duplex pipe to the node: frames' doorbells and commands in, results out.
        fd_conn: the frame channel's descriptor pipe (see :class:`ChannelReader`).
        map_conn: map snapshot requests in, snapshots out (helper thread).
        config: engine :class:`~recon_slam.config.SlamConfig`; mode: 'rgbd' or 'stereo'.
        options: ``parent_pid`` (exit when it is gone), ``cpu_threads``.
    """
    # Ctrl-C in a terminal reaches the whole process group: the node stops us in order.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    t0 = time.monotonic()
    server: Optional[_EngineServer] = None
    try:
        threads = int(options.get("cpu_threads") or 0)
        import torch

        if threads > 0:
            torch.set_num_threads(threads)
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:  # already set
            pass
        warm_up_torch()
        freeze_heap()
        server = _EngineServer(conn, fd_conn, map_conn, config, mode, options)
        handler = _ConnLogHandler(server.send)
        pkg = logging.getLogger("recon_slam")
        pkg.addHandler(handler)
        pkg.setLevel(logging.INFO)
        pkg.propagate = False
        logging.getLogger().addHandler(_ConnLogHandler(server.send))  # warnings of other libraries
        threading.Thread(target=server.map_loop, name="recon_slam_engine_map", daemon=True).start()
        # parent watchdog: also while a frame or command takes long
        def watch() -> None:
            while True:
                time.sleep(1.0)
                if not server.parent_alive():
                    os._exit(0)

        threading.Thread(target=watch, name="recon_slam_parent_watch", daemon=True).start()
        server.send(("ready", {"pid": os.getpid(), "torch_threads": torch.get_num_threads(),
                               "startup_s": time.monotonic() - t0}))
        server.run()
    except (EOFError, OSError, KeyboardInterrupt):
        pass
    except Exception as exc:  # noqa: BLE001 - tell the node why before dying
        try:
            text = f"engine process failed: {type(exc).__name__}: {exc}\n{traceback.format_exc()}"
            (server.send if server is not None else conn.send)(("log", "error", text))
        except Exception:  # noqa: BLE001
            pass
        sys.stderr.flush()
        os._exit(2)
    finally:
        if server is not None and server.engine is not None:
            try:
                server.engine.close()
            except Exception:  # noqa: BLE001
                pass
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # do not wait for the engine's daemon threads
