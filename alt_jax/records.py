"""Tuning records: append-only JSON lines keyed by device fingerprint and workload.

Entry points: RecordStore(path).append / .best_knobs / .records / .compact, workload_key,
SCHEMA_VERSION. Records hold decisions (family, workload, knobs, times), never code: kernels
are rebuilt from them, and every knob read back is validated by its template.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import statistics
import tempfile
import time
import warnings
from typing import Any, Iterable

SCHEMA_VERSION = 1
STATUSES = ("ok", "invalid", "build_error", "run_error", "timeout", "wrong_result")


def workload(spec) -> dict:
    """A spec as plain JSON data (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(spec)))


def workload_key(family: str, spec) -> str:
    text = json.dumps({"family": family, "workload": workload(spec)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def make_record(family: str, spec, knobs, device: str, times_s: Iterable[float],
                status: str = "ok", **extra) -> dict:
    if status not in STATUSES:
        raise ValueError(f"record status {status!r} is not one of {STATUSES}")
    return {
        "schema_version": SCHEMA_VERSION,
        "family": family,
        "workload_key": workload_key(family, spec),
        "workload": workload(spec),
        "knobs": dataclasses.asdict(knobs),
        "device": device,
        "times_s": [float(t) for t in times_s],
        "status": status,
        "timestamp": time.time(),
        **extra,
    }


class RecordStore:
    """One JSONL file. Appends are single O_APPEND writes; compaction is temp + rename."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self._cache: list[dict] | None = None
        self._mtime = None

    def records(self) -> list[dict]:
        """All well-formed records of the current schema (bad lines are skipped, warned)."""
        try:
            mtime = os.stat(self.path).st_mtime_ns
        except FileNotFoundError:
            return []
        if self._cache is not None and self._mtime == mtime:
            return self._cache
        out = []
        with open(self.path) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    warnings.warn(f"{self.path}:{lineno}: not JSON, skipped")
                    continue
                if rec.get("schema_version") != SCHEMA_VERSION:
                    continue
                out.append(rec)
        self._cache, self._mtime = out, mtime
        return out

    def append(self, record: dict) -> None:
        line = (json.dumps(record, sort_keys=True) + "\n").encode()
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)  # one write: concurrent appenders never interleave a line
            os.fsync(fd)
        finally:
            os.close(fd)
        self._cache = None

    def best(self, family: str, spec, device: str) -> dict | None:
        """The fastest ok record for this workload on this device, or None."""
        key = workload_key(family, spec)
        best, best_time = None, None
        for rec in self.records():
            if (rec.get("family"), rec.get("workload_key"), rec.get("device")) != \
                    (family, key, device) or rec.get("status") != "ok" or not rec.get("times_s"):
                continue
            t = statistics.median(rec["times_s"])
            if best_time is None or t < best_time:
                best, best_time = rec, t
        return best

    def best_knobs(self, family: str, spec, device: str, knobs_type) -> Any | None:
        rec = self.best(family, spec, device)
        if rec is None:
            return None
        fields = {f.name for f in dataclasses.fields(knobs_type)}
        if set(rec["knobs"]) != fields:
            warnings.warn(f"{self.path}: record for {family} has knobs {sorted(rec['knobs'])}, "
                          f"expected {sorted(fields)}; ignored (re-tune to refresh it)")
            return None
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in rec["knobs"].items()}
        return knobs_type(**values)

    def compact(self) -> None:
        """Rewrites the file keeping only the best ok record per (family, workload, device)."""
        keep: dict = {}
        for rec in self.records():
            if rec.get("status") != "ok" or not rec.get("times_s"):
                continue
            k = (rec["family"], rec["workload_key"], rec["device"])
            if k not in keep or statistics.median(rec["times_s"]) < \
                    statistics.median(keep[k]["times_s"]):
                keep[k] = rec
        directory = os.path.dirname(os.path.abspath(self.path))
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".records-")
        with os.fdopen(fd, "w") as f:
            for rec in keep.values():
                f.write(json.dumps(rec, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        self._cache = None
