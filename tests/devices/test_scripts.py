"""The scripts sent to devices are self-contained: they run with our package made unimportable, and parse
as Python 3.6 (JetPack 4's python) — no walrus, no positional-only parameters, no ``from __future__``."""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from castling_deploy.devices.scripts import fingerprint_script, runner_script

from ..tensorrt_api import stub_path


@pytest.mark.parametrize("make", [fingerprint_script, runner_script])
def test_parses_as_python36(make) -> None:
    tree = ast.parse(make(), feature_version=(3, 6))
    assert not [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module == "__future__"]


def test_runs_without_our_package(tmp_path: Path, onnx_artifact: Path) -> None:
    block = tmp_path / "block" / "castling_deploy"
    block.mkdir(parents=True)
    (block / "__init__.py").write_text("raise ImportError('the device has no castling_deploy')\n")
    env = {"PYTHONPATH": str(block.parent), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-"], input=fingerprint_script().encode(), capture_output=True, env=env, check=False)
    assert out.returncode == 0 and b'"runtimes"' in out.stdout, out.stderr[-500:]
    out = subprocess.run([sys.executable, "-", "profile", str(onnx_artifact), "--runs", "3", "--warmup", "1"],
                         input=runner_script().encode(), capture_output=True, env=env, cwd=tmp_path, check=False)
    assert out.returncode == 0 and b'"ok": true' in out.stdout, out.stderr[-500:]


@pytest.mark.skipif(stub_path() is None, reason="TensorRT API stubs absent: pip install --no-deps tensorrt-stubs "
                                                "(or CASTLING_DEPLOY_TRT_STUBS=.../tensorrt_bindings/tensorrt.pyi)")
def test_tensorrt_part_uses_the_tensorrt10_api() -> None:
    """No TensorRT here; check every TensorRT name the on-device runner calls exists in its 10.x stubs."""
    stub = stub_path().read_text()
    import castling_deploy.devices.remote_extra as extra

    src = Path(extra.__file__).read_text()
    used = set(re.findall(r"(?:trt|self\.engine|self\.context|context|self\._rt)\.([A-Za-z_]\w*)", src))
    used -= {"__version__", "nptype"}  # module level (tensorrt/__init__.pyi), probed with hasattr
    missing = [n for n in sorted(used) if not re.search(rf"(def {n}\b|class {n}\b|^\s*{n}\s*:|^\s*{n}\s*=)", stub, re.MULTILINE)]
    assert not missing and {"execute_async_v3", "set_tensor_address", "get_tensor_profile_shape"} <= used, missing
