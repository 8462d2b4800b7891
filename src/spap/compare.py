"""`spap compare`: every method at every sparsity on one model, under one protocol.

Perplexities from separate `spap prune --eval` runs are only comparable if every run drew the
same calibration windows and scored the same evaluation windows. Here the model and the
tokenizer are loaded once, the calibration ids are drawn once and the held-out text is
tokenized once; each (method, sparsity) run then prunes a fresh deep copy of the dense model
(kept pristine on the CPU) with exactly those ids and is scored on exactly those windows. The
JSON is rewritten atomically after every run, so an interrupted comparison keeps what it
measured.

Each layer's MLP error is reported twice: in-sample, on the calibration windows the solver
fitted, and held-out, on probe windows cut from the end of the evaluation text (disjoint from
the perplexity windows, which come from its start) that enter no statistics. A method can
overfit its calibration windows; only the held-out error shows it.

A method is named in `--methods` as `method`, or as a variant `name=method:key=val;key=val`
(e.g. `spap-fast=spap:recovery=none`) so the same method can appear with different options.
The keys `heads`, `kv_groups`, `head_method` and `head.<option>` set the variant's attention
pruning instead (e.g. `obs-h33=obs:refit=ridge;heads=0.34;head_method=wanda-sp`), so head
decisions compare on the same tokens too; `params`, `params_of` and `params_split` give it a
parameter budget (its sparsity then comes from the split, not from `--sparsities`);
`effort` and `compute` set the variant's effort level and the precision of its products
(e.g. `obs-ridge-drift=obs:effort=default`, `spap-f32=spap:compute=float32`).
"""

from __future__ import annotations

import copy
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import SpapError
from .eval.speed import weight_bytes
from .files import finite_or_none, write_json_atomic
from .modelio.runfolder import PARTIAL_SUFFIX, RunFolder

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Variant:
    """One line of the comparison: a display name, a solver name and its options."""

    name: str
    method: str
    options: dict[str, Any] = field(default_factory=dict)
    # run settings beside the method's options: heads, kv_groups, head_method, head_options
    settings: dict[str, Any] = field(default_factory=dict)


#: variant keys that are run settings (PruneConfig fields), not method options
RUN_KEYS = ("heads", "kv_groups", "head_method", "params", "params_of", "params_split",
            "effort", "compute")
HEAD_PREFIX = "head."


def _split_settings(options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(method options, run settings) of a variant's keys."""
    opts, settings, head = {}, {}, {}
    for k, v in options.items():
        if k in RUN_KEYS:
            settings[k] = v
        elif k.startswith(HEAD_PREFIX):
            head[k[len(HEAD_PREFIX):]] = v
        else:
            opts[k] = v
    if head:
        settings["head_options"] = head
    return opts, settings


def split_variants(spec: str, standalone=()) -> list[str]:
    """`--methods`'s comma-separated items, with a comma inside an option's list value kept in
    that value: `a=spap:recovery_shrink=0.25,0.5,obs` is two items, `a=spap:recovery_shrink=
    0.25,0.5` and `obs`. An item continues the one before it when that one has options (a
    ':') and the item, up to its first ';', has no '=' or ':' and is not a method or one of
    `standalone`'s names."""
    from .solvers import METHODS

    names = set(METHODS) | set(standalone)
    out: list[str] = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        head = item.split(";", 1)[0]  # the rest of a list value, maybe more options after it
        if out and ":" in out[-1] and "=" not in head and ":" not in head and item not in names:
            out[-1] += "," + item
        else:
            out.append(item)
    return out


def parse_variants(spec: str | None, option_items: list[str] | None = None) -> list[Variant]:
    """`--methods` and `--option` into validated variants (no model needed).

    `spec` is comma-separated; each item is `method`, `name=method` or
    `name=method:key=val;key=val` (an unnamed `method:key=val` is named by its text).
    Each `--option` item is `target:key=value`, where target is a method (every variant of it)
    or a variant name; options written in the variant itself take precedence.
    """
    from .config import parse_options
    from .solvers import METHODS, get_solver

    items = split_variants(spec or ",".join(METHODS))
    if not items:
        raise SpapError("--methods is empty; e.g. --methods spap,obs")
    parsed: list[tuple[str, str, dict[str, Any]]] = []
    for item in items:
        name, sep, rest = item.partition("=")
        if not sep or ":" in name:  # no name given: `method` or `method:key=val`
            name, rest = item, item
        method, _, opts = rest.partition(":")
        name, method = name.strip(), method.strip()
        if not name or not method:
            raise SpapError(f"--methods: cannot read '{item}'; use method or name=method:key=val")
        inline = parse_options([o for o in opts.split(";") if o.strip()])
        parsed.append((name, method, inline))
    names = [p[0] for p in parsed]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise SpapError(f"--methods: name(s) {dup} appear twice; name variants name=method:...")

    extra: dict[str, dict[str, Any]] = {}
    for item in option_items or []:
        target, sep, kv = item.partition(":")
        if not sep or "=" in target:
            raise SpapError(f"--option expects method:key=value, got '{item}'")
        target = target.strip()
        if target not in names and target not in {p[1] for p in parsed}:
            raise SpapError(
                f"--option '{item}': '{target}' is neither a method nor a variant in --methods "
                f"({', '.join(names)})"
            )
        extra.setdefault(target, {}).update(parse_options([kv]))

    out = []
    for name, method, inline in parsed:
        options = {**extra.get(method, {}), **(extra.get(name, {}) if name != method else {}),
                   **inline}
        options, settings = _split_settings(options)
        get_solver(method, **options)  # unknown method or option: SpapError naming the choices
        if settings:
            from .config import PruneConfig

            PruneConfig.build(**settings).validate()
        out.append(Variant(name, method, options, settings))
    return out


def parse_sparsities(spec: str) -> list[float]:
    """`0.2,0.3` into floats in [0, 1), duplicates dropped, order kept."""
    out: list[float] = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        try:
            s = float(item)
        except ValueError:
            raise SpapError(f"--sparsities: '{item}' is not a number; e.g. 0.2,0.3,0.4") from None
        if not math.isfinite(s) or not 0 <= s < 1:
            raise SpapError(f"--sparsities: {item} is not in [0, 1); e.g. 0.2,0.3,0.4")
        if s not in out:
            out.append(s)
    if not out:
        raise SpapError("--sparsities is empty; e.g. --sparsities 0.2,0.3,0.4")
    return out


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


DENSE_COPY_MODES = ("auto", "copy", "reload")
# "auto" reloads unless the available host memory holds this many more model copies: the
# pruned copy, plus room for the calibration activations and the solver
COPY_HEADROOM = 1.5


def choose_dense_copy(mode: str, model_bytes: int, can_reload: bool,
                      available: int | None = None) -> str:
    """"copy" or "reload" for `compare`'s `dense_copy` (see there), for a model whose weights
    take `model_bytes`; `available` host bytes default to psutil's figure."""
    if mode not in DENSE_COPY_MODES:
        raise SpapError(f"--dense-copy must be one of {', '.join(DENSE_COPY_MODES)}, got '{mode}'")
    if mode == "reload" and not can_reload:
        raise SpapError("dense_copy='reload' needs a reload function")
    if mode != "auto":
        return mode
    if available is None:
        import psutil

        available = psutil.virtual_memory().available
    return "reload" if can_reload and available < COPY_HEADROOM * model_bytes else "copy"


class _Scorer:
    """Perplexity of a model on the comparison's evaluation text (`main`) and on every second
    text (`also`), all on the same window size and count."""

    def __init__(self, tokenizer, device: torch.device, seqlen: int, windows: int | None,
                 batch_size: int, progress: bool, text: tuple[str, torch.Tensor, str | None],
                 also: dict[str, tuple[torch.Tensor, str | None]], bos: str = "auto") -> None:
        self.tokenizer, self.device, self.progress, self.bos = tokenizer, device, progress, bos
        self.seqlen, self.windows, self.batch_size = seqlen, windows, batch_size
        self.text, self.others = text, also

    def _on(self, m, data: str, stream: torch.Tensor, split: str | None) -> dict[str, Any]:
        from .eval.ppl import perplexity

        r = perplexity(m.to(self.device), self.tokenizer, data=data, seqlen=self.seqlen,
                       windows=self.windows, batch_size=self.batch_size, device=self.device,
                       stream=stream, progress=self.progress, bos=self.bos)
        if split is not None:
            r["protocol"]["split"] = split
        return r

    def main(self, m) -> dict[str, Any]:
        return self._on(m, *self.text)

    def also(self, m) -> dict[str, dict[str, Any]]:
        return {src: self._on(m, src, stream, split)
                for src, (stream, split) in self.others.items()}


def _prune_run(m, tokenizer, v: Variant, s: float, run_dir: Path | None, *,
               probe_ids: torch.Tensor | None, **prune_args):
    """Prune `m` in place with variant `v` at sparsity `s`: (the PruneResult, its seconds).
    A resumed prune's seconds add the recorded seconds of the layers it took over."""
    from .api import prune

    t0 = time.perf_counter()
    pr = prune(m, tokenizer, s, method=v.method, method_options=v.options,
               allow_unsaveable=True, probe_ids=probe_ids, checkpoint_dir=run_dir,
               **prune_args, **v.settings)
    seconds = time.perf_counter() - t0
    resumed = pr.report.get("resumed_from_layer") or 0
    # the layers taken over from the killed call: their own recorded seconds
    seconds += sum(sum(layer["seconds"].values()) for layer in pr.report["layers"][:resumed])
    return pr, seconds


def _save(m, tokenizer, folder: Path, report: dict[str, Any],
          calib_ids: torch.Tensor) -> str | None:
    """Save the pruned model `m` (reload-checked) to `folder`; None for a model that stock
    transformers could not reload (`report["saveable"]` False)."""
    if not report.get("saveable", True):
        return None
    from .modelio.export import save_pruned

    return str(save_pruned(m.to("cpu"), tokenizer, folder, report, overwrite=True,
                           check_ids=calib_ids[:1, :64]))


def _record(v: Variant, s: float, rep: dict[str, Any], ev: dict[str, Any],
            ev_also: dict[str, dict[str, Any]], dense_ppl: float, seconds: float,
            saved: str | None, *, heldout: bool, resume: bool) -> dict[str, Any]:
    """One run's line of the results file, from its prune report and its scores."""
    layers = rep["layers"]
    return {
        "method": v.name,
        "base_method": v.method,
        "sparsity": s,
        "ppl": finite_or_none(ev["ppl"]),
        "dense_ppl": finite_or_none(dense_ppl),
        "gap": finite_or_none(ev["ppl"] - dense_ppl),
        **({"ppl_also": {k: finite_or_none(r["ppl"]) for k, r in ev_also.items()}}
           if ev_also else {}),
        "params_removed_frac": rep["params_removed_frac"],
        "params_non_embedding_removed_frac": rep["params_non_embedding_removed_frac"],
        "heads": rep.get("heads"),
        "params_target": rep.get("params_target"),
        "sparsity_achieved": rep["sparsity_achieved"],
        "width_after": rep["model"]["width_after"],
        "saveable": rep.get("saveable", True),
        "layer_error_mean": rep["layer_error_mean"],
        "layer_errors": [layer["rel_error"] for layer in layers],
        "layer_error_heldout_mean": rep["layer_error_heldout_mean"],
        "layer_errors_heldout": ([layer["rel_error_heldout"] for layer in layers]
                                 if heldout else None),
        "seconds": seconds,
        "seconds_solve": sum(layer["seconds"]["solve"] for layer in layers),
        # layer forwards on calibration data (statistics + replay); the layer-0
        # capture is in "seconds" only
        "seconds_forward": sum(layer["seconds"]["collect"] + layer["seconds"]["replay"]
                               for layer in layers),
        "seconds_eval": ev["seconds"],
        "options": rep["options"],
        "effort": (rep.get("effort") or {}).get("level"),
        "compute": (rep.get("precision") or {}).get("compute"),
        # what each layer chose out of sample (None where the method chooses nothing)
        "layer_ridge": [layer["info"].get("ridge") for layer in layers],
        "layer_recovery_epochs": [layer["info"].get("recovery_epochs")
                                  for layer in layers],
        "layer_drift_alpha": [layer["info"].get("drift_alpha") for layer in layers],
        "saved": saved,
        **({"resumed_from_layer": rep.get("resumed_from_layer") or 0} if resume else {}),
    }


def compare(
    model,
    tokenizer,
    variants: list[Variant],
    sparsities: list[float],
    *,
    calib_ids: torch.Tensor,
    eval_stream: torch.Tensor,
    eval_seqlen: int = 2048,
    eval_windows: int | None = None,
    eval_data: str = "wiki-offline",
    eval_split: str | None = None,
    calib_desc: dict[str, Any] | None = None,
    model_name: str | None = None,
    device: str | torch.device = "cpu",
    batch_size: int = 4,
    round_to: int = 1,
    json_path: str | os.PathLike | None = None,
    progress: bool = False,
    probe_ids: torch.Tensor | None = None,
    probe_desc: dict[str, Any] | None = None,
    save_dir: str | os.PathLike | None = None,
    reload: Callable[[], Any] | None = None,
    dense_copy: str = "auto",
    also_eval: dict[str, tuple[torch.Tensor, str]] | None = None,
    resume: bool = False,
    bos: str = "auto",
) -> dict[str, Any]:
    """Prune a copy of the dense `model` (left untouched, on the CPU) with every variant at
    every sparsity and score it on the same evaluation windows.

    `dense_copy` says where each run's fresh dense model comes from: "copy" (a deep copy of
    `model`, kept in host memory all along), "reload" (`reload()`, e.g. loading the checkpoint
    again; `model` is dropped after the dense score, so host memory holds one model, not
    two), or "auto" (reload when a reload is given and host memory could not hold a second
    copy, see `choose_dense_copy`).

    `probe_ids` (n_probe, seqlen) give every record a held-out layer error; they must be
    disjoint from the calibration and evaluation windows (`run_cli` takes them from the tail
    of the evaluation stream and `eval_stream` without it). `probe_desc` describes them.

    Returns {"model", "dense_ppl", "protocol", "records": [...]} and, with `json_path`,
    rewrites that file after the dense score and after every record. With `save_dir`, every
    saveable pruned model is also saved (reload-checked) as `save_dir/<method>-<sparsity>`,
    so zero-shot evaluation runs on exactly the models compared.

    `also_eval` maps the name of a second text (e.g. "lambada-offline", out of domain for a
    Wikipedia calibration) to (its held-out token stream, its split): the dense model and
    every record also get a perplexity there, on the same window size and count
    (`dense_ppl_also`, each record's `ppl_also`; protocols under `protocol.also_eval`).

    `bos` ("auto", "always", "never") puts a BOS token in front of every perplexity window
    (data.py); `calib_ids` and `probe_ids` are drawn with the same setting by the caller.

    `resume` (needs `json_path`) makes a killed comparison continuable: every prune keeps its
    finished layers in a run folder beside the JSON (`.<json name>.spap-partial/<variant>-
    <sparsity>`, removed once its record is written), and a call with the same arguments
    keeps the records the JSON already holds, skips those runs, and continues the unfinished
    prune from its last finished layer, bit-identical to an uninterrupted one. A JSON of
    another comparison (model, protocol, variants, sparsities or dense perplexity) is
    refused. A resumed record's `seconds` is this call's wall time plus the per-layer
    seconds of the layers it took over (`resumed_from_layer` says how many).
    """
    from .versions import versions

    device = torch.device(device)
    path = Path(json_path) if json_path is not None else None
    if resume and path is None:
        raise SpapError("a resumable comparison needs a results file (json_path / --json)")
    dense = model.to("cpu")
    also = also_eval or {}
    scorer = _Scorer(tokenizer, device, eval_seqlen, eval_windows, batch_size, progress,
                     (eval_data, eval_stream, eval_split), also, bos)
    score, score_also = scorer.main, scorer.also

    mode = choose_dense_copy(dense_copy, weight_bytes(dense), reload is not None)
    variant_desc = [{"name": v.name, "method": v.method, "options": v.options,
                     **({"settings": v.settings} if v.settings else {})} for v in variants]
    name = model_name or getattr(dense.config, "_name_or_path", "")
    if resume and path.exists():  # what is known before the dense model is scored
        _resumable_records(path, {"model": name, "variants": variant_desc,
                                  "sparsities": sparsities}, early=True)
    d = score(dense)
    d_also = score_also(dense)
    dense.to("cpu")
    dtype = str(dense.dtype).replace("torch.", "")
    dense_params = sum(p.numel() for p in dense.parameters())
    if mode == "reload":
        del model, dense  # the caller passed its only reference: one model in memory, not two
    result: dict[str, Any] = {
        "model": name,
        "dense_ppl": finite_or_none(d["ppl"]),
        "protocol": {
            "eval": d["protocol"],
            "calibration": calib_desc or {"nsamples": int(calib_ids.shape[0]),
                                          "seqlen": int(calib_ids.shape[1])},
            "probe": _probe_protocol(probe_ids, probe_desc),
            **({"also_eval": {k: r["protocol"] for k, r in d_also.items()}} if also else {}),
            "device": str(device),
            "dtype": dtype,
            "batch_size": batch_size,
            "round_to": round_to,
            "copy": ("each run prunes a deep copy of the dense model" if mode == "copy" else
                     "each run prunes the dense model reloaded from its checkpoint"),
            "versions": versions(),
        },
        "dense": {"params": dense_params,
                  "seconds_eval": d["seconds"]},
        **({"dense_ppl_also": {k: finite_or_none(r["ppl"]) for k, r in d_also.items()}}
           if also else {}),
        "variants": variant_desc,
        "sparsities": sparsities,
        "records": [],
    }
    run_root = path.parent / f".{path.name}{PARTIAL_SUFFIX}" if resume else None
    if resume and path.exists():
        result["records"] = _resumable_records(path, result)
    done = {(r["method"], r["sparsity"]) for r in result["records"]}
    if path:
        write_json_atomic(path, result)

    # sparsity-major: the methods of one sparsity run back to back, so their wall times are
    # taken under the same machine load
    runs = [(v, s) for s in sparsities for v in variants]
    from tqdm.auto import tqdm

    with tqdm(total=len(runs), desc="compare", unit="run", disable=not progress) as bar:
        for v, s in runs:
            bar.set_description(f"compare {v.name} @ {s:g}")
            if (v.name, s) in done:  # (a resumed comparison's finished record)
                bar.update()
                continue
            run_dir = run_root / f"{v.name}-{s:g}" if run_root is not None else None
            m = copy.deepcopy(dense) if mode == "copy" else reload().to("cpu")
            pr, seconds = _prune_run(m, tokenizer, v, s, run_dir, calib_ids=calib_ids,
                                     calib_desc=calib_desc, device=device,
                                     batch_size=batch_size, round_to=round_to,
                                     progress=progress, probe_ids=probe_ids)
            ev = score(m)
            ev_also = score_also(m)
            saved = (_save(m, tokenizer, Path(save_dir) / f"{v.name}-{s:g}", pr.report,
                           calib_ids) if save_dir is not None else None)
            del m, pr.model
            _free(device)
            rec = _record(v, s, pr.report, ev, ev_also, d["ppl"], seconds, saved,
                          heldout=probe_ids is not None, resume=resume)
            result["records"].append(rec)
            if path:
                write_json_atomic(path, result)
            if run_dir is not None:
                RunFolder(run_dir).remove()
            log.info("%s @ %g: ppl %.4g (dense %.4g), %.1f s", v.name, s, ev["ppl"], d["ppl"],
                     seconds)
            bar.set_postfix(ppl=f"{ev['ppl']:.4g}")
            bar.update()
    if run_root is not None and run_root.is_dir() and not any(run_root.iterdir()):
        run_root.rmdir()
    return result


# what must be the same for a results file's records to be kept by a resumed comparison
_RESUME_KEYS = ("model", "protocol", "variants", "sparsities", "dense_ppl_also")


def _resumable_records(path: Path, new: dict[str, Any],
                       early: bool = False) -> list[dict[str, Any]]:
    """The records of the comparison in `path` when it is the one `new` describes (`early`:
    only the keys `new` has, checked before the dense model is scored)."""
    import json

    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SpapError(f"{path}: cannot read it to resume ({type(e).__name__}); remove it "
                        "or give another --json") from None
    differ = [k for k in _RESUME_KEYS if (k in new or not early) and old.get(k) != new.get(k)]
    a, b = old.get("dense_ppl"), new.get("dense_ppl")
    if not early and (a is None or b is None or abs(a - b) > 1e-9 * abs(b)):
        differ.append("dense_ppl")
    if differ:
        raise SpapError(f"{path} holds another comparison (its {', '.join(differ)} differ); "
                        "resume refused: remove it or give another --json")
    return list(old.get("records", []))


def _probe_protocol(probe_ids: torch.Tensor | None,
                    desc: dict[str, Any] | None) -> dict[str, Any] | None:
    """What the held-out layer errors were measured on (None: no probes, no such errors)."""
    from .data import probe_description

    if probe_ids is None:
        return None
    return {**(desc or {}), **probe_description(probe_ids)}


def format_table(result: dict[str, Any]) -> str:
    """One line per record, dense first: perplexity, gap, size, layer errors and time."""
    header = ("method", "sparsity", "ppl", "gap", "params removed", "layer err",
              "held-out err", "prune s", "forward s", "solve s")

    def num(x, fmt):
        return "n/a" if x is None else format(x, fmt)

    probed = "0" if result.get("protocol", {}).get("probe") else "n/a"
    rows = [("dense", "0", num(result["dense_ppl"], ".3f"), "0", "0", "0", probed, "", "", "")]
    for r in result["records"]:
        rows.append((r["method"] + ("" if r.get("saveable", True) else " (in memory)"),
                     f"{r['sparsity']:g}", num(r["ppl"], ".3f"), num(r["gap"], "+.3f"),
                     f"{r['params_removed_frac']:.3f}", f"{r['layer_error_mean']:.4f}",
                     num(r.get("layer_error_heldout_mean"), ".4f"), f"{r['seconds']:.1f}",
                     f"{r['seconds_forward']:.1f}", f"{r['seconds_solve']:.1f}"))
    cells = [header, *rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = []
    for j, r in enumerate(cells):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(r, widths))))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _check_plot_path(path: str | os.PathLike) -> None:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise SpapError("--plot needs matplotlib: pip install 'spap[plot]'") from None
    kinds = Figure().canvas.get_supported_filetypes()
    suffix = Path(path).suffix.lstrip(".").lower()
    if suffix not in kinds:
        raise SpapError(f"--plot '{path}': unknown image type; use one of "
                        f"{', '.join(sorted(kinds))} (e.g. out.png)")


def plot(result: dict[str, Any], path: str | os.PathLike) -> Path:
    """Perplexity against sparsity, one line per method, dense dashed, log-scale y.
    Works on a saved JSON too: `plot(json.load(open(f)), "out.png")`."""
    _check_plot_path(path)
    # A bare Figure, not pyplot: no global figure state and no GUI backend; savefig renders
    # raster formats with Agg.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot()
    names = list(dict.fromkeys(r["method"] for r in result["records"]))
    for name in names:
        pts = sorted((r["sparsity"], r["ppl"]) for r in result["records"]
                     if r["method"] == name and r["ppl"] is not None)
        if pts:
            ax.plot(*zip(*pts), marker="o", label=name)
    if result["dense_ppl"] is not None:
        ax.axhline(result["dense_ppl"], color="gray", linestyle="--",
                   label=f"dense ({result['dense_ppl']:.2f})")
    ax.set_yscale("log")
    ax.set_xlabel("MLP channel sparsity")
    ax.set_ylabel("perplexity (log scale)")
    ev = result["protocol"]["eval"]
    cal = result["protocol"]["calibration"]
    model = Path(str(result["model"])).name or str(result["model"])
    ax.set_title(f"{model}\nppl: {ev['data']}, {ev['windows']}x{ev['seqlen']} tokens; "
                 f"calib: {cal.get('source', '?')}, {cal['nsamples']}x{cal['seqlen']}",
                 fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=150)
    return out


def split_probes(
    stream: torch.Tensor, n_probe: int, seqlen: int, eval_seqlen: int, eval_windows: int | None,
    bos: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, Any] | None]:
    """Cut `n_probe` windows of `seqlen` tokens off the end of the evaluation stream; return
    (the stream perplexity is computed on, the probe ids, their description).

    Perplexity windows come from the start, so they stay what they were when `eval_windows`
    fit before the probes (refused otherwise); with all windows (`eval_windows` None) the
    evaluation stream is shortened to end where the probes begin, leaving at least one window.
    `bos`: the token in front of every window, or None (data.py).
    """
    from .data import probe_windows, text_tokens

    if n_probe == 0:
        return stream, None, None
    total = stream.numel()
    per = text_tokens(eval_seqlen, 1, bos)  # stream tokens per perplexity window
    skip = text_tokens(eval_seqlen, 1 if eval_windows is None else min(eval_windows,
                                                                        total // per), bos)
    probe = probe_windows(stream, n_probe, seqlen, skip, bos)
    start = total - text_tokens(seqlen, n_probe, bos)
    desc = {"position": "the end of the evaluation stream, after every perplexity window",
            "start_token": start, "stream_tokens": total, "eval_stream_tokens": start}
    return stream[:start], probe, desc


def run_cli(args) -> int:
    """`spap compare` (flags in cli.build_parser): validate everything, load once, compare."""
    from .config import CalibConfig
    from .data import bos_line, bos_token, calibration_ids, load_text, tokenize
    from .modelio.loading import load_model, resolve_device

    # Everything that can be checked without the model is checked first.
    variants = parse_variants(args.methods, args.option)
    sparsities = parse_sparsities(args.sparsities)
    ccfg = CalibConfig(args.calib, args.nsamples, args.seqlen, args.seed, args.bos)
    ccfg.validate()
    if args.eval_seqlen < 2:
        raise SpapError(f"--eval-seqlen must be at least 2, got {args.eval_seqlen}")
    if args.eval_windows is not None and args.eval_windows < 1:
        raise SpapError(f"--eval-windows must be at least 1, got {args.eval_windows}")
    if args.batch_size < 1:
        raise SpapError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.round_to < 1:
        raise SpapError(f"--round-to must be a positive multiple, got {args.round_to}")
    n_probe = max(1, args.nsamples // 4) if args.probe_windows is None else args.probe_windows
    if n_probe < 0:
        raise SpapError(f"--probe-windows must be at least 0 (0 disables), got {n_probe}")
    also_sources = [x.strip() for x in (args.also_eval or "").split(",") if x.strip()]
    if len(set(also_sources)) != len(also_sources) or args.eval_data in also_sources:
        raise SpapError(f"--also-eval names each text once, other than --eval-data "
                        f"({args.eval_data}); got '{args.also_eval}'")
    also_texts = {src: load_text(src, "test") for src in also_sources}  # before the model
    if args.plot:
        _check_plot_path(args.plot)
    device = resolve_device(args.device)

    loaded = list(load_model(args.model, args.dtype, device))
    tok, src = loaded[1], loaded[2]
    calib_ids, calib_desc = calibration_ids(tok, ccfg)
    eval_text = load_text(args.eval_data, "test")
    stream = tokenize(tok, eval_text)
    eval_stream, probe_ids, probe_desc = split_probes(
        stream, n_probe, args.seqlen, args.eval_seqlen, args.eval_windows,
        bos_token(tok, args.bos)
    )
    if probe_desc is not None:
        probe_desc = {"source": args.eval_data, "split": eval_text.split, **probe_desc}
    also = {src: (tokenize(tok, text), text.split) for src, text in also_texts.items()}

    def reload():
        return load_model(args.model, args.dtype, device)[0]

    # the list hands compare() the only reference to the model, so "reload" can free it
    result = compare(
        loaded.pop(0), tok, variants, sparsities, calib_ids=calib_ids, eval_stream=eval_stream,
        eval_seqlen=args.eval_seqlen, eval_windows=args.eval_windows, eval_data=args.eval_data,
        eval_split=eval_text.split, calib_desc=calib_desc, model_name=src.spec, device=device,
        batch_size=args.batch_size, round_to=args.round_to, json_path=args.json, progress=True,
        probe_ids=probe_ids, probe_desc=probe_desc, save_dir=args.save_models,
        reload=reload, dense_copy=args.dense_copy, also_eval=also, resume=args.resume,
        bos=args.bos,
    )
    print()
    print(format_table(result))
    print(f"\nprotocol: {bos_line(result['protocol']['eval']['bos'])}; each window holds "
          f"{result['protocol']['eval']['seqlen']} tokens")
    for src, ppl in result.get("dense_ppl_also", {}).items():
        print(f"\n{src}: dense {ppl:.4g}; " + ", ".join(
            f"{r['method']} @ {r['sparsity']:g} {r['ppl_also'][src]:.4g}"
            for r in result["records"] if r["ppl_also"][src] is not None))
    print(f"\nresults in {args.json}")
    if args.plot:
        print(f"plot in {plot(result, args.plot)}")
    return 0
