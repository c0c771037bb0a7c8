"""The encoder a training run starts from: pretrained weights, or a random model from a config.

Kept apart from ``fastcse/models/`` (the encoders themselves): this is the training program's
reading of ``--model`` / ``--model-config`` / ``--tokenizer`` / ``--dropout``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from fastcse.config import ConfigError, ModelConfig
from fastcse.data import fallback_tokenizer
from fastcse.distributed import barrier
from fastcse.files import atomic_replace_dir


def set_dropout(encoder, p: float) -> None:
    """Every dropout probability of ``encoder`` (modules and backbone config) set to ``p``."""
    # HF reads every dropout probability from its nn.Dropout modules (SDPA included: self.dropout.p)
    for module in encoder.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = p
    cfg = encoder.backbone.config
    for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "dropout_rate", "attention_dropout"):
        if hasattr(cfg, name):
            setattr(cfg, name, p)


def cached_fallback_tokenizer(output_dir: Path, rank: int):
    """The shipped fallback WordPiece, saved once per output folder and reused (resume, other ranks).

    Rank 0 writes it; every rank then loads the same files, so all ranks tokenize identically.
    """
    from transformers import AutoTokenizer

    folder = output_dir / "fallback-tokenizer"
    if rank == 0 and not (folder / "tokenizer.json").is_file():
        tmp = output_dir / ".tmp-fallback-tokenizer"
        shutil.rmtree(tmp, ignore_errors=True)
        fallback_tokenizer().save_pretrained(str(tmp))
        atomic_replace_dir(tmp, folder)
    barrier()
    return AutoTokenizer.from_pretrained(str(folder))


def build_encoder(m: ModelConfig, *, model_path: str | None, model_config: dict | None, output_dir: Path,
                  rank: int):
    """A ``SentenceEncoder`` on the CPU: random from ``model_config`` (a Hugging Face config mapping)
    when given, else loaded from ``model_path``. ``m`` supplies tokenizer, pooler, attention backend,
    length and the dropout override; ``output_dir`` holds the fallback tokenizer's cache."""
    from transformers import AutoConfig, AutoTokenizer

    from fastcse.models import SentenceEncoder

    if model_config is not None:
        hf_config = AutoConfig.for_model(**model_config)
        if m.tokenizer:
            tokenizer = AutoTokenizer.from_pretrained(m.tokenizer)
        else:
            tokenizer = cached_fallback_tokenizer(Path(output_dir), rank)
        hf_config.vocab_size = max(getattr(hf_config, "vocab_size", 0) or 0, len(tokenizer))
        if m.dropout is not None:
            for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
                setattr(hf_config, name, m.dropout)
        encoder = SentenceEncoder.from_config(hf_config, tokenizer=tokenizer, pooling=m.pooling or "cls",
                                              attn_backend=m.attn_backend, max_seq_length=m.max_seq_length)
    else:
        encoder = SentenceEncoder.from_pretrained(model_path, pooling=m.pooling, attn_backend=m.attn_backend,
                                                  max_seq_length=m.max_seq_length)
        if encoder.tokenizer is None:
            raise ConfigError(f"{model_path} has no tokenizer files")
    if m.dropout is not None:
        set_dropout(encoder, m.dropout)
    return encoder
