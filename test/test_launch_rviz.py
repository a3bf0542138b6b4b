"""Launch files and RViz config, checked as far as possible without ROS launch installed.

``launch`` / ``launch_ros`` are not on PyPI, so the launch files are executed against small
stand-ins of the few classes they use; the test then checks what they would start: the
node executable (a console script of this package), its parameter file (shipped in
config/), remappings, sim time, ``ros2 bag play --clock`` and RViz with our config. The
RViz file is parsed and may only refer to topics the node publishes (plus its input image).
"""

import importlib.util
import re
import sys
import types
from pathlib import Path

import pytest
import yaml

from conftest import REPO_ROOT
from recon_slam.io.ros_outputs import NODE_NAME, output_topics

SLAM_ENTRY_POINT = "slam_node = recon_slam.ros.slam_node:main"


# ------------------------------------------------------------------------------ launch stand-ins
class _Recorder:
    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs


class LaunchDescription(_Recorder):
    pass


class DeclareLaunchArgument(_Recorder):
    pass


class OpaqueFunction(_Recorder):
    pass


class ExecuteProcess(_Recorder):
    pass


class TimerAction(_Recorder):
    pass


class Node(_Recorder):
    pass


class LaunchConfiguration:
    def __init__(self, name):
        self.name = name

    def perform(self, context):
        return context.launch_configurations[self.name]


class _Context:
    def __init__(self, values):
        self.launch_configurations = values


@pytest.fixture
def launch_api(monkeypatch, tmp_path):
    """Install stand-in launch modules; the package share is the repository itself."""
    mods = {
        "launch": {"LaunchDescription": LaunchDescription},
        "launch.actions": {"DeclareLaunchArgument": DeclareLaunchArgument, "OpaqueFunction": OpaqueFunction,
                           "ExecuteProcess": ExecuteProcess, "TimerAction": TimerAction},
        "launch.substitutions": {"LaunchConfiguration": LaunchConfiguration},
        "launch_ros": {},
        "launch_ros.actions": {"Node": Node},
        "ament_index_python": {},
        "ament_index_python.packages": {"get_package_share_directory": lambda pkg: str(REPO_ROOT)},
    }
    for name, attrs in mods.items():
        m = types.ModuleType(name)
        for k, v in attrs.items():
            setattr(m, k, v)
        monkeypatch.setitem(sys.modules, name, m)


def _load(name):
    path = REPO_ROOT / "launch" / name
    spec = importlib.util.spec_from_file_location(name.replace(".", "_"), path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(mod, **overrides):
    desc = mod.generate_launch_description()
    entities = desc.args[0]
    values = {e.args[0]: e.kwargs["default_value"] for e in entities if isinstance(e, DeclareLaunchArgument)}
    unknown = set(overrides) - set(values)
    assert not unknown, f"not launch arguments: {unknown}"
    values.update(overrides)
    (opaque,) = [e for e in entities if isinstance(e, OpaqueFunction)]
    return opaque.kwargs["function"](_Context(values))


def _console_scripts():
    text = (REPO_ROOT / "setup.py").read_text()
    return dict(re.findall(r'"([\w-]+)\s*=\s*([\w.]+:\w+)"', text))


def _check_slam_node(node, mode):
    assert node.kwargs["package"] == "recon_slam" and node.kwargs["executable"] == "slam_node"
    assert node.kwargs["name"] == NODE_NAME
    params_file, overrides = node.kwargs["parameters"]
    assert Path(params_file).is_file() and Path(params_file).parent == REPO_ROOT / "config"
    assert overrides["mode"] == mode
    # the parameter file only holds parameters the node declares
    from recon_slam.ros.params import read_params_file, split_params

    _, _, unknown = split_params(read_params_file(params_file))
    assert not unknown
    return overrides


def test_slam_node_is_a_console_script():
    from recon_slam.ros import slam_node

    assert callable(slam_node.main)
    scripts = _console_scripts()
    assert scripts.get("slam_node") == "recon_slam.ros.slam_node:main", (
        f"setup.py needs the console script line \"{SLAM_ENTRY_POINT}\" (ros2 run recon_slam slam_node)"
    )


@pytest.mark.parametrize("mode", ["rgbd", "stereo", "mono"])
def test_slam_launch_starts_the_node_with_the_preset_of_the_mode(launch_api, mode):
    mod = _load("slam.launch.py")
    actions = _run(mod, mode=mode, image="/cam/color/image_raw", camera_info="/cam/color/camera_info")
    (node,) = actions  # rviz:=false by default
    overrides = _check_slam_node(node, mode)
    assert Path(node.kwargs["parameters"][0]).name == mod.PRESETS[mode]
    assert overrides["use_sim_time"] is False
    assert ("image", "/cam/color/image_raw") in node.kwargs["remappings"]
    assert ("camera_info", "/cam/color/camera_info") in node.kwargs["remappings"]
    assert all(src != "depth" for src, _ in node.kwargs["remappings"])  # empty argument: no remap


def test_slam_launch_rviz_params_file_and_localisation(launch_api, tmp_path):
    custom = tmp_path / "my.yaml"
    custom.write_text("/**:\n  ros__parameters:\n    mode: rgbd\n")
    mod = _load("slam.launch.py")
    node, rviz = _run(mod, rviz="true", params_file=str(custom), localize="true", map_path="/maps/lab")
    assert node.kwargs["parameters"][0] == str(custom)
    assert node.kwargs["parameters"][1]["load_map_at_start"] is True
    assert node.kwargs["parameters"][1]["map_path"] == "/maps/lab"
    assert rviz.kwargs["executable"] == "rviz2"
    assert Path(rviz.kwargs["arguments"][1]) == REPO_ROOT / "rviz" / "recon_slam.rviz"
    with pytest.raises(RuntimeError, match="mode"):
        _run(mod, mode="lidar")


def test_replay_launch_plays_the_bag_with_clock_and_sim_time(launch_api):
    mod = _load("replay.launch.py")
    with pytest.raises(RuntimeError, match="bag:="):
        _run(mod)
    node, timer, rviz = _run(mod, bag="/data/run1", rate="2.0")
    overrides = _check_slam_node(node, "rgbd")
    assert overrides["use_sim_time"] is True and overrides["publish_odom_tf"] is True
    remaps = dict(node.kwargs["remappings"])
    assert remaps["image"] == "/camera/image" and remaps["depth"] == "/camera/depth"
    (play,) = timer.kwargs["actions"]
    cmd = play.kwargs["cmd"]
    assert cmd[:4] == ["ros2", "bag", "play", "/data/run1"] and "--clock" in cmd and cmd[cmd.index("--rate") + 1] == "2.0"
    assert rviz.kwargs["parameters"] == [{"use_sim_time": True}]
    assert Path(rviz.kwargs["arguments"][1]).is_file()


def test_launch_files_are_installed_by_setup():
    text = (REPO_ROOT / "setup.py").read_text()
    assert 'glob("launch/*.py")' in text and 'glob("rviz/*.rviz")' in text and 'glob("config/*.yaml")' in text
    for name in ("slam.launch.py", "replay.launch.py"):
        assert (REPO_ROOT / "launch" / name).is_file()


# ------------------------------------------------------------------------------ RViz
def _displays(cfg):
    return cfg["Visualization Manager"]["Displays"]


def test_rviz_config_shows_the_node_outputs_in_the_map_frame():
    cfg = yaml.safe_load((REPO_ROOT / "rviz" / "recon_slam.rviz").read_text())
    assert cfg["Visualization Manager"]["Global Options"]["Fixed Frame"] == "map"
    displays = {d["Class"].split("/")[-1]: d for d in _displays(cfg)}
    for cls in ("TF", "Odometry", "Path", "PointCloud2", "MarkerArray", "Image"):
        assert cls in displays and displays[cls]["Enabled"], cls
    assert displays["PointCloud2"]["Color Transformer"] == "RGB8"
    published = set(output_topics(NODE_NAME))
    inputs = {"/camera/image"}  # the input image as replay.launch.py remaps it
    for d in _displays(cfg):
        topic = d.get("Topic", {}).get("Value") if isinstance(d.get("Topic"), dict) else None
        if topic is None:
            continue
        assert topic in published | inputs, f"RViz display {d['Name']} shows {topic}, which nobody publishes"
    # latched outputs are subscribed transient local so RViz gets them when it starts late
    for cls in ("PointCloud2", "MarkerArray"):
        assert displays[cls]["Topic"]["Durability Policy"] == "Transient Local"
    assert displays["Image"]["Topic"]["Reliability Policy"] == "Best Effort"
    assert displays["Odometry"]["Topic"]["Value"] == "/recon_slam/odometry"
