"""`spap compare` end to end on a tiny model: one record per (method, sparsity) under one
protocol, a plot, exact dense perplexity at sparsity 0, held-out layer errors on probe windows
cut from the end of the evaluation text, and bad input refused before any model is loaded
(exit 2, no JSON)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

from conftest import byte_tokenizer, random_ids, run_cli, tiny_model
from spap.compare import (
    Variant,
    compare,
    format_table,
    parse_sparsities,
    parse_variants,
    split_probes,
)
from spap.data import eval_windows, load_text, token_hash, tokenize
from spap.errors import SpapError
from spap.solvers.base import Decision, top_k_keep

REQUIRED = ("method", "sparsity", "ppl", "dense_ppl", "gap", "params_removed_frac",
            "layer_error_mean", "layer_errors", "layer_error_heldout_mean",
            "layer_errors_heldout", "seconds", "seconds_solve", "seconds_forward", "options")


def run(argv, capsys):
    return run_cli(argv, capsys)


def test_compare_end_to_end(tiny_dir, text_file, tmp_path, capsys):
    js, png = tmp_path / "out" / "cmp.json", tmp_path / "out" / "cmp.png"
    methods = "spap,spap-fast=spap:recovery=none;iters=4,obs"
    code, out, err = run(["compare", tiny_dir, "--methods", methods, "--sparsities", "0,0.25",
                          "--option", "spap:recovery_epochs=1", "--calib", text_file,
                          "--nsamples", "4", "--seqlen", "32", "--eval-data", text_file,
                          "--eval-seqlen", "32",
                          "--eval-windows", "2", "--device", "cpu", "--json", js, "--plot", png],
                         capsys)
    assert code == 0, err
    res = json.loads(js.read_text())
    assert res["model"] == str(tiny_dir)
    assert res["protocol"]["eval"]["windows"] == 2 and res["protocol"]["eval"]["seqlen"] == 32
    assert res["protocol"]["eval"]["data"] == str(text_file)
    assert res["protocol"]["calibration"]["nsamples"] == 4
    probe = res["protocol"]["probe"]  # default: max(1, nsamples // 4) windows of --seqlen
    assert probe["windows"] == 1 and probe["seqlen"] == 32 and probe["tokens"] == 32
    assert probe["source"] == str(text_file)
    assert probe["start_token"] == probe["stream_tokens"] - 32 >= 2 * 32
    assert "torch" in res["protocol"]["versions"]
    recs = res["records"]
    assert [(r["method"], r["sparsity"]) for r in recs] == [
        (m, s) for s in (0.0, 0.25) for m in ("spap", "spap-fast", "obs")
    ]  # sparsity-major: one sparsity's methods run back to back
    for r in recs:
        assert all(k in r for k in REQUIRED), sorted(set(REQUIRED) - set(r))
        assert math.isfinite(r["ppl"]) and r["ppl"] > 1
        assert r["dense_ppl"] == res["dense_ppl"]
        assert len(r["layer_errors"]) == 2 and len(r["layer_errors_heldout"]) == 2
        assert all(math.isfinite(e) and e >= 0 for e in r["layer_errors_heldout"])
        if r["sparsity"] == 0:  # nothing pruned: the copy is bit-identical to dense
            assert r["ppl"] == res["dense_ppl"] and r["gap"] == 0
            assert r["params_removed_frac"] == 0
            assert r["layer_errors_heldout"] == [0.0, 0.0]
            assert r["layer_error_heldout_mean"] == 0.0
        else:
            assert r["params_removed_frac"] > 0 and r["layer_error_mean"] > 0
            assert r["layer_error_heldout_mean"] > 0
    opts = {r["method"]: r["options"] for r in recs}
    # --option spap:... reaches every spap variant; a variant's own options win
    from spap.solvers.spap import SpapSolver

    assert opts["spap"]["recovery_epochs"] == 1 and opts["spap"]["iters"] == SpapSolver.iters
    assert opts["spap-fast"]["iters"] == 4 and opts["spap-fast"]["recovery"] == "none"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "spap-fast" in out and "dense" in out and "held-out err" in out
    assert not list(js.parent.glob(".*tmp*"))  # atomic writes leave no temporary file


def test_also_eval_scores_every_model_on_a_second_text(tiny_dir, text_file, tmp_path, capsys):
    other = tmp_path / "other.txt"
    other.write_text("\n\n".join(f"{i} zebra quartz " * 12 for i in range(40)))
    js = tmp_path / "cmp.json"
    code, out, err = run(["compare", tiny_dir, "--methods", "obs", "--sparsities", "0,0.5",
                          "--calib", text_file, "--nsamples", "4", "--seqlen", "32",
                          "--eval-data", text_file, "--also-eval", str(other),
                          "--eval-seqlen", "32", "--eval-windows", "2", "--device", "cpu",
                          "--json", js], capsys)
    assert code == 0, err
    res = json.loads(js.read_text())
    (src,) = res["dense_ppl_also"]
    assert src == str(other) and res["protocol"]["also_eval"][src]["windows"] == 2
    from spap.eval.ppl import perplexity

    want = perplexity(tiny_model("llama"), byte_tokenizer(), data=str(other), seqlen=32,
                      windows=2)["ppl"]
    assert res["dense_ppl_also"][src] == pytest.approx(want, rel=1e-6)
    assert res["dense_ppl_also"][src] != pytest.approx(res["dense_ppl"], rel=1e-3)
    dense0, pruned = res["records"]
    assert dense0["ppl_also"][src] == res["dense_ppl_also"][src]  # 0%: the dense model
    assert pruned["ppl_also"][src] != dense0["ppl_also"][src]
    assert src in out


def test_saved_models_reload_and_name_their_calibration(tiny_dir, text_file, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    js, saved = tmp_path / "cmp.json", tmp_path / "models"
    code, _, err = run(["compare", tiny_dir, "--methods", "obs", "--sparsities", "0.5",
                        "--calib", text_file, "--nsamples", "4", "--seqlen", "32",
                        "--eval-data", text_file, "--eval-seqlen", "32", "--eval-windows", "2",
                        "--device", "cpu", "--json", js, "--save-models", str(saved)], capsys)
    assert code == 0, err
    res = json.loads(js.read_text())
    rep = json.loads((saved / "obs-0.5" / "spap.json").read_text())
    # the saved model's report says where the calibration windows came from, as compare's does
    assert rep["calibration"] == res["protocol"]["calibration"]
    assert rep["calibration"]["source"] == str(text_file)
    model = AutoModelForCausalLM.from_pretrained(saved / "obs-0.5")
    assert model.config.intermediate_size == rep["model"]["width_after"]


def test_prune_refuses_a_calibration_description_of_other_windows():
    import spap

    desc = {"source": "somewhere", "token_hash": token_hash(random_ids(4, 16, seed=9))}
    with pytest.raises(SpapError, match="other windows than calib_ids"):
        spap.prune(tiny_model("llama"), calib_ids=random_ids(4, 16), calib_desc=desc,
                   sparsity=0.3)


def test_unknown_method_exits_2_without_json(tiny_dir, text_file, tmp_path, capsys):
    js = tmp_path / "cmp.json"
    code, _, err = run(["compare", tiny_dir, "--methods", "spap,bogus", "--calib", text_file,
                        "--json", js], capsys)
    assert code == 2 and "bogus" in err and "supported" in err and "obs" in err
    assert err.count("\n") == 1
    assert not js.exists()


@pytest.mark.parametrize("argv, needle", [
    (["--sparsities", "0.2,1.0"], "[0, 1)"),
    (["--sparsities", "-0.1"], "[0, 1)"),
    (["--sparsities", "x"], "not a number"),
    (["--option", "nosuch:iters=1"], "neither a method nor a variant"),
    (["--option", "spap:nosuch=1"], "unknown option"),
    (["--methods", "a=spap,a=obs"], "twice"),
    (["--plot", "cmp.nosuch"], "image type"),
    (["--probe-windows", "-1"], "--probe-windows"),
    (["--also-eval", "no-such-text"], "unknown text source"),
    (["--also-eval", "wiki-offline"], "--also-eval"),
])
def test_bad_input_exits_2_without_json(argv, needle, tmp_path, capsys):
    js = tmp_path / "cmp.json"
    # the model does not exist: every check must happen before it would be loaded
    code, _, err = run(["compare", tmp_path / "no-model", "--methods", "spap,obs", *argv,
                        "--json", js], capsys)
    assert code == 2 and needle in err, err
    assert not js.exists()


def test_parse_variants_and_sparsities():
    vs = parse_variants("spap, fast=spap:recovery=none;damp=0.1, obs:block=2, o=obs",
                        ["obs:buffer=8", "o:block=4"])
    assert vs == [
        Variant("spap", "spap", {}),
        Variant("fast", "spap", {"recovery": "none", "damp": 0.1}),
        Variant("obs:block=2", "obs", {"buffer": 8, "block": 2}),
        Variant("o", "obs", {"buffer": 8, "block": 4}),
    ]
    assert parse_sparsities("0.3, 0,0.3") == [0.3, 0.0]
    with pytest.raises(SpapError, match="empty"):
        parse_sparsities(" , ")


def test_parse_variants_keeps_a_list_value_whole():
    """A comma inside an option's list value (recovery_shrink) stays in that value; a method
    name after it starts the next variant."""
    vs = parse_variants("s=spap:recovery_shrink=0.25,0.5,0.75;recovery_epochs=3,obs,"
                        "t=spap:recovery_shrink=0.5,wanda-sp")
    assert [(v.name, v.method, v.options) for v in vs] == [
        ("s", "spap", {"recovery_shrink": "0.25,0.5,0.75", "recovery_epochs": 3}),
        ("obs", "obs", {}), ("t", "spap", {"recovery_shrink": 0.5}),
        ("wanda-sp", "wanda-sp", {}),
    ]
    with pytest.raises(SpapError, match="unknown method '0.5'"):
        parse_variants("obs,0.5")  # no option before it to continue: still refused


@dataclass
class _BiasSolver:
    """A stand-in for a bias-compensating method (FLAP): keeps the largest down-projection
    columns and adds a down bias, which a saved Qwen2 cannot hold."""

    name: ClassVar[str] = "biased"
    needs_gram: ClassVar[bool] = False
    needs_inputs: ClassVar[bool] = False
    adds_down_bias: ClassVar[bool] = True

    def solve(self, problem, n_keep):
        keep = top_k_keep(problem.w_down.norm(dim=0), n_keep)
        removed = torch.ones(problem.n, dtype=torch.bool)
        removed[keep] = False
        b = problem.w_down[:, removed] @ problem.stats.mean[removed]  # (m,) mean compensation
        return Decision(keep, problem.w_down[:, keep], b_down=b)


def test_unsaveable_method_is_compared_in_memory(monkeypatch):
    import spap.api
    import spap.solvers

    monkeypatch.setattr(spap.api, "get_solver", lambda name, **o: _BiasSolver())
    monkeypatch.setattr(spap.solvers, "get_solver", lambda name, **o: _BiasSolver())
    model, tok = tiny_model("qwen2"), byte_tokenizer()
    calib = random_ids(4, 32)
    with pytest.raises(SpapError, match="cannot store"):
        spap.api.prune(tiny_model("qwen2"), sparsity=0.25, method="biased", calib_ids=calib)
    res = compare(model, tok, parse_variants("biased"), [0.25], calib_ids=calib,
                  eval_stream=random_ids(1, 96, seed=1).flatten(), eval_seqlen=32)
    (r,) = res["records"]
    assert r["saveable"] is False and math.isfinite(r["ppl"]) and r["ppl"] != res["dense_ppl"]
    # the dense model given to compare is left untouched
    assert model.config.intermediate_size == 96 and model.model.layers[0].mlp.down_proj.bias is None


def _compare_argv(tiny_dir, text_file, js, *extra):
    return ["compare", tiny_dir, "--methods", "obs", "--sparsities", "0.25", "--calib",
            text_file, "--nsamples", "4", "--seqlen", "32", "--eval-data", text_file,
            "--eval-seqlen", "32", "--device", "cpu", "--json", js, *extra]


def test_probes_shorten_an_all_windows_evaluation(tiny_dir, text_file, tmp_path, capsys):
    """Without --eval-windows perplexity uses every window of the stream before the probes, and
    the protocol records exactly which tokens those were."""
    js = tmp_path / "cmp.json"
    code, _, err = run(_compare_argv(tiny_dir, text_file, js, "--probe-windows", "3"), capsys)
    assert code == 0, err
    res = json.loads(js.read_text())
    stream = tokenize(byte_tokenizer(), load_text(str(text_file), "test"))
    start = stream.numel() - 3 * 32
    probe = res["protocol"]["probe"]
    assert probe["start_token"] == probe["eval_stream_tokens"] == start
    assert probe["token_hash"] == token_hash(stream[start:].view(3, 32))
    ev = res["protocol"]["eval"]
    assert ev["windows"] == start // 32
    assert ev["token_hash"] == token_hash(eval_windows(stream[:start], 32))
    (r,) = res["records"]
    assert len(r["layer_errors_heldout"]) == 2 and r["layer_error_heldout_mean"] > 0


def test_probe_windows_zero_disables(tiny_dir, text_file, tmp_path, capsys):
    js = tmp_path / "cmp.json"
    code, out, err = run(_compare_argv(tiny_dir, text_file, js, "--eval-windows", "2",
                                       "--probe-windows", "0"), capsys)
    assert code == 0, err
    res = json.loads(js.read_text())
    assert res["protocol"]["probe"] is None
    (r,) = res["records"]
    assert r["layer_error_heldout_mean"] is None and r["layer_errors_heldout"] is None
    assert "n/a" in format_table(res).splitlines()[-1] and "held-out err" in out


def test_probes_overlapping_evaluation_exit_2(tiny_dir, text_file, tmp_path, capsys):
    js = tmp_path / "cmp.json"
    code, _, err = run(_compare_argv(tiny_dir, text_file, js, "--probe-windows", "1000"), capsys)
    assert code == 2 and "overlap" in err and "--probe-windows" in err, err
    assert not js.exists()


def test_split_probes_keeps_the_requested_eval_windows():
    stream = torch.arange(200)
    ev, probe, desc = split_probes(stream, 2, 16, eval_seqlen=20, eval_windows=3)
    assert torch.equal(eval_windows(ev, 20, 3), eval_windows(stream, 20, 3))
    assert torch.equal(probe.flatten(), torch.arange(168, 200)) and desc["start_token"] == 168
    assert split_probes(stream, 0, 16, 20, None) == (stream, None, None)
    with pytest.raises(SpapError, match="overlap"):
        split_probes(stream, 2, 16, eval_seqlen=20, eval_windows=9)  # 180 + 32 > 200
    with pytest.raises(SpapError, match="overlap"):
        split_probes(stream, 12, 16, eval_seqlen=20, eval_windows=None)  # no window left


def test_compare_records_heldout_errors_directly():
    model, tok = tiny_model("llama"), byte_tokenizer()
    calib, probe = random_ids(4, 32), random_ids(2, 16, seed=3)
    res = compare(model, tok, parse_variants("obs"), [0.25], calib_ids=calib,
                  eval_stream=random_ids(1, 96, seed=1).flatten(), eval_seqlen=32,
                  probe_ids=probe)
    assert res["protocol"]["probe"] == {"windows": 2, "seqlen": 16, "tokens": 32,
                                        "token_hash": token_hash(probe)}
    (r,) = res["records"]
    assert r["layer_error_heldout_mean"] == pytest.approx(
        sum(r["layer_errors_heldout"]) / len(r["layer_errors_heldout"]))
    json.dumps(res, allow_nan=False)


def _cmp_argv(tiny_dir, text_file, js, methods="obs,spap=spap:recovery_epochs=1"):
    return ["compare", tiny_dir, "--methods", methods, "--sparsities", "0.25,0.5",
            "--calib", text_file, "--nsamples", "4",
            "--seqlen", "32", "--eval-data", text_file, "--eval-seqlen", "32",
            "--eval-windows", "2", "--device", "cpu", "--json", js, "--resume"]


def test_resumed_comparison_equals_an_uninterrupted_one(tiny_dir, text_file, tmp_path, capsys,
                                                        monkeypatch):
    """A comparison killed inside its third prune (at its second layer) and run again keeps
    the two finished records without running them again, continues the third prune from its
    finished layer, and ends with the records of an uninterrupted comparison."""
    from spap.driver import pipeline

    whole = tmp_path / "whole.json"
    assert run(_cmp_argv(tiny_dir, text_file, whole), capsys)[0] == 0
    js = tmp_path / "cmp.json"
    real, calls = pipeline._prune_one, []

    def dying(adapter, lay, index, *args, **kwargs):
        calls.append(index)
        if len(calls) == 6:  # the third prune's second layer (two layers per prune)
            raise KeyboardInterrupt
        return real(adapter, lay, index, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(pipeline, "_prune_one", dying)
        assert run(_cmp_argv(tiny_dir, text_file, js), capsys)[0] == 130
    partial = tmp_path / ".cmp.json.spap-partial"
    assert [p.name for p in partial.iterdir()] == ["obs-0.5"]
    assert len(json.loads(js.read_text())["records"]) == 2
    with monkeypatch.context() as m:
        calls.clear()
        m.setattr(pipeline, "_prune_one", dying)
        assert run(_cmp_argv(tiny_dir, text_file, js), capsys)[0] == 0
    assert calls == [1, 0, 1]  # the third prune's last layer, then the fourth prune
    assert not partial.exists()
    got, ref = json.loads(js.read_text())["records"], json.loads(whole.read_text())["records"]
    assert [r["resumed_from_layer"] for r in got] == [0, 0, 1, 0]
    keys = ("method", "sparsity", "ppl", "layer_errors", "layer_errors_heldout",
            "layer_recovery_epochs", "params_removed_frac")
    assert [[r[k] for k in keys] for r in got] == [[r[k] for k in keys] for r in ref]


def test_resume_refuses_the_json_of_another_comparison(tiny_dir, text_file, tmp_path, capsys,
                                                        monkeypatch):
    js = tmp_path / "cmp.json"
    assert run(_cmp_argv(tiny_dir, text_file, js, methods="obs"), capsys)[0] == 0
    before = js.read_text()
    import spap.eval.ppl as ppl

    scored = []
    real = ppl.perplexity
    monkeypatch.setattr(ppl, "perplexity", lambda *a, **k: scored.append(1) or real(*a, **k))
    code, _, err = run(_cmp_argv(tiny_dir, text_file, js), capsys)
    assert code == 2 and "holds another comparison (its variants differ)" in err, err
    assert js.read_text() == before  # nothing overwritten
    assert not scored  # refused before the dense model was scored
