"""The BOS convention: every window of every kind starts with the tokenizer's BOS token when
the tokenizer adds one by itself (`--bos auto`), or as `--bos always|never` says; the window
keeps its length, so it holds one token of text less; perplexity never scores the BOS."""

from __future__ import annotations

import json

import pytest
import torch

import spap
from conftest import TEXT, run_cli, tiny_model
from spap.compare import split_probes
from spap.config import CalibConfig, PruneConfig
from spap.data import (
    bos_token,
    calibration_ids,
    calibration_windows,
    eval_windows,
    load_text,
    probe_windows,
    tokenize,
)
from spap.errors import SpapError
from spap.eval.ppl import nll_of_windows, perplexity

BOS = "<|begin_of_text|>"


def make_tokenizer(folder, adds_bos: bool):
    """A byte-level tokenizer saved to `folder` and loaded back as a user's would be: 255 byte
    symbols and a BOS (id 255, inside the tiny models' vocabulary of 256). With `adds_bos` its
    post-processor puts the BOS in front of every encoding, as Llama 3's tokenizer.json does;
    without, the BOS exists but is not added (as SmolLM2's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())[:255]
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab[BOS] = 255
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([BOS])
    if adds_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, 255)])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS,
                            eos_token=alphabet[0]).save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


@pytest.fixture
def with_bos(tmp_path):
    return make_tokenizer(tmp_path / "with-bos", True)


@pytest.fixture
def without_bos(tmp_path):
    return make_tokenizer(tmp_path / "without-bos", False)


def test_the_test_tokenizers_behave_as_described(with_bos, without_bos):
    assert with_bos("ab").input_ids == [255, *without_bos("ab").input_ids]
    assert with_bos("ab", add_special_tokens=False).input_ids == without_bos("ab").input_ids
    assert with_bos.bos_token_id == without_bos.bos_token_id == 255


def test_auto_follows_the_tokenizer(with_bos, without_bos):
    assert bos_token(with_bos, "auto") == 255
    assert bos_token(without_bos, "auto") is None
    for tok in (with_bos, without_bos):
        assert bos_token(tok, "always") == 255
        assert bos_token(tok, "never") is None


def test_always_needs_a_bos_and_modes_are_checked(tokenizer):
    assert tokenizer.bos_token_id is None  # the byte tokenizer has none
    assert bos_token(tokenizer, "auto") is None
    with pytest.raises(SpapError, match="--bos auto or never"):
        bos_token(tokenizer, "always")
    with pytest.raises(SpapError, match="--bos must be one of auto, always, never"):
        bos_token(tokenizer, "sometimes")
    with pytest.raises(SpapError, match="--bos must be one of"):
        PruneConfig(bos="yes").validate()


def test_every_kind_of_window_starts_with_bos_and_keeps_its_length():
    stream = torch.arange(1000, 3000)
    cal = calibration_windows(stream, 8, 16, seed=0, bos=7)
    ev = eval_windows(stream, 16, 4, bos=7)
    pr = probe_windows(stream, 3, 16, skip=100, bos=7)
    for w in (cal, ev, pr):
        assert w.shape[1] == 16
        assert (w[:, 0] == 7).all() and (w[:, 1:] >= 1000).all()
        for row in w:  # the rest is one contiguous slice of text, 15 tokens
            assert torch.equal(row[1:], torch.arange(int(row[1]), int(row[1]) + 15))
    assert torch.equal(ev[:, 1:].flatten(), stream[:60])  # consecutive from the start
    assert torch.equal(pr[:, 1:].flatten(), stream[-45:])  # consecutive up to the end
    text = cal[:, 1:].flatten().tolist()
    assert len(set(text)) == len(text)  # still no two calibration windows share a token


def test_without_bos_the_windows_are_as_before():
    """No BOS: the same draw, cut and slices as the functions without the argument."""
    stream = torch.arange(5000)
    assert torch.equal(calibration_windows(stream, 8, 50, 3, bos=None),
                       calibration_windows(stream, 8, 50, 3))
    assert torch.equal(eval_windows(stream, 50, 3, bos=None), stream[:150].view(3, 50))
    assert torch.equal(probe_windows(stream, 2, 50, 0, bos=None), stream[-100:].view(2, 50))


def test_calibration_draw_and_report(with_bos, without_bos, tmp_path):
    src = str(_text(tmp_path))
    cal = CalibConfig(src, nsamples=4, seqlen=32, seed=1)
    ids, desc = calibration_ids(with_bos, cal)
    assert (ids[:, 0] == 255).all() and ids.shape == (4, 32)
    assert desc["bos"] == {"setting": "auto", "token_id": 255,
                           "window": "the BOS token, then seqlen - 1 text tokens"}
    plain, plain_desc = calibration_ids(without_bos, cal)
    assert (plain != 255).all() and plain_desc["bos"]["token_id"] is None
    never, _ = calibration_ids(with_bos, CalibConfig(src, 4, 32, 1, bos="never"))
    assert torch.equal(never, plain)  # the same text stream, the same draw
    forced, _ = calibration_ids(without_bos, CalibConfig(src, 4, 32, 1, bos="always"))
    assert torch.equal(forced, ids)


def test_perplexity_scores_text_tokens_only(with_bos, without_bos, tmp_path):
    """With a BOS: seqlen - 1 text tokens per window, every one of them predicted (the first
    from the BOS), the BOS never a target."""
    model = tiny_model("llama")
    stream = tokenize(without_bos, load_text(str(_text(tmp_path)), "test"))[:400]
    r = perplexity(model, with_bos, seqlen=32, windows=3, stream=stream)
    assert r["protocol"]["bos"]["token_id"] == 255
    assert r["protocol"]["tokens_scored"] == 3 * 31
    text = stream[:93].view(3, 31)
    windows = torch.cat([torch.full((3, 1), 255), text], 1)
    with torch.no_grad():
        logp = torch.log_softmax(model(windows).logits.double(), -1)
    want = -logp[:, :-1].gather(-1, text[..., None]).mean()  # every text token, from the BOS on
    assert r["ppl"] == pytest.approx(float(torch.exp(want)), rel=1e-5)
    nll, count = nll_of_windows(model, windows)
    assert count == 93
    # and without a BOS nothing changed: windows of seqlen text tokens
    r0 = perplexity(model, without_bos, seqlen=32, windows=3, stream=stream)
    assert r0["protocol"]["bos"]["token_id"] is None
    w0 = stream[:96].view(3, 32)
    assert r0["ppl"] == pytest.approx(perplexity(model, None, seqlen=32, windows=3,
                                                 stream=stream, bos="never")["ppl"])
    assert r0["protocol"]["token_hash"] == spap.data.token_hash(w0)


def test_probes_stay_clear_of_the_perplexity_windows():
    stream = torch.arange(500)
    rest, probe, desc = split_probes(stream, 2, 16, 32, 3, bos=9)
    assert (probe[:, 0] == 9).all()
    assert torch.equal(probe[:, 1:].flatten(), stream[-30:])
    assert desc["start_token"] == 470 and torch.equal(rest, stream[:470])
    used = eval_windows(rest, 32, 3, bos=9)[:, 1:].flatten()
    assert int(used.max()) < 470


def test_the_run_identity_holds_the_bos_setting(with_bos, tmp_path):
    """A resume under another --bos is refused: the setting is part of what makes the run."""
    from spap.api import _run

    run_dir = tmp_path / "run"
    cfg = PruneConfig(calib=str(_text(tmp_path)), nsamples=4, seqlen=16, sparsity=0.5,
                      method="wanda-sp", batch_size=2)
    _run(tiny_model("llama"), with_bos, cfg, run_dir=run_dir)
    state = json.loads((run_dir / "state.json").read_text())
    assert state["identity"]["calibration"]["bos"]["token_id"] == 255
    cfg_never = PruneConfig.build(cfg, bos="never")
    with pytest.raises(SpapError, match="other settings"):
        _run(tiny_model("llama"), with_bos, cfg_never, run_dir=run_dir)


def _text(tmp_path):
    p = tmp_path / "calib.txt"
    p.write_text("\n\n".join(f"{i}. {TEXT * 4}" for i in range(40)))
    return p


def test_cli_records_bos_in_the_report_and_the_protocol(with_bos, tmp_path, capsys):
    d = tmp_path / "model"
    tiny_model("llama").save_pretrained(d)
    with_bos.save_pretrained(d)
    calib = _text(tmp_path)
    code, out, _ = run_cli(["prune", d, "--out", tmp_path / "out", "--calib", calib,
                            "--nsamples", 4, "--seqlen", 16, "--sparsity", 0.5,
                            "--method", "wanda-sp", "--device", "cpu"], capsys)
    assert code == 0
    rep = json.loads((tmp_path / "out" / "spap.json").read_text())
    assert rep["calibration"]["bos"]["token_id"] == 255
    code, out, _ = run_cli(["eval", d, "--data", calib, "--seqlen", 16, "--windows", 2,
                            "--bos", "never", "--device", "cpu", "--json", tmp_path / "e.json"],
                           capsys)
    assert code == 0 and "no BOS token (--bos never)" in out
    assert json.loads((tmp_path / "e.json").read_text())["protocol"]["bos"]["setting"] == "never"
    code, out, _ = run_cli(["compare", d, "--methods", "wanda-sp", "--sparsities", 0.5,
                            "--calib", calib, "--eval-data", calib, "--nsamples", 4,
                            "--seqlen", 16, "--eval-seqlen", 16, "--eval-windows", 2,
                            "--device", "cpu", "--json", tmp_path / "c.json"], capsys)
    assert code == 0 and "BOS token 255 in front of every window (--bos auto)" in out
    res = json.loads((tmp_path / "c.json").read_text())
    assert res["protocol"]["eval"]["bos"]["token_id"] == 255
    assert res["protocol"]["calibration"]["bos"]["token_id"] == 255


@pytest.mark.real
def test_smollm2_keeps_its_windows_without_bos(tmp_path):
    """SmolLM2's tokenizer has a BOS token but adds none: under auto its windows are those of
    --bos never, text from the first position, and always puts its BOS in front."""
    from transformers import AutoTokenizer

    from spap.modelio.loading import resolve_model

    try:
        tok = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m").path)
    except (SpapError, OSError) as e:
        pytest.skip(str(e))
    assert tok.bos_token_id is not None and bos_token(tok, "auto") is None
    src = str(_text(tmp_path))
    auto, desc = calibration_ids(tok, CalibConfig(src, 8, 64))
    never, _ = calibration_ids(tok, CalibConfig(src, 8, 64, bos="never"))
    assert torch.equal(auto, never) and desc["bos"]["token_id"] is None
    stream = tokenize(tok, load_text(src, "calib"))
    assert torch.equal(auto, calibration_windows(stream, 8, 64, 0))
    always, _ = calibration_ids(tok, CalibConfig(src, 8, 64, bos="always"))
    assert (always[:, 0] == tok.bos_token_id).all()
