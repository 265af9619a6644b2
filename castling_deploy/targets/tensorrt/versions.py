"""What each TensorRT version accepts: the typing mode, the builder calls and the ``trtexec`` flags (the matrix).

From NVIDIA's TensorRT 10.x -> 11.x migration guide and the 10.13 Python API (``tensorrt-stubs``):

- 11.x: strongly typed is the only mode. Python: ``create_network(0)``, no precision flag. trtexec: no precision
  flag (``--stronglyTyped`` is implied; ``--fp16 --int8 --best ...`` were removed).
- 10.12 - 10.x: strongly typed (weak typing deprecated). Python: ``create_network(1 << STRONGLY_TYPED)``.
  trtexec: ``--stronglyTyped``.
- 10.0 - 10.11 (JetPack 6: 10.3): weak typing, the fallback. Python: ``create_network(0)`` and
  ``BuilderFlag.FP16`` (+ ``INT8`` for int8). trtexec: ``--fp16`` (+ ``--int8``).
- older than 10.0: not supported.

In every mode the precision comes from the ONNX that is built: fp32 from the float ONNX, fp16 from the typed fp16
ONNX, int8 from the typed INT8 QDQ ONNX (float islands fp16). Weak typing on 10.x < 10.12 additionally allows
fp16 kernels for the layers the graph leaves fp32, as TensorRT did before strong typing.
"""
from __future__ import annotations

import re

from ...errors import UsageError

PRECISIONS = ("fp32", "fp16", "int8")
STRONG_ONLY, STRONG, WEAK = "strong-only", "strong", "weak"
FIRST_SUPPORTED = (10, 0)
FIRST_STRONG_DEFAULT = (10, 12)  # weak typing deprecated from here on
FIRST_STRONG_ONLY = (11, 0)

# Removed in TensorRT 11 (migration guide): attributes that must never be touched on 11.x.
TRT11_REMOVED = (
    "BuilderFlag.FP16", "BuilderFlag.BF16", "BuilderFlag.INT8", "BuilderFlag.FP8", "BuilderFlag.INT4",
    "BuilderFlag.FP4", "BuilderFlag.OBEY_PRECISION_CONSTRAINTS", "BuilderFlag.PREFER_PRECISION_CONSTRAINTS",
    "BuilderFlag.DIRECT_IO",
    "Builder.platform_has_fast_fp16", "Builder.platform_has_fast_int8",
    # the INT8 calibrator API
    "IBuilderConfig.int8_calibrator", "IBuilderConfig.set_calibration_profile",
    "IBuilderConfig.get_calibration_profile", "CalibrationAlgoType", "IInt8Calibrator", "IInt8EntropyCalibrator",
    "IInt8EntropyCalibrator2", "IInt8LegacyCalibrator", "IInt8MinMaxCalibrator",
)
TRTEXEC11_REMOVED_FLAGS = ("--fp16", "--int8", "--bf16", "--fp8", "--int4", "--best", "--calib")

_WEAK_FLAGS = {"fp32": (), "fp16": ("FP16",), "int8": ("FP16", "INT8")}


def parse_version(text: str) -> tuple[int, int, int]:
    """'10.3.0.30' / '11.4.0' / '10.13' -> (major, minor, patch)."""
    m = re.match(r"\s*(\d+)\.(\d+)(?:\.(\d+))?", str(text))
    if not m:
        raise UsageError(f"cannot read a TensorRT version from {text!r}; expected e.g. 10.3.0 or 11.4.0")
    return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)


def banner_version(text: str) -> tuple[int, int, int] | None:
    """The version in trtexec's banner ``&&&& RUNNING TensorRT.trtexec [TensorRT v110400] # ...``: vMMmmpp from
    TensorRT 10 on (v100300 = 10.3.0), vMmpp before (v8601 = 8.6.1). None when the text has no banner."""
    m = re.search(r"\[TensorRT v(\d+)\]", text)
    if not m:
        return None
    n = int(m.group(1))
    if n >= 100000:
        return n // 10000, n // 100 % 100, n % 100
    return n // 1000, n // 100 % 10, n % 100


def typing_mode(version: str | tuple[int, ...]) -> str:
    """'strong-only' (11.x), 'strong' (10.12+) or 'weak' (10.0-10.11); older TensorRT is a usage error."""
    v = parse_version(version) if isinstance(version, str) else tuple(version)
    if v[:2] >= FIRST_STRONG_ONLY:
        return STRONG_ONLY
    if v[:2] >= FIRST_STRONG_DEFAULT:
        return STRONG
    if v[:2] >= FIRST_SUPPORTED:
        return WEAK
    raise UsageError(f"TensorRT {'.'.join(map(str, v))} is not supported: TensorRT 10.0 or newer is needed "
                     "(JetPack 6 ships 10.3)")


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise UsageError(f"unknown TensorRT precision {precision!r}; choose one of {', '.join(PRECISIONS)}")


def builder_flags(mode: str, precision: str) -> tuple[str, ...]:
    """The ``trt.BuilderFlag`` members to set: only under weak typing (they do not exist on 11.x)."""
    check_precision(precision)
    return _WEAK_FLAGS[precision] if mode == WEAK else ()


def trtexec_flags(mode: str, precision: str) -> tuple[str, ...]:
    """The precision/typing flags of the trtexec command for this typing mode."""
    check_precision(precision)
    if mode == STRONG_ONLY:
        return ()
    if mode == STRONG:
        return ("--stronglyTyped",)
    return tuple(f"--{f.lower()}" for f in _WEAK_FLAGS[precision])
