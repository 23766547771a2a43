"""Measuring candidate kernels: compile a batch in parallel, then run each, one at a time, in a
worker process with a timeout, checked against the reference before it is timed.
Entry points: MeasureConfig (the protocol), MeasureInput, MeasureResult, Builder, Runner,
measure(builder, runner, inputs), WorkerStartError.

The worker is a plain subprocess (tuner/worker.py run as a script with `python -P`) talking
pickles over two dedicated pipes, not a multiprocessing "spawn" Process: spawn re-imports the
parent's __main__ in the child (the tuner CLI, or pytest, and through them jax), while the
worker needs only numpy and alt_jax._core; a subprocess of our own also gives us its process
group to kill and its exit status to name the signal that killed it.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import pathlib
import signal
import statistics
import subprocess
import sys
import time
from typing import Hashable, Sequence

import numpy as np

from alt_jax import device, records, runtime
from tuner import worker

_WORKER_SCRIPT = str(pathlib.Path(worker.__file__).resolve())
_ERROR_CHARS = 600  # MeasureResult.error is a summary for tables and records, not a log


@dataclasses.dataclass(frozen=True)
class MeasureConfig:
    """The measurement protocol, written down once.

    Per candidate, in one worker process, all within timeout_s (load, check and timing; the
    parent kills the worker past it):
      1. check: one call into a NaN-filled output, compared with the reference (see rtol);
         a mismatch is wrong_result and nothing is timed;
      2. `warmup` more untimed calls;
      3. probe: one untimed call, then one timed call. If best_so_far_s is known and the
         probe is slower than cut_factor x best_so_far_s, stop: the result is that one time
         with cut=True (a candidate that slow will not be chosen; repeats would be wasted);
      4. number = ceil(min_repeat_s / probe), in [1, max_number], so that each repeat lasts
         at least min_repeat_s (timer resolution and per-call noise amortised); then one
         untimed call and `repeat` repeats of `number` calls, each giving seconds per call.
         If the probe says the repeats would not fit in what is left of the time budget
         (70% of timeout_s), fewer repeats are run (down to reporting the probe alone);
      5. the output is checked again (a kernel wrong on later calls is wrong_result).
    The time of a candidate is the median of its repeats; spread = (max - min) / median.

    Cold weights (cold_bytes > 0): the inputs a MeasureInput marks cold (the op's weights,
    scale and shift: model parameters) are copied until the copies total cold_bytes (at most
    max_cold_copies), and the timed calls cycle through them, so each call reads its weights
    from memory. Inside a model that is what happens: the other ops' weights (100 MB for
    ResNet-50) evict an op's weights from the last-level cache before it runs again, while
    its activation input was just written by the op before it. Timed warm, a candidate whose
    packed weights are larger (Winograd's 16/9) or re-read more often looks faster than it is
    in the model (measured: ResNet-50's 7x7x512 Winograd conv, 0.36 ms warm, 1.31 ms in the
    model). Default: twice the last-level cache; 0 times everything warm.

    num_threads: the threads the kernel may use (as under XLA: one per core by default).
    rtol: max |out - ref| <= rtol * max(1, max |ref|) where ref is finite; where ref is inf
    or NaN the output must be the same; a NaN or inf output where ref is finite is wrong.
    """

    warmup: int = 0
    repeat: int = 5
    # 50 ms: a 5-repeat measurement of a fast kernel costs ~0.3 s, under the ~0.7 s its
    # build takes, while each repeat is still ~10^4 x the timer's resolution.
    min_repeat_s: float = 0.05
    max_number: int = 100_000
    timeout_s: float = 20.0
    cut_factor: float = 3.0
    num_threads: int = dataclasses.field(default_factory=lambda: os.cpu_count() or 1)
    rtol: float = 1e-4
    cold_bytes: int = dataclasses.field(
        default_factory=lambda: 2 * device.last_level_cache_bytes())
    max_cold_copies: int = 256

    def __post_init__(self):
        for name, low in (("warmup", 0), ("repeat", 1), ("max_number", 1), ("num_threads", 1),
                          ("cold_bytes", 0), ("max_cold_copies", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or value < low:
                raise ValueError(f"MeasureConfig.{name}={value!r}: must be an int >= {low}")
        for name in ("min_repeat_s", "timeout_s", "cut_factor", "rtol"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"MeasureConfig.{name}={value!r}: must be a number >= 0")
        if not self.timeout_s > 0:
            raise ValueError(f"MeasureConfig.timeout_s={self.timeout_s!r}: must be > 0")
        if not self.cut_factor >= 1:
            raise ValueError(f"MeasureConfig.cut_factor={self.cut_factor!r}: must be >= 1 "
                             f"(float('inf') never cuts)")


@dataclasses.dataclass(frozen=True, eq=False)
class MeasureInput:
    """One candidate: its source, exactly the arrays its kernel reads (C-contiguous float32,
    in the kernel's input order), the lax reference output, and the best median time measured
    so far for its workload (None: nothing yet; no cut). workload: optional key; measure()
    lowers best_so_far_s for later inputs of the same workload in the batch. cold: indices
    of the inputs that are model parameters, read cold when timed (MeasureConfig)."""

    source: runtime.KernelSource
    inputs: tuple
    expected: np.ndarray
    best_so_far_s: float | None = None
    workload: Hashable | None = None
    cold: tuple = ()

    def __post_init__(self):
        object.__setattr__(self, "inputs", tuple(self.inputs))
        object.__setattr__(self, "cold", tuple(sorted(set(self.cold))))
        if any(not 0 <= i < len(self.inputs) for i in self.cold):
            raise ValueError(f"MeasureInput for {self.source.symbol}: cold indices "
                             f"{self.cold} outside its {len(self.inputs)} inputs")
        for i, x in enumerate((*self.inputs, self.expected)):
            what = f"input {i}" if i < len(self.inputs) else "expected"
            if not isinstance(x, np.ndarray) or x.dtype != np.float32:
                raise ValueError(f"MeasureInput for {self.source.symbol}: {what} must be a "
                                 f"float32 numpy array, got {getattr(x, 'dtype', type(x))}")
            if not x.flags.c_contiguous:
                raise ValueError(f"MeasureInput for {self.source.symbol}: {what} must be "
                                 f"C-contiguous (np.ascontiguousarray)")


@dataclasses.dataclass(frozen=True)
class MeasureResult:
    """status: one of alt_jax.records.STATUSES. times_s: seconds per call, one per repeat
    (one entry if cut), empty unless ok. error: a short reason unless ok. build_s: seconds
    its compile took (0 when another source of the batch had the same code); run_s: seconds
    from sending it to the worker to the reply (or the kill), worker start excluded."""

    status: str
    times_s: tuple = ()
    error: str = ""
    cut: bool = False
    build_s: float = 0.0
    run_s: float = 0.0

    def __post_init__(self):
        if self.status not in records.STATUSES:
            raise ValueError(f"MeasureResult.status={self.status!r}: not one of "
                             f"{records.STATUSES}")
        if self.status == "ok" and not self.times_s:
            raise ValueError("MeasureResult: status ok needs at least one time")

    @property
    def median_s(self) -> float | None:
        return statistics.median(self.times_s) if self.status == "ok" else None

    @property
    def spread(self) -> float | None:
        """(max - min) / median of the repeats; None unless ok."""
        median = self.median_s
        if median is None:
            return None
        return (max(self.times_s) - min(self.times_s)) / median if median > 0 else 0.0


class WorkerStartError(RuntimeError):
    """The measuring worker could not be started: no candidate can be measured."""


def _short(text: str) -> str:
    text = text.strip()
    return text if len(text) <= _ERROR_CHARS else text[:_ERROR_CHARS - 3] + "..."


# ---- building


class Builder:
    """Compiles candidates in parallel through a KernelCache (threads: each compile is a g++
    subprocess). Sources with the same symbol and code compile once.

    There is no per-build timeout here: KernelCache's compile has its own (300 s, fixed in
    runtime.py) and a thread cannot abandon a g++ it started."""

    def __init__(self, cache: runtime.KernelCache, max_workers: int | None = None):
        self.cache = cache
        self.max_workers = max_workers or os.cpu_count() or 1

    def build(self, sources: Sequence[runtime.KernelSource]
              ) -> list[runtime.Kernel | runtime.BuildError]:
        """One Kernel or BuildError per source, in the order of sources."""
        return [result for result, _ in self.build_timed(sources)]

    def build_timed(self, sources: Sequence[runtime.KernelSource]
                    ) -> list[tuple[runtime.Kernel | runtime.BuildError, float]]:
        """As build, with the seconds each compile took (0.0 for a repeated source)."""
        first: dict[tuple[str, str], int] = {}  # (symbol, code) -> index of its first source
        for i, src in enumerate(sources):
            first.setdefault((src.symbol, src.code), i)
        unique = sorted(first.values())
        outcomes: dict[int, tuple] = {}
        if unique:
            with concurrent.futures.ThreadPoolExecutor(
                    max_workers=min(self.max_workers, len(unique))) as pool:
                futures = {i: pool.submit(self._build_one, sources[i]) for i in unique}
                outcomes = {i: f.result() for i, f in futures.items()}
        results = []
        for i, src in enumerate(sources):
            j = first[(src.symbol, src.code)]
            built, seconds = outcomes[j]
            if isinstance(built, runtime.Kernel):
                # Same library; the workspace size is the source's own.
                built = dataclasses.replace(built, workspace_bytes=src.workspace_bytes)
            results.append((built, seconds if i == j else 0.0))
        return results

    def _build_one(self, src: runtime.KernelSource):
        t0 = time.perf_counter()
        try:
            # the worker loads and verifies it; this process never maps candidates
            built = self.cache.build(src, load=False)
        except runtime.BuildError as e:
            built = e
        return built, time.perf_counter() - t0


# ---- running


class Runner:
    """Measures kernels, one at a time, in a persistent worker process (tuner/worker.py).

    A candidate that kills the worker (a signal, an exit) is "crash", one that outlives
    config.timeout_s is "timeout" (the worker's process group is killed); either way the next
    measure() starts a fresh worker. KeyboardInterrupt while waiting kills the worker and is
    re-raised. Use as a context manager, or call close(). Not for concurrent use."""

    def __init__(self, config: MeasureConfig | None = None, *, start_timeout_s: float = 60.0):
        self.config = config or MeasureConfig()
        self.start_timeout_s = start_timeout_s
        self._proc: subprocess.Popen | None = None
        self._req_w: int | None = None
        self._rep_r: int | None = None
        self.starts = 0  # workers started so far (1 + crashes and timeouts, roughly)
        self.start_s: float | None = None  # seconds the last worker took to be ready

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def worker_pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def measure(self, kernel: runtime.Kernel, inp: MeasureInput) -> MeasureResult:
        """Checks and times one built kernel per the protocol (build_s is left 0)."""
        request = {
            "lib": kernel.lib, "symbol": kernel.symbol,
            "workspace_bytes": kernel.workspace_bytes,
            "inputs": list(inp.inputs), "expected": inp.expected,
            "best_so_far_s": inp.best_so_far_s, "cold": list(inp.cold),
            "config": dataclasses.asdict(self.config),  # plain data: the worker has no tuner
        }
        try:
            return self._round_trip(request)
        except BaseException:  # KeyboardInterrupt (or a bug of ours) mid-candidate
            self._kill()
            raise

    def _round_trip(self, request: dict) -> MeasureResult:
        for attempt in range(2):
            self._ensure_started()
            t0 = time.perf_counter()
            deadline = time.monotonic() + self.config.timeout_s
            try:
                worker.send(self._req_w, request)
                break
            except BrokenPipeError:
                # It died while idle (killed from outside): not this candidate's doing.
                status = self._reap()
                if attempt == 1:
                    return MeasureResult("crash", error=f"worker died before the candidate "
                                                        f"ran: {status}")
        try:
            reply = worker.recv(self._rep_r, deadline)
        except TimeoutError:
            self._kill()
            return MeasureResult("timeout", error=f"no result within {self.config.timeout_s:g} s",
                                 run_s=time.perf_counter() - t0)
        except EOFError:
            status = self._reap()
            return MeasureResult("crash", error=status, run_s=time.perf_counter() - t0)
        return MeasureResult(reply["status"], times_s=tuple(reply["times"]),
                             error=_short(reply["error"]), cut=reply["cut"],
                             run_s=time.perf_counter() - t0)

    def close(self) -> None:
        """Stops the worker: closing its request pipe ends it; killed if it lingers."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        self._close_fds()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._kill_group(proc)
        except BaseException:
            self._kill_group(proc)
            raise

    # -- the worker's lifetime

    def _ensure_started(self) -> None:
        if self._proc is not None:
            return
        from alt_jax import _core  # the parent's extension: the worker loads this very file

        req_r, self._req_w = os.pipe()  # os.pipe: not inherited by other children (g++)
        self._rep_r, rep_w = os.pipe()
        t0 = time.perf_counter()
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-P", _WORKER_SCRIPT, _core.__file__, str(req_r), str(rep_w),
                 str(os.getpid())],
                pass_fds=(req_r, rep_w), stdin=subprocess.DEVNULL,
                start_new_session=True)  # its own process group, to kill; no terminal ^C
        except BaseException:
            self._close_fds()
            raise
        finally:
            os.close(req_r)
            os.close(rep_w)
        self.starts += 1
        try:
            hello = worker.recv(self._rep_r, time.monotonic() + self.start_timeout_s)
        except (EOFError, TimeoutError) as e:
            status = self._reap() if isinstance(e, EOFError) else "no answer"
            self._kill()
            raise WorkerStartError(
                f"the measuring worker ({_WORKER_SCRIPT}) did not start within "
                f"{self.start_timeout_s:g} s: {status}; its stderr is above") from e
        except BaseException:
            self._kill()
            raise
        if hello.get("status") != "ready":
            self._kill()
            raise WorkerStartError(f"the measuring worker answered {hello!r}, not ready")
        self.start_s = time.perf_counter() - t0

    def _reap(self) -> str:
        """After EOF from the worker: waits for it, returns how it ended, forgets it."""
        proc, self._proc = self._proc, None
        self._close_fds()
        if proc is None:
            return "worker gone"
        try:
            rc = proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # closed its pipe yet lives on: not to be trusted
            self._kill_group(proc)
            return "worker closed its pipe and hung; killed"
        return _exit_text(rc)

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        self._close_fds()
        if proc is not None:
            self._kill_group(proc)

    @staticmethod
    def _kill_group(proc: subprocess.Popen) -> None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the group: anything the kernel forked too
        except ProcessLookupError:
            pass
        proc.wait()

    def _close_fds(self) -> None:
        for name in ("_req_w", "_rep_r"):
            fd = getattr(self, name)
            if fd is not None:
                setattr(self, name, None)
                os.close(fd)


def _exit_text(rc: int) -> str:
    if rc < 0:
        try:
            name = signal.Signals(-rc).name
        except ValueError:
            name = f"signal {-rc}"
        return f"worker killed by {name}"
    return f"worker exited with status {rc}"


# ---- a batch


def measure(builder: Builder, runner: Runner,
            inputs: Sequence[MeasureInput]) -> list[MeasureResult]:
    """Builds the batch in parallel, then measures each built candidate in turn (never while
    building: compiles would steal the measured cores). One result per input, in order."""
    built = builder.build_timed([inp.source for inp in inputs])
    best: dict[Hashable, float] = {}
    results = []
    for inp, (kernel, build_s) in zip(inputs, built):
        if isinstance(kernel, runtime.BuildError):
            results.append(MeasureResult("build_error", error=_short(str(kernel)),
                                         build_s=build_s))
            continue
        if inp.workload in best and (inp.best_so_far_s is None
                                     or best[inp.workload] < inp.best_so_far_s):
            inp = dataclasses.replace(inp, best_so_far_s=best[inp.workload])
        result = dataclasses.replace(runner.measure(kernel, inp), build_s=build_s)
        if inp.workload is not None and result.status == "ok" and not result.cut:
            best[inp.workload] = min(result.median_s, best.get(inp.workload, float("inf")))
        results.append(result)
    return results
