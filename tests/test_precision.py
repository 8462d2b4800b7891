"""Mixed precision (precision.py): which precision a run resolves to, that bf16 products
change the numbers only by bf16-sized amounts on a tiny model, and that every sum stays exact
(float32 products of bf16 numbers, added in float64) whatever the products run in."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

import spap
from conftest import random_ids, tiny_model
from spap.distributed import Shard
from spap.models import get_adapter
from spap.precision import autocast, bf16_products, detect, resolve
from spap.solvers import recovery
from spap.solvers.recovery import LayerTokens
from spap.solvers.stats import StatsAccumulator

bf16, f32, f64 = torch.bfloat16, torch.float32, torch.float64


# ---- the setting ----------------------------------------------------------------------------
def test_auto_follows_the_hardware_and_the_other_settings_ignore_it():
    fast, slow = {"bf16_fast": True}, {"bf16_fast": False}
    assert resolve("auto", "cpu", fast).compute == bf16
    assert resolve("auto", "cpu", slow).compute == f32
    assert resolve("float32", "cpu", fast).compute == f32
    assert resolve("bfloat16", "cpu", slow).compute == bf16
    with pytest.raises(spap.SpapError, match="--compute must be one of"):
        resolve("float16", "cpu")


def test_cpu_detection_reads_the_bf16_flags():
    assert detect("cpu", flags={"avx512f", "amx_bf16", "amx_tile"})["bf16_fast"]
    assert detect("cpu", flags={"avx512_bf16"})["bf16_fast"]
    assert not detect("cpu", flags={"avx2", "avx512f"})["bf16_fast"]


def test_float32_runs_no_autocast():
    w = torch.randn(8, 8)
    with autocast("cpu", f32):
        assert (w @ w).dtype == f32
    with autocast("cpu", bf16):
        assert (w @ w).dtype == bf16


# ---- the sums stay exact ----------------------------------------------------------------------
def test_recovery_sums_add_chunks_in_float64():
    """40,000 tokens in chunks of 4: the Gram and cross term of bf16 inputs x equal the float64
    sums of the same (bf16-rounded) x to float64 precision. Added in float32 across the 10,000
    chunks they would be off by about 1e-4 (the terms are all positive)."""
    g = torch.Generator().manual_seed(0)
    p, d, k, m = 40_000, 3, 4, 2
    a = 1 + torch.rand(p, d, generator=g)
    w = 1 + torch.rand(k, d, generator=g)
    y = 1 + torch.rand(p, m, generator=g)
    data = LayerTokens(a, y, n_val=8, device=torch.device("cpu"), chunk=4, compute=bf16)
    gram, cross = data.down_sums(lambda aa: aa @ w.T)
    with autocast("cpu", bf16):
        x = (a[:p - 8] @ w.T).to(f64)  # (the same bf16 x, exactly, in float64)
    want_g, want_c = x.T @ x, x.T @ y[:p - 8].to(f64)
    assert gram.dtype == cross.dtype == f64
    assert float(((gram - want_g).abs() / want_g).max()) < 1e-10
    # (the cross term's y may be rounded to bf16 on the way: precision.bf16_products)
    assert float(((cross - want_c).abs() / want_c).max()) < 2**-8


def test_pipeline_statistics_are_summed_outside_autocast(monkeypatch):
    """The Gram the pipeline collects during a bf16 forward equals the float64 Gram of the
    same (bf16) activations: the hook's products are not autocast to bf16, which would round
    each window's Gram entries to 8 bits."""
    seen, grams = [], []
    real = StatsAccumulator.add

    def spy(self, x, heldout=False):
        if not (x.dim() == 3 and x.shape[0] > 1):  # (a batch comes back one window each)
            seen.append(x.detach().reshape(-1, self.n).to(f64))
        real(self, x, heldout)
        grams.append(self.gram.clone())

    monkeypatch.setattr(StatsAccumulator, "add", spy)
    spap.prune(tiny_model("llama"), calib_ids=random_ids(8, 16), sparsity=0.5, method="obs",
               layer_limit=1, compute="bfloat16")
    assert seen[0].dtype == f64 and any(
        bool((s.to(bf16).to(f64) == s).all()) for s in seen)  # the activations are bf16
    want = sum(s.T @ s for s in seen)
    err = float((grams[-1] - want).abs().max() / want.abs().max())
    assert err < 1e-5, err


# ---- mixed against float32 on a tiny model --------------------------------------------------
def separated(seed=0):
    """A tiny llama whose MLP channels are well separated: half of each down projection's
    columns scaled up 8x, the other half down 8x."""
    model = tiny_model("llama", seed)
    a = get_adapter(model.config)
    with torch.no_grad():
        for layer in a.layers(model):
            w = a.out_linear(layer).weight
            n = w.shape[1]
            scale = torch.full((n,), 0.125)
            scale[torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:n // 2]] = 8
            w.mul_(scale)
    return model


def test_mixed_precision_keeps_the_same_channels_and_bf16_close_weights():
    calib = random_ids(16, 32)
    runs = {c: spap.prune(separated(), calib_ids=calib, sparsity=0.5, compute=c)
            for c in ("float32", "bfloat16")}
    lo, hi = runs["float32"], runs["bfloat16"]
    assert hi.report["precision"]["compute"] == "bfloat16"
    assert lo.report["precision"]["compute"] == "float32"
    assert [r.keep for r in lo.layers] == [r.keep for r in hi.layers]
    a = get_adapter(lo.model.config)
    differ = False
    for l32, l16 in zip(a.layers(lo.model), a.layers(hi.model)):
        for get in (a.out_linear, lambda lay: next(iter(a.in_linears(lay).values()))):
            w32, w16 = get(l32).weight, get(l16).weight
            rel = float((w16 - w32).norm() / w32.norm())
            assert rel < 0.01, rel  # bf16 roundings (2^-8) of the forwards and Adam steps
            differ |= rel > 0
    assert differ  # the bf16 run did run in bf16


@dataclass(frozen=True)
class _PartOf(Shard):
    """One rank of a data-parallel run seen alone: `firsts` maps a count this rank holds to
    (its first index, the total); no collective, so the sums are this rank's part."""

    firsts: dict = field(default_factory=dict)

    def offset(self, n, device="cpu"):
        return self.firsts[n]

    def sum_(self, t):
        return t

    def sum_float(self, x, device="cpu"):
        return x


def test_recovery_products_cover_whole_groups_of_windows(monkeypatch):
    """In bf16 each float32 product covers a group of whole windows, whatever the chunks:
    ranks whose shares are whole groups add the same products as one process (their sums
    add up to one process's to float64 order; products per chunk would differ, as the
    chunks differ); a share that splits a group changes the products by float32 round-off."""
    monkeypatch.setattr(recovery, "PRODUCT_TOKENS", 4 * 64)  # 4 windows of 64 tokens
    g = torch.Generator().manual_seed(1)
    window, n_val, d, k, m = 64, 16, 8, 16, 4
    fit = 16 * window
    a, y = 1 + torch.rand(fit + 2 * n_val, d, generator=g), torch.rand(fit + 2 * n_val, m,
                                                                        generator=g)
    w = 1 + torch.rand(k, d, generator=g)

    def sums(rows, shard, chunk=8192, held_out=n_val):
        data = LayerTokens(a[rows], y[rows], n_val=held_out, device=torch.device("cpu"),
                           chunk=chunk, shard=shard, compute=bf16, window=window)
        return data.down_sums(lambda aa: aa @ w.T)

    held = list(range(fit, fit + 2 * n_val))
    one_g, one_c = sums(list(range(fit)) + held, Shard(), chunk=2 * window, held_out=2 * n_val)

    def two_ranks(cut):  # rank 0 holds fit rows [0, cut), rank 1 the rest
        r0 = sums(list(range(cut)) + held[:n_val],
                  _PartOf(0, 2, {cut: (0, fit), n_val: (0, 2 * n_val)}))
        r1 = sums(list(range(cut, fit)) + held[n_val:],
                  _PartOf(1, 2, {fit - cut: (cut, fit), n_val: (n_val, 2 * n_val)}))
        return r0[0] + r1[0], r0[1] + r1[1]

    aligned_g, aligned_c = two_ranks(8 * window)  # (a group boundary)
    torch.testing.assert_close(aligned_g, one_g, rtol=1e-13, atol=0)
    torch.testing.assert_close(aligned_c, one_c, rtol=1e-13, atol=0)
    split_g, _ = two_ranks(7 * window)  # (inside a group)
    rel = float(((split_g - one_g).abs() / one_g).max())
    assert 1e-12 < rel < 1e-5


def test_each_layer_record_times_the_solve_steps():
    """The layer records of spap.json split the solve's seconds by step (no time asserted)."""
    res = spap.prune(tiny_model("llama"), calib_ids=random_ids(8, 16), sparsity=0.5)
    for layer in res.report["layers"]:
        steps = {k for k in layer["seconds"] if k.startswith("solve_")}
        assert {"solve_decision", "solve_refit", "solve_recovery", "solve_recovery_adam",
                "solve_recovery_down", "solve_recovery_heldout"} <= steps, steps
        assert "seconds" not in layer["info"]


def test_bf16_products_restore_the_backend_setting():
    mm = getattr(getattr(torch.backends, "mkldnn", None), "matmul", None)
    if mm is None or not hasattr(mm, "fp32_precision"):
        pytest.skip("this torch has no oneDNN float32 precision setting")
    before = mm.fp32_precision
    with pytest.raises(RuntimeError):
        with bf16_products("cpu"):
            assert mm.fp32_precision == "bf16"
            raise RuntimeError
    assert mm.fp32_precision == before


def _matmul_dtypes(fn) -> set[torch.dtype]:
    """The dtypes of the matrix products `fn` runs (aten mm, addmm, bmm, matmul)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen: set[torch.dtype] = set()

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ in ("mm", "addmm", "bmm", "matmul"):
                seen.add(args[0].dtype if func.overloadpacket.__name__ != "addmm"
                         else args[1].dtype)
            return func(*args, **(kwargs or {}))

    with Record():
        fn()
    return seen


def test_drift_cross_term_is_a_float32_product_with_bf16_compute():
    """With bf16 compute the drift's cross term D^T x is a float32 product (a float64 one
    runs at 1/64 of the rate on most GPUs), summed across batches in float64; the float32
    path keeps its float64 product. Both agree to float32's precision."""
    from spap.solvers.stats import DriftAccumulator

    g = torch.Generator().manual_seed(0)
    batches = [(1e-3 * torch.randn(64, 16, generator=g), torch.randn(64, 48, generator=g),
                torch.randn(64, 16, generator=g)) for _ in range(3)]
    accs = {exact: DriftAccumulator(16, 48, exact=exact) for exact in (True, False)}
    for exact, acc in accs.items():
        dtypes = _matmul_dtypes(lambda acc=acc: [acc.add(*b, heldout=i == 2)
                                                 for i, b in enumerate(batches)])
        assert dtypes == ({torch.float64} if exact else {torch.float32})
    a, b = (accs[e].result() for e in (True, False))
    assert a.cross.dtype == b.cross.dtype == torch.float64
    scale = float(a.cross.abs().max())  # (float32's rounding, relative to the largest term)
    torch.testing.assert_close(b.cross, a.cross, rtol=0, atol=1e-6 * scale)
    torch.testing.assert_close(b.cross_heldout, a.cross_heldout, rtol=0, atol=1e-6 * scale)
    assert a.sq == b.sq and a.out_sq == b.out_sq
