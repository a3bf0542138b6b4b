"""Wrappers that damage a frame source on purpose, for robustness tests and benchmarks.

They keep the wrapped source's camera and ground truth, so a run on a damaged stream is
evaluated against the same reference as a clean run.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import numpy as np

from recon_slam.io.frame import Frame


class PerturbedSource:
    """A FrameSource that drops and/or blanks frames of another one.

    Args:
        source: the wrapped FrameSource.
        drop_fraction: share of frames removed at random (reproducible with ``seed``).
        blank_start, blank_count: frames ``[blank_start, blank_start + blank_count)`` of the
            original stream are replaced by black images with no depth ('black'), or keep
            their image but lose all depth ('zero_depth'), as set by ``blank_kind``.
        seed: random seed of the dropped-frame choice.
    """

    def __init__(self, source, drop_fraction: float = 0.0, blank_start: int = -1, blank_count: int = 0,
                 blank_kind: str = "black", seed: int = 0) -> None:
        if blank_kind not in ("black", "zero_depth"):
            raise ValueError(f"blank_kind must be 'black' or 'zero_depth', not {blank_kind!r}")
        self.source = source
        self.blank_kind = blank_kind
        n = len(source)
        rng = np.random.default_rng(seed)
        keep = np.ones(n, dtype=bool)
        if drop_fraction > 0:
            keep[rng.choice(n, size=int(round(drop_fraction * n)), replace=False)] = False
        self.blank = set(range(blank_start, blank_start + blank_count)) if blank_start >= 0 else set()
        keep[list(self.blank & set(range(n)))] = True  # blanked frames are delivered, damaged
        self.keep = keep
        self.name = f"{getattr(source, 'name', 'source')}+perturbed"
        self.camera = source.camera
        self.has_depth = source.has_depth
        self.has_stereo = source.has_stereo
        self.has_ground_truth = getattr(source, "has_ground_truth", False)

    def __len__(self) -> int:
        return int(self.keep.sum())

    def ground_truth(self):
        """(stamps (N,), T_world_cam (N, 4, 4)) of the wrapped source (all frames)."""
        return self.source.ground_truth()

    def __iter__(self) -> Iterator[Frame]:
        out_index = 0
        for i, frame in enumerate(self.source):
            if not self.keep[i]:
                continue
            if i in self.blank:
                changes = {"depth": None if frame.depth is None else np.zeros_like(frame.depth)}
                if self.blank_kind == "black":
                    changes["image"] = np.zeros_like(frame.image)
                    if frame.right_image is not None:
                        changes["right_image"] = np.zeros_like(frame.right_image)
                frame = dataclasses.replace(frame, **changes)
            yield dataclasses.replace(frame, index=out_index)
            out_index += 1


class RepeatedSource:
    """A FrameSource that plays another one ``laps`` times in a row (stamps keep increasing).

    With a loop trajectory this is a camera that keeps revisiting the same place, the case
    where the map must not grow without bound.
    """

    def __init__(self, source, laps: int) -> None:
        if laps < 1:
            raise ValueError(f"laps must be >= 1, not {laps}")
        self.source = source
        self.laps = int(laps)
        self.name = f"{getattr(source, 'name', 'source')}x{laps}"
        self.camera = source.camera
        self.has_depth = source.has_depth
        self.has_stereo = source.has_stereo
        self.has_ground_truth = getattr(source, "has_ground_truth", False)
        stamps, _ = source.ground_truth() if self.has_ground_truth else (None, None)
        self._period = None if stamps is None or len(stamps) < 2 else float(stamps[-1] - stamps[0] + (stamps[1] - stamps[0]))

    def __len__(self) -> int:
        return len(self.source) * self.laps

    def _lap_offset(self, lap: int) -> float:
        return lap * (self._period if self._period is not None else 1e3)

    def ground_truth(self):
        """(stamps (N * laps,), T_world_cam (N * laps, 4, 4)) of all laps."""
        import numpy as np

        stamps, poses = self.source.ground_truth()
        return (np.concatenate([stamps + self._lap_offset(k) for k in range(self.laps)]),
                np.concatenate([poses] * self.laps))

    def __iter__(self) -> Iterator[Frame]:
        n = len(self.source)
        for lap in range(self.laps):
            for frame in self.source:
                yield dataclasses.replace(frame, index=lap * n + frame.index, stamp=frame.stamp + self._lap_offset(lap))
