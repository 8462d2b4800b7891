"""`spap options`: every option a solver has and reads is listed with its line, and an
unknown option is refused with the closest valid names."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap

import pytest

import spap
from conftest import run_cli
from spap.errors import SpapError
from spap.solvers import METHODS, get_head_solver, get_solver, solver_class
from spap.solvers import list_options as options
from spap.solvers.heads import HeadSolver
from spap.solvers.options import HEAD_FLAGS, describe, refuse_unknown

HEADS = "heads, with --heads or --kv-groups (--head-option KEY=VALUE)"


def _section(method: str):
    return options(method)[f"method {method} (--option KEY=VALUE)"]


def _fields(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


@pytest.mark.parametrize("method", METHODS)
def test_every_field_of_every_solver_has_its_line(method):
    listed = _section(method)
    assert [o.name for o in listed] == _fields(solver_class(method))
    for o in listed:
        assert o.help and o.allowed and o.type
    # the defaults are the dataclass's own, not a copy
    defaults = {f.name: f.default for f in dataclasses.fields(solver_class(method))}
    assert {o.name: o.default for o in listed} == defaults


def test_every_head_field_has_its_line_and_the_cli_default():
    listed = {o.name: o for o in options("heads")[HEADS]}
    assert set(listed) == set(_fields(HeadSolver)) - set(HEAD_FLAGS)
    assert listed["refit"].default == "ridge"  # what `spap prune --heads` uses, not "exact"
    assert listed["refit"].default == get_head_solver("obs").refit
    assert "o_proj" in listed["refit"].help  # the head line, not the MLP's


def test_a_field_without_a_line_is_refused():
    @dataclasses.dataclass
    class Grown(solver_class("spap")):
        brand_new_knob: int = 3

    with pytest.raises(KeyError, match="brand_new_knob"):
        describe(Grown)


def _self_reads(cls) -> set[str]:
    """The `self.<name>` attributes read in the methods of `cls` and of its dataclass bases."""
    names = set()
    for klass in cls.__mro__:
        if not dataclasses.is_dataclass(klass):
            continue
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id == "self"):
                names.add(node.attr)
    return names


def _not_options(cls) -> set[str]:
    """Methods, properties and class variables: attributes that are not options."""
    field_names = set(_fields(cls))
    return {n for n in dir(cls) if n not in field_names}


@pytest.mark.parametrize("method", [*METHODS, "heads"])
def test_spap_options_lists_every_option_the_solver_reads(method, capsys):
    cls = HeadSolver if method == "heads" else solver_class(method)
    reads = _self_reads(cls) - _not_options(cls) - set(HEAD_FLAGS if method == "heads" else ())
    code, out, err = run_cli(["options", method], capsys)
    assert code == 0, err
    listed = {line.split(" (", 1)[0].strip() for line in out.splitlines()
              if line.startswith("  ") and not line.startswith("      ")}
    assert reads <= listed, f"read but not listed: {sorted(reads - listed)}"
    if method == "spap":  # the solver's own knobs are read, not only declared
        assert {"recovery_epochs", "greedy_block", "solve_dtype", "refit"} <= reads


def test_options_without_a_method_lists_every_method_and_the_heads(capsys):
    code, out, _ = run_cli(["options"], capsys)
    assert code == 0
    for m in METHODS:
        assert f"method {m} " in out
    assert "heads, with --heads" in out
    assert spap.options is options


def test_unknown_option_names_the_closest(capsys):
    with pytest.raises(SpapError, match=r"'recovery_epoch' \(did you mean recovery_epochs"):
        get_solver("spap", recovery_epoch=3)
    with pytest.raises(SpapError, match="spap options obs"):
        get_solver("obs", blok=4)
    with pytest.raises(SpapError, match=r"unknown head option 'serch' \(did you mean search"):
        get_head_solver("obs", serch="exact")
    with pytest.raises(SpapError, match="unknown method 'spapp'"):
        options("spapp")
    # nothing close: no suggestion
    with pytest.raises(SpapError, match=r"option 'zzz' for method 'x'; "):
        refuse_unknown(["zzz"], ["refit", "damp"], "option", "spap options x", " for method 'x'")


def test_prune_help_points_to_spap_options(capsys):
    with pytest.raises(SystemExit):
        run_cli(["prune", "--help"], capsys)
    assert "spap options METHOD" in capsys.readouterr().out
