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

A sentence-transformers folder is read by :func:`read_sentence_transformers_folder`: the
Transformer (the backbone), Pooling (``cls`` or ``mean``), any Dense layers after it and a final
Normalize, with the similarity function, prompts and model card of the folder. Together they are
the *pipeline* a ``SentenceEncoder`` reproduces and an export writes back.

This module is the one home of that knowledge: training, evaluation, export and
``SentenceEncoder`` all ask it rather than spelling file names out.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

MODEL_KINDS = ("fastcse", "sentence-transformers", "huggingface")

ENCODER_META_FILE = "fastcse_encoder.json"
"""fastcse's metadata beside the backbone (:data:`ENCODER_META_FIELDS`)."""
POOLER_WEIGHTS = "pooler.safetensors"
"""The pooler's parameters (SimCSE's ``cls_mlp`` dense layer), when it has any."""
DENSE_WEIGHTS = "dense.safetensors"
"""The parameters of the Dense layers after the pooler (``0.linear.weight``, ...), when there are any."""
ENCODER_META_FIELDS = ("pooling", "mlp_only_train", "max_seq_length", "attn_backend", "dense", "normalize",
                       "similarity_fn_name", "prompts", "default_prompt_name", "export_max_seq_length")
"""``dense``: the Dense layers' configs; ``normalize``: unit-length output; ``export_max_seq_length``: the
length the source pipeline reads (an export's default). Fields after ``attn_backend`` are optional:
folders written before them read as no Dense, no Normalize, cosine similarity, no prompts."""
MODEL_CARD_FILE = "README.md"
SIMILARITY_FNS = ("cosine", "dot", "euclidean", "manhattan")

ST_MODULES_FILE = "modules.json"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model",
                   "sentencepiece.bpe.model", "spm.model")

# sentence-transformers modules a SentenceEncoder reproduces, in this order: Transformer, Pooling,
# any number of Dense, at most one Normalize (last)
ST_SUPPORTED_MODULES = ("Transformer", "Pooling", "Dense", "Normalize")
ST_CONFIG_FILE = "config_sentence_transformers.json"

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
    SentenceEncoder would silently drop (LayerNorm, WeightedLayerPooling, ...): its embeddings would
    not be the model's.
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


# sentence-transformers < 6 wrote one boolean per pooling mode; >= 6 writes {"pooling_mode": ...}
_ST_LEGACY_POOLING = {"pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max",
                      "pooling_mode_mean_tokens": "mean", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
                      "pooling_mode_weightedmean_tokens": "weightedmean", "pooling_mode_lasttoken": "lasttoken"}


@dataclass
class SentenceTransformersFolder:
    """What a sentence-transformers folder says (:func:`read_sentence_transformers_folder`)."""

    backbone: Path
    """The Transformer module's folder (the Hugging Face backbone and tokenizer)."""
    pooling: str
    """``cls`` or ``mean``."""
    max_seq_length: int | None
    """From ``sentence_bert_config.json`` (sentence-transformers < 6); None: the tokenizer's limit."""
    dense: list[tuple[dict, Path]] = field(default_factory=list)
    """(config, folder) of each Dense module after the pooling, in order."""
    normalize: bool = False
    similarity_fn_name: str | None = None
    prompts: dict = field(default_factory=dict)
    default_prompt_name: str | None = None
    card: str | None = None
    """The folder's model card (README.md), when it has one."""


def _read_json(path: Path, what: str):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelFolderError(f"{path} not found ({what})") from None
    except (OSError, ValueError) as exc:
        raise ModelFolderError(f"{path} is not readable JSON ({what}: {exc})") from None


def st_pooling_mode(cfg: dict, folder) -> str:
    """``cls`` or ``mean`` from a Pooling ``config.json`` of either layout; ModelFolderError otherwise."""
    modes = cfg.get("pooling_mode")
    if modes is None:
        modes = [mode for key, mode in _ST_LEGACY_POOLING.items() if cfg.get(key)]
    modes = [modes] if isinstance(modes, str) else list(modes)
    if modes not in (["mean"], ["cls"]):
        raise ModelFolderError(f"{folder}: pooling {modes} is not supported; fastcse supports cls or mean")
    if cfg.get("include_prompt") is False:
        raise ModelFolderError(f"{folder}: include_prompt=false (prompt tokens left out of the pooling) is not "
                               f"supported; fastcse pools every token")
    return modes[0]


def read_sentence_transformers_folder(path) -> SentenceTransformersFolder:
    """The pipeline of a sentence-transformers folder: backbone, pooling, Dense layers, Normalize,
    similarity function, prompts and card.

    Reads both layouts: sentence-transformers < 6 (``sentence_transformers.models.*`` class paths,
    ``pooling_mode_*_tokens`` booleans, ``max_seq_length`` in ``sentence_bert_config.json``) and
    >= 6 (``sentence_transformers.base.modules.*`` paths, ``pooling_mode``; the length is the
    tokenizer's ``model_max_length``). Raises :class:`ModelFolderError` for modules a
    SentenceEncoder cannot reproduce, for a pooling other than cls / mean, for Dense layers that do
    not act on the sentence embedding, and for modules out of the order Transformer, Pooling,
    Dense..., Normalize.
    """
    path = Path(path)
    modules = check_sentence_transformers_modules(path)
    kinds = [m["kind"] for m in modules]
    order = {"Transformer": 0, "Pooling": 1, "Dense": 2, "Normalize": 3}
    ranks = [order[k] for k in kinds]
    if (kinds[:2] != ["Transformer", "Pooling"] or ranks != sorted(ranks) or kinds.count("Normalize") > 1
            or kinds.count("Pooling") != 1 or kinds.count("Transformer") != 1):
        raise ModelFolderError(f"{path}/{ST_MODULES_FILE}: modules {kinds} are not in the order fastcse reproduces "
                               f"(Transformer, Pooling, any Dense, an optional final Normalize)")
    backbone = max_len = pooling = None
    dense: list[tuple[dict, Path]] = []
    for module in modules:
        folder = path / module.get("path", "")
        if module["kind"] == "Transformer":
            backbone = folder
            cfg_file = folder / "sentence_bert_config.json"
            if cfg_file.is_file():
                max_len = _read_json(cfg_file, "Transformer config").get("max_seq_length")
        elif module["kind"] == "Pooling":
            pooling = st_pooling_mode(_read_json(folder / "config.json", "Pooling config"), folder)
        elif module["kind"] == "Dense":
            cfg = _read_json(folder / "config.json", "Dense config")
            for key in ("module_input_name", "module_output_name"):
                if cfg.get(key, "sentence_embedding") != "sentence_embedding":
                    raise ModelFolderError(f"{folder}: a Dense module on {cfg[key]!r} is not supported; fastcse "
                                           f"applies Dense to the sentence embedding only")
            dense.append(({"in_features": int(cfg["in_features"]), "out_features": int(cfg["out_features"]),
                           "bias": bool(cfg.get("bias", True)),
                           "activation_function": cfg.get("activation_function", "torch.nn.modules.activation.Tanh"),
                           "use_residual": bool(cfg.get("use_residual", False))}, folder))
    st_cfg = _read_json(path / ST_CONFIG_FILE, "sentence-transformers config") if (path / ST_CONFIG_FILE).is_file() \
        else {}
    card = path / MODEL_CARD_FILE
    return SentenceTransformersFolder(
        backbone=backbone, pooling=pooling, max_seq_length=max_len, dense=dense, normalize="Normalize" in kinds,
        similarity_fn_name=st_cfg.get("similarity_fn_name"), prompts=dict(st_cfg.get("prompts") or {}),
        default_prompt_name=st_cfg.get("default_prompt_name"),
        card=card.read_text(encoding="utf-8") if card.is_file() else None)


def read_dense_weights(folder) -> dict:
    """The state dict of a sentence-transformers Dense module's folder (``linear.weight``, ...)."""
    folder = Path(folder)
    if (folder / "model.safetensors").is_file():
        from safetensors.torch import load_file

        return load_file(str(folder / "model.safetensors"), device="cpu")
    if (folder / "pytorch_model.bin").is_file():
        import torch

        return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise ModelFolderError(f"{folder}: Dense module without weights (model.safetensors or pytorch_model.bin)")


# ------------------------------------------------------------------------------------------------
# fastcse's metadata
# ------------------------------------------------------------------------------------------------

def write_encoder_meta(folder, encoder_or_fields, *, max_seq_length: int | None = None, **overrides) -> dict:
    """Write :data:`ENCODER_META_FILE` into ``folder`` (which must exist); returns what was written.

    ``encoder_or_fields``: a ``SentenceEncoder`` (its :data:`ENCODER_META_FIELDS`, plus
    :data:`POOLER_WEIGHTS` when its pooler has parameters and :data:`DENSE_WEIGHTS` when it has
    Dense layers), or a mapping of those fields (no weights). ``max_seq_length`` overrides the
    length recorded (export records the length the exported model reads, not the training length);
    ``overrides`` any other field (an export's ``normalize`` when it adds or drops the module).
    """
    folder = Path(folder)
    modules = {}
    if isinstance(encoder_or_fields, Mapping):
        meta = dict(encoder_or_fields)
        unknown = sorted(set(meta) - set(ENCODER_META_FIELDS))
        if unknown:
            raise ValueError(f"unknown {ENCODER_META_FILE} fields {unknown}; known: {', '.join(ENCODER_META_FIELDS)}")
    else:
        enc = encoder_or_fields
        meta = {name: getattr(enc, name) for name in ENCODER_META_FIELDS[:4]}
        meta.update(dense=[layer.config() for layer in enc.dense], normalize=bool(enc.normalize_output),
                    similarity_fn_name=enc.similarity_fn_name, prompts=dict(enc.prompts),
                    default_prompt_name=enc.default_prompt_name, export_max_seq_length=enc.export_max_seq_length)
        modules = {POOLER_WEIGHTS: enc.pooler, DENSE_WEIGHTS: enc.dense}
    unknown = sorted(set(overrides) - set(ENCODER_META_FIELDS))
    if unknown:
        raise ValueError(f"unknown {ENCODER_META_FILE} fields {unknown}; known: {', '.join(ENCODER_META_FIELDS)}")
    meta.update(overrides)
    if max_seq_length is not None:
        meta["max_seq_length"] = int(max_seq_length)
    (folder / ENCODER_META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    for name, module in modules.items():
        state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
        if state:
            from safetensors.torch import save_file

            save_file(state, str(folder / name))
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
    "DENSE_WEIGHTS", "ENCODER_META_FIELDS", "ENCODER_META_FILE", "MAX_LENGTH_CAP", "MODEL_CARD_FILE", "MODEL_KINDS",
    "POOLER_WEIGHTS", "SIMILARITY_FNS", "ST_CONFIG_FILE", "ST_MODULES_FILE", "ST_SUPPORTED_MODULES", "TOKENIZER_FILES",
    "WEIGHT_FILES", "ModelFolderError", "SentenceTransformersFolder", "check_sentence_transformers_modules",
    "detect_model_kind", "folder_kind", "has_tokenizer_files", "model_max_length", "read_dense_weights",
    "read_encoder_meta", "read_sentence_transformers_folder", "st_pooling_mode", "write_encoder_meta",
]
