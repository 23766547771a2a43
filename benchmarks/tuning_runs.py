"""The kinds of tuning runs a records file holds, as the benchmarks label them.

Entry point: tuning_runs(path) -> [(column label, record selection)].
"""
from __future__ import annotations

from alt_jax import device
from alt_jax.records import RecordStore

_RUN_LABELS = {("joint", "model"): "joint tuned", ("loop_only", "model"): "loop-only tuned",
               ("joint", "random"): "joint tuned (random search)",
               ("loop_only", "random"): "loop-only tuned (random search)"}


def tuning_runs(path: str) -> list:
    """[(column label, record selection)] for each kind of tuning run (mode x search) in the
    records file on this device, when it holds more than one kind (else 'alt_jax tuned' is
    the only column needed)."""
    here = device.fingerprint()
    kinds = sorted({(r.get("mode", "joint"), r.get("search", "model"))
                    for r in RecordStore(path).records() if r["device"] == here})
    if len(kinds) < 2:
        return []
    return [(_RUN_LABELS[k], {"mode": k[0], "search": k[1]}) for k in kinds if k in _RUN_LABELS]
