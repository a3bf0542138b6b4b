"""Saving and loading maps (versioned, atomic folder format; see :mod:`recon_slam.maps.format`)."""

from recon_slam.maps.format import (
    MAP_FORMAT,
    MAP_VERSION,
    KeyframeData,
    MapData,
    MapError,
    load_map,
    load_relocaliser,
    load_system_map,
    map_from_system,
    restore_into_system,
    save_map,
    save_system_map,
)

__all__ = [
    "MAP_FORMAT",
    "MAP_VERSION",
    "KeyframeData",
    "MapData",
    "MapError",
    "load_map",
    "load_relocaliser",
    "load_system_map",
    "map_from_system",
    "restore_into_system",
    "save_map",
    "save_system_map",
]
