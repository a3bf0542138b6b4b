"""Live camera: the recon_slam SLAM node (and optionally RViz).

    ros2 launch recon_slam slam.launch.py mode:=rgbd \\
        image:=/camera/camera/color/image_raw \\
        depth:=/camera/camera/aligned_depth_to_color/image_raw \\
        camera_info:=/camera/camera/color/camera_info rviz:=true

Arguments: mode (rgbd | stereo | mono), params_file (default: the preset of the mode in
share/recon_slam/config), topic remaps (image, depth, camera_info, right_image,
right_camera_info; empty = the node's relative names), image_transport (raw | compressed),
use_sim_time, rviz, localize (load map_path at start), map_path, namespace.
"""

import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

PACKAGE = "recon_slam"
NODE_EXECUTABLE = "slam_node"
NODE_NAME = "recon_slam"
RVIZ_CONFIG = "recon_slam.rviz"
PRESETS = {"rgbd": "realsense_rgbd.yaml", "stereo": "stereo_camera.yaml", "mono": "mono_camera.yaml"}
REMAPS = {
    "image": "image",
    "depth": "depth",
    "camera_info": "camera_info",
    "right_image": "right/image",
    "right_camera_info": "right/camera_info",
}


def _truthy(text):
    return str(text).strip().lower() in ("1", "true", "yes", "on")


def _setup(context, *args, **kwargs):
    share = get_package_share_directory(PACKAGE)
    mode = LaunchConfiguration("mode").perform(context)
    if mode not in PRESETS:
        raise RuntimeError(f"mode:={mode} is not one of {', '.join(PRESETS)}")
    params_file = LaunchConfiguration("params_file").perform(context) or os.path.join(share, "config", PRESETS[mode])
    overrides = {
        "mode": mode,
        "use_sim_time": _truthy(LaunchConfiguration("use_sim_time").perform(context)),
        "image_transport": LaunchConfiguration("image_transport").perform(context),
        "load_map_at_start": _truthy(LaunchConfiguration("localize").perform(context)),
    }
    map_path = LaunchConfiguration("map_path").perform(context)
    if map_path:
        overrides["map_path"] = map_path
    remappings = []
    for arg, topic in REMAPS.items():
        value = LaunchConfiguration(arg).perform(context)
        if value:
            remappings.append((topic, value))
    actions = [
        Node(
            package=PACKAGE,
            executable=NODE_EXECUTABLE,
            name=NODE_NAME,
            namespace=LaunchConfiguration("namespace").perform(context),
            parameters=[params_file, overrides],
            remappings=remappings,
            output="screen",
            emulate_tty=True,
        )
    ]
    if _truthy(LaunchConfiguration("rviz").perform(context)):
        actions.append(
            Node(
                package="rviz2",
                executable="rviz2",
                name="rviz2",
                arguments=["-d", os.path.join(share, "rviz", RVIZ_CONFIG)],
                parameters=[{"use_sim_time": overrides["use_sim_time"]}],
                output="screen",
            )
        )
    return actions


def generate_launch_description():
    args = [
        DeclareLaunchArgument("mode", default_value="rgbd", description="rgbd, stereo or mono"),
        DeclareLaunchArgument("params_file", default_value="",
                              description="node parameter YAML (default: config/<preset of the mode>.yaml)"),
        DeclareLaunchArgument("image_transport", default_value="raw", description="raw or compressed"),
        DeclareLaunchArgument("use_sim_time", default_value="false", description="use /clock (bag replay)"),
        DeclareLaunchArgument("rviz", default_value="false", description="start RViz with rviz/recon_slam.rviz"),
        DeclareLaunchArgument("localize", default_value="false",
                              description="load map_path at start and localise in it"),
        DeclareLaunchArgument("map_path", default_value="", description="map folder (default: the parameter file's)"),
        DeclareLaunchArgument("namespace", default_value="", description="namespace of the node"),
    ]
    for arg, topic in REMAPS.items():
        args.append(DeclareLaunchArgument(arg, default_value="", description=f"topic remapped to the node's '{topic}'"))
    return LaunchDescription(args + [OpaqueFunction(function=_setup)])
