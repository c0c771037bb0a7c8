"""fastcse: fused-kernel training engine for contrastive sentence embeddings.

The top-level names are resolved lazily so that ``import fastcse`` stays cheap (no transformers,
no Triton compilation) and optional extras are only imported by the features that need them.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "info_nce": "fastcse.losses",
    "InfoNCELoss": "fastcse.losses",
    "apply_rotary": "fastcse.rotary",
    "RotaryEmbedding": "fastcse.rotary",
    "dropout_add_layer_norm": "fastcse.dropout_add_norm",
    "SentenceEncoder": "fastcse.models",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fastcse' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
