"""torch -> ONNX: dynamo exporter (opset 18) or legacy (opset 17), simplified, fully checked, with metadata.

Simplifier: onnxsim, with onnxslim as the fallback. Measured by benchmarks/bench_simplify.py on
castling_deit_tiny@224 and castling_nano@32: both give the same graph (503 -> 455 nodes: the zero-bias Adds
folded; neither turns ``x / clamp(ReduceL2(x))`` into LpNormalization because of the Clip), the same logits
(1.4e-6 from torch), the same INT8 result, and latency within noise. onnxsim is the default because it simplifies
faster (0.44 s vs 1.0 s) and validates its own result (its check flag), which we use before trusting it.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from ...errors import CastlingError, UsageError

log = logging.getLogger(__name__)

INPUT_NAME = "images"
OUTPUT_NAME = "logits"


def _torch_export(model: nn.Module, path: Path, img_size: int, in_chans: int, opset: int) -> None:
    x = torch.zeros(2, in_chans, img_size, img_size)
    # The exporters chat on stdout and through torch's loggers; keep stdout clean for --json.
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
        warnings.simplefilter("ignore")
        if opset >= 18:
            batch = torch.export.Dim("batch", min=1, max=4096)
            torch.onnx.export(
                model,
                (x,),
                str(path),
                dynamo=True,
                opset_version=opset,
                external_data=False,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes={"x": {0: batch}},
                verbose=False,
                optimize=True,
            )
        else:
            torch.onnx.export(
                model,
                (x,),
                str(path),
                dynamo=False,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            )


def simplify_onnx(model_proto: "onnx.ModelProto", tool: str = "auto") -> tuple["onnx.ModelProto", str]:  # noqa: F821
    """Simplify with onnxsim (preferred) or onnxslim; returns the model and the tool used."""
    if tool in ("auto", "onnxsim"):
        try:
            import onnxsim

            simplified, ok = onnxsim.simplify(model_proto)
            if ok:
                return simplified, f"onnxsim {onnxsim.__version__}"
            log.warning("onnxsim could not validate its result; trying onnxslim")
        except ImportError:
            if tool == "onnxsim":
                raise
    import onnxslim

    return onnxslim.slim(model_proto), f"onnxslim {onnxslim.__version__}"


def export_onnx(
    model: nn.Module,
    out_path: Path,
    img_size: int,
    *,
    in_chans: int = 3,
    opset: int = 18,
    simplify: bool = True,
    metadata: dict[str, str] | None = None,
    simplifier: str = "auto",
) -> dict:
    """Export ``model`` (eval mode) with a dynamic batch axis to a single ``.onnx`` file, atomically.

    Returns an info dict: exporter, opset, simplifier, node counts, seconds.
    """
    import onnx

    if opset < 13 or opset > 21:
        raise UsageError(f"--opset {opset} is not supported; use 17 (legacy exporter) or 18-21 (dynamo exporter)")
    out_path = Path(out_path)
    model = model.eval()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=out_path.parent, prefix=".onnx-export-") as tmp:
        raw = Path(tmp) / "raw.onnx"
        try:
            _torch_export(model, raw, img_size, in_chans, opset)
        except Exception as exc:  # the exporters raise many types; keep the first line
            raise CastlingError(f"ONNX export failed: {str(exc).splitlines()[0][:300]}") from exc
        proto = onnx.load(str(raw), load_external_data=True)
        export_seconds = time.perf_counter() - t0
        nodes_before = len(proto.graph.node)
        used = "none"
        if simplify:
            proto, used = simplify_onnx(proto, simplifier)
        if proto.opset_import and opset >= 18:
            actual = max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
        else:
            actual = opset
        for key, value in (metadata or {}).items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, str(value)
        proto.producer_name = "castling-deploy"
        if proto.ByteSize() > 2**31 - 1:
            raise CastlingError("model exceeds 2 GB; external-data export is not supported yet")
        staged = Path(tmp) / "model.onnx"
        onnx.save(proto, str(staged))
        onnx.checker.check_model(str(staged), full_check=True)
        os.replace(staged, out_path)
    return {
        "exporter": "torch.onnx dynamo" if opset >= 18 else "torch.onnx legacy (TorchScript)",
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "opset": actual,
        "simplifier": used,
        "nodes_before_simplify": nodes_before,
        "nodes": len(proto.graph.node),
        "export_seconds": round(export_seconds, 3),
        "total_seconds": round(time.perf_counter() - t0, 3),
        "bytes": out_path.stat().st_size,
    }


def read_onnx_metadata(path: Path) -> dict[str, str]:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in proto.metadata_props}
