"""Read MASt3R checkpoints safely and build the network from them.

The released files are ``torch.save`` dicts ``{"model": state_dict, "args": Namespace}``
where ``args.model`` is the constructor string (see :mod:`config`). They are read with
``torch.load(weights_only=True)`` with only :class:`argparse.Namespace` allowed beyond
tensors and plain containers; nothing else in the pickle is executed unless the caller
passes ``trusted=True`` for a file it trusts.

Every problem (missing file, not a checkpoint, truncated or corrupt, a different model,
missing / unexpected keys, shape mismatch) raises :class:`recon_slam.errors.InputError`
whose message names the problem and the fix.
"""

from __future__ import annotations

import argparse
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any, Mapping

import torch

from recon_slam.errors import InputError
from recon_slam.models.mast3r.config import MASt3RConfig, parse_model_args
from recon_slam.models.mast3r.network import MASt3RNet

RELEASED_NAME = "MASt3R_ViTLarge_BaseDecoder_512_catmlpdpt_metric.pth"
_FIX_DOWNLOAD = (
    f"download the released {RELEASED_NAME} again (about 2.6 GB) and give its path"
)
_SAFE_GLOBALS = [argparse.Namespace]
_LIST_LIMIT = 5


def _short(items: list[str]) -> str:
    head = ", ".join(items[:_LIST_LIMIT])
    return head + (f", ... ({len(items) - _LIST_LIMIT} more)" if len(items) > _LIST_LIMIT else "")


# Inert classes a released file's ``args`` may hold besides plain containers; allowed by name
# only when the checkpoint actually references them.
_INERT_GLOBALS = {
    "pathlib.Path": ("pathlib", "Path"),
    "pathlib.PosixPath": ("pathlib", "PosixPath"),
    "pathlib.PurePosixPath": ("pathlib", "PurePosixPath"),
    "pathlib.WindowsPath": ("pathlib", "WindowsPath"),
    "pathlib.PureWindowsPath": ("pathlib", "PureWindowsPath"),
    "builtins.set": ("builtins", "set"),
    "builtins.frozenset": ("builtins", "frozenset"),
    "builtins.slice": ("builtins", "slice"),
    "numpy.dtype": ("numpy", "dtype"),
    "numpy.core.multiarray.scalar": ("numpy.core.multiarray", "scalar"),
    "numpy._core.multiarray.scalar": ("numpy._core.multiarray", "scalar"),
}


def _inert_global(name: str) -> Any | None:
    """The class/function named ``name`` if it is on the inert list (numpy dtype classes too)."""
    import importlib

    if name in _INERT_GLOBALS:
        module, attr = _INERT_GLOBALS[name]
    elif re.fullmatch(r"numpy\.dtypes\.\w+DType", name):
        module, attr = name.rsplit(".", 1)
    else:
        return None
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError):
        return None


class _UnsafeObjects(Exception):
    """The file references globals outside the allowed list (names in ``args[0]``)."""


def _torch_load(path: Path, trusted: bool) -> Any:
    """``torch.load`` on CPU: memory-mapped when possible, weights-only unless ``trusted``."""
    allowed = list(_SAFE_GLOBALS)

    def load() -> Any:
        with torch.serialization.safe_globals(allowed):
            if zipfile.is_zipfile(path):
                try:
                    return torch.load(path, map_location="cpu", weights_only=not trusted, mmap=True)
                except RuntimeError as exc:
                    if "mmap" not in str(exc):
                        raise
            return torch.load(path, map_location="cpu", weights_only=not trusted)

    try:
        return load()
    except pickle.UnpicklingError as exc:
        if trusted or "Unsupported global" not in str(exc):
            raise
    # restricted fallback: allow the referenced globals only if every one of them is inert
    names: list[str] = []
    getter = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    if getter is not None:
        try:
            names = list(getter(path))
        except Exception:  # noqa: BLE001 - fall back to the name in the error message
            names = []
    if not names:
        try:
            load()
        except pickle.UnpicklingError as exc:
            names = re.findall(r"GLOBAL ([\w.]+)", str(exc))
    resolved = {n: _inert_global(n) for n in names}
    refused = [n for n, obj in resolved.items() if obj is None and n != "argparse.Namespace"]
    if refused or not names:
        raise _UnsafeObjects(refused or ["<unknown>"])
    allowed.extend(obj for obj in resolved.values() if obj is not None)
    return load()


def read_checkpoint(path: str | Path, trusted: bool = False) -> tuple[dict[str, torch.Tensor], str | None]:
    """Read a checkpoint file.

    Args:
        path: a ``torch.save`` file holding ``{"model": state_dict, "args": ...}`` (or a bare
            state_dict).
        trusted: allow arbitrary pickled objects (only for files you trust).

    Returns:
        (state_dict with CPU tensors, constructor string or ``None`` when the file has none).
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise InputError(f"MASt3R checkpoint {path} not found: {_FIX_DOWNLOAD}")
    if not path.is_file():
        raise InputError(f"MASt3R checkpoint {path} is not a file: give the path of the .pth file itself")
    size = path.stat().st_size
    if size == 0:
        raise InputError(f"MASt3R checkpoint {path} is empty (0 bytes): {_FIX_DOWNLOAD}")
    try:
        data = _torch_load(path, trusted)
    except _UnsafeObjects as exc:
        raise InputError(
            f"MASt3R checkpoint {path} holds Python objects that a safe load refuses ({_short(exc.args[0])}); "
            f"if you trust this file, load it with trusted=True, otherwise use the released {RELEASED_NAME}"
        ) from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, KeyError,
            IndexError, AttributeError, TypeError) as exc:
        text = str(exc).strip()
        if "WeightsUnpickler error:" in text:
            text = text.split("WeightsUnpickler error:", 1)[1].strip()
        text = text.splitlines()[0] if text else type(exc).__name__
        with path.open("rb") as f:
            zip_header = f.read(4) == b"PK\x03\x04"
        what = "truncated or corrupt" if (zip_header or isinstance(exc, EOFError)) else "not a PyTorch checkpoint"
        raise InputError(
            f"MASt3R checkpoint {path} ({size} bytes) is {what} ({type(exc).__name__}: {text[:160]}): "
            f"{_FIX_DOWNLOAD}"
        ) from None

    if isinstance(data, Mapping) and "model" in data and isinstance(data["model"], Mapping):
        state_dict, args = data["model"], data.get("args")
    elif isinstance(data, Mapping) and data and all(isinstance(v, torch.Tensor) for v in data.values()):
        state_dict, args = data, None  # a bare state_dict
    else:
        keys = list(data.keys())[:8] if isinstance(data, Mapping) else type(data).__name__
        raise InputError(
            f"MASt3R checkpoint {path} has no 'model' state_dict (found {keys}): it is not a MASt3R "
            f"checkpoint; {_FIX_DOWNLOAD}"
        )
    bad = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise InputError(f"MASt3R checkpoint {path}: entries {_short(bad)} of 'model' are not tensors; {_FIX_DOWNLOAD}")
    state_dict = dict(state_dict)
    if state_dict and all(k.startswith("module.") for k in state_dict):
        state_dict = {k[len("module."):]: v for k, v in state_dict.items()}  # saved from DataParallel
    return state_dict, _args_string(args)


def _args_string(args: Any) -> str | None:
    """Constructor string from ``args`` (object with ``.model``, mapping with ``model``, or str)."""
    if args is None:
        return None
    if isinstance(args, str):
        return args
    if isinstance(args, Mapping):
        value = args.get("model")
    else:
        value = getattr(args, "model", None)
    return value if isinstance(value, str) else None


def check_state_dict(
    model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], source: str = "checkpoint"
) -> None:
    """Raise :class:`InputError` unless ``state_dict`` has exactly the keys and shapes of ``model``."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state_dict.items()}
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    mismatched = [
        f"{k} {list(got[k])} (model expects {list(expected[k])})"
        for k in expected
        if k in got and got[k] != expected[k]
    ]
    not_float = [k for k, v in state_dict.items() if k in expected and not v.is_floating_point()]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_short(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {_short(unexpected)}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es): {_short(mismatched)}")
    if not_float:
        problems.append(f"{len(not_float)} non-floating tensor(s): {_short(not_float)}")
    if problems:
        raise InputError(
            f"{source} does not match the network built from its args ({'; '.join(problems)}): it is another "
            f"model or a modified file; use the released {RELEASED_NAME} (or give the matching model args)"
        )


def build_model(args: str | MASt3RConfig, device: str | torch.device = "meta") -> MASt3RNet:
    """Network for a constructor string or config, built on ``device`` (``meta``: no memory)."""
    cfg = args if isinstance(args, MASt3RConfig) else parse_model_args(args)
    with torch.device(device):
        return MASt3RNet(cfg)


def load_mast3r(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    model_args: str | None = None,
    trusted: bool = False,
) -> MASt3RNet:
    """Load a MASt3R checkpoint into a ready-to-run network (eval mode, no gradients).

    Args:
        path: checkpoint file (see :func:`read_checkpoint`).
        device, dtype: where and in which dtype to keep the weights (keep float32 and use
            ``net.set_precision(torch.bfloat16)`` for mixed precision on CUDA).
        model_args: constructor string to use when the file has none (or to override it).
        trusted: allow arbitrary pickled objects in the file.
    """
    state_dict, file_args = read_checkpoint(path, trusted=trusted)
    args = model_args or file_args
    if args is None:
        raise InputError(
            f"MASt3R checkpoint {path} has no 'args' constructor string: give model_args, e.g. "
            "recon_slam.models.mast3r.VITL_512_ARGS for the released ViT-L model"
        )
    try:
        model = build_model(args, "meta")
    except InputError as exc:
        raise InputError(f"MASt3R checkpoint {path}: {exc}") from None
    check_state_dict(model, state_dict, source=f"MASt3R checkpoint {path}")
    # assign=True keeps the (memory-mapped) tensors instead of copying into meta storage; aliased
    # modules (dpt.scratch.layer{i}_rn / layer_rn.{i-1}) take the value loaded last, layer_rn.
    model.load_state_dict(state_dict, strict=True, assign=True)
    model = model.to(device=device, dtype=dtype)
    model.requires_grad_(False)
    return model.eval()


def save_checkpoint(path: str | Path, state_dict: Mapping[str, torch.Tensor], args: str) -> Path:
    """Write ``{"model": state_dict, "args": Namespace(model=args)}`` like the released files."""
    path = Path(path)
    torch.save({"model": dict(state_dict), "args": argparse.Namespace(model=args)}, path)
    return path
