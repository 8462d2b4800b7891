"""bench/report.py renders compare JSON files of every age: files written before probe windows
existed (no held-out fields) show "n/a", newer ones the held-out layer-error goal."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import bench_script


@pytest.fixture(scope="module")
def report():
    return bench_script("report")


def _record(method, errs, held=None):
    rec = {"method": method, "sparsity": 0.3, "ppl": 20.0 if method == "spap" else 22.0,
           "gap": 2.0 if method == "spap" else 4.0, "params_removed_frac": 0.18,
           "layer_error_mean": sum(errs) / len(errs), "layer_errors": errs, "seconds": 10.0,
           "seconds_forward": 6.0, "seconds_solve": 4.0}
    if held is not None:
        rec.update(layer_error_heldout_mean=sum(held) / len(held), layer_errors_heldout=held)
    return rec


def _result(records, probe=None):
    protocol = {"calibration": {"nsamples": 4, "seqlen": 32, "source": "wiki-offline",
                                "seed": 0, "token_hash": "a" * 64},
                "eval": {"windows": 2, "seqlen": 32, "data": "wiki-offline", "split": "test"},
                "device": "cpu", "dtype": "float32", "versions": {"torch": "x"}}
    if probe is not None:
        protocol["probe"] = probe
    return {"dense_ppl": 18.0, "protocol": protocol, "records": records}


def test_old_record_without_heldout_fields_renders(report):
    d = _result([_record("spap", [0.1] * 20), _record("obs", [0.2] * 20)])
    text = "\n".join(report.compare_section("no-such-model", d))
    assert "held-out layer error" in text
    assert "| spap | 0.3 | 0.180 | 0.1000 | n/a |" in text
    goal = [line for line in text.splitlines() if line.startswith("| 0.3 | spap | 2.00")]
    assert goal == ["| 0.3 | spap | 2.00 | obs (4.00) | 0.500 | met | 20/20 (100%, met) | n/a | "
                    "n/a |"]


def test_margin_is_against_the_strongest_baseline_variant(report):
    """A baseline variant (obs with the ridge refit) counts as a baseline through its
    base_method, and the margin is stated against whichever variant is strongest."""
    ridge = _record("obs-ridge", [0.1] * 20)
    ridge.update(base_method="obs", ppl=20.5, gap=2.5)
    wanda = _record("wanda-sp", [0.3] * 20)
    wanda.update(seconds=5.0)
    d = _result([_record("spap", [0.1] * 20), _record("obs", [0.2] * 20), ridge, wanda])
    text = "\n".join(report.compare_section("no-such-model", d))
    row = next(line for line in text.splitlines() if line.startswith("| 0.3 | spap | 2.00"))
    assert "| obs-ridge (2.50) | 0.800 | not met |" in row and row.endswith("| 2.00x |")


def test_every_spap_variant_gets_a_margin_row(report):
    """A SPAP variant (base_method spap) is stated against the same strongest baseline."""
    drift = _record("spap-drift", [0.1] * 20)
    drift.update(base_method="spap", ppl=19.0, gap=1.0)
    d = _result([_record("spap", [0.1] * 20), _record("obs", [0.2] * 20), drift])
    text = "\n".join(report.compare_section("no-such-model", d))
    rows = [line for line in text.splitlines() if line.startswith("| 0.3 | spap")]
    assert [r.split(" | ")[1] for r in rows] == ["spap", "spap-drift"]
    assert "| obs (4.00) | 0.250 | met |" in rows[1]


def test_zeroshot_section_shows_errors_and_calls_ties(report):
    def task(acc, se):
        return {"acc": acc, "acc_stderr": se, "split": "validation"}

    d = {"lm_eval_version": "x", "limit": 500, "models": {
        "dense": {"tasks": {"piqa": task(0.70, 0.02), "boolq": task(0.60, 0.02)}},
        "spap-0.3": {"tasks": {"piqa": task(0.66, 0.02), "boolq": task(0.58, 0.02)}},
        "obs-ridge-0.3": {"tasks": {"piqa": task(0.65, 0.02), "boolq": task(0.58, 0.02)}}}}
    text = "\n".join(report.zeroshot_section("m", d))
    assert "0.660 ± 0.020" in text
    assert "spap-0.3 against obs-ridge-0.3: mean difference +0.005" in text and "a tie" in text
    d["models"]["wanda-sp-0.3"] = {"tasks": {"piqa": task(0.55, 0.02), "boolq": task(0.50, 0.02)}}
    text = "\n".join(report.zeroshot_section("m", d))
    assert "spap-0.3 against wanda-sp-0.3: mean difference +0.095" in text
    assert "spap-0.3 ahead" in text


def test_heldout_goal_is_evaluated_separately(report):
    spap_held = [0.1] * 18 + [0.3] * 2  # 18/20 = 90% at or below OBS: the goal is not met
    d = _result([_record("spap", [0.1] * 20, spap_held), _record("obs", [0.2] * 20, [0.2] * 20)],
                probe={"windows": 2, "seqlen": 32, "token_hash": "b" * 64})
    text = "\n".join(report.compare_section("no-such-model", d))
    assert "20/20 (100%, met) | 18/20 (90%, not met)" in text
    assert "2 probe windows x 32 tokens" in text
    assert "| spap | 0.3 | 0.180 | 0.1000 | 0.1200 |" in text


def test_tradeoff_section_orders_by_time_with_ratio(report, tmp_path, monkeypatch):
    monkeypatch.setattr(report, "RES", tmp_path)
    recs = [_record("spap", [0.1]), _record("wanda-sp", [0.2])]
    recs[0]["seconds"], recs[1]["seconds"] = 30.0, 10.0
    lines = report.tradeoff_section("tiny", _result(recs))
    rows = [line for line in lines if line.startswith("| spap") or line.startswith("| wanda")]
    assert rows[0].startswith("| wanda-sp") and "| 1.00x |" in rows[0]
    assert "| 3.00x |" in rows[1]
    assert (tmp_path / "tradeoff-tiny.png").stat().st_size > 0


def _memory_doc(tokens, peak):
    runs = [{"tokens": n, "heldout_tokens": n // 8, "hidden": 64, "width": 256, "kept": 128,
             "epochs_run": 2, "epochs_kept": 1, "heldout_loss": [1.0, 0.9], "seconds": 1.0,
             "inputs_targets_gib": n * 64 * 4 / 2**30, "solve_peak_gib": p}
            for n, p in zip(tokens, peak)]
    return {"script": "bench/recovery_memory.py", "argv": [], "device": "cpu",
            "torch": "x", "threads": 1, "runs": runs}


def test_recovery_memory_goal_is_judged_only_at_the_goal_size(report):
    small = "\n".join(report.recovery_memory_section("cpu", _memory_doc([4608, 9216],
                                                                        [2.0, 2.1])))
    assert "Not run at 128 x 2048" in small and "**met**" not in small
    assert "| 9,216 |" in small
    ok = "\n".join(report.recovery_memory_section("cuda", _memory_doc([262144], [5.0])))
    assert "**met**, 5.00 GiB" in ok
    bad = "\n".join(report.recovery_memory_section("cuda", _memory_doc([262144], [17.0])))
    assert "**NOT met**" in bad


def test_a_pass_still_running_is_not_a_table(report, tmp_path, monkeypatch):
    monkeypatch.setattr(report, "RES", tmp_path)
    for name in ("compare-m.json", "compare-m-main.json", "compare-m-extra.json"):
        (tmp_path / name).write_text(json.dumps({"model": name}))
    assert [m for m, _ in report.load("compare-*.json")] == ["m"]


def test_head_and_budget_sections_render_a_real_compare(report):
    import torch  # noqa: F401

    from conftest import byte_tokenizer, random_ids, tiny_model
    from spap.compare import compare, parse_variants

    variants = parse_variants("heads-obs=obs:heads=0.5,heads-magnitude=obs:heads=0.5;"
                              "head_method=magnitude,obs-mlp=obs:params=0.2;params_split=mlp,"
                              "obs-kv=obs:params=0.2;params_split=kv,"
                              "obs-mlp-30=obs:params=0.3;params_split=mlp")
    d = compare(tiny_model("llama"), byte_tokenizer(), variants, [0.0],
                calib_ids=random_ids(16, 24, seed=1), eval_stream=random_ids(1, 200)[0],
                eval_seqlen=24, probe_ids=random_ids(4, 24, seed=2))
    d["protocol"]["calibration"].update(source="x", seed=0, token_hash="b" * 64)
    heads = report.heads_section("tiny", {**d, "records": d["records"][:2]})
    text = "\n".join(heads)
    assert "| heads-obs | obs | refit | 2/4 q, 2/2 kv |" in text
    assert "| heads-magnitude | magnitude | dense |" in text
    assert "- heads: obs" in text
    budget = "\n".join(report.params_section("tiny", {**d, "records": d["records"][2:]}))
    assert "| obs-kv | kv |" in budget and "| obs-mlp | mlp |" in budget
    # one summary line per budget: the 0.3 run is not one of the 0.2 budget's splits
    assert "- 0.20 of all parameters" in budget and "of its 2 splits" in budget
    assert "- 0.30 of all parameters" not in budget  # a budget with one split has no line


def test_ood_section_states_each_texts_gap_ratio_against_its_strongest_baseline(report):
    recs = [dict(_record("spap-drift", [0.1]), base_method="spap", sparsity=0.5, ppl=30.0,
                 ppl_also={"lambada-offline": 70.0}),
            dict(_record("obs-ridge-drift", [0.1]), base_method="obs", sparsity=0.5, ppl=38.0,
                 ppl_also={"lambada-offline": 80.0}),
            dict(_record("fasp-ridge", [0.1]), base_method="fasp", sparsity=0.5, ppl=40.0,
                 ppl_also={"lambada-offline": 75.0})]
    d = dict(_result(recs), dense_ppl_also={"lambada-offline": 50.0})
    text = "\n".join(report.ood_section("m", d))
    # in domain (dense 18): 12 / 20 against obs-ridge-drift; lambada (dense 50): 20 / 25
    # against fasp-ridge, the strongest there
    assert "wiki-offline 0.600 (against obs-ridge-drift)" in text
    assert "lambada-offline 0.800 (against fasp-ridge)" in text
    assert "0.200 apart" in text
    assert report.ood_section("m", _result(recs)) == []  # no second text: no section
    assert "wanda-sp's" not in text  # no wanda-sp run at that sparsity: no time ratio
    wanda = dict(_record("wanda-sp", [0.3]), sparsity=0.5, ppl=90.0, seconds=4.0,
                 ppl_also={"lambada-offline": 200.0})
    timed = "\n".join(report.ood_section("m", dict(_result(recs + [wanda]),
                                                      dense_ppl_also={"lambada-offline": 50.0})))
    assert "prune time 2.5x wanda-sp's" in timed  # spap-drift's 10 s against 4 s
    assert "| spap-drift | 0.5 | 30.00 | 70.00 | 10 |" in timed


def test_fisher_section_gives_each_variants_perplexity_rise(report):
    r = {"obs-ridge": {"probe_ppl": 11.0, "probe_rel_error": 0.2},
         "obs-ridge-fisher": {"probe_ppl": 10.5, "probe_rel_error": 0.25,
                              "kept_of_top5pct_norm": 0.5}}
    d = {"model": "m", "sparsity": 0.5, "dense_probe_ppl": 10.0, "command": "x",
         "variants": {"obs-ridge": {}, "obs-ridge-fisher": {}},
         "results": {"3": r, "14": {k: dict(v, probe_ppl=v["probe_ppl"] + 1)
                                    for k, v in r.items()}}}
    text = "\n".join(report.fisher_section("m", d))
    assert "| obs-ridge | 1.0000 (0.2000) | 2.0000 (0.2000) | 1.5000 | n/a |" in text
    assert "| obs-ridge-fisher | 0.5000 (0.2500) | 1.5000 (0.2500) | 1.0000 | 0.50 |" in text
    assert text.index("layer 3:") < text.index("layer 14:")


def test_seeds_section_gives_the_out_of_domain_ratio_where_a_seed_has_it(report):
    def seed_file(seed, spap_ppl, obs_ppl, also=None):
        recs = [dict(_record("spap-drift", [0.1]), base_method="spap", sparsity=0.5,
                     ppl=spap_ppl, gap=spap_ppl - 18.0),
                dict(_record("obs-ridge-drift", [0.1]), base_method="obs", sparsity=0.5,
                     ppl=obs_ppl, gap=obs_ppl - 18.0)]
        d = _result(recs)
        d["protocol"]["calibration"].update(seed=seed, token_hash=str(seed) * 64)
        if also:
            for r, ppl in zip(recs, also):
                r["ppl_also"] = {"lambada": ppl}
            d["dense_ppl_also"] = {"lambada": 50.0}
        return d

    # seed 0: in domain 12 / 20 = 0.6; lambada (dense 50) 30 / 40 = 0.75. Seed 1: no lambada.
    # The seed-0 reference file lacks the second text; a later file with the same model's
    # perplexity lends it, one with another perplexity would not.
    ref = seed_file(0, 30.0, 38.0)
    later = seed_file(0, 30.0 * (1 + 1e-7), 38.0, also=(80.0, 90.0))
    text = "\n".join(report.seeds_section([("m", seed_file(1, 28.0, 38.0))], [ref, later]))
    assert "mean gap ratio over 2 seed(s) **0.550**" in text
    assert "mean gap ratio over 1 seed(s) 0.750, against 0.600 in domain" in text
    assert "0.150 apart" in text
    other = seed_file(0, 31.0, 38.0, also=(80.0, 90.0))
    text = "\n".join(report.seeds_section([("m", seed_file(1, 28.0, 38.0))], [ref, other]))
    assert "On lambada" not in text  # another spap model at seed 0: no second-text ratio


# ---- the layout of BENCHMARKS.md and the README's generated blocks ---------------------------

ROOT = Path(__file__).resolve().parents[1]


def test_benchmarks_md_is_what_report_writes(report):
    """The committed BENCHMARKS.md is the generator's output: tables and their protocol
    first, then the pointer to the commands, then one provenance line per result file."""
    text = report.benchmarks_text()
    assert (ROOT / "BENCHMARKS.md").read_text() == text, "run `python bench/report.py`"
    first_table = text.index("\n| ")
    assert first_table < text.index("## Reproducing these numbers") < text.index(
        "## Where each file comes from")
    assert "```bash" not in text  # the commands live in bench/README.md
    assert "bench/README.md" in text


def test_every_result_file_has_one_provenance_line(report):
    prov = json.loads((ROOT / "bench" / "provenance.json").read_text())["files"]
    files = report.results_files()
    missing = sorted(set(files) - set(prov))
    assert missing == [], f"add a line for each to bench/provenance.json: {missing}"
    assert sorted(set(prov) - set(files)) == []  # no line for a file that is gone
    lines = [line for line in report.provenance_lines() if line.startswith("- `")]
    assert [line.split("`")[1] for line in lines] == files


def test_effort_table_says_when_nothing_is_measured(report):
    (line,) = report.effort_lines([])
    assert line.startswith("Not yet measured")


def test_effort_table_gives_each_level_against_the_strongest_baseline(report):
    """Each SPAP record's level (its own field, its variant's run settings, or spap's default
    level), its precision, its gap ratio against the strongest baseline other than wanda-sp on
    both texts, and its time against wanda-sp's."""
    fast = _record("fast", [0.1])
    fast.update(base_method="spap", effort="fast", ppl=21.0, gap=3.0, seconds=120.0,
                ppl_also={"lambada-offline": 50.0})
    plain = _record("default", [0.1])
    plain.update(base_method="spap", ppl=20.0, gap=2.0, seconds=30.0,
                 ppl_also={"lambada-offline": 45.0})
    f32 = _record("best-f32", [0.1])
    f32.update(base_method="spap", ppl=20.0, gap=2.0, seconds=90.0)
    obs = _record("obs", [0.2])
    obs.update(base_method="obs", ppl_also={"lambada-offline": 60.0})
    wanda = _record("wanda-sp", [0.5])
    wanda.update(base_method="wanda-sp", ppl=19.0, gap=1.0, seconds=15.0)  # never the baseline
    d = _result([fast, plain, f32, obs, wanda])
    d.update(model="tiny", dense_ppl_also={"lambada-offline": 40.0},
             variants=[{"name": "best-f32", "method": "spap",
                        "settings": {"effort": "default", "compute": "float32"}}])
    rows = [line for line in report.effort_lines([("tiny", d)]) if line.startswith("| tiny")]
    assert rows == [
        "| tiny, r=0.3 (0) | `fast` | bfloat16 | 21.00 (0.750) | 50.00 (0.500) | 2 min (8.0x) |",
        "| tiny, r=0.3 (0) | `default` | bfloat16 | 20.00 (0.500) | 45.00 (0.250) | 30 s (2.0x) |",
        "| tiny, r=0.3 (0) | `default` | float32 | 20.00 (0.500) | n/a | 2 min (6.0x) |",
    ]


def test_effort_table_pairs_each_level_with_the_baseline_run_at_it(report):
    """A baseline run at a level is the reference of that level's SPAP row (like for like),
    the level read from the shared options it ran with (obs stated at `default` but given
    `out_weight=fisher` too ran at `max`'s); a level no baseline ran at takes the strongest
    baseline; the note names the strongest and each paired row's ratio against it."""
    plain = _record("default", [0.1])
    plain.update(base_method="spap", ppl=20.0, gap=2.0)
    best = _record("max", [0.1])
    best.update(base_method="spap", effort="max", ppl=19.0, gap=1.0)
    fast = _record("fast", [0.1])
    fast.update(base_method="spap", effort="fast", ppl=21.0, gap=3.0)
    obs = _record("obs-default", [0.2])
    obs.update(base_method="obs", ppl=22.0, gap=4.0)
    obs.update(options={"refit": "ridge", "refit_target": "drift", "out_weight": "none"})
    obs_max = _record("obs-fd", [0.2])
    obs_max.update(base_method="obs", ppl=20.5, gap=2.5,
                   options={"refit": "ridge", "refit_target": "drift", "out_weight": "fisher"})
    d = _result([plain, best, fast, obs, obs_max])
    d.update(model="tiny", variants=[
        {"name": "obs-default", "method": "obs", "settings": {"effort": "default"}},
        {"name": "obs-fd", "method": "obs", "options": {"out_weight": "fisher"},
         "settings": {"effort": "default"}}])
    lines = report.effort_lines([("tiny", d)])
    ratios = {r.split(" | ")[1]: r.split(" | ")[3] for r in lines if r.startswith("| tiny")}
    assert ratios == {"`default`": "20.00 (0.500)", "`max`": "19.00 (0.400)",
                      "`fast`": "21.00 (1.200)"}
    assert ("strongest baseline obs-fd 20.50 (at `max`); `default` (bfloat16) is paired with "
            "obs-default 22.00, and against the strongest gives 0.800" in lines[-1])


def test_readme_blocks_are_replaced_between_their_markers_only(report):
    text = ("intro 1.5\n<!-- effort-table:begin -->\nold 9.9\n<!-- effort-table:end -->\n"
            "outro\n")
    out = report.fill_blocks(text, {"effort-table": ["new"]})
    assert out == "intro 1.5\n<!-- effort-table:begin -->\nnew\n<!-- effort-table:end -->\noutro\n"
    with pytest.raises(SystemExit, match="results-table"):
        report.fill_blocks(text, {"results-table": ["x"]})


def test_readme_generated_blocks_are_current(report):
    readme = (ROOT / "README.md").read_text()
    assert report.readme_text(readme) == readme, "run `python bench/report.py`"
    for name in report.README_BLOCKS:
        assert f"<!-- {name}:begin -->" in readme
