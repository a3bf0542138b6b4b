"""Geometric verification of a keyframe pair without a pose prior.

Pipeline for keyframes ``a`` and ``b`` (images, pointmaps ``X`` in their own keyframe
frames, confidences ``C``, pinhole cameras):

1. ORB features (OpenCV) on both images, brute-force Hamming matching with Lowe's ratio
   test and a mutual-nearest check.
2. Matches are lifted to 3D through the pointmaps (``X_a[v, u]``, ``X_b[v, u]``).
3. RANSAC on the 3D-3D correspondences: all hypotheses at once (batched Umeyama / Kabsch
   on random triplets), inliers by a depth-relative distance, refit on the inliers.
4. Dense refinement on the pointmaps: projective data association (bilinear look-ups) of
   a regular subsample of ``X_b`` into camera ``a``, Gauss-Newton on point-to-plane plus a
   weak point-to-point term (confidence weighted, Huber, shrinking gates).
   A photometric term (affine brightness compensation, away from depth discontinuities)
   is added in the last iterations: geometry alone cannot stop sliding along planes.
5. Acceptance (all strict): enough ratio-test matches, enough RANSAC inliers and inlier
   ratio, the refined pose still agrees with most RANSAC inliers, dense overlap fraction
   in BOTH directions at least ``min_inlier_fraction``, photometric agreement (normalised
   cross-correlation of the grey levels of the dense correspondences), a plausible scale
   (Sim(3)).

Returns ``T_a_b`` (maps frame-``b`` coordinates into frame ``a``) and an information matrix
for the pose-graph residual ``log(T_a_b^-1 T_w_a^-1 T_w_b)``, i.e. in the tangent space of a
RIGHT perturbation ``T_a_b exp(delta)`` (``delta`` in frame ``b``), ordered ``(rho, phi[, sigma])``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from recon_slam.backend.scheduling import checkpoint
from recon_slam.geometry import lie
from recon_slam.geometry.camera import PinholeCamera

__all__ = [
    "ImageFeatures",
    "VerifyParams",
    "VerificationResult",
    "extract_features",
    "match_features",
    "umeyama",
    "ransac_3d",
    "refine_dense",
    "verify_pair",
]


# ---------------------------------------------------------------------------- parameters
@dataclass
class VerifyParams:
    """Thresholds of :func:`verify_pair` (defaults are strict: no false loop is accepted)."""

    n_features: int = 1000
    fast_threshold: int = 7
    clahe_clip: float = 2.0
    ratio: float = 0.8
    min_matches: int = 20
    ransac_hypotheses: int = 512
    #: RANSAC inlier gate: distance below this fraction of the point's depth in ``a``
    ransac_rel_threshold: float = 0.03
    min_ransac_inliers: int = 20
    min_ransac_inlier_ratio: float = 0.3
    #: the refined pose must keep this fraction of the RANSAC inliers within the RANSAC gate
    min_feature_consistency: float = 0.7
    #: dense refinement
    dense_points: int = 4000
    dense_iters: int = 12
    dense_rel_gate_start: float = 0.08
    dense_rel_gate_end: float = 0.03
    point_weight: float = 0.05
    #: photometric term of the dense refinement (0 disables), its sigma floor and blur
    photometric_weight: float = 1.0
    photo_iters: int = 6
    #: no photometric term within ``edge_dilate`` pixels of a relative depth jump above this
    edge_rel_jump: float = 0.04
    edge_dilate: int = 3
    min_photo_sigma: float = 0.01
    photo_blur: float = 1.0
    #: normals from central differences over this many pixels (noise averaging)
    normal_step: int = 3
    #: information matrix: per-point sigma = max(measured relative RMS, this) * depth
    min_rel_sigma: float = 0.003
    #: photometric agreement of the dense correspondences
    min_ncc: float = 0.5
    #: Sim(3) only: accepted scale range of ``T_a_b``
    max_scale_ratio: float = 3.0


@dataclass
class ImageFeatures:
    """ORB keypoints of one image: ``uv`` (N, 2) float32 pixels, ``desc`` (N, 32) uint8."""

    uv: np.ndarray
    desc: np.ndarray
    image_size: tuple[int, int]  # (width, height) of the image the features come from


@dataclass
class VerificationResult:
    """Outcome of :func:`verify_pair`.

    Attributes:
        success: all acceptance tests passed.
        T_a_b: (4, 4) float64 CPU tensor, pose of ``b`` in ``a`` (identity when nothing was found).
        inlier_fraction: lower of the two dense overlap fractions (a->b, b->a), in [0, 1].
        information: (d, d) float64 CPU tensor (d = 6 for SE(3), 7 for Sim(3)), see module doc.
        n_matches: ratio-test + mutual matches.
        n_ransac_inliers: RANSAC inliers among them.
        ncc: photometric normalised cross-correlation of the dense correspondences.
        scale: scale of ``T_a_b`` (1 for SE(3)).
        reason: '' on success, else the first failed test.
    """

    success: bool
    T_a_b: torch.Tensor
    inlier_fraction: float = 0.0
    information: torch.Tensor | None = None
    n_matches: int = 0
    n_ransac_inliers: int = 0
    ncc: float = 0.0
    scale: float = 1.0
    reason: str = ""
    timings_ms: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------- helpers
def _to_numpy_image(image) -> np.ndarray:
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    image = np.asarray(image)
    if image.dtype != np.uint8:
        image = np.clip(image, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(image)


def _gray(image) -> np.ndarray:
    import cv2

    img = _to_numpy_image(image)
    if img.ndim == 3:
        return cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
    return img


def extract_features(image, n_features: int = 1000, fast_threshold: int = 7, clahe_clip: float = 2.0) -> ImageFeatures:
    """ORB features of an (H, W, 3) uint8 RGB image (tensor or array, any device).

    The grey image is contrast-equalised first (CLAHE, ``clahe_clip``; 0 disables) so that
    weakly textured surfaces (painted walls) still yield features.

    Returns:
        :class:`ImageFeatures` with pixel coordinates (OpenCV convention) and descriptors.
    """
    import cv2

    gray = _gray(image)
    if clahe_clip > 0:
        gray = cv2.createCLAHE(clipLimit=clahe_clip, tileGridSize=(4, 4)).apply(gray)
    orb = cv2.ORB_create(nfeatures=n_features, scaleFactor=1.2, nlevels=6, fastThreshold=fast_threshold)
    kps, desc = orb.detectAndCompute(gray, None)
    if desc is None or not kps:
        return ImageFeatures(np.zeros((0, 2), np.float32), np.zeros((0, 32), np.uint8), (gray.shape[1], gray.shape[0]))
    uv = np.array([kp.pt for kp in kps], dtype=np.float32)
    return ImageFeatures(uv, desc, (gray.shape[1], gray.shape[0]))


def match_features(fa: ImageFeatures, fb: ImageFeatures, ratio: float = 0.8) -> tuple[np.ndarray, np.ndarray]:
    """Mutual nearest-neighbour Hamming matches passing Lowe's ratio test.

    Returns:
        ia, ib: (M,) int64 indices into ``fa`` and ``fb``.
    """
    import cv2

    empty = (np.zeros(0, np.int64), np.zeros(0, np.int64))
    if len(fa.desc) < 2 or len(fb.desc) < 2:
        return empty
    bf = cv2.BFMatcher(cv2.NORM_HAMMING)
    knn = bf.knnMatch(fa.desc, fb.desc, k=2)
    back = bf.match(fb.desc, fa.desc)
    best_back = np.full(len(fb.desc), -1, dtype=np.int64)
    for m in back:
        best_back[m.queryIdx] = m.trainIdx
    ia, ib = [], []
    for pair in knn:
        if len(pair) < 2:
            continue
        m, n = pair
        if m.distance < ratio * n.distance and best_back[m.trainIdx] == m.queryIdx:
            ia.append(m.queryIdx)
            ib.append(m.trainIdx)
    if not ia:
        return empty
    return np.asarray(ia, np.int64), np.asarray(ib, np.int64)


def umeyama(
    src: torch.Tensor, dst: torch.Tensor, weights: torch.Tensor | None = None, with_scale: bool = False
) -> torch.Tensor:
    """Weighted least-squares similarity / rigid transform ``dst ~ s R src + t``, batched.

    Args:
        src, dst: (..., N, 3) corresponding points (``src`` in frame ``b``, ``dst`` in frame ``a``).
        weights: (..., N) non-negative weights (uniform when None).
        with_scale: estimate ``s`` (Sim(3)); otherwise ``s = 1`` (SE(3)).

    Returns:
        T_a_b: (..., 4, 4) transforms (same dtype / device as ``src``).
    """
    if weights is None:
        weights = torch.ones(src.shape[:-1], dtype=src.dtype, device=src.device)
    w = weights / weights.sum(-1, keepdim=True).clamp_min(1e-300)
    mu_s = (w[..., None] * src).sum(-2)
    mu_d = (w[..., None] * dst).sum(-2)
    cs = src - mu_s[..., None, :]
    cd = dst - mu_d[..., None, :]
    S = (cd * w[..., None]).transpose(-1, -2) @ cs  # (..., 3, 3)
    U, D, Vh = torch.linalg.svd(S)
    sign = torch.sign(torch.linalg.det(U) * torch.linalg.det(Vh))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    fix = torch.ones(D.shape, dtype=src.dtype, device=src.device)
    fix[..., 2] = sign
    R = U @ (fix[..., :, None] * Vh)
    if with_scale:
        var_s = (w * (cs * cs).sum(-1)).sum(-1)
        s = (D * fix).sum(-1) / var_s.clamp_min(1e-300)
    else:
        s = torch.ones(src.shape[:-2], dtype=src.dtype, device=src.device)
    t = mu_d - s[..., None] * (R @ mu_s[..., None])[..., 0]
    T = torch.zeros(src.shape[:-2] + (4, 4), dtype=src.dtype, device=src.device)
    T[..., :3, :3] = s[..., None, None] * R
    T[..., :3, 3] = t
    T[..., 3, 3] = 1.0
    return T


def ransac_3d(
    P_a: torch.Tensor,
    P_b: torch.Tensor,
    rel_threshold: float,
    with_scale: bool,
    n_hypotheses: int = 512,
    seed: int = 0,
    max_scale_ratio: float = 3.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RANSAC for ``P_a ~ T_a_b P_b`` on 3D-3D correspondences, all hypotheses batched.

    Args:
        P_a: (N, 3) points in frame ``a``; P_b: (N, 3) the same points in frame ``b``.
        rel_threshold: inlier when ``|T P_b - P_a| < rel_threshold * |P_a|``.
        with_scale: Sim(3) hypotheses instead of SE(3).

    Returns:
        T_a_b: (4, 4) refitted on the inliers of the best hypothesis; inliers: (N,) bool.
    """
    N = P_a.shape[0]
    dev, dt = P_a.device, P_a.dtype
    if N < 3:
        return torch.eye(4, dtype=dt, device=dev), torch.zeros(N, dtype=torch.bool, device=dev)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    idx = torch.stack([torch.randperm(N, generator=gen)[:3] for _ in range(1)])  # always one valid triple
    idx = torch.cat((idx, torch.randint(0, N, (n_hypotheses - 1, 3), generator=gen))).to(dev)
    distinct = (idx[:, 0] != idx[:, 1]) & (idx[:, 0] != idx[:, 2]) & (idx[:, 1] != idx[:, 2])
    src, dst = P_b[idx], P_a[idx]  # (H, 3, 3)
    # reject near-collinear triples (triangle area small relative to its size)
    area = torch.linalg.vector_norm(torch.cross(src[:, 1] - src[:, 0], src[:, 2] - src[:, 0], dim=-1), dim=-1)
    size = ((src[:, 1:] - src[:, :1]) ** 2).sum(-1).amax(-1).clamp_min(1e-300)
    ok = distinct & (area > 0.05 * size)
    T = umeyama(src, dst, with_scale=with_scale)
    if with_scale:
        s = lie.sim3_scale(T)
        ok = ok & (s < max_scale_ratio) & (s > 1.0 / max_scale_ratio)
    gate = rel_threshold * torch.linalg.vector_norm(P_a, dim=-1)  # (N,)

    def inliers_of(Ts: torch.Tensor) -> torch.Tensor:
        Y = P_b @ Ts[..., :3, :3].transpose(-1, -2) + Ts[..., None, :3, 3]
        return torch.linalg.vector_norm(Y - P_a, dim=-1) < gate

    inl = inliers_of(T) & ok[:, None]  # (H, N)
    best = int(inl.sum(-1).argmax())
    T_best, in_best = T[best], inl[best]
    for _ in range(3):
        if int(in_best.sum()) < 3:
            break
        T_new = umeyama(P_b[in_best], P_a[in_best], with_scale=with_scale)
        in_new = inliers_of(T_new)
        if int(in_new.sum()) < int(in_best.sum()):
            break
        T_best, in_best = T_new, in_new
    return T_best, in_best


def _normals(X: torch.Tensor, C: torch.Tensor, step: int = 3) -> torch.Tensor:
    """Unit normals (H, W, 3) of a pointmap from central differences over ``step`` pixels.

    The wide stencil averages depth noise; normals are zero where a neighbour is invalid
    or at the border (those points then only get the point-to-point term).
    """
    n = torch.zeros_like(X)
    s = step
    valid = _valid_points(X, C)
    dx = X[s:-s, 2 * s:] - X[s:-s, : -2 * s]
    dy = X[2 * s:, s:-s] - X[: -2 * s, s:-s]
    ok = valid[s:-s, 2 * s:] & valid[s:-s, : -2 * s] & valid[2 * s:, s:-s] & valid[: -2 * s, s:-s]
    c = torch.nn.functional.normalize(torch.cross(dx, dy, dim=-1), dim=-1)
    n[s:-s, s:-s] = torch.where(ok[..., None], c, torch.zeros_like(c))
    # orient towards the camera
    flip = (n * X).sum(-1, keepdim=True) > 0
    return torch.where(flip, -n, n)


def _valid_points(X: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    return torch.isfinite(X).all(-1) & (X[..., 2] > 1e-6) & (C > 0) & torch.isfinite(C)


def _project_lookup(cam: PinholeCamera, Y: torch.Tensor, H: int, W: int):
    """Project (N, 3) points with ``cam``; nearest-pixel indices (v, u) and a validity mask."""
    uv, z = cam.project(Y)
    inside = (z > 1e-6) & cam.in_image(uv, margin=0.5) & torch.isfinite(uv).all(-1)
    u = uv[..., 0].round().clamp(0, W - 1).long()
    v = uv[..., 1].round().clamp(0, H - 1).long()
    return v, u, inside, z


def _bilinear(maps: torch.Tensor, uv: torch.Tensor) -> torch.Tensor:
    """Bilinear samples of ``maps`` (H, W, F) at pixels ``uv`` (N, 2) -> (N, F) (border clamped)."""
    H, W = maps.shape[:2]
    u = uv[:, 0].clamp(0, W - 1)
    v = uv[:, 1].clamp(0, H - 1)
    u0 = u.floor().clamp(max=W - 2).long() if W > 1 else torch.zeros_like(u, dtype=torch.long)
    v0 = v.floor().clamp(max=H - 2).long() if H > 1 else torch.zeros_like(v, dtype=torch.long)
    fu = (u - u0).unsqueeze(-1).to(maps.dtype)
    fv = (v - v0).unsqueeze(-1).to(maps.dtype)
    u1 = (u0 + 1).clamp(max=W - 1)
    v1 = (v0 + 1).clamp(max=H - 1)
    return (
        maps[v0, u0] * (1 - fu) * (1 - fv)
        + maps[v0, u1] * fu * (1 - fv)
        + maps[v1, u0] * (1 - fu) * fv
        + maps[v1, u1] * fu * fv
    )


def _subsample_grid(H: int, W: int, n: int) -> int:
    return max(1, int(round((H * W / max(n, 1)) ** 0.5)))


def _smoothed_gray(gray: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian-blurred (H, W) grey image (separable, reflect padding)."""
    if sigma <= 0:
        return gray
    r = max(1, int(math.ceil(2.5 * sigma)))
    x = torch.arange(-r, r + 1, dtype=gray.dtype, device=gray.device)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    k = k / k.sum()
    g = gray[None, None]
    g = torch.nn.functional.pad(g, (r, r, 0, 0), mode="reflect")
    g = torch.nn.functional.conv2d(g, k.view(1, 1, 1, -1))
    g = torch.nn.functional.pad(g, (0, 0, r, r), mode="reflect")
    g = torch.nn.functional.conv2d(g, k.view(1, 1, -1, 1))
    return g[0, 0]


def _depth_edges(X: torch.Tensor, valid: torch.Tensor, rel_jump: float, dilate: int) -> torch.Tensor:
    """(H, W) bool: pixels within ``dilate`` pixels of a depth discontinuity or invalid pixel."""
    z = torch.where(valid, X[..., 2], torch.zeros_like(X[..., 2]))
    edge = ~valid
    dzx = (z[:, 1:] - z[:, :-1]).abs() > rel_jump * torch.minimum(z[:, 1:], z[:, :-1]).clamp_min(1e-6)
    dzy = (z[1:] - z[:-1]).abs() > rel_jump * torch.minimum(z[1:], z[:-1]).clamp_min(1e-6)
    edge = edge.clone()
    edge[:, 1:] |= dzx
    edge[:, :-1] |= dzx
    edge[1:] |= dzy
    edge[:-1] |= dzy
    if dilate > 0:
        k = 2 * dilate + 1
        edge = torch.nn.functional.max_pool2d(edge[None, None].float(), k, stride=1, padding=dilate)[0, 0] > 0
    return edge


def _huber(z: torch.Tensor, k: float = 1.345) -> torch.Tensor:
    return torch.where(z <= k, torch.ones_like(z), k / z.clamp_min(1e-300))


def refine_dense(
    X_a: torch.Tensor,
    C_a: torch.Tensor,
    camera_a: PinholeCamera,
    X_b: torch.Tensor,
    C_b: torch.Tensor,
    T_a_b: torch.Tensor,
    with_scale: bool,
    params: VerifyParams | None = None,
    gray_a: torch.Tensor | None = None,
    gray_b: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Dense alignment of keyframe ``b`` onto keyframe ``a`` starting from ``T_a_b``.

    Robust Gauss-Newton (Huber IRLS, shrinking depth-relative gates) over a regular subsample
    of ``X_b`` associated projectively (bilinear look-ups) with ``X_a``: point-to-plane
    residuals (normals of ``X_a``), a weak point-to-point term and, when grey images are
    given, a photometric term ``I_a(pi(T x_b)) - (alpha I_b + beta)`` (affine brightness
    compensation), which constrains sliding along planar surfaces.

    Args:
        X_a, X_b: (H, W, 3) pointmaps in their keyframe frames; C_a, C_b: (H, W) confidences
            (> 0 valid). ``camera_a`` projects frame-``a`` points into ``X_a``'s pixel grid.
        T_a_b: (4, 4) initial pose of ``b`` in ``a``.
        with_scale: optimise a Sim(3) instead of an SE(3).
        gray_a, gray_b: optional (H, W) grey images in [0, 1] on the pointmaps' pixel grids.

    Returns:
        T_a_b: (4, 4) float64 refined pose (device of ``X_a``).
        information: (d, d) float64 Gauss-Newton Hessian in the right-perturbation tangent of
            ``T_a_b`` (see module doc), with per-point sigmas from the measured residual spread.
        info: dict with 'fraction' (dense overlap of ``b`` in ``a``), 'rel_rms', 'n_inliers',
            'n_samples', and the inlier pixel pairs ('b_pix' (n, 2) (v, u) in ``b``,
            'a_v', 'a_u' nearest pixels in ``a``).
    """
    p = params or VerifyParams()
    dev = X_a.device
    dt = torch.float64
    X_a = X_a.to(dt)
    X_b = X_b.to(device=dev, dtype=dt)
    C_a = C_a.to(dt)
    C_b = C_b.to(device=dev, dtype=dt)
    H, W = X_a.shape[:2]
    Hb, Wb = X_b.shape[:2]
    step = _subsample_grid(Hb, Wb, p.dense_points)
    o = step // 2
    Pb_all = X_b[o::step, o::step].reshape(-1, 3)
    cb_all = C_b[o::step, o::step].reshape(-1)
    vb = _valid_points(Pb_all, cb_all)
    gy, gx = torch.meshgrid(torch.arange(o, Hb, step, device=dev), torch.arange(o, Wb, step, device=dev), indexing="ij")
    b_pix = torch.stack((gy.reshape(-1), gx.reshape(-1)), -1)
    Pb, cb, b_pix = Pb_all[vb], cb_all[vb], b_pix[vb]
    n_b = Pb.shape[0]
    N_a = _normals(X_a, C_a, p.normal_step)
    valid_a = _valid_points(X_a, C_a)
    d = 7 if with_scale else 6
    T = T_a_b.to(device=dev, dtype=dt).clone()
    act_jac = lie.act_jacobian_sim3 if with_scale else lie.act_jacobian_se3
    exp = lie.sim3_exp if with_scale else lie.se3_exp
    eye_d = torch.eye(d, dtype=dt, device=dev)
    n_it = max(1, p.dense_iters)
    photo = gray_a is not None and gray_b is not None and p.photometric_weight > 0
    # bilinear look-up table of frame a: point (3), normal (3), validity (1)[, I, dI/du, dI/dv]
    maps = [X_a, N_a, valid_a[..., None].to(dt)]
    if photo:
        Ia = _smoothed_gray(gray_a.to(device=dev, dtype=dt), p.photo_blur)
        Iu = torch.zeros_like(Ia)
        Iv = torch.zeros_like(Ia)
        Iu[:, 1:-1] = 0.5 * (Ia[:, 2:] - Ia[:, :-2])
        Iv[1:-1] = 0.5 * (Ia[2:] - Ia[:-2])
        # photometric validity: away from depth discontinuities (silhouettes mix surfaces)
        smooth_a = ~_depth_edges(X_a, valid_a, p.edge_rel_jump, p.edge_dilate)
        maps += [Ia[..., None], Iu[..., None], Iv[..., None], smooth_a[..., None].to(dt)]
        Ib = _smoothed_gray(gray_b.to(device=dev, dtype=dt), p.photo_blur)[b_pix[:, 0], b_pix[:, 1]]
        smooth_b = ~_depth_edges(X_b, _valid_points(X_b, C_b), p.edge_rel_jump, p.edge_dilate)
        smooth_b = smooth_b[b_pix[:, 0], b_pix[:, 1]]
    lut = torch.cat(maps, dim=-1)

    def associate(T_cur: torch.Tensor, gate_rel: float):
        Y = Pb @ T_cur[:3, :3].T + T_cur[:3, 3]
        uv, z = camera_a.project(Y)
        inside = (z > 1e-6) & camera_a.in_image(uv, margin=1.0) & torch.isfinite(uv).all(-1)
        uv = torch.where(inside[:, None], uv, torch.zeros_like(uv))
        smp = _bilinear(lut, uv)
        ok = inside & (smp[:, 6] > 0.999)  # all four neighbours valid
        diff = Y - smp[:, :3]
        dist = torch.linalg.vector_norm(diff, dim=-1)
        depth = z.clamp_min(1e-6)
        inl = ok & (dist < gate_rel * depth)
        return Y, smp, diff, dist, depth, inl, uv

    H_last = torch.zeros(d, d, dtype=dt, device=dev)
    rel_rms = torch.tensor(p.min_rel_sigma, dtype=dt, device=dev)
    # geometric stage (shrinking gates), then a photometric stage at the tightest gate: the
    # photometric term has a narrow basin and must start close to the solution
    n_photo = p.photo_iters if photo else 0
    for it in range(n_it + n_photo):
        checkpoint()  # backend thread on a live stream: let a frame being tracked finish first
        frac = min(it / max(n_it - 1, 1), 1.0)
        gate = p.dense_rel_gate_start * (1 - frac) + p.dense_rel_gate_end * frac
        use_photo = it >= n_it
        Y, smp, diff, dist, depth, inl, uv = associate(T, gate)
        if int(inl.sum()) < 6:
            break
        Y, smp, diff, depth = Y[inl], smp[inl], diff[inl], depth[inl]
        Na = torch.nn.functional.normalize(smp[:, 3:6], dim=-1)
        vi = uv[inl, 1].round().clamp(0, H - 1).long()
        ui = uv[inl, 0].round().clamp(0, W - 1).long()
        c = torch.sqrt(C_a[vi, ui].clamp_min(0) * cb[inl])
        c = c / c.mean().clamp_min(1e-300)
        J = act_jac(Y)  # (n, 3, d), left perturbation in frame a
        r_pl = (Na * diff).sum(-1)  # (n,)
        J_pl = (Na[:, None, :] @ J)[:, 0]  # (n, d)
        rel_rms = (1.4826 * (r_pl.abs() / depth).median()).clamp_min(p.min_rel_sigma)
        sigma = rel_rms * depth
        w_pl = c * _huber(r_pl.abs() / sigma) / sigma**2
        w_pt = p.point_weight * c * _huber(torch.linalg.vector_norm(diff, dim=-1) / sigma) / sigma**2
        Hm = (J_pl.T * w_pl) @ J_pl + torch.einsum("n,nid,nie->de", w_pt, J, J)
        g = (J_pl.T * w_pl) @ r_pl + torch.einsum("n,nid,ni->d", w_pt, J, diff)
        if use_photo:
            ph = (smp[:, 10] > 0.999) & smooth_b[inl]
            ib = Ib[inl]
            ia = smp[:, 7]
            # affine brightness compensation ia ~ alpha ib + beta (least squares)
            A = torch.stack((ib, torch.ones_like(ib)), -1)
            ab = torch.linalg.lstsq(A, ia[:, None]).solution[:, 0]
            r_ph = ia - (ab[0] * ib + ab[1])
            s_ph = (1.4826 * r_ph[ph].abs().median()).clamp_min(p.min_photo_sigma) if bool(ph.any()) else 1.0
            iz = 1.0 / Y[:, 2]
            fx, fy = camera_a.fx, camera_a.fy
            gu, gv = smp[:, 8] * fx * iz, smp[:, 9] * fy * iz
            dI_dY = torch.stack((gu, gv, -(gu * Y[:, 0] + gv * Y[:, 1]) * iz), -1)  # (n, 3)
            J_ph = (dI_dY[:, None, :] @ J)[:, 0]  # (n, d)
            w_ph = p.photometric_weight * ph.to(dt) * _huber(r_ph.abs() / s_ph) / s_ph**2
            Hm = Hm + (J_ph.T * w_ph) @ J_ph
            g = g + (J_ph.T * w_ph) @ r_ph
        H_last = Hm
        delta = torch.linalg.solve(Hm + 1e-9 * Hm.diagonal().mean() * eye_d, -g)
        T = exp(delta) @ T
        if float(delta.abs().max()) < 1e-7 and (use_photo or (not photo and frac >= 1.0)):
            break
    # final association at the tightest gate
    Y, smp, diff, dist, depth, inl, uv = associate(T, p.dense_rel_gate_end)
    fraction = float(inl.sum()) / max(n_b, 1)
    # information in the right-perturbation tangent of T_a_b: Ad_T^T H_left Ad_T
    Ad = lie.sim3_adjoint(T) if with_scale else lie.se3_adjoint(T)
    information = Ad.T @ H_last @ Ad
    information = 0.5 * (information + information.T)
    info = {
        "fraction": fraction,
        "rel_rms": float(rel_rms),
        "n_inliers": int(inl.sum()),
        "n_samples": n_b,
        "b_pix": b_pix[inl],
        "a_v": uv[inl, 1].round().clamp(0, H - 1).long(),
        "a_u": uv[inl, 0].round().clamp(0, W - 1).long(),
        "step": step,
    }
    return T, information, info


def _overlap_fraction(
    X_src: torch.Tensor, C_src: torch.Tensor, X_dst: torch.Tensor, C_dst: torch.Tensor,
    camera_dst: PinholeCamera, T_dst_src: torch.Tensor, rel_gate: float, n_points: int,
) -> float:
    """Fraction of valid subsampled ``src`` points that land on a valid, agreeing ``dst`` point."""
    dt = torch.float64
    H, W = X_dst.shape[:2]
    step = _subsample_grid(X_src.shape[0], X_src.shape[1], n_points)
    P = X_src[step // 2 :: step, step // 2 :: step].reshape(-1, 3).to(dt)
    c = C_src[step // 2 :: step, step // 2 :: step].reshape(-1)
    P = P[_valid_points(P, c)]
    if P.shape[0] == 0:
        return 0.0
    T = T_dst_src.to(device=P.device, dtype=dt)
    Y = P @ T[:3, :3].T + T[:3, 3]
    v, u, inside, z = _project_lookup(camera_dst, Y, H, W)
    Xd = X_dst.to(dt)[v, u]
    ok = inside & _valid_points(Xd, C_dst[v, u])
    dist = torch.linalg.vector_norm(Y - Xd, dim=-1)
    return float((ok & (dist < rel_gate * z.clamp_min(1e-6))).sum()) / P.shape[0]


def _ncc(x: torch.Tensor, y: torch.Tensor) -> float:
    if x.numel() < 10:
        return 0.0
    x = x - x.mean()
    y = y - y.mean()
    den = torch.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / den) if float(den) > 1e-9 else 0.0


def verify_pair(
    image_a,
    X_a: torch.Tensor,
    C_a: torch.Tensor,
    camera_a: PinholeCamera,
    image_b,
    X_b: torch.Tensor,
    C_b: torch.Tensor,
    camera_b: PinholeCamera,
    group: str = "se3",
    min_inlier_fraction: float = 0.1,
    features_a: ImageFeatures | None = None,
    features_b: ImageFeatures | None = None,
    params: VerifyParams | None = None,
) -> VerificationResult:
    """Find and check ``T_a_b`` between two keyframes (or a frame ``b`` and a keyframe ``a``).

    Args:
        image_a, image_b: (H, W, 3) uint8 RGB images (tensor or array).
        X_a, X_b: (H, W, 3) pointmaps in their own camera frames (same pixel grid as the images).
        C_a, C_b: (H, W) confidences, > 0 where the point is valid.
        camera_a, camera_b: intrinsics of the pointmap grids (only ``camera_a`` and
            ``camera_b`` projections are used for association, so approximate intrinsics do).
        group: 'se3' (metric pointmaps) or 'sim3' (pointmaps up to scale).
        min_inlier_fraction: required lower dense overlap fraction (0.1 loops, 0.3 relocalisation).
        features_a, features_b: cached :func:`extract_features` results (computed when None).
        params: thresholds, :class:`VerifyParams`.

    Returns:
        :class:`VerificationResult` (``T_a_b`` maps frame ``b`` into frame ``a``).
    """
    p = params or VerifyParams()
    with_scale = group == "sim3"
    d = 7 if with_scale else 6
    timings: dict = {}
    t0 = time.perf_counter()
    eye = torch.eye(4, dtype=torch.float64)
    fail = lambda reason, **kw: VerificationResult(  # noqa: E731
        False, kw.pop("T", eye), information=torch.zeros(d, d, dtype=torch.float64), reason=reason,
        timings_ms=timings, **kw
    )
    if features_a is None:
        features_a = extract_features(image_a, p.n_features, p.fast_threshold, p.clahe_clip)
    if features_b is None:
        features_b = extract_features(image_b, p.n_features, p.fast_threshold, p.clahe_clip)
    ia, ib = match_features(features_a, features_b, p.ratio)
    timings["match"] = (time.perf_counter() - t0) * 1e3
    checkpoint()  # yield points of the backend thread (no-ops elsewhere), see scheduling.py
    n_matches = len(ia)
    if n_matches < p.min_matches:
        return fail(f"only {n_matches} feature matches (< {p.min_matches})", n_matches=n_matches)
    dev = X_a.device
    Ha, Wa = X_a.shape[:2]
    Hb, Wb = X_b.shape[:2]

    def lift(feat: ImageFeatures, idx: np.ndarray, X: torch.Tensor, C: torch.Tensor, H: int, W: int):
        sx, sy = W / feat.image_size[0], H / feat.image_size[1]
        uv = feat.uv[idx]
        u = np.clip(np.round((uv[:, 0] + 0.5) * sx - 0.5), 0, W - 1).astype(np.int64)
        v = np.clip(np.round((uv[:, 1] + 0.5) * sy - 0.5), 0, H - 1).astype(np.int64)
        u_t = torch.as_tensor(u, device=X.device)
        v_t = torch.as_tensor(v, device=X.device)
        P = X[v_t, u_t].to(torch.float64)
        return P, _valid_points(P, C[v_t, u_t])

    P_a, ok_a = lift(features_a, ia, X_a, C_a, Ha, Wa)
    P_b, ok_b = lift(features_b, ib, X_b.to(dev), C_b.to(dev), Hb, Wb)
    ok = ok_a & ok_b
    P_a, P_b = P_a[ok], P_b[ok]
    if P_a.shape[0] < p.min_matches:
        return fail(f"only {P_a.shape[0]} matches with valid 3D points", n_matches=n_matches)
    t1 = time.perf_counter()
    T0, inl = ransac_3d(
        P_a.cpu(), P_b.cpu(), p.ransac_rel_threshold, with_scale, p.ransac_hypotheses,
        max_scale_ratio=p.max_scale_ratio,
    )
    timings["ransac"] = (time.perf_counter() - t1) * 1e3
    checkpoint()
    n_inl = int(inl.sum())
    if n_inl < p.min_ransac_inliers or n_inl < p.min_ransac_inlier_ratio * P_a.shape[0]:
        return fail(
            f"RANSAC found {n_inl} inliers of {P_a.shape[0]} matches "
            f"(need {p.min_ransac_inliers} and {p.min_ransac_inlier_ratio:.0%})",
            n_matches=n_matches, n_ransac_inliers=n_inl,
        )
    t2 = time.perf_counter()
    # grey images in [0, 1] on the pointmap grids (photometric refinement and NCC test)
    gray_a = torch.as_tensor(_gray(image_a), device=dev, dtype=torch.float64) / 255.0
    gray_b = torch.as_tensor(_gray(image_b), device=dev, dtype=torch.float64) / 255.0
    if gray_a.shape != (Ha, Wa) or gray_b.shape != (Hb, Wb):
        import torch.nn.functional as F

        gray_a = F.interpolate(gray_a[None, None], size=(Ha, Wa), mode="bilinear", align_corners=False)[0, 0]
        gray_b = F.interpolate(gray_b[None, None], size=(Hb, Wb), mode="bilinear", align_corners=False)[0, 0]
    T, information, info = refine_dense(
        X_a, C_a, camera_a, X_b, C_b, T0.to(dev), with_scale, p, gray_a=gray_a, gray_b=gray_b
    )
    frac_ab = info["fraction"]
    # the refined pose must keep the RANSAC feature inliers consistent (guards against a
    # dense solution that slid away from the feature evidence)
    Pa_in, Pb_in = P_a[inl.to(P_a.device)], P_b[inl.to(P_b.device)]
    Tr = T.to(Pa_in.device)
    moved = torch.linalg.vector_norm(Pb_in @ Tr[:3, :3].T + Tr[:3, 3] - Pa_in, dim=-1)
    keep = float((moved < p.ransac_rel_threshold * torch.linalg.vector_norm(Pa_in, dim=-1)).float().mean())
    T_b_a = lie.sim3_inverse(T) if with_scale else lie.se3_inverse(T)
    checkpoint()
    frac_ba = _overlap_fraction(
        X_a, C_a.to(dev), X_b.to(dev), C_b.to(dev), camera_b, T_b_a, p.dense_rel_gate_end, p.dense_points
    )
    fraction = min(frac_ab, frac_ba)
    timings["dense"] = (time.perf_counter() - t2) * 1e3
    scale = float(lie.sim3_scale(T)) if with_scale else 1.0
    bp = info["b_pix"]
    ncc = _ncc(gray_b[bp[:, 0], bp[:, 1]], gray_a[info["a_v"], info["a_u"]])
    timings["total"] = (time.perf_counter() - t0) * 1e3
    common = dict(
        T=T.cpu(), inlier_fraction=fraction, n_matches=n_matches, n_ransac_inliers=n_inl, ncc=ncc, scale=scale
    )
    if not bool(torch.isfinite(T).all()):
        return fail("refinement diverged", **common)
    if with_scale and not (1.0 / p.max_scale_ratio < scale < p.max_scale_ratio):
        return fail(f"implausible scale {scale:.3f}", **common)
    if keep < p.min_feature_consistency:
        return fail(f"refined pose keeps only {keep:.0%} of the RANSAC inliers", **common)
    if fraction < min_inlier_fraction:
        return fail(
            f"dense overlap {fraction:.3f} (a->b {frac_ab:.3f}, b->a {frac_ba:.3f}) < {min_inlier_fraction}", **common
        )
    if ncc < p.min_ncc:
        return fail(f"photometric NCC {ncc:.3f} < {p.min_ncc}", **common)
    T_cpu = common.pop("T")
    return VerificationResult(True, T_cpu, information=information.cpu(), reason="", timings_ms=timings, **common)
