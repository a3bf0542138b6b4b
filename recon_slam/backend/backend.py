"""The backend thread: keyframe graph, loop closure and global pose-graph optimisation.

The frontend hands every new keyframe to :meth:`Backend.add_keyframe` (non-blocking: the
keyframe goes into a queue). The backend thread then

1. adds the sequential edge ``(reference keyframe, new keyframe)`` measured by the tracker,
2. asks the retrieval database for up to ``retrieval_top_k`` loop candidates (excluding the
   ``loop_min_keyframe_gap`` most recent keyframes) and inserts the new keyframe into it,
3. verifies every candidate geometrically (:func:`~recon_slam.backend.verification.verify_pair`)
   and adds a loop edge for each accepted one,
4. once the graph has a cycle, runs the global robust Gauss-Newton
   (:func:`~recon_slam.backend.pose_graph.optimize_pose_graph`) over all keyframe poses
   (SE(3) for metric pointmaps, Sim(3) otherwise, first keyframe fixed),
5. writes the optimised poses back into the :class:`KeyframeMap` atomically under its lock;
   keyframes the frontend created meanwhile (not yet in the graph) are moved rigidly with
   the correction of the newest optimised keyframe, so the map stays continuous.

Edge information matrices are used in the tangent space of the pose-graph residual
``log(T_i_j^-1 T_w_i^-1 T_w_j)`` (right perturbation of ``T_i_j``). The tracker's Hessian
(left perturbation of ``T_ref_kf``) is converted with the adjoint, and every information
matrix is rescaled to a nominal determinant (``edge_sigma_translation`` /
``edge_sigma_rotation``): dense alignment Hessians are over-confident by orders of magnitude
(pixels are not independent), which would put every edge in Huber's linear regime.
The shape (anisotropy) of each matrix is kept.

Relocalisation (:meth:`Backend.relocalize`) and the bounded-map hook
(:meth:`Backend.covering_keyframe`) run in the caller's thread and only read.

Live streams: the thread's work is cut into small units separated by
:func:`~recon_slam.backend.scheduling.checkpoint` calls (here, in the verification and in
every Gauss-Newton iteration of the pose graph); with an enabled :attr:`Backend.gate` (the
engine's :class:`~recon_slam.backend.scheduling.FrontendGate`, ``SlamSystem(live=True)``)
each unit waits until the frontend has finished its frame, so the backend works in the idle
time between frames instead of slowing tracking down (they share one interpreter lock).

Bounded map: when the frontend's new-keyframe rule fires it asks
:meth:`Backend.covering_keyframe` whether an existing keyframe already covers the view
(close pose, >= 60 % dense overlap both ways); if so it re-anchors tracking on that keyframe
instead of creating one (and may report the measured link with :meth:`Backend.add_edge`),
so the keyframe count grows with the explored space, not with time.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch

from recon_slam.backend.pose_graph import optimize_pose_graph
from recon_slam.backend.retrieval import RetrievalDatabase
from recon_slam.backend.scheduling import FrontendGate, checkpoint, run_in_background_of
from recon_slam.backend.verification import (
    ImageFeatures,
    VerifyParams,
    _overlap_fraction,
    extract_features,
    verify_pair,
)
from recon_slam.geometry import lie

log = logging.getLogger(__name__)

__all__ = ["Backend", "BackendEdge"]

#: config fields read from ``cfg`` (attribute access) and their defaults
CONFIG_DEFAULTS: dict[str, Any] = {
    "enabled": True,
    "loop_closure": True,
    "retrieval_top_k": 3,
    "retrieval_min_score": 0.05,
    "loop_min_keyframe_gap": 5,
    "verify_min_inlier_fraction": 0.1,
    "reloc_min_inlier_fraction": 0.3,
    "max_iters": 10,
    "step_tolerance": 1e-8,
    "huber_k": 1.345,
    "fix_first": True,
    "edge_sigma_translation": 0.01,
    "edge_sigma_rotation": 0.01,
    "edge_sigma_scale": 0.01,
    "cover_min_overlap": 0.6,
    "cover_max_distance": 0.6,
    "cover_max_angle_deg": 35.0,
}


@dataclass
class BackendEdge:
    """One pose-graph edge: ``T_i_j`` maps keyframe-``j`` coordinates into keyframe ``i``."""

    i: int
    j: int
    T_i_j: np.ndarray  # (4, 4) float64
    information: np.ndarray  # (d, d) float64, normalised, residual tangent
    kind: str  # 'sequential' | 'loop'
    inlier_fraction: float = 1.0


def _cfg(cfg: Any, name: str):
    return getattr(cfg, name, CONFIG_DEFAULTS[name]) if cfg is not None else CONFIG_DEFAULTS[name]


class Backend:
    """Keyframe graph + loop closure + global optimisation in a background thread.

    Args:
        cfg: backend configuration (attribute access; see ``CONFIG_DEFAULTS`` for the fields
            read and their defaults), e.g. ``SlamConfig.backend``.
        keyframe_map: the frontend's :class:`~recon_slam.frontend.keyframes.KeyframeMap`.
        device: torch device of the keyframe tensors ('cpu', 'cuda', ...); the dense
            verification and the pose graph run there.
        verify_params: thresholds of the geometric verification.

    Read-only statistics: ``n_keyframes``, ``n_edges``, ``n_loop_closures``,
    ``n_optimisations``, ``last_optim_ms``, ``error`` (the last exception raised in the
    thread, or None).

    :attr:`gate` (a disabled :class:`~recon_slam.backend.scheduling.FrontendGate` unless
    the owner replaces it) decides whether the thread's work units wait for the frontend to
    be idle (see the module notes); it is read at every queued item, so it may be replaced
    at any time.
    """

    def __init__(self, cfg: Any, keyframe_map, device: torch.device | str = "cpu",
                 verify_params: Optional[VerifyParams] = None) -> None:
        self.cfg = cfg
        self.map = keyframe_map
        self.device = torch.device(device) if str(device) != "auto" else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        self.verify_params = verify_params or VerifyParams()
        self.retrieval = RetrievalDatabase()
        self._features: dict[int, ImageFeatures] = {}
        self._edges: list[BackendEdge] = []
        self._nodes: list[int] = []  # keyframe ids in the graph, in insertion order
        self._group: Optional[str] = None
        self._graph_lock = threading.Lock()
        self._queue: "queue.Queue[Optional[tuple]]" = queue.Queue()
        self._pending = 0
        self._cv = threading.Condition()
        self._closed = False
        self.error: Optional[BaseException] = None
        self.n_loop_closures = 0
        self.n_optimisations = 0
        self.n_loop_candidates = 0
        self.last_optim_ms = 0.0
        self.last_verify_ms = 0.0
        self.last_optim_stats = None
        #: optional ``pair_verifier(kf_a, kf_b, min_inlier_fraction) -> VerificationResult`` used
        #: instead of :func:`verify_pair` for loop candidates (the monocular engine sets it:
        #: symmetric two-view prediction of the pair)
        self.pair_verifier = None
        #: frontend-first scheduling of the thread's work (disabled: work runs concurrently)
        self.gate = FrontendGate()
        self._thread = threading.Thread(target=self._run, name="recon_slam-backend", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ stats
    @property
    def n_edges(self) -> int:
        """Number of edges in the graph (sequential + loop)."""
        with self._graph_lock:
            return len(self._edges)

    @property
    def n_keyframes(self) -> int:
        """Number of keyframes the backend has processed."""
        with self._graph_lock:
            return len(self._nodes)

    def edges(self) -> list[BackendEdge]:
        """Copy of the edge list."""
        with self._graph_lock:
            return list(self._edges)

    def stats(self) -> dict:
        """Counters as a plain mapping (diagnostics)."""
        return {
            "n_keyframes": self.n_keyframes,
            "n_edges": self.n_edges,
            "n_loop_closures": self.n_loop_closures,
            "n_loop_candidates": self.n_loop_candidates,
            "n_optimisations": self.n_optimisations,
            "last_optim_ms": self.last_optim_ms,
            "pending": self._pending,
            "error": repr(self.error) if self.error is not None else None,
            **self.gate.stats(),
        }

    # ------------------------------------------------------------------ frontend API
    def add_keyframe(self, kf, T_ref_kf: Optional[np.ndarray], information: Optional[np.ndarray],
                     ref_id: Optional[int] = None) -> None:
        """Queue a new keyframe (returns at once; the thread does the work).

        Args:
            kf: the new :class:`~recon_slam.frontend.keyframes.Keyframe` (already in the map).
            T_ref_kf: (4, 4) measured pose of ``kf`` in its reference keyframe (the keyframe
                the frontend tracked against), None for the first keyframe.
            information: (6, 6) / (7, 7) tracker Hessian of ``T_ref_kf`` for LEFT
                perturbations ``exp(d) T_ref_kf`` (what the tracker produces), or None
                (a nominal information is used).
            ref_id: id of the reference keyframe; when None it is inferred from the map
                poses (the keyframe ``r`` with ``T_world_r @ T_ref_kf`` closest to
                ``T_world_kf``), falling back to the previous keyframe.
        """
        if self._closed:
            raise RuntimeError("Backend.add_keyframe after close()")
        T = None if T_ref_kf is None else np.asarray(T_ref_kf, dtype=np.float64).reshape(4, 4).copy()
        if T is not None and ref_id is None:
            ref_id = self._infer_reference(kf.id, T)
        info = None if information is None else np.asarray(information, dtype=np.float64).copy()
        with self._cv:
            self._pending += 1
        self._queue.put(("keyframe", kf, T, info, ref_id))

    def add_edge(self, kf_i: int, kf_j: int, T_i_j: np.ndarray, information: Optional[np.ndarray] = None) -> None:
        """Queue an extra measured edge between two keyframes already given to the backend.

        Meant for the bounded-map hook: when the frontend switches its reference from keyframe
        ``i`` to an existing keyframe ``j`` (see :meth:`covering_keyframe`) and has tracked the
        same frame against both, ``T_i_j = T_i_frame @ inv(T_j_frame)`` links them (a loop).

        Args:
            kf_i, kf_j: keyframe ids; T_i_j: (4, 4) pose of ``j`` in ``i``.
            information: (d, d) Hessian for LEFT perturbations of ``T_i_j`` or None (nominal).
        """
        if self._closed:
            raise RuntimeError("Backend.add_edge after close()")
        T = np.asarray(T_i_j, dtype=np.float64).reshape(4, 4).copy()
        info = None if information is None else np.asarray(information, dtype=np.float64).copy()
        with self._cv:
            self._pending += 1
        self._queue.put(("edge", int(kf_i), int(kf_j), T, info))

    def wait_idle(self, timeout: Optional[float] = None) -> bool:
        """Block until every queued keyframe is processed; False on timeout."""
        with self._cv:
            return self._cv.wait_for(lambda: self._pending == 0 or not self._thread.is_alive(), timeout)

    def close(self, timeout: Optional[float] = 30.0) -> None:
        """Stop the thread after the queued work (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("backend thread did not stop within %.1f s", timeout or 0.0)

    def reset(self) -> None:
        """Forget the graph and the retrieval database (after the queued work is done)."""
        self.wait_idle()
        with self._graph_lock:
            self._edges.clear()
            self._nodes.clear()
            self._features.clear()
            self._group = None
            self.retrieval = RetrievalDatabase()
            self.n_loop_closures = 0
            self.n_optimisations = 0
            self.n_loop_candidates = 0

    def __enter__(self) -> "Backend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ relocalisation
    def relocalize(self, image, X: Optional[torch.Tensor] = None, C: Optional[torch.Tensor] = None,
                   camera=None) -> Optional[tuple[int, np.ndarray]]:
        """Find the keyframe a lost frame sees and the frame's pose in it (read-only).

        Args:
            image: (H, W, 3) uint8 RGB image of the frame, or a prediction object with
                ``image``, ``X_cam``, ``C`` and ``camera`` attributes (then X, C, camera are
                taken from it).
            X: (H, W, 3) frame pointmap in the frame's camera coordinates; C: (H, W)
                confidence (> 0 valid); camera: the pointmap's intrinsics.

        Returns:
            ``(kf_id, T_kf_frame)`` with ``T_kf_frame`` (4, 4) float64 numpy (maps frame
            coordinates into the keyframe), or None when no candidate passes the stricter
            relocalisation threshold (``reloc_min_inlier_fraction``).
        """
        if X is None:
            pred = image
            image, X, C, camera = pred.image, pred.X_cam, pred.C, pred.camera
        cands = self.retrieval.query(image, top_k=max(int(_cfg(self.cfg, "retrieval_top_k")), 1),
                                     min_score=float(_cfg(self.cfg, "retrieval_min_score")))
        if not cands:
            return None
        feat_frame = self._extract(image)
        group = self._group or "se3"
        best = None
        for kf_id, _score in cands:
            if kf_id not in self.map:
                continue
            kf = self.map.get(kf_id)
            Xk, Ck = kf.snapshot()
            res = verify_pair(
                kf.image, Xk, Ck, kf.camera, image, X.to(Xk.device), C.to(Xk.device), camera, group=group,
                min_inlier_fraction=float(_cfg(self.cfg, "reloc_min_inlier_fraction")),
                features_a=self._kf_features(kf), features_b=feat_frame, params=self.verify_params,
            )
            if res.success and (best is None or res.inlier_fraction > best[2]):
                best = (kf_id, res.T_a_b.numpy().astype(np.float64), res.inlier_fraction)
        return None if best is None else (best[0], best[1])

    # ------------------------------------------------------------------ bounded map
    def covering_keyframe(self, X: torch.Tensor, C: torch.Tensor, camera, T_world_frame: np.ndarray,
                          exclude_ids: Sequence[int] = (), min_overlap: Optional[float] = None,
                          max_candidates: int = 4) -> Optional[tuple[int, np.ndarray, float]]:
        """Existing keyframe that already covers a would-be new keyframe (bounded map hook).

        Call it when the new-keyframe rule fires: if an existing keyframe (other than the
        current one, pass it in ``exclude_ids``) is close in pose and its pointmap overlaps
        the frame's by at least ``min_overlap`` in both directions, the frontend should
        switch its reference to that keyframe (``T_kf_frame`` returned) instead of creating
        a new one. The map then grows with the explored space, not with time.

        Args:
            X: (H, W, 3) frame pointmap in its camera frame; C: (H, W) confidence.
            camera: intrinsics of the frame pointmap.
            T_world_frame: (4, 4) current pose estimate of the frame.
            exclude_ids: keyframes not to return.
            min_overlap: default ``cover_min_overlap`` (0.6).

        Returns:
            ``(kf_id, T_kf_frame (4, 4) float64, overlap)`` or None (a new keyframe is needed).
        """
        min_overlap = float(_cfg(self.cfg, "cover_min_overlap") if min_overlap is None else min_overlap)
        ids, poses = self.map.poses()
        if not ids:
            return None
        excl = set(int(e) for e in exclude_ids)
        T_wf = np.asarray(T_world_frame, dtype=np.float64)
        d = np.linalg.norm(poses[:, :3, 3] - T_wf[:3, 3], axis=1)
        z_kf = poses[:, :3, 2] / np.linalg.norm(poses[:, :3, 2], axis=1, keepdims=True)
        z_f = T_wf[:3, 2] / np.linalg.norm(T_wf[:3, 2])
        ang = np.degrees(np.arccos(np.clip(z_kf @ z_f, -1.0, 1.0)))
        ok = (d <= float(_cfg(self.cfg, "cover_max_distance"))) & (ang <= float(_cfg(self.cfg, "cover_max_angle_deg")))
        order = [i for i in np.argsort(d + 0.01 * ang) if ok[i] and ids[i] not in excl][:max_candidates]
        best = None
        for i in order:
            kf = self.map.get(ids[i])
            Xk, Ck = kf.snapshot()
            T_kf_f = np.linalg.inv(poses[i]) @ T_wf
            T = torch.as_tensor(T_kf_f, dtype=torch.float64, device=Xk.device)
            gate = self.verify_params.dense_rel_gate_end
            Xf, Cf = X.to(Xk.device), C.to(Xk.device)
            f1 = _overlap_fraction(Xf, Cf, Xk, Ck, kf.camera, T, gate, 3000)
            if f1 < min_overlap:
                continue
            T_inv = lie.sim3_inverse(T) if self._group == "sim3" else lie.se3_inverse(T)
            f2 = _overlap_fraction(Xk, Ck, Xf, Cf, camera, T_inv, gate, 3000)
            f = min(f1, f2)
            if f >= min_overlap and (best is None or f > best[2]):
                best = (ids[i], T_kf_f, f)
        return best

    # ------------------------------------------------------------------ thread
    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                break
            try:
                with run_in_background_of(self.gate):
                    checkpoint()  # a frame is being tracked: let it finish first
                    if item[0] == "keyframe":
                        self._process(*item[1:])
                    else:
                        self._process_edge(*item[1:])
            except Exception as exc:  # surfaced through .error, never kills the thread
                log.exception("backend: processing keyframe failed")
                self.error = exc
            finally:
                with self._cv:
                    self._pending -= 1
                    self._cv.notify_all()
        with self._cv:
            self._cv.notify_all()

    def _extract(self, image) -> ImageFeatures:
        p = self.verify_params
        return extract_features(image, p.n_features, p.fast_threshold, p.clahe_clip)

    def _kf_features(self, kf) -> ImageFeatures:
        feat = self._features.get(kf.id)
        if feat is None:
            feat = self._extract(kf.image)
            self._features[kf.id] = feat
        return feat

    def _infer_reference(self, kf_id: int, T_ref_kf: np.ndarray) -> Optional[int]:
        ids, poses = self.map.poses()
        if kf_id not in ids or len(ids) < 2:
            return None
        T_w_kf = poses[ids.index(kf_id)]
        others = [k for k, i in enumerate(ids) if i != kf_id]
        pred = poses[others] @ T_ref_kf
        err = np.abs(pred - T_w_kf).reshape(len(others), -1).max(axis=1)
        k = int(np.argmin(err))
        if err[k] < 1e-4 * (1.0 + np.abs(T_w_kf).max()):
            return ids[others[k]]
        return None

    def _normalise_information(self, info: Optional[np.ndarray], d: int) -> np.ndarray:
        """Rescale to the nominal determinant (keeps the shape); nominal when missing/bad."""
        st = float(_cfg(self.cfg, "edge_sigma_translation"))
        sr = float(_cfg(self.cfg, "edge_sigma_rotation"))
        ss = float(_cfg(self.cfg, "edge_sigma_scale"))
        nominal_diag = np.array([st] * 3 + [sr] * 3 + ([ss] if d == 7 else [])) ** -2.0
        if info is None or info.shape != (d, d) or not np.all(np.isfinite(info)):
            return np.diag(nominal_diag)
        info = 0.5 * (info + info.T)
        w = np.linalg.eigvalsh(info)
        if w[0] <= 1e-12 * max(w[-1], 1e-300):
            info = info + (1e-9 * max(w[-1], 1e-300)) * np.eye(d)
            w = np.linalg.eigvalsh(info)
            if w[0] <= 0:
                return np.diag(nominal_diag)
        log_scale = (np.log(nominal_diag).sum() - np.log(w).sum()) / d
        return info * math.exp(log_scale)

    def _process(self, kf, T_ref_kf: Optional[np.ndarray], info: Optional[np.ndarray],
                 ref_id: Optional[int]) -> None:
        cfg = self.cfg
        if self._group is None:
            self._group = "se3" if getattr(kf, "metric", True) else "sim3"
        group = self._group
        d = 6 if group == "se3" else 7
        t0 = time.perf_counter()
        feat = self._kf_features(kf)
        checkpoint()
        with self._graph_lock:
            known = set(self._nodes)
            prev = self._nodes[-1] if self._nodes else None
        # 1. sequential edge
        new_edges: list[BackendEdge] = []
        if T_ref_kf is not None:
            r = ref_id if ref_id is not None and ref_id in known else prev
            if r is not None:
                new_edges.append(BackendEdge(r, kf.id, T_ref_kf, self._sequential_information(T_ref_kf, info, d),
                                             "sequential"))
        # 2. loop candidates (before inserting the keyframe into the database)
        loops = 0
        if _cfg(cfg, "loop_closure") and known:
            gap = int(_cfg(cfg, "loop_min_keyframe_gap"))
            exclude = {i for i in known if i > kf.id - gap}
            exclude |= {e.i for e in new_edges}
            cands = self.retrieval.query(kf.image, top_k=int(_cfg(cfg, "retrieval_top_k")),
                                         exclude_ids=exclude, min_score=float(_cfg(cfg, "retrieval_min_score")))
            self.n_loop_candidates += len(cands)
            Xb, Cb = kf.snapshot()
            tv = time.perf_counter()
            for cand_id, score in cands:
                checkpoint()
                if cand_id not in self.map:
                    continue
                ca = self.map.get(cand_id)
                Xa, Ca = ca.snapshot()
                if self.pair_verifier is not None:
                    res = self.pair_verifier(ca, kf, float(_cfg(cfg, "verify_min_inlier_fraction")))
                else:
                    res = verify_pair(
                        ca.image, Xa, Ca, ca.camera, kf.image, Xb.to(Xa.device), Cb.to(Xa.device), kf.camera,
                        group=group, min_inlier_fraction=float(_cfg(cfg, "verify_min_inlier_fraction")),
                        features_a=self._kf_features(ca), features_b=feat, params=self.verify_params,
                    )
                log.debug("loop candidate %d-%d score %.3f: %s %s", cand_id, kf.id, score, res.success, res.reason)
                if res.success:
                    new_edges.append(BackendEdge(
                        cand_id, kf.id, res.T_a_b.numpy().astype(np.float64),
                        self._normalise_information(res.information.numpy(), d), "loop", res.inlier_fraction))
                    loops += 1
            self.last_verify_ms = (time.perf_counter() - tv) * 1e3
        checkpoint()
        self.retrieval.add(kf.id, kf.image)
        with self._graph_lock:
            self._nodes.append(kf.id)
            self._edges.extend(new_edges)
            self.n_loop_closures += loops
            has_cycle = len(self._edges) > len(self._nodes) - 1
        # 3. global optimisation once the graph has a cycle
        if has_cycle:
            checkpoint()
            self._optimise()
        log.debug("backend: keyframe %d processed in %.1f ms (%d loop edges)", kf.id,
                  (time.perf_counter() - t0) * 1e3, loops)

    def _sequential_information(self, T: np.ndarray, info: Optional[np.ndarray], d: int) -> np.ndarray:
        """Left-perturbation Hessian of ``T`` -> normalised residual-tangent information."""
        if info is not None and info.shape == (d, d):
            Tt = torch.as_tensor(T, dtype=torch.float64)
            Ad = (lie.se3_adjoint(Tt) if d == 6 else lie.sim3_adjoint(Tt)).numpy()
            return self._normalise_information(Ad.T @ info @ Ad, d)  # left -> right perturbation
        return self._normalise_information(None, d)

    def _process_edge(self, i: int, j: int, T_i_j: np.ndarray, info: Optional[np.ndarray]) -> None:
        d = 7 if self._group == "sim3" else 6
        with self._graph_lock:
            if i not in self._nodes or j not in self._nodes or i == j:
                log.warning("backend: edge %d-%d ignored (unknown keyframe)", i, j)
                return
            self._edges.append(BackendEdge(i, j, T_i_j, self._sequential_information(T_i_j, info, d), "loop"))
            self.n_loop_closures += 1
        self._optimise()

    def _optimise(self) -> None:
        cfg = self.cfg
        with self._graph_lock:
            nodes = [i for i in self._nodes if i in self.map]  # robust to keyframes removed from the map
            edges = list(self._edges)
        if len(nodes) < 2:
            return
        index = {kf_id: k for k, kf_id in enumerate(nodes)}
        edges = [e for e in edges if e.i in index and e.j in index]
        if not edges:
            return
        _, T0 = self.map.poses(nodes)
        dev = self.device
        T_world = torch.as_tensor(T0, dtype=torch.float64, device=dev)
        ei = torch.as_tensor([index[e.i] for e in edges], dtype=torch.long, device=dev)
        ej = torch.as_tensor([index[e.j] for e in edges], dtype=torch.long, device=dev)
        Tij = torch.as_tensor(np.stack([e.T_i_j for e in edges]), dtype=torch.float64, device=dev)
        info = torch.as_tensor(np.stack([e.information for e in edges]), dtype=torch.float64, device=dev)
        fixed = (0,) if _cfg(cfg, "fix_first") else ()
        if not fixed:  # gauge freedom must be removed somehow: a tiny damping keeps H definite
            log.debug("backend: fix_first disabled, relying on damping for the gauge")
        T_new, stats = optimize_pose_graph(
            T_world, ei, ej, Tij, info, group=self._group or "se3", fixed=fixed,
            max_iters=int(_cfg(cfg, "max_iters")), huber_k=float(_cfg(cfg, "huber_k")),
            step_tolerance=float(_cfg(cfg, "step_tolerance")),
        )
        T_new = T_new.cpu().numpy()
        self.last_optim_ms = stats.elapsed_ms
        self.last_optim_stats = stats
        self.n_optimisations += 1
        # atomic write-back; keyframes created meanwhile follow the newest optimised one
        with self.map.lock:
            all_ids, all_poses = self.map.poses()
            newest = nodes[-1]
            T_corr = T_new[-1] @ np.linalg.inv(T0[-1])
            out_ids, out = [], []
            pos = {k: v for k, v in zip(nodes, T_new)}
            for kf_id, P in zip(all_ids, all_poses):
                if kf_id in pos:
                    out_ids.append(kf_id)
                    out.append(pos[kf_id])
                elif kf_id > newest:
                    out_ids.append(kf_id)
                    out.append(T_corr @ P)
            if out_ids:
                self.map.set_poses(out_ids, np.stack(out))
