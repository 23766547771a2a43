"""tuner/cluster.py: tuning on a Ray cluster, placed by device kind, surviving a lost worker.

The cluster tests start a local multi-node Ray cluster (ray.cluster_utils.Cluster): a head
without devices and two nodes, each carrying the resource of one device kind (this CPU's
ISA and a narrower one it also runs, so both kinds measure for real here). Skipped where
ray is not installed; CI installs it (pip install '.[cluster]').
"""
import glob
import json
import os
import signal
import threading
import time

import pytest

from alt_jax import device
from tuner import cluster

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_a_device_kind_is_an_isa_here_or_a_fingerprint_elsewhere():
    here = cluster.DeviceKind.parse(device.detect_isa().name)
    assert here.fingerprint == device.fingerprint()
    other = cluster.DeviceKind.parse("cpu:Some Xeon|isa=avx2|cores=64")
    assert other.isa == "avx2" and other.fingerprint == "cpu:Some Xeon|isa=avx2|cores=64"
    assert other.resource.startswith(cluster.RESOURCE_PREFIX) and other.resource != here.resource
    assert cluster.node_resources([here, other]) == {here.resource: 1, other.resource: 1}
    with pytest.raises(ValueError, match="give an ISA name"):
        cluster.DeviceKind.parse("avx9000")
    with pytest.raises(ValueError, match="unknown ISA"):
        cluster.DeviceKind.parse("cpu:X|isa=mmx|cores=1")


def _kinds() -> list:
    """This machine's ISA and the next narrower one it also runs."""
    order = ["avx512", "avx2", "sse2"]
    top = device.detect_isa().name
    if top not in order[:2]:
        pytest.skip(f"needs an x86 CPU with AVX2 or better (have {top})")
    lower = order[order.index(top) + 1]
    return [cluster.DeviceKind.parse(top), cluster.DeviceKind.parse(lower)]


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    ray = pytest.importorskip("ray", reason="ray is an optional dependency: pip install "
                                            "'.[cluster]'")
    from ray.cluster_utils import Cluster

    saved = os.environ.get("ALT_JAX_CACHE_DIR")
    # the nodes' workers inherit this: a private kernel cache for the module
    os.environ["ALT_JAX_CACHE_DIR"] = str(tmp_path_factory.mktemp("cluster_kernels"))
    kinds = _kinds()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    nodes = {k: c.add_node(num_cpus=1, resources=cluster.node_resources([k])) for k in kinds}
    c.wait_for_nodes()
    cwd = os.getcwd()
    os.chdir(ROOT)  # benchmarks.models, as alt-tune --model finds it
    cluster.connect(c.address, pythonpath=ROOT)
    try:
        yield c, kinds, {k: n.node_id for k, n in nodes.items()}
    finally:
        ray.shutdown()
        c.shutdown()
        os.chdir(cwd)
        if saved is None:
            os.environ.pop("ALT_JAX_CACHE_DIR", None)
        else:
            os.environ["ALT_JAX_CACHE_DIR"] = saved


SOURCE = cluster.WorkloadSource(model="tiny_cnn")


def _workloads():
    return SOURCE.workloads()


def _options(**kw):
    from tuner.tune import TuneOptions

    return TuneOptions(**{"batch": 2, "confirm": 0, **kw})


def _records(path) -> list:
    from alt_jax.records import check_record

    recs = [json.loads(line) for line in open(path).read().splitlines()]
    assert all(check_record(r) is None for r in recs)
    return recs


def test_two_device_kinds_tune_on_their_own_nodes(ray_cluster, tmp_path):
    from alt_jax.records import RecordStore

    _, kinds, node_of = ray_cluster
    workloads = _workloads()
    store = RecordStore(tmp_path / "r.jsonl")
    trials = len(workloads) + 16  # past the cost model's 12 samples: it is fitted and shipped
    outcome = cluster.tune_on_cluster(workloads, SOURCE, kinds, store,
                                      _options(trials=trials, batch=4))
    recs = _records(store.path)
    for kind in kinds:
        summary, measurer = outcome[kind]
        mine = [r for r in recs if r["device"] == kind.fingerprint]
        assert len(mine) == trials == sum(t.trials for t in summary.tasks)
        # every workload's heuristic measured for this kind, all of it on the kind's node
        assert {r["op_key"] for r in mine if r["heuristic"]} == {w.op_key for w in workloads}
        assert measurer.placements and {b.node for b in measurer.placements} == {node_of[kind]}
        # the nodes searched with the driver's model: one copy per fit in the object store
        assert True in measurer.shipped and len(measurer.shipped) < len(measurer.placements)
        assert {r["stage"] for r in mine} >= {"heuristic", "explore"}
    # the records are those a local run writes: optimize() takes its knobs from them for
    # this machine's kind (kinds[0])
    import jax

    import alt_jax
    from benchmarks import models

    model = models.build("tiny_cnn")
    plan = alt_jax.optimize(jax.jit(model.apply), fallback="silent", records=str(store.path)
                            ).prepare(model.params).plan_for(*model.inputs)
    on_kernels = [d for d in plan.decisions if d.on_kernel]
    assert on_kernels and all(d.knobs_from == "tuned" for d in on_kernels), str(plan)


def _running_batch_pid(timeout_s=120.0):
    """The pid of a Ray worker running a batch (Ray titles it ray::<function>)."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        for path in glob.glob("/proc/[0-9]*/cmdline"):
            try:
                with open(path, "rb") as f:
                    cmd = f.read()
            except OSError:
                continue
            if cmd.startswith((b"ray::measure_batch", b"ray::search_batch")):
                return int(path.split("/")[2])
        time.sleep(0.05)
    raise AssertionError("no measure_batch task started")


def _tune_in_background(workloads, kind, store, trials: int, seed: int) -> tuple:
    """tune_on_cluster for one kind in a thread: (the thread, its outcome once done)."""
    done: dict = {}
    run = threading.Thread(target=lambda: done.update(cluster.tune_on_cluster(
        workloads, SOURCE, [kind], store, _options(trials=trials, seed=seed))))
    run.start()
    return run, done


def test_a_worker_killed_mid_batch_costs_a_retry_not_the_run(ray_cluster, tmp_path):
    from alt_jax.records import RecordStore

    _, kinds, _ = ray_cluster
    kind = kinds[0]
    workloads = _workloads()
    store = RecordStore(tmp_path / "r.jsonl")
    trials = len(workloads) + 6
    run, done = _tune_in_background(workloads, kind, store, trials, seed=1)
    pid = _running_batch_pid()
    os.kill(pid, signal.SIGKILL)
    run.join(timeout=600)
    assert not run.is_alive() and kind in done
    summary, measurer = done[kind]
    recs = _records(store.path)
    # complete: every trial recorded once, every workload tuned past its heuristic
    assert len(recs) == trials == sum(t.trials for t in summary.tasks)
    keys = [(r["op_key"], json.dumps(r["knobs"], sort_keys=True), r["family"]) for r in recs]
    assert len(set(keys)) == len(keys)
    assert {r["op_key"] for r in recs if r["heuristic"]} == {w.op_key for w in workloads}
    assert pid not in {b.pid for b in measurer.placements}  # the batch reran elsewhere


def test_a_device_kind_without_a_node_fails_at_once(ray_cluster, tmp_path):
    from alt_jax.records import RecordStore

    nowhere = cluster.DeviceKind.parse("cpu:No Such CPU|isa=avx2|cores=96")
    start = time.monotonic()
    with pytest.raises(cluster.ClusterError, match="no node of the cluster can measure") as e:
        cluster.tune_on_cluster(_workloads(), SOURCE, [nowhere], RecordStore(tmp_path / "r"),
                                _options(trials=4))
    assert time.monotonic() - start < 30
    assert nowhere.resource in str(e.value) and "ray start" in str(e.value)
    assert not os.path.exists(tmp_path / "r")  # nothing tuned, nothing written


def test_a_mislabelled_node_refuses_to_measure(ray_cluster):
    """A node whose resource names another device kind must not record its timings as
    that kind's: the batch fails with the reason."""
    kind = cluster.DeviceKind(device.detect_isa().name, "cpu:Other|isa="
                              + device.detect_isa().name + "|cores=1")
    with pytest.raises(cluster.ClusterError, match="this node is"):
        cluster.measure_batch(SOURCE, "op", kind, [], None, None, 0)


def test_alt_tune_cluster_command_line(ray_cluster, tmp_path, capsys):
    from tuner import cli

    c, kinds, _ = ray_cluster
    path = tmp_path / "r.jsonl"
    n = len(_workloads())
    code = cli.main(["alt-tune", "tune", "--model=tiny_cnn", f"--cluster={c.address}",
                     "--devices=" + ",".join(k.isa for k in kinds), f"--trials={n + 2}",
                     "--batch=2", f"--records={path}"])
    out, err = capsys.readouterr()
    assert code == 0, err
    for k in kinds:
        assert f"== {k.fingerprint}: " in out and k.resource in out
    assert out.count("Ray's share per batch") == len(kinds)
    recs = _records(path)
    assert {r["device"] for r in recs} == {k.fingerprint for k in kinds}
    assert {r["model"] for r in recs} == {"tiny_cnn-nhwc"}


def test_alt_tune_node_prints_the_resources_to_start_a_node_with(capsys):
    from tuner import cli

    assert cli.main(["alt-tune", "node", "--devices=avx2"]) == 0
    out = capsys.readouterr().out
    kind = cluster.DeviceKind.parse("avx2")
    assert f"# {kind.fingerprint}" in out
    assert f"--resources='{{\"{kind.resource}\": 1}}'" in out
    assert cli.main(["alt-tune", "tune", "--model=tiny_cnn", "--devices=avx2"]) == 2


def test_ctrl_c_on_the_driver_leaves_whole_records_and_a_rerun_resumes(ray_cluster, tmp_path):
    import subprocess
    import sys

    c, kinds, _ = ray_cluster
    path = tmp_path / "r.jsonl"
    cmd = [sys.executable, "-m", "tuner", "tune", "--model=tiny_cnn", f"--cluster={c.address}",
           f"--devices={kinds[0].isa}", "--batch=2", f"--records={path}"]
    proc = subprocess.Popen(cmd + ["--trials=200"], cwd=ROOT, env=dict(os.environ),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    end = time.monotonic() + 300
    while time.monotonic() < end and (not path.exists() or len(_records(path)) < 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "Resume with the same command" in err
    trials = [r for r in _records(path) if r["stage"] != "confirm"]  # every line whole
    assert len(trials) >= 3
    # the rerun counts what is there toward --trials and measures only the rest
    done = subprocess.run(cmd + [f"--trials={len(trials) + 2}"], cwd=ROOT, env=dict(os.environ),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    again = [r for r in _records(path) if r["stage"] != "confirm"]
    assert len(again) == len(trials) + 2
    keys = [(r["op_key"], json.dumps(r["knobs"], sort_keys=True), r["family"]) for r in again]
    assert len(set(keys)) == len(keys)


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def _raylet_pid(node) -> int:
    from ray._private import ray_constants

    return node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid


# The two tests below change the module's cluster (they remove nodes): they run last.
def test_a_node_lost_mid_batch_costs_a_retry_on_another_node(ray_cluster, tmp_path):
    from alt_jax.records import RecordStore

    c, kinds, node_of = ray_cluster
    kind = kinds[0]
    spare = c.add_node(num_cpus=1, resources=cluster.node_resources([kind]))
    c.wait_for_nodes()
    nodes = [n for n in c.worker_nodes if n.node_id in (node_of[kind], spare.node_id)]
    workloads = _workloads()
    store = RecordStore(tmp_path / "r.jsonl")
    trials = len(workloads) + 4
    run, done = _tune_in_background(workloads, kind, store, trials, seed=2)
    raylet = _parent(_running_batch_pid())
    (busy,) = [n for n in nodes if _raylet_pid(n) == raylet]
    c.remove_node(busy)
    run.join(timeout=600)
    assert not run.is_alive() and kind in done
    summary, measurer = done[kind]
    recs = _records(store.path)
    assert len(recs) == trials == sum(t.trials for t in summary.tasks)
    assert {r["op_key"] for r in recs if r["heuristic"]} == {w.op_key for w in workloads}
    assert busy.node_id not in {b.node for b in measurer.placements}


def test_losing_the_last_node_of_a_kind_fails_the_run_at_once(ray_cluster, tmp_path):
    from alt_jax.records import RecordStore

    c, kinds, node_of = ray_cluster
    kind = kinds[1]
    (only,) = [n for n in c.worker_nodes if n.node_id == node_of[kind]]
    store = RecordStore(tmp_path / "r.jsonl")
    failed: dict = {}

    def run():
        try:
            cluster.tune_on_cluster(_workloads(), SOURCE, [kind], store,
                                    _options(trials=len(_workloads()) + 20, seed=3))
        except cluster.ClusterError as e:
            failed["error"] = e

    t = threading.Thread(target=run)
    t.start()
    _running_batch_pid()
    c.remove_node(only)
    gone = time.monotonic()
    t.join(timeout=120)
    assert not t.is_alive() and "left the cluster" in str(failed.get("error"))
    assert time.monotonic() - gone < 60
    written = _records(store.path) if os.path.exists(store.path) else []
    for rec in written:  # what was written before is whole
        assert rec["device"] == kind.fingerprint
