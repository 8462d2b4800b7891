"""Evaluation of a model larger than one device: eval/placement.py spreads it over GPUs and
host memory with accelerate's device map, and gives it back unchanged."""

from __future__ import annotations

import pytest
import torch

from conftest import random_ids, tiny_model
from spap.errors import SpapError
from spap.eval.placement import FIT_SHARE, HOST_SHARE, model_bytes, placed, spread
from spap.eval.ppl import perplexity_of_windows

GB = 10**9


def test_a_model_that_fits_the_first_gpu_runs_there_whole():
    assert spread(10 * GB, {0: 80 * GB, 1: 80 * GB}, 64 * GB) is None
    assert spread(10 * GB, {}, 64 * GB) is None  # no GPU: where it is


def test_a_larger_model_is_spread_over_the_gpus_then_host_memory():
    # a 140 GB model (70B in bf16) on two 80 GB GPUs and 256 GB of host memory
    budget = spread(140 * GB, {0: 80 * GB, 1: 80 * GB}, 256 * GB)
    assert budget == {0: int(FIT_SHARE * 80 * GB), 1: int(FIT_SHARE * 80 * GB),
                      "cpu": int(HOST_SHARE * 256 * GB)}
    # on one GPU the rest waits in host memory
    assert set(spread(140 * GB, {0: 80 * GB}, 256 * GB)) == {0, "cpu"}
    with pytest.raises(SpapError, match="do not fit"):
        spread(140 * GB, {0: 80 * GB}, 32 * GB)


def test_a_spread_model_gives_the_same_perplexity_and_comes_back_unchanged():
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = random_ids(3, 16, seed=2)
    whole = perplexity_of_windows(model, ids)
    # (on the CPU the device map's places are all host memory; the hooks are accelerate's)
    with placed(model, "cpu", max_memory={"cpu": 2 * model_bytes(model)}) as where:
        assert where["where"] == "device map" and where["device_map"] == {"cpu": 1} or \
            sum(where["device_map"].values()) >= 1
        assert any(hasattr(m, "_hf_hook") for m in model.modules())
        spread_ppl = perplexity_of_windows(model, ids)
    assert spread_ppl == pytest.approx(whole, rel=1e-6)
    assert not any(hasattr(m, "_hf_hook") for m in model.modules())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.device.type == "cpu" for p in model.parameters())
