"""Through a real OpenSSH server on 127.0.0.1: profiling and logits of real artifacts, the content-addressed
cache, connection reuse, the fleet, and every failure the issue names (unreachable, auth, missing runtime,
missing python, full disk, timeouts). The loopback device IS this machine, so its fingerprint and its
numbers are checked against local runs."""
from __future__ import annotations

import math
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from castling_deploy.devices import (
    DeviceError,
    DeviceNoSpace,
    DeviceRuntimeMissing,
    DeviceTimeout,
    DeviceUsageError,
    fleet_exit_code,
    logits_on_device,
    parse_device,
    profile_fleet,
    profile_on_device,
)
from castling_deploy.devices.base import sha256_of
from castling_deploy.devices.fingerprint import collect_fingerprint
from castling_deploy.errors import UsageError

from .conftest import listing
from .sshd import free_port

RUNS, WARMUP = 30, 5


def _positive_finite(v: float) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v) and v > 0


def check_like_local(remote: dict, local: dict) -> None:
    """The device result has the local result's keys (and sub-keys) and sane, comparable numbers."""
    assert set(local) <= set(remote), set(local) - set(remote)
    assert set(remote["latency_ms"]) == set(local["latency_ms"])
    assert set(remote["memory"]) == set(local["memory"])
    lat = remote["latency_ms"]
    for k in ("mean", "p50", "p90", "p99", "min", "max", "throughput_ips"):
        assert _positive_finite(lat[k]), (k, lat[k])
    assert lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    assert _positive_finite(remote["load_ms"]) and _positive_finite(remote["memory"]["peak_rss_mb"])
    assert remote["runs"] == local["runs"] and remote["warmup"] == local["warmup"]
    assert len(remote["samples_ms"]) == remote["runs"]
    assert remote["input_shape"] == local["input_shape"] and remote["output_shape"] == local["output_shape"]
    assert remote["runtime"] == local["runtime"]  # same runtime, same version, same executor string
    # Same machine, same runtime: the medians agree within a generous factor (a shared 2-core CI box is noisy).
    assert 0.1 < lat["p50"] / local["latency_ms"]["p50"] < 10
    assert 0.1 < lat["throughput_ips"] / local["latency_ms"]["throughput_ips"] < 10


def test_profile_onnx_over_ssh_matches_local(make_device, onnx_artifact: Path, device_dirs) -> None:
    from castling_deploy.profiling.latency import profile_artifact

    dev = make_device()
    remote = profile_on_device(dev, onnx_artifact, runs=RUNS, warmup=WARMUP, threads=1, batch=1)
    local = profile_artifact(onnx_artifact, runs=RUNS, warmup=WARMUP, threads=1, per_op=False, progress=False)
    check_like_local(remote, local)
    assert remote["device"] == "ssh://loopback"
    assert remote["artifact"]["sha256"] == sha256_of(onnx_artifact)
    assert remote["artifact"]["remote_path"].startswith(str(device_dirs["cache"]))
    assert remote["runtime_info"]["name"] == "onnxruntime"
    assert listing(device_dirs["tmp"]) == []  # the runner's temp folder is gone


def test_profile_batch_and_shape_override(make_device, onnx_artifact: Path) -> None:
    dev = make_device()
    res = profile_on_device(dev, onnx_artifact, runs=5, warmup=1, threads=1, batch=3)
    assert res["input_shape"] == [3, 3, 32, 32] and res["output_shape"] == [3, 10]
    res = profile_on_device(dev, onnx_artifact, runs=5, warmup=1, threads=1, batch=2, shape=(1, 3, 32, 32))
    assert res["input_shape"] == [2, 3, 32, 32]


def test_profile_tflite_over_ssh(make_device, tflite_artifact: Path) -> None:
    from castling_deploy.profiling.latency import profile_artifact

    dev = make_device()
    remote = profile_on_device(dev, tflite_artifact, runs=RUNS, warmup=WARMUP, threads=1)
    local = profile_artifact(tflite_artifact, runs=RUNS, warmup=WARMUP, threads=1, per_op=False, progress=False,
                             input_shape=(1, 3, 32, 32))  # local profiling reads the shape from report.json
    check_like_local(remote, local)
    assert remote["runtime_info"]["name"] == "ai-edge-litert"


def test_fingerprint_is_this_machine(make_device) -> None:
    fp = make_device().fingerprint()
    here = collect_fingerprint()
    for key in ("hostname", "os", "os_release", "kernel", "arch", "cpu_model", "cpu_cores", "cpu_flags", "python",
                "python_executable", "runtimes", "cpu_governor", "cpu_clocks_pinned", "jetson"):
        assert fp[key] == here[key], key
    assert abs(fp["memory_mb"] - here["memory_mb"]) < 1.0
    assert fp["runtimes"]["onnxruntime"] and fp["runtimes"]["numpy"]
    assert fp["jetson"] is None  # no /etc/nv_tegra_release here


def test_push_is_content_addressed_and_reused(make_device, onnx_artifact: Path, tmp_path: Path,
                                              device_dirs) -> None:
    dev = make_device()
    first = dev.push(onnx_artifact)
    digest = sha256_of(onnx_artifact)
    assert first == f"{device_dirs['cache']}/{digest}/nano.onnx"
    assert Path(first).read_bytes() == onnx_artifact.read_bytes()
    mtime = os.stat(first).st_mtime_ns
    assert dev.stats["pushed"] == 1 and dev.stats["reused"] == 0
    time.sleep(0.02)
    assert dev.push(onnx_artifact) == first  # same content: not copied again
    assert os.stat(first).st_mtime_ns == mtime
    assert dev.stats == {**dev.stats, "pushed": 1, "reused": 1, "bytes_pushed": onnx_artifact.stat().st_size}
    # A corrupted cached copy no longer matches its hash, so it is replaced.
    with open(first, "r+b") as fh:
        fh.write(b"XX")
    dev.push(onnx_artifact)
    assert dev.stats["pushed"] == 2 and Path(first).read_bytes() == onnx_artifact.read_bytes()
    # Other content (same name) gets its own folder.
    other = tmp_path / "nano.onnx"
    other.write_bytes(onnx_artifact.read_bytes() + b"\0")
    assert dev.push(other) != first
    assert not [p for p in Path(first).parent.iterdir() if "partial" in p.name]


def test_push_folder_artifact(make_device, tmp_path: Path) -> None:
    pkg = tmp_path / "model.mlpackage"
    (pkg / "Data" / "weights").mkdir(parents=True)
    (pkg / "Manifest.json").write_text('{"a": 1}')
    (pkg / "Data" / "weights" / "weight.bin").write_bytes(os.urandom(5000))
    dev = make_device()
    dest = dev.push(pkg)
    assert Path(dest, "Data", "weights", "weight.bin").read_bytes() == (pkg / "Data/weights/weight.bin").read_bytes()
    assert dev.push(pkg) == dest and dev.stats["reused"] == 1


def test_logits_match_local_onnxruntime(make_device, onnx_artifact: Path, device_dirs) -> None:
    import onnxruntime as ort

    x = np.random.default_rng(3).standard_normal((5, 3, 32, 32)).astype(np.float32)
    before = listing(device_dirs["tmp"])
    y = logits_on_device(make_device(), onnx_artifact, x)
    sess = ort.InferenceSession(str(onnx_artifact), providers=["CPUExecutionProvider"])
    ref = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    assert y.dtype == np.float32 and y.shape == ref.shape == (5, 10)
    np.testing.assert_allclose(y, ref, atol=1e-5, rtol=0)
    assert listing(device_dirs["tmp"]) == before == []  # inputs, logits and the runner's folder all removed


def test_connection_is_reused_not_renegotiated(make_device, sshd) -> None:
    dev = make_device()
    dev.sh("true")
    handshakes = sshd.accepted()
    for _ in range(10):
        assert dev.sh("echo ok").stdout == b"ok\n"
    assert sshd.accepted() == handshakes  # 10 calls, no new authentication: all over the control master
    control = dev._control_dir
    assert control and any(os.scandir(control))
    dev.close()
    assert not os.path.exists(control)  # the private socket folder is removed
    assert dev.sh("echo again").stdout == b"again\n"  # and a closed device reconnects on demand


def test_fleet_one_device_missing_runtime(make_device, onnx_artifact: Path, no_ort_python: str) -> None:
    good = make_device("ssh://loopback")
    bad = make_device("ssh://loopback2", python=no_ort_python)
    results = profile_fleet([good, bad], onnx_artifact, runs=10, warmup=2, threads=1)
    assert [r.uri for r in results] == ["ssh://loopback", "ssh://loopback2"]
    ok, failed = results
    assert ok.ok and ok.exit_code == 0 and ok.result["latency_ms"]["p50"] > 0
    assert not failed.ok and failed.result is None and failed.exit_code == 4
    assert failed.error_type == "DeviceRuntimeMissing"
    assert "ssh://loopback2" in failed.error and "onnxruntime" in failed.error
    assert f"{no_ort_python} -m pip install onnxruntime" in failed.error
    assert fleet_exit_code(results) == 4
    with pytest.raises(DeviceRuntimeMissing) as exc:
        profile_on_device(bad, onnx_artifact, runs=2, warmup=0)
    assert exc.value.exit_code == 4 and exc.value.module == "onnxruntime"


def test_unreachable_port_is_usage_error_fast(sshd, tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    dev = parse_device(f"ssh://127.0.0.1:{port}", ssh_config=sshd.config, connect_timeout=3, cache_dir=str(tmp_path))
    t0 = time.monotonic()
    with pytest.raises(UsageError) as exc:
        profile_on_device(dev, _dummy_onnx(tmp_path), runs=1, warmup=0)
    assert time.monotonic() - t0 < 15
    assert exc.value.exit_code == 2 and f"ssh://127.0.0.1:{port}" in str(exc.value)
    assert "connection refused" in str(exc.value) and "sshd" in str(exc.value)
    dev.close()


def _dummy_onnx(tmp_path: Path) -> Path:
    p = tmp_path / "dummy.onnx"
    p.write_bytes(b"not really onnx")
    return p


def test_blackholed_host_times_out_fast(sshd, tmp_path: Path) -> None:
    dev = parse_device("ssh://10.255.255.1", ssh_config=sshd.config, connect_timeout=2)
    t0 = time.monotonic()
    with pytest.raises(UsageError) as exc:
        dev.fingerprint()
    assert time.monotonic() - t0 < 15
    assert exc.value.exit_code == 2 and "cannot connect" in str(exc.value)


def test_auth_failure_never_prompts(make_device) -> None:
    dev = make_device("ssh://loopback-badkey")
    t0 = time.monotonic()
    with pytest.raises(DeviceUsageError) as exc:
        dev.fingerprint()
    assert time.monotonic() - t0 < 15
    assert exc.value.exit_code == 2 and "authentication failed" in str(exc.value)
    assert "ssh-copy-id" in str(exc.value)


def test_missing_device_python(make_device, onnx_artifact: Path) -> None:
    dev = make_device(python="/nonexistent/python3")
    with pytest.raises(DeviceUsageError) as exc:
        profile_on_device(dev, onnx_artifact, runs=1, warmup=0)
    assert exc.value.exit_code == 2 and "--device-python" in str(exc.value)


def test_ssh_config_from_environment(sshd, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CASTLING_DEPLOY_SSH_CONFIG", str(sshd.config))
    with parse_device("ssh://loopback") as dev:
        assert dev.sh("echo via-env").stdout == b"via-env\n"
    monkeypatch.setenv("CASTLING_DEPLOY_SSH_CONFIG", "/nonexistent/config")
    with pytest.raises(DeviceUsageError, match="does not exist"):
        parse_device("ssh://loopback")


def test_remote_call_timeout_and_output_bound(make_device) -> None:
    dev = make_device()
    t0 = time.monotonic()
    with pytest.raises(DeviceTimeout) as exc:
        dev.sh("sleep 4", timeout=0.5)
    assert time.monotonic() - t0 < 3 and "ssh://loopback" in str(exc.value)
    with pytest.raises(DeviceError, match="refusing"):
        dev.sh("head -c 3000000 /dev/zero", limit=1_000_000)


def test_shell_metacharacters_are_quoted(make_device, tmp_path: Path) -> None:
    """Untrusted names (artifact file names, paths) reach the device only through shlex.quote."""
    evil = tmp_path / "a b;touch PWNED;'$(touch PWNED2)'.onnx"
    evil.write_bytes(b"x" * 100)
    dev = make_device()
    dest = dev.push(evil)
    assert Path(dest).name == evil.name and Path(dest).read_bytes() == evil.read_bytes()
    home = Path(dev.home())
    assert not (home / "PWNED").exists() and not (home / "PWNED2").exists()


@pytest.fixture
def tiny_tmpfs(tmp_path: Path):
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("simulating a full disk needs root to mount a 64 KiB tmpfs")
    mnt = tmp_path / "full"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True, check=False)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({res.stderr.decode().strip()})")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=False)


def test_full_disk_is_reported(make_device, onnx_artifact: Path, tiny_tmpfs: Path) -> None:
    dev = make_device(cache_dir=str(tiny_tmpfs))
    with pytest.raises(DeviceNoSpace) as exc:
        dev.push(onnx_artifact)  # 0.8 MB into 64 KiB
    msg = str(exc.value)
    assert exc.value.exit_code == 2 and "ssh://loopback" in msg and str(tiny_tmpfs) in msg
    assert "no space left" in msg
    digest_dir = tiny_tmpfs / sha256_of(onnx_artifact)
    assert not digest_dir.exists() or listing(digest_dir) == []  # the partial file was removed


def test_runner_stops_itself_at_the_deadline(make_device, onnx_artifact: Path, device_dirs) -> None:
    dev = make_device()
    dev.push(onnx_artifact)
    t0 = time.monotonic()
    with pytest.raises(DeviceTimeout, match="deadline"):
        profile_on_device(dev, onnx_artifact, runs=10**6, warmup=0, threads=1, timeout=2)
    assert time.monotonic() - t0 < 15
    assert listing(device_dirs["tmp"]) == []  # stopped, and its temp folder still removed


def test_master_restarts_when_it_dies(make_device, sshd) -> None:
    dev = make_device()
    dev.sh("true")
    control = dev._control_dir
    subprocess.run(["ssh", *dev._opts(), "-O", "exit", "--", "loopback"], capture_output=True, check=False)
    assert not any(os.scandir(control))  # master gone, as after ControlPersist expiry
    before = sshd.accepted()
    assert dev.sh("echo back").stdout == b"back\n" and sshd.accepted() == before + 1
    dev.sh("true")
    assert sshd.accepted() == before + 1  # multiplexed again, not one handshake per call
