"""ExecuTorch target: the demo exports to XNNPACK-delegated .pte programs (fp32 + INT8) that ExecuTorch's runtime
executes within the budget; the delegation census is checked against numbers computed here from the .pte file and
from torch's own MAC count; a missing executorch is exit 4 naming the extra.

The structural checks run on two exports: a one-block castling_nano with random weights (~20 s, the fast suite: the
same CLI path, fp32 + INT8 lowering, census, runtime, metadata and profile) and the shipped demo (~90 s, slow: it
adds the accuracy budget and package/verify on a trained checkpoint)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

pytest.importorskip("executorch.runtime",
                    reason="executorch is not installed: pip install 'castling-deploy[executorch]'")

from castling_deploy.cli import cli  # noqa: E402
from castling_deploy.fold import fold_softmax_branch  # noqa: E402
from castling_deploy.models import create_model  # noqa: E402
from castling_deploy.models.checkpoint import load_checkpoint  # noqa: E402
from castling_deploy.models.macs import count_macs  # noqa: E402
from castling_deploy.runtime import artifact_kind, load_runner  # noqa: E402
from castling_deploy.runtime.executorch import ExecuTorchRunner, etdump_profile  # noqa: E402
from castling_deploy.targets.executorch.convert import read_pte_metadata  # noqa: E402
from castling_deploy.targets.executorch.decomp import decompose_for_xnnpack  # noqa: E402

from .conftest import DIGITS_TRAIN, make_nano_ckpt  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DEMO_CKPT = REPO / "models" / "castling_nano_digits.pt"
DIGITS_VAL = REPO / "calib" / "digits" / "val"
MAC_KERNELS = ("convolution", "mm", "bmm", "addmm", "linear", "matmul", "conv")


def _cli(*args: object):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def _export(ckpt: Path | None, out: Path, *args: object) -> dict:
    """`export [CKPT] --target executorch --int8 ...` (no CKPT: the demo, with its own calib and val sets), its
    report, and the checkpoint folded here for reference."""
    r = _cli("export", *([ckpt] if ckpt else []), "--target", "executorch", "--int8", *args, "-o", out, "--json")
    assert r.exit_code == 0, r.stderr
    ckpt = ckpt or DEMO_CKPT
    folder = out / ckpt.stem / "executorch"
    return {"folder": folder, "doc": json.loads(r.stdout), "report": json.loads((folder / "report.json").read_text()),
            "folded": fold_softmax_branch(load_checkpoint(ckpt).build_model()).eval()}


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One `export --target executorch --int8` of the shipped demo (120 val images, 64 calibration images)."""
    return _export(None, tmp_path_factory.mktemp("demo-executorch"), "--limit", 120, "--calib-size", 64)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The same export of a one-block castling_nano (random weights, lossless fold), 16 calibration and 16 val
    images. --tolerance 100: the accuracy goal is the demo's to meet; here every other check applies."""
    out = tmp_path_factory.mktemp("tiny-executorch")
    ckpt = make_nano_ckpt(out / "tiny.pt", threshold=1.0, depth=1)
    return _export(ckpt, out, "--calib", DIGITS_TRAIN, "--calib-size", 16, "--val", DIGITS_VAL, "--limit", 16,
                   "--tolerance", 100)


@pytest.fixture(scope="module", params=["tiny", pytest.param("demo", marks=pytest.mark.slow)])
def exported(request: pytest.FixtureRequest) -> dict:
    """Each structural check on the tiny export (fast suite) and on the demo (slow)."""
    return request.getfixturevalue(request.param)


def _stage(report: dict, stage: str) -> dict:
    return next(s for s in report["error_budget"] if s["stage"] == stage)


def test_export_passes_and_ships_what_it_verified(exported) -> None:
    report = exported["report"]
    assert exported["doc"]["status"] == "passed" and report["status"] == "passed", report["failures"]
    assert _stage(report, "export")["metrics"]["max_abs_logit"] < 1e-4
    assert _stage(report, "int8")["metrics"]["cosine"] > 0.99
    assert {a["file"]: a["verified_by"] for a in report["artifacts"]} == {"model.pte": "export",
                                                                          "model.int8.pte": "int8"}
    assert sorted(p.name for p in exported["folder"].iterdir()) == ["model.int8.pte", "model.pte", "reference.npz", "report.json"]
    assert report["runtime_versions"]["executorch"] and "executorch" in report["target_info"]["executor"]


@pytest.mark.slow
def test_demo_int8_meets_its_budget(demo) -> None:
    int8 = _stage(demo["report"], "int8")
    assert int8["passed"] and int8["metrics"]["top1_drop_points"] <= 0.5
    assert int8["metrics"]["cosine"] > 0.999


def _non_delegated_kernels(path: Path) -> list[str]:
    """Names of the kernels the program runs outside any delegate, read with ExecuTorch's own deserializer."""
    from executorch.exir._serialize._program import deserialize_pte_binary

    plan = deserialize_pte_binary(path.read_bytes()).program.execution_plan[0]
    calls = [i.instr_args for chain in plan.chains for i in chain.instructions]
    return [plan.operators[c.op_index].name for c in calls if hasattr(c, "op_index")]


@pytest.mark.parametrize("name", ["model.pte", "model.int8.pte"])
def test_census_matches_the_pte_and_torch_mac_count(exported, name: str) -> None:
    info = exported["report"]["target_info"]["int8" if "int8" in name else "fp32"]
    census = info["census"]
    # Independently: torch's flop counter gives the model's MACs; the .pte's non-delegated kernels hold none.
    torch_macs = count_macs(exported["folded"], 32)
    outside = [k for k in _non_delegated_kernels(exported["folder"] / name) if k.split("::")[-1] in MAC_KERNELS]
    assert outside == []
    assert census["macs"]["total"] == census["macs"]["delegated"] == torch_macs
    assert census["delegated_mac_fraction"] >= 0.9
    assert census["delegate_calls"] == {"XnnpackBackend": 1} and census["portable_ops"] == {}
    assert census["file_bytes"] == (exported["folder"] / name).stat().st_size
    if "int8" in name:
        assert census["int8_mac_fraction"] >= 0.9  # every linear and conv: all but the attention matmuls
        assert census["file_bytes"] < 0.5 * exported["report"]["target_info"]["fp32"]["census"]["file_bytes"]
        assert exported["report"]["quantization"]["census"] == census


def test_runner_matches_torch_and_loops_over_batches(exported) -> None:
    path, folded = exported["folder"] / "model.pte", exported["folded"]
    runner = load_runner(path)
    assert isinstance(runner, ExecuTorchRunner) and artifact_kind(path) == "executorch"
    assert runner.input_shape == (1, 3, 32, 32)
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(0)).numpy()
    y = runner.run(x)
    with torch.no_grad():
        ref = folded(torch.from_numpy(x)).numpy()
    assert y.shape == (5, 10) and y.dtype == np.float32
    assert np.abs(y - ref).max() < 1e-4


def test_metadata_rides_in_the_program(exported) -> None:
    meta = read_pte_metadata(exported["folder"] / "model.int8.pte")
    assert meta["architecture"] == "castling_nano"
    assert json.loads(meta["labels"]) == [str(i) for i in range(10)]
    assert meta["checkpoint_sha256"] == exported["report"]["checkpoint"]["sha256"]


def test_profile_uses_the_runtime_timer(exported) -> None:
    path = exported["folder"] / "model.int8.pte"
    prof = etdump_profile(path, runs=5, warmup=1)
    assert prof["timer"].startswith("ExecuTorch ETDump") and 0 < prof["latency_ms"]["p50"] < 1000
    assert any("QS8" in row["op"] for row in prof["by_op_kind"])  # int8 fully-connected kernels ran
    assert "model.int8.pte" in exported["report"]["target_info"]["runtime_profile"]
    r = _cli("profile", path, "--runs", 3, "--warmup", 1, "--json")
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["artifact"]["kind"] == "executorch" and doc["output_shape"] == [1, 10]


@pytest.mark.slow  # measured top-1 needs the trained demo; the tiny export's files are re-run above
def test_package_and_verify_take_pte_through_the_registry(demo, tmp_path: Path) -> None:
    """No packaging code names ExecuTorch: the RUNTIMES entry alone makes .pte files packable and re-verifiable."""
    pkg = tmp_path / "et.zip"
    r = _cli("package", demo["folder"].parent, "-o", pkg)
    assert r.exit_code == 0, r.stderr
    r = _cli("verify", pkg, "--val", DIGITS_VAL, "--json")
    assert r.exit_code == 0, r.stderr
    measured = {Path(a["file"]).name: a for a in json.loads(r.stdout)["accuracy"] if "measured_top1" in a}
    assert set(measured) == {"model.pte", "model.int8.pte"}
    assert all(a["measured_top1"] >= 95.0 for a in measured.values())


def test_census_counts_macs_left_on_portable_kernels(tmp_path: Path) -> None:
    """A program lowered without any delegate: every MAC is on portable kernels, counted from tensor shapes."""
    from executorch.exir import to_edge
    from torch.utils.flop_counter import FlopCounterMode

    from castling_deploy.targets.executorch.census import pte_census

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, groups=1), torch.nn.Flatten(1), torch.nn.Linear(8 * 6 * 6, 5),
                              torch.nn.Unflatten(1, (1, 5)), torch.nn.Linear(5, 4)).eval()
    x = torch.randn(2, 3, 8, 8)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        net(x)
    path = tmp_path / "portable.pte"
    path.write_bytes(to_edge(torch.export.export(net, (x,))).to_executorch().buffer)
    census = pte_census(path)
    assert census["macs"]["portable"] == census["macs"]["total"] == counter.get_total_flops() // 2 > 0
    assert census["delegated_mac_fraction"] == 0.0 and census["delegate_calls"] == {}


def test_decompositions_are_exact_and_leave_no_unsupported_ops() -> None:
    torch.manual_seed(0)
    model = create_model("castling_nano", form="deploy").eval()
    x = torch.randn(1, 3, 32, 32)  # batch 1, as the programs are planned (then cls_token.expand is a view)
    ep = decompose_for_xnnpack(torch.export.export(model, (x,)))
    ops = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert not {o for o in ops if any(k in o for k in ("layer_norm", "linalg_vector_norm", "select", "expand"))}
    with torch.no_grad():
        for seed in range(3):
            x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
            assert (ep.module()(x) - model(x)).abs().max() < 1e-5


def test_garbage_pte_is_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pte"
    bad.write_bytes(b"not a program" * 10)
    r = _cli("profile", bad, "--runs", 1)
    assert r.exit_code == 2 and "bad.pte" in r.stderr and "Traceback" not in r.stderr


def test_missing_executorch_is_exit_4_naming_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [m for m in sys.modules if m == "executorch" or m.startswith("executorch.")]:
        monkeypatch.setitem(sys.modules, name, None)  # `import executorch...` now raises ImportError
    monkeypatch.setitem(sys.modules, "executorch", None)
    r = _cli("export", "--target", "executorch", "--limit", 16, "-o", tmp_path / "out")
    assert r.exit_code == 4
    assert "pip install 'castling-deploy[executorch]'" in r.stderr
    pte = tmp_path / "x.pte"
    pte.write_bytes(b"\0" * 64)
    r = _cli("profile", pte, "--runs", 1)
    assert r.exit_code == 4 and "castling-deploy[executorch]" in r.stderr
