"""Stable import path for profiling (``castling_deploy.profile``); the code lives in ``castling_deploy.profiling``."""
from .profiling import format_profile_table, format_sweep_table, profile_artifact, profile_sweep

__all__ = ["format_profile_table", "format_sweep_table", "profile_artifact", "profile_sweep"]
