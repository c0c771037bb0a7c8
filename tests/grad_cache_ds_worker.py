"""Gradient caching under DeepSpeed ZeRO-2 / ZeRO-3: the worker of tests/test_grad_cache.py.

Run by ``deepspeed --num_gpus 2 tests/grad_cache_ds_worker.py --out DIR`` (2 CPU ranks on gloo).
For each ZeRO stage it trains a tiny BERT for a few optimizer steps of 2 micro-batches, each rank
holding half of every global micro-batch, with distributed negatives (``gather_across_ranks``):

- ``plain``: the uncached step (``engine.backward(loss)``, boundary on the last micro-batch);
- ``cached-coalesce`` / ``cached-boundary``: :class:`fastcse.grad_cache.DeepSpeedCachedBackward`
  with and without ``engine.coalesce_grad_reduction()``, chunks of 3 rows (dividing no batch);
- with dropout on, ``chunks``: the uncached computation over the same chunks (the reference);
- ``*-poison``: the second step's first micro-batch is non-finite on every rank, so that window is
  dropped.

Every rank writes ``rank{r}.pt``: per run the per-micro-batch local losses, the final parameters
(gathered under ZeRO-3) and the number of DeepSpeed gradient reductions (calls into DeepSpeed's
reduction collectives during training). Rank 0 also writes ``single.pt``: the same training in one
process over the global batches (dropout 0), without DeepSpeed.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
STEPS, ACCUM, N_PER_RANK, CHUNK, LR, SEQ, VOCAB = 3, 2, 4, 3, 0.5, 10, 100
BLOCKS = {"simcse-unsup": 1, "simcse-sup": 3}
REDUCTIONS = ("all_reduce", "all_reduce_coalesced", "reduce", "reduce_scatter", "reduce_scatter_tensor",
              "inference_all_reduce")


def build(dropout: float):
    from transformers import BertConfig

    from fastcse.config import MethodConfig
    from fastcse.models import SentenceEncoder

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=dropout,
                     attention_probs_dropout_prob=dropout)
    return SentenceEncoder.from_config(cfg, pooling="mean", attn_backend="auto").train(), MethodConfig


def make_method(name, MethodConfig):
    from fastcse.methods import SimCSESup, SimCSEUnsup

    cls = {"simcse-unsup": SimCSEUnsup, "simcse-sup": SimCSESup}[name]
    cfg = MethodConfig(name=name, hard_negative_weight=0.3 if name == "simcse-sup" else 0.0)
    return cls(cfg, tokenizer_fn=None, pad_id=0, special_ids={0}, max_seq_length=SEQ, seed=0)


def global_batch(name: str, step: int, micro: int, world: int) -> dict:
    """The global micro-batch: ``BLOCKS`` blocks of ``world * N_PER_RANK`` rows, rank-major in each."""
    g = torch.Generator().manual_seed(1000 * step + micro)
    rows = BLOCKS[name] * world * N_PER_RANK
    lengths = torch.randint(3, SEQ + 1, (rows,), generator=g)
    lengths[0] = SEQ
    mask = (torch.arange(SEQ)[None, :] < lengths[:, None]).long()
    ids = torch.randint(5, VOCAB, (rows, SEQ), generator=g) * mask
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


def local_rows(batch: dict, name: str, rank: int, world: int) -> dict:
    per_block = world * N_PER_RANK
    idx = torch.cat([torch.arange(b * per_block + rank * N_PER_RANK, b * per_block + (rank + 1) * N_PER_RANK)
                     for b in range(BLOCKS[name])])
    return {k: v[idx] for k, v in batch.items()}


def loss_fn_for(method, gather: bool):
    from fastcse.losses import info_nce

    w = method.cfg.hard_negative_weight
    return lambda x: info_nce(x.anchors, x.positives, x.hard_negatives, temperature=0.05, hard_negative_weight=w,
                              gather_across_ranks=gather, backend="chunked")


class ChunksWithGraph:
    """The uncached computation over the same chunks (the reference with dropout on)."""

    def __init__(self, model, chunk_size):
        self.model, self.chunk_size = model, chunk_size

    @property
    def training(self):
        return self.model.training

    def __call__(self, **features):
        from fastcse.grad_cache import chunk_ranges, slice_features

        rows = features["input_ids"].shape[0]
        return torch.cat([self.model(**slice_features(features, a, b)) for a, b in chunk_ranges(rows, self.chunk_size)])


def ds_config(stage: int, world: int) -> dict:
    cfg = json.loads((ROOT / "ds_configs" / f"zero{stage}.json").read_text())
    cfg.update(train_micro_batch_size_per_gpu=N_PER_RANK, gradient_accumulation_steps=ACCUM,
               train_batch_size=N_PER_RANK * ACCUM * world, gradient_clipping=0.0)
    cfg["bf16"]["enabled"] = False
    cfg["fp16"]["enabled"] = False
    zero = cfg["zero_optimization"]
    for key in ("reduce_bucket_size", "stage3_prefetch_bucket_size"):
        if zero.get(key) == "auto":
            zero[key] = 1_000_000
    if zero.get("stage3_param_persistence_threshold") == "auto":
        zero["stage3_param_persistence_threshold"] = 0  # every parameter sharded, none kept whole
    return cfg


class ReductionCounter:
    """Counts calls into DeepSpeed's reduction collectives (its communication backend object)."""

    def __init__(self):
        import deepspeed.comm.comm as ds_comm

        self.backend, self.count, self.active, self._saved = ds_comm.cdb, 0, False, {}
        for name in REDUCTIONS:
            fn = getattr(self.backend, name, None)
            if fn is None:
                continue
            self._saved[name] = fn

            def counted(*args, _fn=fn, **kwargs):
                if self.active:
                    self.count += 1
                return _fn(*args, **kwargs)

            setattr(self.backend, name, counted)

    def close(self):
        for name, fn in self._saved.items():
            setattr(self.backend, name, fn)


def final_params(engine, stage: int) -> dict:
    import deepspeed

    params = list(engine.module.parameters())
    ctx = deepspeed.zero.GatheredParameters(params, modifier_rank=None) if stage == 3 else torch.no_grad()
    with ctx:
        return {n: p.detach().clone().float() for n, p in engine.module.named_parameters()}


def run_deepspeed(stage: int, name: str, dropout: float, mode: str, rank: int, world: int) -> dict:
    import deepspeed

    from fastcse.grad_cache import DeepSpeedCachedBackward, cached_method_step

    encoder, MethodConfig = build(dropout)
    method = make_method(name, MethodConfig)
    optimizer = torch.optim.SGD(encoder.parameters(), lr=LR)
    engine, *_ = deepspeed.initialize(model=encoder, optimizer=optimizer, config=ds_config(stage, world))
    loss_fn = loss_fn_for(method, gather=True)
    poison = mode.endswith("-poison")
    mode = mode.removesuffix("-poison")
    cached = None if mode in ("plain", "chunks") else DeepSpeedCachedBackward(
        engine, coalesce=mode == "cached-coalesce")
    counter = ReductionCounter()
    losses, applied = [], []
    try:
        for step in range(STEPS):
            for k in range(ACCUM):
                batch = local_rows(global_batch(name, step, k, world), name, rank, world)
                torch.manual_seed(7 + 100 * step + 10 * k + rank)  # this micro-batch's dropout stream
                finite = not (poison and step == 1 and k == 0)
                last = k == ACCUM - 1 or not finite
                counter.active = True
                if cached is None:
                    model = engine if mode == "plain" else ChunksWithGraph(engine, CHUNK)
                    loss = loss_fn(method.loss_inputs(model, batch))
                    engine.set_gradient_accumulation_boundary(last)
                    engine.backward(loss if finite else loss * float("nan"))
                    engine.step()
                else:
                    cstep = cached_method_step(engine, method, batch, loss_fn, chunk_size=CHUNK)
                    loss = cstep.loss
                    cached.backward(cstep, finite=finite, last=k == ACCUM - 1)
                counter.active = False
                losses.append(float(loss.detach()))
                if last:
                    applied.append(bool(engine.was_step_applied()))
                    break
    finally:
        counter.close()
    out = {"losses": losses, "applied": applied, "reductions": counter.count, "params": final_params(engine, stage),
           "coalesced": bool(cached is not None and cached.coalesce)}
    engine.destroy()
    return out


def run_single(name: str, world: int) -> dict:
    """One process over the global micro-batches, dropout 0: the accumulation window averaged."""
    encoder, MethodConfig = build(0.0)
    method = make_method(name, MethodConfig)
    optimizer = torch.optim.SGD(encoder.parameters(), lr=LR)
    loss_fn = loss_fn_for(method, gather=False)
    losses = []
    for step in range(STEPS):
        for k in range(ACCUM):
            loss = loss_fn(method.loss_inputs(encoder, global_batch(name, step, k, world)))
            (loss / ACCUM).backward()
            losses.append(float(loss))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {"losses": losses, "params": {n: p.detach().clone() for n, p in encoder.named_parameters()}}


RUNS = [  # (method, dropout, mode)
    ("simcse-unsup", 0.0, "plain"), ("simcse-unsup", 0.0, "cached-coalesce"), ("simcse-unsup", 0.0, "cached-boundary"),
    ("simcse-sup", 0.0, "plain"), ("simcse-sup", 0.0, "cached-coalesce"),
    ("simcse-unsup", 0.1, "chunks"), ("simcse-unsup", 0.1, "cached-coalesce"), ("simcse-unsup", 0.1, "cached-boundary"),
    ("simcse-unsup", 0.0, "plain-poison"), ("simcse-unsup", 0.0, "cached-coalesce-poison"),
]


def main() -> None:
    import deepspeed

    ap = argparse.ArgumentParser()
    ap.add_argument("--local_rank", "--local-rank", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--stages", type=int, nargs="+", default=[2, 3])
    args = ap.parse_args()
    torch.set_num_threads(1)
    deepspeed.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {}
    for stage in args.stages:
        for name, dropout, mode in RUNS:
            results[f"zero{stage}/{name}/p{dropout}/{mode}"] = run_deepspeed(stage, name, dropout, mode, rank, world)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.save(results, args.out / f"rank{rank}.pt")
    if rank == 0:
        torch.save({name: run_single(name, world) for name in BLOCKS}, args.out / "single.pt")
    dist.barrier()


if __name__ == "__main__":
    main()
