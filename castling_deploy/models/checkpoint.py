"""Checkpoint loading and saving, safe by default.

Two kinds of file:
- ours: ``{"format": "castling-deploy/1", "arch", "config", "preprocess", "labels", "state_dict", ...}`` as
  ``.pt`` (read with ``torch.load(weights_only=True)``: a pickle that would import anything beyond tensors and
  plain containers is refused, never executed) or ``.safetensors`` (header metadata holds the JSON description);
- foreign DeiT/timm files: a plain state dict, or one wrapped in ``model`` / ``state_dict`` / ``model_ema``,
  possibly with ``module.`` prefixes; ``--arch`` names the architecture (or it is inferred from the shapes).
"""
from __future__ import annotations

import json
import pickle
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..digest import file_sha256
from ..errors import CheckpointError, UsageError
from .registry import VARIANTS, get_config
from .vit import CastlingViT, ViTConfig, resample_pos_embed

FORMAT = "castling-deploy/1"
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
        return Path(self.path).stem

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


def _first(items: list[str], n: int = 5) -> str:
    shown = ", ".join(items[:n])
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
    model.load_state_dict(state, strict=True)


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
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, KeyError) as exc:
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
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: no state dict found (expected tensors, or a dict with 'model'/'state_dict')")
    out = {}
    for k, v in obj.items():
        while k.startswith("module."):
            k = k[len("module.") :]
        out[k] = v
    if "dist_token" in out or "head_dist.weight" in out:
        raise CheckpointError(f"{path}: a distilled DeiT (dist_token/head_dist) is not supported: its two heads are "
                              "averaged at inference; export the non-distilled model")
    return out, where


def infer_arch(state: dict[str, torch.Tensor]) -> str | None:
    """Match a foreign state dict against the registry by embed dim, depth and patch size."""
    proj = state.get("patch_embed.proj.weight")
    if proj is None:
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
    if head is not None:
        overrides["num_classes"] = head.shape[0]
    if "blocks.0.attn.dconv.weight" not in state and any(k.startswith("blocks.") for k in state):
        overrides["attention"] = "softmax"
    if "blocks.0.attn.qkv.bias" not in state and "blocks.0.attn.qkv.weight" in state:
        overrides["qkv_bias"] = False
    pos = state.get("pos_embed")
    if pos is not None:
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
        except ValueError:
            raise CheckpointError(f"{p}: its 'castling_deploy' metadata is not valid JSON") from None
        if desc is not None and not isinstance(desc, dict):
            raise CheckpointError(f"{p}: its 'castling_deploy' metadata is not a JSON object")
        obj: Any = dict(desc, state_dict=state) if desc else state
        kind = "castling-deploy .safetensors" if desc else "foreign safetensors"
    else:
        obj = _torch_load_safely(p)
        kind = "castling-deploy .pt"
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        try:
            cfg = ViTConfig.from_dict(obj["config"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{p}: malformed castling-deploy checkpoint config: {exc}") from None
        if not isinstance(obj.get("state_dict"), dict):
            raise CheckpointError(f"{p}: castling-deploy checkpoint without a 'state_dict'")
        ck_arch = obj.get("arch", "")
        if arch is not None and arch != ck_arch:
            ref = get_config(arch)
            if (ref.embed_dim, ref.depth, ref.num_heads) != (cfg.embed_dim, cfg.depth, cfg.num_heads):
                raise CheckpointError(
                    f"{p}: checkpoint is {ck_arch} ({cfg.embed_dim} dim, {cfg.depth} blocks) but --arch {arch} "
                    f"was given; drop --arch or pass --arch {ck_arch}"
                )
        ck = Checkpoint(
            arch=ck_arch, config=cfg, state_dict=obj["state_dict"], preprocess=obj.get("preprocess")
            or default_preprocess(cfg.img_size), labels=obj.get("labels"), path=str(p), sha256=digest,
            source_format=kind, extra={k: obj[k] for k in ("train", "created", "fold") if k in obj},
        )
    else:
        state, where = _unwrap_foreign(obj, p)
        name = arch or infer_arch(state)
        if name is None:
            raise CheckpointError(
                f"{p}: a foreign state dict whose shapes match no known variant; pass --arch "
                f"(one of {', '.join(sorted(VARIANTS))})"
            )
        cfg = _foreign_config(name, state)
        ck = Checkpoint(arch=name, config=cfg, state_dict=state, preprocess=default_preprocess(cfg.img_size),
                        labels=None, path=str(p), sha256=digest, source_format=f"foreign state dict ({where})")
    ck.preprocess = {**default_preprocess(ck.config.img_size), **(ck.preprocess or {})}
    if img_size is not None and img_size != ck.config.img_size:
        if img_size <= 0 or img_size % ck.config.patch_size:
            raise UsageError(f"--imgsz {img_size} is not a multiple of the patch size {ck.config.patch_size}")
        ck.config = ck.config.with_(img_size=img_size)
        scale = img_size / ck.preprocess["crop"]
        ck.preprocess = dict(ck.preprocess, crop=img_size, resize=int(round(ck.preprocess["resize"] * scale)))
    # Fail now, with key names, rather than at export time.
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
