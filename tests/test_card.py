"""The model card of a pruned folder (modelio.card) and the upload to the Hub (modelio.hub):
the card parses with `huggingface_hub.ModelCard.load`, names the base model only by a Hub id,
and tells the recipe, the sizes and the measured perplexity; `--push-to-hub` uploads the
finished folder (the upload mocked: nothing leaves the machine)."""

from __future__ import annotations

import json

import pytest

import spap
from conftest import TEXT, byte_tokenizer, run_cli, tiny_model
from spap.errors import SpapError
from spap.modelio import card

SETTINGS = dict(nsamples=4, seqlen=16, device="cpu", method="wanda-sp")


@pytest.fixture
def calib(tmp_path):
    p = tmp_path / "calib.txt"
    p.write_text("\n\n".join(f"{i}. {TEXT * 4}" for i in range(40)))
    return p


@pytest.fixture
def src(tmp_path):
    d = tmp_path / "src"
    tiny_model("qwen2").save_pretrained(d)
    byte_tokenizer().save_pretrained(d)
    return d


def test_card_of_a_run_parses_and_tells_the_recipe(src, calib, tmp_path):
    from huggingface_hub import ModelCard

    job = spap.prune_to_disk(str(src), tmp_path / "out", 0.25, calib=str(calib), evaluate=True,
                             eval_seqlen=16, eval_windows=2, round_to=8,
                             method_options={"refit": "ridge"}, **SETTINGS | {"method": "obs"})
    loaded = ModelCard.load(job.out / "README.md")
    meta = loaded.data.to_dict()
    assert meta["library_name"] == "transformers"
    assert meta["pipeline_tag"] == "text-generation"
    assert {"pruned", "spap", "structured-pruning", "obs", "qwen2"} <= set(meta["tags"])
    assert "base_model" not in meta  # a local folder is not a Hub id
    text = loaded.text
    rep = job.report
    assert f"{rep['params_before']:,} | {rep['params_after']:,}" in text
    assert f"| pruned | {rep['eval']['pruned']['ppl']:.3f} |" in text
    assert f"| dense | {rep['eval']['dense']['ppl']:.3f} |" in text
    assert "`refit=ridge`" in text  # the option that differs from the default, and only it
    assert "`damp=" not in text
    assert f"intermediate_size 96 -> {rep['model']['width_after']}" in text
    assert "--method obs --sparsity 0.25 --option refit=ridge --round-to 8" in text
    assert f"spap {rep['versions']['spap']}" in text


def test_base_model_is_a_hub_id_or_nothing(tmp_path, monkeypatch):
    from huggingface_hub import ModelCard

    report = {"method": "spap", "options": {}, "sparsity_requested": 0.3,
              "sparsity_achieved": 0.3, "params_before": 100, "params_after": 80,
              "model": {"source": "Qwen/Qwen2.5-0.5B", "model_type": "qwen2"},
              "effort": {"level": "balanced"}}
    path = card.write_card(tmp_path, report)
    loaded = ModelCard.load(path)
    assert loaded.data.base_model == "Qwen/Qwen2.5-0.5B"
    assert "| effort level | `balanced` |" in loaded.text
    # a local folder named like org/name is a path, not a Hub id; an alias is neither
    (tmp_path / "org" / "name").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    for source in ("org/name", "smollm2-135m", "/abs/path/model", "models/x.gguf"):
        assert card.base_model_of({"model": {"source": source}}) is None
    # without a source, the config's _name_or_path when it is a Hub id
    from transformers import LlamaConfig

    cfg = LlamaConfig(name_or_path="meta-llama/Llama-3.2-1B")
    assert card.base_model_of({"model": {}}, cfg) == "meta-llama/Llama-3.2-1B"
    cfg = LlamaConfig(name_or_path=str(tmp_path / "org" / "name"))
    assert card.base_model_of({"model": {}}, cfg) is None


def test_python_save_writes_the_card_with_the_configs_hub_id(tmp_path):
    from huggingface_hub import ModelCard

    from conftest import random_ids

    model = tiny_model("llama")
    model.config._name_or_path = "meta-llama/Llama-3.2-1B"  # as from_pretrained(hub id) sets
    res = spap.prune(model, sparsity=0.25, method="magnitude", calib_ids=random_ids(2, 16))
    out = spap.save_pruned(res.model, byte_tokenizer(), tmp_path / "out", res.report)
    assert ModelCard.load(out / "README.md").data.base_model == "meta-llama/Llama-3.2-1B"


def test_low_memory_output_has_a_card(src, calib, tmp_path):
    from huggingface_hub import ModelCard

    job = spap.prune_to_disk(str(src), tmp_path / "out", 0.25, calib=str(calib),
                             low_memory=True, **SETTINGS)
    loaded = ModelCard.load(job.out / "README.md")
    assert "spap" in loaded.data.tags
    assert f"{job.report['params_after']:,}" in loaded.text


# ---- the upload ------------------------------------------------------------------------------
class FakeHub:
    """Stands in for huggingface_hub.HfApi: records what would be uploaded."""

    calls: list = []

    def create_repo(self, repo_id, repo_type=None, exist_ok=False, **kw):
        assert exist_ok  # an existing repository gets a new commit, not an error
        self.calls.append(("create", repo_id))

    def upload_folder(self, folder_path, repo_id, repo_type=None, **kw):
        from pathlib import Path

        folder = Path(folder_path)
        # the finished folder: weights, config, tokenizer, card, report, nothing left over
        names = sorted(p.name for p in folder.iterdir())
        self.calls.append(("upload", repo_id, folder, names,
                           json.loads((folder / "spap.json").read_text())["method"]))
        return type("Info", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/1"})()


@pytest.fixture
def fake_hub(monkeypatch):
    import huggingface_hub

    FakeHub.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub)
    return FakeHub.calls


@pytest.mark.parametrize("low_memory", [False, True])
def test_push_to_hub_uploads_the_finished_folder(src, calib, tmp_path, fake_hub, low_memory):
    job = spap.prune_to_disk(str(src), tmp_path / "out", 0.25, calib=str(calib),
                             push_to_hub="me/tiny-pruned", low_memory=low_memory, **SETTINGS)
    assert fake_hub[0] == ("create", "me/tiny-pruned")
    kind, repo, folder, names, method = fake_hub[1]
    assert (kind, repo, folder, method) == ("upload", "me/tiny-pruned", job.out, "wanda-sp")
    assert {"README.md", "spap.json", "config.json", "tokenizer.json"} <= set(names)
    assert not [n for n in names if n.startswith(".") or "spap-tmp" in n]
    assert job.hub_url == "https://huggingface.co/me/tiny-pruned/commit/1"


def test_no_upload_unless_asked(src, calib, tmp_path, fake_hub):
    job = spap.prune_to_disk(str(src), tmp_path / "out", 0.25, calib=str(calib), **SETTINGS)
    assert fake_hub == [] and job.hub_url is None


def test_cli_push_to_hub(src, calib, tmp_path, fake_hub, capsys):
    code, out, err = run_cli(["prune", src, "--out", tmp_path / "o", "--sparsity", "0.25",
                              "--calib", calib, "--nsamples", 4, "--seqlen", 16,
                              "--device", "cpu", "--method", "wanda-sp",
                              "--push-to-hub", "me/tiny"], capsys)
    assert code == 0, err
    assert [c[:2] for c in fake_hub] == [("create", "me/tiny"), ("upload", "me/tiny")]
    assert "uploaded to the Hub: https://huggingface.co/me/tiny/commit/1" in out


def test_bad_repo_id_is_refused_before_any_work(src, tmp_path, fake_hub):
    with pytest.raises(SpapError, match="--push-to-hub '/tmp/x' is not a Hub repository id"):
        spap.prune_to_disk(str(src), tmp_path / "out", 0.25, push_to_hub="/tmp/x", **SETTINGS)
    assert fake_hub == [] and not (tmp_path / "out").exists()


def test_failed_upload_is_one_line_and_keeps_the_folder(src, calib, tmp_path, monkeypatch):
    import huggingface_hub

    class NoToken(FakeHub):
        def create_repo(self, *a, **kw):
            raise OSError("401 Unauthorized: no token\nmore detail")

    monkeypatch.setattr(huggingface_hub, "HfApi", NoToken)
    with pytest.raises(SpapError, match=r"\(401 Unauthorized: no token\); log in") as e:
        spap.prune_to_disk(str(src), tmp_path / "out", 0.25, calib=str(calib),
                           push_to_hub="me/x", **SETTINGS)
    assert "\n" not in str(e.value)
    assert (tmp_path / "out" / "README.md").exists()


def test_card_of_a_head_cut_from_given_ids(tmp_path):
    from huggingface_hub import ModelCard

    from conftest import random_ids

    model = tiny_model("llama")  # 4 query heads in 2 KV groups
    res = spap.prune(model, sparsity=0.25, heads=0.5, method="wanda-sp",
                     calib_ids=random_ids(4, 16))
    out = spap.save_pruned(res.model, byte_tokenizer(), tmp_path / "out", res.report)
    text = ModelCard.load(out / "README.md").text
    assert "cut to 2 query heads and 2 KV heads per layer (from 4 and 2)" in text
    assert "| calibration | 4 windows of 16 tokens given as token ids |" in text
    assert "--heads 0.5 --head-method obs --nsamples 4 --seqlen 16\n" in text
    assert "--calib" not in text  # token ids name no text to calibrate on
