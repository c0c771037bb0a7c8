"""Export a fastcse encoder as a sentence-transformers folder or a plain Hugging Face folder.

    python -m fastcse.export --checkpoint runs/fastcse/best --out my-simcse [--card card.json]
    python -m fastcse.export --checkpoint runs/fastcse/best --out my-simcse-hf --format huggingface

A sentence-transformers folder reproduces the source model's pipeline: ``SentenceTransformer(path)``
gives the embeddings of fastcse's ``encoder.encode`` (no fastcse needed to read it), with the same
modules, ``max_seq_length``, similarity function and prompts as the model training started from
(all-MiniLM-L6-v2: mean pooling, Normalize, 256 tokens, cosine). Its layout::

    config.json, model.safetensors, tokenizer files   the HF backbone (module 0, Transformer, at the root;
                                                      BERT's CLS pooler included, so Hugging Face reports
                                                      no MISSING or UNEXPECTED weights when it loads)
    sentence_bert_config.json                         the Transformer module's config
    1_Pooling/config.json                             cls (also T5's "first") or mean
    2_Dense/ ...                                      SimCSE's MLP (dense + tanh) when it runs at evaluation
                                                      (cls_mlp with mlp_only_train=False), then the source's
                                                      Dense modules
    N_Normalize/                                      when the source had one (or normalize=True)
    modules.json, config_sentence_transformers.json   the module list; similarity function, prompts
    README.md                                         the model card (below)
    fastcse_encoder.json (+ pooler / dense weights)   so SentenceEncoder.from_pretrained restores the
                                                      pipeline exactly, MLP weights included

Who writes it: when sentence-transformers is installed, the folder and its card are written by
``SentenceTransformer.save_pretrained`` from sentence-transformers' own modules (so the class paths and
config keys are those of the installed version), with the card data set through
``SentenceTransformerModelCardData`` (offline: ``local_files_only=True``) and fastcse's training
section (:func:`card_section`) inserted before its "Training Details". When it is not installed,
fastcse writes by hand what sentence-transformers 6.x writes: ``modules.json`` with the 6.x class paths
(``sentence_transformers.base.modules.transformer.Transformer``, ...), the 6.x config keys
(``pooling_mode``, ``embedding_dimension``; the length in the tokenizer's ``model_max_length``),
Dense weights as ``linear.weight`` / ``linear.bias``, and a card of its own with the same training
section; sentence-transformers >= 6.0 reads it (older versions do not know the 6.x class paths).

The model card: ``card`` (a dict or :class:`CardInfo`) gives the base model, the method and its
hyperparameters, the loss, the training data (file names and counts) and the STS-B dev scores before
and after training. Without ``card`` the card names the base model (the source folder, and the
title of its card); ``keep_source_card=True`` (the CLI's default without ``--card``, and
``SentenceEncoder.save_pretrained``'s) keeps the source folder's own card instead, so a re-export
loses nothing.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import re
import shutil
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from fastcse.models.folders import MODEL_CARD_FILE, ST_CONFIG_FILE, ST_MODULES_FILE, model_max_length, \
    write_encoder_meta

logger = logging.getLogger(__name__)

FORMATS = ("sentence-transformers", "huggingface")
# class paths of sentence-transformers 6.x, written when it is not installed
ST6_CLASSES = {
    "Transformer": "sentence_transformers.base.modules.transformer.Transformer",
    "Pooling": "sentence_transformers.sentence_transformer.modules.pooling.Pooling",
    "Dense": "sentence_transformers.base.modules.dense.Dense",
    "Normalize": "sentence_transformers.base.modules.normalize.Normalize",
}
ST6_FORMAT_VERSION = "6.0.0"
"""The sentence-transformers version whose format the hand-written folder follows."""
_EMBEDDING = {"module_input_name": "sentence_embedding", "module_output_name": "sentence_embedding"}
_TANH = "torch.nn.modules.activation.Tanh"

METHOD_DESCRIPTIONS = {
    "simcse-unsup": "unsupervised SimCSE (Gao et al., 2021): each sentence against itself under another dropout "
                    "mask, the rest of the batch as negatives",
    "simcse-sup": "supervised SimCSE (Gao et al., 2021): anchor, entailment positive and contradiction hard "
                  "negative, the rest of the batch as negatives",
    "esimcse": "ESimCSE (Wu et al., 2022): word-repetition positives and a momentum-encoder queue of negatives",
}


# ------------------------------------------------------------------------------------------------
# the model card
# ------------------------------------------------------------------------------------------------

@dataclass
class CardInfo:
    """What the model card says about training (every field optional).

    ``datasets``: ``[(name, count), ...]`` (or dicts with ``name`` and ``count``); ``scores``:
    ``{"before": x, "after": y}`` with numbers (STS-B dev Spearman x 100) or dicts of named
    numbers (``{"before": {"stsb_dev": 86.7}, ...}``); ``loss``: a name or a dict (``name`` plus
    its parameters, e.g. ``temperature``).
    """

    base_model: str | None = None
    method: str | None = None
    hyperparameters: dict = field(default_factory=dict)
    loss: str | dict | None = None
    datasets: list = field(default_factory=list)
    scores: dict = field(default_factory=dict)
    model_name: str | None = None
    language: str | list | None = None
    license: str | None = None

    @classmethod
    def from_value(cls, card) -> "CardInfo":
        """A CardInfo from a CardInfo, a mapping of its fields (unknown keys are an error) or None."""
        if card is None or isinstance(card, CardInfo):
            return card or cls()
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(card) - known)
        if unknown:
            raise ValueError(f"unknown model card field(s) {unknown}; known: {', '.join(sorted(known))}")
        info = cls(**dict(card))
        info.datasets = [_dataset_entry(d) for d in info.datasets]
        for key in info.scores:
            if key not in ("before", "after"):
                raise ValueError(f"card scores take 'before' and 'after', got {key!r}")
        return info


def _dataset_entry(d) -> tuple[str, int | None]:
    if isinstance(d, dict):
        return str(d["name"]), d.get("count", d.get("size"))
    if isinstance(d, (list, tuple)) and len(d) == 2:
        return str(d[0]), d[1]
    if isinstance(d, str):
        return d, None
    raise ValueError(f"card dataset entries are (name, count) pairs, got {d!r}")


def _hub_id(name: str | None) -> str | None:
    """``name`` when it looks like a Hugging Face Hub model id (``org/name``), not a local path."""
    if name and re.fullmatch(r"[\w.-]+/[\w.-]+", name) and not Path(name).exists():
        return name
    return None


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.2f}" if abs(value) >= 1 else f"{value:g}"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10_000:
        return f"{value:,}"
    return str(value)


def _score_rows(scores: dict) -> list[tuple[str, str, str]]:
    before, after = scores.get("before"), scores.get("after")
    if not isinstance(before, dict) and not isinstance(after, dict):
        return [("STS-B dev Spearman x 100", _fmt(before) if before is not None else "-",
                 _fmt(after) if after is not None else "-")]
    before, after = before or {}, after or {}
    names = list(dict.fromkeys([*before, *after]))
    return [(n, _fmt(before[n]) if n in before else "-", _fmt(after[n]) if n in after else "-") for n in names]


def card_section(info: CardInfo, *, base_model: str | None, path_hint: str = "path/to/this/folder") -> str:
    """fastcse's part of the model card (markdown): base model, method, loss, data, hyperparameters,
    STS-B dev before/after, how to load the folder."""
    lines = ["## Training with fastcse", ""]
    lines.append(f"- **Base model:** `{base_model}`" if base_model else "- **Base model:** unknown")
    if info.method:
        described = METHOD_DESCRIPTIONS.get(info.method)
        lines.append(f"- **Method:** `{info.method}`" + (f": {described}" if described else ""))
    if info.loss:
        if isinstance(info.loss, dict):
            loss = dict(info.loss)
            name = loss.pop("name", "InfoNCE")
            params = ", ".join(f"{k}={_fmt(v)}" for k, v in loss.items())
            lines.append(f"- **Loss:** {name}" + (f" ({params})" if params else ""))
        else:
            lines.append(f"- **Loss:** {info.loss}")
    if info.datasets:
        lines += ["", "### Training data", "", "| file | examples |", "|---|---:|"]
        lines += [f"| `{name}` | {_fmt(count) if count is not None else '-'} |" for name, count in info.datasets]
    if info.hyperparameters:
        lines += ["", "### Hyperparameters", "", "| name | value |", "|---|---|"]
        lines += [f"| `{k}` | {_fmt(v)} |" for k, v in info.hyperparameters.items()]
    if info.scores:
        lines += ["", "### STS-B dev", "", "| metric | before training | after training |", "|---|---:|---:|"]
        lines += [f"| {name} | {b} | {a} |" for name, b, a in _score_rows(info.scores)]
    lines += ["", "### Loading it", "", "```python", "from sentence_transformers import SentenceTransformer", "",
              f'model = SentenceTransformer("{path_hint}")',
              'embeddings = model.encode(["A man is playing a guitar.", "Someone plays music."])',
              "print(model.similarity(embeddings, embeddings))", "```", "",
              "or with fastcse (the same pipeline, trainable):", "", "```python",
              "from fastcse.models import SentenceEncoder", "",
              f'encoder = SentenceEncoder.from_pretrained("{path_hint}")',
              'embeddings = encoder.encode(["A man is playing a guitar."], convert_to_tensor=True)', "```", ""]
    return "\n".join(lines)


def _hand_written_card(info: CardInfo, *, base_model: str | None, pipeline: list[str], length: int, dim: int,
                       similarity: str, name: str) -> str:
    tags = ["sentence-transformers", "sentence-similarity", "feature-extraction", "fastcse"]
    if info.method:
        tags.append(info.method)
    front = ["---", "library_name: sentence-transformers", "pipeline_tag: sentence-similarity", "tags:"]
    front += [f"- {t}" for t in tags]
    if _hub_id(base_model):
        front.append(f"base_model: {base_model}")
    if info.language:
        langs = [info.language] if isinstance(info.language, str) else list(info.language)
        front += ["language:"] + [f"- {lang}" for lang in langs]
    if info.license:
        front.append(f"license: {info.license}")
    front.append("---")
    body = ["", f"# {name}", "",
            "A [sentence-transformers](https://www.SBERT.net) model trained with fastcse. It maps sentences to a "
            f"{dim}-dimensional dense vector space.", "", "## Model details", "",
            f"- **Modules:** {' -> '.join(pipeline)}", f"- **Maximum sequence length:** {length} tokens",
            f"- **Output dimensionality:** {dim}", f"- **Similarity function:** {similarity}", ""]
    return "\n".join(front + body) + "\n" + card_section(info, base_model=base_model)


def _insert_section(readme: str, section: str) -> str:
    """fastcse's section before sentence-transformers' "Training Details" (else at the end)."""
    for heading in ("\n## Training Details", "\n## Citation"):
        at = readme.find(heading)
        if at >= 0:
            return readme[:at] + "\n" + section + readme[at:]
    return readme.rstrip("\n") + "\n\n" + section


# ------------------------------------------------------------------------------------------------
# writing
# ------------------------------------------------------------------------------------------------

def _prepare_out(out_dir, overwrite: bool) -> Path:
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is a file")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty (pass overwrite=True / --overwrite to write into it)")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")


def _export_length(encoder, max_seq_length: int | None) -> int:
    if max_seq_length is not None:
        return int(max_seq_length)
    if getattr(encoder, "export_max_seq_length", None):
        return int(encoder.export_max_seq_length)
    return model_max_length(encoder.backbone.config, encoder.tokenizer)


def _mlp_at_eval(encoder) -> bool:
    return encoder.pooling == "cls_mlp" and not encoder.mlp_only_train


def _save_backbone(encoder, out: Path, length: int | None = None) -> None:
    """Backbone (complete HF checkpoint) and tokenizer; ``length`` becomes the tokenizer's
    ``model_max_length`` (where sentence-transformers 6 keeps ``max_seq_length``)."""
    if encoder.tokenizer is None:
        raise ValueError("the encoder has no tokenizer: an exported model must carry one "
                         "(build it with tokenizer= or load it from a folder with tokenizer files)")
    encoder.save_backbone(out)
    tokenizer = encoder.tokenizer
    if length is not None:
        tokenizer = copy.copy(tokenizer)
        tokenizer.model_max_length = int(length)
    tokenizer.save_pretrained(str(out))


def _dense_layers(encoder) -> list[tuple[dict, dict]]:
    """(config, state dict) of every Dense module after the pooling, SimCSE's MLP first."""
    layers = []
    if _mlp_at_eval(encoder):
        dense = encoder.pooler.dense
        state = {"linear.weight": dense.weight}
        if dense.bias is not None:
            state["linear.bias"] = dense.bias
        layers.append(({"in_features": dense.in_features, "out_features": dense.out_features,
                        "bias": dense.bias is not None, "activation_function": _TANH, "use_residual": False}, state))
    for layer in encoder.dense:
        layers.append((layer.config(), dict(layer.state_dict())))
    return [(cfg, {k: v.detach().float().cpu().contiguous() for k, v in state.items()}) for cfg, state in layers]


def _sentence_transformers_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("sentence_transformers") is not None


def _write_with_sentence_transformers(encoder, out: Path, *, length: int, dense, normalize: bool, similarity: str,
                                      info: CardInfo | None, base_model: str | None) -> None:
    """Build the pipeline from sentence-transformers' own modules and ``save_pretrained`` it."""
    import transformers
    from sentence_transformers import SentenceTransformer, SentenceTransformerModelCardData

    try:  # sentence-transformers >= 6
        from sentence_transformers.base.modules import Dense, Normalize, Transformer
        from sentence_transformers.sentence_transformer.modules import Pooling
    except ImportError:  # 3.x - 5.x
        from sentence_transformers.models import Dense, Normalize, Pooling, Transformer

    from fastcse.models.poolers import _activation

    staging = out / ".fastcse-backbone"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        _save_backbone(encoder, staging, length)
        dtype = next(encoder.backbone.parameters()).dtype
        dtype_key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
        modules = [Transformer(str(staging), max_seq_length=length, model_kwargs={dtype_key: dtype}),
                   Pooling(encoder.hidden_size, "mean" if encoder.pooling == "mean" else "cls")]
        for cfg, state in dense:
            kwargs = {"use_residual": True} if cfg["use_residual"] else {}
            layer = Dense(cfg["in_features"], cfg["out_features"], bias=cfg["bias"],
                          activation_function=_activation(cfg["activation_function"]), **kwargs)
            layer.load_state_dict(state)
            modules.append(layer)
        if normalize:
            modules.append(Normalize())
        card_data = SentenceTransformerModelCardData(local_files_only=True, generate_widget_examples=False)
        if info is not None:
            card_data.model_name = info.model_name or _default_name(info, base_model)
            for tag in ("fastcse", info.method):
                if tag and tag not in card_data.tags:
                    card_data.tags.append(tag)
            if info.language:
                card_data.language = [info.language] if isinstance(info.language, str) else list(info.language)
            if info.license:
                card_data.license = info.license
            if _hub_id(base_model):
                card_data.base_model = base_model  # set directly: local_files_only, no Hub look-up
        model = SentenceTransformer(modules=modules, device="cpu", similarity_fn_name=similarity,
                                    prompts=dict(encoder.prompts) or None,
                                    default_prompt_name=encoder.default_prompt_name, model_card_data=card_data)
        if info is None and encoder.model_card_text:
            model._model_card_text = encoder.model_card_text  # sentence-transformers' own way to keep a card
        model.save_pretrained(str(out))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    readme = out / MODEL_CARD_FILE
    if info is not None and readme.is_file():
        readme.write_text(_insert_section(readme.read_text(encoding="utf-8"),
                                          card_section(info, base_model=base_model)), encoding="utf-8")


def _write_by_hand(encoder, out: Path, *, length: int, dense, normalize: bool, similarity: str) -> list[str]:
    """The sentence-transformers 6.x layout, written without sentence-transformers; returns the module kinds."""
    import transformers
    from safetensors.torch import save_file

    from fastcse import __version__

    _save_backbone(encoder, out, length)
    _write_json(out / "sentence_bert_config.json", {
        "transformer_task": "feature-extraction",
        "modality_config": {"text": {"method": "forward", "method_output_name": "last_hidden_state"}},
        "module_output_name": "token_embeddings",
    })
    modules = [{"idx": 0, "name": "0", "path": "", "type": ST6_CLASSES["Transformer"]}]

    def add(kind: str) -> Path:
        idx = len(modules)
        modules.append({"idx": idx, "name": str(idx), "path": f"{idx}_{kind}", "type": ST6_CLASSES[kind]})
        return out / f"{idx}_{kind}"

    _write_json(add("Pooling") / "config.json", {
        "embedding_dimension": int(encoder.hidden_size),
        "pooling_mode": "mean" if encoder.pooling == "mean" else "cls",
        "include_prompt": True,
    })
    for cfg, state in dense:
        folder = add("Dense")
        written = {k: cfg[k] for k in ("in_features", "out_features", "bias", "activation_function")}
        written.update(_EMBEDDING)
        if cfg["use_residual"]:
            written["use_residual"] = True
        _write_json(folder / "config.json", written)
        save_file(state, str(folder / "model.safetensors"))
    if normalize:
        _write_json(add("Normalize") / "config.json", dict(_EMBEDDING))
    _write_json(out / ST_MODULES_FILE, modules)
    _write_json(out / ST_CONFIG_FILE, {
        "__version__": {"sentence_transformers": ST6_FORMAT_VERSION, "transformers": transformers.__version__,
                        "pytorch": torch.__version__, "fastcse": __version__},
        "default_prompt_name": encoder.default_prompt_name,
        "model_type": "SentenceTransformer",
        "prompts": dict(encoder.prompts),
        "similarity_fn_name": similarity,
    })
    return [m["type"].rsplit(".", 1)[-1] for m in modules]


def _default_name(info: CardInfo, base_model: str | None) -> str:
    base = _card_title(base_model) or (Path(base_model.split(" (")[0]).name if base_model else "a transformer")
    return f"fastcse {info.method} on {base}" if info.method else f"fastcse model based on {base}"


def _card_title(text: str | None) -> str | None:
    """The first ``# title`` of a markdown card (after its YAML front matter)."""
    if not text:
        return None
    match = re.search(r"^# +(.+?)\s*$", re.sub(r"\A---\n.*?\n---\n", "", text, flags=re.S), flags=re.M)
    return match.group(1) if match else None


def _source_name(encoder) -> str | None:
    """How a card names the model training started from: its card's title and its folder."""
    path = encoder.source_name_or_path
    title = _card_title(encoder.model_card_text)
    if title and path and title != path:
        return f"{title} ({path})"
    return title or path


def export_sentence_transformers(encoder, out_dir, *, normalize: bool | None = None,
                                 max_seq_length: int | None = None, overwrite: bool = False, card=None,
                                 similarity_fn_name: str | None = None, keep_source_card: bool = False,
                                 use_sentence_transformers: bool | None = None) -> Path:
    """Write ``encoder`` as a sentence-transformers folder at ``out_dir``; returns the folder.

    Args:
        encoder: a :class:`~fastcse.models.SentenceEncoder` with a tokenizer (any pooling: ``cls`` /
            ``first`` -> CLS pooling, ``mean`` -> mean pooling, ``cls_mlp`` -> CLS pooling plus a
            Dense+Tanh module when the MLP runs at evaluation, ``mlp_only_train=False``), then its
            Dense layers and Normalize.
        normalize: add (True) or leave out (False) the Normalize module; None: as the encoder's
            pipeline (``encoder.normalize_output``: the source folder's Normalize).
        max_seq_length: tokens the exported model reads. ``None``: the source pipeline's
            (``encoder.export_max_seq_length``, e.g. 256 for all-MiniLM-L6-v2), else the model's limit
            (:func:`fastcse.models.folders.model_max_length`), never the training length: a short
            ``max_seq_length`` such as SimCSE's 32 is a training cost knob, and SimCSE evaluates and
            publishes its models without that truncation.
        overwrite: allow a non-empty ``out_dir`` (files of the same names are replaced).
        card: the model card's training details, a dict of :class:`CardInfo` fields (``base_model``,
            ``method``, ``hyperparameters``, ``loss``, ``datasets`` as ``[(name, count)]``,
            ``scores`` as ``{"before": ..., "after": ...}``, ``model_name``, ``language``,
            ``license``). None: a card naming the base model (the source folder and its card's title).
        keep_source_card: without ``card``, keep the source folder's card as it is (a re-export;
            ``SentenceTransformer.save_pretrained`` also keeps a loaded card).
        similarity_fn_name: ``cosine`` / ``dot`` / ``euclidean`` / ``manhattan``; None: the encoder's.
        use_sentence_transformers: write through sentence-transformers (True), by hand (False), or
            through it when it is installed (None).

    ``out_dir`` must not exist or be empty unless ``overwrite``. Called on rank 0 inside ZeRO-3's
    gathered parameters, it reads the whole weights like any other module state.
    """
    from fastcse.models.folders import SIMILARITY_FNS

    info = CardInfo.from_value(card) if card is not None else None
    keep_card = info is None and keep_source_card and bool(encoder.model_card_text)
    if info is None and not keep_card:
        info = CardInfo()  # a card naming the base model
    similarity = similarity_fn_name or encoder.similarity_fn_name or "cosine"
    if similarity not in SIMILARITY_FNS:
        raise ValueError(f"unknown similarity_fn_name {similarity!r}; valid: {', '.join(SIMILARITY_FNS)}")
    if use_sentence_transformers is None:
        use_sentence_transformers = _sentence_transformers_available()
    out = _prepare_out(out_dir, overwrite)
    length = _export_length(encoder, max_seq_length)
    normalize = bool(encoder.normalize_output if normalize is None else normalize)
    dense = _dense_layers(encoder)
    base_model = (info.base_model if info is not None else None) or _source_name(encoder)
    kinds = ["Transformer", "Pooling"] + ["Dense"] * len(dense) + (["Normalize"] if normalize else [])
    if use_sentence_transformers:
        _write_with_sentence_transformers(encoder, out, length=length, dense=dense, normalize=normalize,
                                          similarity=similarity, info=info, base_model=base_model)
    else:
        _write_by_hand(encoder, out, length=length, dense=dense, normalize=normalize, similarity=similarity)
    readme = out / MODEL_CARD_FILE
    if keep_card and not use_sentence_transformers:
        readme.write_text(encoder.model_card_text, encoding="utf-8")
    elif not readme.is_file():  # by hand, or sentence-transformers could not render its card
        info = info or CardInfo()
        readme.write_text(_hand_written_card(info, base_model=base_model, pipeline=kinds, length=length,
                                             dim=int(encoder.embedding_dim), similarity=similarity,
                                             name=info.model_name or _default_name(info, base_model)),
                          encoding="utf-8")
    # so that SentenceEncoder.from_pretrained restores the pipeline exactly (MLP weights included)
    write_encoder_meta(out, encoder, max_seq_length=length, normalize=normalize, similarity_fn_name=similarity,
                       export_max_seq_length=length)
    return out


def export_huggingface(encoder, out_dir, *, overwrite: bool = False) -> Path:
    """Write the backbone and tokenizer as a plain Hugging Face folder (``AutoModel`` loads it).

    A plain folder has no pooler: the pooling, SimCSE's MLP weights (when they run at evaluation),
    Dense layers and Normalize are not part of it; a warning says so when that loses information.
    """
    out = _prepare_out(out_dir, overwrite)
    _save_backbone(encoder, out)
    if _mlp_at_eval(encoder) or len(encoder.dense):
        logger.warning("the encoder runs a pooler MLP or Dense layers at evaluation, and a plain Hugging Face folder "
                       "has no place for them: export a sentence-transformers folder to keep them")
    elif encoder.pooling == "mean":
        logger.warning("a plain Hugging Face folder does not record the pooling: load it with pooling='mean'")
    if encoder.normalize_output:
        logger.warning("a plain Hugging Face folder does not record Normalize: normalise the embeddings yourself")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fastcse.export",
        description="Export a fastcse checkpoint (or a sentence-transformers / Hugging Face folder) as a "
                    "sentence-transformers folder or a plain Hugging Face folder.")
    parser.add_argument("--checkpoint", required=True, metavar="DIR",
                        help="model folder: a fastcse checkpoint (SentenceEncoder.save), a sentence-transformers "
                             "folder or a Hugging Face folder")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder to write (must not exist or be empty)")
    parser.add_argument("--format", choices=FORMATS, default="sentence-transformers",
                        help="sentence-transformers (default) or a plain Hugging Face folder")
    parser.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None,
                        help="add / leave out a Normalize module (default: as the source folder; "
                             "sentence-transformers format only)")
    parser.add_argument("--pooling", choices=("cls", "cls_mlp", "mean", "first"), default=None,
                        help="override the folder's pooling")
    parser.add_argument("--max-seq-length", type=int, default=None,
                        help="tokens the exported model reads (default: the source pipeline's, else the model's limit)")
    parser.add_argument("--card", metavar="JSON", default=None,
                        help="a JSON file of model card fields (base_model, method, hyperparameters, loss, datasets, "
                             "scores, model_name, language, license); default: keep the folder's card (or write one "
                             "naming it when it has none)")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.normalize is not None and args.format != "sentence-transformers":
        parser.error("--normalize / --no-normalize apply to the sentence-transformers format only")
    if args.card is not None and args.format != "sentence-transformers":
        parser.error("--card applies to the sentence-transformers format only")
    if args.max_seq_length is not None and args.max_seq_length < 2:
        parser.error("--max-seq-length must be at least 2")

    from fastcse.evaluation.loading import load_encoder

    try:
        card = None
        if args.card is not None:
            card = json.loads(Path(args.card).read_text(encoding="utf-8"))
            if not isinstance(card, dict):
                raise ValueError(f"{args.card}: expected a JSON object of model card fields")
            card = CardInfo.from_value(card)
        encoder = load_encoder(args.checkpoint, pooling=args.pooling, attn_backend="auto")
        if args.format == "sentence-transformers":
            out = export_sentence_transformers(encoder, args.out, normalize=args.normalize,
                                               max_seq_length=args.max_seq_length, overwrite=args.overwrite, card=card,
                                               keep_source_card=True)
        else:
            out = export_huggingface(encoder, args.out, overwrite=args.overwrite)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.format} folder {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
