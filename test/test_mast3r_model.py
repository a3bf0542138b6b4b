"""Tests of our MASt3R implementation (recon_slam.models.mast3r), CPU only.

The golden and layout tests need the team's reference files in
``../shared/data/mast3r_reference`` and skip when they are absent.
"""

from __future__ import annotations

import argparse
import datetime
from pathlib import Path

import numpy as np
import pytest
import torch

from recon_slam.errors import InputError
from recon_slam.geometry.camera import PinholeCamera
from recon_slam.models.mast3r import (
    VITL_512_ARGS,
    build_model,
    load_mast3r,
    load_spec,
    parse_model_args,
    plan_resize_crop,
    prepare_image,
    read_checkpoint,
    synthetic_state_dict,
    synthetic_state_dict_torch,
)
from recon_slam.models.mast3r.synthetic_weights import synthetic_tensor

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mast3r_reference"

# A very small network of the same family (fast to save / load in the error tests).
MICRO_ARGS = (
    "AsymmetricMASt3R(enc_depth=1, dec_depth=4, enc_embed_dim=32, dec_embed_dim=32, enc_num_heads=2, "
    "dec_num_heads=2, pos_embed='RoPE100', patch_embed_cls='ManyAR_PatchEmbed', img_size=(512, 512), "
    "head_type='catmlp+dpt', output_mode='pts3d+desc24', depth_mode=('exp', -inf, inf), "
    "conf_mode=('exp', 1, inf), two_confs=True, desc_conf_mode=('exp', 0, inf))"
)

GOLDEN_OUTPUTS = (
    "view1_pts3d",
    "view1_conf",
    "view1_desc",
    "view1_desc_conf",
    "view2_pts3d_in_other_view",
    "view2_conf",
    "view2_desc",
    "view2_desc_conf",
)


def _reference() -> Path:
    if not (REFERENCE / "tiny_mast3r_golden.npz").is_file():
        pytest.skip(f"MASt3R reference files not found at {REFERENCE} (only present inside the team workplace)")
    return REFERENCE


def _save_released_format(path: Path, state_dict: dict, args: str) -> Path:
    torch.save({"model": state_dict, "args": argparse.Namespace(model=args)}, path)
    return path


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """The tiny reference network with the synthetic weights, saved like the released file."""
    ref = _reference()
    args, layout = load_spec(ref / "tiny_mast3r_spec.json")
    path = tmp_path_factory.mktemp("mast3r") / "tiny_mast3r.pth"
    return _save_released_format(path, synthetic_state_dict(layout), args)


@pytest.fixture(scope="module")
def tiny_net(tiny_checkpoint):
    return load_mast3r(tiny_checkpoint)


@pytest.fixture(scope="module")
def golden():
    return dict(np.load(_reference() / "tiny_mast3r_golden.npz"))


@pytest.fixture(scope="module")
def micro_state_dict() -> dict:
    model = build_model(MICRO_ARGS, "meta")
    return synthetic_state_dict(model.state_dict())


# ---------------------------------------------------------------------- numerics
def test_tiny_golden_outputs(tiny_net, golden):
    img1, img2 = torch.from_numpy(golden["img1"]), torch.from_numpy(golden["img2"])
    with torch.no_grad():
        tokens1, pos1 = tiny_net.encode(img1)
        pred = tiny_net(img1, img2)
    ours = {
        "enc_feat1": tokens1,
        "view1_pts3d": pred.view1.pts3d,
        "view1_conf": pred.view1.conf,
        "view1_desc": pred.view1.desc,
        "view1_desc_conf": pred.view1.desc_conf,
        "view2_pts3d_in_other_view": pred.view2.pts3d,
        "view2_conf": pred.view2.conf,
        "view2_desc": pred.view2.desc,
        "view2_desc_conf": pred.view2.desc_conf,
    }
    assert pos1.shape == (1, 48, 2) and pos1[0, 9].tolist() == [1, 1]
    report = {}
    for name, value in ours.items():
        ref = golden[name]
        got = value.numpy()
        assert got.shape == ref.shape, name
        assert np.isfinite(got).all(), name
        err = np.abs(got - ref)
        report[name] = float(err.max())
        if name.endswith("conf"):
            rel = err / np.abs(ref)
            assert rel.max() < 1e-4, f"{name}: max relative error {rel.max():.3g}"
        assert err.max() < 1e-4, f"{name}: max abs error {err.max():.3g}"
    print("max abs errors vs golden:", {k: f"{v:.2e}" for k, v in report.items()})


def test_batched_broadcast_and_half_tokens_match(tiny_net, golden):
    img1, img2 = torch.from_numpy(golden["img1"]), torch.from_numpy(golden["img2"])
    with torch.no_grad():
        t1, _ = tiny_net.encode(img1)
        t2, _ = tiny_net.encode(img2)
        # (1, 2) and (2, 1) decoded as one batch of 2: the first is the golden pair
        ab, ba = tiny_net.decode_symmetric(t1, t2, (96, 128))
        # view 2 against [view 1, view 2]: the batch of 1 is broadcast; entry 0 is (2, 1) again
        broadcast = tiny_net.decode(t2, torch.cat((t1, t2)), (96, 128))
        # keyframe tokens cached in half precision
        t2_half, _ = tiny_net.encode(img2, out_dtype=torch.float16)
        approx = tiny_net.decode(t1, t2_half, (96, 128))
    assert t2_half.dtype == torch.float16
    assert ab.view1.pts3d.shape == (1, 96, 128, 3) and broadcast.view2.desc.shape == (2, 96, 128, 24)
    for name, value in (("view1_pts3d", ab.view1.pts3d), ("view2_pts3d_in_other_view", ab.view2.pts3d),
                        ("view1_desc", ab.view1.desc), ("view2_conf", ab.view2.conf)):
        assert np.abs(value.numpy() - golden[name]).max() < 1e-4, name
    for field in ("pts3d", "conf", "desc", "desc_conf"):
        for view in ("view1", "view2"):
            got = getattr(getattr(broadcast, view), field)[0:1]
            torch.testing.assert_close(got, getattr(getattr(ba, view), field), atol=1e-5, rtol=1e-5)
    ref = golden["view2_pts3d_in_other_view"]
    assert np.abs(approx.view2.pts3d.numpy() - ref).max() < 1e-3 * np.abs(ref).max()


def test_portrait_and_bf16_autocast_run(tiny_net, golden):
    img1 = torch.from_numpy(golden["img1"])
    portrait = img1.transpose(-1, -2).contiguous()  # (1, 3, 128, 96)
    with torch.no_grad():
        pred = tiny_net(portrait, portrait)
        assert pred.view1.pts3d.shape == (1, 128, 96, 3) and pred.view2.desc.shape == (1, 128, 96, 24)
        assert torch.isfinite(pred.view1.pts3d).all()
        tiny_net.set_precision(torch.bfloat16)
        try:
            low = tiny_net(img1, torch.from_numpy(golden["img2"]))
        finally:
            tiny_net.set_precision(None)
    assert low.view1.pts3d.dtype == torch.float32
    ref = golden["view1_pts3d"]
    # bf16 has 8 mantissa bits: 2 % of the range (measured about 0.2 %)
    assert np.abs(low.view1.pts3d.numpy() - ref).max() < 0.02 * np.abs(ref).max()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_golden_and_graphs(tiny_checkpoint, golden):
    from recon_slam.models.mast3r.cuda_graphs import capture_frame_step

    net = load_mast3r(tiny_checkpoint, device="cuda")
    img1, img2 = (torch.from_numpy(golden[k]).cuda() for k in ("img1", "img2"))
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.no_grad():
            pred = net(img1, img2)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
    for name, value in (("view1_pts3d", pred.view1.pts3d), ("view2_desc", pred.view2.desc)):
        assert np.abs(value.cpu().numpy() - golden[name]).max() < 1e-4, name
    with torch.no_grad():
        kf_tokens, _ = net.encode(img2, out_dtype=torch.float16)
        step = capture_frame_step(net, (96, 128), n_keyframes=1, amp_dtype=torch.bfloat16)
        tokens, graphed = step(img1, kf_tokens)
        net.set_precision(torch.bfloat16)
        eager = net.decode(net.encode(img1, out_dtype=torch.float16)[0], kf_tokens, (96, 128))
        net.set_precision(None)
    torch.testing.assert_close(graphed.view2.pts3d, eager.view2.pts3d, atol=1e-5, rtol=1e-4)
    ref = golden["view2_pts3d_in_other_view"]
    assert np.abs(graphed.view2.pts3d.cpu().numpy() - ref).max() < 0.1 * np.abs(ref).max()


# ---------------------------------------------------------------------- layout
def test_full_size_layout_matches_release_spec():
    args, layout = load_spec(_reference() / "mast3r_vitl_512_spec.json")
    assert parse_model_args(args) == parse_model_args(VITL_512_ARGS)
    net = build_model(args, "meta")
    ours = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    spec = dict(layout)
    assert len(layout) == 1017
    assert set(ours) == set(spec)
    assert ours == spec
    assert list(ours) == [k for k, _ in layout]  # same order too
    assert all(p.device.type == "meta" for p in net.parameters())
    with torch.no_grad():  # shapes flow through on the meta device (no compute)
        tokens, _ = net.encode(torch.zeros(1, 3, 384, 512, device="meta"), out_dtype=torch.float16)
        pred = net.decode(tokens, tokens.expand(2, -1, -1), (384, 512))
    assert tokens.shape == (1, 768, 1024) and tokens.dtype == torch.float16
    assert pred.view2.pts3d.shape == (2, 384, 512, 3) and pred.view1.desc.shape == (2, 384, 512, 24)
    assert net.token_bytes((384, 512)) == 768 * 1024 * 2


def test_synthetic_weights_recipe():
    # the numpy recipe against an independent scalar evaluation of the README formula
    def scalar(t, i):
        m = (1 << 64) - 1
        z = (i + (t + 1) * 0x9E3779B97F4A7C15) & m
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
        z = z ^ (z >> 31)
        return (z >> 11) / 2**53

    arr = synthetic_tensor(7, "enc_blocks.0.norm1.weight", (5,))
    np.testing.assert_array_equal(arr, np.float32([1 + (scalar(7, i) - 0.5) * 0.2 for i in range(5)]))
    arr = synthetic_tensor(3, "enc_blocks.0.attn.qkv.weight", (2, 3))
    np.testing.assert_array_equal(arr.ravel(), np.float32([(scalar(3, i) - 0.5) * 0.1 for i in range(6)]))
    layout = [("mask_token", (1, 1, 8)), ("enc_norm.weight", (8,)), ("a.b.weight", (3, 70000))]
    ref, fast = synthetic_state_dict(layout), synthetic_state_dict_torch(layout)
    for key in ref:
        assert torch.equal(ref[key], fast[key]), key


# ---------------------------------------------------------------------- checkpoint errors
def test_checkpoint_errors(tmp_path, micro_state_dict):
    good = _save_released_format(tmp_path / "good.pth", micro_state_dict, MICRO_ARGS)
    net = load_mast3r(good)
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    small = {"w": torch.zeros(2)}  # for checks that never reach the model
    # the args as a plain string are accepted too
    torch.save({"model": small, "args": MICRO_ARGS}, tmp_path / "str_args.pth")
    assert read_checkpoint(tmp_path / "str_args.pth")[1] == MICRO_ARGS

    with pytest.raises(InputError, match="not found"):
        load_mast3r(tmp_path / "absent.pth")
    (tmp_path / "garbage.pth").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(InputError, match="not a PyTorch checkpoint"):
        load_mast3r(tmp_path / "garbage.pth")
    (tmp_path / "text.pth").write_text("hello world")
    with pytest.raises(InputError, match="not a PyTorch checkpoint"):
        load_mast3r(tmp_path / "text.pth")
    data = good.read_bytes()
    (tmp_path / "truncated.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="truncated or corrupt"):
        load_mast3r(tmp_path / "truncated.pth")
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(InputError, match="empty"):
        load_mast3r(tmp_path / "empty.pth")

    removed = dict(micro_state_dict)
    del removed["dec_blocks2.3.mlp.fc2.bias"]
    _save_released_format(tmp_path / "removed.pth", removed, MICRO_ARGS)
    with pytest.raises(InputError, match=r"1 missing key\(s\): dec_blocks2\.3\.mlp\.fc2\.bias"):
        load_mast3r(tmp_path / "removed.pth")

    reshaped = dict(micro_state_dict)
    reshaped["decoder_embed.weight"] = torch.zeros(32, 31)
    reshaped["extra.weight"] = torch.zeros(2)
    _save_released_format(tmp_path / "reshaped.pth", reshaped, MICRO_ARGS)
    with pytest.raises(InputError, match=r"shape mismatch.*decoder_embed\.weight \[32, 31\].*\[32, 32\]") as info:
        load_mast3r(tmp_path / "reshaped.pth")
    assert "unexpected key(s): extra.weight" in str(info.value)

    deeper = MICRO_ARGS.replace("enc_depth=1", "enc_depth=2")
    _save_released_format(tmp_path / "other_model.pth", micro_state_dict, deeper)
    with pytest.raises(InputError, match=r"missing key\(s\): enc_blocks\.1\."):
        load_mast3r(tmp_path / "other_model.pth")

    torch.save(micro_state_dict, tmp_path / "bare.pth")
    with pytest.raises(InputError, match="no 'args'"):
        load_mast3r(tmp_path / "bare.pth")
    assert load_mast3r(tmp_path / "bare.pth", model_args=MICRO_ARGS) is not None

    torch.save(
        {"model": small, "args": argparse.Namespace(model=MICRO_ARGS, t=datetime.datetime(2024, 1, 1))},
        tmp_path / "unsafe.pth",
    )
    with pytest.raises(InputError, match=r"refuses \(datetime\.datetime\).*trusted=True"):
        load_mast3r(tmp_path / "unsafe.pth")
    assert read_checkpoint(tmp_path / "unsafe.pth", trusted=True)[1] == MICRO_ARGS

    _save_released_format(tmp_path / "code.pth", small, "AsymmetricMASt3R(enc_depth=__import__('os'))")
    with pytest.raises(InputError, match="not a literal value"):
        load_mast3r(tmp_path / "code.pth")


@pytest.mark.parametrize(
    "bad, message",
    [
        ("os.system('ls')", "not supported"),
        ("AsymmetricMASt3R(enc_depth=eval('1'))", "not a literal"),
        ("AsymmetricMASt3R(head_type='linear', pos_embed='RoPE100')", "head_type"),
        ("AsymmetricMASt3R(pos_embed='cosine', head_type='catmlp+dpt', output_mode='pts3d+desc24')", "pos_embed"),
        ("AsymmetricMASt3R(", "not a valid"),
    ],
)
def test_model_args_rejected(bad, message):
    with pytest.raises(InputError, match=message):
        parse_model_args(bad)


# ---------------------------------------------------------------------- preprocessing
def test_preprocess_640x480_camera_consistent():
    cam = PinholeCamera(640, 480, 520.9, 521.0, 325.1, 249.7)
    u_in = np.arange(640, dtype=np.float64)
    ramp = np.broadcast_to((u_in / 639.0 * 200 + 20)[None, :, None], (480, 640, 3))
    rgb = np.ascontiguousarray(ramp).round().astype(np.uint8)
    prep = prepare_image(rgb, cam)
    assert prep.tensor.shape == (1, 3, 384, 512) and prep.true_shape == (384, 512)
    assert prep.tensor.dtype == torch.float32
    assert -1.0 <= prep.tensor.min() and prep.tensor.max() <= 1.0
    new = prep.camera
    assert (new.width, new.height) == (512, 384)
    np.testing.assert_allclose([new.fx, new.fy], [520.9 * 0.8, 521.0 * 0.8])
    # a 3D point lands on the same normalised image location before and after
    X = torch.tensor([[0.3, -0.2, 2.0], [-1.0, 0.7, 3.5]], dtype=torch.float64)
    uv0, _ = cam.project(X)
    uv1, _ = new.project(X)
    np.testing.assert_allclose((uv1.numpy() + 0.5) / [512, 384], (uv0.numpy() + 0.5) / [640, 480], atol=1e-12)
    # and the image content agrees: the horizontal ramp at prepared pixel u matches the input
    back = prep.geometry.to_input_pixels(np.array([[100.0, 50.0], [400.0, 300.0]]))
    expected = back[:, 0] / 639.0 * 200 + 20
    got = prep.rgb[[50, 300], [100, 400], 0].astype(np.float64)
    np.testing.assert_allclose(got, expected, atol=1.0)


def test_preprocess_crop_to_multiple_of_16():
    cam = PinholeCamera(1000, 700, 800.0, 800.0, 480.0, 360.0)
    geo = plan_resize_crop(1000, 700)
    assert (geo.resized_w, geo.resized_h) == (512, 358)
    assert (geo.width, geo.height) == (512, 352) and (geo.x0, geo.y0) == (0, 3)
    prep = prepare_image(np.zeros((700, 1000, 3), np.uint8), cam)
    assert prep.tensor.shape == (1, 3, 352, 512)
    X = torch.tensor([[0.1, 0.05, 1.5]], dtype=torch.float64)
    uv0, _ = cam.project(X)
    uv1, _ = prep.camera.project(X)
    np.testing.assert_allclose(prep.geometry.to_input_pixels(uv1.numpy()), uv0.numpy(), atol=1e-9)
    with pytest.raises(InputError):
        prepare_image(np.zeros((480, 640, 3), np.uint8), PinholeCamera(320, 240, 300.0, 300.0, 160.0, 120.0))
