"""What a pruning run will need, from the model's config alone: memory, disk, FLOPs and time.

`plan(shapes, settings, hardware)` lists the steps of `spap prune` (driver/pipeline.py and
the solver it runs) with, for each, the tensors alive at the step's peak (named terms, in
bytes, on the compute device or in host memory), the disk it has written, and its FLOPs by
precision. The run's peaks are the largest step's; its FLOPs and time the sum over steps
(per-layer steps counted once per layer). Every term is a product of the config's shapes
(hidden size d, MLP width n, kept width k, output width m = d, layers L, vocabulary) and the
settings (tokens T = nsamples x seqlen, batch of B windows, the solver's options); nothing is
measured, so it runs on any machine in milliseconds (`shapes_of` builds the model on the
meta device once, to count parameters generically).

The terms follow the code as written: the calibration activations (and the dense stream's
copy with the drift target) in the model's dtype; the float64 Grams of all and of the
held-out windows, which live until recovery's epochs start; recovery's inputs, targets and
drift rows of every token, written in place batch by batch where the activations live;
the solve in `solve_dtype` (n x n matrices: the Gram, its inverse and greedy OBS's two
stores); recovery's float32 master weights, their start and best copies, Adam's two moments
and gradients, a minibatch, and the down projection's float64 closed form (k x k). `tests/
test_plan.py` holds it against a measured run, and bench/plan_check.py at real shapes.

Time is FLOPs over a device's datasheet throughput (`HARDWARE`) times a stated efficiency,
per precision, plus disk and host-device transfers at stated rates: an estimate to size a
run, not a benchmark.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from .config import PruneConfig

GB = 1e9
GIB = 2**30
#: sequential read / write of a datacenter NVMe SSD (stated assumption, for load and save)
DISK_BYTES_PER_S = 2e9
#: host <-> device copies over PCIe 4.0 x16 in practice (stated assumption)
PCIE_BYTES_PER_S = 25e9
#: recovery's down projection is solved on chunks of this many tokens (recovery.recover)
RECOVERY_CHUNK = 8192
#: greedy OBS applies its pending updates every this many columns (obs.greedy_obs's buffer)
OBS_BUFFER = 128
#: ridge strengths a held-out walk evaluates on a typical layer (refit.walk_grid)
RIDGE_EVALS = 4


@dataclass(frozen=True)
class Hardware:
    """One device's datasheet figures (dense, no structured sparsity), TFLOPS and GB/s,
    and the share of them this estimate assumes a run reaches."""

    name: str
    kind: str  # "cuda" or "cpu"
    memory_gb: float | None  # device memory (None: the host's)
    bf16_tflops: float
    fp32_tflops: float
    fp64_tflops: float
    bandwidth_gbs: float
    efficiency: float
    source: str


HARDWARE: dict[str, Hardware] = {h.name: h for h in (
    Hardware("h100", "cuda", 80, 989, 67, 67, 3350, 0.4,
             "NVIDIA H100 SXM5 datasheet: BF16 tensor 989 TFLOPS dense, FP32 67, FP64 tensor "
             "67, HBM3 3.35 TB/s, 80 GB"),
    Hardware("h200", "cuda", 141, 989, 67, 67, 4800, 0.4,
             "NVIDIA H200 SXM datasheet: BF16 tensor 989 TFLOPS dense, FP32 67, FP64 tensor "
             "67, HBM3e 4.8 TB/s, 141 GB"),
    Hardware("a100", "cuda", 80, 312, 19.5, 19.5, 2039, 0.4,
             "NVIDIA A100 SXM 80GB datasheet: BF16 tensor 312 TFLOPS dense, FP32 19.5, FP64 "
             "tensor 19.5, HBM2e 2.04 TB/s, 80 GB"),
    Hardware("l4", "cuda", 24, 121, 30.3, 0.47, 300, 0.4,
             "NVIDIA L4 datasheet: BF16 tensor 121 TFLOPS dense (242 sparse), FP32 30.3, FP64 "
             "1/64 of FP32, GDDR6 300 GB/s, 24 GB"),
    Hardware("rtx4090", "cuda", 24, 165, 82.6, 1.29, 1008, 0.4,
             "NVIDIA Ada (RTX 4090) whitepaper: BF16 tensor with FP32 accumulate 165 TFLOPS "
             "dense, FP32 82.6, FP64 1/64 of FP32, GDDR6X 1008 GB/s, 24 GB"),
    Hardware("cpu-amx", "cpu", None, 109, 6.8, 3.4, 307, 0.3,
             "Intel Xeon Platinum 8480+ (56 cores, 1.9 GHz base): AMX BF16 1024 FLOP/cycle/"
             "core, AVX-512 FP32 64 and FP64 32 FLOP/cycle/core; 8 x DDR5-4800 307 GB/s"),
    Hardware("cpu-fp32", "cpu", None, 1.5, 1.5, 0.77, 80, 0.3,
             "a 16-core AVX2 machine at 3 GHz: 2 FMA x 8 FP32 lanes (32 FLOP/cycle/core), "
             "FP64 half, no BF16 units (BF16 at the FP32 rate); 2-channel DDR5 80 GB/s"),
)}


@dataclass(frozen=True)
class Shapes:
    """What the plan reads from a config: the MLP's shapes, the parameter counts, and what
    the attention and the loss cost per token."""

    model_type: str
    layers: int
    hidden: int  # d, the MLP's input width
    width: int  # n, the MLP's intermediate width (what is pruned)
    out: int  # m, the down projection's output width
    in_roles: int  # input projections per channel (2 gated: gate and up; 1: fc1)
    params: int  # all parameters (tied ones once)
    layer_params: int  # one decoder layer
    vocab: int
    attn_width: int  # query heads x head_dim (the attention's score and value cost)
    head_dim: int
    dtype_bytes: int = 4  # the checkpoint's own dtype (what --dtype auto loads); float32 if none

    @property
    def outside_params(self) -> int:
        return self.params - self.layers * self.layer_params

    def mlp_params(self, width: int) -> int:
        return width * (self.in_roles * self.hidden + self.out)


def shapes_of(config) -> Shapes:
    """The shapes of a transformers config: the model is built on the meta device (no
    memory, no weights) and its first layer read through the family's adapter."""
    import torch
    from transformers import AutoModelForCausalLM

    from .models import get_adapter

    adapter = get_adapter(config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    layer = adapter.layers(model)[0]
    ins = adapter.in_linears(layer)
    down = adapter.out_linear(layer)
    first = next(iter(ins.values()))
    rows, _ = adapter.channel_rows(ins)
    heads = getattr(config, "num_attention_heads", 1)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return Shapes(
        model_type=config.model_type, layers=len(adapter.layers(model)),
        hidden=first.in_features, width=down.in_features, out=down.out_features,
        in_roles=len(rows), params=sum(p.numel() for p in model.parameters()),
        layer_params=sum(p.numel() for p in layer.parameters()),
        vocab=config.vocab_size, attn_width=heads * head_dim, head_dim=head_dim,
        dtype_bytes=_checkpoint_bytes(config))


def _checkpoint_bytes(config) -> int:
    """Bytes per element of the checkpoint's own dtype (float32 where it records none)."""
    from .modelio.loading import resolve_dtype

    return resolve_dtype("auto", config=config).itemsize


@dataclass
class Step:
    """One step of the run: the tensors alive at its peak (name -> bytes, per place), the
    disk written so far, its FLOPs by precision and its host-device traffic, `count` times
    (once per layer for the per-layer steps)."""

    name: str
    count: int
    device: dict[str, int] = field(default_factory=dict)
    host: dict[str, int] = field(default_factory=dict)
    disk: dict[str, int] = field(default_factory=dict)
    flops: dict[str, float] = field(default_factory=dict)  # "bf16" | "fp32" | "fp64"
    transfer_bytes: float = 0.0  # host <-> device
    disk_io_bytes: float = 0.0  # read or written
    note: str = ""

    def add_flops(self, precision: str, flops: float) -> None:
        self.flops[precision] = self.flops.get(precision, 0.0) + flops

    @property
    def device_bytes(self) -> int:
        return sum(self.device.values())

    @property
    def host_bytes(self) -> int:
        return sum(self.host.values())

    @property
    def disk_bytes(self) -> int:
        return sum(self.disk.values())

    @property
    def total_flops(self) -> float:
        return self.count * sum(self.flops.values())

    def seconds(self, hw: Hardware) -> float:
        rate = {"bf16": hw.bf16_tflops, "fp32": hw.fp32_tflops, "fp64": hw.fp64_tflops}
        compute = sum(f / (rate[p] * 1e12 * hw.efficiency) for p, f in self.flops.items())
        moved = self.transfer_bytes / PCIE_BYTES_PER_S + self.disk_io_bytes / DISK_BYTES_PER_S
        return self.count * (compute + moved)


@dataclass
class Plan:
    shapes: Shapes
    hardware: Hardware
    kept: int
    offload: bool
    dtype_bytes: int
    steps: list[Step]
    recipe: dict[str, Any]

    @property
    def device_peak(self) -> int:
        return max(s.device_bytes for s in self.steps)

    @property
    def host_peak(self) -> int:
        return max(s.host_bytes for s in self.steps)

    @property
    def disk_peak(self) -> int:
        return max(s.disk_bytes for s in self.steps)

    @property
    def flops(self) -> float:
        return sum(s.total_flops for s in self.steps)

    @property
    def seconds(self) -> float:
        return sum(s.seconds(self.hardware) for s in self.steps)

    def peak_step(self, where: str) -> Step:
        return max(self.steps, key=lambda s: getattr(s, f"{where}_bytes"))

    def to_json(self) -> dict[str, Any]:
        hw = self.hardware
        return {
            "hardware": dataclasses.asdict(hw), "shapes": dataclasses.asdict(self.shapes),
            "kept": self.kept, "activations_offloaded": self.offload,
            "dtype_bytes": self.dtype_bytes, "recipe": self.recipe,
            "device_peak_bytes": self.device_peak, "host_peak_bytes": self.host_peak,
            "disk_peak_bytes": self.disk_peak, "flops": self.flops, "seconds": self.seconds,
            "device_peak_step": self.peak_step("device").name,
            "host_peak_step": self.peak_step("host").name,
            "steps": [{"name": s.name, "count": s.count, "device_bytes": s.device_bytes,
                       "host_bytes": s.host_bytes, "disk_bytes": s.disk_bytes,
                       "flops": s.total_flops, "seconds": s.seconds(hw),
                       "device": s.device, "host": s.host, "disk": s.disk,
                       "flops_by_precision": s.flops, "note": s.note} for s in self.steps],
        }


def _solver(settings: PruneConfig):
    """The solver a prune with these settings runs: its effort level's options, then the
    explicit ones (solvers/presets.py), so the plan follows the default recipe."""
    from .solvers import get_solver
    from .solvers.presets import effort_for

    return get_solver(settings.method,
                      **effort_for(settings.method, settings.effort,
                                   settings.method_options).options)


def _dtype_bytes(settings: PruneConfig, shapes: Shapes) -> int:
    """Bytes per element of the model as loaded: the checkpoint's own dtype under "auto"."""
    from .modelio.loading import resolve_dtype

    if settings.dtype == "auto":
        return shapes.dtype_bytes
    return resolve_dtype(settings.dtype).itemsize


def _pow2(x: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(x, 1))))


def plan(shapes: Shapes, settings: PruneConfig, hardware: Hardware | str,
         free_device: int | None = None) -> Plan:
    """The steps of `spap prune` with these settings on `hardware` (a `HARDWARE` name or
    entry). `free_device`: free device memory for the "auto" offload choice (default: the
    hardware's memory less the weights outside the decoder layers)."""
    from .data import heldout_windows
    from .driver.activations import choose_offload, resident_bytes, row_bytes
    from .driver.records import n_keep_for

    hw = HARDWARE[hardware] if isinstance(hardware, str) else hardware
    s, cfg = shapes, settings
    solver = _solver(cfg)
    gpu = hw.kind == "cuda"
    e = _dtype_bytes(cfg, s)
    # the layers' forwards run at the bf16 rate: a half-precision model, or bf16 autocast
    # (--compute auto on hardware with bf16 units, precision.py)
    half = (e < 4 or cfg.compute == "bfloat16"
            or (cfg.compute == "auto" and hw.bf16_tflops > hw.fp32_tflops))
    fwd = "bf16" if half else "fp32"
    d, n, m, r, L = s.hidden, s.width, s.out, s.in_roles, s.layers
    k = n_keep_for(n, cfg.sparsity, cfg.round_to)
    p_rm = n - k
    S, B = cfg.seqlen, cfg.batch_size
    n_held = heldout_windows(cfg.nsamples)
    n_fit = cfg.nsamples - n_held
    T, H = cfg.nsamples * S, n_held * S
    T_fit = T - H
    Tb = min(B, cfg.nsamples) * S
    n_batches = math.ceil(n_fit / B) + math.ceil(n_held / B)

    gram = bool(getattr(solver, "needs_gram", False))
    inputs = bool(getattr(solver, "needs_inputs", False))
    drift = bool(getattr(solver, "needs_drift", False))
    dense = drift or bool(getattr(solver, "needs_dense_stream", False))
    fisher = bool(getattr(solver, "needs_fisher", False))
    sd = 8 if getattr(solver, "solve_dtype", "float32") == "float64" else 4
    epochs = int(getattr(solver, "recovery_epochs", 0)) if inputs else 0
    steps_opt = int(getattr(solver, "recovery_steps", 0))
    rec_batch = int(getattr(solver, "recovery_batch", 1024))
    if steps_opt == 0:
        steps_per_epoch, mb = max(1, T_fit // rec_batch), rec_batch
    else:
        steps_per_epoch = max(steps_opt, math.ceil(T_fit / rec_batch))
        mb = max(1, T_fit // steps_per_epoch)
    mb = min(mb, T_fit)

    # the calibration activations: hidden states, and per batch the extra arguments captured
    # at layer 0 (rotary cos and sin in the model's dtype, position ids)
    extra = n_batches * (2 * S * s.head_dim * e + 2 * S * 8)
    acts = T * d * e + extra
    copies = 2 if dense else 1
    outside = s.outside_params * e
    layer_w = s.layer_params * e
    if free_device is None and gpu:
        free_device = int(hw.memory_gb * GB) - outside
    resident = resident_bytes(n, m, gram=gram, drift=drift)
    # recovery's inputs and targets in the model's dtype, its drift rows in float32 at least:
    # they go where the activations go (on the device, or in host memory beside them)
    rec_rows = row_bytes(T, d, m, e, drift=drift) if inputs else 0
    off = choose_offload(cfg.offload, _torch_device(hw.kind), copies * acts + rec_rows,
                         free_bytes=free_device, resident=resident) if gpu else False
    # offloaded activations sit in pinned host buffers, one per tensor, rounded up to a power
    # of two by the CUDA host allocator
    acts_host = (n_batches * (_pow2(Tb * d * e) + 2 * _pow2(S * s.head_dim * e))
                 if off and gpu else acts)

    # where each kind of tensor lives: on a CPU device everything is host memory, and the
    # layer being computed is the model's own (not a copy)
    def place(step: Step, name: str, nbytes: float, on_device: bool = True) -> None:
        if nbytes <= 0:
            return
        (step.device if (gpu and on_device) else step.host)[name] = int(nbytes)

    model_host = (outside + layer_w) if cfg.low_memory else s.params * e

    def base(step: Step, layer: bool = True, stream: bool = True, copy: bool = True) -> Step:
        step.host["model weights"] = int(model_host)
        if gpu:
            place(step, "weights outside the layers", outside)
            if layer:
                place(step, "layer weights", layer_w)
        if stream:
            where = not off
            place(step, "activations", acts_host if off else acts, where)
            if dense and copy:
                place(step, "dense stream", acts_host if off else acts, where)
        return step

    attn_flops = 2 * T * S * s.attn_width  # QK^T and AV over a causal window (half of 4)
    layer_flops = 2 * s.layer_params * T + attn_flops
    stream_moves = (copies * 2 * acts) if off else 0.0  # each pass reads and writes a copy
    grams = {"Gram (float64)": 8 * n * n, "held-out Gram (float64)": 8 * n * n} if gram else {}
    drift_sums = ({"drift cross term (float64)": 8 * m * n,
                   "held-out drift cross term (float64)": 8 * m * n} if drift else {})
    f32e = max(e, 4)
    weights64 = 8 * (m * n + r * n * d)  # the LayerProblem's float64 copies of the weights
    steps: list[Step] = []

    st = Step("load", 1, disk_io_bytes=s.params * e if not cfg.low_memory else outside,
              note="the model read into host memory (--low-memory: all but the layers)")
    steps.append(base(st, layer=False, stream=False))

    # (the dense stream is cloned from the captured store afterwards; on the device it shares
    # its tensors until a layer replaces them)
    st = base(Step("capture", 1, flops={}, transfer_bytes=acts if off else 0,
                   note="layer 0's inputs of every calibration window"), layer=False,
              copy=False)
    place(st, "one batch's embeddings", Tb * d * e)
    steps.append(st)

    def moments(tb: int) -> dict[str, int]:
        """A batch of `tb` tokens: a forward (three n-wide intermediates, with the pruned
        stream's down input held while the dense stream runs), one window's Gram product,
        and the drift sums (float64 copies of the batch, two m x n products)."""
        return {"a batch's forward": tb * (3 * n + (n if dense else 0) + 2 * d) * e,
                "a window's Gram product": (4 * n * n + S * n * 4) if gram else 0,
                "a batch's drift sums": (tb * n * (e + 8) + tb * m * (3 * e + 16)
                                         + 16 * m * n) if drift else 0}

    def collect_terms(step: Step, only_forward: bool = False) -> None:
        """The larger of the last fit batch (the sums of all windows so far, recovery's rows
        of the fit windows) and the last held-out batch (their held-out parts too, every
        row): the held-out windows come last, batched apart."""
        cases = []
        for tb, held, share in ((min(B, n_fit) * S, False, T_fit / T),
                                (min(B, n_held) * S, True, 1.0)):
            if tb == 0:
                continue
            kept = {k: b for k, b in {**grams, **drift_sums}.items()
                    if held or not k.startswith("held-out")}
            mo = moments(tb)
            if only_forward:
                mo = {"a batch's forward": mo["a batch's forward"]}
            worst = max(mo, key=mo.get)
            cases.append((sum(kept.values()) + rec_rows * share + mo[worst], kept,
                          rec_rows * share, worst, mo[worst]))
        _, kept, rows, worst, moment = max(cases, key=lambda c: c[0])
        for name, b in kept.items():
            place(step, name, b)
        place(step, "recovery's inputs/targets/drift rows", rows, not off)
        place(step, f"largest per-batch moment ({worst})", moment)

    st = base(Step("collect", L, flops={fwd: layer_flops}, transfer_bytes=stream_moves / 2,
                   note="the layer on every batch: Gram, drift statistics, recovery's rows"))
    collect_terms(st)
    if gram:
        st.flops["bf16" if (gpu and half) else "fp32"] = 2.0 * T * n * n
    if drift:  # (its cross term: a float32 product with bf16 compute, stats.DriftAccumulator)
        st.add_flops("fp32" if half else "fp64", 2.0 * T * m * n)
    steps.append(st)

    if dense:
        st = base(Step("dense stream", L, flops={fwd: layer_flops},
                       transfer_bytes=stream_moves / 2,
                       note="the dense layer on the dense model's own hidden states"))
        collect_terms(st, only_forward=True)
        steps.append(st)

    def solver_state(step: Step, statistics: bool = True) -> None:
        for name, b in ({**grams, **drift_sums} if statistics else {}).items():
            place(step, name, b)
        place(step, "recovery's inputs/targets/drift", rec_rows, not off)
        place(step, "weights in float64", weights64)

    st = base(Step("decision", L, note="the damped Gram's inverse and greedy OBS"))
    solver_state(st)
    if gram:
        place(st, f"Gram, its inverse, greedy OBS's two n x n stores ({sd * 8}-bit)",
              4 * n * n * sd)
        place(st, "down projection and its OBS copy", 2 * m * n * sd)
        st.flops["fp64" if sd == 8 else "fp32"] = (
            n**3 + 2.0 * n * n * p_rm + 2.0 * m * n * p_rm
            + 2.0 * n * (OBS_BUFFER + 16) * p_rm + p_rm**3 / 3 + 2.0 * p_rm**2 * m)
    steps.append(st)

    refit = getattr(solver, "refit", None)
    if gram and refit is not None:
        st = base(Step("refit", L, note="the down projection refit, ridge (and drift "
                                         "weight) chosen on the held-out windows"))
        solver_state(st)
        if refit == "ridge":
            place(st, "Gram, held-out and fit Grams", 3 * n * n * sd)
            # the kept blocks of the fit and held-out Grams, a ridge solve's shifted block and
            # its Cholesky factor, and a k x n row selection on the way
            place(st, "kept blocks and a ridge solve", (4 * k * k + k * n) * sd)
            place(st, "the ridge solves' right-hand sides", (4 if drift else 2) * k * m * sd)
            if drift:
                place(st, "drift cross terms and their blocks", 4 * m * n * sd)
            one = k**3 / 3 + 4.0 * k * k * m * (2 if drift else 1)
            st.flops["fp32" if sd == 4 else "fp64"] = (
                2.0 * k * n * m + 2.0 * k * p_rm * m + 2.0 * p_rm**2 * m
                + RIDGE_EVALS * one + 2.0 * k * n * m + k**3 / 3 + 2.0 * k * k * m)
        else:
            place(st, "damped Gram and its kept block", (n * n + 2 * k * k) * sd)
            st.flops["fp32" if sd == 4 else "fp64"] = k**3 / 3 + 2.0 * k * n * m
        steps.append(st)

    if inputs and epochs:
        st = base(Step("recovery", L, note=f"up to {epochs} epochs of {steps_per_epoch} Adam "
                                            f"steps on {mb} tokens, then the down projection "
                                            "in closed form"))
        trainable = r * k * d
        weights = trainable + m * k
        # its start (the refit on the fit windows, from the statistics) and its epochs (the
        # statistics and the fit Gram freed before them), whichever holds more
        start = base(Step("recovery", L))
        solver_state(start)
        place(start, "fit Gram (float32)", n * n * 4)
        # (H_fit's kept rows, its kept block, the shifted block and its factor, the
        # right-hand sides; with the drift target its cross term)
        place(start, "the start's kept blocks and right-hand sides",
              (k * n + 3 * k * k + 2 * k * m + (m * n if drift else 0)) * 4)
        solver_state(st, statistics=False)
        if drift:
            for one in (start, st):
                place(one, "targets plus alpha drift (float32)", T * m * f32e, not off)
        place(st, "weights (float32): current, start, best", 3 * weights * 4)
        place(st, "Adam moments and gradients (float32)", 3 * trainable * 4)
        if gpu and half:
            place(st, "bf16 copies of the weights (autocast)", weights * 2)
        step_mem = mb * (d + 2 * m) * 4 + 5 * mb * k * 4
        chunk = min(RECOVERY_CHUNK, T)
        # the down projection's closed form: its float64 sums with one chunk's product (x,
        # its float64 copy, the inputs and targets), then the ridge solve (the Gram, the
        # shifted Gram, its Cholesky factor)
        sums_mem = 2 * k * k * 8 + 2 * k * m * 8 + chunk * (k * 12 + (d + m) * 4 + m * 8)
        solve_mem = 3 * k * k * 8 + 3 * k * m * 8
        place(st, "largest of a minibatch's forward and the float64 closed form",
              max(step_mem, sums_mem, solve_mem))
        if start.device_bytes + start.host_bytes > st.device_bytes + st.host_bytes:
            st.device, st.host = start.device, start.host
        per_token = 4.0 * trainable + 4.0 * m * k
        fwd_x = 2.0 * trainable
        # the closed form's products: per window in bf16 (added across windows in float64)
        # when the products are bf16, else in float64 (the float32 path as it was)
        st.flops = {}
        st.add_flops("bf16" if gpu and half else "fp32", epochs * steps_per_epoch * mb * per_token)
        st.add_flops("fp32", epochs * (T_fit * fwd_x + H * (fwd_x + 2.0 * m * k)))
        st.add_flops("bf16" if half else "fp64", epochs * 2.0 * T_fit * (k * k + k * m))
        st.add_flops("fp64", epochs * k**3 / 3)
        if off:  # each Adam step's minibatch, and each epoch's closed form and held-out loss
            row = d * e + m * f32e
            st.transfer_bytes = (epochs * (steps_per_epoch * mb + T_fit + H) + T) * row
        steps.append(st)

    st = base(Step("replay", L, flops={fwd: 2 * (s.layer_params - s.mlp_params(p_rm)) * T
                                       + attn_flops + 2.0 * s.mlp_params(n) * T},
                   transfer_bytes=stream_moves / copies,
                   note="the pruned layer on every batch, against the dense MLP"))
    # (the statistics went with the solved problem)
    place(st, "decision's weights (float64)", 8 * (m * k + r * k * d))
    place(st, "dense MLP copy", s.mlp_params(n) * e)
    # the pruned layer's down input held while the dense MLP recomputes the reference (three
    # n-wide intermediates at once) and the float64 error sums take their copies
    place(st, "one batch's dense reference and its float64 error",
          max(Tb * (k + 3 * n) * e + 4 * Tb * m * 8, Tb * (3 * k + 2 * d) * e))
    steps.append(st)

    if fisher:
        st = base(Step("fisher", 1, flops={fwd: 8.0 * s.params * T_fit},
                       note="the dense model's backward pass, one window at a time"),
                  layer=False)
        place(st, "the whole model", s.params * e - outside)
        # (each layer checkpointed: every layer's input kept, one layer's activations
        # recomputed at a time in the backward pass, driver/sensitivity.py)
        place(st, "one window's layer inputs, a layer's activations, the logits",
              L * S * d * e + S * (6 * d + 3 * n) * e + 2 * S * s.vocab * 4)
        st.host["output Fisher of every layer (float64)"] = L * m * m * 8
        steps.append(st)

    pruned = s.params - L * s.mlp_params(p_rm)
    run_folder = L * (s.layer_params - s.mlp_params(p_rm)) * e
    st = Step("save", 1, disk_io_bytes=pruned * e,
              note="the run folder's layers, then the output written beside it")
    st.host["model weights"] = int(pruned * e if not cfg.low_memory else outside + layer_w)
    st.disk = {"run folder (pruned layers)": run_folder, "output": pruned * e}
    steps.append(st)
    if not cfg.low_memory:
        st = Step("reload check", 1, disk_io_bytes=pruned * e,
                  note="the saved folder loaded again and its logits compared")
        st.host = {"model weights": pruned * e, "reloaded copy": pruned * e}
        st.disk = {"output": pruned * e}
        steps.append(st)
    if cfg.evaluate:
        windows = cfg.eval_windows or 140  # wikitext-2's test split is about 140 x 2048
        st = Step("eval", 1, flops={fwd: 2.0 * (s.params + pruned) * windows * cfg.eval_seqlen},
                  note=f"dense and pruned perplexity on {windows} windows")
        st.host["model weights"] = int(s.params * e)
        place(st, "the whole model", s.params * e)
        place(st, "one batch's logits (float32)", 2 * B * cfg.eval_seqlen * s.vocab * 4)
        steps.append(st)
    for st in steps:  # a CPU device is host memory: its peak is the host's
        if not gpu:
            st.device = dict(st.host)
    recipe = {"method": cfg.method, "gram": gram, "recovery": inputs, "drift": drift,
              "dense_stream": dense, "fisher": fisher, "recovery_epochs": epochs,
              "steps_per_epoch": steps_per_epoch, "minibatch_tokens": mb,
              "tokens": T, "heldout_tokens": H, "solve_bytes": sd}
    return Plan(s, hw, k, off, e, steps, recipe)


def _torch_device(kind: str):
    import torch

    return torch.device("cuda" if kind == "cuda" else "cpu")


def host_memory_bytes() -> int:
    import psutil

    return int(psutil.virtual_memory().total)


def fixes(shapes: Shapes, settings: PruneConfig, hardware: Hardware | str,
          host_bytes: int | None = None) -> list[dict[str, Any]]:
    """When the plan does not fit (device memory, or host memory `host_bytes`), the flags
    that make it fit, each alone and then together: [{"flags", "device_peak_bytes",
    "host_peak_bytes", "fits"}]. Empty when it fits."""
    hw = HARDWARE[hardware] if isinstance(hardware, str) else hardware
    host_bytes = host_bytes or host_memory_bytes()
    cap = int(hw.memory_gb * GB) if hw.memory_gb else host_bytes

    def fits(p: Plan) -> bool:
        return p.device_peak <= cap and p.host_peak <= host_bytes

    base = plan(shapes, settings, hw)
    if fits(base):
        return []
    tries: list[tuple[str, dict[str, Any]]] = []
    if hw.kind == "cuda" and settings.offload != "cpu":
        tries.append(("--offload cpu", {"offload": "cpu"}))
    if not settings.low_memory and base.host_peak > host_bytes:
        tries.append(("--low-memory", {"low_memory": True, "evaluate": False}))
    if settings.batch_size > 1:
        tries.append(("--batch-size 1", {"batch_size": 1}))
    if (base.recipe.get("fisher") and settings.effort == "max"
            and base.peak_step("device").name == "fisher"):
        # (the loss-sensitivity pass holds the whole model on the device)
        tries.append(("--effort default", {"effort": "default"}))
    out = []
    combined: dict[str, Any] = {}
    names: list[str] = []
    for flag, change in tries:
        combined.update(change)
        names.append(flag)
        for label, ch in ((flag, change), (" ".join(names), dict(combined))):
            p = plan(shapes, dataclasses.replace(settings, **ch), hw)
            out.append({"flags": label, "device_peak_bytes": p.device_peak,
                        "host_peak_bytes": p.host_peak, "fits": fits(p)})
            if fits(p):
                return _unique(out)
    ns = settings.nsamples
    while ns > 8:  # fewer calibration windows, with everything above
        ns //= 2
        p = plan(shapes, dataclasses.replace(settings, nsamples=ns, **combined), hw)
        label = " ".join([*names, f"--nsamples {ns}"])
        out.append({"flags": label, "device_peak_bytes": p.device_peak,
                    "host_peak_bytes": p.host_peak, "fits": fits(p)})
        if fits(p):
            break
    return _unique(out)


def _unique(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    seen, out = set(), []
    for row in rows:
        if row["flags"] not in seen:
            seen.add(row["flags"])
            out.append(row)
    return out


def default_hardware() -> str:
    """The local GPU's entry when there is one the table knows, else cpu-fp32."""
    import torch

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name().lower().replace(" ", "")
        for key in HARDWARE:
            if key in name:
                return key
        return "h100"
    return "cpu-fp32"


def model_config(spec: str):
    """The transformers config of model spec `spec`, without its weights: a local folder's
    config.json, a Hub id's (only that file is fetched), a .gguf file's header, an offline
    alias's (from its converted folder, or from the GGUF header of a single-file alias)."""
    from .assets import MODEL_ALIASES, cache_dir, locate
    from .modelio.loading import ModelSource, load_config, resolve_model

    alias = MODEL_ALIASES.get(spec)
    if alias is not None:
        folder = cache_dir() / "models" / alias.name
        if (folder / "config.json").exists():
            return load_config(ModelSource(spec, str(folder)))
        if len(alias.parts) == 1:
            f = locate(*alias.parts[0], alias.install)
            return load_config(ModelSource(spec, str(f.parent), f.name, "gguf"))
    return load_config(resolve_model(spec))  # (a split alias is assembled once, as prune does)


def prediction(config, settings: PruneConfig, device) -> dict[str, Any] | None:
    """What `spap plan` predicts for a run of `settings` on `device` (the table entry of
    this GPU, or cpu-fp32), for the report beside the measured peaks; None (and a log line)
    when the model's shapes cannot be read."""
    import logging

    try:
        hw = default_hardware() if str(device).startswith("cuda") else "cpu-fp32"
        p = plan(shapes_of(config), settings, hw)
    except Exception as exc:  # a prediction must never stop a run
        logging.getLogger(__name__).warning("no memory plan for this run: %s", exc)
        return None
    return {"hardware": p.hardware.name, "device_peak_bytes": p.device_peak,
            "host_peak_bytes": p.host_peak, "disk_peak_bytes": p.disk_peak,
            "device_peak_step": p.peak_step("device").name, "flops": p.flops,
            "seconds": p.seconds,
            "steps": {s.name: {"device_bytes": s.device_bytes, "host_bytes": s.host_bytes}
                      for s in p.steps}}
