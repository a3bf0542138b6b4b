"""Localise against a saved map: the recon_slam reloc node (and optionally RViz).

    ros2 launch recon_slam localize.launch.py map_path:=/maps/lab \\
        image:=/camera/camera/color/image_raw camera_info:=/camera/camera/color/camera_info \\
        publish_tf:=true rviz:=true

Arguments: map_path (required: the map folder), params_file (optional node parameter YAML;
the node's parameters are listed in recon_slam/ros/reloc_node.py), topic remaps (image,
camera_info; empty = the node's relative names), image_transport (raw | compressed),
publish_tf (map -> odom on /tf from the robot's odom -> base_link), use_sim_time (bag
replay with --clock), rviz (rviz/localize.rviz), namespace.
"""

import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

PACKAGE = "recon_slam"
NODE_EXECUTABLE = "reloc_node"
NODE_NAME = "recon_slam_reloc"
RVIZ_CONFIG = "localize.rviz"
REMAPS = {"image": "image", "camera_info": "camera_info"}


def _truthy(text):
    return str(text).strip().lower() in ("1", "true", "yes", "on")


def _setup(context, *args, **kwargs):
    share = get_package_share_directory(PACKAGE)
    map_path = LaunchConfiguration("map_path").perform(context)
    if not map_path:
        raise RuntimeError("give the map folder: map_path:=/path/to/map (written by the SLAM node's ~/save_map)")
    overrides = {
        "map_path": map_path,
        "publish_tf": _truthy(LaunchConfiguration("publish_tf").perform(context)),
        "use_sim_time": _truthy(LaunchConfiguration("use_sim_time").perform(context)),
        "image_transport": LaunchConfiguration("image_transport").perform(context),
    }
    params_file = LaunchConfiguration("params_file").perform(context)
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
            parameters=([params_file] if params_file else []) + [overrides],
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
        DeclareLaunchArgument("map_path", default_value="", description="map folder to localise in (required)"),
        DeclareLaunchArgument("params_file", default_value="", description="node parameter YAML (optional)"),
        DeclareLaunchArgument("image_transport", default_value="raw", description="raw or compressed"),
        DeclareLaunchArgument("publish_tf", default_value="false",
                              description="publish map -> odom on /tf (needs odom -> base_link on /tf)"),
        DeclareLaunchArgument("use_sim_time", default_value="false", description="use /clock (bag replay)"),
        DeclareLaunchArgument("rviz", default_value="false", description="start RViz with rviz/localize.rviz"),
        DeclareLaunchArgument("namespace", default_value="", description="namespace of the node"),
    ]
    for arg, topic in REMAPS.items():
        args.append(DeclareLaunchArgument(arg, default_value="", description=f"topic remapped to the node's '{topic}'"))
    return LaunchDescription(args + [OpaqueFunction(function=_setup)])
