"""Profiling of deployed artifacts: latency/throughput/memory/per-op, charts, and resolution sweeps."""
from .latency import format_profile_table, profile_artifact
from .sweep import format_sweep_table, profile_sweep

__all__ = ["format_profile_table", "format_sweep_table", "profile_artifact", "profile_sweep"]
