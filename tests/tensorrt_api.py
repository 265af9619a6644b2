"""The published TensorRT Python API as data, and a fake ``tensorrt`` module built from it.

TensorRT cannot be installed on these machines, so our engine code is checked against NVIDIA's type stubs
(``pip install --no-deps tensorrt-stubs``: 10.13, ``tensorrt_bindings/tensorrt.pyi``). ``extract_surface`` reads a
``.pyi`` into {class: members (kind, return type)} plus the enum values and the "[DEPRECATED] Deprecated in TensorRT
X" marks; ``tests/tensorrt_api_10_13.json`` is that extract, committed so the check runs without the stubs (a test
compares it with the real file when the stubs are there: CASTLING_DEPLOY_TRT_STUBS=.../tensorrt.pyi, or the
installed distribution).

``FakeTensorRT(surface, version, removed)`` is a module whose every class, enum member, method and property comes
from that surface: touching anything else raises AttributeError, and so does touching an attribute in ``removed``
(the TensorRT 11 removals). Methods return fakes of their annotated return types, a few (``STUB_BUILDER``) return
what a successful build needs. Every access and call is logged, which proves which calls are made per version.

Not a test module (no ``test_`` prefix). Regenerate the extract with:
    python -m tests.tensorrt_api PATH/TO/tensorrt_bindings/tensorrt.pyi > tests/tensorrt_api_10_13.json
"""
from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import sys
import types
from pathlib import Path
from typing import Any

EXTRACT = Path(__file__).with_name("tensorrt_api_10_13.json")
_DEPRECATED = re.compile(r"\[DEPRECATED\]\s*Deprecated in TensorRT ([\d.]*\d)")
_ENUM_VALUE = re.compile(r"^\s*(\w+): typing\.ClassVar\[\w+(?:\.\w+)?\]\s*# value = <[\w.]+: (-?\d+)>", re.MULTILINE)


def stub_path() -> Path | None:
    """The real ``tensorrt.pyi`` when the stubs are available (env var, or the installed distribution)."""
    env = os.environ.get("CASTLING_DEPLOY_TRT_STUBS")
    if env:
        return Path(env)
    try:
        from importlib import metadata

        files = metadata.files("tensorrt-stubs") or []
    except metadata.PackageNotFoundError:
        return None
    hit = next((f for f in files if str(f).endswith("tensorrt_bindings/tensorrt.pyi")), None)
    return Path(hit.locate()) if hit else None


def _deprecations(doc: str, members: dict[str, Any]) -> dict[str, str]:
    """Members a class docstring marks: an enum's ``NAME : text`` followed by a line (or text) starting with
    ``[DEPRECATED] Deprecated in TensorRT X``, or ``:ivar name: ... [DEPRECATED] Deprecated in TensorRT X``.
    A mark in the middle of a sentence about another API (WORKSPACE's note on IAlgorithmSelector) does not count."""
    out: dict[str, str] = {}
    current = None
    for line in doc.splitlines():
        ivar = re.match(r"\s*:ivar (\w+):.*?\[DEPRECATED\]\s*Deprecated in TensorRT ([\d.]*\d)", line)
        if ivar and ivar.group(1) in members:
            out[ivar.group(1)] = ivar.group(2)
            continue
        m = re.match(r"\s*(\w+)\s*:(\s|$)", line)
        if m and m.group(1) in members:
            current = m.group(1)
        d = re.match(r"\s*(?:\w+\s*:\s*)?\[DEPRECATED\]\s*Deprecated in TensorRT ([\d.]*\d)", line)
        if d and current:
            out[current] = d.group(1)
    return out


def _annotation(node: ast.AST | None) -> str | None:
    return ast.unparse(node) if node is not None else None


def _class_members(cls: ast.ClassDef, src: str, prefix: str, out: dict[str, Any]) -> None:
    name = f"{prefix}{cls.name}"
    members: dict[str, list[Any]] = {}
    deprecated: dict[str, str] = {}
    for item in cls.body:
        if isinstance(item, ast.FunctionDef):
            decorators = {ast.unparse(d) for d in item.decorator_list}
            kind = "property" if "property" in decorators else "method"
            if item.name.startswith("__") and item.name not in ("__init__", "__enter__", "__exit__"):
                continue
            members[item.name] = [kind, _annotation(item.returns)]
            d = _DEPRECATED.search(ast.get_docstring(item) or "")
            if d:
                deprecated[item.name] = d.group(1)
        elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
            if not item.target.id.startswith("__"):
                members[item.target.id] = ["attr", _annotation(item.annotation)]
        elif isinstance(item, ast.ClassDef):
            members[item.name] = ["class", f"{name}.{item.name}"]
            _class_members(item, src, f"{name}.", out)
    segment = ast.get_source_segment(src, cls) or ""
    doc = ast.get_docstring(cls) or ""
    out[name] = {
        "bases": [ast.unparse(b) for b in cls.bases],
        "members": dict(sorted(members.items())),
        "enum_values": {k: int(v) for k, v in _ENUM_VALUE.findall(segment) if k in members},
        "deprecated": dict(sorted({**_deprecations(doc, members), **deprecated}.items())),
    }


def _parse(src: str) -> tuple[ast.Module, str]:
    """The stubs have a few signatures Python rejects (a non-default argument after a default one): their
    parameter lists become ``(self, *args, **kwargs)``; names and return types are all we read."""
    lines = src.splitlines()
    for _ in range(100):
        try:
            return ast.parse("\n".join(lines)), "\n".join(lines)
        except SyntaxError as exc:
            i = (exc.lineno or 1) - 1
            m = re.match(r"(\s*def \w+)\(.*\)(\s*->.*:)\s*$", lines[i])
            if not m:
                raise
            lines[i] = f"{m.group(1)}(self, *args, **kwargs){m.group(2)}"
    raise SyntaxError("too many unparseable lines in the stubs")


def extract_surface(pyi: Path) -> dict[str, Any]:
    raw = pyi.read_text()
    tree, src = _parse(raw)
    classes: dict[str, Any] = {}
    functions: dict[str, str | None] = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            _class_members(node, src, "", classes)
        elif isinstance(node, ast.FunctionDef):
            functions[node.name] = _annotation(node.returns)
    return {
        "source": "tensorrt-stubs tensorrt_bindings/tensorrt.pyi",
        "version": "10.13.0.35",
        "sha256": hashlib.sha256(raw.encode()).hexdigest(),
        "classes": dict(sorted(classes.items())),
        "functions": dict(sorted(functions.items())),
    }


def load_surface() -> dict[str, Any]:
    return json.loads(EXTRACT.read_text())


# ---- the fake module ----------------------------------------------------------------------------------------------
class RemovedAttributeError(AttributeError):
    pass


class FakeEnum(int):
    """An enum member: an int with a name (``int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)`` works)."""

    def __new__(cls, value: int, path: str) -> "FakeEnum":
        obj = super().__new__(cls, value)
        obj.path = path
        return obj

    def __repr__(self) -> str:
        return f"<{self.path}: {int(self)}>"


class _Behaviour:
    """The stub builder and engine: a parse that succeeds, a (-1, 3, H, W) input, bytes from every IHostMemory, and
    an engine with one fp32 input ``images`` and one fp32 output ``logits`` for the runner."""

    def __init__(self, input_shape: tuple[int, ...]) -> None:
        self.input_shape = input_shape

    def __call__(self, fake: "FakeTensorRT", path: str, args: tuple, kwargs: dict) -> Any:
        shape = self.input_shape
        table = {
            "OnnxParser.parse_from_file": lambda: True,
            "OnnxParser.num_errors": lambda: 0,
            "ITensor.shape": lambda: shape,
            "ITensor.name": lambda: "images",
            "IBuilderConfig.set_timing_cache": lambda: True,
            "IBuilderConfig.add_optimization_profile": lambda: 0,
            "ICudaEngine.num_io_tensors": lambda: 2,
            "ICudaEngine.get_tensor_name": lambda: ("images", "logits")[args[0]],
            "ICudaEngine.get_tensor_mode": lambda: fake.member(
                "TensorIOMode", "INPUT" if args[0] == "images" else "OUTPUT", instance=False),
            "ICudaEngine.get_tensor_dtype": lambda: fake.member("DataType", "FLOAT", instance=False),
            "ICudaEngine.get_tensor_profile_shape": lambda: [(1, *shape[1:]), (8, *shape[1:]), (32, *shape[1:])],
            "IExecutionContext.set_input_shape": lambda: True,
            "IExecutionContext.get_tensor_shape": lambda: (1, 10),
            "IExecutionContext.execute_async_v3": lambda: True,
        }
        make = table.get(path)
        return make() if make else ...


class FakeObject:
    """An instance of stub class ``cls``: members come from the surface (and its bases), nothing else."""

    def __init__(self, fake: "FakeTensorRT", cls: str) -> None:
        object.__setattr__(self, "_fake", fake)
        object.__setattr__(self, "_cls", cls)

    def __getattr__(self, name: str) -> Any:
        return self._fake.member(self._cls, name, instance=True)

    def __setattr__(self, name: str, value: Any) -> None:
        self._fake.member(self._cls, name, instance=True)  # must exist (and not be removed) to be set
        self._fake.log.append((f"{self._fake.owner(self._cls, name)}.{name}", "set", (value,)))

    def __bytes__(self) -> bytes:
        if self._cls != "IHostMemory":
            raise TypeError(f"bytes() of a fake {self._cls}")
        return b"fake-serialized-" + self._cls.encode()


class FakeTensorRT(types.ModuleType):
    """``import tensorrt`` as the stubs describe it, at ``version``, without the ``removed`` attributes."""

    def __init__(self, surface: dict[str, Any], version: str, removed: tuple[str, ...] = (),
                 input_shape: tuple[int, ...] = (-1, 3, 32, 32)) -> None:
        super().__init__("tensorrt")
        self.__version__ = version
        self.__file__ = "<fake tensorrt built from tensorrt-stubs>"
        self._surface = surface
        self._removed = set(removed)
        self._behaviour = _Behaviour(input_shape)
        self.log: list[tuple[str, str, tuple]] = []

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        self._check_removed(name)
        if name in self._surface["classes"]:
            self.log.append((name, "get", ()))
            return self._class(name)
        if name in self._surface["functions"]:
            return self._callable(name, self._surface["functions"][name])
        raise AttributeError(f"module 'tensorrt' {self.__version__} has no attribute {name!r} (not in the stubs)")

    def _check_removed(self, path: str) -> None:
        if path in self._removed:
            raise RemovedAttributeError(f"tensorrt.{path} was removed in TensorRT {self.__version__.split('.')[0]}")

    def owner(self, cls: str, name: str) -> str:
        """The class in ``cls``'s hierarchy that declares ``name``."""
        seen = [cls]
        while seen:
            c = seen.pop(0)
            info = self._surface["classes"].get(c)
            if info is None:
                continue
            if name in info["members"]:
                return c
            seen += [b if b in self._surface["classes"] else f"{c.rsplit('.', 1)[0]}.{b}" for b in info["bases"]]
        raise AttributeError(f"tensorrt.{cls} has no attribute {name!r} in TensorRT {self.__version__} (stubs)")

    def _class(self, cls: str) -> Any:
        fake = self

        class _Cls:
            def __getattr__(self, name: str) -> Any:
                return fake.member(cls, name, instance=False)

            def __call__(self, *args: Any, **kwargs: Any) -> FakeObject:
                fake.log.append((cls, "call", args))
                return FakeObject(fake, cls)

        return _Cls()

    def member(self, cls: str, name: str, *, instance: bool) -> Any:
        owner = self.owner(cls, name)
        path = f"{owner}.{name}"
        for p in (f"{cls}.{name}", path, owner):
            self._check_removed(p)
        kind, ret = self._surface["classes"][owner]["members"][name]
        enum_values = self._surface["classes"][owner]["enum_values"]
        if kind == "class":
            self.log.append((path, "get", ()))
            return self._class(ret)
        if kind == "attr" and name in enum_values:
            self.log.append((path, "get", ()))
            return FakeEnum(enum_values[name], path)
        if kind in ("property", "attr"):
            self.log.append((path, "get", ()))
            return self._result(path, ret, (), {})
        return self._callable(path, ret)

    def _callable(self, path: str, ret: str | None) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            self.log.append((path, "call", args))
            return self._result(path, ret, args, kwargs)

        return call

    def _result(self, path: str, ret: str | None, args: tuple, kwargs: dict) -> Any:
        value = self._behaviour(self, path, args, kwargs)
        if value is not ...:
            return value
        if ret in self._surface["classes"]:
            return FakeObject(self, ret)
        return None

    def calls(self) -> list[str]:
        return [f"{p}({', '.join(map(repr, a))})" if kind == "call" else p for p, kind, a in self.log]

    def touched(self) -> set[str]:
        return {p for p, _, _ in self.log}


if __name__ == "__main__":
    print(json.dumps(extract_surface(Path(sys.argv[1])), indent=None, separators=(",", ":")))
