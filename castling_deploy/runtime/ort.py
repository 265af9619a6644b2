"""ONNX Runtime (CPU) runner."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import UsageError


class OrtRunner:
    def __init__(self, path: str | Path, threads: int | None = None, profile_prefix: str | None = None) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        if profile_prefix:
            opts.enable_profiling = True
            opts.profile_file_prefix = profile_prefix
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph types
            raise UsageError(f"{path}: ONNX Runtime cannot load this model ({str(exc).splitlines()[0][:200]})") from exc
        self.path = str(path)
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name
        self.name = f"onnxruntime {ort.__version__} CPUExecutionProvider"

    def run(self, x: np.ndarray) -> np.ndarray:
        out = self.session.run([self.output_name], {self.input_name: np.ascontiguousarray(x, dtype=np.float32)})[0]
        return np.asarray(out, dtype=np.float32)
