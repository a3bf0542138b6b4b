"""Evaluation: trajectory errors (built on evo) and plots."""

from recon_slam.eval.metrics import TrajectoryErrors, evaluate_trajectory, path_length
from recon_slam.eval.plot import plot_trajectories

__all__ = ["TrajectoryErrors", "evaluate_trajectory", "path_length", "plot_trajectories"]
