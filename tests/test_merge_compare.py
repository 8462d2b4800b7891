"""bench/merge_compare.py joins two `spap compare` files of the same tokens; a run that MAIN
already holds lends MAIN its second-text perplexities only when it gave the same perplexity."""

from __future__ import annotations

import json

import pytest

from conftest import bench_script


@pytest.fixture(scope="module")
def merge():
    return bench_script("merge_compare")


def _file(records, also=None):
    protocol = {x: {"token_hash": x[0] * 64} for x in ("calibration", "eval", "probe")}
    d = {"model": "m", "dense_ppl": 16.0, "protocol": protocol, "records": records,
         "variants": [{"name": r["method"]} for r in records], "sparsities": [0.5]}
    if also:
        d["dense_ppl_also"] = also
    return d


def _rec(method, ppl, also=None):
    r = {"method": method, "sparsity": 0.5, "ppl": ppl}
    if also is not None:
        r["ppl_also"] = also
    return r


def _run(merge, tmp_path, main, extra):
    a, b = tmp_path / "main.json", tmp_path / "extra.json"
    a.write_text(json.dumps(main))
    b.write_text(json.dumps(extra))
    assert merge.main(str(a), str(b)) == 0
    assert not b.exists()
    return json.loads(a.read_text())


def test_a_rerun_with_the_same_perplexity_lends_its_second_text(merge, tmp_path):
    main = _file([_rec("obs", 40.0), _rec("spap", 30.0, {"lambada": 90.0})])
    extra = _file([_rec("obs", 40.0 * (1 + 1e-7), {"lambada": 120.0}), _rec("fasp", 41.0)],
                  also={"lambada": 44.0})
    out = _run(merge, tmp_path, main, extra)
    by = {r["method"]: r for r in out["records"]}
    assert by["obs"]["ppl"] == 40.0  # MAIN's own record stays, with the second text added
    assert by["obs"]["ppl_also"] == {"lambada": 120.0}
    assert by["spap"]["ppl_also"] == {"lambada": 90.0}
    assert out["dense_ppl_also"] == {"lambada": 44.0}
    assert "fasp" in by  # new runs are added as before


def test_a_run_with_another_perplexity_lends_nothing(merge, tmp_path):
    main = _file([_rec("obs", 40.0)])
    extra = _file([_rec("obs", 40.5, {"lambada": 120.0})], also={"lambada": 44.0})
    out = _run(merge, tmp_path, main, extra)
    (obs,) = out["records"]
    assert "ppl_also" not in obs and "dense_ppl_also" not in out
