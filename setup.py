"""recon_slam: an ament_python ROS 2 package that is also a plain pip package."""

from glob import glob

from setuptools import find_packages, setup

PACKAGE = "recon_slam"

setup(
    name=PACKAGE,
    version="0.1.0",
    description="Real-time ROS 2 SLAM and relocalisation from keyframe pointmaps (MASt3R-SLAM / ACE style)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=[PACKAGE, PACKAGE + ".*"]),
    package_data={PACKAGE: ["py.typed"]},
    data_files=[
        ("share/ament_index/resource_index/packages", ["resource/" + PACKAGE]),
        ("share/" + PACKAGE, ["package.xml"]),
        ("share/" + PACKAGE + "/launch", glob("launch/*.py")),
        ("share/" + PACKAGE + "/config", glob("config/*.yaml")),
        ("share/" + PACKAGE + "/rviz", glob("rviz/*.rviz")),
    ],
    # The one list of Python dependencies (package.xml lists the ROS ones).
    install_requires=[
        "numpy>=1.24",
        "scipy>=1.10",
        "torch>=2.1",
        "opencv-python-headless>=4.8",
        "open3d>=0.18",
        "rosbags>=0.10",
        "evo>=1.28",
        "matplotlib>=3.6",
        "tqdm>=4.60",
        "PyYAML>=6.0",
        "cholespy>=2.0",
    ],
    extras_require={
        "test": [
            "pytest>=7",
            # colcon, to check that the ament_python package builds
            "colcon-core",
            "colcon-ros",
            "colcon-python-setup-py",
            # Real ROS 2 Jazzy rclpy and message packages, published on PyPI for x86_64.
            'ros-jazzy-rclpy[fastrtps]; platform_machine == "x86_64"',
            'ros-jazzy-std-msgs; platform_machine == "x86_64"',
            'ros-jazzy-std-srvs; platform_machine == "x86_64"',
            'ros-jazzy-sensor-msgs; platform_machine == "x86_64"',
            'ros-jazzy-geometry-msgs; platform_machine == "x86_64"',
            'ros-jazzy-nav-msgs; platform_machine == "x86_64"',
            'ros-jazzy-visualization-msgs; platform_machine == "x86_64"',
            'ros-jazzy-diagnostic-msgs; platform_machine == "x86_64"',
            # Triton: the GPU kernels' tests run them on the CPU in its interpreter (CUDA builds
            # of torch already ship it; there the kernels run compiled).
            'triton>=3.2; platform_system == "Linux" and platform_machine == "x86_64"',
        ],
    },
    entry_points={
        "console_scripts": [
            "recon-slam = recon_slam.cli:main",
            "slam_node = recon_slam.ros.slam_node:main",
            "reloc_node = recon_slam.ros.reloc_node:main",
        ],
    },
    zip_safe=True,
)
