"""Prove the suite bites: apply meaningful mutants to a copy of the repository and check the tests kill each one.

Run on demand (pytest does not collect this file: its name does not match ``test_*.py``):

    .venv/bin/python tests/mutation_check.py              # baseline, then every mutant (tens of minutes on 2 cores)
    .venv/bin/python tests/mutation_check.py --list
    .venv/bin/python tests/mutation_check.py --only wiring-tflite-int8 --only tolerance-inverted
    .venv/bin/python tests/mutation_check.py --no-baseline

For every mutant the working tree (tracked and untracked files, without .venv/.git/exports/caches) is copied to a
temporary folder, one or more exact text edits are applied there (an edit whose text is not found exactly once is an
error, never a silent pass), and the tests that should notice are run with this venv's python from inside the copy
with ``PYTHONPATH=<copy>``. The venv has the project installed editable from /work/main, so the runner first asserts,
in the pytest process itself, that ``castling_deploy`` is imported from the copy. A mutant is *killed* when pytest
exits 1 (tests failed); an exit with collection/usage errors is reported as an error, not a kill. The baseline run
(same tests, no mutant) must pass, or the kills mean nothing.

Writes tests/mutation_results.json and prints a table; exits 0 only when every listed mutant was killed.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "tests" / "mutation_results.json"
IGNORE = shutil.ignore_patterns(".venv", ".git", "exports", "__pycache__", "*.pyc", ".pytest_cache", ".ruff_cache",
                                "*.egg-info", "build", "dist", ".cache", "mutation_results.json")

T = "tests/test_targets_cli.py::"
RECHECK = T + "test_every_claim_rechecked_independently"
BROKEN = T + "test_broken_artifact_fails_its_own_stage_with_exit_3"


@dataclass
class Mutant:
    id: str
    what: str
    edits: list[tuple[str, str, str]]  # (file, exact old text, new text)
    tests: list[str]  # pytest node ids or files, run from the copy's root
    notes: str = ""
    result: dict = field(default_factory=dict)


MUTANTS = [
    # ---- a stage wired to the wrong artifact, one per target -----------------------------------------------
    Mutant("wiring-onnx-int8", "ONNX int8 stage verifies model.onnx instead of model.int8.onnx",
           [("castling_deploy/targets/onnx/target.py",
             'stage = sess.verify("int8", candidate, OrtRunner(out), precision="int8")',
             'stage = sess.verify("int8", candidate, OrtRunner(fp32), precision="int8")')],
           [RECHECK + "[onnx]", BROKEN + "[onnx/model.int8.onnx]"]),
    Mutant("wiring-tensorrt-int8", "TensorRT model.int8.onnx linked to the fp32 export stage",
           [("castling_deploy/targets/tensorrt/target.py",
             'outcome.add(qdq.name, "int8", _RUNTIME["int8"], stage)',
             'outcome.add(qdq.name, "int8", _RUNTIME["int8"], outcome.stages[0])')],
           [RECHECK + "[tensorrt]", BROKEN + "[tensorrt/model.int8.onnx]"]),
    Mutant("wiring-tflite-int8", "LiteRT int8 stage verifies the fp32 .tflite (the issue's first example)",
           [("castling_deploy/targets/tflite/target.py",
             'LiteRTRunner(p), precision="int8")', 'LiteRTRunner(fp32), precision="int8")')],
           [RECHECK + "[tflite]", BROKEN + "[tflite/model.int8.tflite]"]),
    Mutant("wiring-tflite-fp16", "LiteRT fp16 stage verifies the fp32 .tflite",
           [("castling_deploy/targets/tflite/target.py",
             'LiteRTRunner(p), precision="fp16")', 'LiteRTRunner(fp32), precision="fp16")')],
           [RECHECK + "[tflite]", BROKEN + "[tflite/model.fp16.tflite]"]),
    Mutant("wiring-coreml-w8a8", "Core ML W8A8 stage verifies the fp16 package (the issue's second example)",
           [("castling_deploy/targets/coreml/target.py", "load_coreml_runner(q)", "load_coreml_runner(shipped)")],
           [RECHECK + "[coreml]", BROKEN + "[coreml/model.int8.mlpackage]"]),
    # ---- the accept/reject rule ---------------------------------------------------------------------------
    Mutant("tolerance-inverted", "top-1 drop compared the wrong way round (budget.accuracy_goal_failures)",
           [("castling_deploy/budget.py", "if top1_drop_points > tolerance_points + 1e-9:",
             "if top1_drop_points < tolerance_points + 1e-9:")],
           ["tests/test_budget.py"]),
    Mutant("tolerance-loosened", "a point of slack on the tolerance (drop 1.0 passes tolerance 0.5)",
           [("castling_deploy/budget.py", "if top1_drop_points > tolerance_points + 1e-9:",
             "if top1_drop_points > tolerance_points + 1.0:")],
           ["tests/test_budget.py"]),
    Mutant("agreement-inverted", "top-1 agreement goal compared the wrong way round",
           [("castling_deploy/budget.py", "if top1_agreement < agree_goal - 1e-9:",
             "if top1_agreement > agree_goal - 1e-9:")],
           ["tests/test_budget.py"]),
    Mutant("nonfinite-ignored", "NaN/Inf logits no longer fail a stage",
           [("castling_deploy/budget.py", "if not np.isfinite(logits).all():", "if False:")],
           ["tests/test_budget.py"]),
    # ---- calibration cache key ----------------------------------------------------------------------------
    Mutant("calib-key-no-percentile", "percentile dropped from the calibration cache key",
           [("castling_deploy/quantize/recipe.py",
             '"percentile": self.percentile if self.calibration == "percentile" else None,', "")],
           ["tests/test_quantize.py::test_calibration_cache_is_keyed_and_never_crosses_keys"]),
    Mutant("calib-key-no-pre-raw", "pre-processed vs raw graph dropped from the calibration cache key",
           [("castling_deploy/quantize/ort_int8.py",
             'calib_key = recipe.calibration_key() + (":pre" if preprocess else ":raw")',
             "calib_key = recipe.calibration_key()")],
           ["tests/test_quantize.py::test_calibration_cache_is_keyed_and_never_crosses_keys"]),
    # ---- the fold gate ------------------------------------------------------------------------------------
    Mutant("fold-gate-disabled", "the fold never refuses",
           [("castling_deploy/fold.py", "    if not stage.passed:\n        if force:",
             "    if False:\n        if force:")],
           ["tests/test_fold.py::test_alive_branch_is_refused_with_exit_3_and_a_table",
            "tests/test_fold.py::test_labelled_refusal_on_accuracy_while_agreement_holds"]),
    Mutant("fold-ignores-labels", "the fold gate measures agreement only, never the labelled accuracy drop",
           [("castling_deploy/fold.py", "CPU\", ref, out, data.labels,", "CPU\", ref, out, None,")],
           ["tests/test_fold.py::test_labelled_refusal_on_accuracy_while_agreement_holds"]),
    # ---- path confinement ---------------------------------------------------------------------------------
    Mutant("report-path-escape", "report.json artifact paths may leave the export folder ('..', absolute)",
           [("castling_deploy/report.py", 'if rel.is_absolute() or ".." in rel.parts or not rel.parts:',
             "if not rel.parts:")],
           ["tests/test_contract.py::test_report_artifact_paths_stay_inside_the_folder"]),
    Mutant("archive-dotdot", "package members with '..' are no longer refused",
           [("castling_deploy/packaging/archive.py", 'if ".." in PurePosixPath(raw).parts:', "if False:")],
           ["tests/test_package.py::test_unsafe_archives_are_refused_before_writing"]),
    Mutant("archive-absolute", "absolute package member names are no longer refused",
           [("castling_deploy/packaging/archive.py", 'if raw.startswith("/") or (len(raw) > 1 and raw[1] == ":"):',
             "if False:")],
           ["tests/test_package.py::test_unsafe_archives_are_refused_before_writing"]),
    # ---- cleanup --------------------------------------------------------------------------------------------
    Mutant("run-temp-leaks", "run temp folders (shared float ONNX, Core ML fp32, sweeps) are not registered for "
           "interrupt cleanup",
           [("castling_deploy/output.py", "    _MINE.add(path.name)\n    register_cleanup(path)\n    return path",
             "    _MINE.add(path.name)\n    return path")],
           ["tests/test_export_onnx.py::test_sigterm_during_a_second_target_removes_every_temp_folder"]),
    Mutant("staging-kept-on-error", "a failed build leaves its staging folder behind",
           [("castling_deploy/output.py",
             "    except BaseException:\n        shutil.rmtree(staging, ignore_errors=True)\n        raise",
             "    except BaseException:\n        raise")],
           ["tests/test_export_onnx.py::test_crash_during_reexport_keeps_the_previous_good_export",
            "tests/test_export_onnx.py::test_interrupt_mid_export_leaves_no_artifact"]),
    # ---- reference implementations the targets are judged by ------------------------------------------------
    Mutant("mil-blockwise-offset-sign", "MIL interpreter adds the blockwise offset instead of subtracting it",
           [("castling_deploy/runtime/mil_interp.py", "data = data - offset.astype(np.float32)",
             "data = data + offset.astype(np.float32)")],
           ["tests/test_mil_interp.py::test_constexpr_blockwise_shift_scale_by_value"]),
    Mutant("mil-same-padding-swapped", "MIL interpreter puts the odd 'same' padding row at the start",
           [("castling_deploy/runtime/mil_interp.py", 'lo = total // 2 if pad_type == "same" else total - total // 2',
             'lo = total - total // 2 if pad_type == "same" else total // 2')],
           ["tests/test_mil_interp.py::test_conv_same_padding_by_value"]),
    Mutant("pos-embed-bilinear", "position embeddings resampled bilinearly instead of bicubic",
           [("castling_deploy/models/vit.py", 'mode="bicubic", align_corners=False, antialias=True',
             'mode="bilinear", align_corners=False, antialias=True')],
           ["tests/test_checkpoint.py::test_pos_embed_resampled_for_new_resolution"]),
    # ---- verification without a dataset, engines on devices ------------------------------------------------
    Mutant("reference-cosine-inverted", "a file that no longer gives its export-time logits passes the reference check",
           [("castling_deploy/reference.py", "if not m[\"min_sample_cosine\"] >= MIN_COSINE:",
             "if m[\"min_sample_cosine\"] >= MIN_COSINE:")],
           ["tests/test_reference.py"]),
    Mutant("reference-runs-not-recorded", "the export stops recording each file's own logits in reference.npz",
           [("castling_deploy/pipeline.py", "runs[a.file] = sess.reference_runs[reference_key(stage)]", "pass")],
           ["tests/test_reference.py"]),
    Mutant("engine-tensorrt-version-ignored", "an engine built by another TensorRT version is not refused",
           [("castling_deploy/devices/engine_compat.py",
             "if version_key(built) and version_key(have) and version_key(built) != version_key(have):",
             "if False:")],
           ["tests/devices/test_build_engine_remote.py"]),
    Mutant("engine-build-writes-before-verify", "a device build writes the engine into the export before --val ran",
           [("castling_deploy/targets/tensorrt/remote_build.py",
             "        engine = tmp / ENGINE_NAME\n",
             "        engine = tmp / ENGINE_NAME\n        atomic_write_bytes(folder / ENGINE_NAME, engine.read_bytes())\n")],
           ["tests/devices/test_build_engine_remote.py"]),
    Mutant("mse-clips-rsqrt-inputs", "full-integer range narrowing also clips the variances fed to RSQRT",
           [("castling_deploy/targets/tflite/full_integer.py",
             "if name in keep_full or name not in details", "if name not in details")],
           ["tests/test_tflite_full_integer.py::test_mse_ranges_narrow_activations_but_not_rsqrt_inputs"]),
    Mutant("requant-adopt-without-params", "folding a requantization rewires the BATCH_MATMUL without giving the "
           "group the symmetric grid",
           [("castling_deploy/targets/tflite/requant.py",
             "                sub.tensors[m].quantization.scale = [p_dst[0]]\n"
             "                sub.tensors[m].quantization.zeroPoint = [p_dst[1]]\n", "                pass\n")],
           ["tests/test_tflite_requant.py"]),
    Mutant("token-conv-wrong-repeat", "the token conv repeats the head kernels in the wrong order",
           [("castling_deploy/models/token_conv.py", "w.repeat_interleave(attn.head_dim, dim=0)",
             "w.repeat(attn.head_dim, 1, 1, 1)")],
           ["tests/test_tflite_xnn_spelling.py"]),
    Mutant("int16-beyond-class-token", "full-integer 16x8 picks every op of the allowed types, the sequence-wide "
           "ones too (off XNNPACK, and no longer the class-token path)",
           [("castling_deploy/targets/tflite/full_integer.py",
             "if len(shape) >= 2 and all(d == 1 for d in shape[:-1]):", "if len(shape) >= 2:")],
           ["tests/test_tflite_full_integer.py::test_class_token_path_16x8_on_nano"]),
    Mutant("int16-recipe-dropped", "the 16x8 ops are chosen and reported but the recipe does not ask for int16",
           [("castling_deploy/targets/tflite/full_integer.py",
             "qt = quantizer.Quantizer(bytearray(fp32), xnnpack_recipe(int16))",
             "qt = quantizer.Quantizer(bytearray(fp32), xnnpack_recipe())")],
           ["tests/test_tflite_full_integer.py::test_class_token_path_16x8_on_nano"]),
]


def copy_tree(dst: Path) -> Path:
    shutil.copytree(REPO, dst, ignore=IGNORE, symlinks=True)
    return dst


def apply(root: Path, edits: list[tuple[str, str, str]]) -> None:
    for rel, old, new in edits:
        path = root / rel
        text = path.read_text()
        n = text.count(old)
        if n != 1:
            raise RuntimeError(f"{rel}: the text to mutate occurs {n} times (expected exactly 1): {old!r}")
        path.write_text(text.replace(old, new))


# Runs inside the copy: refuse to test anything but the copy's package, then hand over to pytest.
RUNNER = """
import os, sys
root = os.path.realpath(sys.argv[1])
import castling_deploy
where = os.path.realpath(castling_deploy.__file__)
print("castling_deploy imported from", where, flush=True)
if not where.startswith(root + os.sep):
    sys.exit("castling_deploy is not the copy's: " + where)
import pytest
sys.exit(pytest.main(sys.argv[2:]))
"""


def run_tests(root: Path, tests: list[str], log: Path, timeout: int) -> tuple[int, list[str], float, str]:
    env = dict(os.environ, PYTHONPATH=str(root), PYTHONDONTWRITEBYTECODE="1")
    env.pop("CASTLING_DEBUG", None)
    cmd = [sys.executable, "-c", RUNNER, str(root), "-p", "no:cacheprovider", "-q", "-rfE", "-m", "",
           "-o", "addopts=", *tests]
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout, check=False)
        rc, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        rc, out = -1, f"timeout after {timeout}s\n{exc.stdout or ''}{exc.stderr or ''}"
    log.write_text(out)
    imported = next((ln for ln in out.splitlines() if ln.startswith("castling_deploy imported from")), "")
    failed = sorted(set(re.findall(r"^(?:FAILED|ERROR) (\S+)", out, flags=re.MULTILINE)))
    return rc, failed, round(time.time() - t0, 1), imported


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", action="append", help="run only these mutant ids (repeatable)")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument("--no-baseline", action="store_true", help="skip the unmutated run of the selected tests")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per pytest run")
    ap.add_argument("--keep", action="store_true", help="keep the copies and logs")
    args = ap.parse_args()
    mutants = [m for m in MUTANTS if not args.only or m.id in args.only]
    if args.list or not mutants:
        for m in MUTANTS:
            print(f"{m.id:28} {m.what}\n{'':28} -> {', '.join(m.tests)}")
        return 0 if args.list else 2
    work = Path(tempfile.mkdtemp(prefix="castling-mutants-"))
    print(f"copies and logs under {work}", flush=True)
    results: dict = {"repo": str(REPO), "python": sys.executable, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                     "baseline": None, "mutants": []}
    if not args.no_baseline:  # every selected test must pass without a mutant, or a "kill" proves nothing
        tests = sorted({t for m in mutants for t in m.tests})
        root = copy_tree(work / "baseline")
        rc, failed, secs, imported = run_tests(root, tests, work / "baseline.log", args.timeout)
        results["baseline"] = {"rc": rc, "failed": failed, "seconds": secs, "imported": imported, "tests": tests}
        print(f"baseline: rc {rc} in {secs}s ({imported})", flush=True)
        if rc != 0:
            print(f"baseline does not pass ({failed}); see {work / 'baseline.log'}")
            RESULTS.write_text(json.dumps(results, indent=2) + "\n")
            return 1
    for m in mutants:
        root = work / m.id
        copy_tree(root)
        try:
            apply(root, m.edits)
        except RuntimeError as exc:
            m.result = {"status": "not applied", "error": str(exc)}
            print(f"{m.id}: NOT APPLIED: {exc}", flush=True)
            continue
        rc, failed, secs, imported = run_tests(root, m.tests, work / f"{m.id}.log", args.timeout)
        status = "killed" if rc == 1 and failed else ("survived" if rc == 0 else f"error (pytest exit {rc})")
        m.result = {"status": status, "killed_by": failed, "seconds": secs, "pytest_exit": rc, "imported": imported}
        print(f"{m.id}: {status} in {secs}s by {failed}", flush=True)
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    results["mutants"] = [{"id": m.id, "what": m.what, "edits": [e[0] for e in m.edits], "tests": m.tests,
                           **m.result} for m in mutants]
    results["all_killed"] = all(m.result.get("status") == "killed" for m in mutants)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    width = max(len(m.id) for m in mutants)
    print(f"\n{'mutant':<{width}}  {'result':<10} {'s':>6}  killed by")
    for m in mutants:
        r = m.result
        by = "; ".join(t.split("::", 1)[-1] for t in r.get("killed_by", [])) or r.get("error", "")
        print(f"{m.id:<{width}}  {r.get('status', '?'):<10} {r.get('seconds', 0):>6}  {by}")
    print(f"\n{sum(m.result.get('status') == 'killed' for m in mutants)}/{len(mutants)} killed; "
          f"results in {RESULTS.relative_to(REPO)}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if results["all_killed"] else 1


if __name__ == "__main__":
    sys.exit(main())
