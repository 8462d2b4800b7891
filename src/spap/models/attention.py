"""Attention heads of every family as data, and the one adapter that reads them.

Query head h is rows [h*hd, (h+1)*hd) of q_proj (and of its bias), columns [h*hd, (h+1)*hd)
of o_proj, and, in a per-head q norm stored per head, row h of its weight; KV head g is the
same rows of k_proj and v_proj. Heads are independent up to o_proj, so removing a head and
slicing those rows and columns computes exactly what the dense layer computes with that
head's o_proj columns zeroed. Query head h reads KV head h // (n_heads // n_kv); keeping the
same number of query heads in every kept KV group keeps that mapping valid.

A saved model must reload with stock transformers, so a family is supported only if its
modeling code builds every shape from the config counts, `num_attention_heads`,
`num_key_value_heads` and an explicit `config.head_dim` when present (written after pruning,
since hidden_size // num_attention_heads no longer gives it). Families that fail this, or
whose q/k norm couples the heads, are in `REFUSED` with the reason read from their modeling
file (transformers 5.x).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from .base import set_linear


@dataclass(frozen=True)
class OBias:
    """A config flag that makes stock transformers build o_proj with a bias, and every
    projection (role) it gives a bias to, so a new o_proj bias can be saved."""

    flag: str
    roles: tuple[str, ...]


@dataclass(frozen=True)
class Attention:
    """Where one family keeps its attention. Paths are dotted attribute names from a decoder
    layer."""

    q: str = "self_attn.q_proj"
    k: str = "self_attn.k_proj"
    v: str = "self_attn.v_proj"
    o: str = "self_attn.o_proj"
    qkv: str | None = None  # one fused projection of [q; k; v] rows (Phi-3); q, k, v unused
    # per-head norms of q and k (absent modules are skipped: Cohere's use_qk_norm). A weight of
    # shape (head_dim,) is shared by the heads; (n_heads, head_dim) is sliced by head.
    q_norm: str | None = None
    k_norm: str | None = None
    module: str = "self_attn"  # the attention module, whose head-count attributes are updated
    # the forward reads num_attention_heads from self.config (Phi-3): the module gets its own
    # view of the config, so a cut layer runs before the model's config is rewritten
    counts_in_config: bool = False
    o_bias: OBias | None = None  # None: a saved config cannot give o_proj a new bias
    refuse_if: tuple[tuple[str, str], ...] = ()  # (config flag, why) refusing when it is on

    def with_(self, **changes) -> Attention:
        return replace(self, **changes)

    def roles(self) -> tuple[str, ...]:
        return ("qkv", "o") if self.qkv else ("q", "k", "v", "o")


#: q/k/v/o in self_attn; `attention_bias` gives all four a bias
STANDARD = Attention(o_bias=OBias("attention_bias", ("q", "k", "v", "o")))
#: the same with per-head q/k norms named q_norm / k_norm
QK_NORM = STANDARD.with_(q_norm="self_attn.q_norm", k_norm="self_attn.k_norm")

ATTENTION: dict[str, Attention] = {
    "llama": STANDARD,
    "mistral": Attention(),  # no attention biases, no flag
    "ministral": Attention(),
    "qwen2": Attention(),  # q/k/v always biased (sliced with the rows), o_proj never
    "qwen3": QK_NORM,
    "gemma": STANDARD,  # explicit head_dim
    "gemma2": STANDARD,
    "gemma3_text": QK_NORM,
    "granite": STANDARD,
    "smollm3": STANDARD,
    "cohere": QK_NORM,  # with use_qk_norm the norms are (n_heads, head_dim): sliced
    "cohere2": STANDARD,
    "exaone4": Attention(q_norm="self_attn.q_norm", k_norm="self_attn.k_norm"),
    "seed_oss": Attention(o_bias=OBias("attention_out_bias", ("o",))),
    "hunyuan_v1_dense": STANDARD.with_(q_norm="self_attn.query_layernorm",
                                       k_norm="self_attn.key_layernorm"),
    "ernie4_5": Attention(),  # use_bias also adds MLP biases: usable only when already on
    "phi3": Attention(qkv="self_attn.qkv_proj", counts_in_config=True),
    "glm4": Attention(),  # q/k/v biases by attention_bias, o_proj never
    "nemotron": STANDARD,
    "arcee": STANDARD,
    "apertus": QK_NORM,
    "starcoder2": Attention(),  # use_bias also adds MLP biases
    "phi": Attention(o="self_attn.dense", refuse_if=(
        ("qk_layernorm", "its q/k LayerNorms are sized hidden_size // num_attention_heads"),)),
}

#: families of the MLP table whose attention cannot be pruned and saved, and why
REFUSED: dict[str, str] = {
    "opt": "OPTAttention computes head_dim as hidden_size // num_heads and reads no "
    "config.head_dim",
    "falcon": "its fused query_key_value and head_dim are derived from hidden_size // "
    "num_attention_heads",
    "gpt_neox": "its fused query_key_value and head_size are derived from hidden_size // "
    "num_attention_heads",
    "stablelm": "its head_dim is hidden_size // num_heads and o_proj is hidden_size wide",
    "helium": "its o_proj is built hidden_size x hidden_size, not num_heads * head_dim",
    "olmo2": "its q_norm / k_norm normalize over all heads together, so removing a head "
    "changes the kept ones",
    "olmo3": "its q_norm / k_norm normalize over all heads together, so removing a head "
    "changes the kept ones",
}

# attributes of an attention module that hold a head count, and which count each one is
_COUNT_ATTRS = {"num_heads": "heads", "num_attention_heads": "heads",
                "num_key_value_heads": "kv", "num_key_value_groups": "group"}


class LayerConfig:
    """The model's config as one attention module sees it: its own head counts over the shared
    config. A family whose forward reads counts from `self.config` (Phi-3) gets one, so a cut
    layer computes correctly while the other layers, and the config the model saves, still
    hold the dense counts. Every other attribute, read or written, is the shared config's."""

    def __init__(self, base, **counts):
        object.__setattr__(self, "_base", base)
        object.__setattr__(self, "_counts", dict(counts))

    def __getattr__(self, name):
        d = self.__dict__
        if "_base" not in d:  # during copy / unpickling, before __init__ state is restored
            raise AttributeError(name)
        return d["_counts"][name] if name in d["_counts"] else getattr(d["_base"], name)

    def __setattr__(self, name, value):
        if name in self._counts:
            self._counts[name] = value
        else:
            setattr(self._base, name, value)


def _get(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _find(obj, path: str | None):
    """The module at `path`, or None where the family builds it only under a flag."""
    if path is None:
        return None
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Row (or column) indices of `heads`' blocks of head_dim: (len(heads) * head_dim,)."""
    heads = heads.to(torch.long)
    return (heads[:, None] * head_dim + torch.arange(head_dim, device=heads.device)).flatten()


class AttentionAdapter:
    """Accessors for the attention of every decoder layer of one family, from its `Attention`
    entry. `layers` is the path to the decoder layers from the causal-LM model; `wrapped` says
    the family's fields live in `config.text_config` (a multimodal wrapper)."""

    def __init__(self, model_type: str, attn: Attention, layers: str, wrapped: bool = False):
        self.model_type = model_type
        self.attn = attn
        self._layers = layers
        self._wrapped = wrapped

    def __repr__(self) -> str:
        return f"AttentionAdapter({self.model_type!r}, {self.attn})"

    # ---- structure ------------------------------------------------------------------------
    def layers(self, model) -> nn.ModuleList:
        return _get(model, self._layers)

    def text_config(self, config):
        return config.text_config if self._wrapped else config

    def module(self, layer) -> nn.Module:
        return _get(layer, self.attn.module)

    def linears(self, layer) -> dict[str, nn.Linear]:
        """{"q", "k", "v", "o"} (or {"qkv", "o"} where fused): the physical projections."""
        return {role: _get(layer, getattr(self.attn, role)) for role in self.attn.roles()}

    def o_linear(self, layer) -> nn.Linear:
        return _get(layer, self.attn.o)

    # ---- layout ---------------------------------------------------------------------------
    def head_layout(self, config) -> tuple[int, int, int]:
        """(n_heads, n_kv_heads, head_dim) the config gives."""
        c = self.text_config(config)
        n_heads = int(c.num_attention_heads)
        n_kv = int(getattr(c, "num_key_value_heads", None) or n_heads)
        head_dim = int(getattr(c, "head_dim", None) or c.hidden_size // n_heads)
        return n_heads, n_kv, head_dim

    def layer_layout(self, layer, config) -> tuple[int, int, int]:
        """(n_heads, n_kv_heads, head_dim) of this layer as its weights stand (a cut layer's
        counts differ from the config's until the pipeline rewrites it)."""
        head_dim = self.head_layout(config)[2]
        n_heads = self.o_linear(layer).in_features // head_dim
        if self.attn.qkv:
            rows = _get(layer, self.attn.qkv).out_features
            return n_heads, (rows - n_heads * head_dim) // (2 * head_dim), head_dim
        return n_heads, _get(layer, self.attn.k).out_features // head_dim, head_dim

    def qkv_rows(self, layer, config) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Per role "q", "k", "v": weights (rows, d) and biases (rows,) where present, views
        of the parameters (a fused projection split by the layer's counts)."""
        if not self.attn.qkv:
            lins = {r: lin for r, lin in self.linears(layer).items() if r != "o"}
            return ({r: lin.weight for r, lin in lins.items()},
                    {r: lin.bias for r, lin in lins.items() if lin.bias is not None})
        n_heads, n_kv, hd = self.layer_layout(layer, config)
        lin = _get(layer, self.attn.qkv)
        sizes = [n_heads * hd, n_kv * hd, n_kv * hd]
        w = dict(zip("qkv", lin.weight.split(sizes)))  # (rows, d) each
        b = dict(zip("qkv", lin.bias.split(sizes))) if lin.bias is not None else {}
        return w, b

    # ---- cutting --------------------------------------------------------------------------
    @torch.no_grad()
    def keep_heads(self, layer, config, keep_heads: torch.Tensor, keep_kv: torch.Tensor,
                   w_o: torch.Tensor | None = None, b_o: torch.Tensor | None = None) -> None:
        """Keep query heads `keep_heads` and KV heads `keep_kv` (sorted indices of this layer):
        their rows of q, k, v (and biases, and per-head norms), o_proj's columns of the kept
        query heads or `w_o` (m, k * head_dim) where given, and `b_o` as o_proj's bias where
        given. Every kept KV group must keep the same number of query heads and no query head
        may lose its group."""
        n_heads, n_kv, hd = self.layer_layout(layer, config)
        heads, groups = _checked_keep(keep_heads, keep_kv, n_heads, n_kv)
        dev = self.o_linear(layer).weight.device
        q_rows, kv_rows = head_rows(heads, hd).to(dev), head_rows(groups, hd).to(dev)
        w, b = self.qkv_rows(layer, config)
        rows = {"q": q_rows, "k": kv_rows, "v": kv_rows}
        new_w = {r: w[r][rows[r]] for r in "qkv"}  # (rows', d) each
        new_b = {r: b[r][rows[r]] for r in b}
        if self.attn.qkv:
            set_linear(_get(layer, self.attn.qkv), torch.cat([new_w[r] for r in "qkv"]),
                       torch.cat([new_b[r] for r in "qkv"]) if new_b else None)
        else:
            for r, lin in self.linears(layer).items():
                if r != "o":
                    set_linear(lin, new_w[r], new_b.get(r))
        o = self.o_linear(layer)
        set_linear(o, o.weight[:, q_rows] if w_o is None else w_o, b_o)
        _slice_norm(_find(layer, self.attn.q_norm), heads, n_heads, hd)
        _slice_norm(_find(layer, self.attn.k_norm), groups, n_kv, hd)
        self._set_module_counts(layer, heads.numel(), groups.numel())

    def sync_module_counts(self, layer, config) -> None:
        """Tell the layer's attention module the head counts its weights now have (a layer
        whose cut tensors were loaded from a resume folder)."""
        n_heads, n_kv, _ = self.layer_layout(layer, config)
        self._set_module_counts(layer, n_heads, n_kv)

    def _set_module_counts(self, layer, n_heads: int, n_kv: int) -> None:
        mod = self.module(layer)
        value = {"heads": n_heads, "kv": n_kv, "group": n_heads // n_kv}
        for attr, which in _COUNT_ATTRS.items():
            if isinstance(getattr(mod, attr, None), int):
                setattr(mod, attr, value[which])
        if self.attn.counts_in_config:
            base = mod.config._base if isinstance(mod.config, LayerConfig) else mod.config
            mod.config = LayerConfig(base, num_attention_heads=n_heads, num_key_value_heads=n_kv)

    # ---- config ---------------------------------------------------------------------------
    def set_head_counts(self, config, n_heads: int, n_kv: int) -> None:
        """Write the pruned counts into the config, with head_dim explicit (its default,
        hidden_size // num_attention_heads, no longer holds), so stock transformers rebuilds
        the cut shapes."""
        head_dim = self.head_layout(config)[2]
        c = self.text_config(config)
        c.head_dim = head_dim
        c.num_attention_heads = int(n_heads)
        c.num_key_value_heads = int(n_kv)

    def can_add_o_bias(self, config) -> bool:
        """Whether a saved model can carry a new o_proj bias (FLAP's compensation) by a flag
        whose other biases may be zero."""
        return self.attn.o_bias is not None


def _checked_keep(keep_heads, keep_kv, n_heads: int, n_kv: int):
    """Sorted unique kept heads and groups; ValueError unless every kept group keeps the same
    positive number of its own query heads and no other group keeps any."""
    heads = torch.unique(torch.as_tensor(keep_heads, dtype=torch.long).cpu())
    groups = torch.unique(torch.as_tensor(keep_kv, dtype=torch.long).cpu())
    if n_kv < 1 or n_heads % n_kv:
        raise ValueError(f"{n_heads} query heads do not split into {n_kv} KV groups")
    size = n_heads // n_kv
    if heads.numel() == 0 or groups.numel() == 0 or int(heads.max()) >= n_heads \
            or int(groups.max()) >= n_kv or int(heads.min()) < 0 or int(groups.min()) < 0:
        raise ValueError(f"kept heads {heads.tolist()} / KV heads {groups.tolist()} out of "
                         f"range for {n_heads} heads in {n_kv} groups")
    per_group = torch.bincount(heads // size, minlength=n_kv)  # (n_kv,)
    kept = torch.zeros(n_kv, dtype=torch.bool)
    kept[groups] = True
    counts = per_group[kept]
    if (per_group[~kept] > 0).any() or (counts != counts[0]).any() or counts[0] == 0:
        raise ValueError(f"kept heads {heads.tolist()} do not keep the same number of query "
                         f"heads in every kept KV group {groups.tolist()}")
    return heads, groups


def _slice_norm(norm: nn.Module | None, keep: torch.Tensor, n: int, head_dim: int) -> None:
    """A per-head norm shared by the heads (weight (head_dim,)) stays; one stored per head
    ((n, head_dim)) keeps the kept heads' rows. A norm over the whole width is an error: the
    table must refuse such a family."""
    if norm is None:
        return
    for name, p in list(norm.named_parameters(recurse=False)):
        if p.shape == (head_dim,):
            continue
        if p.dim() == 2 and p.shape == (n, head_dim):
            setattr(norm, name, nn.Parameter(p[keep.to(p.device)].clone(),
                                             requires_grad=False))
            continue
        raise ValueError(f"norm parameter {name} of shape {tuple(p.shape)} is neither per "
                         f"head_dim ({head_dim},) nor per head ({n}, {head_dim})")
