"""Image sets -> tensors with the checkpoint's preprocessing (PIL + numpy, no torchvision).

A set is a folder of images (``class_name/xxx.png`` subfolders give labels; images directly in the folder are
unlabeled) or an ``.npz`` with ``images`` (N,H,W[,C] uint8 or N,C,H,W float already preprocessed) and optional
``labels``. Sampling is deterministic (seed + limit); unreadable files are skipped and counted; the sha256 of the
exact bytes used (files in order + labels) goes into every report.

Untrusted input is bounded (``castling_deploy.limits``): the preprocessing is validated (``validate_preprocess``),
images larger than MAX_IMAGE_PIXELS, files whose names are not UTF-8 and unsupported pixel formats are skipped and
counted; an ``.npz`` is checked from its array headers before anything is read and only the sampled images are
decompressed; high-bit-depth images are scaled by their real range, never clipped.
"""
from __future__ import annotations

import hashlib
import logging
import os
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import limits
from .errors import DataError
from .limits import validate_preprocess

__all__ = ["ImageSet", "check_overlap", "check_seed", "image_digests", "load_image_set", "overlap_fraction",
           "preprocess_image", "random_inputs", "sample_indices", "validate_preprocess"]

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
        check_seed(seed)
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
        "box": Image.Resampling.BOX,
        "hamming": Image.Resampling.HAMMING,
    }
    return table.get(name, Image.Resampling.BICUBIC)


class UnusableImage(ValueError):
    """One image that cannot be used (too large, unsupported pixel format): skipped and counted."""


def _unit_range_gray(img: "PIL.Image.Image") -> np.ndarray | None:  # noqa: F821
    """A high-bit-depth single-channel image as float32 in [0, 1], scaled by its real range: 16-bit by 65535,
    32-bit integer TIFFs by their type's maximum, float images taken as they are (they must lie in [0, 1]).
    None for ordinary 8-bit modes, which take the usual ``convert("RGB")`` path."""
    mode = img.mode
    if mode == "F":
        arr = np.asarray(img, dtype=np.float32)
        if not np.isfinite(arr).all() or arr.min() < 0.0 or arr.max() > 1.0:
            raise DataError(f"{getattr(img, 'filename', '') or 'an image'}: float image with values outside "
                            "[0, 1] (or NaN); save it as 8- or 16-bit, or scale it to [0, 1]")
        return arr
    if not mode.startswith("I"):
        return None
    bits, signed = 16, mode.endswith("S")
    if mode == "I" and getattr(img, "format", None) == "TIFF":
        tags = getattr(img, "tag_v2", {})
        bps, fmt = tags.get(258, (32,)), tags.get(339, (2,))
        bits = int(bps[0] if isinstance(bps, tuple) else bps)
        signed = int(fmt[0] if isinstance(fmt, tuple) else fmt) == 2
    arr = np.asarray(img).astype(np.float64)
    if signed and arr.size and arr.min() < 0:
        raise UnusableImage("signed integer image with negative values")
    return (arr / float(2 ** (bits - int(signed)) - 1)).astype(np.float32)


def preprocess_image(img: "PIL.Image.Image", pp: dict[str, Any]) -> np.ndarray:  # noqa: F821
    """Resize the short side to ``resize``, center-crop ``crop``, scale to [0,1], normalize -> (3,H,W).

    8-bit images (L, P, RGB, RGBA, ...) are resized as 8-bit RGB; 16-bit, 32-bit integer and float grayscale
    images are scaled to [0, 1] by their real range first (never clipped at 255) and resized in float.
    """
    from PIL import Image

    w, h = img.size
    if w * h > limits.MAX_IMAGE_PIXELS:
        raise UnusableImage(f"{w}x{h} pixels, more than {limits.MAX_IMAGE_PIXELS}")
    resize, crop = int(pp["resize"]), int(pp["crop"])
    scale = resize / min(w, h)
    nw, nh = max(crop, round(w * scale)), max(crop, round(h * scale))
    if nw * nh > limits.MAX_RESIZED_PIXELS:
        raise UnusableImage(f"aspect ratio {w}x{h} would be resized to {nw}x{nh} pixels")
    left, top = (nw - crop) // 2, (nh - crop) // 2
    box = (left, top, left + crop, top + crop)
    resample = _resample(pp.get("interpolation", "bicubic"))
    gray = _unit_range_gray(img)
    if gray is None:
        rgb = img.convert("RGB").resize((nw, nh), resample).crop(box)
        arr = np.asarray(rgb, dtype=np.float32) / 255.0
    else:
        g = np.asarray(Image.fromarray(gray).resize((nw, nh), resample).crop(box), dtype=np.float32)
        arr = np.repeat(np.clip(g, 0.0, 1.0)[..., None], 3, axis=-1)  # clip only the resampling overshoot
    arr = (arr - np.asarray(pp["mean"], dtype=np.float32)) / np.asarray(pp["std"], dtype=np.float32)
    return arr.transpose(2, 0, 1)


def _hidden(p: Path) -> bool:
    return p.name.startswith(".") or p.name == "__MACOSX"


def _utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
        return True
    except UnicodeEncodeError:  # a byte name that is not UTF-8 arrives as surrogate escapes
        return False


def _printable(name: str) -> str:
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def _list_folder(root: Path) -> tuple[list[tuple[Path, str | None]], list[str]]:
    """((file, class folder or None), names skipped because they are not UTF-8). Hidden entries
    (.ipynb_checkpoints, __MACOSX, .DS_Store) are not data."""
    entries: list[tuple[Path, str | None]] = []
    bad: list[str] = []
    for p in sorted(root.iterdir()):
        if _hidden(p):
            continue
        if p.is_dir():
            files = [f for f in sorted(p.rglob("*"))
                     if f.is_file() and not any(_hidden(part) for part in f.relative_to(p).parents) and not _hidden(f)]
            if not _utf8(p.name):  # a class folder whose name cannot be matched to a label or reported
                bad.extend(_printable(str(f.relative_to(root))) for f in files)
                continue
            for f in files:
                if _utf8(str(f.relative_to(root))):
                    entries.append((f, p.name))
                else:
                    bad.append(_printable(str(f.relative_to(root))))
        elif p.is_file():
            if _utf8(p.name):
                entries.append((p, None))
            else:
                bad.append(_printable(p.name))
    return entries, bad


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


def check_seed(seed: Any) -> int:
    """``--seed``: a non-negative integer, else UsageError (exit 2)."""
    return limits.check_seed(seed)


def sample_indices(n: int, limit: int | None, seed: int) -> np.ndarray:
    """Sorted indices of a seeded sample of ``limit`` out of ``n`` (all of them without a limit or when fewer)."""
    check_seed(seed)
    limits.check_limit(limit)
    if limit is None or limit >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))


def _too_big(source: object, count: int, per_image: int) -> DataError:
    return DataError(f"{source}: {count} images of {per_image} bytes each would need "
                     f"{count * per_image / 2**30:.1f} GiB (limit {limits.MAX_SET_BYTES / 2**30:.0f} GiB); "
                     "sample fewer with --limit / --calib-size")


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

    check_seed(seed)
    limits.check_limit(limit)
    preprocess = validate_preprocess(preprocess)
    root = Path(path)
    if not root.exists():
        raise DataError(f"{root}: no such image folder or .npz file")
    if root.is_file():
        if root.suffix != ".npz":
            raise DataError(f"{root}: expected a folder of images or an .npz with 'images' and 'labels'")
        return _checked(_load_npz(root, preprocess, limit, seed), num_classes)
    entries, skipped = _list_folder(root)
    reasons: dict[str, int] = {"name not UTF-8": len(skipped)} if skipped else {}
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
    per_image = 3 * preprocess["crop"] ** 2 * 4
    arrays: list[np.ndarray] = []
    ys: list[int] = []
    h = hashlib.sha256()
    for i in order:
        if len(arrays) >= want:
            break
        f, c = entries[i]
        if labeled and c is None:
            skipped.append(str(f.relative_to(root)))
            continue
        if (len(arrays) + 1) * per_image > limits.MAX_SET_BYTES:
            raise _too_big(root, min(want, len(entries)), per_image)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)  # refused below, not printed
                with Image.open(f) as img:
                    arr = preprocess_image(img, preprocess)
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError,
                Image.DecompressionBombWarning) as exc:
            big = isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning, UnusableImage))
            kind = "too large or unsupported pixels" if big else "unreadable"
            reasons[kind] = reasons.get(kind, 0) + 1
            skipped.append(str(f.relative_to(root)))
            continue
        rel = str(f.relative_to(root)).encode()
        h.update(len(rel).to_bytes(4, "little") + rel + f.read_bytes())
        arrays.append(arr)
        if labeled:
            ys.append(index[c])  # type: ignore[index]
    if skipped:
        detail = ", ".join(f"{n} {k}" for k, n in sorted(reasons.items()))
        log.warning("%s: skipped %d unreadable/non-image files%s (e.g. %s)", root, len(skipped),
                    f" ({detail})" if detail else "", skipped[0])
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


# ---- .npz: headers first, then only the sampled rows -----------------------------------------------------------
def _npy_header(fp: Any, path: Path, key: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    fmt = np.lib.format
    try:
        version = fmt.read_magic(fp)
        if version == (1, 0):
            shape, fortran, dtype = fmt.read_array_header_1_0(fp)
        elif version in ((2, 0), (3, 0)):
            shape, fortran, dtype = fmt.read_array_header_2_0(fp)
        else:
            raise ValueError(f"unsupported .npy version {version}")
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path}: '{key}' is not a readable .npy array ({str(exc).splitlines()[0][:120]})") from None
    if dtype.hasobject:
        raise DataError(f"{path}: '{key}' is an object array; only numeric arrays are loaded (no pickles)")
    return tuple(int(d) for d in shape), bool(fortran), dtype


def _read_exact(fp: Any, n: int, path: Path, key: str) -> bytes:
    data = fp.read(n)
    if len(data) != n:
        raise DataError(f"{path}: '{key}' is truncated (its header promises more data than the file holds)")
    return data


def _skip(fp: Any, n: int, path: Path, key: str) -> None:
    chunk = 1 << 24
    while n > 0:
        _read_exact(fp, min(n, chunk), path, key)
        n -= chunk


def _read_rows(z: zipfile.ZipFile, member: str, path: Path, key: str, rows: np.ndarray | None,
               max_bytes: int) -> np.ndarray:
    """The rows ``rows`` (sorted; None: all) of the array in ``member``, decompressing only up to the last of
    them and holding only them; the declared size is checked against ``max_bytes`` before anything is read."""
    with z.open(member) as fp:
        shape, fortran, dtype = _npy_header(fp, path, key)
        if not shape:
            raise DataError(f"{path}: '{key}' is a 0-d array; expected one entry per image")
        n = shape[0]
        row_shape = shape[1:]
        row_bytes = int(np.prod(row_shape, dtype=np.int64)) * dtype.itemsize
        sel = np.arange(n) if rows is None else rows
        if fortran and len(shape) > 1:  # rows are not contiguous: the whole array must be read
            if n * row_bytes > max_bytes:
                raise DataError(f"{path}: '{key}' is a {n * row_bytes / 2**30:.2f} GiB Fortran-order array "
                                f"(limit {max_bytes / 2**30:.1f} GiB for that layout); save it in C order")
            flat = np.frombuffer(_read_exact(fp, n * row_bytes, path, key), dtype=dtype)
            return flat.reshape(shape, order="F")[sel]
        if len(sel) * row_bytes > max_bytes:
            raise DataError(f"{path}: '{key}' {shape} {dtype} would need {len(sel) * row_bytes / 2**30:.2f} GiB for "
                            f"{len(sel)} entries (limit {max_bytes / 2**30:.1f} GiB); sample fewer with --limit")
        out = np.empty((len(sel),) + row_shape, dtype=dtype)
        flat_out = out.reshape(len(sel), -1).view(np.uint8) if row_bytes else None
        pos = j = 0
        while j < len(sel):
            k = j
            while k + 1 < len(sel) and sel[k + 1] == sel[k] + 1:
                k += 1  # a run of consecutive rows is read in one go
            _skip(fp, (int(sel[j]) - pos) * row_bytes, path, key)
            if flat_out is not None:
                buf = _read_exact(fp, (k - j + 1) * row_bytes, path, key)
                flat_out[j : k + 1] = np.frombuffer(buf, dtype=np.uint8).reshape(k - j + 1, row_bytes)
            pos, j = int(sel[k]) + 1, k + 1
        return out


def _npz_shape(z: zipfile.ZipFile, member: str, path: Path, key: str) -> tuple[tuple[int, ...], np.dtype]:
    with z.open(member) as fp:
        shape, _, dtype = _npy_header(fp, path, key)
    return shape, dtype


def _load_npz(path: Path, preprocess: dict[str, Any], limit: int | None, seed: int) -> ImageSet:
    from PIL import Image

    crop = int(preprocess["crop"])
    try:
        with zipfile.ZipFile(path) as z:
            names = set(z.namelist())
            if "images.npy" not in names:
                keys = sorted(n[:-4] for n in names if n.endswith(".npy"))[:10]
                raise DataError(f"{path}: .npz has no 'images' array (has {keys})")
            shape, _ = _npz_shape(z, "images.npy", path, "images")
            if not shape:
                raise DataError(f"{path}: 'images' is a 0-d array; expected one image per entry (N,H,W[,C])")
            if len(shape) < 3 or len(shape) > 4 or min(shape[1:]) < 1:
                raise DataError(f"{path}: 'images' must be (N,H,W), (N,H,W,C) or (N,C,H,W) with non-empty "
                                f"images, got shape {shape}")
            if shape[0] == 0:
                raise DataError(f"{path}: 'images' is empty")
            n = shape[0]
            pixels = shape[1] * shape[2] if len(shape) == 3 or shape[-1] in (1, 3) else shape[2] * shape[3]
            if pixels > limits.MAX_IMAGE_PIXELS:
                raise DataError(f"{path}: 'images' holds {pixels}-pixel images (limit {limits.MAX_IMAGE_PIXELS})")
            idx = sample_indices(n, limit, seed)
            if len(idx) * 3 * crop * crop * 4 > limits.MAX_SET_BYTES:
                raise _too_big(path, len(idx), 3 * crop * crop * 4)
            labels = None
            if "labels.npy" in names:
                lshape, ldtype = _npz_shape(z, "labels.npy", path, "labels")
                if len(lshape) != 1 or lshape[0] != n or not (np.issubdtype(ldtype, np.integer)
                                                              or np.issubdtype(ldtype, np.floating)):
                    raise DataError(f"{path}: 'labels' must be a 1-D array of {n} integer class indices, got "
                                    f"{ldtype} {lshape}")
                labels = _read_rows(z, "labels.npy", path, "labels", idx, limits.MAX_NPZ_READ_BYTES)
            images = _read_rows(z, "images.npy", path, "images", idx, limits.MAX_NPZ_READ_BYTES)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, RuntimeError, NotImplementedError) as exc:
        raise DataError(f"{path}: unreadable .npz ({str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__})"
                        ) from None
    if labels is not None:
        if np.issubdtype(labels.dtype, np.floating) and not np.all(labels == np.round(labels)):
            raise DataError(f"{path}: 'labels' must be a 1-D array of integer class indices, got "
                            f"{labels.dtype} {labels.shape}")
        labels = labels.astype(np.int64)
    if images.dtype == np.uint8:
        if images.ndim == 3:
            images = images[..., None]
        if images.ndim == 4 and images.shape[1] in (1, 3) and images.shape[-1] not in (1, 3):
            images = images.transpose(0, 2, 3, 1)  # NCHW uint8 -> NHWC for PIL
        if images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise DataError(f"{path}: uint8 'images' must be (N,H,W), (N,H,W,1|3) or (N,1|3,H,W), got {images.shape}")
        arrs = []
        for im in images:
            try:
                arrs.append(preprocess_image(Image.fromarray(im.squeeze(-1) if im.shape[-1] == 1 else im), preprocess))
            except UnusableImage as exc:
                raise DataError(f"{path}: 'images' {exc}") from None
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
    check_seed(seed)
    x = np.random.default_rng(seed).standard_normal((n, in_chans, img_size, img_size)).astype(np.float32)
    return ImageSet(x, None, f"random-normal:seed={seed}:n={n}", f"random normal inputs (seed {seed}, no images given)")


# ---- calibration / validation overlap --------------------------------------------------------------------------
OVERLAP_WARN = 0.10
OVERLAP_FAIL = 0.50


def image_digests(s: ImageSet) -> list[str]:
    """One sha256 per image, of its preprocessed tensor (identical pictures give identical digests)."""
    return [hashlib.sha256(np.ascontiguousarray(im).tobytes()).hexdigest() for im in s.images]


def overlap_fraction(calib: ImageSet, val: ImageSet) -> float:
    """The fraction of ``val`` images whose content also appears in ``calib`` (0.0 for an empty val set)."""
    if len(val) == 0 or len(calib) == 0:
        return 0.0
    seen = set(image_digests(calib))
    return sum(d in seen for d in image_digests(val)) / len(val)


def check_overlap(calib: ImageSet | None, val: ImageSet | None, *, warn_above: float = OVERLAP_WARN,
                  fail_above: float = OVERLAP_FAIL) -> float:
    """Warn when more than ``warn_above`` of the val images are also calibration images; DataError (exit 2) above
    ``fail_above``: accuracy measured on images that set the int8 ranges is not a measurement. Returns the fraction."""
    if calib is None or val is None:
        return 0.0
    frac = overlap_fraction(calib, val)
    shared = round(frac * len(val))
    if frac > fail_above:
        raise DataError(f"{shared} of the {len(val)} validation images ({frac:.0%}) are also calibration images "
                        f"({calib.source}); verify on images the calibration did not see")
    if frac > warn_above:
        log.warning("%d of the %d validation images (%.0f%%) are also calibration images (%s); accuracy may be "
                    "optimistic", shared, len(val), frac * 100, calib.source)
    return frac
