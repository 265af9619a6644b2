"""Hostile-input sweep regressions: every bad input is refused with its exit code and one line (no traceback), and
nothing is written (or overwritten) where it should not be."""
from __future__ import annotations

import errno
import json
import os
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from castling_deploy import limits
from castling_deploy.data import check_overlap, load_image_set, overlap_fraction, sample_indices, validate_preprocess
from castling_deploy.errors import CheckpointError, DataError, DiskFullError, MetadataError, UsageError
from castling_deploy.models.checkpoint import load_checkpoint, model_name

from .conftest import DEMO_CKPT, DIGITS_TRAIN, DIGITS_VAL, LABELS, NANO_PP, invoke


def _refused(r, code: int, *needles: str) -> str:
    """Exit ``code`` with exactly one ``error:`` line naming ``needles``, and no traceback anywhere."""
    out = (r.stdout or "") + (r.stderr or "")
    assert r.exit_code == code, out
    assert "Traceback" not in out, out
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, r.stderr
    for n in needles:
        assert n in errors[0], errors[0]
    return errors[0]


def _demo_obj() -> dict:
    return torch.load(str(DEMO_CKPT), map_location="cpu", weights_only=True)


def _hostile_ckpt(tmp_path: Path, name: str = "bad.pt", **changes) -> Path:
    """The demo checkpoint with top-level entries replaced; ``config``/``preprocess`` dicts are merged."""
    obj = _demo_obj()
    for key, value in changes.items():
        if key in ("config", "preprocess") and isinstance(value, dict):
            obj[key] = {**obj[key], **value}
        else:
            obj[key] = value
    path = tmp_path / name
    torch.save(obj, str(path))
    return path


def _small_set(root: Path, per_class: int = 2, classes: tuple[str, ...] = ("0", "1", "2")) -> Path:
    for label in classes:
        (root / label).mkdir(parents=True, exist_ok=True)
        for f in sorted((DIGITS_VAL / label).glob("*.png"))[:per_class]:
            shutil.copy(f, root / label / f.name)
    return root


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


# ---- 3: INT8 calibration sizes that are not a multiple of the batch -------------------------------------------
@pytest.fixture(scope="module")
def nano_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from castling_deploy.fold import fold_softmax_branch

    model = fold_softmax_branch(load_checkpoint(DEMO_CKPT).build_model())
    path = tmp_path_factory.mktemp("onnx") / "fp32.onnx"
    torch.onnx.export(model, (torch.zeros(1, 3, 32, 32),), str(path), input_names=["images"],
                      output_names=["logits"], dynamic_axes={"images": {0: "batch"}}, opset_version=17, dynamo=False)
    return path


@pytest.fixture(scope="module")
def train_images() -> np.ndarray:
    return load_image_set(DIGITS_TRAIN, NANO_PP, LABELS, limit=104, seed=0).images


def test_even_batch_sizes() -> None:
    from castling_deploy.quantize.calibration import even_batch

    assert [even_batch(n, 8) for n in (8, 96, 100, 101, 99, 12, 7)] == [8, 8, 5, 1, 3, 6, 7]


@pytest.mark.parametrize("method", ["percentile", pytest.param("entropy", marks=pytest.mark.slow), "mse", "minmax"])
def test_int8_any_calib_size_every_method(nano_onnx: Path, train_images: np.ndarray, tmp_path: Path,
                                          method: str) -> None:
    from castling_deploy.quantize import CalibrationSet, QuantRecipe, quantize_onnx

    calib = CalibrationSet(train_images[:100], f"first-100-{method}", "digits train [100]")
    rep = quantize_onnx(nano_onnx, tmp_path / "int8.onnx", calib, QuantRecipe(calibration=method),
                        cache_dir=tmp_path / "cache")
    assert (tmp_path / "int8.onnx").is_file()
    assert rep["calibration"]["images"] == 100 and rep["calibration"]["batch"] == 5
    assert rep["calibration"]["batches_run"] == 20


@pytest.mark.parametrize("method", ["percentile", "mse", pytest.param("entropy", marks=pytest.mark.slow)])
def test_int8_ranges_do_not_depend_on_batching(nano_onnx: Path, train_images: np.ndarray, tmp_path: Path,
                                               method: str) -> None:
    """Same images, batches of 8 (the old path for multiples of 8) or of 4: identical ranges, so an uneven
    count calibrated in equal smaller batches gets exactly the ranges of one pass over its images."""
    from castling_deploy.quantize import CalibrationSet, QuantRecipe
    from castling_deploy.quantize.calibration import CalibrationReader
    from castling_deploy.quantize.ort_int8 import _calibrate

    calib = CalibrationSet(train_images[:96], "first-96", "digits train [96]")
    ranges = []
    for batch in (8, 4):
        reader = CalibrationReader(calib, input_name="images", batch=batch)
        assert reader.batch_size == batch
        work = tmp_path / f"b{batch}"
        work.mkdir()
        _calibrate(nano_onnx, reader, QuantRecipe(calibration=method), work / "ranges.json", work)
        ranges.append(json.loads((work / "ranges.json").read_text()))
    assert ranges[0] == ranges[1]


def test_int8_export_with_100_calibration_images_cli(runner, tmp_path: Path) -> None:
    r = invoke(runner, "export", DEMO_CKPT, "--target", "onnx", "--int8", "--calib", DIGITS_TRAIN, "--calib-size",
               100, "--val", DIGITS_VAL, "--limit", 60, "-o", tmp_path)
    assert r.exit_code == 0, r.stderr
    assert (tmp_path / "castling_nano_digits" / "onnx" / "model.int8.onnx").is_file()


# ---- 4: names that become paths --------------------------------------------------------------------------------
@pytest.mark.parametrize("stem,arch,expected", [
    ("castling_nano_digits", "castling_nano", "castling_nano_digits"),
    ("..", "castling_nano", "castling_nano"),
    (".", "castling_nano", "castling_nano"),
    ("...", "", "model"),
    (".hidden", "castling_nano", "hidden"),
    ("-rf", "castling_nano", "rf"),
    ("my model (v2)", "x", "my_model_v2_"),
    ("a\\b:c", "x", "a_b_c"),
    ("caf\udce9", "x", "caf_"),
    ("x" * 300, "y", "x" * limits.MAX_NAME_LEN),
])
def test_model_names_are_safe_path_components(stem: str, arch: str, expected: str) -> None:
    name = model_name(f"/somewhere/{stem}.pt", arch)
    assert name == expected
    assert "/" not in name and not name.startswith(".") and name not in ("", ".", "..")


def test_dotted_checkpoint_name_stays_inside_output(runner, tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    (tmp_path / "y" / "onnx").mkdir(parents=True)
    (tmp_path / "y" / "onnx" / "precious.txt").write_text("unrelated data")
    shutil.copy(DEMO_CKPT, tmp_path / "x" / "...pt")
    r = invoke(runner, "export", tmp_path / "x" / "...pt", "--target", "onnx", "--val", DIGITS_VAL, "--limit", 30,
               "-o", tmp_path / "y" / "exports")
    assert r.exit_code == 0, r.stderr
    assert (tmp_path / "y" / "onnx" / "precious.txt").read_text() == "unrelated data"
    assert _tree(tmp_path / "y" / "onnx") == ["precious.txt"]
    assert (tmp_path / "y" / "exports" / "castling_nano" / "onnx" / "model.onnx").is_file()
    assert "castling_nano" in r.stderr  # the fallback is announced


def test_checkpoint_arch_must_be_a_plain_name(runner, tmp_path: Path) -> None:
    ck = _hostile_ckpt(tmp_path, arch="../../etc")
    _refused(invoke(runner, "info", ck), 2, "arch")


# ---- 5: untrusted metadata bounds ------------------------------------------------------------------------------
@pytest.mark.parametrize("field,value", [
    ("depth", 10_000_000), ("depth", 1e7), ("depth", "12"), ("embed_dim", -64), ("embed_dim", 10**9),
    ("num_heads", 0), ("num_heads", 3), ("img_size", 10**6), ("patch_size", 0), ("patch_size", 7),
    ("num_classes", 10**9), ("mlp_ratio", float("nan")), ("mlp_ratio", 1e9), ("qkv_bias", "yes"),
    ("kernel_size", 8), ("threshold", float("inf")), ("attention", "quadratic"), ("in_chans", 10**6),
])
def test_config_out_of_bounds_exit_2_before_building(runner, tmp_path: Path, field: str, value) -> None:
    ck = _hostile_ckpt(tmp_path, config={field: value})
    _refused(invoke(runner, "info", ck), 2, f"config.{field}")


def test_config_depth_bomb_does_not_build(tmp_path: Path) -> None:
    import time

    ck = _hostile_ckpt(tmp_path, config={"depth": 10_000_000})
    t0 = time.perf_counter()
    with pytest.raises(MetadataError, match="config.depth"):
        load_checkpoint(ck)
    assert time.perf_counter() - t0 < 5


def test_config_not_matching_weights_is_checked_without_allocating(tmp_path: Path) -> None:
    ck = _hostile_ckpt(tmp_path, config={"depth": 128, "embed_dim": 8192, "num_heads": 128})
    with pytest.raises(CheckpointError, match="do not fit the architecture"):
        load_checkpoint(ck)


def _nested_bomb(levels: int = 40) -> list:
    a: list = [0.5]
    for _ in range(levels):
        a = [a, a]  # 2**40 leaves through shared references: tiny as a pickle, terabytes as JSON
    return a


@pytest.mark.parametrize("field,value", [
    ("resize", 1_000_000), ("resize", 0), ("crop", 0), ("crop", -32), ("crop", 31.5), ("mean", [0.5, 0.5]),
    ("mean", [float("nan")] * 3), ("std", [0.0, 0.5, 0.5]), ("std", [-1.0]), ("mean", _nested_bomb()),
    ("std", _nested_bomb()), ("interpolation", "magic"), ("channels", "CMYK"), ("mean", "0.5"),
])
def test_preprocess_out_of_bounds_exit_2(runner, tmp_path: Path, field: str, value) -> None:
    ck = _hostile_ckpt(tmp_path, preprocess={field: value})
    _refused(invoke(runner, "info", ck), 2, f"preprocess.{field}")


def test_preprocess_not_a_dict_and_crop_mismatch(runner, tmp_path: Path) -> None:
    _refused(invoke(runner, "info", _hostile_ckpt(tmp_path, "a.pt", preprocess=[1, 2])), 2, "preprocess")
    _refused(invoke(runner, "info", _hostile_ckpt(tmp_path, "b.pt", preprocess={"crop": 64})), 2,
             "preprocess.crop", "config.img_size")


def test_validate_preprocess_is_public_and_normalizes() -> None:
    pp = validate_preprocess({"resize": 36.0, "crop": 32, "mean": 0.5, "std": [0.5, 0.5, 0.5],
                              "interpolation": "BILINEAR", "extra": _nested_bomb()})
    assert pp == {"resize": 36, "crop": 32, "mean": [0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bilinear",
                  "channels": "RGB"}
    assert validate_preprocess(pp) == pp  # idempotent: a manifest written from it validates to itself
    with pytest.raises(MetadataError, match="manifest.json: preprocess.resize"):
        validate_preprocess({**pp, "resize": 10**6}, "manifest.json")
    with pytest.raises(MetadataError, match="lacks crop"):
        validate_preprocess({"resize": 32, "mean": [0.5], "std": [0.5]})


@pytest.mark.parametrize("labels,needle", [
    (LABELS[:3] + [["nested"]] + LABELS[4:], "labels[3]"), (LABELS[:9], "labels"), ([str(i) for i in range(10**5 + 1)],
                                                                                     "labels"),
    (LABELS[:9] + ["x" * 10_000], "labels[9]"), ("0123456789", "labels"), (LABELS[:9] + ["0"], "labels[9]"),
])
def test_labels_validated(runner, tmp_path: Path, labels, needle: str) -> None:
    _refused(invoke(runner, "info", _hostile_ckpt(tmp_path, labels=labels)), 2, needle)


@pytest.mark.parametrize("field", ["train", "fold", "created"])
def test_free_form_records_bounded(runner, tmp_path: Path, field: str) -> None:
    bomb = {"x": _nested_bomb()} if field != "created" else _nested_bomb()
    _refused(invoke(runner, "info", _hostile_ckpt(tmp_path, **{field: bomb})), 2, field)


def test_malformed_fold_record_exit_2(runner, tmp_path: Path) -> None:
    ck = _hostile_ckpt(tmp_path, fold={"forced": True, "stage": {"stage": "fold", "metrics": []}})
    _refused(invoke(runner, "info", ck), 2, "fold.stage")


def test_hostile_metadata_export_writes_nothing(runner, tmp_path: Path) -> None:
    ck = _hostile_ckpt(tmp_path, preprocess={"resize": 1_000_000})
    _refused(invoke(runner, "export", ck, "--target", "onnx", "--val", DIGITS_VAL, "-o", tmp_path / "out"), 2,
             "preprocess.resize")
    assert not any(p.is_file() for p in (tmp_path / "out").rglob("*")) if (tmp_path / "out").exists() else True


# ---- 6: .npz bombs ---------------------------------------------------------------------------------------------
def _lying_npz(path: Path, shape: tuple[int, ...], dtype: str = "|u1", payload: bytes = b"\0" * 1024) -> Path:
    """An .npz whose images.npy header declares ``shape`` but holds only ``payload``."""
    import zipfile

    header = {"descr": dtype, "fortran_order": False, "shape": shape}
    h = repr(header).encode("latin1")
    h += b" " * (64 - (10 + len(h) + 1) % 64) + b"\n"
    npy = b"\x93NUMPY\x01\x00" + struct.pack("<H", len(h)) + h + payload
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("images.npy", npy)
    return path


def test_npz_declared_size_checked_before_loading(runner, tmp_path: Path) -> None:
    bomb = _lying_npz(tmp_path / "bomb.npz", (100_000, 96, 96, 3))  # declares 2.8 GB
    assert bomb.stat().st_size < 10_000
    with pytest.raises(DataError, match="GiB"):
        load_image_set(bomb, NANO_PP, LABELS)
    _refused(invoke(runner, "export", "--target", "onnx", "--val", bomb, "-o", tmp_path / "out"), 2, "GiB",
             "--limit")
    assert not (tmp_path / "out").exists() or not any(p.is_file() for p in (tmp_path / "out").rglob("*"))


def test_npz_only_sampled_images_are_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = tmp_path / "big.npz"
    np.savez_compressed(p, images=np.zeros((20_000, 32, 32, 3), np.uint8), labels=np.arange(20_000) % 10)
    monkeypatch.setattr(limits, "MAX_NPZ_READ_BYTES", 1 << 20)  # 1 MiB: the whole array is 59 MiB
    with pytest.raises(DataError, match="sample fewer"):
        load_image_set(p, NANO_PP, LABELS)
    s = load_image_set(p, NANO_PP, LABELS, limit=16, seed=3)
    idx = sample_indices(20_000, 16, 3)
    assert len(s) == 16 and s.labels.tolist() == (idx % 10).tolist()


def test_npz_rows_match_numpy(tmp_path: Path) -> None:
    raw = np.stack([np.asarray(Image.open(p)) for p in sorted((DIGITS_VAL / "4").glob("*.png"))[:9]])
    for order in ("C", "F"):
        p = tmp_path / f"{order}.npz"
        np.savez(p, images=np.asarray(raw, order=order), labels=np.full(9, 4.0))
        s = load_image_set(p, NANO_PP, LABELS, limit=5, seed=1)
        ref = load_image_set(DIGITS_VAL / "4", NANO_PP, None)
        idx = sample_indices(9, 5, 1)
        np.testing.assert_allclose(s.images, ref.images[:9][idx], atol=1e-6)
        assert s.labels.tolist() == [4] * 5


@pytest.mark.parametrize("images,needle", [
    (np.array([{"a": 1}], dtype=object), "object array"),
    (np.array(5, np.uint8), "0-d"),
    (np.zeros((4, 0, 0, 3), np.uint8), "non-empty"),
    (np.zeros((0, 8, 8), np.uint8), "empty"),
    (np.zeros((4, 8), np.uint8), "(N,H,W)"),
])
def test_npz_malformed_images_exit_2(runner, tmp_path: Path, images: np.ndarray, needle: str) -> None:
    p = tmp_path / "bad.npz"
    np.savez(p, images=images)
    with pytest.raises(DataError, match=None) as e:
        load_image_set(p, NANO_PP, LABELS)
    assert needle in str(e.value)
    _refused(invoke(runner, "export", "--target", "onnx", "--val", p, "-o", tmp_path / "out"), 2, needle)


def test_npz_truncated_and_not_a_zip(tmp_path: Path) -> None:
    lie = _lying_npz(tmp_path / "lie.npz", (10, 8, 8), payload=b"\0" * 100)
    with pytest.raises(DataError, match="truncated"):
        load_image_set(lie, NANO_PP, LABELS)
    np.save(tmp_path / "plain.npy", np.zeros((2, 8, 8), np.uint8))
    os.replace(tmp_path / "plain.npy", tmp_path / "plain.npz")
    with pytest.raises(DataError, match="unreadable .npz"):
        load_image_set(tmp_path / "plain.npz", NANO_PP, LABELS)


# ---- 7: 16-bit, 32-bit integer and float images ----------------------------------------------------------------
def _high_bit_copies(root: Path, kind: str, n: int = 3) -> Path:
    for label in ("1", "5", "8"):
        (root / label).mkdir(parents=True)
        for f in sorted((DIGITS_VAL / label).glob("*.png"))[:n]:
            v = np.asarray(Image.open(f).convert("L")).astype(np.float64)
            if kind == "png16":
                Image.fromarray((v * 257).astype(np.uint16)).save(root / label / f.name)
                assert Image.open(root / label / f.name).mode.startswith("I")
            elif kind == "tif16":
                Image.fromarray((v * 257).astype(np.uint16)).save(root / label / (f.stem + ".tif"))
            elif kind == "tif32":
                Image.fromarray(np.round(v / 255 * (2**31 - 1)).astype(np.int32)).save(root / label / (f.stem + ".tif"))
            elif kind == "float":
                Image.fromarray((v / 255).astype(np.float32)).save(root / label / (f.stem + ".tif"))
            else:  # the 8-bit originals
                shutil.copy(f, root / label / f.name)
    return root


@pytest.mark.parametrize("kind", ["png16", "tif16", "tif32", "float"])
def test_high_bit_depth_images_match_8_bit(tmp_path: Path, kind: str) -> None:
    ref = load_image_set(_high_bit_copies(tmp_path / "8bit", "png8"), NANO_PP, LABELS)
    hi = load_image_set(_high_bit_copies(tmp_path / kind, kind), NANO_PP, LABELS)
    assert hi.skipped == 0 and hi.labels.tolist() == ref.labels.tolist()
    std = NANO_PP["std"][0]
    assert np.abs(hi.images - ref.images).max() <= (1 / 255) / std + 1e-6  # within one 8-bit level
    model = load_checkpoint(DEMO_CKPT).build_model()
    with torch.no_grad():
        a = model(torch.from_numpy(ref.images)).argmax(1)
        b = model(torch.from_numpy(hi.images)).argmax(1)
    assert torch.equal(a, b)


def test_float_image_outside_unit_range_is_refused(tmp_path: Path) -> None:
    (tmp_path / "s" / "0").mkdir(parents=True)
    Image.fromarray(np.full((8, 8), 200.0, np.float32)).save(tmp_path / "s" / "0" / "a.tif")
    with pytest.raises(DataError, match=r"outside \[0, 1\]"):
        load_image_set(tmp_path / "s", NANO_PP, LABELS)


# ---- 8: NaN / Inf weights --------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_refused_at_load(runner, tmp_path: Path, bad: float) -> None:
    obj = _demo_obj()
    obj["state_dict"]["blocks.1.attn.qkv.weight"][3, 7] = bad
    ck = tmp_path / "nan.pt"
    torch.save(obj, str(ck))
    out = tmp_path / "folded.pt"
    _refused(invoke(runner, "fold", ck, "-o", out, "--force"), 2, "blocks.1.attn.qkv.weight", "NaN/Inf")
    assert not out.exists() and not list(tmp_path.glob("folded*"))
    _refused(invoke(runner, "export", ck, "--target", "onnx", "-o", tmp_path / "exp"), 2, "blocks.1.attn.qkv.weight")
    assert not (tmp_path / "exp").exists() or not any(p.is_file() for p in (tmp_path / "exp").rglob("*"))


def test_foreign_state_dict_with_nan_refused(tmp_path: Path) -> None:
    sd = dict(_demo_obj()["state_dict"])
    sd["head.bias"] = sd["head.bias"].clone()
    sd["head.bias"][0] = float("nan")
    torch.save({"model": sd}, str(tmp_path / "f.pth"))
    with pytest.raises(CheckpointError, match="'head.bias' has 1 NaN/Inf"):
        load_checkpoint(tmp_path / "f.pth")


# ---- 9: exit 1 where bad input deserves exit 2 (or a skip) ------------------------------------------------------
def test_non_utf8_file_names_are_skipped_and_counted(tmp_path: Path) -> None:
    root = _small_set(tmp_path / "set")
    src = next((root / "1").iterdir()).read_bytes()
    with open(os.fsencode(root / "1") + b"/\xff\xfe.png", "wb") as fh:
        fh.write(src)
    os.mkdir(os.fsencode(root) + b"/\xe9t\xe9")  # a class folder that is not UTF-8 either
    with open(os.fsencode(root) + b"/\xe9t\xe9/x.png", "wb") as fh:
        fh.write(src)
    s = load_image_set(root, NANO_PP, LABELS)
    assert len(s) == 6 and s.skipped == 2
    json.dumps(s.describe(), ensure_ascii=False).encode("utf-8")
    json.dumps(s.skipped_examples, ensure_ascii=False).encode("utf-8")


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG that declares width x height (no pixel data needed: PIL refuses it from the header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


def test_decompression_bomb_png_is_skipped_and_counted(runner, tmp_path: Path) -> None:
    root = _small_set(tmp_path / "set")
    _png_header_only(root / "2" / "huge.png", 20_000, 20_000)
    _png_header_only(root / "2" / "wide.png", 9_000, 9_000)  # above the limit, below PIL's own hard error
    s = load_image_set(root, NANO_PP, LABELS)
    assert len(s) == 6 and s.skipped == 2
    only = tmp_path / "only" / "2"
    only.mkdir(parents=True)
    _png_header_only(only / "huge.png", 20_000, 20_000)
    _refused(invoke(runner, "export", "--target", "onnx", "--val", only.parent, "-o", tmp_path / "out"), 2,
             "no readable images", "1 files skipped")


def test_extreme_aspect_ratio_is_skipped(tmp_path: Path) -> None:
    root = _small_set(tmp_path / "set")
    Image.fromarray(np.zeros((1, 4000), np.uint8)).save(root / "0" / "strip.png")
    s = load_image_set(root, {**NANO_PP, "resize": 4096, "crop": 32}, LABELS)
    assert s.skipped == 1


def test_non_tensor_in_state_dict_exit_2(runner, tmp_path: Path) -> None:
    obj = _demo_obj()
    obj["state_dict"]["blocks.0.norm1.weight"] = [1.0, 2.0]
    torch.save(obj, str(tmp_path / "list.pt"))
    _refused(invoke(runner, "info", tmp_path / "list.pt"), 2, "blocks.0.norm1.weight", "not a tensor")
    sd = dict(_demo_obj()["state_dict"], epoch=3)
    torch.save(sd, str(tmp_path / "foreign.pth"))
    _refused(invoke(runner, "info", tmp_path / "foreign.pth"), 2, "'epoch'", "not a tensor")


def test_expanded_view_tensor_refused(tmp_path: Path) -> None:
    obj = _demo_obj()
    obj["state_dict"]["head.weight"] = torch.zeros(1).expand(10, 64)
    torch.save(obj, str(tmp_path / "view.pt"))
    with pytest.raises(CheckpointError, match="expanded view"):
        load_checkpoint(tmp_path / "view.pt")


@pytest.mark.parametrize("seed", [-1, 2**64])
def test_negative_seed_exit_2(runner, tmp_path: Path, seed: int) -> None:
    with pytest.raises(UsageError, match="--seed"):
        sample_indices(10, 5, seed)
    _refused(invoke(runner, "export", "--target", "onnx", "--val", DIGITS_VAL, "--limit", 10, "--seed", seed,
                    "-o", tmp_path / "out"), 2, "--seed")


def test_bad_limit_is_a_usage_error() -> None:
    for limit in (0, -3):
        with pytest.raises(UsageError, match="positive"):
            load_image_set(DIGITS_VAL, NANO_PP, LABELS, limit=limit)


# ---- 13: full disk during quantization -------------------------------------------------------------------------
def test_disk_error_translation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from google.protobuf.message import DecodeError

    from castling_deploy.quantize import ort_int8

    err = ort_int8.disk_error(OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "a" / "x.onnx")),
                              [tmp_path / "a", tmp_path / "cache"])
    assert isinstance(err, DiskFullError) and err.exit_code == 1
    assert str(err).startswith(f"no space left on device ({tmp_path / 'a'})") and "\n" not in str(err)
    decode = DecodeError("Error parsing message with type 'onnx.ModelProto': Wire format was corrupt")
    assert ort_int8.disk_error(decode, [tmp_path]) is None  # plenty of room: a real corruption, not ours
    assert ort_int8.disk_error(ValueError("other"), [tmp_path]) is None
    assert ort_int8.disk_error(OSError(errno.EACCES, "Permission denied"), [tmp_path]) is None
    monkeypatch.setattr(ort_int8, "_free_bytes", lambda p: 1024)
    err = ort_int8.disk_error(decode, [tmp_path / "out", tmp_path / "cache"])
    assert isinstance(err, DiskFullError) and "no space left on device" in str(err) and "DecodeError" in str(err)


def _tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          check=False, capture_output=True).returncode == 0


@pytest.mark.parametrize("size", ["300k", "1m"])  # fails in a Python write / in a native write read back
def test_full_disk_during_quantization_on_tmpfs(nano_onnx: Path, train_images: np.ndarray, tmp_path: Path,
                                                size: str) -> None:
    from castling_deploy.quantize import CalibrationSet, quantize_onnx

    mnt = tmp_path / "mnt"
    if not _tmpfs(mnt, size):
        pytest.skip("mounting a tmpfs needs root")
    try:
        calib = CalibrationSet(train_images[:64], "tmpfs-64", "digits train [64]")
        with pytest.raises(DiskFullError) as e:
            quantize_onnx(nano_onnx, mnt / "out" / "int8.onnx", calib, cache_dir=tmp_path / "cache")
        assert str(e.value).startswith(f"no space left on device ({mnt / 'out'})")
        assert _tree(mnt) in (["out"], [])  # no half artifact, no temporary folder left behind
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


# ---- calibration / validation overlap --------------------------------------------------------------------------
def test_overlap_fraction_and_check(caplog: pytest.LogCaptureFixture) -> None:
    from castling_deploy.data import ImageSet

    calib = load_image_set(DIGITS_TRAIN, NANO_PP, LABELS, limit=200, seed=0)
    other = load_image_set(DIGITS_VAL, NANO_PP, LABELS, limit=60, seed=0)
    assert overlap_fraction(calib, other) == 0.0

    def mixed(shared: int) -> ImageSet:
        x = np.concatenate([calib.images[:shared], other.images[: 60 - shared]])
        return ImageSet(x, None, f"mixed-{shared}", f"mixed {shared}")

    assert overlap_fraction(calib, mixed(53)) == pytest.approx(53 / 60)
    with pytest.raises(DataError, match="53 of the 60 validation images"):
        check_overlap(calib, mixed(53))
    caplog.clear()
    assert check_overlap(calib, mixed(10)) == pytest.approx(10 / 60)
    assert "10 of the 60 validation images" in caplog.text
    caplog.clear()
    assert check_overlap(calib, mixed(6)) == pytest.approx(0.1) and not caplog.text
    assert check_overlap(None, other) == 0.0
