"""Tuning on a Ray cluster: each batch of a workload's candidates is built and measured on a
node that carries the device kind being tuned for, and the records come back to the driver.

Entry points: DeviceKind (a device to tune for: ISA + fingerprint, and the Ray resource
naming it), node_resources(kinds), WorkloadSource (how a node rebuilds the workloads),
RayMeasurer (tune()'s measurer, run remotely), tune_on_cluster(...), ClusterError.

Placement: a node that can measure for a device kind is started with one unit of the
resource DeviceKind.resource (`ray start --resources='{"alt_device_<hash>": 1}'`,
node_resources prints it). Every batch asks for one unit, so a node measures one batch at a
time (timings stay clean) while the batch's kernels are built in parallel there, and
batches of different device kinds run on their nodes at once. The task scheduler and the
cost model's training stay with the driver, one tune() per device kind (tuner/tune.py: the
same records, the same resume); each round's model goes into Ray's object store once and
the nodes rank their search's proposals with it (search_batch). What travels is the
workload's source (the node rebuilds and caches the workloads), the search's state (the
choices measured so far), the model, and the proposed candidates with their results.
Faults: a node or worker lost mid-batch costs that batch a retry (Ray's task retries; the
driver writes records only from results, so a retried batch records once); a device kind no
node carries fails at once, and so does one whose last node is gone while a batch waits.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import threading
import time
from typing import Optional, Sequence

from alt_jax import device

RESOURCE_PREFIX = "alt_device_"
_RETRIES = 3          # Ray task retries of a batch whose node or worker died
_POLL_S = 2.0         # how often a waiting batch checks that its device kind still has a node


class ClusterError(RuntimeError):
    """The cluster cannot tune what was asked (no node for a device kind, ray missing)."""


@dataclasses.dataclass(frozen=True)
class DeviceKind:
    """A device to tune for: the ISA kernels are generated for and the fingerprint its
    records carry (alt_jax.device.fingerprint on that machine)."""

    isa: str
    fingerprint: str

    def __post_init__(self):
        if self.isa not in device.ISAS:
            raise ValueError(f"device kind {self.fingerprint!r}: unknown ISA {self.isa!r} "
                             f"(one of {', '.join(device.ISAS)})")

    @property
    def target(self) -> device.Isa:
        """What kernels are generated for (tune()'s device_kind reads it)."""
        return device.ISAS[self.isa]

    @property
    def resource(self) -> str:
        """The Ray resource a node carries to measure for this kind."""
        digest = hashlib.sha256(self.fingerprint.encode()).hexdigest()[:16]
        return RESOURCE_PREFIX + digest

    @classmethod
    def parse(cls, text: str) -> "DeviceKind":
        """An ISA name (this machine's CPU generating that ISA) or a full fingerprint
        "cpu:MODEL|isa=NAME|cores=N" (another machine's)."""
        if text in device.ISAS:
            return cls(text, device.fingerprint(device.ISAS[text]))
        fields = dict(part.split("=", 1) for part in text.split("|")[1:] if "=" in part)
        if not text.startswith("cpu:") or "isa" not in fields:
            raise ValueError(f"device {text!r}: give an ISA name ({', '.join(device.ISAS)}) "
                             f"or a fingerprint like {device.fingerprint()!r}")
        return cls(fields["isa"], text)


def node_resources(kinds: Sequence[DeviceKind]) -> dict:
    """The custom resources a node measuring for these kinds starts with."""
    return {k.resource: 1 for k in kinds}


@dataclasses.dataclass(frozen=True)
class WorkloadSource:
    """What a node needs to rebuild the driver's workloads: a zoo model (benchmarks.models,
    as `alt-tune tune --model` traces it) or MODULE:FUNCTION with input shapes and dtypes.
    The node runs the same alt_jax checkout (its path on PYTHONPATH)."""

    model: Optional[str] = None
    layout: str = "nhwc"
    batch: int = 1
    layouts: tuple = ()
    function: Optional[str] = None
    shapes: tuple = ()
    dtypes: tuple = ()

    def workloads(self) -> list:
        from tuner import cli

        if self.model:
            models, _ = cli._benchmarks()
            return cli.bound_workloads(models.build(self.model, layout=self.layout,
                                                    batch=self.batch), self.layouts)
        from tuner.tune import workloads_of

        inputs = cli.example_inputs(list(self.shapes), list(self.dtypes))
        return workloads_of(cli.load_function(self.function), *inputs)


# ---- on a node -----------------------------------------------------------------------------
_NODE_STATE: dict = {}  # per worker process: (source, isa, config, seed) -> (workloads, measurer)
_NODE_LOCK = threading.Lock()


def _node(source: WorkloadSource, op_key: str, kind: DeviceKind, config, seed: int) -> tuple:
    """(the workload op_key, this worker process's KernelMeasurer) for a source and kind, the
    workloads and measurer built once per process; ClusterError on a node whose own device
    is not `kind`, or whose checkout does not have the workload."""
    from alt_jax import runtime
    from tuner.tune import KernelMeasurer

    here = device.fingerprint(kind.target)
    if here != kind.fingerprint:
        raise ClusterError(f"this node is {here!r}, not the {kind.fingerprint!r} its resource "
                           f"{kind.resource} says: start it with the resources of its own "
                           f"device kind (tuner.cluster.node_resources)")
    key = (source, kind, config, seed)
    with _NODE_LOCK:
        state = _NODE_STATE.get(key)
        if state is None:
            workloads = {w.op_key: w for w in source.workloads()}
            cache = runtime.KernelCache(runtime.default_cache().cache_dir, isa=kind.target)
            state = _NODE_STATE[key] = (workloads, KernelMeasurer(cache, cache.isa, config,
                                                                  seed))
    workloads, measurer = state
    if op_key not in workloads:
        raise ClusterError(f"workload {op_key} is not one of {source}'s on this node: does it "
                           f"run the driver's alt_jax checkout?")
    return workloads[op_key], measurer


def _reply(results, start: float, **extra) -> dict:
    import ray

    return {"results": results, "node": ray.get_runtime_context().get_node_id(),
            "pid": os.getpid(), "seconds": time.perf_counter() - start, **extra}


def measure_batch(source: WorkloadSource, op_key: str, kind: DeviceKind, candidates: list,
                  best_so_far_s, config, seed: int) -> dict:
    """Runs on a node (a Ray task): builds and measures candidates [(family name, spec,
    knobs)] of the workload op_key, as the local tuner would. Returns {"results":
    [MeasureResult], "node": Ray node id, "pid": this worker's pid, "seconds": time here}."""
    from alt_jax.ops import registry

    start = time.perf_counter()
    workload, measurer = _node(source, op_key, kind, config, seed)
    families = registry.families_by_name()
    results = measurer(workload, [(families[f], spec, knobs) for f, spec, knobs in candidates],
                       best_so_far_s)
    return _reply(results, start)


def search_batch(source: WorkloadSource, op_key: str, kind: DeviceKind, mode: str, state, n: int,
                 best_so_far_s, model, config, seed: int) -> dict:
    """Runs on a node (a Ray task): the search (tuner.tune.SearchState) proposes up to n new
    candidates of op_key, ranked by `model` (the driver's cost model of this round, from
    Ray's object store), and they are built and measured here. Returns measure_batch's
    reply with "proposed": [(Choice, stage)] in the order of "results"."""
    from tuner.space import JointSpace

    start = time.perf_counter()
    workload, measurer = _node(source, op_key, kind, config, seed)
    space = JointSpace(workload, kind.target, mode)
    proposed = [(c, stage) for c, stage in state.search(space, model).propose(n)
                if c not in state.measured]
    results = measurer(workload, [(space.family(c), space.spec(c), c.knobs)
                                  for c, _ in proposed], best_so_far_s) if proposed else []
    return _reply(results, start, proposed=proposed)


# ---- on the driver -------------------------------------------------------------------------
def _ray():
    try:
        import ray
    except ImportError:
        raise ClusterError("--cluster=ray needs ray: pip install '.[cluster]' (or "
                           "pip install ray)") from None
    return ray


def connect(address: Optional[str], pythonpath: Optional[str] = None,
            kinds: Sequence[DeviceKind] = ()):
    """ray.init to address, with the alt_jax checkout on the workers' PYTHONPATH, and returns
    the ray module. "ray" (or None): the cluster RAY_ADDRESS names or one running on this
    machine, else a new one-node cluster carrying the resources of `kinds` (this machine
    measures for them); "ray://HOST:PORT" or "HOST:PORT": that cluster."""
    ray = _ray()
    if ray.is_initialized():
        return ray
    env = {"env_vars": {"PYTHONPATH": pythonpath or os.getcwd()}}
    if address not in (None, "", "ray"):
        ray.init(address=address, runtime_env=env, log_to_driver=False)
        return ray
    try:
        ray.init(address="auto", runtime_env=env, log_to_driver=False)
    except ConnectionError:
        ray.init(resources=node_resources(kinds), runtime_env=env, log_to_driver=False)
    return ray


def check_kinds(kinds: Sequence[DeviceKind]) -> None:
    """ClusterError at once for any kind no node of the cluster carries."""
    ray = _ray()
    have = ray.cluster_resources()
    missing = [k for k in kinds if have.get(k.resource, 0) < 1]
    if missing:
        present = sorted(r for r in have if r.startswith(RESOURCE_PREFIX))
        raise ClusterError(
            "no node of the cluster can measure for " + "; ".join(
                f"{k.fingerprint!r} (resource {k.resource})" for k in missing)
            + f". Nodes carry {present or 'no device resources'}; start one on such a "
            f"machine with `ray start --address=... --resources='"
            f"{{\"{missing[0].resource}\": 1}}'` (tuner.cluster.node_resources)")


@dataclasses.dataclass(frozen=True)
class BatchRun:
    """Where and how long one batch ran: wall_s from submitting to the results on the driver,
    node_s inside measure_batch on the node (the rest is Ray's: scheduling, transfers)."""

    op_key: str
    node: str
    pid: int
    wall_s: float
    node_s: float


class RayMeasurer:
    """tune()'s measurer for one device kind: each batch is a Ray task placed on a node that
    carries the kind's resource. placements: a BatchRun per batch, in order."""

    def __init__(self, source: WorkloadSource, kind: DeviceKind, config, seed: int = 0,
                 stop: Optional[threading.Event] = None):
        ray = _ray()
        self.source, self.kind, self.config, self.seed = source, kind, config, seed
        self.stop = stop or threading.Event()
        self.placements: list = []
        self.shipped: list = []  # per model version put in the object store: was it fitted
        self._model_ref, self._model_version = None, None
        placed = dict(resources={kind.resource: 1}, num_cpus=1, max_retries=_RETRIES)
        self._measure = ray.remote(measure_batch).options(**placed)
        self._search = ray.remote(search_batch).options(**placed)

    def __call__(self, workload, candidates: list, best_so_far_s) -> list:
        """Measures given candidates there (the heuristic's, a confirmation pass)."""
        cands = [(family.name, spec, knobs) for family, spec, knobs in candidates]
        return self._run(workload, self._measure, cands, best_so_far_s, self.config,
                         self.seed)["results"]

    def search_and_measure(self, workload, mode: str, state, n: int, best_so_far_s, model,
                           model_version: int) -> list:
        """tune()'s search step run there: [(Choice, stage, MeasureResult)]. The model goes
        into Ray's object store once per version (each round's fit), and every batch of
        the round reads that one copy."""
        ray = _ray()
        if model_version != self._model_version:
            self._model_ref, self._model_version = ray.put(model), model_version
            self.shipped.append(model.fitted)
        out = self._run(workload, self._search, mode, state, n, best_so_far_s,
                        self._model_ref, self.config, self.seed)
        return [(c, stage, r) for (c, stage), r in zip(out["proposed"], out["results"])]

    def _run(self, workload, remote, *args) -> dict:
        ray = _ray()
        start = time.perf_counter()
        ref = remote.remote(self.source, workload.op_key, self.kind, *args)
        while True:
            if self.stop.is_set():
                ray.cancel(ref, force=True)
                raise KeyboardInterrupt
            ready, _ = ray.wait([ref], timeout=_POLL_S)
            if ready:
                break
            if ray.cluster_resources().get(self.kind.resource, 0) < 1:
                ray.cancel(ref, force=True)
                raise ClusterError(f"no node can measure for {self.kind.fingerprint!r} any "
                                   f"more (resource {self.kind.resource} left the cluster)")
        out = ray.get(ref)
        self.placements.append(BatchRun(workload.op_key, out["node"], out["pid"],
                                        time.perf_counter() - start, out["seconds"]))
        return out

    def close(self) -> None:
        pass


def tune_on_cluster(workloads: list, source: WorkloadSource, kinds: Sequence[DeviceKind],
                    store, options, *, address: Optional[str] = None) -> dict:
    """Tunes workloads for every device kind at once, each on its nodes, into store (one
    records file; each record names its device). Returns {DeviceKind: (TuneSummary,
    RayMeasurer)}. Ctrl-C stops every kind's run (records stay whole: one append each) and
    re-raises; a kind's failure (ClusterError) is raised after the others finish."""
    from tuner.tune import tune

    connect(address, kinds=kinds)
    check_kinds(kinds)
    stop = threading.Event()
    outcome: dict = {}

    def run(kind: DeviceKind) -> None:
        measurer = RayMeasurer(source, kind, options.measure, options.seed, stop)
        try:
            outcome[kind] = (tune(workloads, store, options, measurer=measurer,
                                  device_kind=kind), measurer)
        except BaseException as e:  # noqa: BLE001 - reported by the driver thread
            outcome[kind] = (e, measurer)

    threads = [threading.Thread(target=run, args=(k,), daemon=True) for k in kinds]
    for t in threads:
        t.start()
    try:
        while any(t.is_alive() for t in threads):
            time.sleep(0.2)
    except KeyboardInterrupt:
        stop.set()
        for t in threads:
            t.join()
        raise
    for kind, (result, _) in outcome.items():
        if isinstance(result, BaseException):
            raise result
    return outcome
