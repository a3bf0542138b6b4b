"""Tests of the pinhole camera model (recon_slam.geometry.camera)."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch
import yaml

from recon_slam.errors import CalibrationError, ReconSlamError
from recon_slam.geometry.camera import PinholeCamera
from recon_slam.geometry.transforms import invert_pose, look_at, transform_points

DISTORTION = (-0.28, 0.09, 0.0012, -0.0008, -0.012)
# iterate cv2.undistortPoints to convergence (its default stops after 5 iterations)
CONVERGED = (cv2.TERM_CRITERIA_COUNT | cv2.TERM_CRITERIA_EPS, 100, 1e-14)


@pytest.fixture
def camera() -> PinholeCamera:
    return PinholeCamera(640, 480, 520.0, 515.0, 318.6, 241.3)


@pytest.fixture
def distorted_camera() -> PinholeCamera:
    return PinholeCamera(640, 480, 520.0, 515.0, 318.6, 241.3, DISTORTION)


def blob_image(width: int, height: int, u: float, v: float, sigma: float = 3.0) -> np.ndarray:
    """float32 image of a Gaussian blob centred on pixel coordinates ``(u, v)`` (OpenCV convention)."""
    x = np.arange(width, dtype=np.float64)[None, :]
    y = np.arange(height, dtype=np.float64)[:, None]
    return np.exp(-((x - u) ** 2 + (y - v) ** 2) / (2 * sigma**2)).astype(np.float32)


def centroid(image: np.ndarray) -> np.ndarray:
    weights = image.astype(np.float64)
    v, u = np.mgrid[: image.shape[0], : image.shape[1]]
    return np.array([(weights * u).sum(), (weights * v).sum()]) / weights.sum()


def project_np(camera: PinholeCamera, point) -> np.ndarray:
    uv, _ = camera.project(torch.tensor(point, dtype=torch.float64))
    return uv.numpy()


# ---------------------------------------------------------------------------- resize / crop
@pytest.mark.parametrize(
    "size,interpolation",
    (((320, 240), cv2.INTER_AREA), ((800, 600), cv2.INTER_LINEAR), ((320, 360), cv2.INTER_LINEAR)),
)
def test_scaled_camera_projects_onto_the_resized_image(camera, size, interpolation):
    point = [0.31, -0.17, 2.3]
    u, v = project_np(camera, point)
    image = blob_image(camera.width, camera.height, u, v, sigma=4.0)
    resized = cv2.resize(image, size, interpolation=interpolation)
    small = camera.scaled(*size)
    assert small.size == size
    np.testing.assert_allclose(project_np(small, point), centroid(resized), atol=0.02)


def test_scaled_camera_maps_pixel_centres_and_round_trips(camera):
    half = camera.scaled(320, 240)
    # the centre of the top-left 2x2 block (0.5, 0.5) becomes pixel (0, 0)
    np.testing.assert_allclose(half.pixel_to_ray(torch.tensor([0.0, 0.0], dtype=torch.float64)).numpy(),
                               camera.pixel_to_ray(torch.tensor([0.5, 0.5], dtype=torch.float64)).numpy())
    back = half.scaled(640, 480)
    np.testing.assert_allclose([back.fx, back.fy, back.cx, back.cy], [camera.fx, camera.fy, camera.cx, camera.cy])


def test_cropped_camera_projects_onto_the_crop(distorted_camera):
    camera = PinholeCamera(640, 480, 520.0, 515.0, 318.6, 241.3)
    point = [0.12, 0.2, 1.7]
    u, v = project_np(camera, point)
    image = blob_image(camera.width, camera.height, u, v)
    x0, y0, w, h = 100, 60, 400, 300
    crop = camera.cropped(x0, y0, w, h)
    assert crop.size == (w, h)
    np.testing.assert_allclose(project_np(crop, point), centroid(image[y0 : y0 + h, x0 : x0 + w]), atol=1e-6)
    # crop then resize composes
    both = crop.scaled(200, 150)
    resized = cv2.resize(image[y0 : y0 + h, x0 : x0 + w], (200, 150), interpolation=cv2.INTER_AREA)
    np.testing.assert_allclose(project_np(both, point), centroid(resized), atol=0.02)
    # distortion coefficients live in normalised coordinates and survive both operations
    assert distorted_camera.cropped(x0, y0, w, h).distortion == DISTORTION
    assert distorted_camera.scaled(320, 240).distortion == DISTORTION


@pytest.mark.parametrize("window", ((-1, 0, 100, 100), (0, 0, 641, 480), (600, 400, 50, 50), (10, 10, 0, 5)))
def test_crop_outside_the_image_raises(camera, window):
    with pytest.raises(CalibrationError):
        camera.cropped(*window)


# ---------------------------------------------------------------------------- rays / projection
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
def test_pixel_to_ray_and_project_round_trip(camera, dtype):
    gen = torch.Generator().manual_seed(0)
    uv = torch.rand(2, 50, 2, generator=gen, dtype=torch.float64) * torch.tensor([639.0, 479.0], dtype=torch.float64)
    depth = 0.2 + 10 * torch.rand(2, 50, generator=gen, dtype=torch.float64)
    uv, depth = uv.to(dtype), depth.to(dtype)
    rays = camera.pixel_to_ray(uv)
    assert rays.shape == (2, 50, 3) and rays.dtype == dtype
    torch.testing.assert_close(rays[..., 2], torch.ones_like(depth))
    uv_back, z = camera.project(rays * depth[..., None])
    tol = 1e-3 if dtype == torch.float32 else 1e-9
    torch.testing.assert_close(uv_back, uv, atol=tol, rtol=0)
    torch.testing.assert_close(z, depth)
    unit = camera.pixel_to_ray(uv, normalize=True)
    torch.testing.assert_close(unit.norm(dim=-1), torch.ones_like(depth))
    torch.testing.assert_close(unit * rays.norm(dim=-1, keepdim=True), rays)
    # the principal point looks straight ahead
    centre = camera.pixel_to_ray(torch.tensor([camera.cx, camera.cy], dtype=torch.float64))
    torch.testing.assert_close(centre, torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64))


def test_project_points_at_zero_depth_stay_finite(camera):
    uv, z = camera.project(torch.tensor([[0.1, 0.2, 0.0], [0.1, 0.2, -1.0]], dtype=torch.float64))
    assert torch.isfinite(uv).all()
    assert (z <= 0).all()


def test_backproject_depth(camera):
    small = camera.scaled(64, 48)
    gen = torch.Generator().manual_seed(1)
    depth = 0.5 + 4 * torch.rand(48, 64, generator=gen, dtype=torch.float64)
    points = small.backproject_depth(depth)
    assert points.shape == (48, 64, 3) and points.dtype == torch.float64
    torch.testing.assert_close(points[..., 2], depth)
    uv, z = small.project(points)
    torch.testing.assert_close(uv, small.pixel_grid(torch.float64), atol=1e-9, rtol=0)
    torch.testing.assert_close(z, depth)
    # pixel (u, v) = (5, 3) of a constant depth map, by hand
    flat = small.backproject_depth(torch.full((48, 64), 2.0, dtype=torch.float64))
    expected = [2.0 * (5 - small.cx) / small.fx, 2.0 * (3 - small.cy) / small.fy, 2.0]
    np.testing.assert_allclose(flat[3, 5].numpy(), expected)
    # batches of depth maps
    assert small.backproject_depth(torch.ones(2, 48, 64)).shape == (2, 48, 64, 3)
    with pytest.raises(CalibrationError):
        small.backproject_depth(torch.ones(64, 48))


def test_in_image(camera):
    uv = torch.tensor([[-0.5, -0.5], [639.5, 479.5], [-0.6, 10.0], [10.0, 479.6], [320.0, 240.0]])
    assert camera.in_image(uv).tolist() == [True, True, False, False, True]
    assert camera.in_image(uv, margin=1.0).tolist() == [False, False, False, False, True]


# ---------------------------------------------------------------------------- distortion
@pytest.mark.parametrize("alpha", (0.0, 1.0))
def test_undistortion_maps_agree_with_opencv(distorted_camera, alpha):
    cam = distorted_camera
    dist = np.asarray(cam.distortion)
    map_x, map_y, undistorted = cam.undistortion_maps(alpha)
    assert map_x.shape == map_y.shape == (480, 640) and map_x.dtype == np.float32
    assert not undistorted.has_distortion and undistorted.size == cam.size
    # output pixels across the image, corners included
    us, vs = np.meshgrid(np.linspace(0, 639, 9).round().astype(int), np.linspace(0, 479, 7).round().astype(int))
    us, vs = us.ravel(), vs.ravel()
    source = np.stack((map_x[vs, us], map_y[vs, us]), axis=-1).astype(np.float64)
    # the distorted pixel the map samples is undistorted by OpenCV back onto the output pixel
    if hasattr(cv2, "undistortPointsIter"):  # OpenCV 4 names the overload with a criteria
        back = cv2.undistortPointsIter(source.reshape(-1, 1, 2), cam.K, dist, None, undistorted.K, CONVERGED)
    else:
        back = cv2.undistortPoints(source.reshape(-1, 1, 2), cam.K, dist, None, None, undistorted.K, CONVERGED)
    np.testing.assert_allclose(back.reshape(-1, 2), np.stack((us, vs), axis=-1), atol=2e-3)
    # ... and our undistort_points says the same (normalised coordinates)
    normalised = cam.undistort_points(source)
    expected = (np.stack((us, vs), axis=-1) - [undistorted.cx, undistorted.cy]) / [undistorted.fx, undistorted.fy]
    np.testing.assert_allclose(normalised, expected, atol=2e-3 / undistorted.fx)
    # a 3D point seen through the lens lands, after remapping, where the undistorted camera projects it
    rays = undistorted.pixel_to_ray(torch.from_numpy(np.stack((us, vs), -1).astype(np.float64))).numpy()
    distorted_pixels, _ = cv2.projectPoints(rays * 1.7, np.zeros(3), np.zeros(3), cam.K, dist)
    np.testing.assert_allclose(distorted_pixels.reshape(-1, 2), source, atol=2e-3)


def test_undistort_points_is_accurate_in_the_corners(distorted_camera):
    cam = distorted_camera
    normalised = np.array([[-0.55, -0.42], [0.6, 0.45], [0.01, -0.3], [0.0, 0.0]])
    rays = np.concatenate((normalised, np.ones((4, 1))), axis=1)
    pixels, _ = cv2.projectPoints(rays, np.zeros(3), np.zeros(3), cam.K, np.asarray(cam.distortion))
    np.testing.assert_allclose(cam.undistort_points(pixels.reshape(-1, 2)), normalised, atol=1e-8)
    # without distortion it is the plain inverse of K
    plain = PinholeCamera(640, 480, 520.0, 515.0, 318.6, 241.3)
    np.testing.assert_allclose(plain.undistort_points([[318.6 + 52.0, 241.3 - 103.0]]), [[0.1, -0.2]])


def test_undistortion_maps_without_distortion_are_identity(camera):
    map_x, map_y, same = camera.undistortion_maps()
    assert same == camera
    image = np.random.default_rng(0).random((480, 640), dtype=np.float32)
    np.testing.assert_array_equal(cv2.remap(image, map_x, map_y, cv2.INTER_LINEAR), image)


# ---------------------------------------------------------------------------- parsing
ROS_CALIBRATION_YAML = """
image_width: 640
image_height: 480
camera_name: head_camera
camera_matrix:
  rows: 3
  cols: 3
  data: [520.0, 0.0, 318.6, 0.0, 515.0, 241.3, 0.0, 0.0, 1.0]
distortion_model: plumb_bob
distortion_coefficients:
  rows: 1
  cols: 5
  data: [-0.28, 0.09, 0.0012, -0.0008, -0.012]
rectification_matrix:
  rows: 3
  cols: 3
  data: [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
projection_matrix:
  rows: 3
  cols: 4
  data: [500.0, 0.0, 320.0, 0.0, 0.0, 500.0, 240.0, 0.0, 0.0, 0.0, 1.0, 0.0]
"""

ROS2_CAMERA_INFO_ECHO = """
header:
  stamp:
    sec: 12
    nanosec: 500
  frame_id: camera_optical_frame
height: 480
width: 640
distortion_model: plumb_bob
d:
- -0.28
- 0.09
- 0.0012
- -0.0008
- -0.012
k:
- 520.0
- 0.0
- 318.6
- 0.0
- 515.0
- 241.3
- 0.0
- 0.0
- 1.0
r: [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
p: [500.0, 0.0, 320.0, 0.0, 0.0, 500.0, 240.0, 0.0, 0.0, 0.0, 1.0, 0.0]
binning_x: 0
binning_y: 0
"""


@pytest.mark.parametrize(
    "data",
    (
        {"width": 640, "height": 480, "fx": 520, "fy": 515, "cx": 318.6, "cy": 241.3, "distortion": list(DISTORTION)},
        {"width": 640, "height": 480, "K": [[520, 0, 318.6], [0, 515, 241.3], [0, 0, 1]], "distortion": DISTORTION},
        yaml.safe_load(ROS_CALIBRATION_YAML),
        yaml.safe_load(ROS2_CAMERA_INFO_ECHO),
        {"width": 640, "height": 480, "K": [520, 0, 318.6, 0, 515, 241.3, 0, 0, 1], "D": list(DISTORTION)},
    ),
    ids=("plain", "plain-K", "ros-calibration-yaml", "ros2-camera-info", "ros1-camera-info"),
)
def test_from_dict_accepts_plain_and_ros_styles(distorted_camera, data):
    assert PinholeCamera.from_dict(data) == distorted_camera


def test_from_dict_without_distortion():
    ros = yaml.safe_load(ROS_CALIBRATION_YAML)
    ros["distortion_coefficients"] = None
    cam = PinholeCamera.from_dict(ros)
    assert not cam.has_distortion
    ros["distortion_coefficients"] = {"rows": 1, "cols": 5, "data": [0, 0, 0, 0, 0]}
    assert PinholeCamera.from_dict(ros) == cam
    assert PinholeCamera.from_dict({"width": 640, "height": 480, "fx": 520, "fy": 515, "cx": 318.6, "cy": 241.3}) == cam


def test_yaml_file_and_to_dict_round_trip(tmp_path, distorted_camera):
    path = tmp_path / "camera_info.yaml"
    path.write_text(ROS_CALIBRATION_YAML)
    assert PinholeCamera.from_yaml(path) == distorted_camera
    plain = tmp_path / "calib.yaml"
    plain.write_text(yaml.safe_dump(distorted_camera.to_dict()))
    assert PinholeCamera.from_yaml(plain) == distorted_camera
    assert PinholeCamera.from_K(distorted_camera.K, 640, 480, DISTORTION) == distorted_camera
    torch.testing.assert_close(distorted_camera.K_torch(torch.float64), torch.from_numpy(distorted_camera.K))


def _ros(**changes):
    data = yaml.safe_load(ROS_CALIBRATION_YAML)
    data.update(changes)
    return data


@pytest.mark.parametrize(
    "data",
    (
        {"width": 640, "height": 480, "fx": 520, "fy": 515, "cx": 318.6},  # missing cy
        {"width": 640, "height": 480, "fx": -520, "fy": 515, "cx": 318.6, "cy": 241.3},
        {"width": 640, "height": 480, "fx": 0, "fy": 515, "cx": 318.6, "cy": 241.3},
        {"width": 0, "height": 480, "fx": 520, "fy": 515, "cx": 318.6, "cy": 241.3},
        {"width": 640, "height": 480, "fx": float("nan"), "fy": 515, "cx": 318.6, "cy": 241.3},
        {"width": 640, "height": 480, "fx": 520, "fy": 515, "cx": float("inf"), "cy": 241.3},
        {"width": 640, "height": 480, "fx": "wide", "fy": 515, "cx": 318.6, "cy": 241.3},
        {"width": 640, "height": 480, "fx": 520, "fy": 515, "cx": 318.6, "cy": 241.3, "distortion": [0.1, 0.2, 0.3]},
        dict(width=640, height=480, fx=520, fy=515, cx=318.6, cy=241.3, distortion=[0.1, math.nan, 0, 0]),
        {"width": 640, "height": 480, "K": [520, 0, 318.6, 0, 515, 241.3]},  # not 3x3
        {"width": 640, "height": 480, "K": [0] * 9},  # uncalibrated camera_info
        {"width": 640, "height": 480, "K": [520, 3.0, 318.6, 0, 515, 241.3, 0, 0, 1]},  # skew
        {"width": 640, "height": 480, "K": [520, 0, 318.6, 0, 515, 241.3, 0, 0, 2]},
        _ros(distortion_model="equidistant"),  # fisheye coefficients must not be read as plumb_bob
        _ros(camera_matrix={"rows": 3, "cols": 3}),
        _ros(image_width=None),
        {key: value for key, value in _ros().items() if key != "image_height"},
    ),
)
def test_invalid_calibrations_raise_calibration_error(data):
    with pytest.raises(CalibrationError):
        PinholeCamera.from_dict(data)


def test_invalid_files_raise_calibration_error(tmp_path):
    with pytest.raises(CalibrationError, match="not found"):
        PinholeCamera.from_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("width: [640\n")
    with pytest.raises(CalibrationError):
        PinholeCamera.from_yaml(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(CalibrationError):
        PinholeCamera.from_yaml(bad)
    with pytest.raises(CalibrationError):
        PinholeCamera.from_dict(["not", "a", "mapping"])
    # calibration errors are user errors
    assert issubclass(CalibrationError, ReconSlamError)


# ---------------------------------------------------------------------------- optical frame helpers
def test_look_at_gives_an_upright_optical_camera(camera):
    eye, target = np.array([2.0, -1.0, 1.5]), np.array([0.0, 0.5, 0.8])
    T_world_cam = look_at(eye, target)
    R = T_world_cam[:3, :3]
    np.testing.assert_allclose(R.T @ R, np.eye(3), atol=1e-12)
    assert np.linalg.det(R) == pytest.approx(1.0)
    T_cam_world = invert_pose(T_world_cam)
    # the target is straight ahead, a point above it appears higher (smaller v) in the image
    target_cam, above_cam = transform_points(T_cam_world, np.stack((target, target + [0.0, 0.0, 0.3])))
    uv_target = project_np(camera, target_cam)
    uv_above = project_np(camera, above_cam)
    np.testing.assert_allclose(uv_target, [camera.cx, camera.cy], atol=1e-9)
    assert target_cam[2] > 0 and uv_above[1] < uv_target[1] - 1.0
    assert abs(uv_above[0] - uv_target[0]) < 1e-6 * camera.fx  # no roll: "up" stays vertical
    # looking straight down still gives a valid rotation
    down = look_at([0.0, 0.0, 3.0], [0.0, 0.0, 0.0])[:3, :3]
    np.testing.assert_allclose(down @ down.T, np.eye(3), atol=1e-12)
    np.testing.assert_allclose(down[:, 2], [0.0, 0.0, -1.0])
    assert math.isfinite(np.linalg.det(down))
