"""``build_engine.sh``: one POSIX shell script that builds the engine on any supported TensorRT, unchanged.

It reads the TensorRT version on the device — the ``[TensorRT vXXYYZZ]`` banner that every trtexec run prints, else
the ``tensorrt`` Python package, else ``TRT_VERSION`` — and runs the command that version accepts (``versions.py``):
no precision flag on 11.x, ``--stronglyTyped`` on 10.12+, ``--fp16 [--int8]`` (weak typing) on 10.0-10.11 such as
JetPack 6's 10.3. trtexec is looked for on PATH, then where JetPack puts it (/usr/src/tensorrt/bin), or ``TRTEXEC``.
"""
from __future__ import annotations

import shlex

from .engine import trtexec_command
from .versions import STRONG, STRONG_ONLY, WEAK, check_precision, trtexec_flags

ENGINE_NAME = "model.engine"
JETPACK_TRTEXEC = "/usr/src/tensorrt/bin/trtexec"
_MODE_EXAMPLES = {STRONG_ONLY: "11.0", STRONG: "10.12", WEAK: "10.3"}
_MODE_TITLES = {STRONG_ONLY: "TensorRT 11.x (strongly typed only)",
                STRONG: "TensorRT 10.12-10.x (--stronglyTyped)",
                WEAK: "TensorRT 10.0-10.11, e.g. JetPack 6's 10.3 (weak typing)"}

_DETECT = r'''TRTEXEC="${TRTEXEC:-$(command -v trtexec || true)}"
if [ -z "$TRTEXEC" ] && [ -x __JETPACK__ ]; then TRTEXEC=__JETPACK__; fi
if [ -z "$TRTEXEC" ]; then
  echo "build_engine.sh: trtexec not found on PATH or in __JETPACK_DIR__; set TRTEXEC=/path/to/trtexec" >&2
  exit 4
fi

trt_version() {  # the [TensorRT vXXYYZZ] banner (v100300 = 10.3.0, v8601 = 8.6.1), else the Python package
  if [ -n "${TRT_VERSION:-}" ]; then echo "$TRT_VERSION"; return; fi
  v=$("$TRTEXEC" --help 2>&1 | sed -n 's/.*\[TensorRT v\([0-9][0-9]*\)\].*/\1/p' | head -n 1)
  if [ -n "$v" ]; then
    if [ "$v" -ge 100000 ]; then echo "$((v / 10000)).$((v / 100 % 100)).$((v % 100))"
    else echo "$((v / 1000)).$((v / 100 % 10)).$((v % 100))"; fi
    return
  fi
  python3 -c 'import tensorrt; print(tensorrt.__version__)' 2>/dev/null || true
}

VERSION=$(trt_version)
case "$VERSION" in
  [0-9]*.[0-9]*) ;;
  *) echo "build_engine.sh: cannot tell the TensorRT version from $TRTEXEC; set TRT_VERSION=10.3.0 (for example)" >&2
     exit 4 ;;
esac
MAJOR=${VERSION%%.*}
MINOR=${VERSION#*.}
MINOR=${MINOR%%.*}
if [ "$MAJOR" -ge 11 ]; then MODE=strong-only
elif [ "$MAJOR" -eq 10 ] && [ "$MINOR" -ge 12 ]; then MODE=strong
elif [ "$MAJOR" -eq 10 ]; then MODE=weak
else
  echo "build_engine.sh: TensorRT $VERSION is not supported (10.0 or newer; JetPack 6 ships 10.3)" >&2
  exit 2
fi
'''


def _build_function(img_size: int, batch_range: tuple[int, int, int], input_name: str) -> str:
    lo, opt, hi = batch_range
    shape = f"3x{img_size}x{img_size}"
    return (
        "build() {  # $1 = the ONNX to build, then this version's precision flags\n"
        '  onnx=$1\n  shift\n'
        '  if [ ! -f "$onnx" ]; then\n'
        '    echo "build_engine.sh: $onnx is not in this export (export with --fp16 / --int8 to get it)" >&2\n'
        "    exit 2\n  fi\n"
        f'  echo "build_engine.sh: TensorRT $VERSION ($MODE typing), $PRECISION engine from $onnx" >&2\n'
        f'  "$TRTEXEC" --onnx="$onnx" --saveEngine={ENGINE_NAME} --minShapes={input_name}:{lo}x{shape} '
        f'--optShapes={input_name}:{opt}x{shape} --maxShapes={input_name}:{hi}x{shape} '
        '--timingCacheFile=timing.cache "$@"\n'
        f"  printf '{{\"tensorrt\": \"%s\", \"typing\": \"%s\", \"precision\": \"%s\", \"onnx\": \"%s\", "
        f"\"built_by\": \"build_engine.sh\"}}\\n' \"$VERSION\" \"$MODE\" \"$PRECISION\" \"$onnx\" "
        f"> {ENGINE_NAME}.json\n"
        "}\n"
    )


def _cases(engine_inputs: dict[str, str]) -> str:
    lines = ['case "$PRECISION:$MODE" in']
    for precision, onnx in engine_inputs.items():
        for mode in (STRONG_ONLY, STRONG, WEAK):
            flags = " ".join(trtexec_flags(mode, precision))
            lines.append(f"  {precision}:{mode}) build {shlex.quote(onnx)}{' ' + flags if flags else ''} ;;")
    choices = " / ".join(engine_inputs)
    lines.append(f'  *) echo "build_engine.sh: PRECISION must be {choices} for this export" >&2; exit 2 ;;')
    lines.append("esac")
    return "\n".join(lines) + "\n"


def build_script(engine_inputs: dict[str, str], precision: str, img_size: int,
                 batch_range: tuple[int, int, int], *, input_name: str = "images") -> str:
    """The text of build_engine.sh. ``engine_inputs`` maps each precision this export can build (fp32 / fp16 /
    int8) to its ONNX file in the folder; ``precision`` is the default (``PRECISION=fp16 ./build_engine.sh``)."""
    check_precision(precision)
    for p in engine_inputs:
        check_precision(p)
    if precision not in engine_inputs:
        raise ValueError(f"no engine input for the default precision {precision!r}")
    lo, opt, hi = batch_range
    header = [
        "#!/bin/sh",
        "# Build the TensorRT engine of this export on the target device (Jetson / NVIDIA GPU), in this folder:",
        f"#   ./build_engine.sh                 # {precision}, the exported precision",
        *[f"#   PRECISION={p} ./build_engine.sh" for p in engine_inputs if p != precision],
        "# The same script runs on TensorRT 10.x (JetPack 6: 10.3) and 11.x: it reads the version from trtexec's",
        "# [TensorRT vXXYYZZ] banner (or the tensorrt Python package, or TRT_VERSION) and runs what it accepts.",
        f"# The commands it runs for {precision}:",
    ]
    for mode in (STRONG_ONLY, STRONG, WEAK):
        cmd = trtexec_command(engine_inputs[precision], ENGINE_NAME, precision, lo, opt, hi, img_size,
                              input_name=input_name, timing_cache="timing.cache", tensorrt=_MODE_EXAMPLES[mode])
        header += [f"#   {_MODE_TITLES[mode]}:", f"#     {cmd}"]
    header += [
        "# Or, with castling-deploy installed on the device (also verifies the engine's accuracy):",
        "#   castling-deploy build-engine . --val VAL_DIR",
        "set -eu",
        'cd "$(dirname "$0")"',
        f'PRECISION="${{PRECISION:-{precision}}}"',
    ]
    detect = _DETECT.replace("__JETPACK_DIR__", JETPACK_TRTEXEC.rsplit("/", 1)[0]).replace("__JETPACK__",
                                                                                          JETPACK_TRTEXEC)
    return "\n".join(header) + "\n" + detect + "\n" + _build_function(img_size, batch_range, input_name) + "\n" + \
        _cases(engine_inputs)
