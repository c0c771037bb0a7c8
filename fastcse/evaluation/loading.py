"""Load a model for evaluation or export from any of the three folder kinds fastcse reads.

=========================  =====================================================================
kind                       recognised by
=========================  =====================================================================
``fastcse``                ``fastcse_encoder.json`` (written by ``SentenceEncoder.save`` and by
                           :func:`fastcse.export.export_sentence_transformers`)
``sentence-transformers``  ``modules.json``
``huggingface``            ``config.json`` and a weights file (``model.safetensors``, ...)
=========================  =====================================================================

Checked in that order (an exported folder is all three at once; the fastcse marker carries the
most: the SimCSE MLP pooler and its ``mlp_only_train`` flag).
"""

from __future__ import annotations

from pathlib import Path

MODEL_KINDS = ("fastcse", "sentence-transformers", "huggingface")
FASTCSE_MARKER = "fastcse_encoder.json"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")

_EXPECTED = (f"a fastcse checkpoint ({FASTCSE_MARKER}, written by SentenceEncoder.save), a sentence-transformers "
             f"folder (modules.json), or a Hugging Face model folder (config.json and {' / '.join(WEIGHT_FILES[::2])})")


class ModelFolderError(ValueError):
    """A path is not a model folder fastcse can load; the message says what was expected."""


def _kind_of(folder: Path) -> str | None:
    if (folder / FASTCSE_MARKER).is_file():
        return "fastcse"
    if (folder / "modules.json").is_file():
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
    kind = _kind_of(folder)
    if kind is not None:
        return kind
    hints = []
    if (folder / "config.json").is_file():
        hints.append(f"it has config.json but no weights file ({', '.join(WEIGHT_FILES)})")
    below = sorted(p.name for p in folder.iterdir() if p.is_dir() and _kind_of(p) is not None)
    if below:
        hints.append(f"model folders inside it: {', '.join(below)}")
    if (folder / "checkpoints").is_dir() or (folder / "trainer.pt").is_file():
        hints.append("training checkpoints (trainer.pt) hold optimizer state, not a loadable model: "
                     "use the run's exported best/ or final/ folder")
    detail = f" ({'; '.join(hints)})" if hints else ""
    raise ModelFolderError(f"{folder} is not a model folder{detail}; expected {_EXPECTED}")


# sentence-transformers modules a SentenceEncoder reproduces (Normalize does not change cosines;
# encode(normalize=True) applies it)
_ST_MODULES = ("Transformer", "Pooling", "Normalize")


def _check_sentence_transformers_modules(folder: Path) -> None:
    """Refuse modules a SentenceEncoder would silently drop (Dense, LayerNorm, ...): its embeddings
    would not be the model's."""
    import json

    try:
        modules = json.loads((folder / "modules.json").read_text())
        kinds = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in modules]
    except (ValueError, AttributeError, TypeError) as exc:
        raise ModelFolderError(f"{folder / 'modules.json'} is not a sentence-transformers module list "
                               f"({exc})") from None
    other = [k for k in kinds if k not in _ST_MODULES]
    if other:
        raise ModelFolderError(f"{folder}: sentence-transformers modules {other} have no SentenceEncoder equivalent "
                               f"(supported: {', '.join(_ST_MODULES)}); fastcse would compute other embeddings than "
                               f"SentenceTransformer does")


def load_encoder(path, *, pooling: str | None = None, attn_backend: str = "auto", dtype=None,
                 max_seq_length: int | None = None, device=None):
    """A :class:`~fastcse.models.SentenceEncoder` from a folder of any kind in :data:`MODEL_KINDS`.

    ``pooling`` / ``max_seq_length`` override what the folder says; ``device`` moves it there.
    The encoder must come with a tokenizer (evaluation and export tokenize text).
    """
    from fastcse.models import SentenceEncoder

    kind = detect_model_kind(path)
    if kind == "sentence-transformers":
        _check_sentence_transformers_modules(Path(path).expanduser())
    encoder = SentenceEncoder.from_pretrained(str(Path(path).expanduser()), pooling=pooling,
                                              attn_backend=attn_backend, dtype=dtype, max_seq_length=max_seq_length)
    if encoder.tokenizer is None:
        raise ModelFolderError(f"{path} ({kind} folder) has no tokenizer files (tokenizer.json, vocab.txt, ...): "
                               f"evaluation and export need its tokenizer")
    if device is not None:
        encoder.to(device)
    encoder.eval()
    return encoder
