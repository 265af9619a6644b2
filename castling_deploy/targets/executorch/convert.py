"""ExecuTorch target: torch.export of the folded model -> ``to_edge_transform_and_lower`` with the XNNPACK
partitioner -> ``.pte`` (fp32, fp16, int8), without leaving PyTorch.

- fp32: the folded model as it is.
- fp16: a half copy between two casts, so the program keeps float32 input and logits (what the app feeds and
  reads stays the same); XNNPACK runs it in fp16 where the CPU has fp16 arithmetic (ARMv8.2+, AVX512-FP16).
- int8: PT2E with ExecuTorch's ``XNNPACKQuantizer`` on linear and conv only: per-channel symmetric int8 weights,
  per-tensor int8 activations from a histogram observer calibrated on ``--calib``; norms, GELU and the attention
  matmuls stay float (see ``_quantizer``). Calibration runs in batches on a batch-dynamic export of the model;
  the quantized model is then exported again at batch 1, the shape the program is planned for.

Before lowering, ``decomp.decompose_for_xnnpack`` spells LayerNorm, the L2 norms, q/k/v selects and batched
matmuls with ops XNNPACK takes, so the whole network is one delegate call (castling_deit_tiny fp32: 86 delegate
calls and 183 portable kernels before; 1 thread, p50 47.1 -> 43.2 ms, benchmarks/results/executorch.md). Our
metadata rides in the program as a constant method: any ExecuTorch runtime reads it with
``program.load_method("castling_deploy_metadata").execute([])`` (a JSON string).
"""
from __future__ import annotations

import copy
import json
import time
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ...errors import UsageError
from ...optional import import_optional
from ...output import atomic_write_bytes
from .census import pte_census
from .decomp import decompose_for_xnnpack

MODES = ("fp32", "fp16", "int8")
METADATA_METHOD = "castling_deploy_metadata"
CALIB_BATCH = 16


class _HalfWithFloatIO(nn.Module):
    """A float16 copy of ``model`` that takes and returns float32 (the casts are lowered into the delegate)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = copy.deepcopy(model).half().eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images.to(torch.float16)).to(torch.float32)


def import_executorch() -> Any:
    """``executorch.exir``, or exit 4 naming ``castling-deploy[executorch]``."""
    return import_optional("executorch.exir", "executorch", "executorch", "ExecuTorch export")


def _version(dist: str) -> str:
    try:
        return importlib_metadata.version(dist)
    except importlib_metadata.PackageNotFoundError:
        return "absent"


def _sample(img_size: int, batch: int = 1) -> torch.Tensor:
    return torch.zeros(batch, 3, img_size, img_size, dtype=torch.float32)


def _quantizer() -> Any:
    """XNNPACK's PT2E quantizer on linear + conv only. Annotating its whole default set (add, mul, cat too)
    also puts the residual adds and the Castling ``0.5*v + q@(k@v)/pi`` sums in int8: on castling_nano (digits
    val) the logit cosine fell from 0.99985 to 0.99964 and it ran 1.5x slower (requantization around every add).
    Keeping the patch-embedding conv float (as the LiteRT target does) gained nothing here (cosine 0.99984)."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )

    config = get_symmetric_quantization_config(is_per_channel=True)
    quantizer = XNNPACKQuantizer()
    for op in (torch.ops.aten.linear.default, torch.ops.aten.conv2d.default):
        quantizer.set_operator_type(op, config)
    return quantizer


def _calibration_graph(model: nn.Module, img_size: int) -> tuple[Any, int]:
    """The model exported for PT2E: batch-dynamic so calibration runs in batches (castling_nano, 64 images: 6 s
    of CPU instead of 44 s image by image, the same int8 cosine), else at batch 1."""
    try:
        batch = torch.export.Dim("batch", min=1, max=4096)
        ep = torch.export.export(model, (_sample(img_size, 2),), dynamic_shapes=({0: batch},))
        return ep.module(), CALIB_BATCH
    except Exception:  # a model whose shapes do not generalize over the batch: calibrate image by image
        return torch.export.export(model, (_sample(img_size),)).module(), 1


def _quantize_pt2e(model: nn.Module, calib: np.ndarray, img_size: int) -> nn.Module:
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    graph, batch = _calibration_graph(model.eval(), img_size)
    graph = prepare_pt2e(graph, _quantizer())
    with torch.no_grad():
        for i in range(0, len(calib), batch):
            graph(torch.from_numpy(calib[i : i + batch]))
    return convert_pt2e(graph)


def _check_calib(calib_images: np.ndarray | None, img_size: int) -> np.ndarray:
    if calib_images is None or len(calib_images) == 0:
        raise UsageError("ExecuTorch int8 needs calibration images; pass --calib DIR")
    calib = np.ascontiguousarray(calib_images, dtype=np.float32)
    if calib.ndim != 4 or calib.shape[1:] != (3, img_size, img_size):
        raise UsageError(f"calibration images have shape {calib.shape}; expected (N, 3, {img_size}, {img_size})")
    return calib


def lower_to_pte(module: nn.Module, img_size: int, metadata: dict[str, str] | None = None,
                 xnnpack_rewrites: bool = True) -> bytes:
    """torch.export at batch 1 -> XNNPACK-friendly decompositions (``xnnpack_rewrites=False``: ExecuTorch's
    defaults only, for comparison) -> lowered, serialized ExecuTorch program."""
    exir = import_executorch()
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

    ep = torch.export.export(module, (_sample(img_size),))
    ep = decompose_for_xnnpack(ep) if xnnpack_rewrites else ep
    constants = {METADATA_METHOD: json.dumps(metadata, sort_keys=True)} if metadata else None
    edge = exir.to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()], constant_methods=constants)
    return bytes(edge.to_executorch().buffer)


def _build_module(model: nn.Module, mode: str, calib_images: np.ndarray | None, img_size: int,
                  info: dict[str, Any]) -> nn.Module:
    if mode == "fp32":
        return model
    if mode == "fp16":
        info["notes"].append("float16 weights and math inside the delegate; float32 input and logits")
        return _HalfWithFloatIO(model)
    calib = _check_calib(calib_images, img_size)
    info["calib_images"] = len(calib)
    info["notes"].append("XNNPACKQuantizer (PT2E) on linear + conv: per-channel symmetric int8 weights, per-tensor "
                         "int8 activations (histogram observer); norms, GELU and attention matmuls stay float")
    return _quantize_pt2e(model, calib, img_size)


def convert_executorch(model: nn.Module, out_path: Path, *, mode: str, calib_images: np.ndarray | None,
                       img_size: int, metadata: dict[str, str] | None = None) -> dict[str, Any]:
    """Convert a deploy-form CastlingViT (NCHW float32, batch 1) to an ExecuTorch ``.pte`` and describe it."""
    if mode not in MODES:
        raise UsageError(f"unknown ExecuTorch mode {mode!r}; choose one of {', '.join(MODES)}")
    import_executorch()
    out_path = Path(out_path)
    info: dict[str, Any] = {"mode": mode, "delegate": "XnnpackBackend", "notes": []}
    start = time.perf_counter()
    module = _build_module(model.eval(), mode, calib_images, img_size, info)
    data = lower_to_pte(module, img_size, {str(k): str(v) for k, v in (metadata or {}).items()})
    info["conversion_seconds"] = round(time.perf_counter() - start, 3)
    atomic_write_bytes(out_path, data)
    info.update(file=out_path.name, file_bytes=out_path.stat().st_size, census=pte_census(out_path),
                metadata_method=METADATA_METHOD if metadata else None,
                versions={"executorch": _version("executorch"), "torchao": _version("torchao"),
                          "torch": torch.__version__})
    return info


def read_pte_metadata(path: str | Path) -> dict[str, str]:
    """Our metadata from a ``.pte`` (the constant method ``castling_deploy_metadata``), {} when absent."""
    from ...runtime.executorch import load_program

    program = load_program(path)
    if METADATA_METHOD not in program.method_names:
        return {}
    (value,) = program.load_method(METADATA_METHOD).execute([])
    return json.loads(value)
