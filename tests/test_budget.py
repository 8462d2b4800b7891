"""`--params F`: the split between MLP channels and heads meets the budget, `auto` keeps the
split with the lowest held-out calibration perplexity, and bad budgets are refused."""

from __future__ import annotations

import copy

import pytest
import torch

import spap
from conftest import random_ids, run_cli, tiny_model
from spap.driver.budget import candidate_splits, count_non_embedding, count_params
from spap.errors import SpapError
from spap.models import get_adapter

IDS = random_ids(16, 24, seed=1)


@pytest.mark.parametrize("family", ["llama", "qwen2", "phi3"])
@pytest.mark.parametrize("split", ["mlp", "heads", "kv"])
@pytest.mark.parametrize("of", ["all", "non-embedding"])
def test_each_split_removes_what_it_says_close_to_the_budget(family, split, of):
    model = tiny_model(family)
    base = count_params(model) if of == "all" else count_non_embedding(model)
    (cand,) = candidate_splits(model, get_adapter(model.config), 0.2, of, split)
    res = spap.prune(model, calib_ids=IDS, params=0.2, params_of=of, params_split=split,
                     method="obs", batch_size=4)
    after = count_params(model) if of == "all" else count_non_embedding(model)
    # the counted prediction is exact; the budget is met to one MLP channel per layer
    assert 1 - after / base == pytest.approx(cand.removed_frac, abs=1e-12)
    layers = len(get_adapter(model.config).layers(model))
    per_channel = 3 * model.config.hidden_size  # gate, up rows and a down column
    assert abs(cand.removed_frac - 0.2) * base <= layers * per_channel / 2 + 1
    assert res.report["params_target"]["chosen"] == split
    if split != "mlp":
        assert res.report["heads"] is not None


def test_auto_keeps_the_lowest_heldout_perplexity_and_equals_pruning_with_that_split():
    model = tiny_model("llama")
    res = spap.prune(model, calib_ids=IDS, params=0.2, method="obs", batch_size=4,
                     params_split="auto")
    target = res.report["params_target"]
    ppl = {c["name"]: c["heldout_calibration_ppl"] for c in target["candidates"]}
    assert set(ppl) == {"mlp", "heads", "kv"}
    assert target["chosen"] == min(ppl, key=ppl.get)
    chosen = next(c for c in target["candidates"] if c["name"] == target["chosen"])
    again = tiny_model("llama")
    spap.prune(again, calib_ids=IDS, method="obs", batch_size=4, sparsity=chosen["sparsity"],
               heads=chosen["heads"], kv_groups=chosen["kv_groups"])
    sa, sb = model.state_dict(), again.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_the_default_split_is_mlp_channels_only_in_one_prune(monkeypatch):
    """Measured on SmolLM2 and Qwen2.5-Coder (BENCHMARKS.md), MLP channels alone were best or
    tied, so a budget by default spends it there, in one run with no trial prunes."""
    import spap.api as api

    runs = []
    orig = api._run
    monkeypatch.setattr(api, "_run", lambda *a, **k: runs.append(1) or orig(*a, **k))
    res = spap.prune(tiny_model("llama"), calib_ids=IDS, params=0.2, method="obs",
                     batch_size=4)
    target = res.report["params_target"]
    assert target["split"] == "mlp" and target["chosen"] == "mlp"
    assert [c["name"] for c in target["candidates"]] == ["mlp"]
    assert res.report["heads"] is None and len(runs) == 1


def test_a_family_without_prunable_heads_gets_the_mlp_split_only():
    model = tiny_model("opt")
    cands = candidate_splits(model, get_adapter(model.config), 0.2)
    assert [c.name for c in cands] == ["mlp"]
    with pytest.raises(SpapError, match="opt"):
        candidate_splits(model, get_adapter(model.config), 0.2, split="heads")


def test_bad_budgets_are_refused(tmp_path, capsys):
    model = tiny_model("llama")
    with pytest.raises(SpapError, match="--params must be in"):
        spap.prune(copy.deepcopy(model), calib_ids=IDS, params=1.0)
    with pytest.raises(SpapError, match="--params must be in"):
        spap.prune(copy.deepcopy(model), calib_ids=IDS, params="0.2")
    with pytest.raises(SpapError, match="drop --heads"):
        spap.prune(copy.deepcopy(model), calib_ids=IDS, params=0.2, heads=0.5)
    with pytest.raises(SpapError, match="cannot be removed"):
        spap.prune(copy.deepcopy(model), calib_ids=IDS, params=0.95, params_split="mlp")
    with pytest.raises(SpapError, match="--params-split must be"):
        spap.prune(copy.deepcopy(model), calib_ids=IDS, params=0.2, params_split="bogus")
    code, _, err = run_cli(["prune", "x", "--out", tmp_path / "o"], capsys)
    assert code == 2 and "--sparsity" in err and "--params" in err


def test_low_memory_takes_one_split_only(tmp_path):
    from conftest import TEXT
    from spap.api import prune_to_disk
    from test_large import SETTINGS, saved

    calib = tmp_path / "calib.txt"
    calib.write_text("\n\n".join(f"{i}. {TEXT * 4}" for i in range(40)))
    src = saved(tmp_path, "llama")
    kw = dict(SETTINGS, calib=str(calib), method="obs", low_memory=True, params=0.2)
    with pytest.raises(SpapError, match="--params-split mlp, heads or kv"):
        prune_to_disk(str(src), tmp_path / "o", params_split="auto", **kw)
    assert not (tmp_path / "o").exists()
    job = prune_to_disk(str(src), tmp_path / "o", params_split="heads", **kw)
    assert job.report["params_target"]["chosen"] == "heads"
    assert job.report["heads"]["heads_after"] == 2


def test_compare_takes_a_budget_per_variant():
    from conftest import byte_tokenizer
    from spap.compare import compare, parse_variants

    variants = parse_variants("mlp=obs:params=0.2;params_split=mlp,"
                              "kv=obs:params=0.2;params_split=kv")
    result = compare(tiny_model("llama"), byte_tokenizer(), variants, [0.0], calib_ids=IDS,
                     eval_stream=random_ids(1, 200, seed=4)[0], eval_seqlen=24)
    recs = {r["method"]: r for r in result["records"]}
    assert recs["mlp"]["params_target"]["chosen"] == "mlp" and recs["mlp"]["heads"] is None
    assert recs["kv"]["heads"]["kv_heads_after"] == 1
    for r in recs.values():
        assert r["params_removed_frac"] == pytest.approx(0.2, abs=0.02)


def test_a_budget_keeps_the_calibration_description(text_file):
    from conftest import byte_tokenizer

    drawn = spap.prune(tiny_model("llama"), byte_tokenizer(), 0.3, calib=str(text_file),
                       nsamples=4, seqlen=16, method="obs").report["calibration"]
    res = spap.prune(tiny_model("llama"), byte_tokenizer(), params=0.2, params_split="mlp",
                     calib=str(text_file), nsamples=4, seqlen=16, method="obs")
    assert res.report["calibration"] == drawn  # the windows' source and seed, not "given"


def test_prune_to_disk_with_a_budget_draws_the_calibration_once(tmp_path, monkeypatch):
    """The split's trial runs and the final run share one draw of the windows, and the report
    still describes where they came from."""
    import spap.api as api
    from conftest import TEXT
    from test_large import SETTINGS, saved

    calib = tmp_path / "calib.txt"
    calib.write_text("\n\n".join(f"{i}. {TEXT * 4}" for i in range(40)))
    src = saved(tmp_path, "llama")
    calls = []
    orig = api.calibration_ids
    monkeypatch.setattr(api, "calibration_ids",
                        lambda *a, **k: calls.append(1) or orig(*a, **k))
    job = api.prune_to_disk(str(src), tmp_path / "o", **dict(
        SETTINGS, calib=str(calib), method="obs", params=0.2, params_split="auto"))
    assert len(calls) == 1
    assert len(job.report["params_target"]["candidates"]) > 1
    assert job.report["calibration"]["source"] == str(calib)
