"""Microbenchmark of one relative-bias attention module: HF eager vs the fused ``biased`` kernel.

    python -m bench.bench_biased_attention --device cuda --dtype bf16          # DeBERTa-v3-base + T5-base, seq 128..512
    python -m bench.bench_biased_attention --quick                             # tiny CPU smoke run (interpreter)
    python -m bench.bench_biased_attention --device cuda --tune                # kernel tile sweep (launchers)

The module is the HF self-attention of one layer with the shapes of DeBERTa-v3-base (hidden 768,
12 heads, 256 position buckets, shared keys, c2p + p2c) or T5-base's encoder (768, 12 heads of 64,
32 buckets): ``eager`` is HF's own module (``attn_implementation="eager"``), ``biased`` the same
module patched by :func:`fastcse.models.biased.patch_biased_attention`. Modes: ``fwd`` (no grad)
and ``full`` (forward + backward into the input and every parameter, relative embeddings
included). Metrics: time (median, p20, p80), peak memory above the inputs (the attention's own
activations and temporaries), and TFLOP/s of the nominal attention FLOPs (4 B H L^2 D forward, x3.5
for forward + backward; the c2p / p2c and projection matmuls are not counted). Rows land in
``bench/results/biased_attention.csv`` (or the ``--csv`` path), appended as each point is
measured; ``--timing`` picks bench/_common.py's timing methods (default ``sync``).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

import torch

from bench._common import append_rows, csv_path, make_row, peak_memory_bytes, time_fn, timing_methods, timings_for

CSV = "biased_attention.csv"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_module(model: str, quick: bool, dropout: float = 0.0):
    """(DeBERTa encoder holding the module or None, HF attention module); ``dropout`` is the
    attention-probability dropout (hidden dropouts stay 0)."""
    args_dropout = dropout
    hidden, heads = (64, 2) if quick else (768, 12)
    if model == "deberta":
        from transformers import DebertaV2Config
        from transformers.models.deberta_v2.modeling_deberta_v2 import DebertaV2Encoder

        config = DebertaV2Config(hidden_size=hidden, num_attention_heads=heads, num_hidden_layers=1,
                                 intermediate_size=4 * hidden, relative_attention=True,
                                 pos_att_type=["p2c", "c2p"], position_buckets=256,
                                 max_relative_positions=512, norm_rel_ebd="layer_norm", share_att_key=True,
                                 position_biased_input=False, attention_probs_dropout_prob=args_dropout,
                                 hidden_dropout_prob=0.0, attn_implementation="eager")
        encoder = DebertaV2Encoder(config)
        return encoder, encoder.layer[0].attention.self
    if model == "t5":
        from transformers import T5Config
        from transformers.models.t5.modeling_t5 import T5Attention

        config = T5Config(d_model=hidden, d_kv=hidden // heads, num_heads=heads, num_layers=1,
                          dropout_rate=args_dropout, attn_implementation="eager")
        return None, T5Attention(config, has_relative_attention_bias=True)
    raise ValueError(f"unknown model {model!r}")


def make_call(model, encoder, attn, x):
    """A closure running the attention module forward on ``x`` (batch, seq, hidden); returns the output."""
    batch, seq, device, dtype = x.shape[0], x.shape[1], x.device, x.dtype
    if model == "deberta":
        mask = encoder.get_attention_mask(torch.ones(batch, seq, device=device, dtype=torch.long))
        relative_pos = encoder.get_rel_pos(x)

        def call():
            rel = encoder.get_rel_embedding()
            return attn(x, mask, relative_pos=relative_pos, rel_embeddings=rel)[0]
    else:
        # HF's eager padding mask for a full batch: additive zeros (batch, 1, seq, seq)
        mask = torch.zeros(batch, 1, seq, seq, dtype=dtype, device=device)

        def call():
            return attn(x, mask=mask)[0]
    return call


def run(args) -> list[dict]:
    """Every (model, seq, provider, mode, timing) point; each point's rows are appended to
    ``args.csv`` as soon as it is measured. Returns all rows."""
    # imported here: on CPU, main() selects Triton's interpreter before the kernels are defined
    from fastcse.models.biased import patch_biased_attention

    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    timings = timings_for(args.timing, device)
    rows = []
    for model in args.models:
        encoder, attn = build_module(model, args.quick, args.dropout)
        # (module holding the parameters, attention module) per provider
        if encoder is not None:
            patched_encoder = copy.deepcopy(encoder)
            patch_biased_attention(patched_encoder)
            modules = {"eager": (encoder, attn), "biased": (patched_encoder, patched_encoder.layer[0].attention.self)}
        else:
            patched = copy.deepcopy(attn)
            patch_biased_attention(patched)
            modules = {"eager": (attn, attn), "biased": (patched, patched)}
        for owner, _ in modules.values():
            owner.to(device=device, dtype=dtype).train()
        heads = attn.num_attention_heads if model == "deberta" else attn.n_heads
        head_dim = attn.attention_head_size if model == "deberta" else attn.key_value_proj_dim
        hidden = attn.all_head_size if model == "deberta" else attn.d_model
        for seq in args.seqs:
            outputs = {}
            x = torch.randn(args.batch, seq, hidden, dtype=dtype, device=device, requires_grad=True)
            grad = torch.randn(args.batch, seq, hidden, dtype=dtype, device=device)
            for provider in args.providers:
                owner, mod = modules[provider]
                call = make_call(model, owner, mod, x)
                params = list(owner.parameters())
                extra = dict(model=model, batch=args.batch, heads=heads, head_dim=head_dim, dtype=args.dtype,
                             dropout=args.dropout)
                for mode in args.modes:
                    if mode == "fwd":
                        def fn():
                            with torch.no_grad():
                                call()
                    else:
                        def fn():
                            x.grad = None
                            for p in params:
                                p.grad = None
                            call().backward(grad)
                    try:
                        timed = [time_fn(fn, device, warmup=1 if args.quick else 3, reps=args.reps, method=m)
                                 for m in timings]
                        peak = peak_memory_bytes(fn, device)
                    except torch.OutOfMemoryError:
                        print(f"{model} {provider} {mode} seq={seq}: out of memory", flush=True)
                        torch.cuda.empty_cache()
                        continue
                    flops = 4 * args.batch * heads * seq * seq * head_dim * (1.0 if mode == "fwd" else 3.5)
                    common = dict(kernel=f"biased_attention_{model}", provider=provider, mode=mode,
                                  x_name="seq", x_value=seq, device=device)
                    new = []
                    for timing in timed:
                        config = dict(extra, timing=timing.method, **({"timing_note": timing.note} if timing.note else {}))
                        new.append(make_row(metric="time", unit="ms", p50=timing.p50, p20=timing.p20,
                                            p80=timing.p80, extra_config=config, **common))
                        new.append(make_row(metric="throughput", unit="TFLOP/s",
                                            p50=flops / (timing.p50 * 1e-3) / 1e12, extra_config=config, **common))
                        print(f"{model:8s} seq={seq:5d} {provider:7s} {mode:5s} {timing.method:6s} {timing.p50:9.3f} ms "
                              f"(p20 {timing.p20:.3f}, p80 {timing.p80:.3f})  peak {peak / 2**20:9.1f} MiB  "
                              f"{flops / (timing.p50 * 1e-3) / 1e12:6.2f} TFLOP/s", flush=True)
                    new.append(make_row(metric="peak_memory", unit="MiB", p50=peak / 2**20, extra_config=extra,
                                        **common))
                    append_rows(args.csv, new)
                    rows += new
                x.grad = None
                outputs[provider] = call().detach().float()
            if "eager" in outputs and "biased" in outputs and args.dropout == 0.0:
                err = ((outputs["biased"] - outputs["eager"]).norm() / outputs["eager"].norm()).item()
                print(f"{model:8s} seq={seq:5d} biased vs eager output relative error {err:.2e}")
    return rows


# (block_m, block_n, num_warps) candidates of --tune; the launcher's defaults are the first two
TILES = [(64, 32, 4), (64, 32, 8), (64, 64, 4), (64, 64, 8), (128, 32, 8), (128, 64, 8), (32, 64, 8), (32, 32, 4)]


def tune(args) -> list[dict]:
    """Time the forward and backward launchers per tile config at DeBERTa-v3-base's attention shape
    (c2p + p2c tables of 2 x 256 entries, key padding, dropout): which tiles to make the default."""
    import triton

    from fastcse.kernels.biased_attention import biased_attention_backward, biased_attention_forward

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    method = timings_for(args.timing, device)[0]
    heads, head_dim, entries = (2, 16, 32) if args.quick else (12, 64, 512)
    rows = []
    for seq in args.seqs:
        batch = args.batch
        q, k, v, grad = (torch.randn(batch, heads, seq, head_dim, dtype=dtype, device=device) for _ in range(4))
        tables = [torch.randn(batch, heads, seq, entries, dtype=dtype, device=device) for _ in range(2)]
        dist = torch.arange(-(seq - 1), seq, device=device)
        index = torch.clamp(dist + entries // 2, 0, entries - 1)
        mask = torch.ones(batch, seq, dtype=torch.bool, device=device)
        seed = torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)
        common = (tables[0], index, tables[1], index.flip(0), mask, seed, 0.125, args.dropout)
        for block_m, block_n, warps in TILES:
            tiles = dict(block_m=block_m, block_n=block_n, num_warps=warps)
            try:
                out, lse = biased_attention_forward(q, k, v, *common, **tiles)
                fwd = time_fn(lambda: biased_attention_forward(q, k, v, *common, **tiles), device, reps=args.reps,
                              method=method)
                bwd = time_fn(lambda: biased_attention_backward(grad, q, k, v, out, lse, *common, **tiles),
                              device, reps=args.reps, method=method)
            except (triton.runtime.errors.OutOfResources, RuntimeError) as err:
                print(f"seq={seq} tiles {block_m}x{block_n} w{warps}: {type(err).__name__}: {err}")
                continue
            name = f"triton_{block_m}x{block_n}_w{warps}"
            extra = dict(model="deberta", batch=batch, heads=heads, head_dim=head_dim, dtype=args.dtype,
                         dropout=args.dropout, block_m=block_m, block_n=block_n, num_warps=warps)
            new = [make_row(kernel="biased_attention_tiles", provider=name, mode=mode, metric="time",
                            unit="ms", x_name="seq", x_value=seq, p50=timing.p50, p20=timing.p20,
                            p80=timing.p80, extra_config=dict(extra, timing=timing.method), device=device)
                   for mode, timing in (("fwd", fwd), ("bwd", bwd))]
            append_rows(args.csv, new)
            rows += new
            print(f"seq={seq:5d} tiles {block_m:3d}x{block_n:<3d} warps {warps}: fwd {fwd.p50:8.3f} ms  "
                  f"bwd {bwd.p50:8.3f} ms")
    return rows


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES))
    p.add_argument("--models", default="deberta,t5")
    p.add_argument("--seqs", default=None, help="comma-separated sequence lengths (default 128,256,512)")
    p.add_argument("--batch", type=int, default=None, help="default 8 (2 with --quick)")
    p.add_argument("--modes", default="fwd,full")
    p.add_argument("--providers", default="eager,biased")
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--dropout", type=float, default=0.1,
                   help="attention-probability dropout, training mode (SimCSE keeps it on); 0 compares outputs")
    p.add_argument("--csv", default=CSV,
                   help="a file name under bench/results/, or a path; rows are appended as measured")
    p.add_argument("--timing", type=timing_methods, default=None,
                   help="comma-separated of sync,device,graph (default sync; wall clock on CPU)")
    p.add_argument("--quick", action="store_true", help="tiny shapes (hidden 64), for a CPU smoke run")
    p.add_argument("--tune", action="store_true", help="sweep the kernel tiles instead (launchers only)")
    args = p.parse_args(argv)
    args.models = args.models.split(",")
    args.modes = args.modes.split(",")
    args.providers = args.providers.split(",")
    args.seqs = [int(s) for s in (args.seqs or ("40" if args.quick else "128,256,512")).split(",")]
    args.batch = args.batch or (2 if args.quick else 8)
    args.reps = args.reps or (2 if args.quick else 10)
    args.dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    return args


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if not args.device.startswith("cuda"):
        # the kernels run in Triton's interpreter on CPU; it must be chosen before they are defined
        os.environ.setdefault("TRITON_INTERPRET", "1")
    rows = tune(args) if args.tune else run(args)
    print(f"{len(rows)} rows appended to {csv_path(args.csv)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
