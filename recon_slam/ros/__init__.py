"""ROS 2 integration. Only :mod:`recon_slam.ros.slam_node` imports rclpy (lazily, at use);
:mod:`recon_slam.ros.params` is plain Python shared with ``recon-slam replay`` and tests."""
