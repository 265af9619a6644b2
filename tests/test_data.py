"""Image sets: labels from folders, skipped files counted, deterministic sampling, digests, .npz, errors."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from castling_deploy.data import load_image_set
from castling_deploy.errors import DataError

from .conftest import DIGITS_VAL, LABELS, NANO_PP, invoke


def _small_set(root: Path, per_class: int = 3) -> Path:
    for label in ("0", "1", "2"):
        src = sorted((DIGITS_VAL / label).glob("*.png"))[:per_class]
        (root / label).mkdir(parents=True)
        for f in src:
            shutil.copy(f, root / label / f.name)
    return root


def test_folder_labels_preprocessing_and_digest(tmp_path: Path) -> None:
    root = _small_set(tmp_path / "set")
    s = load_image_set(root, NANO_PP, LABELS)
    assert s.images.shape == (9, 3, 32, 32) and s.images.dtype == np.float32
    assert s.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert -1.0 - 1e-6 <= s.images.min() and s.images.max() <= 1.0 + 1e-6  # mean/std 0.5 maps [0,1] to [-1,1]
    assert load_image_set(root, NANO_PP, LABELS).digest == s.digest
    (root / "2" / sorted((root / "2").iterdir())[0].name).write_bytes(
        (DIGITS_VAL / "3").joinpath(sorted(p.name for p in (DIGITS_VAL / "3").iterdir())[0]).read_bytes())
    assert load_image_set(root, NANO_PP, LABELS).digest != s.digest  # content, not names


def test_non_images_skipped_and_counted(tmp_path: Path) -> None:
    root = _small_set(tmp_path / "set")
    (root / "0" / "notes.txt").write_text("not an image")
    (root / "1" / "broken.png").write_bytes(b"\x89PNG garbage")
    s = load_image_set(root, NANO_PP, LABELS)
    assert len(s) == 9 and s.skipped == 2
    assert s.describe()["skipped_unreadable"] == 2


def test_limit_is_deterministic_and_seeded(tmp_path: Path) -> None:
    a = load_image_set(DIGITS_VAL, NANO_PP, LABELS, limit=50, seed=1)
    b = load_image_set(DIGITS_VAL, NANO_PP, LABELS, limit=50, seed=1)
    c = load_image_set(DIGITS_VAL, NANO_PP, LABELS, limit=50, seed=2)
    assert len(a) == 50 and a.digest == b.digest and np.array_equal(a.images, b.images)
    assert a.digest != c.digest


def test_npz_sets(tmp_path: Path) -> None:
    raw = np.stack([np.asarray(Image.open(p)) for p in sorted((DIGITS_VAL / "7").glob("*.png"))[:4]])
    p = tmp_path / "d.npz"
    np.savez(p, images=raw, labels=np.full(4, 7))
    s = load_image_set(p, NANO_PP, LABELS)
    folder = load_image_set(DIGITS_VAL / "7", NANO_PP, None)  # unlabeled folder of the same images
    assert s.labels.tolist() == [7] * 4
    np.testing.assert_allclose(s.images, folder.images[:4], atol=1e-6)
    bad = tmp_path / "bad.npz"
    np.savez(bad, pictures=raw)
    with pytest.raises(DataError, match="no 'images'"):
        load_image_set(bad, NANO_PP, LABELS)


def test_unknown_class_folder_is_an_error(tmp_path: Path) -> None:
    root = _small_set(tmp_path / "set")
    (root / "0").rename(root / "zero")
    with pytest.raises(DataError, match="not among the checkpoint's 10 labels"):
        load_image_set(root, NANO_PP, LABELS)


def test_empty_or_all_bad_sets_exit_2(runner, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    r = invoke(runner, "export", "--val", empty, "-o", tmp_path / "out")
    assert r.exit_code == 2 and "no readable images" in r.stderr
    bad = tmp_path / "bad" / "0"
    bad.mkdir(parents=True)
    (bad / "x.png").write_text("nope")
    r = invoke(runner, "export", "--val", bad.parent, "-o", tmp_path / "out")
    assert r.exit_code == 2 and "1 files skipped" in r.stderr
    assert not (tmp_path / "out" / "castling_nano_digits").exists() or not any(
        (tmp_path / "out" / "castling_nano_digits").iterdir())
