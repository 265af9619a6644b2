"""The one latency timer: several callables timed in interleaved rounds, so a shared machine's noise (another
process, thermal drift) hits every variant alike and ratios measured in one run stay honest."""
from __future__ import annotations

import time
from typing import Callable, Sequence

import numpy as np


def time_interleaved(fns: Sequence[Callable[[], object]], runs: int, warmup: int = 0, rounds: int = 1,
                     on_call: Callable[[], None] | None = None) -> list[np.ndarray]:
    """Latency samples in ms per callable: ``warmup`` untimed calls each, then ``runs`` timed calls each split
    over ``rounds`` passes across all callables. ``on_call`` runs after every call (progress bars)."""
    tick = on_call or (lambda: None)
    for fn in fns:
        for _ in range(warmup):
            fn()
            tick()
    rounds = max(1, min(rounds, runs))
    per_round = [runs // rounds + (1 if i < runs % rounds else 0) for i in range(rounds)]
    samples: list[list[float]] = [[] for _ in fns]
    for n in per_round:
        for i, fn in enumerate(fns):
            for _ in range(n):
                t = time.perf_counter()
                fn()
                samples[i].append((time.perf_counter() - t) * 1000.0)
                tick()
    return [np.asarray(s, dtype=np.float64) for s in samples]
