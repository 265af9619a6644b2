"""Full-integer LiteRT: the exact graph rewrite, the delegation census and the per-tensor error trace."""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("litert_torch")
pytest.importorskip("ai_edge_litert")

from castling_deploy.models import create_model  # noqa: E402
from castling_deploy.runtime.litert import LiteRTRunner  # noqa: E402
from castling_deploy.targets.tflite.census import delegation_census  # noqa: E402
from castling_deploy.targets.tflite.convert import convert_tflite, tflite_census  # noqa: E402
from castling_deploy.targets.tflite.full_integer import (  # noqa: E402
    SplitStreamViT,
    best_clip,
    max_abs_logit_diff,
    min_max_qsvs,
    mse_clip_ranges,
    quantizable_copy,
)
from castling_deploy.targets.tflite.trace import first_loss, keeping_interpreter, trace_tensors  # noqa: E402

from .conftest import image_like, sqnr_db  # noqa: E402


@pytest.fixture(scope="module")
def nano() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("castling_nano", form="deploy").eval()


def test_split_stream_rewrite_is_exact(nano) -> None:
    rewritten, notes = quantizable_copy(nano)
    assert isinstance(rewritten, SplitStreamViT) and len(notes) == 2
    assert max_abs_logit_diff(nano, rewritten, image_like(8, 32, 3)) < 1e-5


def test_best_clip_cuts_a_one_sided_tail_and_keeps_a_uniform_range() -> None:
    # 1M values in [-1, 1] and one at 20: min/max spends the int8 grid on the outlier. Squared error of
    # keeping [-1, 20t]: (20 - 20t)^2 for the outlier + 1e6 * ((1 + 20t) / 255)^2 / 12 for the body: t ~ 0.4
    body = np.histogram(np.linspace(-1, 1, 10_000), bins=2048, range=(-1.0, 20.0))[0] * 100
    tail = body + np.histogram([20.0], bins=2048, range=(-1.0, 20.0))[0]
    t_lo, t_hi, err, full = best_clip(tail, -1.0, 20.0, symmetric=False)
    assert t_lo >= 0.95 and 0.3 <= t_hi <= 0.5  # the tail end is cut, the other (nearly) kept
    assert err < full / 2
    flat = np.histogram(np.linspace(0, 1, 10_000), bins=2048, range=(0.0, 1.0))[0]
    assert best_clip(flat, 0.0, 1.0, symmetric=False)[:2] == (1.0, 1.0)
    s_lo, s_hi, s_err, s_full = best_clip(tail, -1.0, 20.0, symmetric=True)  # one fraction for both ends
    assert s_lo == s_hi <= 0.5 and s_err < s_full / 2 and s_err > err  # 127 levels a side cost more


def test_mse_ranges_narrow_activations_but_not_rsqrt_inputs(nano) -> None:
    from ai_edge_litert.interpreter import Interpreter

    rewritten, _ = quantizable_copy(nano)
    from castling_deploy.targets.tflite.convert import _convert_float

    fp32 = _convert_float(rewritten, 32)
    calib = image_like(8, 32, 1)
    qsvs = min_max_qsvs(fp32, calib)
    out, summary = mse_clip_ranges(keeping_interpreter(fp32), qsvs, calib)
    interp = Interpreter(model_content=fp32)
    names = {d["index"]: d["name"] for d in interp.get_tensor_details()}
    rsqrt_in = {names[i] for o in interp._get_ops_details() if o["op_name"] == "RSQRT" for i in o["inputs"]}
    assert rsqrt_in and all(out[n] is qsvs[n] for n in rsqrt_in if n in qsvs)
    narrowed = [n for n in out if out[n] is not qsvs[n]]
    assert len(narrowed) == summary["clipped"] > 10 and summary["tensors"] > summary["clipped"]
    for n in narrowed:  # each end scaled towards 0 by a kept fraction in [0.25, 1], at least one below 1
        lo, hi = float(np.min(qsvs[n]["min"])), float(np.max(qsvs[n]["max"]))
        t_lo = float(np.min(out[n]["min"])) / lo if lo else 1.0
        t_hi = float(np.max(out[n]["max"])) / hi if hi else 1.0
        assert 0.25 - 1e-6 <= min(t_lo, t_hi) and max(t_lo, t_hi) <= 1.0 + 1e-6 and min(t_lo, t_hi) < 1.0


def test_delegation_census_fp32_all_on_xnnpack(nano, tmp_path) -> None:
    path = tmp_path / "nano.tflite"
    convert_tflite(nano, path, mode="fp32", calib_images=None, img_size=32)
    census = delegation_census(path, runs=2)
    assert census["ops_on_builtin"] == 0 and census["ops_on_xnnpack"] == census["ops_total"] > 50
    assert census["xnnpack_partitions"] == 1 and census["builtin_ops"] == {}
    assert census["timing"]["p50_ms_with_xnnpack"] > 0 and census["timing"]["p50_ms_builtin_only"] > 0


@pytest.mark.slow
def test_full_integer_trace_and_census_on_nano(nano, tmp_path) -> None:
    calib, held = image_like(32, 32, 1), image_like(8, 32, 2)
    fp32, fi = tmp_path / "fp32.tflite", tmp_path / "fi.tflite"
    convert_tflite(nano, fp32, mode="fp32", calib_images=None, img_size=32)
    info = convert_tflite(nano, fi, mode="full_integer", calib_images=calib, img_size=32, class_token_int16=False)
    assert any("own residual tensor" in n for n in info["notes"])
    rows = trace_tensors(info.pop("float_twin"), fi, held[:2])
    assert len(rows) > 50 and {r["dtype"] for r in rows} >= {"int8"}
    assert rows[-1]["sqnr_db"] > 15 and (first_loss(rows, -100.0) is None)
    census = delegation_census(fi, runs=0)
    assert census["ops_total"] == census["ops_on_xnnpack"] + census["ops_on_builtin"]
    # issue 14: only the ops XNNPACK has no int8 kernel for are left on builtin kernels (--strict-int8)
    assert set(census["builtin_ops"]) <= {"RSQRT", "GELU"}, census["builtin_ops"]


def _int16_tensors(path) -> list[dict]:
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=str(path))
    return [d for d in interp.get_tensor_details() if d["dtype"] == np.int16]


def test_class_token_path_16x8_on_nano(nano, tmp_path) -> None:
    """Default full-integer: the single-token ops (class stream) get int16 activations, nothing else does, no float
    tensor appears, and the logits get closer to the fp32 .tflite than with --strict-int8."""
    calib, held = image_like(64, 32, 1), image_like(128, 32, 2)
    paths = {k: tmp_path / f"{k}.tflite" for k in ("fp32", "default", "strict")}
    convert_tflite(nano, paths["fp32"], mode="fp32", calib_images=None, img_size=32)
    info = convert_tflite(nano, paths["default"], mode="full_integer", calib_images=calib, img_size=32)
    strict = convert_tflite(nano, paths["strict"], mode="full_integer", calib_images=calib, img_size=32,
                            class_token_int16=False)
    # nano (depth 4): per block the class stream's 2 residual ADDs (the first block's first one adds a constant and
    # is folded into proj's bias), 2 LayerNorms, proj, fc1, GELU, fc2
    ops = info["activation_ranges"]["int16_ops"]
    assert ops["ADD"] == 7 and ops["GELU"] == 4 and ops["FULLY_CONNECTED"] >= 12, ops
    assert strict["activation_ranges"]["int16_ops"] == {} and not _int16_tensors(paths["strict"])
    int16 = _int16_tensors(paths["default"])
    assert len(int16) >= sum(ops.values())
    assert all(all(int(d) == 1 for d in t["shape"][:-1]) for t in int16), [t["shape"] for t in int16]
    for k in ("default", "strict"):
        c = tflite_census(paths[k])
        assert c["float_activation_tensors_excluding_io"] == 0 and c["io_dtypes"]["outputs"] == ["float32"]
    ref = LiteRTRunner(paths["fp32"]).run(held)
    default, strict_out = LiteRTRunner(paths["default"]).run(held), LiteRTRunner(paths["strict"]).run(held)
    # measured 24.5 vs 23.0 dB (nano@32, these 128 image-like inputs)
    assert sqnr_db(ref, default) >= sqnr_db(ref, strict_out) + 1.0


@pytest.mark.slow
def test_deit_tiny_full_integer_accuracy(tmp_path) -> None:
    """#16 acceptance: clean castling_deit_tiny full-integer vs its own fp32 .tflite, image-like inputs."""
    torch.manual_seed(0)
    model = create_model("castling_deit_tiny", form="deploy", img_size=224).eval()
    calib, held = image_like(64, 224, 1), image_like(128, 224, 7)
    fp32, fi, strict = tmp_path / "fp32.tflite", tmp_path / "fi.tflite", tmp_path / "strict.tflite"
    convert_tflite(model, fp32, mode="fp32", calib_images=None, img_size=224)
    convert_tflite(model, fi, mode="full_integer", calib_images=calib, img_size=224)
    convert_tflite(model, strict, mode="full_integer", calib_images=calib, img_size=224, class_token_int16=False)
    ref = LiteRTRunner(fp32, threads=2).run(held)
    out, out_strict = LiteRTRunner(fi, threads=2).run(held), LiteRTRunner(strict, threads=2).run(held)
    # Issue goal: >= 22 dB and agreement >= 0.9. Measured on these 128 inputs: class-token path 16x8 (default)
    # 26.58 dB / 0.930; --strict-int8 (every activation int8: split stream, MSE clips, per-stream proj, folded
    # requantizations) 23.36 dB / 0.844 (before the rewrites: 7.1 dB / 0.31).
    assert sqnr_db(ref, out) >= 26.0
    assert (ref.argmax(1) == out.argmax(1)).mean() >= 0.9
    assert sqnr_db(ref, out_strict) >= 23.0
    assert (ref.argmax(1) == out_strict.argmax(1)).mean() >= 0.8
