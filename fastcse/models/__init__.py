"""Sentence encoders: Hugging Face backbones, poolers, attention backends and unpadding."""

from .attention import ATTN_BACKENDS, varlen_attention
from .encoder import SentenceEncoder, TruncationWarning
from .poolers import POOLINGS, build_pooler
from .unpad import PackedBatch, pack, unpack, unpad_input

__all__ = [
    "ATTN_BACKENDS", "POOLINGS", "PackedBatch", "SentenceEncoder", "TruncationWarning", "build_pooler", "pack",
    "unpack", "unpad_input", "varlen_attention",
]
