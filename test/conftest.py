"""Test configuration shared by every test.

NETWORK RULE: anything that may start DDS keeps to the loopback interface with a domain of
its own. This is set here, before any test imports rclpy, not in the user's shell.
"""

import os
from pathlib import Path

os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
os.environ["ROS_LOCALHOST_ONLY"] = "1"
os.environ.setdefault("ROS_DOMAIN_ID", str(100 + os.getpid() % 100))
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
TUM_FR2_DESK_50 = SHARED_DATA / "tum_fr2_desk_50"


@pytest.fixture(scope="session")
def tum_fr2_desk_50() -> Path:
    """Path of the shared real TUM frames; skips the test when the folder is absent."""
    if not (TUM_FR2_DESK_50 / "rgb.txt").is_file():
        pytest.skip(f"shared TUM data not found at {TUM_FR2_DESK_50} (only present inside the team workplace)")
    return TUM_FR2_DESK_50
