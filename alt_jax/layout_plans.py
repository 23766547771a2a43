"""The graph level's decisions: for one program on one device, the layout each conv writes.

Entry points: program_key(flat_jaxpr), path_for(records_path), load(path, key, device),
store(path, key, device, entry).
Kept beside a tuning-records file (records.jsonl -> records.jsonl.layouts.json), one JSON
object: {program key: {device fingerprint: entry}}, entry = {"plan": {"eqn 17": "NC8", ...},
"cost_s", "fixed_cost_s", "method", "exact", "timestamp"}. optimize(records=...) replays the
plan of the program it traces. Written whole to a temporary file and renamed (atomic); a
file that cannot be read or parsed is warned about and reads as empty: it is input.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from typing import Optional

from alt_jax import jaxpr_pass


def program_key(flat) -> str:
    """A program's identity: its flat jaxpr's text (equations, shapes, dtypes; not the
    values of its constants), so the positions a plan names mean the same equations."""
    return hashlib.sha256(str(jaxpr_pass.open_jaxpr(flat)).encode()).hexdigest()[:24]


def path_for(records_path) -> str:
    return os.fspath(records_path) + ".layouts.json"


def _read(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        warnings.warn(f"alt_jax: layout plans {path} unreadable ({type(e).__name__}: {e}); "
                      f"ignored")
        return {}
    return data if isinstance(data, dict) else {}


def load(path: str, key: str, device: str) -> Optional[dict]:
    """The entry for (program, device), or None. A plan naming unknown choices is ignored
    (PlanOptions would refuse it); positions it names that are not convs are harmless."""
    from alt_jax.propagate import LAYOUT_CHOICES

    entry = _read(path).get(key, {}).get(device)
    if not isinstance(entry, dict) or not isinstance(entry.get("plan"), dict):
        return None
    if not all(isinstance(k, str) and v in LAYOUT_CHOICES for k, v in entry["plan"].items()):
        warnings.warn(f"alt_jax: layout plan for program {key} in {path} names unknown "
                      f"layouts; ignored")
        return None
    return entry


def store(path: str, key: str, device: str, entry: dict) -> None:
    data = _read(path)
    data.setdefault(key, {})[device] = entry
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".layouts.", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
