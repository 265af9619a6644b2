"""Our TensorRT code against the real TensorRT API, without TensorRT: NVIDIA's 10.13 type stubs (tensorrt-stubs) and
the 11.x removals from the migration guide. No engine is built anywhere in this file.

1. An AST scan of our TensorRT modules: every ``trt.X`` / ``trt.X.Y`` chain names something the stubs declare.
2. build_engine and TensorRTRunner run against a fake ``tensorrt`` built from the stubs (tests/tensorrt_api.py) at
   11.4.0 with the removed attributes deleted (touching one raises), at 10.13.0 and at 10.3.0; the call log proves
   which calls each version gets, and that nothing deprecated in 10.12 is touched where strong typing is used.
"""
from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

import castling_deploy.runtime.tensorrt as runtime_trt
import castling_deploy.targets.tensorrt as trt_pkg
from castling_deploy.errors import MissingDependencyError, UsageError
from castling_deploy.targets.tensorrt import engine as engine_mod
from castling_deploy.targets.tensorrt.engine import build_engine
from castling_deploy.targets.tensorrt.versions import (STRONG, STRONG_ONLY, TRT11_REMOVED, WEAK, banner_version,
                                                       builder_flags, parse_version, trtexec_flags, typing_mode)

from .tensorrt_api import FakeTensorRT, RemovedAttributeError, extract_surface, load_surface, stub_path

MODULES = [*sorted(Path(trt_pkg.__file__).parent.glob("*.py")), Path(runtime_trt.__file__)]
SURFACE = load_surface()
VERSIONS = {"11.4.0": STRONG_ONLY, "10.13.0.35": STRONG, "10.3.0.30": WEAK}


# ---- the version matrix -------------------------------------------------------------------------------------------
def test_version_matrix() -> None:
    assert banner_version("&&&& RUNNING TensorRT.trtexec [TensorRT v110400] # trtexec --help") == (11, 4, 0)
    assert banner_version("[TensorRT v100300]") == (10, 3, 0) and banner_version("[TensorRT v8601]") == (8, 6, 1)
    assert banner_version("no banner") is None and parse_version("10.3.0.30") == (10, 3, 0)
    assert [typing_mode(v) for v in ("11.4.0", "11.0", "10.13.0.35", "10.12.0", "10.11.0", "10.3.0.30", "10.0.1")] \
        == [STRONG_ONLY, STRONG_ONLY, STRONG, STRONG, WEAK, WEAK, WEAK]
    with pytest.raises(UsageError, match="8.6.1 is not supported"):
        typing_mode("8.6.1")
    for p in ("fp32", "fp16", "int8"):
        assert trtexec_flags(STRONG_ONLY, p) == () and builder_flags(STRONG_ONLY, p) == ()
        assert trtexec_flags(STRONG, p) == ("--stronglyTyped",) and builder_flags(STRONG, p) == ()
    assert trtexec_flags(WEAK, "int8") == ("--fp16", "--int8") and builder_flags(WEAK, "fp16") == ("FP16",)
    assert trtexec_flags(WEAK, "fp32") == () and builder_flags(WEAK, "int8") == ("FP16", "INT8")


# ---- the committed extract is the published stubs -------------------------------------------------------------------
@pytest.mark.skipif(stub_path() is None, reason="TensorRT API stubs absent: pip install --no-deps tensorrt-stubs "
                                                "(or CASTLING_DEPLOY_TRT_STUBS=.../tensorrt_bindings/tensorrt.pyi)")
def test_committed_extract_matches_the_stubs() -> None:
    assert extract_surface(stub_path()) == SURFACE


def test_extract_knows_the_deprecations_and_the_removals_exist_in_10_13() -> None:
    classes = SURFACE["classes"]
    assert SURFACE["version"].startswith("10.13")
    assert {k: classes["BuilderFlag"]["deprecated"][k] for k in ("FP16", "INT8", "BF16")} == dict.fromkeys(
        ("FP16", "INT8", "BF16"), "10.12")
    assert classes["NetworkDefinitionCreationFlag"]["enum_values"]["STRONGLY_TYPED"] == 1
    for path in TRT11_REMOVED:  # every removal we guard against is real 10.13 API (not a typo that never matches)
        cls, _, member = path.partition(".")
        assert cls in classes and (not member or member in classes[cls]["members"]), path


# ---- 1. static: every trt.X.Y chain in our modules exists in the stubs --------------------------------------------
def _trt_chains(path: Path) -> set[str]:
    chains: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute):
            parts: list[str] = []
            cur: ast.AST = node
            while isinstance(cur, ast.Attribute):
                parts.append(cur.attr)
                cur = cur.value
            if isinstance(cur, ast.Name) and cur.id == "trt":
                chains.add(".".join(reversed(parts)))
    # keep the longest chains only (trt.Logger.WARNING covers trt.Logger)
    return {c for c in chains if not any(o != c and o.startswith(c + ".") for o in chains)}


def test_every_trt_attribute_chain_exists_in_the_stubs() -> None:
    fake = FakeTensorRT(SURFACE, "10.13.0.35")
    chains = set().union(*(_trt_chains(m) for m in MODULES))
    assert {"Logger.WARNING", "NetworkDefinitionCreationFlag.STRONGLY_TYPED", "MemoryPoolType.WORKSPACE",
            "TensorIOMode.INPUT", "DataType.FLOAT", "BuilderFlag"} <= chains, chains
    for chain in sorted(chains - {"__version__"}):
        head, *rest = chain.split(".")
        obj = getattr(fake, head)  # AttributeError when the stubs do not have it
        for part in rest:
            obj = getattr(obj, part)
    # the only dynamic lookup: getattr(trt.BuilderFlag, name) for the weak-typing flags
    for mode in (STRONG_ONLY, STRONG, WEAK):
        for p in ("fp32", "fp16", "int8"):
            for flag in builder_flags(mode, p):
                assert flag in SURFACE["classes"]["BuilderFlag"]["members"]


def test_no_removed_attribute_is_named_outside_the_weak_branch() -> None:
    """Static half of the proof: 'BuilderFlag' is named once, in the helper that sets builder_flags() (empty on
    11.x); no other 11.x removal appears in our code at all."""
    text = "\n".join(m.read_text() for m in MODULES if m.name != "versions.py")
    for path in TRT11_REMOVED:
        member = path.split(".")[-1]
        if path.startswith("BuilderFlag."):
            continue
        assert member not in text, path
    uses = [m.name for m in MODULES if any(c.startswith("BuilderFlag") for c in _trt_chains(m))]
    assert uses == ["engine.py"]


# ---- 2. dynamic: build_engine against the fake module, per version ---------------------------------------------------
@pytest.fixture
def onnx_files(tmp_path: Path) -> dict[str, Path]:
    """Files that pass the strong-typing precheck (an fp16 initializer, Q/DQ nodes); TensorRT itself is fake."""
    import onnx
    from onnx import TensorProto, helper

    out = {}
    for name, nodes, dtype in (("fp32", [helper.make_node("Relu", ["x"], ["y"])], TensorProto.FLOAT),
                               ("fp16", [helper.make_node("Add", ["x", "c"], ["y"])], TensorProto.FLOAT16),
                               ("int8", [helper.make_node("QuantizeLinear", ["x", "s"], ["q"]),
                                         helper.make_node("DequantizeLinear", ["q", "s"], ["y"])], TensorProto.FLOAT)):
        inits = [helper.make_tensor("c", dtype, [1], [1.0]), helper.make_tensor("s", TensorProto.FLOAT, [], [0.1])]
        g = helper.make_graph(nodes, name, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 32, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
        out[name] = tmp_path / f"{name}.onnx"
        onnx.save(helper.make_model(g), str(out[name]))
    return out


def _fake(version: str, monkeypatch: pytest.MonkeyPatch) -> FakeTensorRT:
    removed = TRT11_REMOVED if version.startswith("11.") else ()
    fake = FakeTensorRT(SURFACE, version, removed)
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(engine_mod, "_gpu", lambda: ("fake GPU", "8.7"))
    return fake


def test_fake_11_raises_on_every_removed_attribute(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _fake("11.4.0", monkeypatch)
    for path in TRT11_REMOVED:
        cls, _, member = path.partition(".")
        with pytest.raises(RemovedAttributeError):
            getattr(getattr(fake, cls), member) if member else getattr(fake, cls)
    assert int(fake.NetworkDefinitionCreationFlag.STRONGLY_TYPED) == 1  # what remains is still there
    with pytest.raises(AttributeError, match="not in the stubs"):
        fake.NoSuchThing


@pytest.mark.parametrize("version", list(VERSIONS))
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_build_engine_calls_per_version(onnx_files, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, version: str,
                                        precision: str) -> None:
    fake = _fake(version, monkeypatch)
    engine = tmp_path / f"{precision}.engine"
    meta = build_engine(onnx_files[precision], engine, precision=precision, batch_range=(1, 4, 8),
                        timing_cache=tmp_path / "timing.cache")
    mode = VERSIONS[version]
    calls, touched = fake.calls(), fake.touched()
    assert meta["typing"] == mode and meta["tensorrt"] == version and engine.read_bytes().startswith(b"fake")
    flags = [c for c in calls if c.startswith("IBuilderConfig.set_flag")]
    if mode == STRONG_ONLY:
        assert "Builder.create_network(0)" in calls and not any(t.startswith("BuilderFlag") for t in touched)
        assert "NetworkDefinitionCreationFlag.STRONGLY_TYPED" not in touched and flags == []
    elif mode == STRONG:
        assert "Builder.create_network(2)" in calls and "NetworkDefinitionCreationFlag.STRONGLY_TYPED" in touched
        assert flags == [] and not any(t.startswith("BuilderFlag") for t in touched)
    else:
        want = {"fp32": [], "fp16": ["FP16"], "int8": ["FP16", "INT8"]}[precision]
        assert "Builder.create_network(0)" in calls and meta["builder_flags"] == want
        assert [re.search(r"<BuilderFlag\.(\w+):", f).group(1) for f in flags] == want
    if mode != WEAK:  # strong typing: nothing deprecated by 10.13 may be touched
        dep = {f"{c}.{m}": v for c, info in SURFACE["classes"].items() for m, v in info["deprecated"].items()}
        assert not {t for t in touched if t in dep and parse_version(dep[t]) <= (10, 13, 0)}
    assert {"Builder.build_serialized_network", "IOptimizationProfile.set_shape", "OnnxParser.parse_from_file",
            "IBuilderConfig.set_memory_pool_limit", "ITimingCache.serialize"} <= touched
    assert f"--onnx={onnx_files[precision]}" in meta["trtexec"]


def test_strong_typing_refuses_an_untyped_onnx(onnx_files, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake("11.4.0", monkeypatch)
    with pytest.raises(UsageError, match="no fp16 tensors"):
        build_engine(onnx_files["fp32"], tmp_path / "e", precision="fp16")
    with pytest.raises(UsageError, match="no Q/DQ nodes"):
        build_engine(onnx_files["fp16"], tmp_path / "e", precision="int8")
    assert not (tmp_path / "e").exists()
    _fake("10.3.0.30", monkeypatch)  # weak typing: the FP16 flag makes an fp16 engine of a float ONNX
    assert build_engine(onnx_files["fp32"], tmp_path / "e", precision="fp16")["builder_flags"] == ["FP16"]


def test_old_tensorrt_is_refused(onnx_files, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake("8.6.1", monkeypatch)
    with pytest.raises(UsageError, match="TensorRT 10.0 or newer"):
        build_engine(onnx_files["int8"], tmp_path / "e", precision="int8")


@pytest.mark.parametrize("version", ["11.4.0", "10.3.0.30"])
def test_runner_uses_only_kept_api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, version: str) -> None:
    """TensorRTRunner up to the CUDA buffers (no GPU here: it then asks for cuda-python, exit 4)."""
    fake = _fake(version, monkeypatch)
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"fake")
    monkeypatch.setitem(sys.modules, "cuda", None)
    with pytest.raises(MissingDependencyError, match="cuda-python"):
        runtime_trt.TensorRTRunner(engine)
    touched = fake.touched()
    assert {"Runtime.deserialize_cuda_engine", "ICudaEngine.get_tensor_dtype", "ICudaEngine.get_tensor_profile_shape",
            "ICudaEngine.create_execution_context", "TensorIOMode.INPUT"} <= touched
