"""Image sets -> tensors with the checkpoint's preprocessing (PIL + numpy, no torchvision).

A set is a folder of images (``class_name/xxx.png`` subfolders give labels; images directly in the folder are
unlabeled) or an ``.npz`` with ``images`` (N,H,W[,C] uint8 or N,C,H,W float already preprocessed) and optional
``labels``. Sampling is deterministic (seed + limit); unreadable files are skipped and counted; the sha256 of the
exact bytes used (files in order + labels) goes into every report.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DataError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm", ".pgm"}


@dataclass
class ImageSet:
    images: np.ndarray  # (N, C, H, W) float32, normalized
    labels: np.ndarray | None  # (N,) int64 indices into the checkpoint's label list
    digest: str
    source: str
    skipped: int = 0
    skipped_examples: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)

    def split(self, n_holdout: int, seed: int = 0) -> tuple["ImageSet", "ImageSet"]:
        """(rest, held-out): a seeded split so one folder can calibrate and verify without overlap."""
        order = np.random.default_rng(seed).permutation(len(self))
        parts = []
        for name, idx in (("rest", np.sort(order[n_holdout:])), ("held-out", np.sort(order[:n_holdout]))):
            digest = "sha256:" + hashlib.sha256(f"{self.digest}:{name}:{seed}:{n_holdout}".encode()).hexdigest()
            parts.append(ImageSet(self.images[idx], None if self.labels is None else self.labels[idx], digest,
                                  f"{self.source} [{name}: {len(idx)} of {len(self)}, seed {seed}]"))
        return parts[0], parts[1]

    def describe(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "count": len(self),
            "labeled": self.labels is not None,
            "digest": self.digest,
            "skipped_unreadable": self.skipped,
        }


def _resample(name: str) -> int:
    from PIL import Image

    table = {
        "bicubic": Image.Resampling.BICUBIC,
        "bilinear": Image.Resampling.BILINEAR,
        "nearest": Image.Resampling.NEAREST,
        "lanczos": Image.Resampling.LANCZOS,
    }
    return table.get(name, Image.Resampling.BICUBIC)


def preprocess_image(img: "PIL.Image.Image", pp: dict[str, Any]) -> np.ndarray:  # noqa: F821
    """Resize the short side to ``resize``, center-crop ``crop``, scale to [0,1], normalize -> (3,H,W)."""
    img = img.convert("RGB")
    resize, crop = int(pp["resize"]), int(pp["crop"])
    w, h = img.size
    scale = resize / min(w, h)
    nw, nh = max(crop, round(w * scale)), max(crop, round(h * scale))
    img = img.resize((nw, nh), _resample(pp.get("interpolation", "bicubic")))
    left, top = (nw - crop) // 2, (nh - crop) // 2
    img = img.crop((left, top, left + crop, top + crop))
    arr = np.asarray(img, dtype=np.float32) / 255.0
    arr = (arr - np.asarray(pp["mean"], dtype=np.float32)) / np.asarray(pp["std"], dtype=np.float32)
    return arr.transpose(2, 0, 1)


def _hidden(p: Path) -> bool:
    return p.name.startswith(".") or p.name == "__MACOSX"


def _list_folder(root: Path) -> list[tuple[Path, str | None]]:
    """(file, class folder or None). Hidden entries (.ipynb_checkpoints, __MACOSX, .DS_Store) are not data."""
    entries: list[tuple[Path, str | None]] = []
    for p in sorted(root.iterdir()):
        if _hidden(p):
            continue
        if p.is_dir():
            for f in sorted(p.rglob("*")):
                if f.is_file() and not any(_hidden(part) for part in f.relative_to(p).parents) and not _hidden(f):
                    entries.append((f, p.name))
        elif p.is_file():
            entries.append((p, None))
    return entries


def _label_index(classes: list[str], labels: list[str] | None, source: Path,
                 num_classes: int | None = None) -> dict[str, int]:
    if labels is None:
        if all(c.isdigit() for c in classes):  # folders named by class index: 0/, 1/, ... 999/
            return {c: int(c) for c in classes}
        if num_classes is not None and len(classes) != num_classes:
            raise DataError(
                f"{source}: {len(classes)} class folders but the model has {num_classes} classes and its checkpoint "
                "stores no label names, so folder names cannot be matched to outputs; name the folders by class "
                "index (0/, 1/, ...) or include every class"
            )
        return {c: i for i, c in enumerate(sorted(classes))}
    lookup = {name: i for i, name in enumerate(labels)}
    unknown = [c for c in classes if c not in lookup]
    if unknown:
        raise DataError(
            f"{source}: class folders {unknown[:5]} are not among the checkpoint's {len(labels)} labels "
            f"(e.g. {labels[:5]}); name the subfolders after the model's labels"
        )
    return lookup


def _sample(n: int, limit: int | None, seed: int) -> np.ndarray:
    if limit is None or limit >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))


def load_image_set(
    path: str | Path,
    preprocess: dict[str, Any],
    labels: list[str] | None = None,
    *,
    limit: int | None = None,
    seed: int = 0,
    num_classes: int | None = None,
) -> ImageSet:
    """Load and preprocess a folder or .npz. Raises DataError (exit 2) when nothing usable is there."""
    from PIL import Image, UnidentifiedImageError

    root = Path(path)
    if not root.exists():
        raise DataError(f"{root}: no such image folder or .npz file")
    if root.is_file():
        if root.suffix != ".npz":
            raise DataError(f"{root}: expected a folder of images or an .npz with 'images' and 'labels'")
        return _checked(_load_npz(root, preprocess, limit, seed), num_classes)
    entries = _list_folder(root)
    classes = sorted({c for _, c in entries if c is not None})
    labeled = bool(classes)
    stray = [f for f, c in entries if c is None and f.suffix.lower() in IMAGE_SUFFIXES]
    if labeled and stray:
        log.warning("%s: %d images outside the class folders are ignored (e.g. %s)", root, len(stray), stray[0].name)
    index = _label_index(classes, labels, root, num_classes) if labeled else {}
    # With a limit, walk a seeded permutation and keep the first `limit` readable images.
    if limit is None or limit >= len(entries):
        order = np.arange(len(entries))
    else:
        order = np.random.default_rng(seed).permutation(len(entries))
    want = len(entries) if limit is None else limit
    arrays: list[np.ndarray] = []
    ys: list[int] = []
    h = hashlib.sha256()
    skipped: list[str] = []
    for i in order:
        if len(arrays) >= want:
            break
        f, c = entries[i]
        if labeled and c is None:
            skipped.append(str(f.relative_to(root)))
            continue
        try:
            with Image.open(f) as img:
                arr = preprocess_image(img, preprocess)
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
            skipped.append(str(f.relative_to(root)))
            continue
        rel = str(f.relative_to(root)).encode()
        h.update(len(rel).to_bytes(4, "little") + rel + f.read_bytes())
        arrays.append(arr)
        if labeled:
            ys.append(index[c])  # type: ignore[index]
    if skipped:
        log.warning("%s: skipped %d unreadable/non-image files (e.g. %s)", root, len(skipped), skipped[0])
    if not arrays:
        raise DataError(f"{root}: no readable images found ({len(skipped)} files skipped); "
                        "point to a folder of class_name/xxx.png images or an .npz")
    y = np.asarray(ys, dtype=np.int64) if labeled else None
    if y is not None:
        h.update(y.tobytes())
    return _checked(ImageSet(np.stack(arrays).astype(np.float32), y, "sha256:" + h.hexdigest(), str(root),
                             skipped=len(skipped), skipped_examples=skipped[:5]), num_classes)


def _checked(s: ImageSet, num_classes: int | None) -> ImageSet:
    """Reject what would make accuracy numbers meaningless: non-finite pixels, labels outside the model."""
    if not np.isfinite(s.images).all():
        raise DataError(f"{s.source}: images contain NaN or Inf values")
    if s.labels is not None:
        if s.labels.ndim != 1 or len(s.labels) != len(s.images):
            raise DataError(f"{s.source}: labels must be one integer per image, got shape {s.labels.shape}")
        hi = num_classes if num_classes is not None else np.iinfo(np.int64).max
        bad = s.labels[(s.labels < 0) | (s.labels >= hi)]
        if len(bad):
            raise DataError(f"{s.source}: label {int(bad[0])} is outside the model's classes 0..{hi - 1}")
    return s


def _load_npz(path: Path, preprocess: dict[str, Any], limit: int | None, seed: int) -> ImageSet:
    from PIL import Image

    try:
        with np.load(path, allow_pickle=False) as z:
            if "images" not in z:
                raise DataError(f"{path}: .npz has no 'images' array (has {list(z.keys())})")
            images = z["images"]
            labels = z["labels"] if "labels" in z else None
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: unreadable .npz ({exc})") from None
    if len(images) == 0:
        raise DataError(f"{path}: 'images' is empty")
    if labels is not None and len(labels) != len(images):
        raise DataError(f"{path}: {len(images)} images but {len(labels)} labels")
    idx = _sample(len(images), limit, seed)
    images = images[idx]
    if labels is not None:
        if labels.ndim != 1 or not (np.issubdtype(labels.dtype, np.integer)
                                    or (np.issubdtype(labels.dtype, np.floating) and np.all(labels == np.round(labels)))):
            raise DataError(f"{path}: 'labels' must be a 1-D array of integer class indices, got "
                            f"{labels.dtype} {labels.shape}")
        labels = labels[idx].astype(np.int64)
    crop = int(preprocess["crop"])
    if images.dtype == np.uint8:
        if images.ndim == 3:
            images = images[..., None]
        if images.ndim == 4 and images.shape[1] in (1, 3) and images.shape[-1] not in (1, 3):
            images = images.transpose(0, 2, 3, 1)  # NCHW uint8 -> NHWC for PIL
        if images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise DataError(f"{path}: uint8 'images' must be (N,H,W), (N,H,W,1|3) or (N,1|3,H,W), got {images.shape}")
        arrs = [preprocess_image(Image.fromarray(im.squeeze(-1) if im.shape[-1] == 1 else im), preprocess) for im in images]
        x = np.stack(arrs).astype(np.float32)
    elif images.ndim == 4 and images.shape[1:] == (3, crop, crop) and np.issubdtype(images.dtype, np.floating):
        x = images.astype(np.float32)  # already preprocessed
    else:
        raise DataError(f"{path}: 'images' must be uint8 (N,H,W[,C]) or float (N,3,{crop},{crop}), got "
                        f"{images.dtype} {images.shape}")
    h = hashlib.sha256(x.tobytes())
    if labels is not None:
        h.update(labels.tobytes())
    return ImageSet(x, labels, "sha256:" + h.hexdigest(), str(path))


def random_inputs(n: int, img_size: int, seed: int = 0, in_chans: int = 3) -> ImageSet:
    """Seeded standard-normal inputs, for when no images are given (reports say so)."""
    x = np.random.default_rng(seed).standard_normal((n, in_chans, img_size, img_size)).astype(np.float32)
    return ImageSet(x, None, f"random-normal:seed={seed}:n={n}", f"random normal inputs (seed {seed}, no images given)")
