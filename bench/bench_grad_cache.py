"""Gradient caching: training-step throughput and peak memory against the chunk size.

One unsupervised SimCSE micro-step (the batch twice in one forward, ``info_nce``, backward) of a
randomly initialised BERT, train mode (dropout 0.1), on SimCSE-like batches (token lengths of
wiki1m lines, capped at 32: ``bench.bench_encoder.wiki_lengths``):

- provider ``uncached``: ``method.loss_inputs(encoder, batch)``, the loss, ``loss.backward()``;
- provider ``cached``: :func:`fastcse.grad_cache.cached_method_step` with chunks of ``K`` rows
  (of the 2N rows the method forwards), then ``step.backward()``;

each with the fused loss (``chunked`` on CPU, ``triton`` on CUDA) and the ``eager`` one. Rows of
``bench/results/grad_cache.csv`` (``--csv``: a file name there or a path): ``metric=throughput``
(sentences/s, p50/p20/p80 from the timing quantiles), ``latency`` (ms per step; on CPU by default
the CPU time of one intra-op thread, which other processes on shared cores do not move;
``--clock wall`` for wall time), ``peak_memory`` (bytes above what was live before the step: the
caching allocator's peak on CUDA, tensor storage on CPU), x = the chunk size (``all`` for
uncached), and per configuration one ``cost_ratio`` row: the cached step's time per sentence over
the uncached one's at the same batch (the CPU bar: at most 1.5 with chunks of at least a quarter
of the rows).

Usage::

    python -m bench.bench_grad_cache --quick          # CPU: tiny BERT, batch 64, seconds
    python -m bench.bench_grad_cache                  # tiny and small BERT (GPU: base)
    python -m bench.bench_grad_cache --models small --batch 128 --chunks 32 64 128
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from bench._common import append_rows, make_row, peak_memory_bytes, synchronize
from bench.bench_encoder import make_batch, wiki_lengths

CSV_NAME = "grad_cache.csv"
SHAPES = {  # hidden, layers, heads, intermediate
    "tiny": (64, 2, 4, 128),
    "small": (256, 4, 4, 1024),
    "base": (768, 12, 12, 3072),
}


def build(shape: str, device, dtype):
    from transformers import BertConfig

    from fastcse.models import SentenceEncoder

    hidden, layers, heads, inter = SHAPES[shape]
    cfg = BertConfig(vocab_size=1000 if shape != "base" else 30522, hidden_size=hidden, num_hidden_layers=layers,
                     num_attention_heads=heads, intermediate_size=inter, max_position_embeddings=512)
    torch.manual_seed(0)
    return SentenceEncoder.from_config(cfg, pooling="cls", attn_backend="auto").to(device, dtype).train()


def simcse_method():
    from fastcse.config import MethodConfig
    from fastcse.methods import SimCSEUnsup

    return SimCSEUnsup(MethodConfig(name="simcse-unsup"), tokenizer_fn=None, pad_id=0, special_ids={0},
                       max_seq_length=32, seed=0)


def interleaved_times(fns: list, device, *, warmup: int, reps: int, max_seconds: float,
                      clock: str = "wall") -> list[list[float]]:
    """Milliseconds per call of each of ``fns``, timed round-robin (one call of each per round), so
    that a machine whose speed drifts slows every provider alike. ``clock="thread"``: the calling
    thread's CPU time (``time.thread_time``), for CPU runs on one intra-op thread: what the step
    costs, unmoved by other processes on shared cores (there, wall times of one step varied 8x
    between rounds). Stops after ``reps`` rounds or ``max_seconds`` of wall time."""
    device = torch.device(device)
    now = time.thread_time if clock == "thread" else time.perf_counter
    for _ in range(warmup):
        for fn in fns:
            fn()
    samples: list[list[float]] = [[] for _ in fns]
    start = time.perf_counter()
    for _ in range(reps):
        for fn, out in zip(fns, samples):
            synchronize(device)
            t0 = now()
            fn()
            synchronize(device)
            out.append((now() - t0) * 1e3)
        if time.perf_counter() - start > max_seconds:
            break
    return samples


def _quantiles(samples: list[float]) -> tuple[float, float, float]:
    if len(samples) == 1:
        return samples[0], samples[0], samples[0]
    q = statistics.quantiles(samples, n=10, method="inclusive")
    return statistics.median(samples), q[1], q[7]


def bench_config(shape: str, batch: int, chunks: list[int], loss_backend: str, *, device, dtype, reps: int,
                 max_seconds: float, lengths_pool: list[int], csv_name: str = CSV_NAME,
                 clock: str = "wall") -> list[dict]:
    from fastcse.grad_cache import cached_method_step
    from fastcse.losses import info_nce

    enc = build(shape, device, dtype)
    method = simcse_method()
    rng = random.Random(1)
    ids, mask = make_batch([rng.choice(lengths_pool) for _ in range(batch)], enc.backbone.config.vocab_size, device)
    features = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}

    def loss_fn(x):
        return info_nce(x.anchors, x.positives, temperature=0.05, backend=loss_backend)

    def uncached():
        enc.zero_grad(set_to_none=True)
        loss_fn(method.loss_inputs(enc, features)).backward()

    def cached(k):
        def run():
            enc.zero_grad(set_to_none=True)
            cached_method_step(enc, method, features, loss_fn, chunk_size=k).backward()
        return run

    rows, per_sentence = [], {}
    points = [("uncached", "all", uncached)] + [("cached", k, cached(k)) for k in chunks]
    extra_base = {"model": f"bert-{shape}", "batch": batch, "rows": 2 * batch, "method": "simcse-unsup",
                  "loss_backend": loss_backend, "dtype": str(dtype).replace("torch.", ""), "dropout": 0.1,
                  "real_tokens": int(mask.sum()), "padded_tokens": int(mask.numel()),
                  "timing": "interleaved " + ("cuda-sync" if device.type == "cuda" else clock),
                  "threads": torch.get_num_threads()}
    times = interleaved_times([fn for _, _, fn in points], device, warmup=1, reps=reps, max_seconds=max_seconds,
                              clock=clock)
    for (provider, k, fn), samples in zip(points, times):
        p50, p20, p80 = _quantiles(samples)
        peak = peak_memory_bytes(fn, device)
        per_sentence[k] = p50 / batch
        extra = {**extra_base, "reps": len(samples)}
        common = dict(kernel="grad_cache", provider=provider, mode="full", x_name="chunk", x_value=k,
                      extra_config=extra, device=device)
        sent_s = lambda ms: batch / (ms / 1e3)  # noqa: E731
        point = [make_row(metric="throughput", unit="sentences/s", p50=sent_s(p50), p20=sent_s(p80),
                          p80=sent_s(p20), **common),
                 make_row(metric="latency", unit="ms", p50=p50, p20=p20, p80=p80, **common),
                 make_row(metric="peak_memory", unit="bytes", p50=float(peak), **common)]
        if provider == "cached":
            point.append(make_row(metric="cost_ratio", unit="x", p50=per_sentence[k] / per_sentence["all"], **common))
        append_rows(csv_name, point)
        rows += point
        ratio = f"{per_sentence[k] / per_sentence['all']:5.2f}x" if provider == "cached" else "     "
        print(f"bert-{shape:<5} N={batch:<4} loss={loss_backend:<7} {provider:>8} K={str(k):>4}: "
              f"{sent_s(p50):9.1f} sent/s  {p50:8.1f} ms  {ratio}  {peak / 2**20:8.1f} MiB peak",
              flush=True)
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CPU smoke: tiny BERT, batch 64, few reps")
    parser.add_argument("--models", nargs="+", choices=list(SHAPES), default=None)
    parser.add_argument("--batch", type=int, default=None,
                        help="sentences per step (the method forwards twice as many rows)")
    parser.add_argument("--chunks", type=int, nargs="+", default=None, help="rows per chunk")
    parser.add_argument("--loss-backends", nargs="+", default=None, help="fused (chunked / triton) and/or eager")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--max-seconds", type=float, default=60.0)
    parser.add_argument("--device", default=None)
    parser.add_argument("--csv", default=CSV_NAME, help="a file name under bench/results/, or a path")
    parser.add_argument("--clock", choices=("thread", "wall"), default=None,
                        help="CPU: thread CPU time on one intra-op thread (default) or wall time")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU intra-op threads (default 1 with --clock thread)")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    fused = "triton" if device.type == "cuda" else "chunked"
    if args.quick:
        models, batch, chunks, reps = ["tiny"], 64, [32, 64, 128], 3
    elif device.type == "cuda":
        models, batch, chunks, reps = ["base"], 512, [128, 256, 512, 1024], 10
    else:
        models, batch, chunks, reps = ["tiny", "small"], 128, [32, 64, 128, 256], 5
    models, batch = args.models or models, args.batch or batch
    chunks, reps = args.chunks or chunks, args.reps or reps
    backends = args.loss_backends or [fused, "eager"]
    clock = "wall" if device.type == "cuda" else (args.clock or "thread")
    if device.type == "cpu":
        torch.set_num_threads(args.threads or (1 if clock == "thread" else torch.get_num_threads()))
        if clock == "thread" and torch.get_num_threads() != 1:
            parser.error("--clock thread measures one thread: use --threads 1")
    lengths_pool, _ = wiki_lengths(32)
    rows = []
    for shape in models:
        for backend in backends:
            rows += bench_config(shape, batch, chunks, backend, device=device, dtype=dtype, reps=reps,
                                 max_seconds=args.max_seconds, lengths_pool=lengths_pool, csv_name=args.csv,
                                 clock=clock)
    return rows


if __name__ == "__main__":
    main()
