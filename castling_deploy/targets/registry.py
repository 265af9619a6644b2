"""The one table of deployment targets. Adding a target = one folder ``targets/<name>/`` (``target.py`` with a
``build(session, work_dir) -> TargetOutcome`` and a ``census_summary(census) -> str``) + one entry below.

Each entry's ``load`` is a plain import inside a function: heavy runtimes load only when their target is used,
and go-to-definition follows it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Callable

from ..errors import UsageError


@dataclass(frozen=True)
class TargetOption:
    """An export option that only some targets understand (the CLI flag, its default, what it needs)."""

    name: str
    flag: str
    default: Any
    needs_int8: bool = False
    needs: str | None = None  # another option that must be set for this one to mean anything


@dataclass(frozen=True)
class TargetSpec:
    name: str
    summary: str
    load: Callable[[], ModuleType]
    extra: str | None = None  # pip extra that brings its converter/runtime: castling-deploy[extra]
    packages: tuple[str, ...] = ()  # distributions whose versions go into its reports
    suffixes: tuple[str, ...] = ()  # artifact kinds it writes (runners live in castling_deploy.runtime)
    options: tuple[TargetOption, ...] = field(default_factory=tuple)


def _onnx() -> ModuleType:
    from .onnx import target

    return target


def _tensorrt() -> ModuleType:
    from .tensorrt import target

    return target


def _coreml() -> ModuleType:
    from .coreml import target

    return target


def _tflite() -> ModuleType:
    from .tflite import target

    return target


def _executorch() -> ModuleType:
    from .executorch import target

    return target


TARGETS: dict[str, TargetSpec] = {
    "onnx": TargetSpec("onnx", "ONNX fp32 and INT8 QDQ for ONNX Runtime", _onnx,
                       packages=("onnx", "onnxruntime", "onnxsim"), suffixes=(".onnx",),
                       # None = not chosen: 8-bit weights, with a warning when the export host lacks VNNI/dotprod.
                       options=(TargetOption("weight_bits", "--weight-bits", None, needs_int8=True),)),
    "tensorrt": TargetSpec("tensorrt", "TensorRT typed ONNX (fp32 / fp16 / INT8 QDQ) + engine on the device", _tensorrt,
                           extra="tensorrt", packages=("onnx", "onnxruntime", "onnxsim", "tensorrt"),
                           suffixes=(".onnx", ".engine", ".plan"),
                           options=(TargetOption("quantizer", "--quantizer", "ort", needs_int8=True),)),
    "coreml": TargetSpec("coreml", "Core ML mlprogram fp16 / W8 / W8A8 (Apple Neural Engine)", _coreml,
                         extra="coreml", packages=("coremltools",), suffixes=(".mlpackage",),
                         options=(TargetOption("weights_only", "--weights-only", False, needs_int8=True),)),
    "tflite": TargetSpec("tflite", "LiteRT .tflite fp32 / fp16 / INT8 / full-integer", _tflite,
                         extra="tflite", packages=("litert-torch", "ai-edge-litert", "ai-edge-quantizer"),
                         suffixes=(".tflite",),
                         options=(TargetOption("full_integer", "--full-integer", False, needs_int8=True),
                                  TargetOption("io_dtype", "--io-dtype", "float32", needs="full_integer"),
                                  TargetOption("strict_int8", "--strict-int8", False, needs="full_integer"))),
    "executorch": TargetSpec("executorch", "ExecuTorch .pte fp32 / fp16 / INT8, XNNPACK-delegated (PyTorch mobile)",
                             _executorch, extra="executorch", packages=("executorch", "torchao"),
                             suffixes=(".pte",)),
}
BASE_PACKAGES = ("torch", "numpy")


def target_names() -> tuple[str, ...]:
    return tuple(TARGETS)


def get_target(name: str) -> TargetSpec:
    try:
        return TARGETS[name]
    except KeyError:
        raise UsageError(f"unknown --target {name!r}; choose from {', '.join(TARGETS)} or all") from None


def _all_options() -> dict[str, tuple[TargetOption, list[str]]]:
    out: dict[str, tuple[TargetOption, list[str]]] = {}
    for spec in TARGETS.values():
        for opt in spec.options:
            out.setdefault(opt.name, (opt, []))[1].append(spec.name)
    return out


def option_default(name: str) -> Any:
    try:
        return _all_options()[name][0].default
    except KeyError:
        raise KeyError(f"no target declares the option {name!r}") from None


def all_option_defaults() -> dict[str, Any]:
    return {name: opt.default for name, (opt, _) in _all_options().items()}


def check_target_options(targets: list[str], values: dict[str, Any], int8: bool) -> None:
    """A target-specific flag that no chosen target accepts, or that lacks what it needs, is an exit-2 error
    naming the targets that do accept it."""
    for name, (opt, owners) in _all_options().items():
        value = values.get(name, opt.default)
        if value == opt.default:
            continue
        if not set(owners) & set(targets):
            raise UsageError(f"{opt.flag} applies only to --target {' / '.join(owners)}; add that target or drop "
                             f"{opt.flag}")
        if opt.needs_int8 and not int8:
            raise UsageError(f"{opt.flag} needs --int8 (it chooses how --target {' / '.join(owners)} quantizes)")
        if opt.needs is not None and values.get(opt.needs, option_default(opt.needs)) == option_default(opt.needs):
            need = _all_options()[opt.needs][0]
            raise UsageError(f"{opt.flag} applies only with {need.flag}; add {need.flag} or drop {opt.flag}")
