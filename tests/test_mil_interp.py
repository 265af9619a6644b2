"""Unit tests of the MIL reference interpreter's op semantics against torch, and of its package reader."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from castling_deploy.runtime.mil_interp import OPS


@pytest.fixture
def _r():
    """Seeded normal float32 arrays, a fresh generator per test (results never depend on which tests ran before)."""
    rng = np.random.default_rng(0)
    return lambda *shape: rng.standard_normal(shape).astype(np.float32)


def _onnx_conv(x: np.ndarray, w: np.ndarray, **attrs) -> np.ndarray:
    """Reference: ONNX Runtime's Conv (SAME_UPPER = TensorFlow/MIL "same": the extra pad goes at the end)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    g = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], **attrs)], "conv",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(w, "w")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    m.ir_version = 9
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def test_conv_matches_torch_custom_pad_groups_and_stride(_r) -> None:
    x, w, b = _r(2, 4, 13, 7), _r(4, 1, 9, 1), _r(4)
    y = OPS["conv"](x=x, weight=w, bias=b, strides=np.array([1, 1]), pad_type="custom",
                    pad=np.array([4, 4, 0, 0]), dilations=np.array([1, 1]), groups=4)
    ref = F.conv2d(torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(b), padding=(4, 0), groups=4).numpy()
    assert np.abs(y - ref).max() < 1e-5
    x2, w2 = _r(1, 3, 32, 32), _r(8, 3, 4, 4)
    y2 = OPS["conv"](x=x2, weight=w2, strides=np.array([4, 4]), pad_type="valid")
    assert np.abs(y2 - F.conv2d(torch.from_numpy(x2), torch.from_numpy(w2), stride=4).numpy()).max() < 1e-5



@pytest.mark.parametrize("pad_type,auto_pad", [("same", "SAME_UPPER"), ("same_lower", "SAME_LOWER")])
@pytest.mark.parametrize("hw,stride,dil", [((32, 32), 2, 2), ((11, 14), 3, 1), ((10, 10), 2, 3)])
def test_conv_same_padding_by_value(_r, pad_type: str, auto_pad: str, hw, stride: int, dil: int) -> None:
    """Odd sizes, strides and dilations where the total padding is odd, so where the extra row/column goes
    (end for "same", start for "same_lower") changes the values, not only the shape."""
    x, w = _r(1, 3, *hw), _r(5, 3, 3, 3)
    y = OPS["conv"](x=x, weight=w, strides=np.array([stride, stride]), pad_type=pad_type,
                    dilations=np.array([dil, dil]))
    # ORT has no dilation with auto_pad; a dilated kernel is the plain kernel with dil-1 zeros between taps
    wd = np.zeros((5, 3, 2 * dil + 1, 2 * dil + 1), np.float32)
    wd[:, :, ::dil, ::dil] = w
    ref = _onnx_conv(x, wd, auto_pad=auto_pad, strides=[stride, stride])
    assert y.shape == ref.shape == (1, 5, -(-hw[0] // stride), -(-hw[1] // stride))
    assert np.abs(y - ref).max() < 1e-5


def test_linear_and_matmul_match_torch(_r) -> None:
    x, w, b = _r(2, 5, 8), _r(6, 8), _r(6)
    assert np.abs(OPS["linear"](x=x, weight=w, bias=b) - F.linear(*map(torch.from_numpy, (x, w, b))).numpy()).max() < 1e-5
    a, c = _r(2, 3, 5, 4), _r(2, 3, 5, 6)
    y = OPS["matmul"](x=a, y=c, transpose_x=True, transpose_y=False)
    assert np.abs(y - (torch.from_numpy(a).transpose(-1, -2) @ torch.from_numpy(c)).numpy()).max() < 1e-5


def test_reductions_norm_and_activations_match_torch(_r) -> None:
    x = _r(2, 4, 7, 16)
    t = torch.from_numpy(x)
    l2 = OPS["reduce_l2_norm"](x=x, axes=np.array([-1]), keep_dims=True)
    assert np.abs(l2 - t.norm(dim=-1, keepdim=True).numpy()).max() < 1e-5
    assert np.abs(OPS["rsqrt"](x=l2) - torch.rsqrt(torch.from_numpy(l2) + 1e-12).numpy()).max() < 1e-5
    assert np.abs(OPS["reduce_sum"](x=x, axes=np.array([1, 2]), keep_dims=False) - t.sum((1, 2)).numpy()).max() < 1e-4
    g, b = _r(16), _r(16)
    ln = OPS["layer_norm"](x=x, axes=np.array([-1]), gamma=g, beta=b, epsilon=np.float32(1e-6))
    ref = F.layer_norm(t, (16,), torch.from_numpy(g), torch.from_numpy(b), eps=1e-6).numpy()
    assert np.abs(ln - ref).max() < 1e-5
    assert np.abs(OPS["gelu"](x=x, mode="EXACT") - F.gelu(t).numpy()).max() < 1e-6
    assert np.abs(OPS["gelu"](x=x, mode="TANH_APPROXIMATION") - F.gelu(t, approximate="tanh").numpy()).max() < 1e-5
    assert np.abs(OPS["softmax"](x=x, axis=-1) - t.softmax(-1).numpy()).max() < 1e-6


def test_quantize_dequantize_round_half_even_and_clip() -> None:
    x = np.array([-300.0, -1.5, -0.5, 0.5, 1.5, 2.4, 300.0], np.float32)
    q = OPS["quantize"](input=x, scale=np.float32(1.0), output_dtype="int8")
    assert q.dtype == np.int8 and q.tolist() == [-128, -2, 0, 0, 2, 2, 127]
    d = OPS["dequantize"](input=q, scale=np.float32(0.5))
    assert d.tolist() == [-64.0, -1.0, 0.0, 0.0, 1.0, 1.0, 63.5]


def test_shape_ops_by_value(_r) -> None:
    x = _r(3, 1, 4, 5, 6)
    t = torch.from_numpy(x)
    y = OPS["slice_by_index"](x=x, begin=np.array([1, 0, 0, 0, 0]), end=np.array([2, 1, 4, 5, 6]),
                              end_mask=np.array([False, True, True, True, True]),
                              squeeze_mask=np.array([True, False, False, False, False]))
    assert np.array_equal(y, x[1])
    assert np.array_equal(OPS["reshape"](x=x, shape=np.array([3, -1])), t.reshape(3, 120).numpy())
    # iOS17 reshape: a 0 copies the input's size on that axis
    assert np.array_equal(OPS["reshape"](x=x, shape=np.array([0, 0, 20, -1])), t.reshape(3, 1, 20, 6).numpy())
    assert np.array_equal(OPS["transpose"](x=x, perm=np.array([4, 2, 0, 3, 1])), t.permute(4, 2, 0, 3, 1).numpy())
    y = _r(3, 2, 4, 5, 6)
    assert np.array_equal(OPS["concat"](values=[x, y, x], axis=1),
                          torch.cat([t, torch.from_numpy(y), t], dim=1).numpy())
    assert np.array_equal(OPS["concat"](values=[x, x], axis=-1), torch.cat([t, t], dim=-1).numpy())
    assert np.array_equal(OPS["gather"](x=x, indices=np.array([2, -1]), axis=0), x[[2, 2]])
    assert OPS["cast"](x=np.array([1.0001], np.float32), dtype="fp16").dtype == np.float16


@pytest.mark.parametrize("attention", ["softmax", "castling"])
def test_fp32_program_matches_torch(tmp_path, attention: str) -> None:
    """A whole converted program (softmax baseline included) through the interpreter vs torch."""
    ct = pytest.importorskip("coremltools")
    from castling_deploy.models import create_model
    from castling_deploy.runtime.mil_interp import MILProgram, op_histogram, run_mlpackage

    torch.manual_seed(0)
    m = create_model("castling_nano", form="deploy", attention=attention).eval()
    x = torch.randn(1, 3, 32, 32)
    mlm = ct.convert(torch.jit.trace(m, x), inputs=[ct.TensorType(name="x", shape=x.shape)],
                     outputs=[ct.TensorType(name="logits")], convert_to="mlprogram",
                     minimum_deployment_target=ct.target.iOS17, compute_precision=ct.precision.FLOAT32)
    path = tmp_path / "m.mlpackage"
    mlm.save(str(path))
    y = run_mlpackage(path, {"x": x.numpy()})["logits"]
    assert np.abs(y - m(x).detach().numpy()).max() < 1e-4
    hist = op_histogram(path)
    assert hist.get("softmax", 0) == (4 if attention == "softmax" else 0)
    # our pure-numpy blob reader agrees with coremltools' native one
    from coremltools.libmilstoragepython import _BlobStorageReader

    prog = MILProgram(path)
    reader = _BlobStorageReader(str(prog.weights_dir / "weight.bin"))
    for op in prog.block.operations:
        v = op.attributes["val"] if op.type == "const" else None
        if v is not None and v.WhichOneof("value") == "blobFileValue" and v.type.tensorType.dataType == 11:
            ours = prog.consts[op.outputs[0].name].ravel()
            assert np.array_equal(ours, reader.read_float_data(v.blobFileValue.offset))
            break
    else:
        pytest.fail("no fp32 blob constant found")


def test_unknown_op_is_named(tmp_path) -> None:
    from castling_deploy.errors import UsageError
    from castling_deploy.runtime import mil_interp

    class FakeOp:
        type = "frobnicate"
        inputs: dict = {}
        outputs: list = []

    prog = mil_interp.MILProgram.__new__(mil_interp.MILProgram)
    prog.path, prog.input_names, prog.input_types, prog.ops, prog.consts = "p", [], {}, [FakeOp()], {}
    with pytest.raises(UsageError, match="frobnicate"):
        prog.run({})



def _constexpr_program(tmp_path, build, opset) -> np.ndarray:
    """Convert a one-op MIL program whose weight is a constexpr_* op, save it, and return the interpreter's
    output on an identity-like input (the dequantized weight comes back through ``linear``)."""
    ct = pytest.importorskip("coremltools")
    from coremltools.converters.mil import Builder as mb

    from castling_deploy.runtime.mil_interp import MILProgram

    @mb.program(input_specs=[mb.TensorSpec(shape=(4, 4))], opset_version=opset)
    def prog(x):
        return mb.linear(x=x, weight=build(mb), name="y")

    path = tmp_path / "p.mlpackage"
    ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=opset,
               compute_precision=ct.precision.FLOAT32).save(str(path))
    p = MILProgram(path)
    assert any(op.type.startswith("constexpr_") for op in p.block.operations)  # still compressed in the file
    return p.run({p.input_names[0]: np.eye(4, dtype=np.float32)})[p.output_names[0]].T  # x=I: y = W^T


def test_constexpr_affine_dequantize_by_value(tmp_path) -> None:
    ct = pytest.importorskip("coremltools")
    rng = np.random.default_rng(1)
    q = rng.integers(-128, 128, (6, 4)).astype(np.int8)
    scale = rng.uniform(0.01, 0.1, 6).astype(np.float32)
    zp = rng.integers(-5, 5, 6).astype(np.int8)
    w = _constexpr_program(tmp_path, lambda mb: mb.constexpr_affine_dequantize(
        quantized_data=q, zero_point=zp, scale=scale, axis=0), ct.target.iOS16)
    # coremltools' definition: (data - zero_point) * scale, per output channel (axis 0)
    assert np.abs(w - (q.astype(np.float32) - zp[:, None]) * scale[:, None]).max() < 1e-6


def test_constexpr_blockwise_shift_scale_by_value(tmp_path) -> None:
    ct = pytest.importorskip("coremltools")
    rng = np.random.default_rng(2)
    q = rng.integers(-128, 128, (6, 4)).astype(np.int8)
    scale = rng.uniform(0.01, 0.1, (6, 2)).astype(np.float32)  # blocks of 2 along the input axis
    offset = rng.integers(-3, 3, (6, 2)).astype(np.int8)
    w = _constexpr_program(tmp_path, lambda mb: mb.constexpr_blockwise_shift_scale(
        data=q, scale=scale, offset=offset), ct.target.iOS18)
    ref = np.empty((6, 4), np.float32)
    for i in range(6):
        for j in range(4):  # element (i, j) belongs to block j // 2
            ref[i, j] = (float(q[i, j]) - float(offset[i, j // 2])) * float(scale[i, j // 2])
    assert np.abs(w - ref).max() < 1e-6


def test_constexpr_cast_by_value(tmp_path) -> None:
    ct = pytest.importorskip("coremltools")
    src = np.random.default_rng(3).standard_normal((6, 4)).astype(np.float16)
    w = _constexpr_program(tmp_path, lambda mb: mb.constexpr_cast(source_val=src, output_dtype="fp32"),
                           ct.target.iOS16)
    assert np.array_equal(w, src.astype(np.float32))
