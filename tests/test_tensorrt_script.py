"""build_engine.sh against fake trtexecs: shell scripts that print the banner of a TensorRT version and accept only
the flags that version knows (11.x: no precision flag at all; 10.3: JetPack 6's). No TensorRT, no engine: the fakes
record their arguments and write a placeholder file where the engine would go."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from castling_deploy.targets.tensorrt.script import build_script
from castling_deploy.targets.tensorrt.versions import TRTEXEC11_REMOVED_FLAGS

from .conftest import invoke

COMMON = ("--onnx", "--saveEngine", "--minShapes", "--optShapes", "--maxShapes", "--timingCacheFile", "--help",
          "--verbose", "--workspace", "--memPoolSize")
ACCEPTS = {  # what each fake trtexec knows
    110400: COMMON,  # TensorRT 11: strongly typed only, every precision flag removed (and --stronglyTyped not needed)
    101300: COMMON + ("--stronglyTyped", "--fp16", "--int8", "--bf16", "--fp8", "--int4", "--best"),
    100300: COMMON + ("--stronglyTyped", "--fp16", "--int8", "--bf16", "--fp8", "--best", "--calib"),
    8601: COMMON + ("--fp16", "--int8", "--best", "--calib", "--explicitBatch"),
}
INPUTS = {"fp32": "model.onnx", "fp16": "model.fp16.onnx", "int8": "model.int8.onnx"}


def fake_trtexec(bindir: Path, banner: int | None, accepts: tuple[str, ...] = ()) -> Path:
    """A trtexec that prints ``&&&& RUNNING TensorRT.trtexec [TensorRT v<banner>]`` (none when banner is None),
    rejects any flag outside ``accepts`` like trtexec does, logs its arguments and writes the --saveEngine file."""
    bindir.mkdir(parents=True, exist_ok=True)
    known = " ".join(accepts)
    head = f'echo "&&&& RUNNING TensorRT.trtexec [TensorRT v{banner}] # trtexec $*"' if banner else "echo trtexec"
    (bindir / "trtexec").write_text(f"""#!/bin/sh
{head}
engine=""
for a in "$@"; do
  flag=${{a%%=*}}
  ok=no
  for k in {known}; do [ "$flag" = "$k" ] && ok=yes; done
  if [ "$ok" = no ]; then echo "[E] Unknown option: $a" >&2; exit 1; fi
  case "$a" in --saveEngine=*) engine=${{a#--saveEngine=}} ;; esac
done
case " $* " in *" --help "*) exit 0 ;; esac
echo "$*" >> "${{FAKE_LOG:?}}"
[ -n "$engine" ] && echo "not an engine: built by a fake trtexec" > "$engine"
exit 0
""")
    (bindir / "trtexec").chmod(0o755)
    return bindir / "trtexec"


def export_folder(tmp: Path, precision: str = "int8", inputs: dict[str, str] | None = None) -> Path:
    folder = tmp / "export"
    folder.mkdir()
    inputs = INPUTS if inputs is None else inputs
    for name in inputs.values():
        (folder / name).write_bytes(b"onnx")
    (folder / "build_engine.sh").write_text(build_script(inputs, precision, 32, (1, 8, 32)))
    (folder / "build_engine.sh").chmod(0o755)
    return folder


def run_script(folder: Path, bindir: Path | None, shell: str = "/bin/sh", **env: str) -> subprocess.CompletedProcess:
    path = ([str(bindir)] if bindir else []) + ["/usr/bin", "/bin"]
    full = {"PATH": ":".join(path), "FAKE_LOG": str(folder / "trtexec.log"), **env}
    return subprocess.run([shell, str(folder / "build_engine.sh")], capture_output=True, text=True, env=full,
                          cwd="/", timeout=60)


def logged(folder: Path) -> list[str]:
    return (folder / "trtexec.log").read_text().split()


def test_trtexec_11_banner_gets_no_precision_flag(tmp_path: Path) -> None:
    folder = export_folder(tmp_path)
    fake_trtexec(tmp_path / "bin", 110400, ACCEPTS[110400])
    r = run_script(folder, tmp_path / "bin")
    assert r.returncode == 0, r.stderr
    args = logged(folder)
    assert "--onnx=model.int8.onnx" in args and "--saveEngine=model.engine" in args
    assert "--minShapes=images:1x3x32x32" in args and "--maxShapes=images:32x3x32x32" in args
    assert not set(a.split("=")[0] for a in args) & set(TRTEXEC11_REMOVED_FLAGS) and "--stronglyTyped" not in args
    assert (folder / "model.engine").is_file()
    meta = json.loads((folder / "model.engine.json").read_text())
    assert meta == {"tensorrt": "11.4.0", "typing": "strong-only", "precision": "int8", "onnx": "model.int8.onnx",
                    "built_by": "build_engine.sh"}


@pytest.mark.parametrize("shell", ["/bin/sh", "/bin/bash"])
def test_trtexec_10_3_banner_gets_a_command_jetpack6_accepts(tmp_path: Path, shell: str) -> None:
    if not Path(shell).exists():
        pytest.skip(f"{shell} is not installed")
    folder = export_folder(tmp_path)
    fake_trtexec(tmp_path / "bin", 100300, ACCEPTS[100300])
    r = run_script(folder, tmp_path / "bin", shell)
    assert r.returncode == 0, r.stderr
    args = logged(folder)
    assert "--onnx=model.int8.onnx" in args and "--fp16" in args and "--int8" in args
    assert "--stronglyTyped" not in args  # 10.3 < 10.12: the weak-typed fallback
    assert json.loads((folder / "model.engine.json").read_text())["typing"] == "weak"


def test_trtexec_10_13_builds_strongly_typed(tmp_path: Path) -> None:
    folder = export_folder(tmp_path)
    fake_trtexec(tmp_path / "bin", 101300, ACCEPTS[101300])
    r = run_script(folder, tmp_path / "bin", PRECISION="fp16")
    assert r.returncode == 0, r.stderr
    args = logged(folder)
    assert "--onnx=model.fp16.onnx" in args and "--stronglyTyped" in args
    assert "--fp16" not in args and "--int8" not in args


@pytest.mark.parametrize("precision,onnx", list(INPUTS.items()))
def test_each_precision_builds_from_its_typed_onnx_on_11(tmp_path: Path, precision: str, onnx: str) -> None:
    folder = export_folder(tmp_path)
    fake_trtexec(tmp_path / "bin", 110400, ACCEPTS[110400])
    r = run_script(folder, tmp_path / "bin", PRECISION=precision)
    assert r.returncode == 0, r.stderr
    assert f"--onnx={onnx}" in logged(folder)


def test_the_old_script_would_fail_on_11(tmp_path: Path) -> None:
    """The fake is strict: the command build_engine.sh used to run (``--fp16 --int8``) is rejected by 11.x."""
    fake = fake_trtexec(tmp_path / "bin", 110400, ACCEPTS[110400])
    r = subprocess.run([str(fake), "--onnx=model.int8.onnx", "--fp16", "--int8"], capture_output=True, text=True,
                       env={"FAKE_LOG": str(tmp_path / "log"), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 1 and "Unknown option: --fp16" in r.stderr


def test_version_from_python_package_when_no_banner(tmp_path: Path) -> None:
    folder = export_folder(tmp_path)
    fake_trtexec(tmp_path / "bin", None, ACCEPTS[100300])
    (tmp_path / "bin" / "python3").write_text("#!/bin/sh\necho 10.3.0.30\n")
    (tmp_path / "bin" / "python3").chmod(0o755)
    r = run_script(folder, tmp_path / "bin")
    assert r.returncode == 0, r.stderr
    assert "--int8" in logged(folder) and "TensorRT 10.3.0.30 (weak typing)" in r.stderr


def test_trt_version_and_trtexec_overrides(tmp_path: Path) -> None:
    folder = export_folder(tmp_path)
    fake = fake_trtexec(tmp_path / "elsewhere", None, ACCEPTS[110400])
    r = run_script(folder, None, TRTEXEC=str(fake), TRT_VERSION="11.4.0")
    assert r.returncode == 0, r.stderr
    assert "--fp16" not in logged(folder)


def test_refusals(tmp_path: Path) -> None:
    folder = export_folder(tmp_path, "fp32", {"fp32": "model.onnx"})
    if not Path("/usr/src/tensorrt/bin/trtexec").exists():
        r = run_script(folder, None)
        assert r.returncode == 4 and "trtexec not found" in r.stderr
    fake_trtexec(tmp_path / "bin", 8601, ACCEPTS[8601])
    r = run_script(folder, tmp_path / "bin")
    assert r.returncode == 2 and "TensorRT 8.6.1 is not supported" in r.stderr
    fake_trtexec(tmp_path / "bin11", 110400, ACCEPTS[110400])
    r = run_script(folder, tmp_path / "bin11", PRECISION="int8")
    assert r.returncode == 2 and "PRECISION must be fp32" in r.stderr
    (folder / "model.onnx").unlink()
    r = run_script(folder, tmp_path / "bin11")
    assert r.returncode == 2 and "model.onnx is not in this export" in r.stderr
    assert not (folder / "model.engine").exists()


@pytest.fixture(scope="module")
def typed_export(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The demo through the CLI with --fp16 --int8 for the TensorRT target (48 val images)."""
    from click.testing import CliRunner

    out = tmp_path_factory.mktemp("trt-typed")
    r = invoke(CliRunner(), "export", "--target", "tensorrt", "--int8", "--fp16", "--limit", 48, "-o", out, "--json")
    assert r.exit_code == 0, r.stderr
    return out / "castling_nano_digits" / "tensorrt", json.loads(r.stdout)["reports"][0]


def test_shipped_script_builds_on_11_and_on_10_3(typed_export, tmp_path: Path) -> None:
    folder, report = typed_export
    assert report["target_info"]["engine_inputs"] == INPUTS and report["target_info"]["precision"] == "int8"
    for banner, want in ((110400, []), (100300, ["--fp16", "--int8"])):
        work = tmp_path / str(banner)
        shutil.copytree(folder, work)
        fake_trtexec(tmp_path / f"bin{banner}", banner, ACCEPTS[banner])
        r = run_script(work, tmp_path / f"bin{banner}")
        assert r.returncode == 0, r.stderr
        args = logged(work)
        assert "--onnx=model.int8.onnx" in args and [a for a in args if a in ("--fp16", "--int8")] == want
        assert os.access(folder / "build_engine.sh", os.X_OK)
