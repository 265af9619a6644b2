"""Our QuantRecipe (ONNX Runtime quantize_static) vs NVIDIA ModelOpt (modelopt.onnx.quantization) for TensorRT, and
our typed fp16 pass vs ModelOpt AutoCast, on the demo checkpoint and on castling_deit_tiny (random weights).

Measured, per model: nodes quantized, where the Q/DQ go (the ops that read int8 tensors), logit fidelity against
torch under exact QDQ semantics (ONNX Runtime with graph optimizations off: every Q/DQ computed as written, which
is what TensorRT's explicit quantization implements), with fp32 float islands and after the typed fp16 pass, and the
seconds each quantizer takes on this CPU. No TensorRT and no engine: the typed files are what TensorRT would build.

    .venv/bin/python benchmarks/bench_modelopt.py [--models demo castling_deit_tiny] [--calib 64 --eval 64]
Writes benchmarks/results/modelopt.json and modelopt.md. Needs nvidia-modelopt (pip install
'castling-deploy[modelopt]'); without it, it writes the reason instead of the ModelOpt rows.
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from castling_deploy.budget import logit_metrics
from castling_deploy.quantize import CalibrationSet, QuantRecipe, onnx_census, quantize_onnx
from castling_deploy.quantize.fp16 import precision_census, write_fp16_onnx
from castling_deploy.targets.onnx.convert import export_onnx
from castling_deploy.targets.onnx.target import cpu_isa
from castling_deploy.targets.tensorrt.engine import qdq_tensorrt_problems

REPO = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results"


def _ort(path: Path, x: np.ndarray, exact: bool = True) -> np.ndarray:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    if exact:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    name = s.get_inputs()[0].name
    return np.concatenate([s.run(None, {name: x[i:i + 16]})[0] for i in range(0, len(x), 16)])


def placement(path: Path) -> dict[str, Any]:
    """Which ops read int8 activations (DequantizeLinear of a runtime QuantizeLinear) and int8 weights."""
    import onnx

    m = onnx.load(str(path))
    inits = {i.name for i in m.graph.initializer}
    prod = {o: n for n in m.graph.node for o in n.output}
    cons: dict[str, list[Any]] = {}
    for n in m.graph.node:
        for i in n.input:
            cons.setdefault(i, []).append(n)
    act, wt = Counter(), Counter()
    for n in m.graph.node:
        if n.op_type != "DequantizeLinear":
            continue
        q = prod.get(n.input[0])
        weight = n.input[0] in inits or (q is not None and q.input[0] in inits)
        for c in cons.get(n.output[0], []):
            (wt if weight else act)[c.op_type] += 1
    graph_input = m.graph.input[0].name
    return {"activation_int8_inputs": dict(sorted(act.items())), "weight_int8_inputs": dict(sorted(wt.items())),
            "network_input_quantized": any(c.op_type == "QuantizeLinear" for c in cons.get(graph_input, []))}


def fidelity(ref: np.ndarray, out: np.ndarray, labels: np.ndarray | None) -> dict[str, Any]:
    m = logit_metrics(ref, out, labels)
    keys = ("cosine", "min_sample_cosine", "sqnr_db", "max_abs_logit", "top1_agreement", "top1_acc",
            "top1_drop_points")
    return {k: (round(m[k], 6) if isinstance(m[k], float) else m[k]) for k in keys if k in m}


def _demo() -> tuple[Any, np.ndarray, np.ndarray, np.ndarray | None, str]:
    from castling_deploy.data import load_image_set
    from castling_deploy.models.checkpoint import load_checkpoint

    ck = load_checkpoint(REPO / "models" / "castling_nano_digits.pt")
    model = ck.build_model(form="deploy").eval()
    calib = load_image_set(REPO / "calib" / "digits" / "train", ck.preprocess, ck.labels)
    val = load_image_set(REPO / "calib" / "digits" / "val", ck.preprocess, ck.labels)
    return model, calib.images, val.images, val.labels, "digits train (512 of them) / val"


def _random(name: str, n_calib: int, n_eval: int) -> tuple[Any, np.ndarray, np.ndarray, None, str]:
    from castling_deploy.models import create_model

    torch.manual_seed(0)
    model = create_model(name, form="deploy").eval()
    s = model.cfg.img_size
    calib = np.random.default_rng(0).standard_normal((n_calib, 3, s, s)).astype(np.float32)
    evals = np.random.default_rng(1).standard_normal((n_eval, 3, s, s)).astype(np.float32)
    return model, calib, evals, None, f"N(0,1): {n_calib} calib (seed 0) / {n_eval} eval (seed 1)"


def _int8_row(name: str, qdq: Path, info: dict, seconds: float, ref: np.ndarray, x: np.ndarray,
              labels: np.ndarray | None, work: Path) -> dict[str, Any]:
    c = info.get("census") or onnx_census(qdq)
    typed = work / f"{qdq.stem}.typed.onnx"
    t0 = time.perf_counter()
    write_fp16_onnx(qdq, typed)
    typed_s = time.perf_counter() - t0
    return {
        "variant": name, "quantize_seconds": round(seconds, 2), "typed_pass_seconds": round(typed_s, 2),
        "int8_compute_nodes": c["int8_compute_nodes"], "compute_nodes": c["compute_nodes"],
        "int8_mac_fraction": c["int8_mac_fraction"], "qdq_nodes": c["qdq_nodes"],
        "placement": placement(qdq), "tensorrt_problems": qdq_tensorrt_problems(typed),
        "exact_fp32_islands": fidelity(ref, _ort(qdq, x), labels),
        "exact_fp16_islands": fidelity(ref, _ort(typed, x), labels),
    }


def _attempt(name: str, make: Any) -> dict[str, Any]:
    """One row; a quantizer that fails is a row with its error, not a lost benchmark."""
    try:
        return make()
    except Exception as exc:  # noqa: BLE001  (recorded, then the next variant runs)
        logging.exception("%s failed", name)
        return {"variant": name, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}


def _ours(fp32: Path, calib: CalibrationSet, n: int, cal: str, ref: np.ndarray, x: np.ndarray,
          labels: np.ndarray | None, work: Path) -> dict[str, Any]:
    out = work / f"ours_{cal}.onnx"
    t0 = time.perf_counter()
    info = quantize_onnx(fp32, out, calib, QuantRecipe.for_target("tensorrt", calibration=cal, calib_size=n),
                         cache_dir=work / "cache")
    return _int8_row(f"QuantRecipe (ORT), {cal}", out, info, time.perf_counter() - t0, ref, x, labels, work)


def _theirs(fp32: Path, calib: CalibrationSet, n: int, cal: str, ref: np.ndarray, x: np.ndarray,
            labels: np.ndarray | None, work: Path) -> dict[str, Any]:
    from castling_deploy.quantize.modelopt import quantize_modelopt

    out = work / f"modelopt_{cal}.onnx"
    t0 = time.perf_counter()
    info = quantize_modelopt(fp32, out, calib, calibration={"max": "minmax"}.get(cal, cal), calib_size=n)
    return _int8_row(f"ModelOpt, {cal}", out, info, time.perf_counter() - t0, ref, x, labels, work)


def _theirs_fp16(fp32: Path, calib: CalibrationSet, n: int, ref: np.ndarray, x: np.ndarray,
                 labels: np.ndarray | None, work: Path) -> dict[str, Any]:
    from castling_deploy.quantize.modelopt import quantize_modelopt

    out = work / "modelopt_native16.onnx"
    t0 = time.perf_counter()
    info = quantize_modelopt(fp32, out, calib, calibration="entropy", calib_size=n, high_precision="fp16")
    return {"variant": "ModelOpt, entropy, its own fp16 (high_precision_dtype=fp16)",
            "quantize_seconds": round(time.perf_counter() - t0, 2),
            "int8_compute_nodes": info["census"]["int8_compute_nodes"], "qdq_nodes": info["census"]["qdq_nodes"],
            "exact_fp16_islands": fidelity(ref, _ort(out, x), labels), "fp16_census": precision_census(out)["by_op"]}


def _quantizers(fp32: Path, calib: CalibrationSet, n: int, ref: np.ndarray, x: np.ndarray,
                labels: np.ndarray | None, work: Path, mo_ok: bool) -> list[dict[str, Any]]:
    args = (ref, x, labels, work)
    rows = [_attempt(f"QuantRecipe (ORT), {cal}", lambda cal=cal: _ours(fp32, calib, n, cal, *args))
            for cal in ("percentile", "minmax")]
    if mo_ok:
        rows += [_attempt(f"ModelOpt, {cal}", lambda cal=cal: _theirs(fp32, calib, n, cal, *args))
                 for cal in ("entropy", "max")]
        rows.append(_attempt("ModelOpt, its own fp16", lambda: _theirs_fp16(fp32, calib, n, *args)))
    return rows


def _fp16_rows(fp32: Path, ref: np.ndarray, x: np.ndarray, labels: np.ndarray | None, work: Path,
               mo_ok: bool) -> list[dict[str, Any]]:
    variants: list[tuple[str, Any]] = [("ours (quantize/fp16.py)", lambda p: write_fp16_onnx(fp32, p))]
    if mo_ok:
        from castling_deploy.quantize.modelopt import autocast_fp16

        variants += [("ModelOpt AutoCast, our policy excluded", lambda p: autocast_fp16(fp32, p)),
                     ("ModelOpt AutoCast, its defaults", lambda p: autocast_fp16(fp32, p, keep_policy=False))]
    rows = []
    for name, make in variants:
        out = work / f"fp16_{len(rows)}.onnx"
        t0 = time.perf_counter()
        make(out)
        c = precision_census(out)
        rows.append({"variant": name, "seconds": round(time.perf_counter() - t0, 2), "fp16_nodes": c["fp16_nodes"],
                     "fp32_nodes": c["fp32_nodes"], "casts": c["casts"], "io": [c["inputs"], c["outputs"]],
                     "fp32_ops": sorted(k for k, v in c["by_op"].items() if v["fp32"]),
                     "ort": fidelity(ref, _ort(out, x, exact=False), labels)})
    return rows


def bench_model(name: str, args: argparse.Namespace, mo_ok: bool) -> dict[str, Any]:
    model, calib_x, x, labels, data = _demo() if name == "demo" else _random(name, args.calib, args.eval)
    with torch.no_grad():
        ref = torch.cat([model(torch.from_numpy(x[i:i + 16])) for i in range(0, len(x), 16)]).numpy()
    n = min(len(calib_x), 512)
    calib = CalibrationSet(calib_x, f"bench-{name}", data)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        fp32 = work / "fp32.onnx"
        export_onnx(model, fp32, model.cfg.img_size)
        logging.info("%s: exported; quantizing", name)
        row = {"model": name, "img_size": model.cfg.img_size, "data": data, "calib_images": n, "eval_images": len(x),
               "fp32_onnx": fidelity(ref, _ort(fp32, x), labels),
               "int8": _quantizers(fp32, calib, n, ref, x, labels, work, mo_ok),
               "fp16": _fp16_rows(fp32, ref, x, labels, work, mo_ok)}
        if name == "demo":  # small enough for ONNX's numpy reference evaluator
            row["reference_evaluator"] = _numpy_fp16_check(work, ref[:64], x[:64])
        return row


def _numpy_fp16_check(work: Path, ref: np.ndarray, x: np.ndarray) -> dict[str, Any]:
    """ORT CPU runs fp16 ops it has no CPU kernel for in fp32 between Casts; ONNX's reference evaluator computes
    in numpy fp16 throughout. Both on our typed files, against torch."""
    from onnx.reference import ReferenceEvaluator

    out = {}
    for label, path in (("fp16", work / "fp16_0.onnx"), ("int8 fp16 islands", work / "ours_percentile.typed.onnx")):
        if path.is_file():
            numpy16 = ReferenceEvaluator(str(path)).run(None, {"images": x})[0]
            out[label] = {"ort": fidelity(ref, _ort(path, x, exact=False), None), "numpy": fidelity(ref, numpy16, None)}
    return out


def _f(m: dict[str, Any], key: str, fmt: str) -> str:
    return format(m[key], fmt) if key in m and m[key] is not None else "-"


def _int8_table(rows: list[dict[str, Any]]) -> list[str]:
    out = ["| quantizer | s | int8 nodes | int8 MACs | Q/DQ | int8 activations feed | input int8 | exact fp32 islands "
           "cos / min / SQNR dB | exact fp16 islands cos / min / SQNR dB | top-1 agree (fp16 isl.) |",
           "|---|---:|---:|---:|---:|---|---|---|---|---:|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['variant']} | failed: {r['error']} |" + " |" * 8)
            continue
        e32, e16 = r.get("exact_fp32_islands", {}), r["exact_fp16_islands"]
        pl = r.get("placement", {})
        feeds = ", ".join(f"{k} {v}" for k, v in pl.get("activation_int8_inputs", {}).items()) or "-"
        out.append(
            f"| {r['variant']} | {r['quantize_seconds']:.1f} | {r['int8_compute_nodes']}/{r.get('compute_nodes', '-')} "
            f"| {100 * r['int8_mac_fraction']:.1f}% | {r['qdq_nodes']} | {feeds} | "
            f"{pl.get('network_input_quantized', '-')} | "
            f"{_f(e32, 'cosine', '.5f')} / {_f(e32, 'min_sample_cosine', '.5f')} / {_f(e32, 'sqnr_db', '.2f')} | "
            f"{_f(e16, 'cosine', '.5f')} / {_f(e16, 'min_sample_cosine', '.5f')} / {_f(e16, 'sqnr_db', '.2f')} | "
            f"{_f(e16, 'top1_agreement', '.3f')} |"
            if "int8_mac_fraction" in r else
            f"| {r['variant']} | {r['quantize_seconds']:.1f} | {r['int8_compute_nodes']} | - | {r['qdq_nodes']} | "
            f"(its own fp16: LayerNorm, norms, logits fp16 too) | - | - | {_f(e16, 'cosine', '.5f')} / "
            f"{_f(e16, 'min_sample_cosine', '.5f')} / {_f(e16, 'sqnr_db', '.2f')} | "
            f"{_f(e16, 'top1_agreement', '.3f')} |")
    return out


def _fp16_table(rows: list[dict[str, Any]]) -> list[str]:
    out = ["| fp16 pass | s | fp16 nodes | fp32 nodes | casts | fp32 ops | max abs | SQNR dB | top-1 agree |",
           "|---|---:|---:|---:|---:|---|---:|---:|---:|"]
    for r in rows:
        m = r["ort"]
        out.append(f"| {r['variant']} | {r['seconds']:.1f} | {r['fp16_nodes']} | {r['fp32_nodes']} | {r['casts']} | "
                   f"{', '.join(r['fp32_ops']) or '-'} | {m['max_abs_logit']:.2e} | {m['sqnr_db']:.1f} | "
                   f"{m['top1_agreement']:.3f} |")
    return out


def _verdict(result: dict[str, Any]) -> list[str]:
    """The comparison in words, computed from the rows (so a rerun rewrites it with its own numbers)."""
    lines = ["## Verdict", ""]
    for m in result["models"]:
        ok = [r for r in m["int8"] if "error" not in r and "exact_fp32_islands" in r]
        ours = [r for r in ok if r["variant"].startswith("QuantRecipe")]
        theirs = [r for r in ok if r["variant"].startswith("ModelOpt")]
        if not ours or not theirs:
            lines.append(f"- {m['model']}: no comparison (a quantizer failed or ModelOpt is absent).")
            continue
        a = max(ours, key=lambda r: r["exact_fp16_islands"]["sqnr_db"])
        b = max(theirs, key=lambda r: r["exact_fp16_islands"]["sqnr_db"])
        sa, sb = a["exact_fp16_islands"]["sqnr_db"], b["exact_fp16_islands"]["sqnr_db"]
        lines.append(f"- {m['model']}: best QuantRecipe ({a['variant'].split(', ')[1]}) {sa:.2f} dB vs best ModelOpt "
                     f"({b['variant'].split(', ')[1]}) {sb:.2f} dB logit SQNR with fp16 islands ({sa - sb:+.2f} dB), "
                     f"top-1 agreement {a['exact_fp16_islands']['top1_agreement']:.3f} vs "
                     f"{b['exact_fp16_islands']['top1_agreement']:.3f}; {a['qdq_nodes']} vs {b['qdq_nodes']} Q/DQ "
                     f"nodes; quantized in {a['quantize_seconds']:.0f} s vs {b['quantize_seconds']:.0f} s.")
    lines += [
        "", "Where the placements differ: both make the patch Conv, every block linear and the two linear-attention "
        "MatMuls int8 (the depth-wise token Conv stays float); ModelOpt leaves the classifier head float (one int8 "
        "node fewer) and puts Q/DQ on the inputs of the residual Adds and of the LayerNorms (TensorRT's fusion "
        "rules: an int8 residual stream), which rounds the residual stream of a Castling ViT to 8 bits at every "
        "block. Our recipe keeps the residual stream and every norm float. Whether ModelOpt's placement builds "
        "a faster engine was not measured: there is no TensorRT here. The default stays QuantRecipe "
        "(`--quantizer ort`); `--quantizer modelopt` is there to compare on the device.", "",
        "fp16: our pass and AutoCast with the same exclusions give the same fidelity within ~1.5 dB (AutoCast also "
        "moves the data-movement ops next to the kept ops to fp16); AutoCast with its defaults keeps nothing fp32 "
        "(LayerNorm, the norms and the logits in fp16) and loses 1-4 dB. Ours needs no extra package.", "",
        "ModelOpt was installed lean: `pip install --no-deps nvidia-modelopt` plus onnx-graphsurgeon, nvidia-ml-py, "
        "lief and polygraphy (what `modelopt.onnx` imports), never its `[onnx]` extra (onnx~=1.21, onnxruntime-gpu "
        "pins). It runs on the CPU execution provider (it logs that NVML is missing). It patches ONNX Runtime's "
        "calibrators in place and never restores them; `castling_deploy/quantize/modelopt.py` puts them back, or "
        "ONNX Runtime calibration later in the same process collects nothing.", ""]
    return lines


def markdown(result: dict[str, Any]) -> str:
    lines = ["# QuantRecipe vs NVIDIA ModelOpt for TensorRT (no TensorRT here: no engine was built)", "",
             f"ModelOpt {result['modelopt'] or 'absent: ' + str(result['modelopt_missing_reason'])}, ONNX Runtime "
             f"{result['onnxruntime']}, torch {result['torch']}, {result['machine']} ({', '.join(result['isa'])}), "
             "1 thread. \"exact\" = ONNX Runtime with graph optimizations off: every Q/DQ computed as written (what "
             "TensorRT's explicit quantization implements). \"fp16 islands\" = the same file after our typed fp16 pass "
             "(what the TensorRT target ships as model.int8.onnx). s = seconds to quantize on this CPU.", ""]
    for m in result["models"]:
        f = m["fp32_onnx"]
        lines += [f"## {m['model']} @ {m['img_size']} ({m['data']}; calibration {m['calib_images']} images, "
                  f"{m['eval_images']} evaluated)", "",
                  f"Float ONNX vs torch: max abs {f['max_abs_logit']:.1e}"
                  + (f", top-1 {f['top1_acc']:.2f}%" if "top1_acc" in f else "") + ".", ""]
        lines += _int8_table(m["int8"]) + [""] + _fp16_table(m["fp16"]) + [""]
        for label, v in m.get("reference_evaluator", {}).items():
            lines.append(f"- {label} on {m['eval_images'] if m['eval_images'] < 64 else 64} images, max abs vs torch: "
                         f"ONNX Runtime CPU {v['ort']['max_abs_logit']:.2e} (SQNR {v['ort']['sqnr_db']:.1f} dB), "
                         f"ONNX reference evaluator in numpy fp16 {v['numpy']['max_abs_logit']:.2e} "
                         f"(SQNR {v['numpy']['sqnr_db']:.1f} dB)")
        for r in m["int8"]:
            if "top1_drop_points" in r.get("exact_fp16_islands", {}):
                lines.append(f"- {r['variant']}: top-1 {r['exact_fp16_islands']['top1_acc']:.2f}% "
                             f"(drop {r['exact_fp16_islands']['top1_drop_points']:+.2f} points, fp16 islands)")
        lines.append("")
    return "\n".join(lines + _verdict(result)) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["demo", "castling_deit_tiny"])
    ap.add_argument("--calib", type=int, default=64)
    ap.add_argument("--eval", type=int, default=64)
    ap.add_argument("--out", default=str(RESULTS / "modelopt.json"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from castling_deploy.quantize.modelopt import modelopt_version

    import onnxruntime

    mo = modelopt_version()
    result: dict[str, Any] = {
        "modelopt": mo, "modelopt_missing_reason": None if mo else "nvidia-modelopt is not importable here",
        "onnxruntime": onnxruntime.__version__, "torch": torch.__version__, "machine": platform.machine(),
        "isa": cpu_isa().split(), "threads": 1, "models": [],
    }
    for name in args.models:  # written after every model: a long run that dies keeps what it measured
        result["models"].append(bench_model(name, args, mo is not None))
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    md = markdown(result)
    Path(args.out).with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
