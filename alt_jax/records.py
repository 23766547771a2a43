"""Tuning records: append-only JSON lines, one per measured candidate, keyed by device
fingerprint and workload.

Entry points: RecordStore(path).append / .best / .best_for_op / .best_knobs / .records /
.compact, merge_files, make_record, record_time, confirm_pass, latest_passes, pass_choice,
knobs_as_json, knobs_from_record, workload_key, SCHEMA_VERSION, STATUSES, check_record.
Records hold decisions (family, layout, knobs, times), never code: kernels are rebuilt from
them, and every knob read back is validated by its template.

A record (schema 2) names: the family and its workload (the spec) and workload_key; the
op_key of the operation whatever family computes it (so that families computing the same
op, e.g. Winograd and direct, compete for one best); the layout decisions and all knobs;
the device fingerprint; every measured time; the status (ok / invalid / build_error /
crash / run_error / timeout / wrong_result); the versions of alt_jax, jaxlib and the
compiler; a timestamp. The best per (device, op) is the fastest ok record, unless the op
has a confirmation pass (records with stage "confirm", confirm_pass and confirm_start: the
tuner re-timed its heuristic and best candidates together): then its latest pass's choice
(the record marked chosen: the heuristic unless a candidate beat it by the tuner's margin;
per kind of run, the fastest of those choices).

A records file is input, like any file a user hands us: a line that is not a well-formed
record of this schema (not JSON, not an object, not UTF-8, a field of the wrong type) is
skipped, and each file gets one warning with the counts and the first line numbers; a path
that cannot be read is warned about and reads as empty. Nothing malformed reaches a family.
Look-ups stream the file once per (path, mtime, size, device) per process and keep only the
best record per workload for that device, so a large file costs about what its matching
lines cost, and every optimize() after the first reuses the index.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import statistics
import tempfile
import threading
import time
import warnings
from typing import Any, Iterable, Iterator, Optional

SCHEMA_VERSION = 2
# crash: the measuring process died (a signal); run_error: the kernel reported an error
STATUSES = ("ok", "invalid", "build_error", "crash", "run_error", "timeout", "wrong_result")


def workload(spec) -> dict:
    """A spec as plain JSON data (tuples become lists); a spec with a workload() method
    (conv specs: layouts) says itself how it is keyed."""
    data = spec.workload() if hasattr(spec, "workload") else dataclasses.asdict(spec)
    return json.loads(json.dumps(data))


def workload_key(family: str, spec) -> str:
    text = json.dumps({"family": family, "workload": workload(spec)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def versions() -> dict:
    """alt_jax, jaxlib and compiler versions, as written into each record."""
    from alt_jax import __version__, runtime

    try:
        compiler = runtime.compiler_identity()
    except Exception as e:  # noqa: BLE001 - a record still says what it can
        compiler = f"unknown ({type(e).__name__})"
    return {"alt_jax": __version__, "jaxlib": runtime.jaxlib_version(), "compiler": compiler}


def knobs_as_json(knobs) -> dict:
    """Knobs as a record holds them (tuples become lists): what records compare."""
    return json.loads(json.dumps(dataclasses.asdict(knobs)))


def make_record(family: str, spec, knobs, device: str, times_s: Iterable[float],
                status: str = "ok", *, op_key: Optional[str] = None,
                layout: Optional[dict] = None, **extra) -> dict:
    """One measured candidate. op_key (planner.op_key: the workload key of the op's general
    family, conv2d for convs) defaults to this family's own workload key, which is the op key
    when family is the general one; layout defaults to no layout decisions."""
    if status not in STATUSES:
        raise ValueError(f"record status {status!r} is not one of {STATUSES}")
    wkey = workload_key(family, spec)
    return {
        "schema_version": SCHEMA_VERSION,
        "family": family,
        "workload_key": wkey,
        "workload": workload(spec),
        "op_key": op_key or wkey,
        "layout": json.loads(json.dumps(layout or {})),
        "knobs": knobs_as_json(knobs),
        "device": device,
        "times_s": [float(t) for t in times_s],
        "status": status,
        "versions": versions(),
        "timestamp": time.time(),
        **extra,
    }


_SCALARS = (bool, int, float, str)


def _is_knob_value(v) -> bool:
    """Knob values are JSON scalars, or flat lists of them (tuples in the dataclass)."""
    if v is None or isinstance(v, _SCALARS):
        return True
    return isinstance(v, list) and all(isinstance(x, _SCALARS) for x in v)


def _is_time(t) -> bool:
    return isinstance(t, (int, float)) and not isinstance(t, bool) and 0 <= t < float("inf")


def check_record(rec) -> Optional[str]:
    """None if rec is a well-formed record of this schema, else what is wrong with it."""
    if not isinstance(rec, dict):
        return f"a JSON {type(rec).__name__}, not an object"
    for name in ("family", "workload_key", "op_key", "device", "status"):
        if not isinstance(rec.get(name), str):
            return f"{name!r} is missing or not a string"
    if rec["status"] not in STATUSES:
        return f"status {rec['status']!r} is not one of {STATUSES}"
    for name in ("knobs", "layout"):
        value = rec.get(name)
        if not isinstance(value, dict) or not all(isinstance(k, str) and _is_knob_value(v)
                                                  for k, v in value.items()):
            return f"{name!r} is not an object of scalar (or flat list) values"
    times = rec.get("times_s")
    if not isinstance(times, list) or not all(_is_time(t) for t in times):
        return "'times_s' is not a list of non-negative finite numbers"
    return None


@dataclasses.dataclass
class _Skipped:
    """Lines of one file that were not used, for its one warning."""

    counts: dict = dataclasses.field(default_factory=dict)  # reason -> count
    first_lines: list = dataclasses.field(default_factory=list)

    def add(self, lineno: int, reason: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        if len(self.first_lines) < 10:
            self.first_lines.append(lineno)

    def warn(self, path: str) -> None:
        if not self.counts:
            return
        total = sum(self.counts.values())
        kinds = "; ".join(f"{n} {why}" for why, n in sorted(self.counts.items()))
        warnings.warn(f"alt_jax records {path}: skipped {total} malformed line(s) ({kinds}); "
                      f"first at line(s) {self.first_lines}. Re-tune or compact the file to "
                      f"clean it.", stacklevel=4)


def _stat_key(path: str):
    """(mtime_ns, size, inode) of path; None if there is no file."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        warnings.warn(f"alt_jax records {path}: cannot be read ({e}); no tuning records used",
                      stacklevel=4)
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def _stream(path: str, skipped: _Skipped, needle: Optional[bytes] = None) -> Iterator[dict]:
    """Well-formed records of path, one line at a time. Lines without `needle` (the JSON text
    of the device looked up) cannot match: they are only checked to be UTF-8 text shaped like
    a JSON object (cheap, C speed), not parsed."""
    try:
        f = open(path, "rb")
    except OSError as e:
        warnings.warn(f"alt_jax records {path}: cannot be read ({e}); no tuning records used",
                      stacklevel=4)
        return
    with f:
        for lineno, raw in enumerate(f, 1):
            line = raw.strip()
            if not line:
                continue
            if needle is not None and needle not in line:
                why = _not_object_shaped(line)
                if why:
                    skipped.add(lineno, why)
                continue
            try:
                rec = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                skipped.add(lineno, "not UTF-8")
                continue
            except (json.JSONDecodeError, RecursionError):
                skipped.add(lineno, "not JSON")
                continue
            if isinstance(rec, dict) and rec.get("schema_version") != SCHEMA_VERSION:
                continue  # another schema's record: not ours to read, not malformed
            why = check_record(rec)
            if why is not None:
                skipped.add(lineno, why)
                continue
            yield rec


def _not_object_shaped(line: bytes) -> Optional[str]:
    try:
        line.decode("utf-8")
    except UnicodeDecodeError:
        return "not UTF-8"
    if not (line.startswith(b"{") and line.endswith(b"}")):
        return "not a JSON object"
    return None


def record_time(rec) -> Optional[float]:
    """A record's time: the median of its repeats; None unless it is an ok measurement."""
    if rec["status"] != "ok" or not rec["times_s"]:
        return None
    return statistics.median(rec["times_s"])


CONFIRM_STAGE = "confirm"


def confirm_pass(rec) -> Optional[tuple]:
    """(start time, pass id) of the confirmation pass a record belongs to (the tuner re-times
    an op's heuristic and best candidates together, interleaved, in one pass), or None for a
    search trial. Later passes sort after earlier ones."""
    if rec.get("stage") != CONFIRM_STAGE:
        return None
    start, pass_id = rec.get("confirm_start"), rec.get("confirm_pass")
    if not _is_time(start) or not isinstance(pass_id, str):
        return None
    return (float(start), pass_id)


def _preferred_in_pass(rec, than) -> bool:
    """Within one confirmation pass (ok records): the one the tuner marked chosen wins (it
    keeps the heuristic unless a candidate beats it by a margin); in a pass without a mark,
    the fastest."""
    if bool(rec.get("chosen")) != bool(than.get("chosen")):
        return bool(rec.get("chosen"))
    return _better(rec, than)


def latest_passes(recs, group) -> dict:
    """{group(rec): the records of that group's latest confirmation pass} over the records
    of recs that belong to a pass (confirm_pass), in their order."""
    latest: dict = {}
    for rec in recs:
        tag = confirm_pass(rec)
        if tag is None:
            continue
        key = group(rec)
        have = latest.get(key)
        if have is None or tag > have[0]:
            latest[key] = (tag, [rec])
        elif tag == have[0]:
            have[1].append(rec)
    return {key: members for key, (_, members) in latest.items()}


def pass_choice(recs) -> Optional[dict]:
    """The record a confirmation pass (its records) decides for, or None (none ok)."""
    best = None
    for rec in recs:
        if record_time(rec) is not None and (best is None or _preferred_in_pass(rec, best)):
            best = rec
    return best


def _better(rec, than) -> bool:
    """rec (an ok record) is faster than `than` (an ok record, or None)."""
    return than is None or record_time(rec) < record_time(than)


# (path, device) -> (stat key, {(family, workload_key): best ok record, op_key: best ok
# record of any family}); shared by every RecordStore of the process so that each
# optimize() does not re-read the same file.
_INDEX: dict = {}
_INDEX_LOCK = threading.Lock()


def _op_and_run_kind(rec) -> tuple:
    """(op_key, (mode, search)): each kind of tuning run of an op has its own passes."""
    return rec["op_key"], (rec.get("mode"), rec.get("search"))


def _device_index(path: str, device: str, select: tuple = ()) -> dict:
    key = _stat_key(path)
    if key is None:
        return {}
    with _INDEX_LOCK:
        hit = _INDEX.get((path, device, select))
        if hit is not None and hit[0] == key:
            return hit[1]
    best: dict = {}
    in_passes: list = []
    skipped = _Skipped()
    needle = json.dumps(device).encode()
    for rec in _stream(path, skipped, needle):
        if rec["device"] != device or rec["status"] != "ok" or not rec["times_s"]:
            continue
        if any(rec.get(field) != value for field, value in select):
            continue
        for k in ((rec["family"], rec["workload_key"]), rec["op_key"]):
            if _better(rec, best.get(k)):
                best[k] = rec
        if confirm_pass(rec) is not None:
            in_passes.append(rec)
    # An op's latest confirmation pass decides it: its candidates (the heuristic's among
    # them) were re-timed together, so its choice is not one lucky measurement. A file
    # with several kinds of run (joint and loop-only, model and random search) has a latest
    # pass per kind; the fastest of their choices decides.
    winners: dict = {}
    for (op, _), recs in latest_passes(in_passes, _op_and_run_kind).items():
        rec = pass_choice(recs)
        if _better(rec, winners.get(op)):
            winners[op] = rec
    best.update(winners)
    skipped.warn(path)
    with _INDEX_LOCK:
        _INDEX[(path, device, select)] = (key, best)
    return best


class RecordStore:
    """One JSONL file. Appends are single O_APPEND writes; compaction is temp + rename.

    select: look-ups (best, best_for_op, best_knobs) only see records whose fields have these
    values, e.g. {"mode": "loop_only"} for the loop-only ablation of a file that holds joint
    and loop-only tuning runs."""

    def __init__(self, path: str | os.PathLike, select: Optional[dict] = None):
        self.path = os.path.abspath(os.fspath(path))
        self.select = tuple(sorted((select or {}).items()))

    def records(self) -> list[dict]:
        """All well-formed records of the current schema (bad lines skipped, one warning)."""
        if _stat_key(self.path) is None:
            return []
        skipped = _Skipped()
        out = list(_stream(self.path, skipped))
        skipped.warn(self.path)
        return out

    def append(self, record: dict) -> None:
        why = check_record(record)
        if why is not None:
            raise ValueError(f"not a well-formed record: {why}")
        line = (json.dumps(record, sort_keys=True) + "\n").encode()
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)  # one write: concurrent appenders never interleave a line
            os.fsync(fd)
        finally:
            os.close(fd)

    def best(self, family: str, spec, device: str) -> dict | None:
        """The fastest ok record for this workload on this device, or None."""
        return _device_index(self.path, device, self.select).get(
            (family, workload_key(family, spec)))

    def best_for_op(self, op_key: str, device: str) -> dict | None:
        """The record the planner uses for this operation on this device, or None: the
        choice of the op's latest confirmation pass (confirm_pass, pass_choice) if it has
        one (of each kind of run, mode x search, the fastest of their choices), else its
        fastest ok record of any family."""
        return _device_index(self.path, device, self.select).get(op_key)

    def best_knobs(self, family: str, spec, device: str, knobs_type) -> Any | None:
        """The best record's knobs as knobs_type, or None (no record, or knobs that do not
        fit the type: warned). The caller still validates them against the spec."""
        return knobs_from_record(self.best(family, spec, device), knobs_type, self.path)

    def compact(self) -> None:
        """Rewrites the file keeping only the best ok record per (family, workload, device),
        and the ok records of each op's latest confirmation pass (which decide the op)."""
        keep: dict = {}
        ok = [rec for rec in self.records() if record_time(rec) is not None]
        for rec in ok:
            k = (rec["family"], rec["workload_key"], rec["device"])
            if _better(rec, keep.get(k)):
                keep[k] = rec
        passes = latest_passes(ok, lambda rec: (rec["device"], _op_and_run_kind(rec)))
        out = list(keep.values())
        seen = {id(r) for r in out}
        out += [r for recs in passes.values() for r in recs if id(r) not in seen]
        _write_atomically(self.path, out)


def knobs_from_record(rec: Optional[dict], knobs_type, path: str = "records") -> Any | None:
    """rec's knobs as knobs_type, or None (no record, or knobs that do not fit the type:
    warned). The caller still validates them against the spec."""
    if rec is None:
        return None
    family = rec["family"]
    fields = {f.name for f in dataclasses.fields(knobs_type)}
    if set(rec["knobs"]) != fields:
        warnings.warn(f"{path}: record for {family} has knobs {sorted(rec['knobs'])}, "
                      f"expected {sorted(fields)}; ignored (re-tune to refresh it)")
        return None
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in rec["knobs"].items()}
    try:
        return knobs_type(**values)
    except (TypeError, ValueError) as e:
        warnings.warn(f"{path}: record for {family} has knobs {values} that "
                      f"{knobs_type.__name__} refuses ({e}); ignored")
        return None


def _record_id(rec: dict) -> str:
    """Identity of one measurement (the same line in two files is one record)."""
    return json.dumps({k: rec.get(k) for k in ("device", "family", "workload_key", "knobs",
                                                "times_s", "status", "timestamp")},
                      sort_keys=True)


def merge_files(out_path: str | os.PathLike, inputs: Iterable[str | os.PathLike]) -> int:
    """Writes out_path (temp file + rename) with every well-formed record of out_path and
    inputs, each measurement once; returns how many records it holds."""
    out = RecordStore(out_path)
    seen, keep = set(), []
    for path in [out.path, *(os.fspath(p) for p in inputs)]:
        for rec in RecordStore(path).records():
            rid = _record_id(rec)
            if rid not in seen:
                seen.add(rid)
                keep.append(rec)
    _write_atomically(out.path, keep)
    return len(keep)


def _write_atomically(path: str, recs: list) -> None:
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".records-")
    try:
        with os.fdopen(fd, "w") as f:
            for rec in recs:
                f.write(json.dumps(rec, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
