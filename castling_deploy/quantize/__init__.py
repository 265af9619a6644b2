"""INT8: calibration, the Castling-aware QuantRecipe, ONNX Runtime QDQ quantization, census and fallback."""
from .calibration import CalibrationCache, CalibrationReader, CalibrationSet, calibration_cache_key, file_digest
from .census import onnx_census
from .graph import GraphStructureError, NodeRole, classify_nodes
from .ort_int8 import quantize_onnx
from .recipe import DEFAULT_INT8_KINDS, QuantRecipe
from .sensitivity import auto_fallback, format_sensitivity_table, logit_metrics, sensitivity_sweep

__all__ = [
    "CalibrationCache",
    "CalibrationReader",
    "CalibrationSet",
    "DEFAULT_INT8_KINDS",
    "GraphStructureError",
    "NodeRole",
    "QuantRecipe",
    "auto_fallback",
    "format_sensitivity_table",
    "logit_metrics",
    "sensitivity_sweep",
    "calibration_cache_key",
    "classify_nodes",
    "file_digest",
    "onnx_census",
    "quantize_onnx",
]
