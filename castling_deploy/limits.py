"""Bounds on untrusted input, in one place, and the validators that enforce them.

Checkpoints, package manifests and image sets come from elsewhere: their metadata decides how big a model is built,
how large an image is resized and what lands in report.json. Everything here is checked *before* anything is
built or allocated, and a violation is a one-line ``MetadataError`` / ``DataError`` (exit 2) naming the field.

Public validators: ``validate_preprocess`` (checkpoint and manifest preprocessing), ``validate_labels``,
``check_json_budget`` (free-form metadata such as a checkpoint's ``train`` record), ``safe_name`` (a name that
becomes a path component) and ``check_seed`` / ``check_limit``. ``ViTConfig.validate`` (models/vit.py) checks a
model config against the bounds below.
"""
from __future__ import annotations

import math
import re
from typing import Any

from .errors import MetadataError, UsageError

# ---- model config (ViTConfig.validate) ------------------------------------------------------------------------
MAX_DEPTH = 128
MAX_EMBED_DIM = 8192
MAX_HEADS = 256
MAX_IMG_SIZE = 4096
MAX_PATCH_SIZE = 256
MAX_GRID = 128  # patches per side: at most 16385 tokens
# heads x tokens^2: the N x N attention matrices per image that the training form's softmax branch, a softmax model
# and the softmax baseline (MAC count of `info`) materialize; 2**28 fp32 entries = 1 GiB. DeiT-B at 224 px: 4.7e5;
# DeiT-T up to ~1550 px, DeiT-B up to ~1090 px (patch 16).
MAX_ATTENTION_ENTRIES = 1 << 28
MAX_CLASSES = 100_000
MAX_MLP_RATIO = 16.0
MAX_KERNEL_SIZE = 63
# ---- preprocessing ---------------------------------------------------------------------------------------------
MAX_RESIZE = 8192
MAX_NORM_ABS = 1e6  # |mean| bound and std upper bound
MIN_STD = 1e-6
INTERPOLATIONS = ("bicubic", "bilinear", "nearest", "lanczos", "box", "hamming")
CHANNELS = ("RGB",)
PREPROCESS_KEYS = ("resize", "crop", "mean", "std", "interpolation", "channels")
# ---- labels and free-form metadata -----------------------------------------------------------------------------
MAX_LABEL_LEN = 256
MAX_JSON_NODES = 100_000  # containers + scalars visited, shared references counted each time they are reached
MAX_JSON_DEPTH = 32
MAX_JSON_STR = 100_000
# ---- names that become paths -----------------------------------------------------------------------------------
MAX_NAME_LEN = 100
# ---- images and image sets -------------------------------------------------------------------------------------
MAX_IMAGE_PIXELS = 89_478_485  # PIL's own default warning threshold (~ 9459 x 9459)
MAX_RESIZED_PIXELS = 1 << 26  # after the short-side resize (guards extreme aspect ratios)
MAX_NPZ_READ_BYTES = 2 << 30  # raw bytes read from an .npz (only the sampled images are read)
MAX_SET_BYTES = 4 << 30  # preprocessed float32 tensors held for one image set
MAX_SEED = 2**63 - 1

_NAME_BAD = re.compile(r"[^A-Za-z0-9._-]+")


def _where(source: str, field: str) -> str:
    return f"{source}: {field}" if source else field


def _short(value: Any, n: int = 60) -> str:
    text = repr(value) if not isinstance(value, (list, tuple, dict)) else f"a {type(value).__name__}"
    return text if len(text) <= n else text[: n - 1] + "…"


def check_int(value: Any, field: str, lo: int, hi: int, source: str = "") -> int:
    """An int (bools excluded; integral floats accepted) in [lo, hi], or a MetadataError naming ``field``."""
    if isinstance(value, float) and math.isfinite(value) and value == int(value):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise MetadataError(f"{_where(source, field)} must be an integer, got {type(value).__name__} {_short(value)}")
    if not lo <= value <= hi:
        raise MetadataError(f"{_where(source, field)}={value} is out of range {lo}..{hi}")
    return value


def check_float(value: Any, field: str, lo: float, hi: float, source: str = "", *, lo_open: bool = False) -> float:
    """A finite real number in [lo, hi] (or (lo, hi] with ``lo_open``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MetadataError(f"{_where(source, field)} must be a number, got {type(value).__name__} {_short(value)}")
    v = float(value)
    if not math.isfinite(v) or v > hi or v < lo or (lo_open and v == lo):
        rng = f"({lo:g}, {hi:g}]" if lo_open else f"[{lo:g}, {hi:g}]"
        raise MetadataError(f"{_where(source, field)}={v:g} is out of range {rng}")
    return v


def check_choice(value: Any, field: str, choices: tuple[str, ...], source: str = "") -> str:
    if not isinstance(value, str) or value not in choices:
        raise MetadataError(f"{_where(source, field)}={_short(value)} is not one of {', '.join(choices)}")
    return value


def _float_list(value: Any, field: str, lo: float, hi: float, source: str, *, lo_open: bool = False) -> list[float]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, (list, tuple)) or len(value) not in (1, 3):
        raise MetadataError(f"{_where(source, field)} must be a list of 1 or 3 numbers, got {_short(value)}")
    return [check_float(v, f"{field}[{i}]", lo, hi, source, lo_open=lo_open) for i, v in enumerate(value)]


def validate_preprocess(d: Any, source: str = "") -> dict[str, Any]:
    """Check a preprocessing description and return it normalized (known keys only, plain types).

    ``resize`` (short side) and ``crop`` are positive bounded integers; ``mean``/``std`` lists of 1 or 3 finite
    numbers with std > 0; ``interpolation`` one of INTERPOLATIONS (default bicubic); ``channels`` RGB (the
    default). Unknown keys are dropped (they would only be copied into reports). ``source`` (a file) prefixes
    messages. Raises MetadataError (exit 2) naming the field. Idempotent: its output validates to itself.
    """
    if not isinstance(d, dict):
        raise MetadataError(f"{_where(source, 'preprocess')} must be a JSON object, got {type(d).__name__}")
    missing = [k for k in ("resize", "crop", "mean", "std") if k not in d]
    if missing:
        raise MetadataError(f"{_where(source, 'preprocess')} lacks {', '.join(missing)}")
    interp = d.get("interpolation", "bicubic")
    channels = d.get("channels", "RGB")
    return {
        "resize": check_int(d["resize"], "preprocess.resize", 1, MAX_RESIZE, source),
        "crop": check_int(d["crop"], "preprocess.crop", 1, MAX_IMG_SIZE, source),
        "mean": _float_list(d["mean"], "preprocess.mean", -MAX_NORM_ABS, MAX_NORM_ABS, source),
        "std": _float_list(d["std"], "preprocess.std", MIN_STD, MAX_NORM_ABS, source),
        "interpolation": check_choice(interp.lower() if isinstance(interp, str) else interp,
                                      "preprocess.interpolation", INTERPOLATIONS, source),
        "channels": check_choice(channels.upper() if isinstance(channels, str) else channels,
                                 "preprocess.channels", CHANNELS, source),
    }


def validate_labels(labels: Any, num_classes: int | None = None, source: str = "") -> list[str] | None:
    """None, or a list of distinct non-empty strings (bounded count and length), one per class when known."""
    if labels is None:
        return None
    if not isinstance(labels, (list, tuple)):
        raise MetadataError(f"{_where(source, 'labels')} must be a list of class names, got {type(labels).__name__}")
    if len(labels) > MAX_CLASSES:
        raise MetadataError(f"{_where(source, 'labels')} has {len(labels)} names, more than {MAX_CLASSES}")
    seen: set[str] = set()
    for i, name in enumerate(labels):
        if not isinstance(name, str):
            raise MetadataError(f"{_where(source, f'labels[{i}]')} must be a string, got {type(name).__name__}")
        if not name or len(name) > MAX_LABEL_LEN:
            raise MetadataError(f"{_where(source, f'labels[{i}]')} must be 1..{MAX_LABEL_LEN} characters long, "
                                f"got {len(name)}")
        if name in seen:
            raise MetadataError(f"{_where(source, f'labels[{i}]')}={name[:40]!r} appears twice")
        seen.add(name)
    if num_classes is not None and len(labels) != num_classes:
        raise MetadataError(f"{_where(source, 'labels')} has {len(labels)} names but the model has "
                            f"{num_classes} classes")
    return list(labels)


def check_json_budget(obj: Any, field: str, source: str = "", *, max_nodes: int = MAX_JSON_NODES,
                      max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Refuse free-form metadata that would expand into a huge report: plain JSON types only, bounded nesting,
    string length and node count (a value reached through N shared references counts N times, so a pickle
    'billion laughs' is stopped after ``max_nodes`` steps, not after it has been written out)."""
    stack: list[tuple[Any, int]] = [(obj, 0)]
    nodes = 0
    while stack:
        value, depth = stack.pop()
        nodes += 1
        if nodes > max_nodes:
            raise MetadataError(f"{_where(source, field)} is too large (more than {max_nodes} values)")
        if depth > max_depth:
            raise MetadataError(f"{_where(source, field)} is nested deeper than {max_depth} levels")
        if isinstance(value, dict):
            for k, v in value.items():
                if not isinstance(k, str):
                    raise MetadataError(f"{_where(source, field)} has a non-string key {_short(k)}")
                stack.append((k, depth + 1))
                stack.append((v, depth + 1))
        elif isinstance(value, (list, tuple)):
            stack.extend((v, depth + 1) for v in value)
        elif isinstance(value, str):
            if len(value) > MAX_JSON_STR:
                raise MetadataError(f"{_where(source, field)} holds a string of {len(value)} characters "
                                    f"(more than {MAX_JSON_STR})")
        elif value is not None and not isinstance(value, (bool, int, float)):
            raise MetadataError(f"{_where(source, field)} holds a {type(value).__name__}; only JSON values "
                                "(objects, lists, strings, numbers) are allowed")
    return obj


def safe_name(raw: str, max_len: int = MAX_NAME_LEN) -> str:
    """``raw`` made safe as one path component: runs of characters outside [A-Za-z0-9._-] become '_', leading
    dots and dashes are dropped, at most ``max_len`` characters. '' when nothing meaningful (no letter or digit)
    is left — the caller then falls back to another name."""
    s = _NAME_BAD.sub("_", raw).lstrip(".-")[:max_len]
    return s if any(c.isalnum() for c in s) else ""


def check_seed(seed: Any, option: str = "--seed") -> int:
    """A seed for numpy's generator: a non-negative integer (UsageError otherwise)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise UsageError(f"{option} must be an integer in 0..{MAX_SEED}, got {seed!r}")
    return seed


def check_limit(limit: Any, option: str = "--limit") -> int | None:
    """None (all images) or a positive integer (UsageError otherwise)."""
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise UsageError(f"{option} must be a positive number of images, got {limit!r}")
    return limit
