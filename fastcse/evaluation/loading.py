"""Load a model for evaluation or export from any of the three folder kinds fastcse reads.

The kinds and how each is recognised live in :mod:`fastcse.models.folders`.
"""

from __future__ import annotations

from pathlib import Path

from fastcse.models import SentenceEncoder
from fastcse.models.folders import MODEL_KINDS, ModelFolderError, detect_model_kind

__all__ = ["MODEL_KINDS", "ModelFolderError", "detect_model_kind", "load_encoder"]


def load_encoder(path, *, pooling: str | None = None, attn_backend: str = "auto", dtype=None,
                 max_seq_length: int | None = None, device=None):
    """A :class:`~fastcse.models.SentenceEncoder` from a folder of any kind in :data:`MODEL_KINDS`.

    ``pooling`` / ``max_seq_length`` override what the folder says; ``device`` moves it there.
    The encoder must come with a tokenizer (evaluation and export tokenize text).
    """
    kind = detect_model_kind(path)
    # from_pretrained also refuses sentence-transformers modules a SentenceEncoder cannot reproduce
    encoder = SentenceEncoder.from_pretrained(str(Path(path).expanduser()), pooling=pooling,
                                              attn_backend=attn_backend, dtype=dtype, max_seq_length=max_seq_length)
    if encoder.tokenizer is None:
        raise ModelFolderError(f"{path} ({kind} folder) has no tokenizer files (tokenizer.json, vocab.txt, ...): "
                               f"evaluation and export need its tokenizer")
    if device is not None:
        encoder.to(device)
    encoder.eval()
    return encoder
