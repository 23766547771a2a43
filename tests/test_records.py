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
    assert decision.knobs == NaiveKnobs(4) and decision.knobs_from == "tuned"
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


# -- malformed input: every bad line is skipped, one warning per file, nothing escapes ---------

_BAD_LINES = [
    b"1", b"[1, 2]", b"null", b'"text"', b"{not json", b"\xff\xfe\x80 not utf-8",
]


def _good(knobs=NaiveKnobs(4), dev=None, t=1e-3):
    return records.make_record("naive_matmul", SPEC, knobs, dev or device.fingerprint(), [t])


def _with_fields(**fields):
    rec = _good()
    rec.update(fields)
    return json.dumps(rec).encode()


@pytest.mark.parametrize("bad", _BAD_LINES + [
    _with_fields(knobs=None), _with_fields(times_s=5), _with_fields(times_s=["fast"]),
    _with_fields(knobs={"rows_per_task": {"nested": 1}}), _with_fields(status="great"),
    _with_fields(family=3), _with_fields(knobs={"rows_per_task": [[1]]}),
    _with_fields(workload_key=None), b'{"schema_version": 2, "family": "f", "device": %s}'
    % json.dumps(device.fingerprint()).encode(),
], ids=lambda b: b[:30].decode("latin-1"))
def test_malformed_lines_are_skipped_with_one_warning(tmp_path, bad):
    path = tmp_path / "r.jsonl"
    good = json.dumps(_good(NaiveKnobs(2))).encode()
    path.write_bytes(bad + b"\n" + good + b"\n" + bad + b"\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        store = records.RecordStore(path)
        assert store.best_knobs("naive_matmul", SPEC, device.fingerprint(),
                                NaiveKnobs) == NaiveKnobs(2)
        assert records.RecordStore(path).best("naive_matmul", SPEC, device.fingerprint())
    messages = [str(c.message) for c in caught]
    assert len(messages) == 1, messages  # one warning per file, however many lookups
    assert "skipped 2 malformed line(s)" in messages[0] and "[1, 3]" in messages[0]


def test_unreadable_paths_read_as_empty_with_a_warning(tmp_path):
    with pytest.warns(UserWarning, match="cannot be read"):
        assert records.RecordStore(tmp_path).best("naive_matmul", SPEC, "d") is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert records.RecordStore(tmp_path / "missing.jsonl").best("f", SPEC, "d") is None


def test_a_malformed_records_file_never_breaks_optimize(tmp_path, kernel_cache):
    path = tmp_path / "r.jsonl"
    path.write_bytes(b"\n".join(_BAD_LINES + [
        _with_fields(knobs={"rows_per_task": "four"}),  # wrong type: validate() refuses it
    ]) + b"\n")
    x = np.ones((8, 16), np.float32)
    w = np.ones((16, 16), np.float32)
    opt = alt_jax.optimize(lambda a, b: a @ b, families=FAMILIES, cache=kernel_cache,
                           min_flops=0, records=str(path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        decision = opt.plan_for(x, w).rewritten[0]
        np.testing.assert_allclose(opt(x, w), x @ w)
    assert decision.knobs == NaiveKnobs() and decision.knobs_from == "heuristic"


def test_append_refuses_a_malformed_record(tmp_path):
    with pytest.raises(ValueError, match="times_s"):
        records.RecordStore(tmp_path / "r.jsonl").append(dict(_good(), times_s=5))


def test_lookups_read_a_file_once_and_parse_only_this_devices_lines(tmp_path, monkeypatch):
    path = tmp_path / "r.jsonl"
    other = json.dumps(_good(dev="some-other-cpu")).encode() + b"\n"
    mine = json.dumps(_good(NaiveKnobs(2))).encode() + b"\n"
    path.write_bytes(other * 5000 + mine + other * 5000)
    parsed, opened = [], []
    real_loads, real_open = json.loads, open
    monkeypatch.setattr(records.json, "loads",  # counts record lines, not workload keys
                        lambda s: parsed.append("times_s" in s) or real_loads(s))
    monkeypatch.setattr("builtins.open",
                        lambda *a, **k: opened.append(a[0]) or real_open(*a, **k))
    dev = device.fingerprint()
    for _ in range(3):  # three optimize()s in one process: one read of the file
        assert records.RecordStore(path).best_knobs("naive_matmul", SPEC, dev,
                                                    NaiveKnobs) == NaiveKnobs(2)
    assert sum(parsed) == 1 and opened.count(str(path)) == 1
    records.RecordStore(path).append(_good(NaiveKnobs(8), t=1e-6))  # the file changed
    assert records.RecordStore(path).best_knobs("naive_matmul", SPEC, dev,
                                                NaiveKnobs) == NaiveKnobs(8)
    assert opened.count(str(path)) == 2


@pytest.mark.parametrize("family_name", ["conv2d", "depthwise", "winograd"])
def test_conv_specs_keep_the_keys_records_had_before_layouts(family_name):
    """Records made when specs held dimension numbers keep matching: a permutation layout
    is written as the dimension-number tuple, under the field name the spec had then."""
    import jax
    from jax import lax

    from alt_jax.ops import registry
    from alt_jax import records

    family = registry.families_by_name()[family_name]
    c = 8
    groups = c if family_name == "depthwise" else 1
    x = jax.ShapeDtypeStruct((1, 6, 6, c), np.float32)
    w = jax.ShapeDtypeStruct((3, 3, c // groups, c), np.float32)
    closed = jax.make_jaxpr(lambda x, w: lax.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=groups))(x, w)
    spec = family.match(closed.jaxpr.eqns[0])
    legacy = {"conv2d": ("lhs_spec", "rhs_spec", "out_spec"),
              "winograd": ("lhs_spec", "rhs_spec", "out_spec"),
              "depthwise": ("lhs_order", "rhs_order", "out_order")}[family_name]
    data = records.workload(spec)
    dn = closed.jaxpr.eqns[0].params["dimension_numbers"]
    assert [data[n] for n in legacy] == [list(dn.lhs_spec), list(dn.rhs_spec),
                                         list(dn.out_spec)]
    assert not any(k.endswith("_layout") for k in data)
