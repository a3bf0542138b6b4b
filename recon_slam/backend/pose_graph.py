"""Global pose-graph optimisation over keyframe poses (SE(3) or Sim(3)).

Unknowns: the world poses ``T_world_kf`` of all keyframes (``T_world_kf`` maps keyframe
coordinates into the world). Each edge ``(i, j)`` carries a measurement ``T_i_j`` (pose of
keyframe ``j`` in keyframe ``i``) and an information matrix ``Omega`` (``d x d``, ``d = 6``
for SE(3), ``7`` for Sim(3)) expressed in the tangent space of the residual

    r_ij = log(T_i_j^-1 @ T_world_i^-1 @ T_world_j)            (d,)

i.e. a RIGHT perturbation of the measurement (``T_i_j exp(delta)``, ``delta`` in frame ``j``).
Poses are updated with LEFT perturbations ``T <- exp(dx) @ T`` (``dx`` in the world frame,
see :mod:`recon_slam.geometry.lie`).

The robust cost is ``sum_e rho(|L_e^T r_e|^2)`` with ``Omega_e = L_e L_e^T`` and Huber's
``rho``; it is minimised by iteratively reweighted Gauss-Newton with a small Levenberg
damping. The normal equations are assembled block-sparsely for all edges at once (batched
Jacobians, ``index_add_``), and solved with a sparse Cholesky factorisation (cholespy,
double precision, CPU or CUDA tensors). The block pattern (which ``d x d`` blocks are
non-zero and where every edge block lands) is computed once per call and reused by every
iteration; cholespy itself redoes its (cheap) symbolic analysis at each factorisation.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch

from recon_slam.backend.scheduling import checkpoint
from recon_slam.geometry import lie

__all__ = ["PoseGraphStats", "optimize_pose_graph", "edge_residuals"]


@dataclass
class PoseGraphStats:
    """What one :func:`optimize_pose_graph` call did.

    Attributes:
        iterations: Gauss-Newton iterations run (accepted or rejected steps).
        initial_cost, final_cost: robust cost ``sum rho(|whitened r|^2)`` before / after.
        initial_chi2, final_chi2: plain ``sum |whitened r|^2`` before / after.
        converged: the last step was below the tolerance.
        edge_weights: (E,) float64 Huber weights of the edges at the solution (1 = inlier).
        elapsed_ms: wall time of the call.
        solver: 'cholespy' or 'dense'.
        step_norms: largest absolute update component of each accepted iteration.
    """

    iterations: int = 0
    initial_cost: float = 0.0
    final_cost: float = 0.0
    initial_chi2: float = 0.0
    final_chi2: float = 0.0
    converged: bool = False
    edge_weights: torch.Tensor | None = None
    elapsed_ms: float = 0.0
    solver: str = "cholespy"
    step_norms: list = field(default_factory=list)


def _group_ops(group: str):
    if group == "se3":
        return 6, lie.se3_relative_residual_jacobians, lie.se3_exp
    if group == "sim3":
        return 7, lie.sim3_relative_residual_jacobians, lie.sim3_exp
    raise ValueError(f"group must be 'se3' or 'sim3', got {group!r}")


def _sqrt_information(information: torch.Tensor) -> torch.Tensor:
    """``L (E, d, d)`` with ``Omega = L L^T``; robust to semi-definite input (tiny jitter)."""
    d = information.shape[-1]
    info = 0.5 * (information + information.transpose(-1, -2))
    scale = torch.diagonal(info, dim1=-2, dim2=-1).abs().amax(-1).clamp_min(1e-300)
    eye = torch.eye(d, dtype=info.dtype, device=info.device)
    L, status = torch.linalg.cholesky_ex(info + 1e-12 * scale[:, None, None] * eye)
    bad = status != 0
    if bool(bad.any()):
        # eigen-decomposition fallback for indefinite inputs: clamp negative eigenvalues
        w, V = torch.linalg.eigh(info[bad])
        w = w.clamp_min(1e-12 * scale[bad][:, None])
        L = L.clone()
        L[bad] = V * w.sqrt()[:, None, :]
    return L


def _huber_weights(chi: torch.Tensor, k: float | None) -> torch.Tensor:
    """IRLS weights of Huber's loss on the whitened residual norms ``chi (E,)``."""
    if k is None or not math.isfinite(k):
        return torch.ones_like(chi)
    return torch.where(chi <= k, torch.ones_like(chi), k / chi.clamp_min(1e-300))


def _huber_cost(chi: torch.Tensor, k: float | None) -> torch.Tensor:
    """``sum rho(chi^2)`` with ``rho(s) = s`` below ``k^2`` and ``2 k sqrt(s) - k^2`` above."""
    if k is None or not math.isfinite(k):
        return (chi * chi).sum()
    return torch.where(chi <= k, chi * chi, 2.0 * k * chi - k * k).sum()


def edge_residuals(
    T_world_kf: torch.Tensor,
    edge_i: torch.Tensor,
    edge_j: torch.Tensor,
    T_i_j: torch.Tensor,
    group: str = "se3",
) -> torch.Tensor:
    """Residuals ``log(T_i_j^-1 T_world_i^-1 T_world_j)`` of all edges, ``(E, d)``.

    Args:
        T_world_kf: (K, 4, 4) keyframe poses in the world.
        edge_i, edge_j: (E,) int64 node indices (rows of ``T_world_kf``).
        T_i_j: (E, 4, 4) measured pose of node ``j`` in node ``i``.
        group: 'se3' (d = 6) or 'sim3' (d = 7).
    """
    if group == "se3":
        return lie.se3_relative_residual(T_world_kf[edge_i], T_world_kf[edge_j], T_i_j)
    return lie.sim3_relative_residual(T_world_kf[edge_i], T_world_kf[edge_j], T_i_j)


class _BlockPattern:
    """Fixed block-sparsity pattern of the normal equations of one graph.

    Free nodes get consecutive variable indices; each edge contributes the four blocks
    ``(i,i), (i,j), (j,i), (j,j)`` (those touching a fixed node are dropped). Blocks are
    merged into ``n_blocks`` unique ``(row, col)`` block positions, and every free node's
    diagonal block is always present (damping).
    """

    def __init__(self, K: int, edge_i: torch.Tensor, edge_j: torch.Tensor, fixed: Sequence[int], d: int):
        device = edge_i.device
        free = torch.ones(K, dtype=torch.bool, device=device)
        if len(fixed):
            free[torch.as_tensor(list(fixed), dtype=torch.long, device=device)] = False
        var = torch.full((K,), -1, dtype=torch.long, device=device)
        n_free = int(free.sum())
        var[free] = torch.arange(n_free, device=device)
        self.free = free
        self.var = var
        self.n_free = n_free
        self.d = d
        vi, vj = var[edge_i], var[edge_j]
        # four block kinds per edge, order (ii, ij, ji, jj)
        rows = torch.stack((vi, vi, vj, vj), dim=1)  # (E, 4)
        cols = torch.stack((vi, vj, vi, vj), dim=1)
        valid = (rows >= 0) & (cols >= 0)
        self.valid = valid
        diag = torch.arange(n_free, device=device)
        keys = torch.cat((rows[valid] * max(n_free, 1) + cols[valid], diag * max(n_free, 1) + diag))
        unique, inverse = torch.unique(keys, return_inverse=True)
        self.n_blocks = unique.numel()
        self.block_inverse = inverse[: int(valid.sum())]  # edge block -> unique block
        self.diag_blocks = inverse[int(valid.sum()):]  # free node -> its diagonal block
        brow = unique // max(n_free, 1)
        bcol = unique % max(n_free, 1)
        ar = torch.arange(d, device=device)
        # scalar COO indices of every entry of every unique block, (n_blocks, d, d)
        self.ii = (brow[:, None, None] * d + ar[None, :, None]).expand(-1, d, d).reshape(-1).to(torch.int32)
        self.jj = (bcol[:, None, None] * d + ar[None, None, :]).expand(-1, d, d).reshape(-1).to(torch.int32)
        self.var_i, self.var_j = vi, vj


def _solve_sparse(pattern: _BlockPattern, blocks: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """Solve ``H x = rhs`` with ``H`` given by its unique blocks ``(n_blocks, d, d)``; rhs (n,)."""
    from cholespy import CholeskySolverD, MatrixType

    n = pattern.n_free * pattern.d
    values = blocks.reshape(-1).contiguous()
    solver = CholeskySolverD(n, pattern.ii.contiguous(), pattern.jj.contiguous(), values, MatrixType.COO)
    x = torch.zeros_like(rhs)
    solver.solve(rhs.contiguous(), x)
    return x


def _solve_dense(pattern: _BlockPattern, blocks: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    n = pattern.n_free * pattern.d
    H = torch.zeros(n * n, dtype=blocks.dtype, device=blocks.device)
    H.index_add_(0, pattern.ii.long() * n + pattern.jj.long(), blocks.reshape(-1))
    return torch.linalg.solve(H.reshape(n, n), rhs)


def optimize_pose_graph(
    T_world_kf: torch.Tensor,
    edge_i: torch.Tensor,
    edge_j: torch.Tensor,
    T_i_j: torch.Tensor,
    information: torch.Tensor,
    group: str = "se3",
    fixed: Sequence[int] = (0,),
    max_iters: int = 10,
    huber_k: float | None = 1.345,
    step_tolerance: float = 1e-8,
    damping: float = 1e-6,
    solver: str = "cholespy",
) -> tuple[torch.Tensor, PoseGraphStats]:
    """Robust Gauss-Newton over all keyframe poses of a relative-pose graph.

    Args:
        T_world_kf: (K, 4, 4) float64 initial poses ``T_world_kf`` (SE(3) or Sim(3) matrices),
            on CPU or CUDA; the result lives on the same device.
        edge_i, edge_j: (E,) int node indices of each edge.
        T_i_j: (E, 4, 4) measured pose of node ``j`` in node ``i`` (``T_world_i^-1 T_world_j``).
        information: (E, d, d) information matrices of the residuals (see the module doc for
            their tangent space); ``d = 6`` for 'se3', ``7`` for 'sim3'.
        group: 'se3' (metric) or 'sim3' (scale drifts).
        fixed: node indices held constant (gauge); at least one is needed unless a prior is
            implied by damping alone.
        max_iters: Gauss-Newton iterations at most.
        huber_k: Huber threshold on the whitened residual norm ``|L^T r|`` (None: plain
            least squares).
        step_tolerance: stop when the update's largest absolute component is below this.
        damping: relative Levenberg damping ``lambda`` added as ``lambda * diag(H) + 1e-9``;
            raised tenfold when a step does not decrease the cost.
        solver: 'cholespy' (sparse Cholesky, default) or 'dense' (``torch.linalg.solve``, for
            tests and tiny graphs).

    Returns:
        T_world_kf_new: (K, 4, 4) optimised poses (fixed nodes bit-identical to the input).
        stats: :class:`PoseGraphStats`.
    """
    t0 = time.perf_counter()
    d, residual_jac, exp = _group_ops(group)
    T = T_world_kf.to(torch.float64).clone()
    device = T.device
    K = T.shape[0]
    edge_i = torch.as_tensor(edge_i, dtype=torch.long, device=device)
    edge_j = torch.as_tensor(edge_j, dtype=torch.long, device=device)
    E = edge_i.numel()
    stats = PoseGraphStats(solver=solver)
    if E == 0 or K == 0:
        stats.edge_weights = torch.ones(E, dtype=torch.float64, device=device)
        stats.converged = True
        stats.elapsed_ms = (time.perf_counter() - t0) * 1e3
        return T, stats
    T_i_j = T_i_j.to(device=device, dtype=torch.float64)
    information = information.to(device=device, dtype=torch.float64)
    if information.shape[-2:] != (d, d):
        raise ValueError(f"information must be (E, {d}, {d}) for group {group!r}, got {tuple(information.shape)}")
    L = _sqrt_information(information)  # (E, d, d)
    pattern = _BlockPattern(K, edge_i, edge_j, [f for f in fixed if 0 <= f < K], d)
    if pattern.n_free == 0:
        stats.converged = True
        stats.edge_weights = torch.ones(E, dtype=torch.float64, device=device)
        stats.elapsed_ms = (time.perf_counter() - t0) * 1e3
        return T, stats

    def evaluate(poses: torch.Tensor):
        r, J_i, J_j = residual_jac(poses[edge_i], poses[edge_j], T_i_j)
        e = (L.transpose(-1, -2) @ r[..., None])[..., 0]  # whitened residual (E, d)
        chi = torch.linalg.vector_norm(e, dim=-1)
        return r, J_i, J_j, chi

    r, J_i, J_j, chi = evaluate(T)
    cost = _huber_cost(chi, huber_k)
    stats.initial_cost = float(cost)
    stats.initial_chi2 = float((chi * chi).sum())
    lam = damping
    valid = pattern.valid
    for it in range(max_iters):
        checkpoint()  # backend thread on a live stream: let a frame being tracked finish first
        stats.iterations = it + 1
        w = _huber_weights(chi, huber_k)  # (E,)
        Omega_w = information * w[:, None, None]
        # block contributions: J_a^T W J_b for (a, b) in (ii, ij, ji, jj)
        OJi = Omega_w @ J_i
        OJj = Omega_w @ J_j
        JiT, JjT = J_i.transpose(-1, -2), J_j.transpose(-1, -2)
        edge_blocks = torch.stack((JiT @ OJi, JiT @ OJj, JjT @ OJi, JjT @ OJj), dim=1)  # (E, 4, d, d)
        blocks = torch.zeros(pattern.n_blocks, d, d, dtype=torch.float64, device=device)
        blocks.index_add_(0, pattern.block_inverse, edge_blocks[valid])
        # gradient g = sum J^T W r, scattered to the free variables
        Wr = (Omega_w @ r[..., None])
        g_i = (JiT @ Wr)[..., 0]
        g_j = (JjT @ Wr)[..., 0]
        g = torch.zeros(pattern.n_free, d, dtype=torch.float64, device=device)
        mi, mj = pattern.var_i >= 0, pattern.var_j >= 0
        g.index_add_(0, pattern.var_i[mi], g_i[mi])
        g.index_add_(0, pattern.var_j[mj], g_j[mj])
        diag_h = torch.diagonal(blocks[pattern.diag_blocks], dim1=-2, dim2=-1)  # (n_free, d)
        rhs = -g.reshape(-1)
        accepted, step = False, 0.0
        while lam <= 1e8:
            damped = blocks.clone()
            damped[pattern.diag_blocks] += torch.diag_embed(lam * diag_h + 1e-9)
            try:
                if solver == "dense":
                    dx = _solve_dense(pattern, damped, rhs)
                else:
                    dx = _solve_sparse(pattern, damped, rhs)
            except (RuntimeError, ValueError):  # not positive definite: damp more
                lam = max(lam * 10.0, 1e-6)
                continue
            dx = dx.reshape(pattern.n_free, d)
            if not bool(torch.isfinite(dx).all()):
                lam = max(lam * 10.0, 1e-6)
                continue
            step = float(dx.abs().max())
            T_new = T.clone()
            T_new[pattern.free] = exp(dx) @ T[pattern.free]
            r_n, Ji_n, Jj_n, chi_n = evaluate(T_new)
            cost_n = _huber_cost(chi_n, huber_k)
            if float(cost_n) <= float(cost) * (1.0 + 1e-12) or step < step_tolerance:
                T, r, J_i, J_j, chi, cost = T_new, r_n, Ji_n, Jj_n, chi_n, cost_n
                lam = max(lam * 0.1, 1e-12)
                accepted = True
                break
            lam = max(lam * 10.0, 1e-6)
        stats.step_norms.append(step if accepted else 0.0)
        if not accepted:  # no damping decreases the cost any more: at a minimum
            stats.converged = True
            break
        if step < step_tolerance:
            stats.converged = True
            break
    stats.final_cost = float(cost)
    stats.final_chi2 = float((chi * chi).sum())
    stats.edge_weights = _huber_weights(chi, huber_k)
    # keep the fixed poses bit-identical
    fixed_mask = ~pattern.free
    T[fixed_mask] = T_world_kf.to(torch.float64)[fixed_mask]
    stats.elapsed_ms = (time.perf_counter() - t0) * 1e3
    return T, stats
