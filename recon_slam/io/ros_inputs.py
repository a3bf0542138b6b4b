"""Synchronised ROS input messages -> :class:`~recon_slam.io.frame.Frame` (no rclpy import).

The ROS node collects one colour (or left) image, plus a depth image (``rgbd``) or a right
image (``stereo``), and the CameraInfo messages; :func:`frame_from_messages` decodes them
(raw or compressed, by field access, so rclpy and rosbags messages both work) and checks
that they fit together. Every problem is a :class:`~recon_slam.errors.ReconSlamError`
whose message names the topic and the fix, and whose :func:`problem_key` groups it for
"log once per cause".
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from recon_slam.errors import CalibrationError, InputError, ReconSlamError
from recon_slam.geometry.camera import PinholeCamera
from recon_slam.io.frame import Frame
from recon_slam.io.messages import (
    camera_info_baseline,
    camera_info_to_camera,
    depth_msg_to_metres,
    image_msg_to_rgb,
    stamp_to_sec,
)

__all__ = ["MODES", "LatestSlot", "camera_from_info", "frame_from_messages", "problem_key"]

#: input modes of the node (mono: image, camera_info used when present)
MODES = ("rgbd", "stereo", "mono")


def problem_key(exc: BaseException) -> str:
    """Short grouping key of an input problem (type + first words), for log-once bookkeeping."""
    text = str(exc)
    return f"{type(exc).__name__}:{text[:60]}"


def camera_from_info(info: Any, mode: str, image_size: Optional[tuple[int, int]] = None) -> PinholeCamera:
    """``sensor_msgs/CameraInfo`` -> :class:`PinholeCamera` for ``mode``.

    Stereo pairs are rectified: their camera is read from ``P`` (no distortion); RGB-D uses
    ``K`` and ``D``.

    Raises:
        CalibrationError: the CameraInfo is uncalibrated or inconsistent.
        EncodingError: unsupported distortion model.
    """
    try:
        return camera_info_to_camera(info, use_projection=(mode == "stereo"), image_size=image_size)
    except CalibrationError as exc:
        raise CalibrationError(
            f"camera_info: {exc}".replace("give --calib FILE", "publish a calibrated camera_info (ros2 run "
                                          "camera_calibration cameracalibrator)")
        ) from None


def _decode_colour(msg: Any, topic: str) -> np.ndarray:
    try:
        return image_msg_to_rgb(msg)
    except ReconSlamError as exc:
        raise type(exc)(f"{topic}: {exc}") from None


def _decode_depth(msg: Any, topic: str) -> np.ndarray:
    try:
        return depth_msg_to_metres(msg)
    except ReconSlamError as exc:
        raise type(exc)(f"{topic}: {exc}") from None


def frame_from_messages(
    index: int,
    mode: str,
    image_msg: Any,
    info_msg: Any,
    *,
    depth_msg: Any = None,
    right_msg: Any = None,
    right_info_msg: Any = None,
    camera_frame: str = "",
    baseline_m: Optional[float] = None,
    topics: Optional[dict[str, str]] = None,
) -> Frame:
    """Decode one synchronised set of messages into a :class:`Frame`.

    Args:
        index: frame index in the node's stream.
        mode: 'rgbd' (needs ``depth_msg``) or 'stereo' (needs ``right_msg``).
        image_msg: colour/left ``sensor_msgs/Image`` or ``CompressedImage``.
        info_msg: its ``sensor_msgs/CameraInfo`` (required).
        depth_msg: registered depth ``Image`` (16UC1 mm / 32FC1 m) or ``compressedDepth``.
        right_msg, right_info_msg: right image of a rectified pair and its CameraInfo
            (the baseline comes from its ``P``, else ``baseline_m``).
        camera_frame: optical frame name for the frame (default: the image's frame_id).
        topics: role -> topic name, only used in error messages.

    Returns:
        The frame: image (H, W, 3) uint8 RGB, depth (H, W) float32 metres, stamp (s) from
        the image header.

    Raises:
        EncodingError, CalibrationError, InputError: with the topic and the fix.
    """
    topics = topics or {}
    if mode not in ("rgbd", "stereo", "mono"):
        raise InputError(f"mode {mode!r} is not one of rgbd, stereo, mono")
    if mode == "mono" and info_msg is None:
        # uncalibrated monocular: the network needs no intrinsics; a nominal pinhole camera
        # (60 degree horizontal field of view, centred) only names the pixel grid
        image = _decode_colour(image_msg, topics.get("image", "image"))
        h, w = image.shape[:2]
        f = 0.5 * w / np.tan(np.radians(30.0))
        camera = PinholeCamera(w, h, f, f, (w - 1) / 2.0, (h - 1) / 2.0)
        stamp = stamp_to_sec(image_msg.header.stamp)
        frame_id = camera_frame or str(image_msg.header.frame_id).lstrip("/") or "camera_optical_frame"
        return Frame(index=int(index), stamp=stamp, image=image, camera=camera, frame_id=frame_id)
    if info_msg is None:
        raise CalibrationError(
            f"no camera_info received on {topics.get('camera_info', 'camera_info')}: modes rgbd and stereo need the "
            "calibration; remap camera_info to your driver's CameraInfo topic"
        )
    image = _decode_colour(image_msg, topics.get("image", "image"))
    h, w = image.shape[:2]
    camera = camera_from_info(info_msg, mode, image_size=(w, h))
    if (camera.width, camera.height) != (w, h):
        raise CalibrationError(
            f"{topics.get('image', 'image')} is {w}x{h} but camera_info says {camera.width}x{camera.height}: "
            "remap camera_info to the CameraInfo of this image topic"
        )
    depth = right = None
    baseline = None
    if mode == "rgbd":
        if depth_msg is None:
            raise InputError("mode rgbd needs a depth image: remap depth to your driver's registered depth topic")
        depth = _decode_depth(depth_msg, topics.get("depth", "depth"))
        if depth.shape != (h, w):
            raise InputError(
                f"{topics.get('depth', 'depth')} is {depth.shape[1]}x{depth.shape[0]} but "
                f"{topics.get('image', 'image')} is {w}x{h}: use depth registered to the colour image "
                "(e.g. RealSense aligned_depth_to_color, align_depth.enable:=true)"
            )
    elif mode == "stereo":
        if right_msg is None:
            raise InputError("mode stereo needs the right image: remap right/image to your driver's right topic")
        right = _decode_colour(right_msg, topics.get("right_image", "right/image"))
        if right.shape != image.shape:
            raise InputError(
                f"right image is {right.shape[1]}x{right.shape[0]} but the left is {w}x{h}: stereo needs a "
                "rectified pair of equal size"
            )
        if right_info_msg is not None:
            baseline = camera_info_baseline(right_info_msg)
        if baseline is None:
            baseline = baseline_m if baseline_m else None
        if baseline is None or not np.isfinite(baseline) or baseline <= 0:
            raise CalibrationError(
                "stereo baseline unknown: the right camera_info has no P[0,3] = -fx * baseline (or it is not "
                "received); publish the rectified right camera_info or set the stereo_baseline parameter (metres)"
            )
    header = image_msg.header
    frame_id = camera_frame or str(header.frame_id).lstrip("/") or "camera_optical_frame"
    return Frame(
        index=int(index),
        stamp=stamp_to_sec(header.stamp),
        image=image,
        camera=camera,
        depth=depth,
        right_image=right,
        baseline_m=baseline,
        frame_id=frame_id,
    )


class LatestSlot:
    """A one-item queue holding only the newest frame (the node's drop policy).

    :meth:`put` replaces a frame the worker has not taken yet (counted in :attr:`dropped`),
    so the worker always processes the newest complete frame and no backlog can build up
    however slow the engine is. Thread-safe.
    """

    def __init__(self) -> None:
        import threading

        self._cv = threading.Condition()
        self._item: Any = None
        #: frames replaced before the worker took them
        self.dropped = 0
        #: frames offered
        self.offered = 0

    def put(self, item: Any) -> None:
        """Offer the newest item (replaces and counts an untaken one)."""
        with self._cv:
            if self._item is not None:
                self.dropped += 1
            self._item = item
            self.offered += 1
            self._cv.notify()

    def take(self, timeout: Optional[float] = None) -> Any:
        """The newest item, waiting up to ``timeout`` s; None when none came."""
        with self._cv:
            if self._item is None:
                self._cv.wait_for(lambda: self._item is not None, timeout)
            item, self._item = self._item, None
            return item

    def clear(self) -> None:
        """Drop the waiting item (not counted: used on reset)."""
        with self._cv:
            self._item = None

    def __len__(self) -> int:
        with self._cv:
            return 0 if self._item is None else 1
