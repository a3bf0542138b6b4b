"""Saved maps: a small versioned folder, written atomically, verified on load.

Used by the ROS node's ``~/save_map`` / ``~/load_map`` services, ``recon-slam run
--save-map``, ``recon-slam map`` (relocaliser for an existing run), ``recon-slam reloc``
and ``--localize-only``. It touches the engine only through :func:`map_from_system` and
:func:`restore_into_system` (public engine API).

Folder layout (format ``recon_slam_map``, :data:`MAP_VERSION`)::

    metadata.json    format, version, created (UTC), recon_slam version, mode, config,
                     camera (processing intrinsics), keyframe count, T_map_world,
                     files: {name: sha256} of every other file (written last)
    keyframes.npz    ids (K,) int64, frame_index (K,) int64, stamps (K,) float64,
                     T_world_kf (K, 4, 4) float64, n_fused (K,) int64, metric (K,) bool,
                     calibrated (K,) bool
    kf_000000.npz    one per keyframe: X (H, W, 3) float32 pointmap in the keyframe's
                     optical frame, C (H, W) float32 confidence, image (H, W, 3) uint8 RGB,
                     camera (7,) float64 [width, height, fx, fy, cx, cy, 0] [, D, Q]
    trajectory.txt   TUM poses of the session's frames (T_world_cam)
    cloud.ply        fused coloured cloud in the world frame (for viewers and RViz)
    relocaliser.pt   optional: scene-coordinate relocaliser state (torch.save of CPU
                     tensors and plain data, read with weights_only=True)

Metadata (version 2) also holds ``camera_model``, ``n_frames``, ``has_relocaliser``,
``slam_state`` (false for relocaliser-only maps) and ``T_gt_world`` (evaluation only).

Atomicity: the map is written completely into a hidden sibling folder (files fsynced,
``metadata.json`` with the checksums last), then swapped in by two renames:
``path -> path.old`` and ``tmp -> path``; ``path.old`` is then removed. An existing map is
never modified in place, so a crash at any point leaves either the old map at ``path``,
or (between the two renames) the old map at ``path.old`` and the new one complete in the
temporary folder; :func:`load_map` then falls back to ``path.old`` and says so. Loading
checks the format name, the version and every checksum, so a damaged map is refused
with a clear error instead of loading silently wrong.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from recon_slam import __version__
from recon_slam.errors import InputError
from recon_slam.geometry.camera import PinholeCamera

__all__ = [
    "MAP_FORMAT",
    "MAP_VERSION",
    "MapError",
    "KeyframeData",
    "MapData",
    "save_map",
    "load_map",
    "map_from_system",
    "restore_into_system",
    "save_system_map",
    "load_system_map",
    "load_relocaliser",
]

MAP_FORMAT = "recon_slam_map"
#: 2: optional relocaliser (``relocaliser.pt``), ``T_gt_world``, relocaliser-only maps
MAP_VERSION = 2
_RELOC_FILE = "relocaliser.pt"
_METADATA = "metadata.json"


class MapError(InputError):
    """A map cannot be saved or loaded (missing, damaged, wrong version, incompatible)."""


@dataclass
class KeyframeData:
    """One keyframe of a saved map (NumPy, CPU).

    Attributes:
        id, frame_index, stamp: identity and time (s).
        T_world_kf: (4, 4) float64 pose.
        X: (H, W, 3) float32 pointmap in the keyframe optical frame; C: (H, W) float32 confidence.
        image: (H, W, 3) uint8 RGB at processing resolution.
        camera: intrinsics of ``X``/``image``.
        n_fused, metric, calibrated: as in :class:`recon_slam.frontend.keyframes.Keyframe`.
        D, Q: optional (H, W, F) descriptors and (H, W) descriptor confidence.
    """

    id: int
    frame_index: int
    stamp: float
    T_world_kf: np.ndarray
    X: np.ndarray
    C: np.ndarray
    image: np.ndarray
    camera: PinholeCamera
    n_fused: int = 1
    metric: bool = True
    calibrated: bool = True
    D: Optional[np.ndarray] = None
    Q: Optional[np.ndarray] = None


@dataclass
class MapData:
    """Everything a map folder holds.

    Attributes:
        keyframes: in id order.
        mode: engine mode the map was built with ('rgbd', 'stereo').
        config: the engine configuration as a nested dict.
        T_map_world: (4, 4) placement of the engine world in the ROS map frame (identity
            when unknown).
        trajectory: optional (stamps (N,), T_world_cam (N, 4, 4)).
        cloud: optional (xyz (M, 3) float32, rgb (M, 3) uint8) in the world frame.
        relocaliser: optional state of the scene-coordinate relocaliser
            (:meth:`recon_slam.reloc.Relocaliser.state_dict`: CPU tensors and plain data);
            see :func:`load_relocaliser`.
        T_gt_world: optional (4, 4) alignment of the map's world frame to the ground truth
            of the mapping session (evaluation only: ``recon-slam reloc`` scores against it).
        metadata: the parsed metadata.json (after :func:`load_map`).

    A map without keyframes (``recon-slam map``) holds only the relocaliser: it can
    localise but SLAM cannot continue mapping in it.
    """

    keyframes: list[KeyframeData]
    mode: str = "rgbd"
    config: dict = field(default_factory=dict)
    T_map_world: np.ndarray = field(default_factory=lambda: np.eye(4))
    trajectory: Optional[tuple[np.ndarray, np.ndarray]] = None
    cloud: Optional[tuple[np.ndarray, np.ndarray]] = None
    relocaliser: Optional[dict] = None
    T_gt_world: Optional[np.ndarray] = None
    camera: Optional[PinholeCamera] = None
    metadata: dict = field(default_factory=dict)

    @property
    def has_slam_state(self) -> bool:
        """True when SLAM can continue in the map (it holds keyframes)."""
        return bool(self.keyframes)


# ---------------------------------------------------------------------------- helpers
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _camera_vector(cam: PinholeCamera) -> np.ndarray:
    return np.array([cam.width, cam.height, cam.fx, cam.fy, cam.cx, cam.cy, 0.0], dtype=np.float64)


def _camera_from_vector(v: np.ndarray) -> PinholeCamera:
    v = np.asarray(v, dtype=np.float64).reshape(-1)
    return PinholeCamera(int(v[0]), int(v[1]), float(v[2]), float(v[3]), float(v[4]), float(v[5]))


def _write_ply(path: Path, xyz: np.ndarray, rgb: Optional[np.ndarray]) -> None:
    """Binary little-endian PLY of points (N, 3) float32 [+ colours (N, 3) uint8]."""
    xyz = np.asarray(xyz, dtype=np.float32).reshape(-1, 3)
    n = len(xyz)
    props = ["property float x", "property float y", "property float z"]
    names, formats = ["x", "y", "z"], ["<f4", "<f4", "<f4"]
    if rgb is not None:
        props += ["property uchar red", "property uchar green", "property uchar blue"]
        names += ["r", "g", "b"]
        formats += ["u1", "u1", "u1"]
    rec = np.empty(n, dtype=np.dtype({"names": names, "formats": formats}))
    rec["x"], rec["y"], rec["z"] = xyz[:, 0], xyz[:, 1], xyz[:, 2]
    if rgb is not None:
        c = np.asarray(rgb, dtype=np.uint8).reshape(-1, 3)
        rec["r"], rec["g"], rec["b"] = c[:, 0], c[:, 1], c[:, 2]
    header = "\n".join(["ply", "format binary_little_endian 1.0", f"element vertex {n}", *props, "end_header"]) + "\n"
    with open(path, "wb") as f:
        f.write(header.encode("ascii"))
        f.write(rec.tobytes())


def _read_ply(path: Path) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Read a PLY written by :func:`_write_ply` -> (xyz (N, 3) float32, rgb (N, 3) uint8 or None)."""
    data = path.read_bytes()
    end = data.find(b"end_header\n")
    if end < 0:
        raise MapError(f"{path}: not a PLY file written by recon_slam")
    header = data[:end].decode("ascii").splitlines()
    n = next(int(line.split()[2]) for line in header if line.startswith("element vertex"))
    has_rgb = any("red" in line for line in header)
    names, formats = ["x", "y", "z"], ["<f4", "<f4", "<f4"]
    if has_rgb:
        names += ["r", "g", "b"]
        formats += ["u1", "u1", "u1"]
    rec = np.frombuffer(data[end + len(b"end_header\n"):], dtype=np.dtype({"names": names, "formats": formats}), count=n)
    xyz = np.stack([rec["x"], rec["y"], rec["z"]], axis=1).astype(np.float32)
    rgb = np.stack([rec["r"], rec["g"], rec["b"]], axis=1).astype(np.uint8) if has_rgb else None
    return xyz, rgb


# ---------------------------------------------------------------------------- save
def save_map(data: MapData, path: str | Path, *, _fail_after: Optional[str] = None) -> Path:
    """Write ``data`` as a map folder at ``path``, atomically (see the module notes).

    Args:
        data: the map.
        path: folder to create or replace.
        _fail_after: testing hook: raise after this step ('files', 'metadata', 'swap').

    Returns:
        ``path``.

    Raises:
        MapError: the folder cannot be written (permissions, disk full); the previous map
            at ``path`` is left untouched.
    """
    path = Path(path).expanduser()
    if not data.keyframes and data.relocaliser is None:
        raise MapError("the map is empty (no keyframes yet): let the node track for a while before saving")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.saving-", dir=path.parent))
    except OSError as exc:
        raise MapError(f"cannot create a map under {path.parent}: {exc}") from None
    try:
        kfs = sorted(data.keyframes, key=lambda k: k.id)
        np.savez(
            tmp / "keyframes.npz",
            ids=np.array([k.id for k in kfs], dtype=np.int64),
            frame_index=np.array([k.frame_index for k in kfs], dtype=np.int64),
            stamps=np.array([k.stamp for k in kfs], dtype=np.float64),
            T_world_kf=np.array([np.asarray(k.T_world_kf, dtype=np.float64) for k in kfs]).reshape(-1, 4, 4),
            n_fused=np.array([k.n_fused for k in kfs], dtype=np.int64),
            metric=np.array([k.metric for k in kfs], dtype=bool),
            calibrated=np.array([k.calibrated for k in kfs], dtype=bool),
        )
        for k in kfs:
            arrays = {
                "X": np.asarray(k.X, dtype=np.float32),
                "C": np.asarray(k.C, dtype=np.float32),
                "image": np.asarray(k.image, dtype=np.uint8),
                "camera": _camera_vector(k.camera),
            }
            if k.D is not None:
                arrays["D"] = np.asarray(k.D, dtype=np.float32)
            if k.Q is not None:
                arrays["Q"] = np.asarray(k.Q, dtype=np.float32)
            np.savez(tmp / f"kf_{k.id:06d}.npz", **arrays)
        if data.trajectory is not None:
            from recon_slam.io.trajectory import write_tum

            stamps, T = data.trajectory
            if len(stamps):
                write_tum(tmp / "trajectory.txt", stamps, T, header="recon_slam map: frames of the mapping session (T_world_cam)")
        if data.cloud is not None:
            _write_ply(tmp / "cloud.ply", data.cloud[0], data.cloud[1])
        if data.relocaliser is not None:
            import torch

            torch.save(_to_cpu(data.relocaliser), tmp / _RELOC_FILE)
        if _fail_after == "files":
            raise OSError("simulated crash after writing the files")
        files = {}
        for p in sorted(tmp.iterdir()):
            _fsync_file(p)
            files[p.name] = _sha256(p)
        cam0 = kfs[0].camera if kfs else data.camera
        if cam0 is None:
            raise MapError("a map without keyframes needs its camera (MapData.camera)")
        meta = {
            "format": MAP_FORMAT,
            "version": MAP_VERSION,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "recon_slam_version": __version__,
            "mode": data.mode,
            "camera": cam0.to_dict(),
            "camera_model": "pinhole",
            "n_keyframes": len(kfs),
            "n_frames": 0 if data.trajectory is None else int(len(data.trajectory[0])),
            "has_relocaliser": data.relocaliser is not None,
            "slam_state": bool(kfs),
            "T_map_world": np.asarray(data.T_map_world, dtype=np.float64).tolist(),
            "T_gt_world": None if data.T_gt_world is None else np.asarray(data.T_gt_world, dtype=np.float64).tolist(),
            "config": data.config,
            "files": files,
        }
        with open(tmp / _METADATA, "w") as f:
            json.dump(meta, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        if _fail_after == "metadata":
            raise OSError("simulated crash before swapping the map in")
        old = path.with_name(path.name + ".old")
        if old.exists():
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        if path.exists():
            os.rename(path, old)
        if _fail_after == "swap":
            raise OSError("simulated crash between the two renames")
        os.rename(tmp, path)
        _fsync_dir(path.parent)
        if old.exists():
            shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        if _fail_after is None or not str(exc).startswith("simulated crash"):
            shutil.rmtree(tmp, ignore_errors=True)
        raise MapError(f"could not save the map to {path}: {exc}; the previous map (if any) is unchanged") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


# ---------------------------------------------------------------------------- load
def _resolve_for_load(path: Path) -> tuple[Path, str]:
    if (path / _METADATA).is_file():
        return path, ""
    old = path.with_name(path.name + ".old")
    if (old / _METADATA).is_file():
        return old, f"{path} is missing but {old} holds the previous map (a save was interrupted): loading that"
    if path.exists():
        raise MapError(f"{path} is not a recon_slam map (no {_METADATA}); give the folder written by ~/save_map")
    raise MapError(f"no map at {path}: save one first (ros2 service call <node>/save_map std_srvs/srv/Trigger) "
                   "or set the map_path parameter")


def load_map(path: str | Path, *, with_cloud: bool = False) -> MapData:
    """Read and verify a map folder.

    Args:
        path: the folder written by :func:`save_map`.
        with_cloud: also read ``cloud.ply``.

    Returns:
        :class:`MapData` (``metadata['warning']`` is set when the fallback copy was used).

    Raises:
        MapError: missing folder, unknown format, newer version, checksum mismatch.
    """
    path, warning = _resolve_for_load(Path(path).expanduser())
    try:
        meta = json.loads((path / _METADATA).read_text())
    except (OSError, ValueError) as exc:
        raise MapError(f"{path / _METADATA} is unreadable ({exc}): the map is damaged") from None
    if meta.get("format") != MAP_FORMAT:
        raise MapError(f"{path}: format {meta.get('format')!r} is not {MAP_FORMAT!r}")
    version = meta.get("version")
    if not isinstance(version, int) or version > MAP_VERSION or version < 1:
        raise MapError(
            f"{path}: map format version {version!r} is not supported by recon_slam {__version__} "
            f"(reads versions 1..{MAP_VERSION}); upgrade recon_slam"
        )
    files = meta.get("files") or {}
    for name, digest in files.items():
        p = path / name
        if not p.is_file():
            raise MapError(f"{path}: file {name} is missing: the map is damaged")
        if _sha256(p) != digest:
            raise MapError(f"{path}: checksum of {name} does not match: the map is damaged (re-save it)")
    if "keyframes.npz" not in files:
        raise MapError(f"{path}: keyframes.npz is not listed in the metadata: the map is damaged")
    index = np.load(path / "keyframes.npz")
    keyframes = []
    for i, kid in enumerate(index["ids"].tolist()):
        name = f"kf_{int(kid):06d}.npz"
        if name not in files:
            raise MapError(f"{path}: keyframe file {name} is not listed in the metadata: the map is damaged")
        arr = np.load(path / name)
        keyframes.append(
            KeyframeData(
                id=int(kid),
                frame_index=int(index["frame_index"][i]),
                stamp=float(index["stamps"][i]),
                T_world_kf=np.asarray(index["T_world_kf"][i], dtype=np.float64),
                X=arr["X"],
                C=arr["C"],
                image=arr["image"],
                camera=_camera_from_vector(arr["camera"]),
                n_fused=int(index["n_fused"][i]),
                metric=bool(index["metric"][i]),
                calibrated=bool(index["calibrated"][i]),
                D=arr["D"] if "D" in arr.files else None,
                Q=arr["Q"] if "Q" in arr.files else None,
            )
        )
    trajectory = None
    if (path / "trajectory.txt").is_file():
        from recon_slam.io.trajectory import read_tum

        trajectory = read_tum(path / "trajectory.txt")
    cloud = _read_ply(path / "cloud.ply") if with_cloud and (path / "cloud.ply").is_file() else None
    reloc = None
    if _RELOC_FILE in files:
        import torch

        try:
            reloc = torch.load(path / _RELOC_FILE, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - checksummed, so this is a foreign/old file
            raise MapError(f"{path}: {_RELOC_FILE} cannot be read ({exc}): rebuild the relocaliser "
                           "with `recon-slam map`") from None
    T_gt = meta.get("T_gt_world")
    if warning:
        meta["warning"] = warning
    meta["loaded_from"] = str(path)
    return MapData(
        keyframes=keyframes,
        mode=str(meta.get("mode", "rgbd")),
        config=dict(meta.get("config") or {}),
        T_map_world=np.asarray(meta.get("T_map_world", np.eye(4).tolist()), dtype=np.float64),
        trajectory=trajectory,
        cloud=cloud,
        relocaliser=reloc,
        T_gt_world=None if T_gt is None else np.asarray(T_gt, dtype=np.float64),
        camera=PinholeCamera.from_dict(meta["camera"]) if isinstance(meta.get("camera"), dict) else None,
        metadata=meta,
    )


def _to_cpu(obj: Any) -> Any:
    """Nested structure with every tensor moved to the CPU (maps load anywhere)."""
    if hasattr(obj, "detach"):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def load_relocaliser(data: MapData, device: Any = "cpu"):
    """The map's scene-coordinate relocaliser on ``device``.

    Args:
        data: a loaded map; device: 'cpu', 'cuda', 'auto' or a torch device.

    Returns:
        :class:`recon_slam.reloc.Relocaliser`.

    Raises:
        MapError: the map has no relocaliser (build one with ``recon-slam map``) or its
            state is not one this version understands.
    """
    if data.relocaliser is None:
        where = data.metadata.get("loaded_from", "the map")
        raise MapError(f"{where} has no relocaliser: build it with `recon-slam map RUN_DIR --out MAP` "
                       "or save the map with `recon-slam run ... --save-map DIR`")
    from recon_slam.reloc.relocaliser import Relocaliser

    if str(device) == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        return Relocaliser.from_state_dict(data.relocaliser, device)
    except MapError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise MapError(f"the map's relocaliser cannot be restored ({exc}): rebuild it with `recon-slam map`") from None


# ---------------------------------------------------------------------------- engine side
def _np(t: Any) -> np.ndarray:
    if hasattr(t, "detach"):
        return t.detach().cpu().numpy()
    return np.asarray(t)


def map_from_system(system: Any, T_map_world: Optional[np.ndarray] = None, cloud_voxel: Optional[float] = None) -> MapData:
    """Snapshot of a :class:`~recon_slam.system.SlamSystem` as :class:`MapData` (CPU copies).

    Args:
        system: the engine.
        T_map_world: (4, 4) placement of the engine world in the ROS map frame.
        cloud_voxel: voxel size of the exported cloud (None: the engine's default).
    """
    kmap = system.keyframe_map
    with kmap.lock:
        kfs = kmap.keyframes()
        ids, poses = kmap.poses([k.id for k in kfs])
    out = []
    for kf, T in zip(kfs, poses):
        X, C = kf.snapshot()
        out.append(
            KeyframeData(
                id=int(kf.id),
                frame_index=int(kf.frame_index),
                stamp=float(kf.stamp),
                T_world_kf=np.asarray(T, dtype=np.float64),
                X=_np(X).astype(np.float32),
                C=_np(C).astype(np.float32),
                image=_np(kf.image).astype(np.uint8),
                camera=kf.camera,
                n_fused=int(kf.n_fused),
                metric=bool(kf.metric),
                calibrated=bool(kf.calibrated),
                D=None if kf.D is None else _np(kf.D).astype(np.float32),
                Q=None if kf.Q is None else _np(kf.Q).astype(np.float32),
            )
        )
    try:
        trajectory = system.trajectory()
    except Exception:  # noqa: BLE001 - the trajectory is informative only
        trajectory = None
    cloud = system.fused_cloud(cloud_voxel) if out else None
    return MapData(
        keyframes=out,
        mode=str(system.config.mode),
        config=system.config.to_dict(),
        T_map_world=np.eye(4) if T_map_world is None else np.asarray(T_map_world, dtype=np.float64),
        trajectory=trajectory,
        cloud=cloud,
    )


def restore_into_system(system: Any, data: MapData) -> int:
    """Put the keyframes of ``data`` into a freshly reset engine; returns the keyframe count.

    The engine forgets its own map and trajectory first; the map's relocaliser, if any, is
    attached (``reloc.use_when_lost``). Its next frame is handled as after
    a tracking loss at the last pose of the mapping session (``data.trajectory[-1]``, else
    the last keyframe): it relocalises against the loaded keyframes (the backend's
    relocaliser when there is one, else the most recent keyframes, starting from that pose)
    and then continues in the loaded map.

    Raises:
        MapError: the map's mode or metric-ness does not match the engine.
    """
    import torch

    from recon_slam.frontend.keyframes import Keyframe

    if not data.keyframes:
        raise MapError("the map holds no SLAM keyframes (a relocaliser-only map from `recon-slam map`): "
                       "use it with --localize-only / reloc_node, or save a full map with --save-map")
    if data.mode != system.config.mode:
        raise MapError(
            f"the map was built in mode {data.mode!r} but the engine runs in mode {system.config.mode!r}: "
            "start the node with the same mode as the map"
        )
    metric = bool(getattr(system.predictor, "metric", True))
    if data.keyframes and any(k.metric != metric for k in data.keyframes):
        raise MapError("the map's pointmaps are not in the same units (metric / up-to-scale) as the engine's")
    system.reset()
    device = system.device
    with system._lock:
        kmap = system.keyframe_map
        kfs = sorted(data.keyframes, key=lambda k: k.id)
        prev = None
        for k in kfs:
            kf = Keyframe(
                id=k.id,
                frame_index=k.frame_index,
                stamp=k.stamp,
                camera=k.camera,
                image=torch.as_tensor(np.ascontiguousarray(k.image), device=device),
                X=torch.as_tensor(np.ascontiguousarray(k.X), device=device),
                C=torch.as_tensor(np.ascontiguousarray(k.C), device=device),
                n_fused=k.n_fused,
                metric=k.metric,
                D=None if k.D is None else torch.as_tensor(np.ascontiguousarray(k.D), device=device),
                Q=None if k.Q is None else torch.as_tensor(np.ascontiguousarray(k.Q), device=device),
                calibrated=k.calibrated,
            )
            kmap.add(kf, k.T_world_kf)
            backend = getattr(system, "backend", None)
            if backend is not None and hasattr(backend, "add_keyframe"):
                # the saved poses are already optimised: chain them with sequential edges that
                # hold exactly their relative poses (nominal information)
                if prev is None:
                    backend.add_keyframe(kf, None, None)
                else:
                    T_rel = np.linalg.inv(prev.T_world_kf) @ k.T_world_kf
                    try:
                        backend.add_keyframe(kf, T_rel, None, ref_id=prev.id)
                    except TypeError:  # a backend without ref_id
                        backend.add_keyframe(kf, T_rel, None)
            prev = k
        if kfs:
            # engine state "lost at the last pose of the mapping session": the next frame
            # relocalises, starting from that pose (where a robot that stopped there restarts)
            T_world_kf = np.asarray(kfs[-1].T_world_kf, dtype=np.float64)
            T_world_last = T_world_kf
            if data.trajectory is not None and len(data.trajectory[0]):
                last = np.asarray(data.trajectory[1][-1], dtype=np.float64)
                if last.shape == (4, 4) and np.all(np.isfinite(last)):
                    T_world_last = last
    if kfs:
        system.start_lost_at(kfs[-1].id, T_world_last)
    cfg = getattr(system, "config", None)
    if data.relocaliser is not None and hasattr(system, "attach_relocaliser") and (
            cfg is None or cfg.reloc.use_when_lost):
        # the map's scene-coordinate relocaliser helps whenever tracking is lost
        system.attach_relocaliser(load_relocaliser(data, getattr(system, "device", "cpu")))
    return len(kfs)


def save_system_map(system: Any, path: str | Path, T_map_world: Optional[np.ndarray] = None) -> Path:
    """Snapshot ``system`` and save it atomically at ``path`` (see :func:`save_map`)."""
    return save_map(map_from_system(system, T_map_world), path)


def load_system_map(system: Any, path: str | Path) -> MapData:
    """Load the map at ``path`` into ``system`` (see :func:`restore_into_system`); returns the map."""
    data = load_map(path)
    restore_into_system(system, data)
    return data
