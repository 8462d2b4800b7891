"""Data-parallel pruning (distributed.py) against one process, on the CPU with gloo.

Each test spawns its ranks with torch.multiprocessing; every rank runs a module-level job and
saves what it got, and the test compares that with the same job run in this process (no
process group: one process). The one-process reference runs at the ranks' thread count (one),
whatever this process was started with: torch's CPU kernels split their sums by thread, so at
another count the float32 products differ in their last bits before any rank adds anything.
Two ranks must give the same masks, and weights and logits equal
to float tolerance (the sums only change their order); uneven shares must give the same sums;
only rank 0 may write; an interrupted run must resume to the same model.
"""

from __future__ import annotations

import builtins
import datetime
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import byte_tokenizer, product_tokens, random_ids, tiny_model

#: 16 windows: 2 held out, so each of 2 ranks holds 7 fit and 1 held-out window
N_WINDOWS, SEQLEN = 16, 24


#: the threads of every spawned rank, and of the one-process reference beside them
RANK_THREADS = 1


@pytest.fixture(scope="module", autouse=True)
def _rank_threads():
    """This module's one-process runs at the ranks' thread count, restored afterwards
    (autouse at module scope: set before the module's other fixtures run their reference)."""
    before = torch.get_num_threads()
    torch.set_num_threads(RANK_THREADS)
    yield
    torch.set_num_threads(before)


def _worker(rank: int, world: int, init_file: str, out_dir: str, job, args) -> None:
    torch.set_num_threads(RANK_THREADS)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=120))
    try:
        result = job(*args)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_ranks(world: int, tmp_path: Path, job, *args) -> list:
    """`job(*args)` on `world` spawned gloo ranks; every rank's result, in rank order."""
    out = tmp_path / f"ranks-{job.__name__}-{world}"
    out.mkdir(parents=True, exist_ok=True)
    mp.spawn(_worker, args=(world, str(out / "init"), str(out), job, args), nprocs=world,
             join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


def _prune_tiny(family: str, method: str, options: dict, settings: dict | None = None,
                n_windows: int = N_WINDOWS):
    import spap

    model = tiny_model(family)
    calib = random_ids(n_windows, SEQLEN, seed=1)
    probe = random_ids(4, SEQLEN, seed=2)
    # recovery's bf16 products one window at a time, so that every rank's share is whole
    # product groups (by default a group is 4096 tokens)
    with product_tokens(SEQLEN):
        res = spap.prune(model, calib_ids=calib, probe_ids=probe, sparsity=0.5, method=method,
                         method_options=options,
                         # (an explicit level: spawned ranks do not see conftest's)
                         **{"batch_size": 1, "effort": "none", **(settings or {})})
    with torch.no_grad():
        logits = model(random_ids(2, SEQLEN, seed=3)).logits
    return {"keeps": [r.keep for r in res.layers],
            "state": {k: v.clone() for k, v in model.state_dict().items()},
            "logits": logits, "errors": [(r.rel_error, r.rel_error_heldout) for r in res.layers],
            "distributed": res.report["distributed"],
            "info": [r.info for r in res.layers]}


def _same(a: dict, b: dict) -> None:
    """Equal up to the order of float64 sums: every product covers the same tokens (one
    window at a time) and recovery (recovery_parallel=exact) takes one process's Adam steps
    on the whole minibatch, so only the ranks' float64 partial sums are added in another
    order. (Summing per-rank float32 gradients instead, the default split, moved recovered
    weights by 1.6e-4 here, and changed masks on SmolLM2: this tolerance catches that.)"""
    assert a["keeps"] == b["keeps"]
    assert a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        torch.testing.assert_close(a["state"][k], b["state"][k], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(a["logits"], b["logits"], rtol=1e-6, atol=1e-6)
    for (e1, h1), (e2, h2) in zip(a["errors"], b["errors"]):
        assert e1 == pytest.approx(e2, rel=1e-9, abs=1e-12)
        assert h1 == pytest.approx(h2, rel=1e-9, abs=1e-12)


#: recovery in one process's order on every rank (test_split_recovery.py tests the default,
#: the Adam steps split between the ranks)
EXACT = {"recovery_parallel": "exact"}

CASES = [
    ("llama", "spap", EXACT),  # gated, with recovery (one process's steps on every rank)
    ("llama", "obs", {"refit": "ridge"}),  # the held-out ridge from the summed Grams
    ("opt", "spap", EXACT),  # not gated, biases
    ("opt", "wanda-sp", {}),
    ("llama", "obs", {}, {"heads": 0.5}),  # heads too: their Gram summed, their cut broadcast
    ("llama", "flap", {}, {"offload": "cpu"}),  # activations in host memory, streamed
    ("opt", "fasp", {"refit": "ridge"}),
    ("llama", "obs", {"out_weight": "fisher"}),  # the output Fisher summed over the ranks
    # recovery's rerun: minibatches of all ranks' fit and held-out tokens, in one order
    ("llama", "spap", {"recovery_rerun": True, "recovery_steps": 8, **EXACT}),
]


def _all_cases():
    return [_prune_tiny(*case) for case in CASES]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Every case of CASES on one pair of spawned ranks (a spawn costs seconds of imports)."""
    return run_ranks(2, tmp_path_factory.mktemp("two"), _all_cases)


CASE_IDS = ["-".join(c[:2]) + ("-heads" if len(c) > 3 else "")
            + ("-fisher" if c[2].get("out_weight") else "")
            + ("-rerun" if c[2].get("recovery_rerun") else "") for c in CASES]


@pytest.mark.parametrize("case", range(len(CASES)), ids=CASE_IDS)
def test_two_ranks_equal_one_process(two_ranks, case):
    one = _prune_tiny(*CASES[case])
    method = CASES[case][1]
    ranks = [r[case] for r in two_ranks]
    for r in ranks:
        _same(r, one)
    # and the ranks hold exactly the same model
    for k in ranks[0]["state"]:
        assert torch.equal(ranks[0]["state"][k], ranks[1]["state"][k])
    dist_report = ranks[0]["distributed"]
    assert dist_report["world_size"] == 2
    assert dist_report["ranks"]["fit_windows"] == [7, 7]
    assert dist_report["ranks"]["heldout_windows"] == [1, 1]
    assert dist_report["ranks"]["probe_windows"] == [2, 2]
    assert one["distributed"] == {"world_size": 1}
    if method == "spap":  # recovery ran
        assert any(i.get("recovery_epochs", 0) > 0 for i in one["info"])


def test_each_rank_holds_its_share_of_the_activations(two_ranks):
    from spap.driver.activations import tensor_bytes  # noqa: F401  (the unit measured)

    per_rank = two_ranks[0][0]["distributed"]["ranks"]["calibration_bytes"]
    # 16 windows of 24 tokens, 64 wide, float32, plus the same extra arguments per batch:
    # each rank holds its 8 windows' hidden states and nothing of the other's
    assert len(per_rank) == 2 and per_rank[0] == per_rank[1]
    assert per_rank[0] >= 8 * SEQLEN * 64 * 4
    assert per_rank[0] < N_WINDOWS * SEQLEN * 64 * 4


class _Recorder:
    """obs, keeping every layer's statistics (as the solver saw them, summed over ranks)."""

    name, needs_gram, needs_inputs = "obs", True, False

    def __init__(self):
        from spap.solvers import get_solver

        self.inner = get_solver("obs", refit="ridge")
        self.seen: list = []

    def solve(self, problem, k):
        s = problem.stats
        self.seen.append({"count": s.count, "sum": s.sum.clone(), "sqsum": s.sqsum.clone(),
                          "gram": s.gram.clone(), "gram_heldout": s.gram_heldout.clone()})
        return self.inner.solve(problem, k)


def _uneven_stats(n_windows: int):
    from spap.config import PruneConfig
    from spap.distributed import current
    from spap.driver.pipeline import prune_layers
    from spap.models import get_adapter

    model = tiny_model("llama")
    rec = _Recorder()
    info: dict = {}
    prune_layers(model, get_adapter(model.config), random_ids(n_windows, SEQLEN, seed=1), rec,
                 PruneConfig(sparsity=0.5, batch_size=2), shard=current(), info=info)
    return {"seen": rec.seen, "ranks": info.get("ranks")}


def _sharded_perplexity():
    """The evaluation perplexity of 11 windows in batches of 2 (6 batches: 2 / 2 / 2 per rank
    of 3), and how many windows this rank's model scored."""
    from spap.distributed import current
    from spap.eval.ppl import perplexity

    model = tiny_model("llama")
    rows = []
    model.register_forward_hook(lambda m, args, kwargs, out: rows.append(args[0].shape[0])
                                if args else rows.append(kwargs["input_ids"].shape[0]),
                                with_kwargs=True)
    stream = random_ids(1, 11 * SEQLEN + 5, seed=4)[0]
    res = perplexity(model, None, seqlen=SEQLEN, batch_size=2, stream=stream, shard=current())
    return {"ppl": res["ppl"], "windows": res["protocol"]["windows"], "scored": sum(rows)}


def _three_rank_checks():
    from spap.errors import SpapError

    stats = _uneven_stats(26)
    spap_run = _prune_tiny("llama", "spap", EXACT, {"batch_size": 2}, n_windows=26)
    try:  # 4 windows: 3 fit windows in 2 batches of 2, for 3 ranks
        _uneven_stats(4)
        refused = None
    except SpapError as e:
        refused = str(e)
    return stats, refused, spap_run, _sharded_perplexity()


@pytest.fixture(scope="module")
def three_ranks(tmp_path_factory):
    return run_ranks(3, tmp_path_factory.mktemp("three"), _three_rank_checks)


def test_evaluation_windows_are_shared_and_give_the_one_process_perplexity(three_ranks):
    one = _sharded_perplexity()
    assert one["scored"] == one["windows"] == 11
    assert [r[3]["scored"] for r in three_ranks] == [4, 4, 3]  # whole batches of 2
    for r in three_ranks:
        assert r[3]["windows"] == 11
        assert r[3]["ppl"] == pytest.approx(one["ppl"], rel=1e-12)


def test_uneven_shares_give_the_one_process_statistics_and_too_few_are_refused(three_ranks):
    # 26 windows in batches of 2: 23 fit in 12 batches -> 8 / 8 / 7 windows; 3 held out in 2
    # batches -> 2 / 1 / 0 (the last rank holds none and adds zeros to the held-out sums)
    one = _uneven_stats(26)
    ranks = three_ranks
    assert ranks[0][0]["ranks"]["fit_windows"] == [8, 8, 7]
    assert ranks[0][0]["ranks"]["heldout_windows"] == [2, 1, 0]
    spap_one = _prune_tiny("llama", "spap", EXACT, {"batch_size": 2}, n_windows=26)
    for r, refused, spap_run, _ in ranks:
        _same(spap_run, spap_one)  # recovery with a rank that holds no held-out window
        assert len(r["seen"]) == len(one["seen"]) == 2
        for got, want in zip(r["seen"], one["seen"]):
            assert got["count"] == want["count"] == 26 * SEQLEN
            for key in ("sum", "sqsum", "gram", "gram_heldout"):
                # (the same per-window products; only the float64 sums' order differs)
                torch.testing.assert_close(got[key], want[key], rtol=1e-12, atol=1e-12)
        assert refused is not None and "3 processes need at least 3 batches" in refused


def _guard_writes(root: Path) -> None:
    """Make any write under `root` by this process fail loudly."""
    root = str(root.resolve())

    def under(p) -> bool:
        try:
            return str(Path(p).resolve()).startswith(root)
        except TypeError:
            return False

    real_open, real_replace, real_mkdir = builtins.open, os.replace, os.mkdir
    real_rmtree = shutil.rmtree

    def open_(file, mode="r", *a, **k):
        if any(c in mode for c in "wax+") and under(file):
            raise AssertionError(f"a rank other than 0 wrote {file}")
        return real_open(file, mode, *a, **k)

    def replace_(src, dst, *a, **k):
        if under(dst) or under(src):
            raise AssertionError(f"a rank other than 0 renamed {src}")
        return real_replace(src, dst, *a, **k)

    def mkdir_(path, *a, **k):
        if under(path):
            raise AssertionError(f"a rank other than 0 made {path}")
        return real_mkdir(path, *a, **k)

    def rmtree_(path, *a, **k):
        if under(path):
            raise AssertionError(f"a rank other than 0 removed {path}")
        return real_rmtree(path, *a, **k)

    builtins.open, os.replace, os.mkdir, shutil.rmtree = open_, replace_, mkdir_, rmtree_
    import safetensors.torch as st

    real_save = st.save_file

    def save_(tensors, filename, *a, **k):
        if under(filename):
            raise AssertionError(f"a rank other than 0 wrote {filename}")
        return real_save(tensors, filename, *a, **k)

    st.save_file = save_


def _prune_folder(src: str, out: str, stop_at_layer: int | None = None,
                  low_memory: bool = False):
    """prune_to_disk of the saved tiny model; ranks other than 0 may write nothing under the
    output's parent. `stop_at_layer`: every rank is interrupted (Ctrl-C) at that layer's
    solve, as a stopped job is."""
    import spap
    from spap.distributed import current
    from spap.solvers.obs import ObsSolver

    if not current().is_main:
        _guard_writes(Path(out).parent)
    if stop_at_layer is not None:
        real = ObsSolver.solve
        calls = {"n": 0}

        def solve(self, problem, k):
            if calls["n"] == stop_at_layer:
                raise KeyboardInterrupt
            calls["n"] += 1
            return real(self, problem, k)

        ObsSolver.solve = solve
    try:
        job = spap.prune_to_disk(src, out, 0.5, method="obs", method_options={"refit": "ridge"},
                                 nsamples=N_WINDOWS, seqlen=SEQLEN, batch_size=1,
                                 device="cpu", calib=str(Path(src) / "calib.txt"),
                                 low_memory=low_memory)
    except KeyboardInterrupt:
        return {"interrupted": True}
    finally:
        if stop_at_layer is not None:
            ObsSolver.solve = real
    return {"interrupted": False, "resumed": job.report["resumed_from_layer"],
            "distributed": job.report["distributed"]}


def _saved_folder(tmp_path: Path, text: str) -> Path:
    d = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(d)
    byte_tokenizer().save_pretrained(d)
    (d / "calib.txt").write_text(text)
    return d


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _long_text() -> str:
    words = " ".join(f"w{i % 97} x{i % 13}" for i in range(4000))
    return "\n\n".join(words[i:i + 900] for i in range(0, len(words), 900))


def _disk_jobs(src: str, root: str):
    """A full 2-rank run; then one interrupted at layer 1 and its resume, by the same ranks.
    Rank 0 records what the interrupted run left beside its output."""
    from spap.distributed import current

    root_p = Path(root)
    full = _prune_folder(src, str(root_p / "full" / "out"))
    stopped = _prune_folder(src, str(root_p / "stopped" / "out"), stop_at_layer=1)
    left = sorted(str(p.relative_to(root_p / "stopped")) for p in
                  (root_p / "stopped").rglob("*")) if current().is_main else None
    current().barrier()
    resumed = _prune_folder(src, str(root_p / "stopped" / "out"))
    low = _prune_folder(src, str(root_p / "low" / "out"), low_memory=True)
    return {"full": full, "stopped": stopped, "left": left, "resumed": resumed, "low": low}


@pytest.fixture(scope="module")
def on_disk(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("disk")
    src = _saved_folder(tmp, _long_text())
    root = tmp / "runs"
    for sub in ("one", "full", "stopped", "low"):
        (root / sub).mkdir(parents=True)
    _prune_folder(str(src), str(root / "one" / "out"))  # one process
    ranks = run_ranks(2, tmp, _disk_jobs, str(src), str(root))
    return root, ranks


def test_only_rank_zero_writes_and_the_output_matches_one_process(on_disk):
    root, ranks = on_disk
    assert ranks[0]["full"]["distributed"]["world_size"] == 2
    # (rank 1 wrote nothing: any write there failed its run, see _guard_writes)
    assert not ranks[1]["full"]["interrupted"]
    # one output folder and nothing else beside it (the resume folder is gone)
    assert sorted(p.name for p in (root / "full").iterdir()) == ["out"]
    a, b = _weights(root / "one" / "out"), _weights(root / "full" / "out")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)


def test_an_interrupted_two_rank_run_resumes_to_the_same_model(on_disk):
    root, ranks = on_disk
    assert all(r["stopped"]["interrupted"] for r in ranks)
    # nothing half-written: no output, only the resume folder with layer 0 in it
    left = ranks[0]["left"]
    assert not any(p == "out" or p.startswith("out/") for p in left)
    assert any(p.endswith("layers/layer-00000.safetensors") for p in left)
    assert not any("layer-00001" in p for p in left)
    assert ranks[0]["resumed"]["resumed"] == 1
    a, b = _weights(root / "full" / "out"), _weights(root / "stopped" / "out")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_two_low_memory_ranks_give_the_in_memory_model(on_disk):
    # each rank reads the layer it needs from the checkpoint; rank 0 assembles the shards
    root, ranks = on_disk
    assert not ranks[0]["low"]["interrupted"]
    a, b = _weights(root / "full" / "out"), _weights(root / "low" / "out")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)
