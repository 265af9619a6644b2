"""Nothing is left behind: run temp folders carry the pid (``castling-<what>-<pid>-XXXXXXXX``) and are registered for
interrupt cleanup; what a run killed with SIGKILL leaves (temp folders, ``.partial-<pid>-*`` staging) is removed by
the next run, and only that: a live run's folders, other names, symlinks and other users' folders are never touched.
A failed export leaves no empty OUT/<model> folder."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from castling_deploy import output
from castling_deploy.errors import UsageError

from .conftest import invoke, temp_names

MODEL = "castling_nano_digits"


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _ours(folder: Path) -> list[str]:
    return temp_names(folder, ("castling-", ".partial-"))


def _start_export(temp: Path, out: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "castling_deploy.cli", "export", "--limit", "16", *args, "-o",
                             str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=dict(os.environ, TMPDIR=str(temp)))


def _wait_for(proc: subprocess.Popen, folder: Path, prefix: str, timeout: float = 120) -> list[str]:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if any(n.startswith(prefix) for n in _ours(folder)):
            return _ours(folder)
        time.sleep(0.02)
    proc.kill()
    _, err = proc.communicate()
    pytest.fail(f"{prefix}* never appeared in {folder} (exit {proc.returncode}): {err.decode()[-800:]}")


@pytest.fixture
def temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private temp dir for this process (tempfile.gettempdir()) and its subprocesses (TMPDIR)."""
    d = tmp_path / "temp"
    d.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(d))
    monkeypatch.setenv("TMPDIR", str(d))
    return d


# ---- (a) SIGKILL: the next run cleans up ------------------------------------------------------------------------
def test_what_a_sigkilled_export_left_is_removed_by_the_next_run(temp: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = _start_export(temp, out, "--int8", "--sensitivity")
    during = _wait_for(proc, temp, "castling-sens-")  # float ONNX kept, sweep running, staging open
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    pid = proc.pid
    model_dir = out / MODEL
    left_temp, left_staging = _ours(temp), _ours(model_dir)
    assert any(n.startswith(f"castling-float-onnx-{pid}-") for n in left_temp), (during, left_temp)
    assert any(n.startswith(f"castling-sens-{pid}-") for n in left_temp), left_temp
    assert any(n.startswith(f".partial-{pid}-onnx-") for n in left_staging), left_staging
    (model_dir / f".partial-{pid}-old-onnx").mkdir()  # as if killed while swapping a previous result aside
    (model_dir / f".partial-{pid}-old-onnx" / "model.onnx").write_bytes(b"previous")

    again = _start_export(temp, out)
    _, err = again.communicate(timeout=120)
    assert again.returncode == 0, err.decode()[-800:]
    assert _ours(temp) == []  # the dead run's temp folders, and this run's own
    assert sorted(p.name for p in model_dir.iterdir()) == ["onnx"]  # no .partial-<dead pid>-* left beside it
    assert sorted(p.name for p in (model_dir / "onnx").iterdir()) == ["model.onnx", "reference.npz", "report.json"]


def test_verify_and_profile_sweep_the_temp_folder_too(runner, temp: Path, tmp_path: Path) -> None:
    for command in (["verify", tmp_path / "missing.zip"], ["profile", tmp_path / "missing.onnx"]):
        stale = temp / f"castling-verify-{_dead_pid()}-abcd_123"
        stale.mkdir()
        (stale / "model.onnx").write_bytes(b"x" * 1024)
        r = invoke(runner, *command)
        assert r.exit_code == 2, r.stderr
        assert not stale.exists(), command


# ---- (b) only what is ours and dead ---------------------------------------------------------------------------
def test_the_sweep_touches_only_dead_runs_real_folders_of_our_naming(temp: Path, tmp_path: Path) -> None:
    dead, live = _dead_pid(), os.getppid()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("not ours")
    gone = [f"castling-sens-{dead}-abcdefgh", f"castling-coreml-fp32-{dead}-0a_b1c2d",
            f"castling-float-onnx-{os.getpid()}-zzzzzzzz"]  # our pid, not made by us: a dead run's with our pid
    kept = [f"castling-sens-{live}-abcdefgh",  # a live run's
            "castling-sens-abcdefgh", f"castling-sens-{dead}-abc", f"castling-sens-{dead}-abcdefgh-x",
            f"castling-{dead}-abcdefgh", f"castling-Sens-{dead}-abcdefgh", f"other-sens-{dead}-abcdefgh",
            f"castling-mutants-{dead}"]  # not our exact naming
    for n in gone + kept:
        (temp / n).mkdir()
        (temp / n / "f").write_text("x")
    link = temp / f"castling-verify-{dead}-linklink"
    link.symlink_to(elsewhere, target_is_directory=True)
    a_file = temp / f"castling-verify-{dead}-filefile"
    a_file.write_text("a file, not a folder")
    mine = output.new_run_temp_dir("sens")  # this run's own: registered, alive
    try:
        removed = output.remove_stale_temp_dirs()
        assert sorted(p.name for p in removed) == sorted(gone)
        assert sorted(p.name for p in temp.iterdir()) == sorted(kept + [link.name, a_file.name, mine.name])
        assert link.is_symlink() and (elsewhere / "keep.txt").read_text() == "not ours"
        assert all((temp / n / "f").exists() for n in kept)
    finally:
        output.remove_temp_dir(mine)
    assert not mine.exists() and mine not in output._CLEANUP


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root to make another user's folder")
def test_the_sweep_leaves_other_users_folders(temp: Path) -> None:
    theirs = temp / f"castling-sens-{_dead_pid()}-abcdefgh"
    theirs.mkdir()
    os.chown(theirs, 65534, 65534)
    assert output.remove_stale_temp_dirs() == []
    assert theirs.is_dir()


def test_orphaned_staging_and_replaced_results_of_dead_runs_are_removed(tmp_path: Path) -> None:
    dead, live = _dead_pid(), os.getppid()
    parent = tmp_path / "out" / MODEL
    (parent / "onnx").mkdir(parents=True)
    (parent / "onnx" / "model.onnx").write_bytes(b"previous good export")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    gone = [f".partial-{dead}-onnx-abcdefgh", f".partial-{dead}-old-onnx", f".partial-{os.getpid()}-old-onnx"]
    kept = [f".partial-{live}-onnx-abcdefgh", f".partial-{live}-old-tflite", ".partial-x-onnx", "notes"]
    for n in gone + kept:
        (parent / n).mkdir()
        (parent / n / "model.onnx").write_bytes(b"x")
    (parent / f".partial-{dead}-old-tflite").symlink_to(elsewhere, target_is_directory=True)
    # our own pid's ".partial-<pid>-old-onnx" (a dead run that had our pid) no longer blocks moving onnx/ aside
    with output.staged_dir(parent / "onnx") as work:
        (work / "model.onnx").write_bytes(b"new")
    assert (parent / "onnx" / "model.onnx").read_bytes() == b"new"
    assert sorted(p.name for p in parent.iterdir()) == sorted(kept + ["onnx", f".partial-{dead}-old-tflite"])
    assert elsewhere.is_dir()


def test_a_failed_swap_puts_the_previous_result_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    final = tmp_path / MODEL / "onnx"
    final.mkdir(parents=True)
    (final / "model.onnx").write_bytes(b"previous")
    real, calls = os.replace, []

    def replace(src, dst):
        calls.append((Path(src).name, Path(dst).name))
        if len(calls) == 2:  # previous moved aside; the new one cannot be renamed in
            raise OSError("disk gone")
        real(src, dst)

    monkeypatch.setattr(output.os, "replace", replace)
    with pytest.raises(OSError, match="disk gone"), output.staged_dir(final) as work:
        (work / "model.onnx").write_bytes(b"new")
    assert calls[0] == ("onnx", f".partial-{os.getpid()}-old-onnx")
    assert (final / "model.onnx").read_bytes() == b"previous"
    assert sorted(p.name for p in final.parent.iterdir()) == ["onnx"]
    assert not output._CLEANUP


def test_run_temp_dir_is_named_registered_and_removed(temp: Path) -> None:
    with output.run_temp_dir("coreml-fp32") as tmp:
        assert tmp.parent == temp and tmp.name.startswith(f"castling-coreml-fp32-{os.getpid()}-")
        assert tmp in output._CLEANUP
        (tmp / "x").write_text("x")
    assert not tmp.exists() and tmp not in output._CLEANUP
    with pytest.raises(RuntimeError), output.run_temp_dir("sens") as tmp:
        raise RuntimeError
    assert not tmp.exists() and tmp not in output._CLEANUP
    with pytest.raises(ValueError):
        output.new_run_temp_dir("../x")


def test_a_command_keeps_library_temp_files_in_its_own_root(runner, temp: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A converter's own tempfile.mkdtemp() / $TMPDIR files (coremltools, ORT's quantizer) land in the command's
    castling-run-<pid>-* folder and go with it, also when the command fails; $TMPDIR is restored afterwards."""
    import castling_deploy.api as api

    made: list[Path] = []

    def library_like(*a: object, **kw: object) -> None:
        made.append(Path(tempfile.mkdtemp()))  # what a library does, with no name of ours
        (made[-1] / "weights.bin").write_bytes(b"x" * 1000)
        made.append(Path(os.environ["TMPDIR"]))
        raise UsageError("stop here")

    monkeypatch.setattr(api, "export", library_like)
    r = invoke(runner, "export", "-o", tmp_path / "out")
    assert r.exit_code == 2 and "stop here" in r.stderr
    lib_dir, env_dir = made
    assert lib_dir.parent == env_dir and env_dir.parent == temp and env_dir.name.startswith(f"castling-run-{os.getpid()}-")
    assert not env_dir.exists() and os.listdir(temp) == [] and os.environ["TMPDIR"] == str(temp)
    assert tempfile.gettempdir() == str(temp)


# ---- (c) a failed export leaves no empty OUT/<model> ------------------------------------------------------------
@pytest.mark.parametrize("error, code", [(RuntimeError("converter crashed"), 1), (UsageError("bad input"), 2)])
def test_a_failed_export_leaves_no_empty_model_folder(runner, temp: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch, error: Exception,
                                                      code: int) -> None:
    import castling_deploy.targets.onnx.target as onnx_target

    def crash(model, path, *a, **kw):
        Path(path).write_bytes(b"half")
        raise error

    monkeypatch.setattr(onnx_target, "export_onnx", crash)
    monkeypatch.delenv("CASTLING_DEBUG", raising=False)
    out = tmp_path / "out"
    r = invoke(runner, "export", "--limit", 16, "-o", out)
    assert r.exit_code == code, r.stderr
    assert sorted(p.name for p in out.iterdir()) == []  # no empty castling_nano_digits/
    assert _ours(temp) == []


def test_bad_calib_exits_2_before_any_output(runner, temp: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = invoke(runner, "export", "--int8", "--calib", tmp_path / "no-such-calib", "--limit", 16, "-o", out)
    assert r.exit_code == 2, r.stderr
    assert not (out / MODEL).exists()
    assert _ours(temp) == []


def test_a_failure_keeps_a_model_folder_it_did_not_create(runner, temp: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import castling_deploy.targets.onnx.target as onnx_target

    def crash(*a, **kw):
        raise RuntimeError("converter crashed")

    monkeypatch.setattr(onnx_target, "export_onnx", crash)
    monkeypatch.delenv("CASTLING_DEBUG", raising=False)
    (tmp_path / "out" / MODEL).mkdir(parents=True)  # the user's (empty) folder
    r = invoke(runner, "export", "--limit", 16, "-o", tmp_path / "out")
    assert r.exit_code == 1, r.stderr
    assert (tmp_path / "out" / MODEL).is_dir() and not any((tmp_path / "out" / MODEL).iterdir())


# ---- (d) SIGINT during the sensitivity sweep --------------------------------------------------------------------
def test_sigint_during_the_sensitivity_sweep_leaves_no_temp_folder(temp: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = _start_export(temp, out, "--int8", "--sensitivity")
    during = _wait_for(proc, temp, "castling-sens-")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err.decode()[-800:]
    assert "nothing half-written was left behind" in err.decode()
    assert _ours(temp) == [], during
    assert not (out / MODEL).exists() or list((out / MODEL).iterdir()) == []  # no staging folder, no artifact


def test_the_sensitivity_and_fallback_folders_are_registered_for_interrupt_cleanup(
        temp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import numpy as np

    from castling_deploy.quantize import sensitivity
    from castling_deploy.quantize.recipe import QuantRecipe

    seen: list[tuple[str, bool]] = []

    def evaluate(fp32, calib, recipe, x, ref, labels, tmp, *a):
        seen.append((tmp.name, tmp in output._CLEANUP))
        return {"sqnr_db": 40.0, "top1_agreement": 1.0, "cosine_min": 1.0}

    monkeypatch.setattr(sensitivity, "_depth", lambda path: 2)
    monkeypatch.setattr(sensitivity, "_evaluate", evaluate)
    monkeypatch.setattr(sensitivity, "meets_goal", lambda m, tol: False)
    x = np.zeros((1, 3, 4, 4), np.float32)
    sensitivity.sensitivity_sweep("m.onnx", None, QuantRecipe(), x, np.zeros((1, 10), np.float32))
    sensitivity.auto_fallback("m.onnx", None, QuantRecipe(), x, np.zeros((1, 10), np.float32), rows=[])
    assert {n.rsplit("-", 2)[0] for n, _ in seen} == {"castling-sens", "castling-fallback"}
    assert all(n.split("-")[-2] == str(os.getpid()) and registered for n, registered in seen), seen
    assert _ours(temp) == [] and not output._CLEANUP
