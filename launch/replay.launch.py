"""Bag replay: `ros2 bag play BAG --clock`, the SLAM node on sim time, and RViz.

    ros2 launch recon_slam replay.launch.py bag:=/path/to/bag [mode:=rgbd] [rate:=1.0] [rviz:=true]

The node's inputs are remapped to the topics `recon-slam convert` / `recon-slam synth --bag`
write (/camera/image, /camera/depth, /camera/camera_info, /camera/right/...); pass image:=,
depth:=, camera_info:= ... for bags recorded from a driver.
"""

import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, ExecuteProcess, OpaqueFunction, TimerAction
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

PACKAGE = "recon_slam"
NODE_EXECUTABLE = "slam_node"
NODE_NAME = "recon_slam"
RVIZ_CONFIG = "recon_slam.rviz"
PRESETS = {"rgbd": "realsense_rgbd.yaml", "stereo": "stereo_camera.yaml", "mono": "mono_camera.yaml"}
BAG_TOPICS = {
    "image": ("image", "/camera/image"),
    "depth": ("depth", "/camera/depth"),
    "camera_info": ("camera_info", "/camera/camera_info"),
    "right_image": ("right/image", "/camera/right/image"),
    "right_camera_info": ("right/camera_info", "/camera/right/camera_info"),
}


def _truthy(text):
    return str(text).strip().lower() in ("1", "true", "yes", "on")


def _setup(context, *args, **kwargs):
    share = get_package_share_directory(PACKAGE)
    bag = LaunchConfiguration("bag").perform(context)
    if not bag:
        raise RuntimeError("give the bag to play: bag:=/path/to/bag")
    mode = LaunchConfiguration("mode").perform(context)
    if mode not in PRESETS:
        raise RuntimeError(f"mode:={mode} is not one of {', '.join(PRESETS)}")
    params_file = LaunchConfiguration("params_file").perform(context) or os.path.join(share, "config", PRESETS[mode])
    remappings = []
    for arg, (topic, default) in BAG_TOPICS.items():
        remappings.append((topic, LaunchConfiguration(arg).perform(context) or default))
    play = ["ros2", "bag", "play", bag, "--clock", "--rate", LaunchConfiguration("rate").perform(context)]
    if _truthy(LaunchConfiguration("loop").perform(context)):
        play.append("--loop")
    actions = [
        Node(
            package=PACKAGE,
            executable=NODE_EXECUTABLE,
            name=NODE_NAME,
            parameters=[
                params_file,
                {
                    "mode": mode,
                    "use_sim_time": True,
                    "image_transport": LaunchConfiguration("image_transport").perform(context),
                    # a bag from `recon-slam convert` has no odometry: the node provides odom -> base_link
                    "publish_odom_tf": _truthy(LaunchConfiguration("publish_odom_tf").perform(context)),
                },
            ],
            remappings=remappings,
            output="screen",
            emulate_tty=True,
        ),
        # the player starts a little after the node (model loading, discovery) so no frame is lost
        TimerAction(
            period=float(LaunchConfiguration("play_delay").perform(context)),
            actions=[ExecuteProcess(cmd=play, output="screen")],
        ),
    ]
    if _truthy(LaunchConfiguration("rviz").perform(context)):
        actions.append(
            Node(
                package="rviz2",
                executable="rviz2",
                name="rviz2",
                arguments=["-d", os.path.join(share, "rviz", RVIZ_CONFIG)],
                parameters=[{"use_sim_time": True}],
                output="screen",
            )
        )
    return actions


def generate_launch_description():
    args = [
        DeclareLaunchArgument("bag", default_value="", description="bag to play (folder or .mcap/.db3)"),
        DeclareLaunchArgument("mode", default_value="rgbd", description="rgbd, stereo or mono"),
        DeclareLaunchArgument("params_file", default_value="",
                              description="node parameter YAML (default: config/<preset of the mode>.yaml)"),
        DeclareLaunchArgument("rate", default_value="1.0", description="playback rate"),
        DeclareLaunchArgument("loop", default_value="false", description="play the bag in a loop"),
        DeclareLaunchArgument("play_delay", default_value="5.0", description="seconds between node start and play"),
        DeclareLaunchArgument("image_transport", default_value="raw", description="raw or compressed"),
        DeclareLaunchArgument("publish_odom_tf", default_value="true",
                              description="node publishes odom -> base_link (bags without odometry)"),
        DeclareLaunchArgument("rviz", default_value="true", description="start RViz with rviz/recon_slam.rviz"),
    ]
    for arg, (topic, default) in BAG_TOPICS.items():
        args.append(DeclareLaunchArgument(arg, default_value="", description=f"bag topic for the node's '{topic}' "
                                          f"(default {default})"))
    return LaunchDescription(args + [OpaqueFunction(function=_setup)])
