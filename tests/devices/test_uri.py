"""Device URIs: the accepted forms, and refusal of anything that could become an ssh/adb option or a
second shell word."""
from __future__ import annotations

import pytest

from castling_deploy.devices import DeviceUsageError, parse_device, parse_uri


@pytest.mark.parametrize("uri, kind, host, user, port, serial", [
    ("local", "local", None, None, None, None),
    ("ssh://jetson", "ssh", "jetson", None, None, None),
    ("ssh://ubuntu@jetson-orin.lan:2222", "ssh", "jetson-orin.lan", "ubuntu", 2222, None),
    ("ssh://MyJetson", "ssh", "MyJetson", None, None, None),  # aliases are case-sensitive: kept as written
    ("ssh://root@[::1]:22", "ssh", "::1", "root", 22, None),
    ("ssh://10.0.0.7/", "ssh", "10.0.0.7", None, None, None),
    ("adb:", "adb", None, None, None, None),
    ("adb:R58M123ABC", "adb", None, None, None, "R58M123ABC"),
    ("adb:192.168.1.20:5555", "adb", None, None, None, "192.168.1.20:5555"),
])
def test_valid(uri, kind, host, user, port, serial) -> None:
    spec = parse_uri(uri)
    assert (spec.kind, spec.host, spec.user, spec.port, spec.serial) == (kind, host, user, port, serial)


@pytest.mark.parametrize("uri", [
    "", "jetson", "http://jetson", "ssh://", "ssh://-oProxyCommand=touch%20x", "ssh://host;reboot",
    "ssh://host name", "ssh://user:secret@host", "ssh://host/path", "ssh://host:99999", "ssh://-l@host",
    "adb:-s", "adb:bad serial", "adb:a;b",
])
def test_invalid(uri) -> None:
    with pytest.raises(DeviceUsageError) as exc:
        parse_uri(uri)
    assert exc.value.exit_code == 2


def test_parse_device_kinds(tmp_path) -> None:
    cfg = tmp_path / "cfg"
    cfg.write_text("Host x\n  HostName 127.0.0.1\n")
    dev = parse_device("ssh://x", ssh_config=cfg, python="/opt/venv/bin/python")
    assert dev.kind == "ssh" and dev.python == "/opt/venv/bin/python" and dev.ssh_config == cfg
    assert dev._control_dir is None  # nothing connects before first use
    with pytest.raises(DeviceUsageError, match="does not exist"):
        parse_device("ssh://x", ssh_config=tmp_path / "nope")
    adb = parse_device("adb:SER1", benchmark_model=tmp_path / "benchmark_model")
    assert adb.kind == "adb" and adb._argv("echo hi") == ["adb", "-s", "SER1", "shell", "echo hi"]
    assert parse_device("adb:")._argv("id") == ["adb", "shell", "id"]
