"""The model card (README.md) of a pruned folder, so that it is at home on the Hugging Face Hub.

Its YAML front matter is the Hub's metadata, built with `huggingface_hub.ModelCardData`:
`base_model` (only a Hub id: a local path or an offline alias names nothing on the Hub, so it
is left out), `library_name: transformers`, `pipeline_tag: text-generation` and tags that
find it (pruned, spap, structured-pruning, the method, the family). Its body is read from the
run's report (spap.json): the recipe (method, the options that differ from the method's
defaults, effort level, sparsity, heads, calibration), the parameter counts before and after,
the perplexity of the dense and the pruned model when the run measured them, and how it was
made (the equivalent `spap prune` command and the package versions).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

CARD_NAME = "README.md"
TAGS = ["pruned", "spap", "structured-pruning", "mlp-pruning"]
GIVEN_IDS = "given ids"  # data.given_ids_description's source
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def hub_id(name: str | None) -> str | None:
    """`name` if it reads as a Hub repository id (org/name) and is not a local path."""
    if not name or not _HUB_ID.match(name) or name.endswith(".gguf"):
        return None
    if Path(name).expanduser().exists():
        return None
    return name


def base_model_of(report: dict[str, Any], config=None) -> str | None:
    """The Hub id of the model that was pruned: the run's source if it is one, else the
    config's `_name_or_path` if that is one."""
    found = hub_id((report.get("model") or {}).get("source"))
    if found is None and config is not None:
        found = hub_id(getattr(config, "_name_or_path", None))
    return found


def _non_default_options(method: str, options: dict[str, Any]) -> dict[str, Any]:
    """The options of `method` that differ from its defaults (all of them if it is unknown)."""
    from ..solvers import get_solver, solver_options

    try:
        defaults = solver_options(get_solver(method))
    except Exception:  # a method this version does not know: show everything
        return dict(options)
    return {k: v for k, v in options.items() if defaults.get(k, object()) != v}


def _opt(v: Any) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def prune_command(report: dict[str, Any], source: str | None) -> str:
    """A `spap prune` command with the settings of this run."""
    calib = report.get("calibration") or {}
    parts = ["spap", "prune", source or "MODEL", "--out", "OUT",
             "--method", str(report.get("method")),
             "--sparsity", f"{report.get('sparsity_requested', 0):g}"]
    for k, v in _non_default_options(report.get("method", ""),
                                     report.get("options") or {}).items():
        parts += ["--option", f"{k}={_opt(v)}"]
    heads = report.get("heads") or {}
    if heads.get("heads_requested"):
        parts += ["--heads", f"{heads['heads_requested']:g}"]
    if heads.get("kv_groups_requested"):
        parts += ["--kv-groups", f"{heads['kv_groups_requested']:g}"]
    if heads:
        parts += ["--head-method", str(heads.get("method"))]
    if report.get("round_to", 1) != 1:
        parts += ["--round-to", str(report["round_to"])]
    given = calib.get("source") == GIVEN_IDS  # (spap.prune with calib_ids: no text to name)
    for flag, key in (("--calib", "source"), ("--nsamples", "nsamples"),
                      ("--seqlen", "seqlen"), ("--seed", "seed")):
        if calib.get(key) is not None and not (given and key in ("source", "seed")):
            parts += [flag, str(calib[key])]
    if report.get("eval"):
        parts.append("--eval")
    return " ".join(_quote(p) for p in parts)


def _quote(s: str) -> str:
    import shlex

    return shlex.quote(s)


def _effort(report: dict[str, Any]) -> str | None:
    effort = report.get("effort")
    if isinstance(effort, dict):
        effort = effort.get("level") or effort.get("name")
    return None if effort is None else str(effort)


def _body(report: dict[str, Any], base: str | None, source: str | None) -> str:
    model = report.get("model") or {}
    name = base or (Path(source).name if source else None)
    lines = [f"# {name}, pruned with spap" if name else "# Pruned with spap", ""]
    what = (f"{report.get('sparsity_achieved', 0):.0%} of the MLP channels of every decoder "
            f"layer removed ({model.get('width_key', 'width')} {model.get('width_before')} -> "
            f"{model.get('width_after')})")
    heads = report.get("heads")
    if heads:
        what += (f" and attention heads cut to {heads['heads_after']} query heads and "
                 f"{heads['kv_heads_after']} KV heads per layer (from {heads['heads_before']} "
                 f"and {heads['kv_heads_before']})")
    if base:
        this = f"[{base}](https://huggingface.co/{base})"
    else:
        this = f"`{name}`" if source else "the base model"
    lines += [f"This is {this} with {what}, by the `{report.get('method')}` method of spap "
              "(one-shot structured pruning: whole channels chosen on calibration text are "
              "removed, no training). "
              "It is a standard checkpoint: `AutoModelForCausalLM.from_pretrained` loads it "
              "with stock transformers.", ""]

    lines += ["## Recipe", "", "| setting | value |", "|---|---|",
              f"| method | `{report.get('method')}` |"]
    effort = _effort(report)
    if effort is not None:
        lines.append(f"| effort level | `{effort}` |")
    changed = _non_default_options(report.get("method", ""), report.get("options") or {})
    if changed:
        opts = ", ".join(f"`{k}={_opt(v)}`" for k, v in changed.items())
        lines.append(f"| options (other than the defaults) | {opts} |")
    lines.append(f"| MLP sparsity | {report.get('sparsity_requested', 0):g} requested, "
                 f"{report.get('sparsity_achieved', 0):.4f} achieved |")
    if heads:
        lines.append(f"| heads | {heads['heads_requested']:g} of the query heads, "
                     f"{heads['kv_groups_requested']:g} of the KV groups "
                     f"(`{heads['method']}`) |")
    if report.get("round_to", 1) != 1:
        lines.append(f"| kept width a multiple of | {report['round_to']} |")
    calib = report.get("calibration") or {}
    if calib.get("source") == GIVEN_IDS:
        lines.append(f"| calibration | {calib.get('nsamples')} windows of "
                     f"{calib.get('seqlen')} tokens given as token ids |")
    elif calib:
        lines.append(f"| calibration | {calib.get('nsamples')} windows of "
                     f"{calib.get('seqlen')} tokens from `{calib.get('source')}`, "
                     f"seed {calib.get('seed')} |")
    lines.append(f"| dtype | {model.get('dtype')} |")

    lines += ["", "## Size", "", "| parameters | dense | pruned | removed |", "|---|---|---|---|"]
    for label, key in (("all", "params"), ("non-embedding", "params_non_embedding")):
        before, after = report.get(f"{key}_before"), report.get(f"{key}_after")
        if before and after is not None:
            lines.append(f"| {label} | {before:,} | {after:,} | {1 - after / before:.1%} |")

    ev = report.get("eval") or {}
    if ev.get("pruned"):
        proto = ev["pruned"].get("protocol") or {}
        lines += ["", "## Quality", "",
                  f"Perplexity on held-out text (`{proto.get('data')}`, {proto.get('windows')} "
                  f"windows of {proto.get('seqlen')} tokens), measured by the run:", "",
                  "| model | perplexity |", "|---|---|"]
        if ev.get("dense"):
            lines.append(f"| dense | {ev['dense']['ppl']:.3f} |")
        lines.append(f"| pruned | {ev['pruned']['ppl']:.3f} |")

    versions = report.get("versions") or {}
    made = ", ".join(f"{k} {v}" for k, v in versions.items())
    lines += ["", "## How it was made", "", "```bash", prune_command(report, source), "```", ""]
    if made:
        lines += [f"With {made}. The run's full record (every layer's kept channels, errors "
                  "and timings) is `spap.json` in this folder.", ""]
    lines += ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
              'model = AutoModelForCausalLM.from_pretrained("<this folder or repo>")',
              'tok = AutoTokenizer.from_pretrained("<this folder or repo>")', "```", ""]
    return "\n".join(lines)


def model_card(report: dict[str, Any], config=None):
    """The `huggingface_hub.ModelCard` of a pruned model with report `report`."""
    from huggingface_hub import ModelCard, ModelCardData

    base = base_model_of(report, config)
    source = (report.get("model") or {}).get("source")
    tags = [*TAGS, str(report.get("method"))]
    model_type = (report.get("model") or {}).get("model_type")
    if model_type:
        tags.append(str(model_type))
    data = ModelCardData(base_model=base, library_name="transformers",
                         pipeline_tag="text-generation", tags=tags)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{_body(report, base, source)}")


def write_card(folder: Path, report: dict[str, Any], config=None) -> Path:
    """Write the model card of `report` as README.md in `folder`."""
    path = Path(folder) / CARD_NAME
    model_card(report, config).save(path)
    return path
