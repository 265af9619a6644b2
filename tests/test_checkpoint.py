"""Checkpoint formats, foreign timm/DeiT files, resampling, and every bad input -> exit 2, one line."""
from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from castling_deploy.errors import CheckpointError, UsageError
from castling_deploy.models import create_model
from castling_deploy.models.checkpoint import load_checkpoint, save_checkpoint

from .conftest import LABELS, NANO_PP, invoke


def _logits(ck_path: Path, **kw) -> torch.Tensor:
    ck = load_checkpoint(ck_path, **kw)
    torch.manual_seed(5)
    with torch.no_grad():
        return ck.build_model()(torch.randn(2, 3, ck.config.img_size, ck.config.img_size))


def test_pt_and_safetensors_round_trip(tmp_path: Path, dead_branch_ckpt: Path) -> None:
    ck = load_checkpoint(dead_branch_ckpt)
    model = ck.build_model()
    st = tmp_path / "m.safetensors"
    save_checkpoint(st, model, "castling_nano", NANO_PP, LABELS)
    ck2 = load_checkpoint(st)
    assert ck2.arch == "castling_nano" and ck2.labels == LABELS and ck2.preprocess == NANO_PP
    assert ck2.source_format == "castling-deploy .safetensors"
    assert (_logits(st) - _logits(dead_branch_ckpt)).abs().max() == 0


@pytest.mark.parametrize("wrap", ["plain", "model", "state_dict", "model_ema", "module_prefix"])
def test_foreign_timm_style_files_load(tmp_path: Path, wrap: str) -> None:
    torch.manual_seed(0)
    m = create_model("castling_nano", form="deploy")
    sd = m.state_dict()
    if wrap == "module_prefix":
        obj = {"model": {f"module.{k}": v for k, v in sd.items()}}
    elif wrap == "plain":
        obj = sd
    else:
        obj = {wrap: sd, "epoch": 3}
    p = tmp_path / "foreign.pth"
    torch.save(obj, p)
    ck = load_checkpoint(p, arch="castling_nano")
    assert ck.source_format.startswith("foreign state dict")
    assert load_checkpoint(p).arch == "castling_nano"  # inferred from shapes
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (ck.build_model(form="deploy")(x) - m.eval()(x)).abs().max() == 0


def _pil_bicubic(grid: torch.Tensor, size: int) -> torch.Tensor:
    """Reference resampling: PIL's bicubic resize of each channel as a float image. timm's recipe (torch bicubic,
    align_corners=False, antialias=True) is the same filter as PIL's, computed by another library."""
    import numpy as np
    from PIL import Image

    g = grid.detach().numpy().astype(np.float32)  # (h, w, dim)
    chans = [np.asarray(Image.fromarray(g[:, :, c], mode="F").resize((size, size), Image.BICUBIC))
             for c in range(g.shape[-1])]
    return torch.from_numpy(np.stack(chans, -1))


def test_pos_embed_resampled_for_new_resolution(dead_branch_ckpt: Path) -> None:
    stored = torch.load(dead_branch_ckpt, weights_only=True)["state_dict"]["pos_embed"]  # read from the file itself
    same = load_checkpoint(dead_branch_ckpt).build_model()
    assert torch.equal(same.pos_embed.detach(), stored)  # same size: the stored embedding, untouched
    for size, grid in ((48, 6), (16, 2)):  # up- and down-sampling from the stored 4x4 grid (32 px / patch 8)
        ck = load_checkpoint(dead_branch_ckpt, img_size=size)
        model = ck.build_model()
        pe = model.pos_embed.detach()
        assert pe.shape == (1, grid * grid + 1, 64) and ck.preprocess["crop"] == size
        assert torch.equal(pe[:, :1], stored[:, :1])  # the class token's embedding is not resampled
        ref = _pil_bicubic(stored[0, 1:].reshape(4, 4, 64), grid).reshape(grid * grid, 64)
        assert (pe[0, 1:] - ref).abs().max() < 1e-5, (pe[0, 1:] - ref).abs().max()
        with torch.no_grad():
            assert torch.isfinite(model(torch.randn(1, 3, size, size))).all()
    with pytest.raises(UsageError, match="multiple of the patch size"):
        load_checkpoint(dead_branch_ckpt, img_size=50)


def test_resample_pos_embed_identity_and_constant_fields() -> None:
    from castling_deploy.models.vit import resample_pos_embed

    pe = torch.randn(1, 1 + 16, 8, generator=torch.Generator().manual_seed(0))
    assert resample_pos_embed(pe, 4) is pe  # same grid: nothing recomputed
    const = torch.full((1, 1 + 16, 8), 0.25)
    assert torch.allclose(resample_pos_embed(const, 7), torch.full((1, 50, 8), 0.25), atol=1e-6)  # weights sum to 1
    with pytest.raises(ValueError, match="square grid"):
        resample_pos_embed(torch.zeros(1, 1 + 15, 8), 4)


def test_missing_unexpected_and_mismatched_keys_are_named(tmp_path: Path) -> None:
    sd = create_model("castling_nano").state_dict()
    sd.pop("blocks.0.attn.qkv.weight")
    sd["blocks.0.extra"] = torch.zeros(1)
    sd["head.weight"] = torch.zeros(7, 64)
    p = tmp_path / "bad.pth"
    torch.save(sd, p)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(p, arch="castling_nano")
    msg = str(e.value)
    assert "1 missing keys: blocks.0.attn.qkv.weight" in msg
    assert "1 unexpected keys: blocks.0.extra" in msg
    # the class count comes from head.weight, so the 10-class bias is the mismatch
    assert "1 shape mismatches: head.bias (10,) vs model (7,)" in msg


class _Payload:
    """Unpickling this runs os.system — the classic malicious checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def _bad_files(tmp: Path) -> dict[str, Path]:
    marker = tmp / "PWNED"
    mal = tmp / "malicious.pt"
    torch.save({"state_dict": {}, "x": _Payload(marker)}, mal)
    raw = tmp / "raw_pickle.pkl"
    raw.write_bytes(pickle.dumps(_Payload(marker)))
    good = create_model("castling_nano").state_dict()
    ok = tmp / "ok.pth"
    torch.save(good, ok)
    trunc = tmp / "truncated.pt"
    trunc.write_bytes(ok.read_bytes()[: ok.stat().st_size // 2])
    corrupt = tmp / "corrupt.pt"
    corrupt.write_bytes(b"\x00garbage" * 100)
    st = tmp / "corrupt.safetensors"
    st.write_bytes(b"\xff" * 64)
    missing = dict(good)
    missing.pop("norm.weight")
    mk = tmp / "missing_keys.pth"
    torch.save(missing, mk)
    shape = dict(good)
    shape["blocks.1.mlp.fc1.weight"] = torch.zeros(3, 3)
    sh = tmp / "shape.pth"
    torch.save(shape, sh)
    return {"malicious": mal, "raw_pickle": raw, "ok": ok, "truncated": trunc, "corrupt": corrupt,
            "corrupt_st": st, "missing_keys": mk, "shape": sh, "marker": marker}


@pytest.mark.parametrize(
    "case,args,needle",
    [
        ("missing", ["info", "{tmp}/nope.pt"], "no such checkpoint file"),
        ("truncated", ["info", "{truncated}"], "truncated or corrupt"),
        ("corrupt", ["info", "{corrupt}"], "truncated or corrupt"),
        ("corrupt_st", ["info", "{corrupt_st}"], "not a readable .safetensors"),
        ("wrong_arch", ["info", "{ok}", "--arch", "castling_deit_tiny"], "shape mismatches"),
        ("missing_keys", ["info", "{missing_keys}", "--arch", "castling_nano"], "missing keys: norm.weight"),
        ("shape", ["info", "{shape}", "--arch", "castling_nano"], "blocks.1.mlp.fc1.weight (3, 3)"),
        ("malicious", ["info", "{malicious}"], "refused to unpickle"),
        ("raw_pickle", ["info", "{raw_pickle}"], "refused to unpickle"),
        ("unknown_arch", ["info", "{ok}", "--arch", "castling_huge"], "unknown architecture 'castling_huge'"),
        ("export_unknown_arch", ["export", "{ok}", "--arch", "vit_nope"], "unknown architecture"),
    ],
)
def test_bad_inputs_exit_2_one_line(tmp_path: Path, runner, case: str, args: list[str], needle: str) -> None:
    files = _bad_files(tmp_path)
    fmt = {k: str(v) for k, v in files.items()} | {"tmp": str(tmp_path)}
    result = invoke(runner, *[a.format(**fmt) for a in args])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], result.stderr
    assert "Traceback" not in result.output
    assert not files["marker"].exists(), "the pickle payload ran"


def test_malicious_pickle_in_a_real_process_does_not_run(tmp_path: Path) -> None:
    files = _bad_files(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "castling_deploy.cli", "info", str(files["malicious"])],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "refused to unpickle" in proc.stderr
    assert "os.system" in proc.stderr or "posix.system" in proc.stderr
    assert not files["marker"].exists()


def test_list_models_wildcards_and_info_json(runner, dead_branch_ckpt: Path) -> None:
    r = invoke(runner, "list-models", "castling_deit*")
    assert r.exit_code == 0
    names = [line.split()[0] for line in r.stdout.splitlines()]
    assert names == ["castling_deit_base", "castling_deit_small", "castling_deit_tiny"]
    assert invoke(runner, "list-models", "nothing*").exit_code == 2
    rows = json.loads(invoke(runner, "list-models", "castling_nano", "--macs", "--json").stdout)
    assert rows[0]["params"] == 148_314 and 2.5e6 < rows[0]["macs_deploy"] < 2.7e6
    r = invoke(runner, "info", dead_branch_ckpt, "--json")
    assert r.exit_code == 0
    d = json.loads(r.stdout)
    assert d["arch"] == "castling_nano" and d["form"] == "train" and d["params"] > 100_000
    assert d["macs"]["deploy_form"] < d["macs"]["as_stored"]
    assert d["softmax_branch"]["status"].startswith("inert")


def test_deit_tiny_macs_match_the_paper_row() -> None:
    """Castling-DeiT-T: paper 5.6M params / 1.18 GMACs; ours counted by torch.utils.flop_counter."""
    from castling_deploy.models.macs import count_macs, count_params

    m = create_model("castling_deit_tiny", form="deploy")
    params, macs = count_params(m), count_macs(m, 224)
    assert 5.5e6 < params < 5.8e6
    assert 1.10e9 < macs < 1.20e9
    soft = create_model("castling_deit_tiny", attention="softmax")
    assert count_macs(soft, 224) > macs  # linear attention is cheaper at 197 tokens


def test_deit_train_script_checkpoint_with_args_and_ema(tmp_path: Path) -> None:
    """DeiT saves {'model', 'model_ema', 'optimizer', 'epoch', 'args': argparse.Namespace}: it loads as it is,
    and the trained weights are preferred over the EMA copy."""
    import argparse

    torch.manual_seed(0)
    trained = create_model("castling_nano", form="deploy").state_dict()
    ema = {k: v + 1.0 for k, v in trained.items()}
    p = tmp_path / "checkpoint.pth"
    torch.save({"model": trained, "model_ema": ema, "epoch": 299, "args": argparse.Namespace(lr=5e-4)}, p)
    ck = load_checkpoint(p, arch="castling_nano")
    assert ck.source_format == "foreign state dict (key 'model')"
    assert torch.equal(ck.state_dict["head.weight"], trained["head.weight"])


@pytest.mark.parametrize("imgsz", [0, -8])
def test_nonpositive_imgsz_is_a_usage_error(dead_branch_ckpt: Path, imgsz: int) -> None:
    with pytest.raises(UsageError, match="--imgsz"):
        load_checkpoint(dead_branch_ckpt, img_size=imgsz)
