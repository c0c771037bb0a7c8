"""Memory planner: what one GPU holds when training a sentence encoder under DeepSpeed ZeRO.

``python -m fastcse.plan --model deberta-v2-xxlarge --gpus 8 --gpu-mem 80 --batch 64 --seq 32
--zero 3`` prints, for 1, 2, 4, 8 and 16 GPUs (the ``--gpus`` row marked), the bytes per GPU of

* **model states** (bf16 mixed-precision AdamW, the ZeRO paper's arithmetic, Psi parameters over
  N ranks): 2 Psi bf16 parameters, 2 Psi bf16 gradients, 12 Psi optimizer states (fp32 master
  copy, momentum, variance). Stage 1 shards the 12 Psi, stage 2 also the gradients, stage 3 also
  the parameters (except the small ones ZeRO-3 keeps whole, below its persistence threshold).
  ``--offload`` moves the optimizer states (and under ZeRO-3 the parameters) to CPU memory;
* **activations** saved for the backward pass, summed op by op over one encoder layer for the
  batch per GPU (analytic, :func:`layer_activation_terms`), with or without checkpointing;
* the **loss**: :func:`fastcse.info_nce` forward + backward run on the meta device under
  :class:`fastcse.memory.StorageCounter`, as one rank sees it (negatives gathered from all ranks);
* ESimCSE's **momentum encoder** (fp32, sharded like the model under ZeRO-3) and its queue;
* DeepSpeed's buffers (gradient buckets, ZeRO-3's gathered parameters) and the optimizer step's
  fp32 gradient partition.

The parameters are counted from the real architecture: the Hugging Face model is built on the meta
device from a config written here (``NAMED_CONFIGS``) or read from a local ``config.json``. The
formulas, their sources and what is approximate: ``docs/SCALE.md``. GB here is 1e9 bytes.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal, Optional, Sequence

GB = 1e9
GPU_COUNTS = (1, 2, 4, 8, 16)

BF16 = 2  # bytes of a bf16 parameter, gradient or activation
FP32 = 4
ADAM_BYTES = 12  # fp32 master copy + momentum + variance, per parameter
CUDA_DROPOUT_MASK = 1  # bytes per element of a dropout mask on CUDA (bool); CPU keeps input-dtype masks
LN_STATS = 2 * FP32  # LayerNorm / RMSNorm saves fp32 mean and rstd (or variance) per token

# DeepSpeed's own defaults and the values fastcse.train writes for the "auto" fields
DS_ALLREDUCE_BUCKET = 500_000_000  # engine.allreduce_gradients (no ZeRO): grads flattened per bucket
DS_SUB_GROUP_SIZE = 1_000_000_000  # ZeRO-3 steps the optimizer one sub-group at a time

Precision = Literal["bf16", "fp32"]
PRECISIONS = ("bf16", "fp32")
PARAM_BYTES = {"bf16": BF16, "fp32": FP32}  # a parameter's, gradient's and activation's bytes
ADAM_TEMPORARIES = {"cuda": 1, "cpu": 2}  # fp32 temporaries of torch AdamW's update, per updated element
Method = Literal["simcse-unsup", "simcse-sup", "esimcse"]
Attention = Literal["flash", "eager"]
# sequences through the trainable encoder per anchor (fastcse.methods: [x; x], [s0; s1; hard], [x; rep(x)])
VIEWS = {"simcse-unsup": 2, "simcse-sup": 3, "esimcse": 2}

# The two 1.5B-class shapes of the issue, as Hugging Face configs (no download needed).
NAMED_CONFIGS: dict[str, dict] = {
    # microsoft/deberta-v2-xxlarge's published config.json
    "deberta-v2-xxlarge": {
        "model_type": "deberta-v2", "hidden_size": 1536, "num_hidden_layers": 48, "num_attention_heads": 24,
        "attention_head_size": 64, "intermediate_size": 6144, "vocab_size": 128100, "hidden_act": "gelu",
        "max_position_embeddings": 512, "type_vocab_size": 0, "position_biased_input": False,
        "relative_attention": True, "position_buckets": 256, "max_relative_positions": -1,
        "pos_att_type": ["p2c", "c2p"], "norm_rel_ebd": "layer_norm", "share_att_key": True,
        "conv_kernel_size": 3, "conv_act": "gelu", "layer_norm_eps": 1e-7,
    },
    # the encoder of google/t5-v1_1-xl (Sentence-T5 XL's backbone): gated-gelu, untied head (unused)
    "t5-xl-encoder": {
        "model_type": "t5", "d_model": 2048, "d_ff": 5120, "num_layers": 24, "num_heads": 32, "d_kv": 64,
        "vocab_size": 32128, "feed_forward_proj": "gated-gelu", "relative_attention_num_buckets": 32,
        "relative_attention_max_distance": 128, "tie_word_embeddings": False, "is_encoder_decoder": False,
    },
}


# --------------------------------------------------------------------------------------------
# the architecture, read off the real model built on the meta device
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Architecture:
    """What the planner needs of an encoder. ``family`` picks the layer formula: ``bert`` (post-LN
    BERT-style layers; also the fallback for other model types), ``deberta-v2``, ``t5``."""

    name: str
    model_type: str
    family: Literal["bert", "deberta-v2", "t5"]
    param_numels: tuple[int, ...]  # every parameter tensor's size, in model order
    largest_module_params: int  # the most parameters one module owns directly (ZeRO-3 gathers per module)
    hidden: int
    layers: int
    heads: int
    head_dim: int
    intermediate: int
    activation: str
    gated: bool = False  # T5 v1.1 gated FFN (wi_0, wi_1)
    relative_positions: int = 0  # DeBERTa: rows of the relative-position table (2 x span)
    relative_kinds: int = 0  # DeBERTa: 2 with c2p and p2c
    conv: bool = False  # DeBERTa-v2's convolution beside the first layer
    # every module that owns parameters, in registration order (the forward's, for these encoders):
    # (encoder layer index or -1 outside the layers, the sizes of the parameters it owns directly)
    modules: tuple[tuple[int, tuple[int, ...]], ...] = ()
    # indices into ``modules`` of those one forward calls twice (DeBERTa's query / key projections,
    # shared with the relative embeddings): ZeRO-3's hooks never release these once gathered
    called_twice: frozenset[int] = frozenset()

    @property
    def n_params(self) -> int:
        return sum(self.param_numels)

    @property
    def attention_width(self) -> int:
        return self.heads * self.head_dim

    def persistent_params(self, threshold: int) -> int:
        """Parameters ZeRO-3 keeps whole on every rank (tensors of at most ``threshold`` elements)."""
        return sum(n for n in self.param_numels if n <= threshold)


def load_config(model: str):
    """A ``transformers`` config: one of ``NAMED_CONFIGS``, or a local config.json / model folder."""
    from transformers import AutoConfig, CONFIG_MAPPING

    if model in NAMED_CONFIGS:
        values = dict(NAMED_CONFIGS[model])
        return CONFIG_MAPPING[values.pop("model_type")](**values)
    path = Path(model)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"--model {model!r}: not one of {sorted(NAMED_CONFIGS)} and no config.json at {path}")
    values = json.loads(path.read_text())
    if "model_type" not in values:
        raise ValueError(f"{path} has no model_type")
    return AutoConfig.for_model(**values)


def build_architecture(config, name: str = "") -> Architecture:
    """Build the Hugging Face encoder of ``config`` on the meta device (no memory, no weights) and
    read its parameter tensors and layer shapes."""
    import torch
    from transformers import AutoModel, T5EncoderModel

    model_type = config.model_type
    is_t5 = model_type in ("t5", "mt5", "umt5")
    with torch.device("meta"):
        model = T5EncoderModel(config) if is_t5 else AutoModel.from_config(config)
    numels = tuple(p.numel() for p in model.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    modules, called_twice = [], set()
    shared_keys = (model_type == "deberta-v2" and getattr(config, "relative_attention", False)
                   and getattr(config, "share_att_key", False))
    for name, module in model.named_modules():
        own = tuple(p.numel() for p in module.parameters(recurse=False))
        if own:
            layer = re.search(r"(?:^|\.)(?:layer|block)\.(\d+)(?:\.|$)", name)
            if shared_keys and name.endswith(("attention.self.query_proj", "attention.self.key_proj")):
                called_twice.add(len(modules))
            modules.append((int(layer.group(1)) if layer else -1, own))
    if is_t5:
        heads, head_dim = config.num_heads, config.d_kv
        return Architecture(
            name=name, model_type=model_type, family="t5", param_numels=numels, largest_module_params=largest,
            modules=tuple(modules), called_twice=frozenset(called_twice),
            hidden=config.d_model, layers=config.num_layers, heads=heads, head_dim=head_dim,
            intermediate=config.d_ff, activation=config.dense_act_fn, gated=config.is_gated_act)
    heads = config.num_attention_heads
    head_dim = getattr(config, "attention_head_size", None) or config.hidden_size // heads
    common = dict(name=name, model_type=model_type, param_numels=numels, largest_module_params=largest,
                  modules=tuple(modules), called_twice=frozenset(called_twice),
                  hidden=config.hidden_size, layers=config.num_hidden_layers, heads=heads, head_dim=head_dim,
                  intermediate=config.intermediate_size, activation=str(config.hidden_act))
    if model_type == "deberta-v2":
        kinds = 0
        if config.relative_attention:
            pos_types = config.pos_att_type
            pos_types = pos_types.split("|") if isinstance(pos_types, str) else list(pos_types or [])
            kinds = sum(k in pos_types for k in ("c2p", "p2c"))
        span = config.position_buckets if config.position_buckets > 0 else (
            config.max_relative_positions if config.max_relative_positions > 0 else config.max_position_embeddings)
        return Architecture(family="deberta-v2", relative_positions=2 * span if kinds else 0, relative_kinds=kinds,
                            conv=getattr(config, "conv_kernel_size", 0) > 0, **common)
    return Architecture(family="bert", **common)


def architecture(model: str) -> Architecture:
    return build_architecture(load_config(model), name=model)


# --------------------------------------------------------------------------------------------
# model states
# --------------------------------------------------------------------------------------------


@dataclass
class ModelStates:
    """Bytes per GPU of the ZeRO paper's three model states, and what offload puts in CPU memory."""

    params: float
    grads: float
    optimizer: float
    cpu: float = 0.0  # per rank

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer


def model_state_bytes(n_params: int, gpus: int, zero: int, *, offload: bool = False,
                      persistent_params: int = 0, precision: Precision = "bf16") -> ModelStates:
    """Mixed-precision AdamW (bf16 parameters and gradients, 12 bytes of fp32 optimizer state per
    parameter), for Psi = ``n_params`` over N = ``gpus`` ranks::

        stage 0:  2 Psi      + 2 Psi     + 12 Psi         (16 Psi)
        stage 1:  2 Psi      + 2 Psi     + 12 Psi / N
        stage 2:  2 Psi      + 2 Psi / N + 12 Psi / N
        stage 3:  2 Psi / N  + 2 Psi / N + 12 Psi / N     (16 Psi / N)

    Under ZeRO-3 the ``persistent_params`` (tensors below the persistence threshold) also stay
    whole on every rank: ``+ 2 persistent``. ``offload`` (DeepSpeed's offload_optimizer, and
    offload_param under ZeRO-3): the optimizer states and DeepSpeed's fp32 gradient partition
    (4 Psi / N) live in CPU memory, ZeRO-2/3 gradients go there bucket by bucket (none stay on
    the GPU), and ZeRO-3's parameter partitions too.

    ``precision="fp32"`` (no bf16 / fp16 section: CPUs without bf16 matrix units): 4-byte
    parameters and gradients; the optimizer holds Adam's two moments (8 Psi) and DeepSpeed's fp32
    master partition, a clone of the parameters' even when they are fp32 already (12; measured on
    ZeRO-3: three sub-group buffers beside the flat parameter partition); without ZeRO the torch
    optimizer updates the parameters in place (8).
    """
    if zero not in (0, 1, 2, 3):
        raise ValueError(f"zero must be 0, 1, 2 or 3, got {zero}")
    if offload and zero == 0:
        raise ValueError("--offload needs ZeRO stage 1, 2 or 3 (DeepSpeed offloads ZeRO's partitions)")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    width = PARAM_BYTES[precision]
    adam = ADAM_BYTES if precision == "bf16" or zero >= 1 else ADAM_BYTES - FP32
    psi, n = float(n_params), float(gpus)
    params = width * psi / n + width * persistent_params if zero == 3 else width * psi
    grads = width * psi / n if zero >= 2 else width * psi
    optimizer = adam * psi / n if zero >= 1 else adam * psi
    if not offload:
        return ModelStates(params, grads, optimizer)
    cpu = (adam + FP32) * psi / n
    if zero == 3:
        cpu += width * psi / n
        params = width * persistent_params
    return ModelStates(params=params, grads=0.0 if zero >= 2 else grads, optimizer=0.0, cpu=cpu)


# --------------------------------------------------------------------------------------------
# ZeRO-3's gathered parameters
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ZeroSettings:
    """The DeepSpeed ``zero_optimization`` values that size the buffers (in elements). The defaults
    are DeepSpeed's own, which ``ds_configs/zero3*.json`` keep; ``None``: fastcse.train's "auto"
    (reduce bucket h^2, prefetch bucket 0.9 h^2, persistence threshold 10 h)."""

    max_live_parameters: int = 1_000_000_000
    max_reuse_distance: int = 1_000_000_000
    prefetch_bucket: Optional[int] = None
    reduce_bucket: Optional[int] = None
    persistence_threshold: Optional[int] = None
    sub_group_size: int = DS_SUB_GROUP_SIZE

    def prefetch(self, hidden: int) -> int:
        return int(0.9 * hidden * hidden) if self.prefetch_bucket is None else self.prefetch_bucket

    def bucket(self, hidden: int) -> int:
        return hidden * hidden if self.reduce_bucket is None else self.reduce_bucket

    def threshold(self, hidden: int) -> int:
        return 10 * hidden if self.persistence_threshold is None else self.persistence_threshold


_ZERO_KEYS = {"stage3_max_live_parameters": "max_live_parameters",
              "stage3_max_reuse_distance": "max_reuse_distance",
              "stage3_prefetch_bucket_size": "prefetch_bucket", "reduce_bucket_size": "reduce_bucket",
              "stage3_param_persistence_threshold": "persistence_threshold", "sub_group_size": "sub_group_size"}


def read_ds_config(path: str | Path) -> tuple[dict, ZeroSettings]:
    """A DeepSpeed config file and the buffer settings its ZeRO section gives ("auto": fastcse.train's
    value, absent: DeepSpeed's default). Returns (the whole config, the settings)."""
    path = Path(path)
    try:
        ds = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"--ds {path}: {exc}") from exc
    zero = ds.get("zero_optimization", {})
    values = {}
    for key, field_name in _ZERO_KEYS.items():
        value = zero.get(key)
        if value is None or value == "auto":
            continue
        if not isinstance(value, (int, float)) or value < 0:
            raise ValueError(f"--ds {path}: zero_optimization.{key} must be a non-negative number or \"auto\", "
                             f"got {value!r}")
        values[field_name] = int(value)
    return ds, ZeroSettings(**values)


def _zero3_trace(arch: Architecture, checkpointing: bool, threshold: int) -> list[tuple[int, int]]:
    """The order ZeRO-3 fetches modules in one training step, as (module index, gathered elements):
    the forward in module order, then the backward in reverse; with checkpointing each layer is
    recomputed (its forward again) right before its backward. Modules whose parameters are all
    persistent (at most ``threshold`` elements each) are never gathered and are left out."""
    sizes = [sum(n for n in own if n > threshold) for _, own in arch.modules]
    forward = [i for i, size in enumerate(sizes) if size]
    layer_of = {i: arch.modules[i][0] for i in forward}
    if not checkpointing:
        return [(i, sizes[i]) for i in forward + forward[::-1]]
    layers: dict[int, list[int]] = {}
    for i in forward:
        if layer_of[i] >= 0:
            layers.setdefault(layer_of[i], []).append(i)
    backward, done = [], set()
    for i in reversed(forward):
        layer = layer_of[i]
        if layer < 0:
            backward.append(i)
        elif layer not in done:  # the layer's recomputed forward, then its backward
            done.add(layer)
            backward += layers[layer] + layers[layer][::-1]
    return [(i, sizes[i]) for i in forward + backward]


def zero3_gathered_elements(arch: Architecture, settings: ZeroSettings = ZeroSettings(), *,
                            checkpointing: bool = False) -> int:
    """Peak parameter elements ZeRO-3 holds gathered (whole) at once during a step, from a replay of
    DeepSpeed's policy (deepspeed/runtime/zero/partitioned_param_coordinator.py) over the step's
    module order (:func:`_zero3_trace`), once the first step has recorded that order:

    * a module's parameters are gathered before it runs, and the next modules' are prefetched while
      fewer than min(max_live_parameters - gathered, prefetch bucket) elements are in flight;
    * after it runs, they are released unless the module runs again within ``max_reuse_distance``
      elements of the modules that follow (so with DeepSpeed's default of 1e9, a model under ~1e9
      parameters stays gathered from its forward through its backward);
    * a module one forward calls twice (:attr:`Architecture.called_twice`) is never released
      (measured on DeBERTa-v2: every layer's query and key projections stay gathered from step
      to step, whatever the limits).

    Counted per module, not per parameter (DeepSpeed prefetches parameter by parameter: the
    prefetch may overshoot here by up to one module)."""
    threshold = settings.threshold(arch.hidden)
    trace = _zero3_trace(arch, checkpointing, threshold)
    prefetch = settings.prefetch(arch.hidden)
    gathered: set[int] = set()
    live = peak = 0
    frontier = 0  # the prefetch queue's head: the trace position it has walked to
    for step, (module, size) in enumerate(trace):
        frontier = max(frontier, step + 1)
        if module not in gathered:
            gathered.add(module)
            live += size
        budget, fetched = min(settings.max_live_parameters - live, prefetch), 0
        while frontier < len(trace) and fetched < budget:
            nxt, nxt_size = trace[frontier]
            if nxt not in gathered:
                gathered.add(nxt)
                live += nxt_size
                fetched += nxt_size
            frontier += 1
        peak = max(peak, live)
        traversed, reused = 0, False
        for later, later_size in trace[step + 1:]:
            if traversed >= settings.max_reuse_distance:
                break
            if later == module:
                reused = True
                break
            traversed += later_size
        # a module the prefetch has walked past its next use stays gathered for it, as in DeepSpeed
        if module not in arch.called_twice and not reused and all(m != module for m, _ in trace[step + 1:frontier]):
            gathered.discard(module)
            live -= size
    return peak


# --------------------------------------------------------------------------------------------
# activations
# --------------------------------------------------------------------------------------------


def _ffn_bytes_per_element(arch: Architecture, mask: int) -> int:
    """Bytes saved per (token, intermediate unit) in the feed-forward block."""
    if arch.activation == "relu":
        act = BF16  # relu saves its output (the next matmul's input); its input is freed
    elif arch.activation == "gelu_new":
        act = 5 * BF16  # HF's Python tanh-GELU: x, 0.5 x, tanh(.), 1 + tanh(.), the product
    else:
        act = 2 * BF16  # a fused activation: its input and its output (the next matmul's input)
    gate = BF16 if arch.gated else 0  # the linear gate, saved by the product
    inner_dropout = mask + BF16 if arch.family == "t5" else 0  # T5 drops out inside the FFN
    return act + gate + inner_dropout


def layer_activation_terms(arch: Architecture, sequences: int, seq: int, attention: Attention = "flash",
                           *, mask_bytes: int = CUDA_DROPOUT_MASK) -> dict[str, int]:
    """Bytes one encoder layer saves for its backward pass, by what saves them.

    ``sequences`` x ``seq`` tokens per GPU, bf16 activations, dropout masks of ``mask_bytes``
    (CUDA's fused dropout keeps a bool mask; CPU and meta keep an input-dtype one). With
    t tokens, hidden h, intermediate f, attention width A = heads x head_dim, the score matrix
    S = sequences x heads x seq^2::

        BERT / DeBERTa (post-LN):  2t(h + 3A + A) + m th (attention-out dropout) + 2t(3h) (LayerNorm
                                   inputs, LN1 output) + 16t (LN stats) + m th (FFN dropout) + FFN
        T5 (pre-RMSNorm):          two RMSNorms of (2 + 4 + 2 + 2) th + 16t (HF's; fastcse's
                                   fused path: torch's rms_norm, (2 + 2) th + 4t), 2t(3A + A),
                                   2 m th (dropout masks) + FFN
        FFN:                       t f x (2 + 2 fused GELU | 10 HF's gelu_new | 2 relu)
                                   (+ 2 gate, + m + 2 T5's inner dropout)
        attention flash:           + 4 x sequences x heads x seq (fp32 log-sum-exp)
        attention eager:           + (2 + m + 2) S (probabilities, dropout mask, dropped probabilities)
                                   (+ 2tA: DeBERTa's scaled K copy)
        DeBERTa relative position: P rows of the table (eager: 2 x position_buckets; flash: the
                                   2 seq - 1 the length reaches), per layer (2 + m) P h (dropped
                                   relative embeddings) + 2 x 2 P A (pos_key, pos_query);
                                   eager repeats pos_key / pos_query per sequence (x sequences) and
                                   saves the c2p / p2c tables: 2 x 2 x sequences x heads x seq x P.

    Checked op by op against the Hugging Face layers run on the meta device under
    :class:`fastcse.memory.StorageCounter` (tests/test_plan.py).
    """
    t, h, f, a_width, m = sequences * seq, arch.hidden, arch.intermediate, arch.attention_width, mask_bytes
    scores = sequences * arch.heads * seq * seq
    terms: dict[str, int] = {}
    if arch.family == "t5" and attention == "flash":
        # fastcse.models.biased runs T5's norms as torch's fused rms_norm: it keeps its input and
        # an fp32 rstd per row; the next projection keeps the output
        terms["RMSNorms (bf16 input, fp32 rstd, output) x 2"] = 2 * (2 * BF16 * t * h + FP32 * t)
    else:
        if arch.family == "t5":
            terms["RMSNorms (bf16 input, fp32 copy, normalised, output) x 2"] = 2 * (BF16 + FP32 + BF16 + BF16) * t * h
        else:
            terms["layer input (q/k/v projections)"] = BF16 * t * h
            terms["LayerNorm inputs x 2, LN1 output (FFN input)"] = 3 * BF16 * t * h
        terms["LayerNorm statistics x 2"] = 2 * LN_STATS * t
    terms["q, k, v"] = 3 * BF16 * t * a_width
    terms["attention output (output projection input)"] = BF16 * t * a_width
    terms["dropout masks (attention output, FFN output)"] = 2 * m * t * h
    terms["feed-forward"] = _ffn_bytes_per_element(arch, m) * t * f
    if attention == "flash":
        terms["attention log-sum-exp (fp32)"] = FP32 * sequences * arch.heads * seq
    elif attention == "eager":
        terms["attention probabilities, dropout mask, dropped probabilities"] = (2 * BF16 + m) * scores
        if arch.family == "deberta-v2":
            terms["K / scale copy"] = BF16 * t * a_width
    else:
        raise ValueError(f"attention must be 'flash' or 'eager', got {attention!r}")
    if arch.relative_kinds:
        k = arch.relative_kinds
        rows = arch.relative_positions if attention == "eager" else min(arch.relative_positions, 2 * seq - 1)
        terms["relative embeddings after dropout"] = (BF16 + m) * rows * h
        if attention == "eager":
            terms["pos_key / pos_query repeated per sequence"] = k * BF16 * sequences * rows * a_width
            terms["c2p / p2c tables"] = k * BF16 * sequences * arch.heads * seq * rows
        else:
            terms["pos_key / pos_query"] = k * BF16 * rows * a_width
    return terms


def _outside_layers_bytes(arch: Architecture, sequences: int, seq: int, mask: int) -> tuple[int, int]:
    """(before, after) the layers: the embeddings' LayerNorm and dropout, DeBERTa's convolution and
    the encoder's output (held by the pooler) stay alive through the layers' backward; T5's final
    RMSNorm and dropout run backward first, so they are gone by the layers' backward."""
    t, h = sequences * seq, arch.hidden
    before = BF16 * t * h  # the encoder's output
    if arch.family == "t5":
        before += mask * t * h  # embedding dropout
        after = (BF16 + FP32 + BF16 + mask) * t * h + LN_STATS * t
        return before, after
    before += BF16 * t * h + LN_STATS * t + mask * t * h  # embedding LayerNorm input, its stats, dropout mask
    if arch.conv:  # conv input copy, dropout mask and output (GELU input), LayerNorm input and stats
        before += (3 * BF16 + mask) * t * h + LN_STATS * t
    return before, 0


def backward_workspace_bytes(arch: Architecture, sequences: int, seq: int, attention: Attention = "flash") -> int:
    """Transient bytes while one layer runs backward, on top of what is saved: the incoming and
    outgoing activation gradients (2 x 2th) and the FFN's intermediate gradients (2tf, 4tf gated),
    or, in the attention, dq, dk, dv (3 x 2tA) and, for DeBERTa's fused kernel (position terms inside
    the tiles: fastcse.kernels.biased_attention), its stored score gradient (bf16, sequences x heads
    x L^2) and the fp32 gradients of pos_key / pos_query per relative distance (heads x (2L - 1) x
    head width each)."""
    t, h = sequences * seq, arch.hidden
    ffn = 2 * BF16 * t * h + (2 if arch.gated else 1) * BF16 * t * arch.intermediate
    attn = 2 * BF16 * t * h + 3 * BF16 * t * arch.attention_width
    if arch.relative_kinds and attention == "flash":
        attn += BF16 * sequences * arch.heads * seq * seq
        attn += arch.relative_kinds * FP32 * (2 * seq - 1) * arch.attention_width
    return max(ffn, attn)


@dataclass
class Activations:
    full: int  # peak bytes without checkpointing
    checkpointed: int  # with activation checkpointing of every layer
    layer: int  # one layer's saved bytes


def activation_bytes(arch: Architecture, sequences: int, seq: int, attention: Attention = "flash",
                     *, no_grad_sequences: int = 0, mask_bytes: int = CUDA_DROPOUT_MASK) -> Activations:
    """Peak activation bytes of the encoder's forward + backward for ``sequences`` x ``seq`` tokens.

    Without checkpointing: every layer's saved bytes and the embeddings' / output's, plus the
    larger of what runs after the layers (T5's final norm) and one layer's backward workspace.
    With checkpointing (each layer recomputed in backward): each layer keeps only its input
    (2th); one layer's full activations exist again while it is recomputed, plus the workspace.
    ``no_grad_sequences``: a second encoder's forward without gradient (ESimCSE's momentum
    encoder) after the model's forward, while its activations are saved; it holds at most one
    layer's activations at a time.
    """
    layer = sum(layer_activation_terms(arch, sequences, seq, attention, mask_bytes=mask_bytes).values())
    before, after = _outside_layers_bytes(arch, sequences, seq, mask_bytes)
    work = backward_workspace_bytes(arch, sequences, seq, attention)
    no_grad = sum(layer_activation_terms(arch, no_grad_sequences, seq, attention, mask_bytes=mask_bytes).values()) \
        if no_grad_sequences else 0
    full = arch.layers * layer + before + max(after + no_grad, work)
    checkpointed = arch.layers * BF16 * sequences * seq * arch.hidden + before + max(after + no_grad, layer + work)
    return Activations(full=full, checkpointed=checkpointed, layer=layer)


# --------------------------------------------------------------------------------------------
# the loss, measured on the meta device
# --------------------------------------------------------------------------------------------


def _simulated_gather(world: int):
    """``all_gather_with_grad`` as one rank of ``world`` allocates it (fastcse.distributed): the
    world's rows gathered into one tensor (a list of receive buffers, then a concatenation); in
    backward a copy of the whole gradient (all-reduced in place), of which this rank keeps its rows."""
    import torch

    class _Gather(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.rows = x.shape[0]
            return torch.cat([torch.empty_like(x) for _ in range(world)])

        @staticmethod
        def backward(ctx, grad):
            return grad.contiguous().clone()[:ctx.rows]

    return _Gather.apply


def loss_bytes(dim: int, batch: int, gpus: int, method: Method, *, queue_size: int = 0,
               temperature: float = 0.05, as_cuda: bool = True, round_to: int = 512) -> int:
    """Peak bytes of :func:`fastcse.info_nce` forward + backward on one of ``gpus`` ranks.

    The rank holds ``batch / gpus`` (rounded up) anchors (bf16, ``dim`` wide) and gathers every rank's positives
    (and, supervised, hard negatives): M = batch (unsup), 2 batch (sup), batch + queue (ESimCSE)
    candidates. Run on the meta device as CUDA (``fastcse.memory.meta_as_cuda``: the loss takes
    its CUDA backend, Triton launches stubbed) under ``StorageCounter(round_to=512)``; the gather is
    simulated (:func:`_simulated_gather`). Counts what the loss allocates above its inputs.
    ``as_cuda=False, round_to=1``: the CPU path (chunked backend) with exact byte counts instead.
    """
    from unittest import mock

    import torch

    import fastcse.distributed as distributed
    from fastcse.infonce import info_nce
    from fastcse.memory import StorageCounter, meta_run, stub_kernel_launches

    n = math.ceil(batch / gpus)
    device = "cuda" if as_cuda else "meta"
    with meta_run(as_cuda=as_cuda), stub_kernel_launches(), \
            mock.patch.object(distributed, "world_info", lambda: (0, gpus)), \
            mock.patch.object(distributed, "all_gather_with_grad", _simulated_gather(gpus)):
        def embeddings():
            return torch.empty(n, dim, device=device, dtype=torch.bfloat16, requires_grad=True)

        anchors, positives = embeddings(), embeddings()
        hard = embeddings() if method == "simcse-sup" else None
        queue = (torch.empty(queue_size, dim, device=device, dtype=torch.bfloat16)
                 if method == "esimcse" and queue_size else None)
        with StorageCounter(round_to=round_to) as counter:
            info_nce(anchors, positives, hard, queue=queue, temperature=temperature,
                     gather_across_ranks=gpus > 1).backward()
    return counter.peak


# --------------------------------------------------------------------------------------------
# the plan
# --------------------------------------------------------------------------------------------


@dataclass
class PlanOptions:
    """The run being planned (the CLI's flags)."""

    gpu_mem: float = 80.0  # GB (1e9 bytes) per GPU
    batch: int = 64  # sentences (anchors) per step over all GPUs, as fastcse.train's --batch-size
    seq: int = 32
    zero: int = 3
    offload: bool = False
    checkpointing: bool = False
    method: Method = "simcse-unsup"
    attention: Attention = "flash"
    queue_size: int = 128  # ESimCSE
    gpus_per_node: int = 8
    reserve: float = 0.10  # share of GPU memory kept for the CUDA context, NCCL, fragmentation
    persistence_threshold: Optional[int] = None  # ZeRO-3; None: zero_settings' (10 x hidden: fastcse.train's "auto")
    precision: Precision = "bf16"
    device: Literal["cuda", "cpu"] = "cuda"  # cpu: the CPU benchmark runs (input-dtype dropout masks, single-tensor AdamW)
    # the DeepSpeed file names its own optimizer (FusedAdam on a GPU, DeepSpeedCPUAdam offloaded: both
    # update in place) instead of fastcse's torch AdamW; None: as the shipped configs (only with --offload)
    ds_optimizer: Optional[bool] = None
    zero_settings: ZeroSettings = field(default_factory=ZeroSettings)  # the DeepSpeed config's buffer sizes


@dataclass
class GpuPlan:
    """One GPU count's memory per GPU, in GB. The first fields are the issue's JSON schema."""

    gpus: int
    params_gb: float
    grads_gb: float
    optimizer_gb: float
    model_states_gb: float
    activations_gb: float
    loss_gb: float
    total_gb: float
    fits: bool
    momentum_gb: float = 0.0
    buffers_gb: float = 0.0
    step_gb: float = 0.0
    activations_full_gb: float = 0.0
    activations_checkpointed_gb: float = 0.0
    cpu_gb_per_node: float = 0.0
    usable_gb: float = 0.0
    batch_per_gpu: float = 0.0
    sequences_per_gpu: int = 0
    notes: list[str] = field(default_factory=list)


def _buffer_bytes(arch: Architecture, opts: PlanOptions, momentum_gathered: bool) -> tuple[float, float]:
    """DeepSpeed's working buffers, as (held all along, held only through forward + backward):
    without ZeRO the gradients are flattened for all-reduce in buckets of up to 5e8 elements during
    backward; ZeRO-1/2 reduce through two gradient buckets (overlap_comm), allocated once; ZeRO-3
    keeps one reduce bucket and gathers parameters while modules run
    (:func:`zero3_gathered_elements`: from the largest module plus the prefetch, with small
    gather limits, up to the whole model with DeepSpeed's defaults) and reduce-scatters each
    module's whole gradient, all released before the optimizer step; ESimCSE's fp32 momentum
    encoder gathers its own, one module at a time."""
    width = PARAM_BYTES[opts.precision]
    settings = opts.zero_settings
    bucket = settings.bucket(arch.hidden)
    if opts.zero == 0:
        return 0.0, width * min(arch.n_params, DS_ALLREDUCE_BUCKET)
    if opts.zero in (1, 2):
        return 2.0 * width * bucket, 0.0
    # the largest module's backward: its gathered weight, its whole gradient and reduce_scatter's
    # flattened copy of it (deepspeed/runtime/comm/coalesced_collectives.py) are alive at once
    # (measured on 2 gloo ranks: 1.72 GB above the states in DeBERTa-v2-large's fp32 backward,
    # 3 x 0.52 GB of word embeddings plus the activations)
    gathered = width * (zero3_gathered_elements(arch, settings, checkpointing=opts.checkpointing)
                        + 2 * arch.largest_module_params)
    if momentum_gathered:
        gathered += FP32 * arch.largest_module_params
    return float(width * bucket), float(gathered)


def plan_for(arch: Architecture, gpus: int, opts: PlanOptions) -> GpuPlan:
    """The memory of one GPU among ``gpus`` (see the module docstring and docs/SCALE.md)."""
    notes = []
    if opts.batch % gpus:
        notes.append(f"batch {opts.batch} does not split over {gpus} GPUs (rounded up per GPU)")
    per_gpu = math.ceil(opts.batch / gpus)
    threshold = opts.zero_settings.threshold(arch.hidden) if opts.persistence_threshold is None \
        else opts.persistence_threshold
    if opts.persistence_threshold is not None:
        opts = replace(opts, zero_settings=replace(opts.zero_settings, persistence_threshold=threshold))
    states = model_state_bytes(arch.n_params, gpus, opts.zero, offload=opts.offload, precision=opts.precision,
                               persistent_params=arch.persistent_params(threshold) if opts.zero == 3 else 0)
    sequences = VIEWS[opts.method] * per_gpu
    esimcse = opts.method == "esimcse"
    # ESimCSE's momentum encoder embeds the positive views without gradient
    # CPU dropout keeps an input-dtype mask, CUDA's a bool one
    mask = CUDA_DROPOUT_MASK if opts.device == "cuda" else PARAM_BYTES[opts.precision]
    acts = activation_bytes(arch, sequences, opts.seq, opts.attention, no_grad_sequences=per_gpu if esimcse else 0,
                            mask_bytes=mask)
    # fp32 activations: the bf16 figure doubled (a bound: LayerNorm statistics are fp32 either way)
    widen = PARAM_BYTES[opts.precision] // BF16
    activations = (acts.checkpointed if opts.checkpointing else acts.full) * widen
    momentum, cpu = 0.0, states.cpu
    if esimcse:
        # an fp32 copy of the encoder (fastcse.methods.ESimCSE), sharded like the model under ZeRO-3
        shard = FP32 * arch.n_params / (gpus if opts.zero == 3 else 1)
        if opts.zero == 3 and opts.offload:
            cpu += shard
        else:
            momentum += shard
        momentum += FP32 * opts.queue_size * arch.hidden
    loss = loss_bytes(arch.hidden, opts.batch, gpus, opts.method, queue_size=opts.queue_size) * widen
    held, transient = _buffer_bytes(arch, opts, esimcse and opts.zero == 3)
    # the optimizer step turns this rank's gradient partition into fp32 (on the CPU when offloaded),
    # one ZeRO-3 sub-group at a time, after the activations and gathered parameters are freed; torch's
    # AdamW (fastcse's, when the DeepSpeed file names no optimizer) then builds its denominator
    # sqrt(v) / c + eps out of place: one temporary of the update's size with the foreach kernels
    # (CUDA's default), two with the single-tensor loop (CPU tensors: the sqrt and the quotient);
    # DeepSpeed's own optimizers update in place
    updated = arch.n_params if opts.zero == 0 else min(
        arch.n_params / gpus, opts.zero_settings.sub_group_size if opts.zero == 3 else math.inf)
    own_optimizer = opts.offload if opts.ds_optimizer is None else opts.ds_optimizer
    step = 0.0
    if not opts.offload:
        step = FP32 * updated * (1 + (0 if own_optimizer else ADAM_TEMPORARIES[opts.device]))
    elif not own_optimizer:  # offloaded torch AdamW: its temporaries on the host (the fp32 gradients are there)
        cpu += FP32 * updated * ADAM_TEMPORARIES["cpu"]
    total = states.total + momentum + held + max(transient + activations + loss, step)
    usable = opts.gpu_mem * GB * (1.0 - opts.reserve)
    ranks_per_node = min(gpus, opts.gpus_per_node)

    def gb(x):
        return round(x / GB, 4)

    return GpuPlan(
        gpus=gpus, params_gb=gb(states.params), grads_gb=gb(states.grads), optimizer_gb=gb(states.optimizer),
        model_states_gb=gb(states.total), activations_gb=gb(activations), loss_gb=gb(loss), total_gb=gb(total),
        fits=bool(total <= usable and not notes), momentum_gb=gb(momentum), buffers_gb=gb(held + transient),
        step_gb=gb(step), activations_full_gb=gb(acts.full * widen),
        activations_checkpointed_gb=gb(acts.checkpointed * widen),
        cpu_gb_per_node=gb(cpu * ranks_per_node), usable_gb=gb(usable), batch_per_gpu=opts.batch / gpus,
        sequences_per_gpu=sequences, notes=notes)


def plan(arch: Architecture, opts: PlanOptions, gpu_counts: Sequence[int] = GPU_COUNTS) -> list[GpuPlan]:
    return [plan_for(arch, g, opts) for g in gpu_counts]


# --------------------------------------------------------------------------------------------
# the command line
# --------------------------------------------------------------------------------------------


def format_table(arch: Architecture, opts: PlanOptions, rows: Sequence[GpuPlan], highlight: int) -> str:
    ckpt = "checkpointing" if opts.checkpointing else "no checkpointing"
    offload = ", optimizer" + (" and parameters" if opts.zero == 3 else "") + " offloaded to CPU" \
        if opts.offload else ""
    lines = [
        f"{arch.name}: {arch.model_type}, {arch.n_params / 1e9:.3f} B parameters, {arch.layers} layers, "
        f"hidden {arch.hidden}, {arch.heads} heads",
        f"ZeRO-{opts.zero}{offload}; {'bf16 mixed-precision' if opts.precision == 'bf16' else 'fp32'} AdamW; "
        f"{opts.method}, batch {opts.batch} x seq {opts.seq}; {opts.attention} attention, {ckpt}",
        f"GB per GPU (1e9 bytes); fits: total <= {rows[0].usable_gb:.1f} GB "
        f"({opts.gpu_mem:g} GB less {opts.reserve:.0%} reserve); act/ckpt: activations with checkpointing",
        "",
    ]
    header = ["GPUs", "params", "grads", "optim", "states", "momentum", "act", "act/ckpt", "loss",
              "buffers", "step", "total", "fits"]
    if opts.offload:
        header.append("CPU/node")
    table = [header]
    for r in rows:
        cells = [f"{'>' if r.gpus == highlight else ' '}{r.gpus}", *(f"{v:.2f}" for v in (
            r.params_gb, r.grads_gb, r.optimizer_gb, r.model_states_gb, r.momentum_gb, r.activations_full_gb,
            r.activations_checkpointed_gb)), f"{r.loss_gb:.3f}", f"{r.buffers_gb:.2f}", f"{r.step_gb:.2f}",
            f"{r.total_gb:.2f}", "yes" if r.fits else "NO"]
        if opts.offload:
            cells.append(f"{r.cpu_gb_per_node:.1f}")
        table.append(cells)
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in table]
    notes = sorted({n for r in rows for n in r.notes})
    lines += [""] + [f"note: {n}" for n in notes] if notes else []
    z = opts.zero_settings
    if opts.zero == 3:
        lines.append(f"ZeRO-3 gather limits: max_live_parameters {z.max_live_parameters:.3g}, max_reuse_distance "
                     f"{z.max_reuse_distance:.3g}, prefetch {z.prefetch(arch.hidden):.3g} elements; "
                     f"sub_group_size {z.sub_group_size:.3g}")
    lines.append(f"> marks --gpus {highlight}; total = states + momentum + held buffers + max(gathered parameters "
                 f"+ act + loss, step)")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fastcse.plan", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True,
                   help=f"{' | '.join(NAMED_CONFIGS)} | PATH (a local config.json or model folder)")
    p.add_argument("--gpus", type=int, required=True, help="GPU count to highlight (the table covers 1-16)")
    p.add_argument("--gpu-mem", type=float, required=True, help="memory per GPU in GB (1e9 bytes)")
    p.add_argument("--batch", type=int, required=True, help="sentences per step over all GPUs")
    p.add_argument("--seq", type=int, required=True, help="tokens per sequence")
    p.add_argument("--zero", type=int, choices=(0, 1, 2, 3), default=None,
                   help="ZeRO stage (default: the --ds file's, else 3)")
    p.add_argument("--ds", metavar="FILE",
                   help="the DeepSpeed config of the run (ds_configs/*.json): its ZeRO stage, offload, bucket "
                        "sizes, gather limits (stage3_max_live_parameters / max_reuse_distance) and "
                        "sub_group_size; without it DeepSpeed's defaults, as ds_configs/zero3.json keeps them")
    p.add_argument("--precision", choices=PRECISIONS, default="bf16",
                   help="bf16 mixed precision (GPUs), or fp32 (CPUs without bf16 matrix units)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cpu: plan a CPU run (gloo ranks): input-dtype dropout masks, torch AdamW's single-tensor "
                        "update")
    p.add_argument("--offload", action="store_true",
                   help="optimizer states (and, under ZeRO-3, parameters) in CPU memory")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing of every layer")
    p.add_argument("--method", choices=tuple(VIEWS), default="simcse-unsup")
    p.add_argument("--attn", choices=("flash", "eager"), default="flash",
                   help="flash: fused attention (no score matrix); eager: scores materialised")
    p.add_argument("--queue-size", type=int, default=128, help="ESimCSE queue rows")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--reserve", type=float, default=0.10,
                   help="share of GPU memory not planned for (CUDA context, NCCL, fragmentation)")
    p.add_argument("--persistence-threshold", type=int, default=None,
                   help="ZeRO-3 stage3_param_persistence_threshold (default 10 x hidden, fastcse.train's auto)")
    p.add_argument("--json", action="store_true", help="one JSON object per GPU count")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("gpus", "batch", "seq", "gpus_per_node"):
        if getattr(args, name) < 1:
            print(f"--{name.replace('_', '-')} must be at least 1", file=sys.stderr)
            return 2
    settings, ds_optimizer = ZeroSettings(), None
    if args.ds:
        try:
            ds, settings = read_ds_config(args.ds)
        except ValueError as exc:
            print(f"fastcse.plan: {exc}", file=sys.stderr)
            return 2
        zero, ds_optimizer = ds.get("zero_optimization", {}), "optimizer" in ds
        stage = int(zero.get("stage", 0))
        if args.zero is not None and args.zero != stage:
            print(f"--zero {args.zero} contradicts --ds {args.ds} (stage {stage})", file=sys.stderr)
            return 2
        args.zero = stage
        offloaded = any(str((zero.get(k) or {}).get("device", "none")) == "cpu"
                        for k in ("offload_optimizer", "offload_param"))
        args.offload = args.offload or offloaded
    if args.zero is None:
        args.zero = 3
    if args.offload and args.zero == 0:
        print("--offload needs --zero 1, 2 or 3", file=sys.stderr)
        return 2
    try:
        arch = architecture(args.model)
    except (OSError, ValueError, KeyError) as exc:
        print(f"fastcse.plan: {exc}", file=sys.stderr)
        return 2
    opts = PlanOptions(gpu_mem=args.gpu_mem, batch=args.batch, seq=args.seq, zero=args.zero, offload=args.offload,
                       checkpointing=args.checkpointing, method=args.method, attention=args.attn,
                       queue_size=args.queue_size, gpus_per_node=args.gpus_per_node, reserve=args.reserve,
                       persistence_threshold=args.persistence_threshold, precision=args.precision,
                       device=args.device, zero_settings=settings, ds_optimizer=ds_optimizer)
    counts = sorted(set(GPU_COUNTS) | {args.gpus})
    rows = plan(arch, opts, counts)
    if args.json:
        print(json.dumps([asdict(r) for r in rows], indent=2))
    else:
        print(format_table(arch, opts, rows, args.gpus))
    return 0


if __name__ == "__main__":
    sys.exit(main())
