"""`spap prune` / `spap eval` end to end on a tiny model, and every bad input of the issue:
one line on stderr, exit status 2, and no output folder left behind."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import byte_tokenizer, run_cli, tiny_model


def run(argv, capsys):
    return run_cli(argv, capsys)


def test_prune_then_eval(tiny_dir, text_file, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "pruned"
    code, stdout, err = run(["prune", tiny_dir, "--sparsity", "0.25", "--out", out,
                             "--calib", text_file, "--nsamples", "4", "--seqlen", "32",
                             "--device", "cpu", "--round-to", "8"], capsys)
    assert code == 0, err
    assert "parameters" in stdout
    m = AutoModelForCausalLM.from_pretrained(out)
    assert m.config.intermediate_size == 72  # 96 - 24, a multiple of 8
    rep = json.loads((out / "spap.json").read_text())
    assert rep["calibration"]["source"] == str(text_file)
    assert rep["reload_check"]["max_abs_logit_diff"] <= 1e-4
    js = tmp_path / "ev.json"
    code, stdout, err = run(["eval", out, "--data", text_file, "--seqlen", "32", "--windows", "3",
                             "--json", js, "--device", "cpu"], capsys)
    assert code == 0, err
    res = json.loads(js.read_text())
    assert torch.isfinite(torch.tensor(res["ppl"])) and res["ppl"] > 1
    assert res["protocol"]["windows"] == 3 and res["protocol"]["seqlen"] == 32


def test_overwrite_replaces(tiny_dir, text_file, tmp_path, capsys):
    out = tmp_path / "o"
    args = ["prune", tiny_dir, "--sparsity", "0.5", "--out", out, "--calib", text_file,
            "--nsamples", "2", "--seqlen", "16", "--option", "recovery=none"]
    assert run(args, capsys)[0] == 0
    code, _, err = run(args, capsys)
    assert code == 2 and "--overwrite" in err and err.startswith("spap: error:")
    assert run([*args, "--overwrite"], capsys)[0] == 0


def _bad(argv, capsys, out, needle):
    code, _, err = run(argv, capsys)
    assert code == 2, err
    errors = [line for line in err.splitlines() if line.startswith("spap: error:")]
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]), err
    assert needle in err, err
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}*"))


def test_bad_model_path(tmp_path, capsys):
    out = tmp_path / "o"
    _bad(["prune", tmp_path / "nope", "--sparsity", "0.3", "--out", out], capsys, out,
         "unknown model or path")


def test_unsupported_architecture(tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    d = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(d)
    out = tmp_path / "o"
    _bad(["prune", d, "--sparsity", "0.3", "--out", out], capsys, out,
         "is not supported; supported: apertus, arcee,")


@pytest.mark.parametrize("s", ["1.0", "-0.1", "1.5", "nan"])
def test_bad_sparsity(tiny_dir, tmp_path, capsys, s):
    out = tmp_path / "o"
    _bad(["prune", tiny_dir, "--sparsity", s, "--out", out], capsys, out, "[0, 1)")


def test_too_little_text(tiny_dir, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("\n".join(f"line {i}" for i in range(10)))  # splits: 9 lines to calib
    out = tmp_path / "o"
    _bad(["prune", tiny_dir, "--sparsity", "0.3", "--out", out, "--calib", short,
          "--nsamples", "8", "--seqlen", "64"], capsys, out, "calibration text has 62 tokens")


def test_text_too_short_to_split(tiny_dir, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("only a few words here")
    out = tmp_path / "o"
    _bad(["prune", tiny_dir, "--sparsity", "0.3", "--out", out, "--calib", short,
          "--nsamples", "8", "--seqlen", "64"], capsys, out, "at least 10 are needed")


def test_non_empty_out_without_overwrite(tiny_dir, tmp_path, capsys):
    out = tmp_path / "full"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    code, _, err = run(["prune", tiny_dir, "--sparsity", "0.3", "--out", out], capsys)
    assert code == 2 and "not empty" in err and err.startswith("spap: error:")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_non_finite_activations(tmp_path, text_file, capsys):
    d = tmp_path / "broken"
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("inf")
    model.save_pretrained(d)
    byte_tokenizer().save_pretrained(d)
    out = tmp_path / "o"
    _bad(["prune", d, "--sparsity", "0.3", "--out", out, "--calib", text_file,
          "--nsamples", "2", "--seqlen", "16"], capsys, out, "non-finite activations")


def test_unknown_method_and_option(tiny_dir, tmp_path, capsys):
    out = tmp_path / "o"
    _bad(["prune", tiny_dir, "--sparsity", "0.3", "--out", out, "--method", "sparsegpt"],
         capsys, out, "supported:")
    _bad(["prune", tiny_dir, "--sparsity", "0.3", "--out", out, "--option", "bogus=1"],
         capsys, out, "unknown option")


def test_unknown_calib_source(tiny_dir, tmp_path, capsys):
    out = tmp_path / "o"
    _bad(["prune", tiny_dir, "--sparsity", "0.3", "--out", out, "--calib", "nosuch"],
         capsys, out, "unknown text source")


def test_bench_two_tiny_models(tiny_dir, text_file, tmp_path, capsys):
    out = tmp_path / "p"
    assert run(["prune", tiny_dir, "--sparsity", "0.5", "--out", out, "--calib", text_file,
                "--nsamples", "2", "--seqlen", "16"], capsys)[0] == 0
    js = tmp_path / "b.json"
    code, stdout, err = run(["bench", out, "--vs", tiny_dir, "--batch-sizes", "1",
                             "--prompt-lens", "8", "--gen-tokens", "2", "--reps", "1",
                             "--device", "cpu", "--json", js], capsys)
    assert code == 0, err
    res = json.loads(js.read_text())
    (s,) = res["settings"]
    assert (s["batch"], s["prompt_len"], s["gen_tokens"]) == (1, 8, 2)  # what was asked
    assert len(s["prefill"]["times"]["pruned"]) == len(s["decode"]["times"]["base"]) == 1
    assert any(line.split()[:3] == ["1", "8", "2"] for line in stdout.splitlines())  # the table
    assert "bench" in err and "100%" in err  # the progress bar ran to its end
    # The ideal speedups follow from the widths in the two saved configs: only the MLP FLOPs
    # and the MLP weights differ, in the ratio of the widths.
    widths = [json.loads((d / "config.json").read_text())["intermediate_size"]
              for d in (out, tiny_dir)]
    fp, fb = s["flops"]["pruned"], s["flops"]["base"]
    assert [fp["mlp_width"], fb["mlp_width"]] == widths and widths[0] < widths[1]
    assert fp["prefill"]["mlp"] * widths[1] == fb["prefill"]["mlp"] * widths[0]
    rest = [f["prefill"]["total"] - f["prefill"]["mlp"] for f in (fp, fb)]
    assert rest[0] == rest[1]
    assert s["ideal_speedup"] == fb["prefill"]["total"] / fp["prefill"]["total"]
    wp, wb = (f["decode_bytes_per_token"]["weights"] for f in (fp, fb))
    assert wb - wp == res["weight_bytes"]["base"] - res["weight_bytes"]["pruned"] > 0  # batch 1
    assert s["decode"]["ideal_speedup"] == wb / wp
    for name in ("pruned", "base"):  # the CPU memory figures, from a subprocess per model
        assert res["memory"][name]["weight_bytes"] == res["weight_bytes"][name]
        assert res["memory"][name]["run_peak_rss"] > 0
