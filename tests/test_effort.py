"""Effort levels (solvers/presets.py): each level runs and records the options it set, explicit
options override it, baselines take the generic options they accept, and a family where the
drift target cannot be used falls back to the plain target with a note."""

from __future__ import annotations

import pytest

import spap
from conftest import random_ids, tiny_model
from spap.cli import build_parser, prune_config
from spap.solvers.presets import EFFORTS, PRESETS, effort_for


@pytest.mark.parametrize("level", EFFORTS)
def test_every_level_runs_and_records_its_options(level):
    res = spap.prune(tiny_model("llama"), calib_ids=random_ids(16, 32), sparsity=0.5,
                     effort=level)
    rec = res.report["effort"]
    assert rec["level"] == level and rec["preset"] == PRESETS[level]
    assert rec["explicit"] == {} and rec["fallback"] is None
    for key, value in PRESETS[level].items():  # what the solver ran with
        assert res.report["options"][key] == value, key
    # the drift target ran wherever the level sets it
    drift = PRESETS[level].get("refit_target") == "drift"
    assert ("drift_alpha" in res.report["layers"][1]["info"]) == drift


def test_the_cli_offers_every_level():
    action = next(a for a in build_parser()._subparsers._group_actions[0].choices["prune"]
                  ._actions if a.dest == "effort")
    assert tuple(action.choices) == EFFORTS


def test_explicit_options_override_the_level_and_are_recorded_as_such():
    res = spap.prune(tiny_model("llama"), calib_ids=random_ids(16, 32), sparsity=0.5,
                     effort="default", method_options={"recovery_epochs": 1})
    assert res.report["options"]["recovery_epochs"] == 1
    assert res.report["options"]["recovery_lr"] == PRESETS["default"]["recovery_lr"]
    rec = res.report["effort"]
    assert rec["explicit"] == {"recovery_epochs": 1}
    assert rec["overridden"] == ["recovery_epochs"]


@pytest.mark.default_level
def test_without_a_level_spap_runs_its_default_level_and_a_baseline_as_published():
    res = spap.prune(tiny_model("llama"), calib_ids=random_ids(8, 16), sparsity=0.5)
    assert res.report["effort"]["level"] == "default"
    for key, value in PRESETS["default"].items():
        assert res.report["options"][key] == value, key
    res = spap.prune(tiny_model("llama"), calib_ids=random_ids(8, 16), sparsity=0.5,
                     method="obs")
    assert res.report["effort"]["level"] is None
    assert res.report["options"]["refit_target"] == "layer"
    assert res.report["options"]["refit"] == "exact"
    res = spap.prune(tiny_model("llama"), calib_ids=random_ids(8, 16), sparsity=0.5,
                     effort="none")
    assert res.report["options"]["refit_target"] == "layer"
    assert res.report["options"]["recovery_epochs"] == 2


def test_baselines_take_the_generic_options_they_accept():
    obs = effort_for("obs", "max", {})
    assert obs.options == {"refit": "ridge", "refit_target": "drift", "out_weight": "fisher"}
    assert "recovery_epochs" in obs.not_applicable and "out_weight" not in obs.not_applicable
    assert effort_for("flap", "max", {}).options == {}
    res = spap.prune(tiny_model("llama"), calib_ids=random_ids(8, 16), sparsity=0.5,
                     method="obs", effort="max")
    assert res.report["options"]["out_weight"] == "fisher"
    assert effort_for("wanda-sp", "default", {}).options == {}
    res = spap.prune(tiny_model("llama"), calib_ids=random_ids(8, 16), sparsity=0.5,
                     method="fasp", effort="default")
    assert res.report["options"]["refit_target"] == "drift"


def test_a_level_falls_back_where_the_drift_target_cannot_be_used():
    res = spap.prune(tiny_model("gemma2"), calib_ids=random_ids(8, 16), sparsity=0.5,
                     method="obs", effort="fast")
    assert "plain layer target" in res.report["effort"]["fallback"]
    assert res.report["options"]["refit_target"] == "layer"
    # asked for explicitly, it is refused as before
    with pytest.raises(spap.SpapError, match="refit_target=drift needs a decoder layer"):
        spap.prune(tiny_model("gemma2"), calib_ids=random_ids(8, 16), sparsity=0.5,
                   method="obs", effort="fast", method_options={"refit_target": "drift"})


def test_a_level_falls_back_with_head_pruning():
    res = spap.prune(tiny_model("llama"), calib_ids=random_ids(8, 16), sparsity=0.5,
                     method="obs", effort="fast", heads=0.5)
    assert "head pruning" in res.report["effort"]["fallback"]


def test_unknown_level_is_refused_and_the_flag_sets_the_field():
    with pytest.raises(spap.SpapError, match="unknown --effort 'slow'"):
        effort_for("spap", "slow", {})
    args = build_parser().parse_args(["prune", "m", "--out", "o", "--sparsity", "0.5",
                                      "--effort", "max",
                                      "--compute", "float32"])
    cfg = prune_config(args)
    assert (cfg.effort, cfg.compute) == ("max", "float32")
