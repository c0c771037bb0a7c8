"""Model folders: which kind a folder is, what fastcse writes into one, how long a model reads.

=========================  =====================================================================
kind                       recognised by
=========================  =====================================================================
``fastcse``                :data:`ENCODER_META_FILE` (written by ``SentenceEncoder.save`` and by
                           :func:`fastcse.export.export_sentence_transformers`)
``sentence-transformers``  ``modules.json``
``huggingface``            ``config.json`` and a weights file (:data:`WEIGHT_FILES`)
=========================  =====================================================================

Checked in that order (an exported folder is all three at once; the fastcse metadata carries the
most: the SimCSE MLP pooler and its ``mlp_only_train`` flag).

This module is the one home of that knowledge: training, evaluation, export and
``SentenceEncoder`` all ask it rather than spelling file names out.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

MODEL_KINDS = ("fastcse", "sentence-transformers", "huggingface")

ENCODER_META_FILE = "fastcse_encoder.json"
"""fastcse's metadata beside the backbone: {pooling, mlp_only_train, max_seq_length, attn_backend}."""
POOLER_WEIGHTS = "pooler.safetensors"
"""The pooler's parameters (SimCSE's ``cls_mlp`` dense layer), when it has any."""
ENCODER_META_FIELDS = ("pooling", "mlp_only_train", "max_seq_length", "attn_backend")

ST_MODULES_FILE = "modules.json"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model",
                   "sentencepiece.bpe.model", "spm.model")

# sentence-transformers modules a SentenceEncoder reproduces (Normalize does not change cosines;
# encode(normalize=True) applies it)
ST_SUPPORTED_MODULES = ("Transformer", "Pooling", "Normalize")

# the longest input when the model itself sets no limit (T5's relative positions have none)
MAX_LENGTH_CAP = 512
# models whose position table starts at padding_idx + 1 (HF's create_position_ids_from_input_ids)
_PADDING_OFFSET_POSITIONS = ("roberta", "xlm-roberta", "camembert")
# tokenizers without a limit report int(1e30) as model_max_length
_NO_TOKENIZER_LIMIT = 1_000_000

_EXPECTED = (f"a fastcse checkpoint ({ENCODER_META_FILE}, written by SentenceEncoder.save), a sentence-transformers "
             f"folder ({ST_MODULES_FILE}), or a Hugging Face model folder (config.json and "
             f"{' / '.join(WEIGHT_FILES[::2])})")


class ModelFolderError(ValueError):
    """A path is not a model folder fastcse can load; the message says what was expected."""


# ------------------------------------------------------------------------------------------------
# which kind of folder
# ------------------------------------------------------------------------------------------------

def folder_kind(folder: Path) -> str | None:
    """The kind in :data:`MODEL_KINDS` of ``folder``, or None (no folder, or none of the three).

    Never raises: callers that also accept hub names (``SentenceEncoder.from_pretrained``) treat
    None as "let Hugging Face resolve it"; :func:`detect_model_kind` turns it into an error.
    """
    folder = Path(folder)
    if (folder / ENCODER_META_FILE).is_file():
        return "fastcse"
    if (folder / ST_MODULES_FILE).is_file():
        return "sentence-transformers"
    if (folder / "config.json").is_file() and any((folder / name).is_file() for name in WEIGHT_FILES):
        return "huggingface"
    return None


def detect_model_kind(path) -> str:
    """``"fastcse"``, ``"sentence-transformers"`` or ``"huggingface"`` for a model folder.

    Raises FileNotFoundError for a missing path and :class:`ModelFolderError` for a folder of none of
    the three kinds (naming what was expected, and model folders found one level below, e.g. a
    training run's ``best`` / ``final`` exports).
    """
    folder = Path(path).expanduser()
    if not folder.exists():
        raise FileNotFoundError(f"model folder not found: {folder}")
    if not folder.is_dir():
        raise ModelFolderError(f"{folder} is a file; expected a folder: {_EXPECTED}")
    kind = folder_kind(folder)
    if kind is not None:
        return kind
    hints = []
    if (folder / "config.json").is_file():
        hints.append(f"it has config.json but no weights file ({', '.join(WEIGHT_FILES)})")
    below = sorted(p.name for p in folder.iterdir() if p.is_dir() and folder_kind(p) is not None)
    if below:
        hints.append(f"model folders inside it: {', '.join(below)}")
    if (folder / "checkpoints").is_dir() or (folder / "trainer.pt").is_file():
        hints.append("training checkpoints (trainer.pt) hold optimizer state, not a loadable model: "
                     "use the run's exported best/ or final/ folder")
    detail = f" ({'; '.join(hints)})" if hints else ""
    raise ModelFolderError(f"{folder} is not a model folder{detail}; expected {_EXPECTED}")


def has_tokenizer_files(folder: Path) -> bool:
    """Whether ``folder`` holds any file a Hugging Face tokenizer is built from."""
    return any((Path(folder) / name).is_file() for name in TOKENIZER_FILES)


# ------------------------------------------------------------------------------------------------
# sentence-transformers module lists
# ------------------------------------------------------------------------------------------------

def check_sentence_transformers_modules(folder) -> list[dict]:
    """The module list of ``folder/modules.json``, each entry with its short ``kind`` added
    (``"Transformer"``, ``"Pooling"``, ...).

    Raises :class:`ModelFolderError` for a file that is not a module list, and for modules a
    SentenceEncoder would silently drop (Dense, LayerNorm, ...): its embeddings would not be the
    model's.
    """
    folder = Path(folder)
    try:
        modules = json.loads((folder / ST_MODULES_FILE).read_text())
        modules = [{**m, "kind": str(m.get("type", "")).rsplit(".", 1)[-1]} for m in modules]
    except (ValueError, AttributeError, TypeError) as exc:
        raise ModelFolderError(f"{folder / ST_MODULES_FILE} is not a sentence-transformers module list "
                               f"({exc})") from None
    other = [m["kind"] for m in modules if m["kind"] not in ST_SUPPORTED_MODULES]
    if other:
        raise ModelFolderError(
            f"{folder}: sentence-transformers modules {other} have no SentenceEncoder equivalent: a module other "
            f"than {', '.join(ST_SUPPORTED_MODULES)} is not supported, since fastcse would compute other "
            f"embeddings than SentenceTransformer does")
    return modules


# ------------------------------------------------------------------------------------------------
# fastcse's metadata
# ------------------------------------------------------------------------------------------------

def write_encoder_meta(folder, encoder_or_fields, *, max_seq_length: int | None = None) -> dict:
    """Write :data:`ENCODER_META_FILE` into ``folder`` (which must exist); returns what was written.

    ``encoder_or_fields``: a ``SentenceEncoder`` (its :data:`ENCODER_META_FIELDS`, plus
    :data:`POOLER_WEIGHTS` when its pooler has parameters), or a mapping of those fields (no
    weights). ``max_seq_length`` overrides the length recorded (export records the length the
    exported model reads, not the training length).
    """
    folder = Path(folder)
    pooler = None
    if isinstance(encoder_or_fields, Mapping):
        meta = dict(encoder_or_fields)
        unknown = sorted(set(meta) - set(ENCODER_META_FIELDS))
        if unknown:
            raise ValueError(f"unknown {ENCODER_META_FILE} fields {unknown}; known: {', '.join(ENCODER_META_FIELDS)}")
    else:
        meta = {name: getattr(encoder_or_fields, name) for name in ENCODER_META_FIELDS}
        pooler = encoder_or_fields.pooler
    if max_seq_length is not None:
        meta["max_seq_length"] = int(max_seq_length)
    (folder / ENCODER_META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    state = {k: v.detach().contiguous().cpu() for k, v in pooler.state_dict().items()} if pooler is not None else {}
    if state:
        from safetensors.torch import save_file

        save_file(state, str(folder / POOLER_WEIGHTS))
    return meta


def read_encoder_meta(folder) -> dict | None:
    """The fields of ``folder``'s :data:`ENCODER_META_FILE`, or None when it has none.

    Raises :class:`ModelFolderError` when the file holds no JSON object.
    """
    path = Path(folder) / ENCODER_META_FILE
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
    except ValueError as exc:
        raise ModelFolderError(f"{path} is not JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise ModelFolderError(f"{path} holds {type(meta).__name__}, expected a JSON object")
    return meta


# ------------------------------------------------------------------------------------------------
# how many tokens a model reads
# ------------------------------------------------------------------------------------------------

def model_max_length(config, tokenizer=None) -> int:
    """The most tokens the model of ``config`` reads: its position table (less RoBERTa's,
    XLM-R's and CamemBERT's ``padding_idx + 1`` offset), the tokenizer's ``model_max_length``
    when smaller, at most :data:`MAX_LENGTH_CAP` (512).

    Used as the default ``max_seq_length`` of a loaded model and as the length evaluation and
    export read (SimCSE evaluates without truncation).
    """
    limits = [MAX_LENGTH_CAP]
    positions = getattr(config, "max_position_embeddings", None)
    if positions:
        offset = 0
        if config.model_type in _PADDING_OFFSET_POSITIONS:
            offset = (getattr(config, "pad_token_id", None) or 0) + 1
        limits.append(int(positions) - offset)
    model_max = getattr(tokenizer, "model_max_length", 0) if tokenizer is not None else 0
    if 0 < model_max < _NO_TOKENIZER_LIMIT:
        limits.append(int(model_max))
    return int(min(limits))


__all__ = [
    "ENCODER_META_FIELDS", "ENCODER_META_FILE", "MAX_LENGTH_CAP", "MODEL_KINDS", "POOLER_WEIGHTS", "ST_MODULES_FILE",
    "ST_SUPPORTED_MODULES", "TOKENIZER_FILES", "WEIGHT_FILES", "ModelFolderError", "check_sentence_transformers_modules",
    "detect_model_kind", "folder_kind", "has_tokenizer_files", "model_max_length", "read_encoder_meta",
    "write_encoder_meta",
]
