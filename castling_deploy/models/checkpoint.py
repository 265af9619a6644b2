"""Checkpoint loading and saving, safe by default.

Two kinds of file:
- ours: ``{"format": "castling-deploy/1", "arch", "config", "preprocess", "labels", "state_dict", ...}`` as
  ``.pt`` (read with ``torch.load(weights_only=True)``: a pickle that would import anything beyond tensors and
  plain containers is refused, never executed) or ``.safetensors`` (header metadata holds the JSON description);
- foreign DeiT/timm files: a plain state dict, or one wrapped in ``model`` / ``state_dict`` / ``model_ema``,
  possibly with ``module.`` prefixes; ``--arch`` names the architecture (or it is inferred from the shapes).

Everything in a checkpoint is untrusted. Before a model is built: the config is checked field by field against
``castling_deploy.limits`` (``ViTConfig.validate``), preprocess (``limits.validate_preprocess``), labels
(``limits.validate_labels``) and the free-form records (``train``, ``created``, ``fold``) are bounded, every
state-dict entry must be a dense CPU tensor with finite values, and the weight shapes are matched against the
architecture on PyTorch's meta device (no memory). Any violation is a one-line error, exit 2, naming the field or
tensor.

The model name (``Checkpoint.name``, the ``<out>/<name>/`` folder of an export) comes from the file name,
restricted to ``[A-Za-z0-9._-]`` (other runs become ``_``), without leading dots or dashes, at most 100
characters; a file name with no letter or digit left (``...pt``, ``-.pt``) falls back to the architecture name.
"""
from __future__ import annotations

import json
import logging
import pickle
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import limits
from ..digest import file_sha256
from ..errors import CheckpointError, MetadataError, UsageError
from .registry import VARIANTS, get_config
from .vit import CastlingViT, ViTConfig, resample_pos_embed

FORMAT = "castling-deploy/1"
log = logging.getLogger(__name__)
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def default_preprocess(img_size: int) -> dict[str, Any]:
    """ImageNet defaults (DeiT): resize the short side to img_size/0.875, center crop, bicubic."""
    return {
        "resize": int(round(img_size / 0.875)),
        "crop": img_size,
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
        "interpolation": "bicubic",
        "channels": "RGB",
    }


@dataclass
class Checkpoint:
    """A loaded checkpoint: what the model is, how to feed it, and its weights."""

    arch: str
    config: ViTConfig
    state_dict: dict[str, torch.Tensor]
    preprocess: dict[str, Any]
    labels: list[str] | None
    path: str
    sha256: str
    source_format: str  # "castling-deploy .pt", "castling-deploy .safetensors", "foreign state dict"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """A safe single path component (see the module docstring): the file stem, else the architecture."""
        return model_name(self.path, self.arch)

    def build_model(self, form: str | None = None, **overrides: Any) -> CastlingViT:
        """Instantiate the model and load the weights strictly (errors name the keys)."""
        cfg = self.config.with_(**overrides)
        if form is not None:
            cfg = cfg.with_(form=form)
        model = CastlingViT(cfg)
        state = dict(self.state_dict)
        if "pos_embed" in state and state["pos_embed"].shape != model.pos_embed.shape:
            state["pos_embed"] = resample_pos_embed(state["pos_embed"], cfg.grid)
        load_state_strict(model, state, self.path)
        return model.eval()


def model_name(path: str | Path, arch: str = "") -> str:
    """The name an export folder gets: ``limits.safe_name`` of the file stem, falling back to the architecture
    name, then to ``model`` — never empty, never ``.``/``..``, never containing a path separator."""
    return limits.safe_name(Path(path).stem) or limits.safe_name(arch) or "model"


def _first(items: list[str], n: int = 5) -> str:
    shown = ", ".join(i if len(i) <= 80 else i[:79] + "…" for i in items[:n])
    return shown + (f" (+{len(items) - n} more)" if len(items) > n else "")


def load_state_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], path: str) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    _raise_key_problems(missing, unexpected, mismatched, path)
    model.load_state_dict(state, strict=True)


def _raise_key_problems(missing: list[str], unexpected: list[str], mismatched: list[str], path: str) -> None:
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys: {_first(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {_first(unexpected)}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatches: {_first(mismatched, 3)}")
    if problems:
        raise CheckpointError(f"{path}: weights do not fit the architecture — " + "; ".join(problems)
                              + " (check --arch)")


def pickle_globals(path: Path) -> list[str]:
    """The ``module.name`` globals a pickle would import, read with pickletools (nothing is executed)."""
    import pickletools

    data = path.read_bytes()
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            names = [n for n in z.namelist() if n.endswith("data.pkl")]
            if not names:
                return []
            data = z.read(names[0])
    found: list[str] = []
    strings: list[str] = []
    try:
        for op, arg, _ in pickletools.genops(data):
            if op.name == "GLOBAL":
                found.append(str(arg).replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.append(f"{strings[-2]}.{strings[-1]}")
            elif isinstance(arg, str):
                strings.append(arg)
    except Exception:  # a truncated/corrupt stream: report what was seen before it broke
        pass
    return found


_SAFE_GLOBAL_PREFIXES = ("torch.", "collections.OrderedDict", "builtins.set", "builtins.frozenset",
                         "builtins.bytearray", "builtins.slice", "builtins.complex")


def _torch_load_safely(path: Path) -> Any:
    try:
        import argparse

        # DeiT's train script stores its argparse.Namespace beside the weights: a plain attribute bag, safe to build.
        with warnings.catch_warnings(), torch.serialization.safe_globals([argparse.Namespace]):
            warnings.simplefilter("ignore")  # torch warns about pickle protocols on stderr; we explain instead
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        msg = str(exc)
        culprits = [g for g in pickle_globals(path) if not g.startswith(_SAFE_GLOBAL_PREFIXES)]
        if not culprits and "GLOBAL" in msg:
            culprits = [msg.split("GLOBAL ", 1)[1].split()[0].rstrip(".,")]
        if not culprits:
            first = next((ln for ln in msg.splitlines() if ln.startswith("Unsupported")), msg.splitlines()[0])
            raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): "
                                  f"{first.strip()[:160]}") from None
        raise CheckpointError(
            f"{path}: refused to unpickle: the file asks to import {', '.join(culprits[:3])}, which could run "
            "code; only weights-only checkpoints are loaded — re-save it with torch.save(model.state_dict(), ...) "
            "or convert it to .safetensors"
        ) from None
    except RecursionError:
        raise CheckpointError(f"{path}: refused: its pickle is nested too deeply to be a checkpoint") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, KeyError, TypeError,
            AttributeError, IndexError) as exc:
        first = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): {first}") from None


def _load_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        return load_file(str(path)), meta
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable .safetensors file (truncated or corrupt?): {exc}") from None


def _unwrap_foreign(obj: Any, path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """The state dict inside a DeiT/timm file and where it was found. The trained weights (``model`` /
    ``state_dict``) are preferred over an EMA copy, which is used only when nothing else is there."""
    where = "top level"
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "module", "model_ema", "state_dict_ema"):
            if key in obj and isinstance(obj[key], dict):
                obj, where = obj[key], f"key '{key}'"
                break
    if not isinstance(obj, dict) or not any(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: no state dict found (expected tensors, or a dict with 'model'/'state_dict')")
    check_state_dict(obj, path)
    out = {}
    for k, v in obj.items():
        while k.startswith("module."):
            k = k[len("module.") :]
        out[k] = v
    if "dist_token" in out or "head_dist.weight" in out:
        raise CheckpointError(f"{path}: a distilled DeiT (dist_token/head_dist) is not supported: its two heads are "
                              "averaged at inference; export the non-distilled model")
    return out, where


def check_state_dict(state: Any, path: str | Path, where: str = "state_dict") -> dict[str, torch.Tensor]:
    """Every entry a dense CPU tensor under a string key, its values finite; refuses naming the first offender."""
    if not isinstance(state, dict) or not state:
        raise CheckpointError(f"{path}: '{where}' must be a non-empty dict of tensors")
    for k, v in state.items():
        if not isinstance(k, str):
            raise CheckpointError(f"{path}: {where} has a non-string key {str(k)[:60]!r}")
        name = k[:120]
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{path}: {where} entry {name!r} is a {type(v).__name__}, not a tensor")
        if v.layout != torch.strided or v.device.type != "cpu" or v.is_quantized:
            raise CheckpointError(f"{path}: tensor {name!r} is not a dense CPU tensor ({v.layout}, {v.device})")
        if v.is_complex():
            raise CheckpointError(f"{path}: tensor {name!r} has complex dtype {v.dtype}")
        if v.numel() and v.numel() * v.element_size() > v.untyped_storage().nbytes():
            raise CheckpointError(f"{path}: tensor {name!r} {tuple(v.shape)} claims more elements than its storage "
                                  "holds (an expanded view); re-save it with .contiguous()")
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            bad = int((~torch.isfinite(v)).sum())
            raise CheckpointError(f"{path}: tensor {name!r} has {bad} NaN/Inf value(s); the weights are broken "
                                  "(diverged training or a damaged file), refusing to load them")
    return state


def _checked_extras(obj: dict[str, Any], path: Path) -> dict[str, Any]:
    """The free-form records kept from a checkpoint (``train``, ``created``, ``fold``), bounded and typed."""
    extra = {k: obj[k] for k in ("train", "created", "fold") if k in obj and obj[k] is not None}
    for k, v in extra.items():
        limits.check_json_budget(v, k, str(path))
    if not isinstance(extra.get("train", {}), dict):
        raise MetadataError(f"{path}: 'train' must be a JSON object")
    if not isinstance(extra.get("created", ""), str):
        raise MetadataError(f"{path}: 'created' must be a string")
    if "fold" in extra:
        _check_fold_record(extra["fold"], path)
    return extra


def _check_fold_record(rec: Any, path: Path) -> None:
    """The record a earlier `fold` left, which an export copies into its error budget."""
    if not isinstance(rec, dict):
        raise MetadataError(f"{path}: 'fold' must be a JSON object")
    if not isinstance(rec.get("forced", False), bool):
        raise MetadataError(f"{path}: fold.forced must be true or false")
    st = rec.get("stage")
    if st is None:
        return
    if not isinstance(st, dict):
        raise MetadataError(f"{path}: fold.stage must be a JSON object")
    for key in ("stage", "reference", "candidate", "executor"):
        if not isinstance(st.get(key), str) or len(st[key]) > 200:
            raise MetadataError(f"{path}: fold.stage.{key} must be a string of at most 200 characters")
    m = st.get("metrics")
    if not isinstance(m, dict):
        raise MetadataError(f"{path}: fold.stage.metrics must be a JSON object")
    for key in ("max_abs_logit", "cosine", "top1_agreement", "top1_acc", "top1_drop_points"):
        if (key in m or key in ("max_abs_logit", "cosine", "top1_agreement")) and (
                isinstance(m.get(key), bool) or not isinstance(m.get(key), (int, float))):
            raise MetadataError(f"{path}: fold.stage.metrics.{key} must be a number")
    if not isinstance(st.get("goals", {}), dict):
        raise MetadataError(f"{path}: fold.stage.goals must be a JSON object")
    fails = st.get("failures", [])
    if not isinstance(fails, list) or not all(isinstance(f, str) for f in fails):
        raise MetadataError(f"{path}: fold.stage.failures must be a list of strings")


def check_shapes(cfg: ViTConfig, state: dict[str, torch.Tensor], path: str) -> None:
    """Match the weights against ``cfg`` on the meta device (nothing allocated), before the real build."""
    with torch.device("meta"):
        expected = CastlingViT(cfg).state_dict()
    pos = state.get("pos_embed")
    if pos is not None and "pos_embed" in expected:
        want = expected["pos_embed"].shape
        if pos.ndim == 3 and pos.shape[0] == 1 and pos.shape[2] == want[2] and pos.shape[1] != want[1]:
            expected = dict(expected, pos_embed=pos)  # resampled to the new grid in build_model
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k} {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
                  for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    _raise_key_problems(missing, unexpected, mismatched, path)


def infer_arch(state: dict[str, torch.Tensor]) -> str | None:
    """Match a foreign state dict against the registry by embed dim, depth and patch size."""
    proj = state.get("patch_embed.proj.weight")
    if proj is None or proj.ndim != 4:
        return None
    dim, patch = proj.shape[0], proj.shape[-1]
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    for name, (cfg, _) in VARIANTS.items():
        if (cfg.embed_dim, cfg.depth, cfg.patch_size) == (dim, depth, patch):
            return name
    return None


def _foreign_config(arch: str, state: dict[str, torch.Tensor]) -> ViTConfig:
    cfg = get_config(arch)
    overrides: dict[str, Any] = {}
    head = state.get("head.weight")
    if head is not None and head.ndim == 2:
        overrides["num_classes"] = head.shape[0]
    if "blocks.0.attn.dconv.weight" not in state and any(k.startswith("blocks.") for k in state):
        overrides["attention"] = "softmax"
    if "blocks.0.attn.qkv.bias" not in state and "blocks.0.attn.qkv.weight" in state:
        overrides["qkv_bias"] = False
    pos = state.get("pos_embed")
    if pos is not None and pos.ndim == 3 and pos.shape[1] >= 2:
        grid = int(round((pos.shape[1] - 1) ** 0.5))
        overrides["img_size"] = grid * cfg.patch_size
    return cfg.with_(**overrides)


def load_checkpoint(path: str | Path, arch: str | None = None, img_size: int | None = None) -> Checkpoint:
    """Load ``path`` safely. ``arch`` is required for foreign files whose shapes match no variant;
    ``img_size`` changes the resolution (position embeddings are resampled)."""
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{p}: no such checkpoint file")
    if p.is_dir():
        raise UsageError(f"{p}: is a directory; pass a checkpoint file (.pt, .pth or .safetensors)")
    if arch is not None and arch not in VARIANTS:
        get_config(arch)  # raises the "unknown architecture" UsageError
    digest = file_sha256(p)
    if p.suffix == ".safetensors":
        state, meta = _load_safetensors(p)
        try:
            desc = json.loads(meta["castling_deploy"]) if "castling_deploy" in meta else None
        except (ValueError, RecursionError):
            raise CheckpointError(f"{p}: its 'castling_deploy' metadata is not valid JSON") from None
        if desc is not None and not isinstance(desc, dict):
            raise CheckpointError(f"{p}: its 'castling_deploy' metadata is not a JSON object")
        obj: Any = dict(desc, state_dict=state) if desc else state
        kind = "castling-deploy .safetensors" if desc else "foreign safetensors"
    else:
        obj = _torch_load_safely(p)
        kind = "castling-deploy .pt"
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        if "config" not in obj:
            raise CheckpointError(f"{p}: castling-deploy checkpoint without a 'config'")
        cfg = ViTConfig.from_dict(obj["config"], str(p))
        state = check_state_dict(obj.get("state_dict"), p)
        ck_arch = obj.get("arch", "")
        if not isinstance(ck_arch, str) or (ck_arch and limits.safe_name(ck_arch) != ck_arch):
            raise MetadataError(f"{p}: arch must be a name of at most {limits.MAX_NAME_LEN} characters from "
                                f"[A-Za-z0-9._-], got {str(ck_arch)[:60]!r}")
        if arch is not None and arch != ck_arch:
            ref = get_config(arch)
            if (ref.embed_dim, ref.depth, ref.num_heads) != (cfg.embed_dim, cfg.depth, cfg.num_heads):
                raise CheckpointError(
                    f"{p}: checkpoint is {ck_arch} ({cfg.embed_dim} dim, {cfg.depth} blocks) but --arch {arch} "
                    f"was given; drop --arch or pass --arch {ck_arch}"
                )
        raw_pp = obj.get("preprocess")
        if raw_pp is not None and not isinstance(raw_pp, dict):
            raise MetadataError(f"{p}: preprocess must be a JSON object, got {type(raw_pp).__name__}")
        ck = Checkpoint(
            arch=ck_arch, config=cfg, state_dict=state, preprocess=raw_pp or {},
            labels=limits.validate_labels(obj.get("labels"), cfg.num_classes, str(p)), path=str(p), sha256=digest,
            source_format=kind, extra=_checked_extras(obj, p),
        )
    else:
        state, where = _unwrap_foreign(obj, p)
        name = arch or infer_arch(state)
        if name is None:
            raise CheckpointError(
                f"{p}: a foreign state dict whose shapes match no known variant; pass --arch "
                f"(one of {', '.join(sorted(VARIANTS))})"
            )
        cfg = _foreign_config(name, state).validate(str(p))
        ck = Checkpoint(arch=name, config=cfg, state_dict=state, preprocess={},
                        labels=None, path=str(p), sha256=digest, source_format=f"foreign state dict ({where})")
    ck.preprocess = limits.validate_preprocess({**default_preprocess(ck.config.img_size), **ck.preprocess}, str(p))
    if ck.preprocess["crop"] != ck.config.img_size:
        raise MetadataError(f"{p}: preprocess.crop {ck.preprocess['crop']} differs from config.img_size "
                            f"{ck.config.img_size}: the model could not take the images")
    if img_size is not None and img_size != ck.config.img_size:
        if isinstance(img_size, bool) or not isinstance(img_size, int) or img_size <= 0 \
                or img_size % ck.config.patch_size or img_size > limits.MAX_IMG_SIZE:
            raise UsageError(f"--imgsz {img_size} is not a multiple of the patch size {ck.config.patch_size} "
                             f"in 1..{limits.MAX_IMG_SIZE}")
        ck.config = ck.config.with_(img_size=img_size).validate(f"--imgsz {img_size}")
        scale = img_size / ck.preprocess["crop"]
        ck.preprocess = limits.validate_preprocess(
            dict(ck.preprocess, crop=img_size, resize=max(1, int(round(ck.preprocess["resize"] * scale)))),
            f"--imgsz {img_size}")
    if ck.name != p.stem:
        log.warning("%s: its file name is not a safe folder name; its exports are named %r", p, ck.name)
    # Fail now, with key names, rather than at export time: first the shapes on the meta device (no memory, so a
    # config that does not match the weights never allocates), then the real model.
    check_shapes(ck.config, ck.state_dict, str(p))
    try:
        ck.build_model()
    except CheckpointError:
        raise
    except (ValueError, RuntimeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{p}: cannot build {ck.arch} from this checkpoint: {str(exc).splitlines()[0][:200]}") from None
    return ck


def save_checkpoint(
    path: str | Path,
    model: CastlingViT,
    arch: str,
    preprocess: dict[str, Any],
    labels: list[str] | None = None,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write our format (.pt or .safetensors, by suffix)."""
    p = Path(path)
    desc: dict[str, Any] = {
        "format": FORMAT,
        "arch": arch,
        "config": model.cfg.to_dict(),
        "preprocess": preprocess,
        "labels": labels,
    }
    desc.update(extra or {})
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    tmp = p.with_name(p.name + ".tmp")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(state, str(tmp), metadata={"castling_deploy": json.dumps(desc)})
        else:
            torch.save(dict(desc, state_dict=state), str(tmp))
        tmp.replace(p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
