"""recon_slam: real-time ROS 2 SLAM and relocalisation from keyframe pointmaps.

Frame convention everywhere: poses are 4x4 homogeneous matrices named by their frames,
``T_a_b`` maps coordinates expressed in frame ``b`` into frame ``a``
(``T_a_b @ T_b_c == T_a_c``). Cameras use the optical convention (x right, y down,
z forward). Trajectory files use the TUM format ``t tx ty tz qx qy qz qw`` holding
``T_world_cam``.
"""

__version__ = "0.1.0"
