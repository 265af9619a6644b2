"""Ceiling of the LiteRT int8 speed-up for castling_deit_tiny: how much of the fp32 time is GEMM, how much faster
those GEMMs get on the PT2E int8 path, and what Amdahl's law allows for the whole model.

ai-edge-litert's Python Interpreter exposes no per-op profiler, so per-op time comes from one-op models:
1. Convert the model with ``convert_tflite`` in mode fp32 and int8 (the product's PT2E hybrid path) and list
   its GEMM-like ops (FULLY_CONNECTED, BATCH_MATMUL, CONV_2D) from the fp32 .tflite itself
   (``Interpreter._get_ops_details()`` + tensor shapes), grouped by (op, input shapes), with counts. The
   int8 .tflite's op of the same shapes says what the product runs it in (int8 or float).
2. Per distinct shape, a one-op torch module rebuilt from those shapes (Linear / matmul / Conv2d) is converted
   with the same calls convert.py makes (litert-torch; PT2E via its ``_pt2e_quantizer``, calibrated on a few
   random inputs of the op's shapes; ``convert_tflite`` itself only takes image-shaped models). The patch-embed
   conv's one-op module keeps the module path ``patch_embed.proj``, so the product quantizer keeps it float as
   it does in the model; a quantized twin is timed for reference only. The attention's 9x1 depthwise conv is
   timed too but is not counted as GEMM.
3. All one-op models, a tiny one-op model (ADD on 8 floats: the per-invoke overhead, subtracted from every
   one-op time) and the whole fp32 and int8 models are timed with ``interpreter.invoke()`` only (inputs set
   once), default XNNPACK delegate, 1 thread, batch 1, fully interleaved (each round calls every interpreter
   once), medians.
4. G_fp32 = sum(count x (t_fp32 - overhead)) over the GEMM ops, G_int8 the same with the int8 one-op models
   (their QUANTIZE/DEQUANTIZE included: the product has them around each int8 op too). GEMM share =
   G_fp32 / T_fp32, k = G_fp32 / G_int8, Amdahl ceiling = T_fp32 / (T_fp32 - G_fp32 + G_int8), and the
   ceiling if everything but the GEMMs cost nothing in int8 = T_fp32 / G_int8.

Caveats: a one-op model runs with its weights hot in cache (in the model they are evicted between blocks) and
without the surrounding ops' layout work, so G is a lower bound of the in-model GEMM time; the invoke overhead
is subtracted once per one-op model.

    .venv/bin/python benchmarks/bench_litert_ceiling.py              # deit_tiny@224, 200 interleaved runs
    .venv/bin/python benchmarks/bench_litert_ceiling.py --runs 50

Writes benchmarks/results/litert_ceiling.json and litert_ceiling.md and prints the markdown table.
"""
from __future__ import annotations

import argparse
import collections
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_litert import _image_like, environment, quiet_logging  # noqa: E402  (same inputs as bench_litert)

from castling_deploy.output import atomic_write_bytes  # noqa: E402
from castling_deploy.quiet import quiet_native_output  # noqa: E402

log = logging.getLogger("bench_litert_ceiling")

GEMM_OPS = ("FULLY_CONNECTED", "BATCH_MATMUL", "CONV_2D")
OTHER_OPS = ("DEPTHWISE_CONV_2D",)  # quantized by the product, timed, not counted as GEMM
OVERHEAD = "tiny_add"
# One-op model variants: fp32; PT2E int8 as converted (int8 in, int8 out: the kernel alone); the same with float
# I/O (convert.py's ``_float_io``: QUANTIZE before, DEQUANTIZE after, as around each int8 op of the hybrid model).
VARIANTS = ("fp32", "int8", "int8_qdq")


# ------------------------------------------------------------------------------------------ op inventory
def _interpreter(path: Path, delegate: bool = True) -> Any:
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    kind = OpResolverType.AUTO if delegate else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    interp = Interpreter(model_path=str(path), num_threads=1, experimental_op_resolver_type=kind)
    interp.allocate_tensors()
    return interp


def _op_list(path: Path) -> list[dict[str, Any]]:
    """Ops of a .tflite (no delegate applied): name, input/output shapes and dtypes."""
    interp = _interpreter(path, delegate=False)
    td = {d["index"]: d for d in interp.get_tensor_details()}

    def desc(idx: list[int]) -> list[tuple[tuple[int, ...], str]]:
        return [(tuple(int(s) for s in td[i]["shape"]), np.dtype(td[i]["dtype"]).name) for i in idx if i >= 0]

    return [{"op": o["op_name"], "inputs": desc(o["inputs"]), "outputs": desc(o["outputs"])}
            for o in interp._get_ops_details()]


def _key(op: dict[str, Any]) -> tuple[Any, ...]:
    """Identity of an op across the fp32 and int8 files: name and input shapes (weights/bias included)."""
    return (op["op"], tuple(s for s, _ in op["inputs"]))


def gemm_inventory(fp32_path: Path, int8_path: Path) -> list[dict[str, Any]]:
    """Distinct GEMM-like (and other quantized) ops of the fp32 model with counts and the int8 model's dtypes."""
    int8_by_key: dict[tuple[Any, ...], dict[str, Any]] = {}
    for op in _op_list(int8_path):
        int8_by_key.setdefault(_key(op), op)
    groups: collections.OrderedDict[tuple[Any, ...], dict[str, Any]] = collections.OrderedDict()
    for op in _op_list(fp32_path):
        if op["op"] not in GEMM_OPS + OTHER_OPS:
            continue
        entry = groups.setdefault(_key(op), {"op": op["op"], "inputs": [s for s, _ in op["inputs"]],
                                             "output": op["outputs"][0][0], "count": 0})
        entry["count"] += 1
    out = []
    for key, entry in groups.items():
        twin = int8_by_key.get(key)
        entry["gemm"] = entry["op"] in GEMM_OPS
        entry["product_int8_dtypes"] = [d for _, d in twin["inputs"]] if twin else None
        entry["name"] = _name(entry)
        out.append(entry)
    return out


def _name(entry: dict[str, Any]) -> str:
    ins = entry["inputs"]
    if entry["op"] == "FULLY_CONNECTED":
        return f"FC {ins[1][1]}->{ins[1][0]} x{int(np.prod(ins[0][:-1]))} tok"
    if entry["op"] == "BATCH_MATMUL":
        return f"BMM {'x'.join(map(str, ins[0]))} @ {'x'.join(map(str, ins[1]))}"
    if entry["op"] == "CONV_2D":
        return f"conv {ins[1][1]}x{ins[1][2]} {ins[0][3]}->{ins[1][0]} @{ins[0][1]}"
    return f"dwconv {ins[1][1]}x{ins[1][2]} on {'x'.join(map(str, ins[0]))}"


# ------------------------------------------------------------------------------------- one-op modules
def _one_op_module(entry: dict[str, Any]) -> tuple[Any, dict[str, tuple[int, ...]]]:
    """A torch module computing just this op, and its input shapes (torch layout), rebuilt from the .tflite shapes."""
    from torch import nn

    ins, out = entry["inputs"], entry["output"]
    if entry["op"] == "FULLY_CONNECTED":
        w = ins[1]
        return _Single(nn.Linear(w[1], w[0], bias=len(ins) > 2)), {"x": ins[0]}
    if entry["op"] == "BATCH_MATMUL":
        if tuple(out) != tuple(ins[0][:-1]) + (ins[1][-1],):
            raise RuntimeError(f"BATCH_MATMUL {ins} -> {out}: adjoint inputs not handled")
        return _MatMul(), {"a": ins[0], "b": ins[1]}
    n, h, wd, cin = ins[0]  # NHWC in the .tflite; the torch module takes NCHW like the model
    cout, kh, kw = ins[1][0], ins[1][1], ins[1][2]
    if entry["op"] == "CONV_2D":
        ho = out[1]
        stride = (h - kh) // (ho - 1) if ho > 1 else 1
        if (h - kh) // stride + 1 != ho:
            raise RuntimeError(f"CONV_2D {ins} -> {out}: only VALID padding handled")
        conv = nn.Conv2d(cin, cout, (kh, kw), stride=stride, bias=len(ins) > 2)
        return _Single(_PatchEmbed(conv) if entry.get("as_patch_embed", True) else conv), {"x": (n, cin, h, wd)}
    if tuple(out) != tuple(ins[0]):
        raise RuntimeError(f"DEPTHWISE_CONV_2D {ins} -> {out}: only SAME padding, stride 1 handled")
    conv = nn.Conv2d(cin, cin, (kh, kw), padding=(kh // 2, kw // 2), groups=cin, bias=False)
    return _Single(conv), {"x": (n, cin, h, wd)}


def _modules() -> tuple[type, type, type, type]:
    from torch import nn

    class Single(nn.Module):
        def __init__(self, op: nn.Module) -> None:
            super().__init__()
            self.op = op

        def forward(self, x):  # noqa: ANN001, ANN201
            return {"y": self.op(x)}

    class MatMul(nn.Module):
        def forward(self, a, b):  # noqa: ANN001, ANN201
            return {"y": a @ b}

    class PatchEmbed(nn.Module):
        """Holds the conv at ``...patch_embed.proj`` so the product's PT2E quantizer keeps it float."""

        def __init__(self, conv: nn.Module) -> None:
            super().__init__()
            self.patch_embed = nn.Module()
            self.patch_embed.proj = conv

        def forward(self, x):  # noqa: ANN001, ANN201
            return self.patch_embed.proj(x)

    class TinyAdd(nn.Module):
        def forward(self, x):  # noqa: ANN001, ANN201
            return {"y": x + 1.0}

    return Single, MatMul, PatchEmbed, TinyAdd


_Single, _MatMul, _PatchEmbed, _TinyAdd = _modules()


def _convert_fp32(module: Any, shapes: dict[str, tuple[int, ...]]) -> bytes:
    import torch

    from castling_deploy.targets.tflite.convert import litert_float

    return litert_float(module, {k: torch.zeros(s) for k, s in shapes.items()})


def _convert_int8(module: Any, shapes: dict[str, tuple[int, ...]], calib: int, seed: int) -> bytes:
    """The product's PT2E int8 path (same quantizer, same calls) on random inputs of the op's shapes."""
    import torch

    from castling_deploy.targets.tflite.convert import litert_pt2e_int8

    g = torch.Generator().manual_seed(seed)
    batches = ({k: torch.randn(s, generator=g) for k, s in shapes.items()} for _ in range(calib))
    return litert_pt2e_int8(module, {k: torch.zeros(s) for k, s in shapes.items()}, batches)


# ------------------------------------------------------------------------------------------------ timing
def _ready(path: Path, seed: int, data: np.ndarray | None = None) -> Any:
    """XNNPACK interpreter (1 thread) with its inputs set once: timing calls ``invoke()`` only."""
    interp = _interpreter(path)
    rng = np.random.default_rng(seed)
    for d in interp.get_input_details():
        if data is not None:
            x = data
        elif np.issubdtype(d["dtype"], np.integer):
            x = rng.integers(-128, 128, size=d["shape"])
        else:
            x = rng.standard_normal(d["shape"])
        interp.set_tensor(d["index"], np.asarray(x).astype(d["dtype"]))
    interp.invoke()
    return interp


def _ops_summary(path: Path, listing: bool = True) -> dict[str, Any]:
    """The ops (``NAME(input dtypes)``, in order; counted per name if not ``listing``) and XNNPACK's share."""
    from castling_deploy.targets.tflite.census import delegation_split

    names = [f"{o['op']}({','.join(d for _, d in o['inputs'])})" for o in _op_list(path)]
    split = delegation_split(path)
    return {"ops": names if listing else dict(collections.Counter(names).most_common()),
            "ops_on_xnnpack": split["ops_on_xnnpack"], "ops_total": split["ops_total"],
            "builtin_ops": split["builtin_ops"], "xnnpack_partitions": split["xnnpack_partitions"]}


# --------------------------------------------------------------------------------------------- analysis
def _total(entries: list[dict[str, Any]], variant: str, overhead: float) -> float:
    return sum(e["count"] * max(e["p50_ms"][variant] - overhead, 0.0) for e in entries)


def ceiling(inventory: list[dict[str, Any]], t_fp32: float, t_int8: float, overhead: float) -> dict[str, float]:
    """GEMM share, int8 GEMM speed-up k and the Amdahl ceilings from per-op medians (ms).

    int8 one-op times are taken as the product's PT2E path makes them (the ops it keeps float stay float);
    "kernel" = int8 I/O, "qdq" = float I/O with its QUANTIZE/DEQUANTIZE.
    """
    gemm = [e for e in inventory if e["gemm"]]
    quantized = [e for e in gemm if e["product_int8_dtypes"] and e["product_int8_dtypes"][0] == "int8"]
    g32 = _total(gemm, "fp32", overhead)
    out: dict[str, float] = {
        "T_fp32_ms": round(t_fp32, 3), "T_int8_ms": round(t_int8, 3),
        "measured_speedup": round(t_fp32 / t_int8, 3), "invoke_overhead_ms": round(overhead, 4),
        "G_fp32_ms": round(g32, 3), "gemm_share_fp32": round(g32 / t_fp32, 4),
        "non_gemm_fp32_ms": round(t_fp32 - g32, 3),
        "int8_gemm_share_fp32": round(_total(quantized, "fp32", overhead) / t_fp32, 4),
    }
    for tag, variant in (("kernel", "int8"), ("qdq", "int8_qdq")):
        g8 = _total(gemm, variant, overhead)
        k_q = _total(quantized, "fp32", overhead) / _total(quantized, variant, overhead)
        out.update({
            f"G_int8_{tag}_ms": round(g8, 3),
            f"k_{tag}": round(g32 / g8, 3),
            f"k_{tag}_int8_gemms_only": round(k_q, 3),
            # what-if: every GEMM (float BATCH_MATMULs and patch conv included) sped up by the int8 ones' k
            f"ceiling_all_gemms_at_int8_k_{tag}": round(t_fp32 / (t_fp32 - g32 + g32 / k_q), 3),
            f"predicted_T_int8_{tag}_ms": round(t_fp32 - g32 + g8, 3),
            f"amdahl_ceiling_{tag}": round(t_fp32 / (t_fp32 - g32 + g8), 3),
            f"ceiling_non_gemm_free_{tag}": round(t_fp32 / g8, 3),
            f"non_gemm_int8_ms_implied_{tag}": round(t_int8 - g8, 3),
        })
    return out


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if a > 0 and b > 0 else "–"


def _table(result: dict[str, Any]) -> str:
    lines = [
        "| op (from the fp32 .tflite) | count | product int8 runs it in | fp32 ms | int8 kernel ms | int8+Q/DQ ms | "
        "k kernel | k +Q/DQ | fp32 ms x count | share of T_fp32 | int8+Q/DQ one-op model (ops on XNNPACK) |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    t32, oh = result["summary"]["T_fp32_ms"], result["summary"]["invoke_overhead_ms"]
    for e in result["ops"]:
        f, q, qq = (e["p50_ms"][v] - oh for v in VARIANTS)
        dt = e["product_int8_dtypes"][0] if e["product_int8_dtypes"] else "–"
        ops8 = e["int8_qdq_model"]
        chain = " ".join(o.split(",")[0].rstrip(")") + ")" for o in ops8["ops"])  # op(first input dtype)
        label = e["name"] + ("" if e["gemm"] else " (not GEMM)") + (" [reference only]" if e.get("reference") else "")
        lines.append(
            f"| {label} | {e['count']} | {dt} | {f:.4f} | {q:.4f} | {qq:.4f} | {_ratio(f, q)} | "
            f"{_ratio(f, qq)} | {e['count'] * f:.3f} | {100 * e['count'] * f / t32:.1f}% | "
            f"{chain} ({ops8['ops_on_xnnpack']}/{ops8['ops_total']}) |"
        )
    s = result["summary"]
    lines += [
        "",
        "| quantity | value |",
        "|---|---:|",
        f"| whole model T_fp32 / T_int8 (ms, invoke only) | {s['T_fp32_ms']:.2f} / {s['T_int8_ms']:.2f} "
        f"({s['measured_speedup']:.2f}x) |",
        f"| per-invoke overhead (tiny ADD model, subtracted per one-op time) | "
        f"{1e3 * s['invoke_overhead_ms']:.1f} us |",
        f"| G_fp32: GEMM time x counts (ms) | {s['G_fp32_ms']:.2f} |",
        f"| GEMM share of fp32 model (of which the product runs in int8) | {100 * s['gemm_share_fp32']:.1f}% "
        f"({100 * s['int8_gemm_share_fp32']:.1f}%) |",
    ]
    for tag, what in (("kernel", "int8 kernel alone"), ("qdq", "int8 + its QUANTIZE/DEQUANTIZE")):
        lines += [
            f"| G_int8 ({what}, ms) | {s[f'G_int8_{tag}_ms']:.2f} |",
            f"| k ({what}): all GEMMs as the product runs them / int8 ones only | {s[f'k_{tag}']:.2f}x / "
            f"{s[f'k_{tag}_int8_gemms_only']:.2f}x |",
            f"| Amdahl ceiling T_fp32 / (T_fp32 - G_fp32 + G_int8) ({what}) | **{s[f'amdahl_ceiling_{tag}']:.2f}x** |",
            f"| ceiling if all non-GEMM work were free: T_fp32 / G_int8 ({what}) | "
            f"{s[f'ceiling_non_gemm_free_{tag}']:.2f}x |",
            f"| what-if: every GEMM (BMMs, patch conv too) at the int8 FCs' k, non-GEMM unchanged ({what}) | "
            f"{s[f'ceiling_all_gemms_at_int8_k_{tag}']:.2f}x |",
            f"| predicted T_int8 vs measured (ms) ({what}) | {s[f'predicted_T_int8_{tag}_ms']:.2f} vs "
            f"{s['T_int8_ms']:.2f} |",
        ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- main
def _convert_model(arch: str, img_size: int, tmp: Path, calib: int) -> dict[str, Path]:
    import torch

    from castling_deploy.models import create_model
    from castling_deploy.targets.tflite.convert import convert_tflite

    torch.manual_seed(0)
    model = create_model(arch, form="deploy", img_size=img_size).eval()
    paths = {}
    for mode in ("fp32", "int8"):
        paths[mode] = tmp / f"model_{mode}.tflite"
        log.info("converting the whole model, %s ...", mode)
        with quiet_native_output(enabled=False):
            convert_tflite(model, paths[mode], mode=mode, img_size=img_size,
                           calib_images=None if mode == "fp32" else _image_like(calib, img_size, seed=1))
    return paths


def _convert_one_ops(inventory: list[dict[str, Any]], tmp: Path, calib: int) -> None:
    """Adds ``paths`` (one .tflite per VARIANTS entry) and each one's op summary to every inventory entry."""
    import torch

    from castling_deploy.targets.tflite.convert import _float_io

    for i, e in enumerate(inventory):
        torch.manual_seed(100 + i)
        module, shapes = _one_op_module(e)
        e["torch_input_shapes"] = {k: list(v) for k, v in shapes.items()}
        e["paths"] = {}
        log.info("one-op %s: converting fp32 and int8 ...", e["name"])
        with quiet_native_output(enabled=False):
            int8 = _convert_int8(module, shapes, calib, i)
            data = {"fp32": _convert_fp32(module, shapes), "int8": int8, "int8_qdq": _float_io(int8)}
        for mode in VARIANTS:
            e["paths"][mode] = tmp / f"op{i}_{mode}.tflite"
            e["paths"][mode].write_bytes(data[mode])
            e[f"{mode}_model"] = _ops_summary(e["paths"][mode])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="castling_deit_tiny")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--runs", type=int, default=200, help="timed runs per interpreter, one per interleaved round")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--calib", type=int, default=8, help="random calibration inputs per one-op model")
    ap.add_argument("--model-calib", type=int, default=64, help="image-like calibration inputs, whole int8 model")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args(argv)
    quiet_logging()
    t_start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="castling-bench-ceiling-") as tmp_s:
        tmp = Path(tmp_s)
        model_paths = _convert_model(args.arch, args.img_size, tmp, args.model_calib)
        inventory = gemm_inventory(model_paths["fp32"], model_paths["int8"])
        conv = next((e for e in inventory if e["op"] == "CONV_2D"), None)
        if conv is not None:  # the same conv quantized, for reference (the product keeps it float)
            inventory.append({**conv, "as_patch_embed": False, "reference": True, "gemm": False,
                              "name": conv["name"] + " quantized", "product_int8_dtypes": None})
        _convert_one_ops(inventory, tmp, args.calib)
        tiny = tmp / "tiny_add.tflite"
        with quiet_native_output(enabled=False):
            tiny.write_bytes(_convert_fp32(_TinyAdd(), {"x": (1, 8)}))
        whole = {m: _ops_summary(p, listing=False) for m, p in model_paths.items()}

        image = _image_like(1, args.img_size, seed=2)
        keys: list[tuple[str, str]] = [(OVERHEAD, "fp32"), ("model", "fp32"), ("model", "int8")]
        interps = [_ready(tiny, 0), _ready(model_paths["fp32"], 0, image), _ready(model_paths["int8"], 0, image)]
        for i, e in enumerate(inventory):
            for mode in VARIANTS:
                keys.append((str(i), mode))
                interps.append(_ready(e["paths"][mode], i))
        log.info("timing %d interpreters x %d runs, fully interleaved ...", len(interps), args.runs)
        from castling_deploy.profiling.timer import time_interleaved

        samples = time_interleaved([it.invoke for it in interps], args.runs, args.warmup, rounds=args.runs)
        del interps
    p50 = {k: float(np.median(v)) for k, v in zip(keys, samples)}
    for i, e in enumerate(inventory):
        e["p50_ms"] = {m: round(p50[(str(i), m)], 4) for m in VARIANTS}
        e.pop("paths")
        e.pop("as_patch_embed", None)
    summary = ceiling(inventory, p50[("model", "fp32")], p50[("model", "int8")], p50[(OVERHEAD, "fp32")])
    result = {
        "arch": args.arch, "img_size": args.img_size, "batch": 1, "threads": 1, "runs": args.runs,
        "warmup": args.warmup, "calib_per_one_op": args.calib, "model_calib_images": args.model_calib,
        "method": __doc__.split("\n\n")[1],
        "summary": summary, "ops": inventory, "whole_models": whole,
        "samples_ms": {f"{a}:{m}": [round(float(t), 4) for t in v] for (a, m), v in zip(keys, samples)},
        "environment": environment("ai-edge-litert", "litert-torch", "torchao"),
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    table = _table(result)
    env = result["environment"]
    atomic_write_bytes(args.out / "litert_ceiling.json", (json.dumps(result, indent=2, default=str) + "\n").encode())
    atomic_write_bytes(
        args.out / "litert_ceiling.md",
        (f"# LiteRT int8 speed-up ceiling: {args.arch} @ {args.img_size}\n\n{table}\n\n"
         f"One-op models rebuilt from the fp32 .tflite's GEMM shapes, converted fp32 and PT2E int8 (the product's "
         f"quantizer), timed with `invoke()` only, XNNPACK, 1 thread, batch 1, {args.runs} runs each after "
         f"{args.warmup} warmup, every interpreter once per round (fully interleaved), medians; ms columns have the "
         f"tiny-model invoke overhead subtracted. \"int8 kernel\": the PT2E one-op model as converted (int8 "
         f"in/out); \"int8+Q/DQ\": the same with float I/O (QUANTIZE/DEQUANTIZE, as around each int8 op of the "
         f"product). One-op models run with hot weights, so G is a lower bound. "
         f"Method: benchmarks/bench_litert_ceiling.py docstring.\n\n"
         f"Host: {env['processor']} ({env['isa']}), {env['cpu_count']} CPUs (shared), torch {env['torch']}, "
         f"ai-edge-litert {env['ai-edge-litert']}, litert-torch {env['litert-torch']}, torchao {env['torchao']}. "
         f"Wall time {result['wall_s']} s.\n").encode(),
    )
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
