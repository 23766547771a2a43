"""The record store: round trip, best pick, compaction, bad lines, knob mismatch."""
import json
import warnings

import numpy as np
import pytest

import alt_jax
from alt_jax import device, records
from naive_family import FAMILIES, NaiveKnobs, NaiveSpec

SPEC = NaiveSpec(8, 16, 16)


def test_round_trip_and_best(tmp_path):
    store = records.RecordStore(tmp_path / "r.jsonl")
    dev = device.fingerprint()
    store.append(records.make_record("naive_matmul", SPEC, NaiveKnobs(2), dev, [3e-3, 2e-3]))
    store.append(records.make_record("naive_matmul", SPEC, NaiveKnobs(4), dev, [1e-3, 1e-3]))
    store.append(records.make_record("naive_matmul", SPEC, NaiveKnobs(8), dev, [], "build_error"))
    store.append(records.make_record("naive_matmul", SPEC, NaiveKnobs(1), "other-cpu", [1e-6]))
    reloaded = records.RecordStore(tmp_path / "r.jsonl")
    assert len(reloaded.records()) == 4
    assert reloaded.best_knobs("naive_matmul", SPEC, dev, NaiveKnobs) == NaiveKnobs(4)
    assert reloaded.best_knobs("naive_matmul", NaiveSpec(1, 2, 3), dev, NaiveKnobs) is None


def test_bad_lines_are_skipped_and_compaction_keeps_the_best(tmp_path):
    path = tmp_path / "r.jsonl"
    store = records.RecordStore(path)
    dev = device.fingerprint()
    for rows, t in ((1, 5e-3), (2, 1e-3), (3, 9e-3)):
        store.append(records.make_record("naive_matmul", SPEC, NaiveKnobs(rows), dev, [t]))
    with open(path, "a") as f:
        f.write("{not json\n")
    with pytest.warns(UserWarning, match="not JSON"):
        assert len(records.RecordStore(path).records()) == 3
        store.compact()
    lines = path.read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["knobs"] == {"rows_per_task": 2}


def test_unknown_status_rejected():
    with pytest.raises(ValueError, match="status"):
        records.make_record("f", SPEC, NaiveKnobs(), "d", [1.0], status="great")


def test_optimize_uses_records_and_rejects_invalid_ones(tmp_path, kernel_cache):
    path = tmp_path / "r.jsonl"
    store = records.RecordStore(path)
    dev = device.fingerprint()
    store.append(records.make_record("naive_matmul", SPEC, NaiveKnobs(4), dev, [1e-3]))
    x = np.ones((8, 16), np.float32)
    w = np.ones((16, 16), np.float32)
    opt = alt_jax.optimize(lambda a, b: a @ b, families=FAMILIES, cache=kernel_cache,
                           min_flops=0, records=str(path))
    decision = opt.plan_for(x, w).rewritten[0]
    assert decision.knobs == NaiveKnobs(4) and decision.knobs_from == "records"
    np.testing.assert_allclose(opt(x, w), x @ w)
    # A record whose knobs are illegal (rows_per_task > m) is refused with a warning.
    store.append(records.make_record("naive_matmul", SPEC, NaiveKnobs(99), dev, [1e-9]))
    opt = alt_jax.optimize(lambda a, b: a @ b, families=FAMILIES, cache=kernel_cache,
                           min_flops=0, records=str(path))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        decision = opt.plan_for(x, w).rewritten[0]
    assert decision.knobs == NaiveKnobs() and decision.knobs_from == "heuristic"
    assert any("not valid here" in str(c.message) for c in caught)
