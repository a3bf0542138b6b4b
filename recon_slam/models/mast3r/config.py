"""Hyperparameters of the MASt3R network, read from a checkpoint's constructor string.

A released checkpoint stores how the network was built as a Python call, e.g.
``AsymmetricMASt3R(enc_depth=24, dec_depth=12, ..., depth_mode=('exp', -inf, inf))``.
:func:`parse_model_args` reads such a string with a small literal-only evaluator of the
syntax tree (numbers, strings, tuples, lists, ``True``/``False``/``None``, ``inf``/``nan``,
unary minus and ``float('inf')``): nothing in the string is ever executed.
"""

from __future__ import annotations

import ast
import math
import re
from dataclasses import dataclass, field
from typing import Any

from recon_slam.errors import InputError

#: Constructor string of the released ``MASt3R_ViTLarge_BaseDecoder_512_catmlpdpt_metric`` model.
VITL_512_ARGS = (
    "AsymmetricMASt3R(enc_depth=24, dec_depth=12, enc_embed_dim=1024, dec_embed_dim=768, "
    "enc_num_heads=16, dec_num_heads=12, pos_embed='RoPE100', patch_embed_cls='ManyAR_PatchEmbed', "
    "img_size=(512, 512), head_type='catmlp+dpt', output_mode='pts3d+desc24', "
    "depth_mode=('exp', -inf, inf), conf_mode=('exp', 1, inf), two_confs=True, "
    "desc_conf_mode=('exp', 0, inf))"
)

_MODEL_CLASSES = ("AsymmetricMASt3R",)
# Keywords that only matter for training (or are fixed in this implementation) and are accepted
# without effect on inference.
_IGNORED_KEYWORDS = ("freeze", "landscape_only", "mask_ratio", "img_size", "patch_embed_cls")
_PATCH_EMBED_CLASSES = ("ManyAR_PatchEmbed", "PatchEmbedDust3R")
_DEPTH_MODES = ("exp", "linear", "square")
_CONF_MODES = ("exp", "sigmoid")


@dataclass(frozen=True)
class MASt3RConfig:
    """Architecture of an asymmetric MASt3R network (ViT encoder, two-branch decoder, heads).

    Attributes:
        enc_depth, enc_embed_dim, enc_num_heads: ViT encoder blocks, width and heads.
        dec_depth, dec_embed_dim, dec_num_heads: decoder blocks (per branch), width and heads.
        mlp_ratio: hidden width of every transformer MLP relative to its block width.
        patch_size: square patch size in pixels (images must be multiples of it).
        rope_base: frequency base of the 2D rotary position embedding (``RoPE100`` -> 100).
        norm_eps: epsilon of every LayerNorm.
        norm_mem_in_decoder: decoder blocks normalise the other view's tokens (``norm_y``).
        desc_dim: local descriptor size (``pts3d+desc24`` -> 24).
        two_confs: the descriptor head predicts its own confidence channel.
        depth_mode, conf_mode, desc_conf_mode: ``(kind, vmin, vmax)`` output activations.
        dpt_feature_dim, dpt_layer_dims: widths inside the DPT point head.
        img_size, patch_embed_cls: as written in the constructor string (informative).
        args: the constructor string this config came from (``""`` when built by hand).
    """

    enc_depth: int = 24
    enc_embed_dim: int = 1024
    enc_num_heads: int = 16
    dec_depth: int = 12
    dec_embed_dim: int = 768
    dec_num_heads: int = 12
    mlp_ratio: float = 4.0
    patch_size: int = 16
    rope_base: float = 100.0
    norm_eps: float = 1e-6
    norm_mem_in_decoder: bool = True
    desc_dim: int = 24
    two_confs: bool = True
    depth_mode: tuple = ("exp", -math.inf, math.inf)
    conf_mode: tuple = ("exp", 1.0, math.inf)
    desc_conf_mode: tuple = ("exp", 0.0, math.inf)
    dpt_feature_dim: int = 256
    dpt_layer_dims: tuple = (96, 192, 384, 768)
    img_size: tuple = (512, 512)
    patch_embed_cls: str = "ManyAR_PatchEmbed"
    args: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        for name in ("enc", "dec"):
            dim, heads = getattr(self, f"{name}_embed_dim"), getattr(self, f"{name}_num_heads")
            if heads <= 0 or dim % heads or (dim // heads) % 4:
                raise InputError(
                    f"model args: {name}_embed_dim={dim} must be divisible by {name}_num_heads={heads} "
                    "into heads whose size is a multiple of 4 (2D rotary embedding); check the constructor string"
                )
        if self.dec_depth < 4:
            raise InputError(f"model args: dec_depth={self.dec_depth} is too small for the DPT head (needs >= 4)")
        if self.depth_mode[0] not in _DEPTH_MODES or self.conf_mode[0] not in _CONF_MODES:
            raise InputError(
                f"model args: depth_mode {self.depth_mode} / conf_mode {self.conf_mode} not supported "
                f"(depth: {', '.join(_DEPTH_MODES)}; confidence: {', '.join(_CONF_MODES)})"
            )
        if self.desc_conf_mode[0] not in _CONF_MODES:
            raise InputError(f"model args: desc_conf_mode {self.desc_conf_mode} not supported")

    # ------------------------------------------------------------------ derived sizes
    @property
    def dpt_hooks(self) -> tuple[int, int, int, int]:
        """Indices into [encoder tokens, decoder block 1 .. dec_depth] fed to the DPT head."""
        d = self.dec_depth
        return (0, d * 2 // 4, d * 3 // 4, d)

    @property
    def enc_head_dim(self) -> int:
        """Channels per encoder attention head."""
        return self.enc_embed_dim // self.enc_num_heads

    @property
    def dec_head_dim(self) -> int:
        """Channels per decoder attention head."""
        return self.dec_embed_dim // self.dec_num_heads

    @classmethod
    def from_args(cls, args: str) -> "MASt3RConfig":
        """Config from a constructor string such as :data:`VITL_512_ARGS` (see :func:`parse_model_args`)."""
        return parse_model_args(args)


# ---------------------------------------------------------------------- literal evaluator
_NAMED_CONSTANTS = {"inf": math.inf, "nan": math.nan, "True": True, "False": False, "None": None}


def _literal(node: ast.AST, source: str) -> Any:
    """Value of a literal syntax node; anything else raises :class:`InputError`."""
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float, str, bool, type(None))):
        return node.value
    if isinstance(node, (ast.Tuple, ast.List)):
        values = [_literal(e, source) for e in node.elts]
        return tuple(values) if isinstance(node, ast.Tuple) else values
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _literal(node.operand, source)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.Name) and node.id in _NAMED_CONSTANTS:
        return _NAMED_CONSTANTS[node.id]
    if isinstance(node, ast.Attribute) and node.attr in ("inf", "nan") and isinstance(node.value, ast.Name):
        if node.value.id in ("math", "np", "numpy", "torch"):
            return _NAMED_CONSTANTS[node.attr]
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id == "float"
        and len(node.args) == 1
        and not node.keywords
    ):
        value = _literal(node.args[0], source)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            try:
                return float(value)
            except ValueError:
                pass
    segment = ast.get_source_segment(source, node) or type(node).__name__
    raise InputError(
        f"model args: {segment!r} is not a literal value; the constructor string may only hold numbers, "
        "strings, tuples, True/False/None and inf (nothing is executed)"
    )


def _mode(value: Any, name: str) -> tuple:
    if value is None:
        return None  # type: ignore[return-value]
    if not (isinstance(value, (tuple, list)) and len(value) == 3 and isinstance(value[0], str)):
        raise InputError(f"model args: {name}={value!r} must be a tuple (kind, vmin, vmax)")
    return (value[0], float(value[1]), float(value[2]))


def parse_model_args(args: str) -> MASt3RConfig:
    """Parse a constructor string ``AsymmetricMASt3R(key=value, ...)`` into a :class:`MASt3RConfig`.

    Only keyword arguments with literal values are accepted; the string is never executed.
    Unsupported heads / embeddings raise :class:`InputError` naming the value.
    """
    if not isinstance(args, str) or not args.strip():
        raise InputError("model args: expected a constructor string like 'AsymmetricMASt3R(enc_depth=24, ...)'")
    source = args.strip()
    try:
        tree = ast.parse(source, mode="eval")
    except SyntaxError as exc:
        raise InputError(f"model args {source[:80]!r}... is not a valid constructor call ({exc.msg})") from None
    call = tree.body
    if not isinstance(call, ast.Call) or not isinstance(call.func, (ast.Name, ast.Attribute)):
        raise InputError(f"model args {source[:80]!r} is not a call like 'AsymmetricMASt3R(...)'")
    class_name = call.func.id if isinstance(call.func, ast.Name) else call.func.attr
    if class_name not in _MODEL_CLASSES:
        raise InputError(
            f"model args build {class_name!r}, which is not supported: only {', '.join(_MODEL_CLASSES)} "
            "checkpoints (MASt3R) can be loaded"
        )
    if call.args:
        raise InputError(f"model args: positional arguments are not supported in {source[:80]!r}")
    kw: dict[str, Any] = {}
    for keyword in call.keywords:
        if keyword.arg is None:
            raise InputError("model args: '**kwargs' is not supported in the constructor string")
        kw[keyword.arg] = _literal(keyword.value, source)

    out: dict[str, Any] = {"args": source}
    for name in ("enc_depth", "dec_depth", "enc_embed_dim", "dec_embed_dim", "enc_num_heads", "dec_num_heads"):
        if name in kw:
            out[name] = int(kw.pop(name))
    # Defaults of the constructor when a keyword is absent (CroCo-family base values).
    out.setdefault("enc_depth", 12)
    out.setdefault("enc_embed_dim", 768)
    out.setdefault("enc_num_heads", 12)
    out.setdefault("dec_depth", 8)
    out.setdefault("dec_embed_dim", 512)
    out.setdefault("dec_num_heads", 16)
    if "mlp_ratio" in kw:
        out["mlp_ratio"] = float(kw.pop("mlp_ratio"))
    if "patch_size" in kw:
        out["patch_size"] = int(kw.pop("patch_size"))
    if "norm_im2_in_dec" in kw:
        out["norm_mem_in_decoder"] = bool(kw.pop("norm_im2_in_dec"))

    pos_embed = kw.pop("pos_embed", "cosine")
    match = re.fullmatch(r"RoPE(\d+(?:\.\d*)?)", str(pos_embed))
    if match is None:
        raise InputError(
            f"model args: pos_embed={pos_embed!r} is not supported (only rotary embeddings 'RoPE<base>', "
            "as in every released MASt3R model)"
        )
    out["rope_base"] = float(match.group(1))

    head_type = kw.pop("head_type", "linear")
    output_mode = str(kw.pop("output_mode", "pts3d"))
    if head_type != "catmlp+dpt" or not re.fullmatch(r"pts3d\+desc\d+", output_mode):
        raise InputError(
            f"model args: head_type={head_type!r} with output_mode={output_mode!r} is not supported "
            "(only head_type='catmlp+dpt' with output_mode='pts3d+desc<N>', the released MASt3R heads)"
        )
    out["desc_dim"] = int(output_mode[len("pts3d+desc"):])

    patch_cls = kw.get("patch_embed_cls", "PatchEmbedDust3R")
    if patch_cls not in _PATCH_EMBED_CLASSES:
        raise InputError(f"model args: patch_embed_cls={patch_cls!r} is not supported")
    out["patch_embed_cls"] = patch_cls
    if "img_size" in kw:
        size = kw["img_size"]
        out["img_size"] = tuple(size) if isinstance(size, (tuple, list)) else (int(size), int(size))

    out["depth_mode"] = _mode(kw.pop("depth_mode", ("exp", -math.inf, math.inf)), "depth_mode")
    conf_mode = _mode(kw.pop("conf_mode", ("exp", 1, math.inf)), "conf_mode")
    if conf_mode is None:
        raise InputError("model args: conf_mode=None (a network without confidence) is not supported")
    out["conf_mode"] = conf_mode
    out["two_confs"] = bool(kw.pop("two_confs", False))
    desc_conf = kw.pop("desc_conf_mode", None)
    out["desc_conf_mode"] = conf_mode if desc_conf is None else _mode(desc_conf, "desc_conf_mode")
    desc_mode = kw.pop("desc_mode", "norm")
    if "norm" not in str(desc_mode):
        raise InputError(f"model args: desc_mode={desc_mode!r} is not supported (only 'norm')")

    for name in _IGNORED_KEYWORDS:
        kw.pop(name, None)
    if kw:
        raise InputError(
            f"model args: unknown keyword(s) {', '.join(sorted(kw))} in {source[:80]!r}...; this is not a "
            "checkpoint layout this implementation knows"
        )
    return MASt3RConfig(**out)
