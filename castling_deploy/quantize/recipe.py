"""QuantRecipe: one description of "what runs in int8" shared by every backend (ORT QDQ, TensorRT, reports).

Castling-aware choices (docs/architecture.md; measured in benchmarks/bench_int8.py and tests/test_quantize.py):
- int8: the patch Conv and the qkv / proj / fc1 / fc2 / head linears (>95% of the MACs), symmetric per-channel
  int8 weights and symmetric per-tensor int8 activations (zero point 0: TensorRT's explicit quantization
  accepts nothing else).
- The two linear-attention matmuls ``k^T@v`` and ``q@(k^T v)`` read L2-normalized q, k whose range is bounded;
  they are int8 by default. Measured (benchmarks/bench_int8.py, castling_deit_tiny@224, random weights, ORT CPU
  1 thread): with them logit SQNR 24.0 dB / 25.6 ms, without 24.4 dB / 24.9 ms, i.e. no measurable cost or gain
  on CPU (noise-level); they carry 5% of the MACs, which matters more on TensorRT. Drop them with
  ``int8_kinds=tuple(k for k in DEFAULT_INT8_KINDS if not k.startswith("attn_"))``.
- Always float: the L2 norms (ReduceL2/Div or LpNormalization), LayerNorm, GELU, softmax and the residual adds;
  only Conv/MatMul/Gemm nodes are ever given QDQ, so these never are.
- Calibration: percentile 99.99 by default (see the field). Activation rounding, not weights, dominates the error:
  on DeiT-T (random weights) no single op kind is worth keeping float (each is worth 0.2-2.3 dB; see int8.md).
- The depth-wise token Conv (``dconv``, a few kMACs per block) stays float: nothing to gain, and its output is
  added to a unit-norm tensor.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from ..errors import UsageError
from .graph import ALL_KINDS, NodeRole

CALIBRATION_METHODS = ("minmax", "entropy", "percentile", "mse")
DEFAULT_INT8_KINDS: tuple[str, ...] = ("patch_embed", "qkv", "attn_kv", "attn_q", "proj", "fc1", "fc2", "head")
FLOAT_OPS = (
    "L2 norms (ReduceL2/Div, LpNormalization)",
    "LayerNormalization",
    "GELU (Erf)",
    "Softmax",
    "residual Add",
    "depth-wise token Conv unless 'dwconv' is in int8_kinds",
)
KIND_NOTES = {
    "attn_kv": "k_hat^T @ v: int8 on both inputs; k_hat is unit-norm so its range is bounded",
    "attn_q": "q_hat @ (k_hat^T v): int8 on both inputs",
    "dwconv": "depth-wise (9,1) token Conv: float by default (negligible MACs)",
}


@dataclass(frozen=True)
class QuantRecipe:
    """What is int8, how it is calibrated, and which blocks fall back to float."""

    int8_kinds: tuple[str, ...] = DEFAULT_INT8_KINDS
    excluded_blocks: tuple[int, ...] = ()
    # Percentile 99.99 of |x| (~4 sigma on the near-Gaussian ViT activations) instead of the sample max (~5.5 sigma):
    # castling_deit_tiny@224, random weights, 64 N(0,1) images, exact QDQ math, 8-bit weights: logit SQNR
    # 25.6 dB (minmax) -> 27.7 dB; 99.999 gave 27.2, 99.9 24.8, entropy 26.0, "mse" 27.6 (benchmarks/results/int8.md).
    calibration: str = "percentile"
    percentile: float = 99.99
    calib_size: int = 512
    seed: int = 0
    per_channel: bool = True
    quantize_outputs: bool = False
    # 7-bit weights (reduce_range) are opt-in (``--weight-bits 7`` on the onnx target). ONNX Runtime's x86 int8
    # kernels without VNNI (plain AVX2) add u8*s8 pairs in int16 and saturate: on such a 2-core AVX2 machine
    # castling_nano's logit SQNR fell from 26.6 dB (QDQ semantics) to 19.2 dB with 8-bit weights; with 7-bit
    # weights the kernel matches the QDQ semantics (25.4 dB). AVX-512 VNNI / AVX-VNNI x86 and ARM dot-product
    # kernels do not saturate, and there 8-bit weights are both more accurate and faster (castling_deit_tiny@224,
    # ORT CPU 1 thread, AVX-512 VNNI: 27.8 vs 25.1 dB, 1.48x vs 1.46x over fp32). TensorRT never needs it.
    reduce_range: bool = False
    # TensorRT's ONNX parser rejects DequantizeLinear of int32 (quantized bias) and TensorRT 8.x (JetPack 5)
    # wants weights as float Q->DQ pairs; ORT CPU fuses best with int32 bias and int8 weight initializers.
    quantize_bias: bool = True
    weight_qdq_pair: bool = False
    # Fixed by the targets (TensorRT needs zero point 0); kept as fields so reports state them.
    weight_symmetric: bool = field(default=True, init=False)
    activation_symmetric: bool = field(default=True, init=False)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.int8_kinds) - set(ALL_KINDS))
        if unknown:
            raise UsageError(f"unknown int8 op kinds {unknown}; choose from {', '.join(ALL_KINDS)}")
        if self.calibration not in CALIBRATION_METHODS:
            raise UsageError(
                f"unknown calibration method {self.calibration!r}; choose one of {', '.join(CALIBRATION_METHODS)}"
            )
        if not 50.0 < self.percentile <= 100.0:
            raise UsageError(f"percentile {self.percentile} must be in (50, 100]")
        if self.calib_size < 1:
            raise UsageError(f"calib_size must be positive, got {self.calib_size}")
        object.__setattr__(self, "int8_kinds", tuple(k for k in ALL_KINDS if k in self.int8_kinds))
        object.__setattr__(self, "excluded_blocks", tuple(sorted(set(int(b) for b in self.excluded_blocks))))

    @classmethod
    def for_target(cls, target: str, **changes: Any) -> "QuantRecipe":
        """The default recipe for a target: 'onnx' (ORT CPU: int32 bias, int8 weight initializers) or 'tensorrt'
        (weights as Q->DQ pairs, no quantized bias). Both use 8-bit weights; the onnx target passes
        ``reduce_range=True`` for ``--weight-bits 7`` (x86 AVX2 without VNNI)."""
        if target not in ("onnx", "tensorrt"):
            raise UsageError(f"no int8 recipe for target {target!r}; use 'onnx' or 'tensorrt'")
        trt = target == "tensorrt"
        return cls(**{"reduce_range": False, "quantize_bias": not trt, "weight_qdq_pair": trt, **changes})

    def with_(self, **changes: Any) -> "QuantRecipe":
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["int8_kinds"] = list(self.int8_kinds)
        d["excluded_blocks"] = list(self.excluded_blocks)
        d["float_ops"] = list(FLOAT_OPS)
        d["weights"] = ("int8 (7-bit range)" if self.reduce_range else "int8 (8-bit)") + " symmetric " + (
            "per-channel" if self.per_channel else "per-tensor"
        )
        d["activations"] = "int8 symmetric per-tensor (zero point 0)"
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QuantRecipe":
        keys = {"int8_kinds", "excluded_blocks", "calibration", "percentile", "calib_size", "seed", "per_channel",
                "quantize_outputs", "reduce_range", "quantize_bias", "weight_qdq_pair"}
        kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in keys}
        return cls(**kw)

    def calibration_key(self) -> str:
        """The part of the recipe that changes calibration ranges (not which nodes are later quantized).

        Ranges are collected on the float model for every Conv/MatMul/Gemm tensor, so a fallback that only moves
        blocks to float reuses them; the method, its parameters and the sample do not.
        """
        payload = {
            "method": self.calibration,
            "percentile": self.percentile if self.calibration == "percentile" else None,
            "calib_size": self.calib_size,
            "seed": self.seed,
            "symmetric": self.activation_symmetric,
            "op_types": list(ORT_OP_TYPES),
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    # ---- mapping onto a graph -------------------------------------------------------------------------------
    def is_int8(self, role: NodeRole) -> bool:
        if role.kind not in self.int8_kinds:
            return False
        return role.block is None or role.block not in self.excluded_blocks

    def split_nodes(self, roles: list[NodeRole]) -> tuple[list[str], list[str]]:
        """(names of compute nodes to quantize, names to keep float)."""
        quant = [r.name for r in roles if self.is_int8(r)]
        keep = [r.name for r in roles if not self.is_int8(r)]
        return quant, keep

    def ort_kwargs(self, roles: list[NodeRole]) -> dict[str, Any]:
        """Keyword arguments for ``onnxruntime.quantization.quantize_static`` (minus model paths and reader)."""
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType

        method = {
            "minmax": CalibrationMethod.MinMax,
            "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile,
            "mse": CalibrationMethod.Percentile,  # ranges come from our cache file either way
        }[self.calibration]
        extra: dict[str, Any] = {
            "ActivationSymmetric": True,
            "WeightSymmetric": True,
            # Weights of MatMul are (K, N): one scale per output column.
            "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1},
        }
        extra["QuantizeBias"] = self.quantize_bias
        extra["AddQDQPairToWeight"] = self.weight_qdq_pair
        if not self.quantize_outputs:
            # QDQ only on the inputs of compute ops (TensorRT's placement): an output Q/DQ feeding a float op
            # (LayerNorm, the L2 norms, residual adds) would only add a rounding step.
            extra["OpTypesToExcludeOutputQuantization"] = list(ORT_OP_TYPES)
        _, keep = self.split_nodes(roles)
        return {
            "quant_format": QuantFormat.QDQ,
            "op_types_to_quantize": list(ORT_OP_TYPES),
            "per_channel": self.per_channel,
            "reduce_range": self.reduce_range,
            "activation_type": QuantType.QInt8,
            "weight_type": QuantType.QInt8,
            "nodes_to_exclude": keep,
            "calibrate_method": method,
            "extra_options": extra,
        }


ORT_OP_TYPES = ("Conv", "MatMul", "Gemm")
