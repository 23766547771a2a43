"""The measuring worker: a process of its own that loads a candidate kernel, checks it against
the reference and times it, so that a candidate that crashes or hangs costs one trial.
Entry points: main (run as a script by tuner.measure.Runner), send / recv (the message framing
both sides use), check_output, measure_one.

Imports only the standard library and numpy, so that tuner.measure can import the framing
without side effects and the worker starts fast: alt_jax._core is loaded by file path (the
parent passes the path of the very extension it uses), not through `import alt_jax._core`,
which would run alt_jax/__init__ and import jax (0.6-0.8 s, ~150 MB) for nothing: the worker
needs only _core.load / run / time. This matters because every crash or timeout starts a
fresh worker.

Messages are pickles framed by an 8-byte little-endian length, on two dedicated pipes (not
stdin/stdout: a kernel that prints must not corrupt the protocol). A request is a dict (see
measure_one); the reply is a dict {status, times, cut, error}.
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import math
import os
import pickle
import select
import struct
import sys
import threading
import time

import numpy as np

_HEADER = struct.Struct("<Q")
# The worker plans its repeats to end within this fraction of the parent's timeout, so that a
# slow but working kernel is reported with fewer repeats rather than killed as a timeout.
_BUDGET_FRACTION = 0.7
_ORPHAN_POLL_S = 0.5


# ---- framing


def send(fd: int, obj) -> None:
    """Writes one message; BrokenPipeError if the other side is gone."""
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    _write_all(fd, _HEADER.pack(len(data)))
    _write_all(fd, data)


def recv(fd: int, deadline: float | None = None):
    """Reads one message. EOFError if the other side closed its end (died) before or during
    it; TimeoutError if time.monotonic() passes deadline first (None: wait forever)."""
    (size,) = _HEADER.unpack(_read_exact(fd, _HEADER.size, deadline))
    return pickle.loads(_read_exact(fd, size, deadline))


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _read_exact(fd: int, size: int, deadline: float | None) -> bytearray:
    buf = bytearray(size)
    view = memoryview(buf)
    got = 0
    poller = select.poll()  # not select.select: that fails on descriptors >= 1024
    poller.register(fd, select.POLLIN)
    while got < size:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0 or not poller.poll(max(1, math.ceil(left * 1000))):
                if time.monotonic() >= deadline:
                    raise TimeoutError
                continue  # woken early: poll again for what is left
        n = os.readv(fd, [view[got:]])
        if n == 0:
            raise EOFError
        got += n
    return buf


# ---- the protocol


def check_output(out: np.ndarray, expected: np.ndarray, rtol: float) -> str | None:
    """None if out matches expected, else what is wrong. Where the reference is finite, out
    must be finite and max|out - ref| <= rtol * max(1, max|ref|); where it is inf or NaN, out
    must be the same inf / a NaN."""
    if out.shape != expected.shape:
        return f"output shape {out.shape} != reference shape {expected.shape}"
    ref = expected.astype(np.float64)
    got = out.astype(np.float64)
    finite = np.isfinite(ref)
    bad = finite & ~np.isfinite(got)
    if bad.any():
        return (f"non-finite output at {int(bad.sum())} of {ref.size} positions where the "
                f"reference is finite (first at index {np.argwhere(bad)[0].tolist()})")
    special = ~finite
    if special.any() and not np.array_equal(got[special], ref[special], equal_nan=True):
        return "output differs from the reference where the reference is inf or NaN"
    if not finite.any():
        return None
    err = float(np.max(np.abs(got[finite] - ref[finite])))
    tol = rtol * max(1.0, float(np.max(np.abs(ref[finite]))))
    if not err <= tol:
        return f"max |out - ref| = {err:.3g} > {tol:.3g} (rtol {rtol:g} x max(1, max |ref|))"
    return None


def measure_one(core, req: dict) -> dict:
    """Runs the protocol of tuner.measure.MeasureConfig on one kernel. req: lib, symbol,
    workspace_bytes, inputs (list of arrays), expected, best_so_far_s, config (the
    MeasureConfig as a dict). Exceptions propagate (the caller reports run_error)."""
    cfg = req["config"]
    budget_end = time.monotonic() + _BUDGET_FRACTION * cfg["timeout_s"]
    lib, sym, ws = req["lib"], req["symbol"], req["workspace_bytes"]
    inputs, expected = req["inputs"], req["expected"]
    threads = cfg["num_threads"]

    # NaN-filled: an element the kernel never writes cannot pass as a stale correct value.
    out = np.full(expected.shape, np.nan, np.float32)
    core.load(lib, sym)
    core.run(lib, sym, inputs, [out], ws, threads)
    wrong = check_output(out, expected, cfg["rtol"])
    if wrong:
        return _reply("wrong_result", error=wrong)
    for _ in range(cfg["warmup"]):
        core.run(lib, sym, inputs, [out], ws, threads)
    rotate = cold_copies(inputs, req["cold"], cfg["cold_bytes"], cfg["max_cold_copies"])
    probe = core.time(lib, sym, inputs, [out], ws, threads, 1, 1, rotate)[0]
    best = req["best_so_far_s"]
    if best is not None and probe > cfg["cut_factor"] * best:
        return _reply("ok", times=(probe,), cut=True)
    number = max(1, min(cfg["max_number"], math.ceil(cfg["min_repeat_s"] / max(probe, 1e-9))))
    # _core.time makes one warm-up call, then repeat x number timed ones.
    fits = int((budget_end - time.monotonic()) / max(probe, 1e-9) - 1) // number
    repeat = min(cfg["repeat"], fits)
    if repeat < 1:
        return _reply("ok", times=(probe,))
    times = tuple(core.time(lib, sym, inputs, [out], ws, threads, number, repeat, rotate))
    # Checked again: a kernel that relies on its first call's state (an output it does not
    # zero, a workspace it assumes clean) or races is wrong on later calls.
    wrong = check_output(out, expected, cfg["rtol"])
    if wrong:
        return _reply("wrong_result", error=f"after {1 + number * repeat} timed calls: {wrong}")
    return _reply("ok", times=times)


def cold_copies(inputs: list, cold, cold_bytes: int, max_copies: int) -> list:
    """Input sets for _core.time to cycle through after `inputs` itself: the cold inputs
    copied (the others shared) until all sets' cold inputs total >= cold_bytes, so that each
    call finds its cold inputs evicted by the calls before it. [] when nothing is cold."""
    size = sum(inputs[i].nbytes for i in cold)
    if not cold or cold_bytes <= 0 or size == 0:
        return []
    copies = min(max_copies, math.ceil(cold_bytes / size)) - 1
    return [[x.copy() if i in cold else x for i, x in enumerate(inputs)]
            for _ in range(max(1, copies))]


def _reply(status: str, *, times: tuple = (), cut: bool = False, error: str = "") -> dict:
    return {"status": status, "times": times, "cut": cut, "error": error}


# ---- the process


def load_core(path: str):
    """alt_jax._core from its file, without importing the alt_jax package (see top)."""
    loader = importlib.machinery.ExtensionFileLoader("alt_jax._core", path)
    spec = importlib.util.spec_from_file_location("alt_jax._core", path, loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def _exit_when_orphaned(parent_pid: int) -> None:
    """A parent killed without closing us down leaves us reparented: exit, even in the middle
    of a kernel that never returns (it runs without the GIL, so this thread still runs)."""
    while True:
        time.sleep(_ORPHAN_POLL_S)
        if os.getppid() != parent_pid:
            os._exit(3)


def main(argv: list[str]) -> int:
    t0 = time.monotonic()
    core_path, req_fd, rep_fd, parent_pid = argv[0], int(argv[1]), int(argv[2]), int(argv[3])
    threading.Thread(target=_exit_when_orphaned, args=(parent_pid,), daemon=True).start()
    core = load_core(core_path)
    send(rep_fd, {"status": "ready", "pid": os.getpid(), "start_s": time.monotonic() - t0})
    while True:
        try:
            req = recv(req_fd)
        except EOFError:
            return 0  # the parent closed us down
        try:
            reply = measure_one(core, req)
        except Exception as e:  # the kernel's error status (RuntimeError from _core) or ours
            reply = _reply("run_error", error=f"{type(e).__name__}: {e}")
        send(rep_fd, reply)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
