"""The encoder a training run starts from: pretrained weights, or a random model from a config.

Kept apart from ``fastcse/models/`` (the encoders themselves): this is the training program's
reading of ``--model`` / ``--model-config`` / ``--tokenizer`` / ``--dropout``. :func:`choose_model`
checks them before anything is loaded (pre-flight); :func:`build_encoder` then loads.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import Any, NamedTuple

import torch

from fastcse.config import ConfigError, ModelConfig, read_json_object
from fastcse.data import fallback_tokenizer, minilm_path
from fastcse.distributed import barrier
from fastcse.files import atomic_replace_dir
from fastcse.models.folders import ModelFolderError, detect_model_kind, model_max_length

# the embedded default's random model when all-MiniLM-L6-v2 is not installed (BERT-small-like)
DEFAULT_RANDOM_BERT = dict(model_type="bert", hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                           intermediate_size=1024, max_position_embeddings=512)


class ModelChoice(NamedTuple):
    source: str
    """"pretrained" (``--model``), "config" (``--model-config``), or the embedded default: "minilm"
    (the installed all-MiniLM-L6-v2) or "random-default" (:data:`DEFAULT_RANDOM_BERT`)."""
    path: str | None
    """Folder or hub name to load weights from; None for a random model."""
    config: dict | None
    """Hugging Face config mapping of a random model; None when weights are loaded."""


def _read_model_config(value: Any) -> dict:
    where = "--model-config" if isinstance(value, dict) else f"model config {value}"
    data = dict(value) if isinstance(value, dict) else read_json_object(str(value), "model config")
    data.setdefault("model_type", "bert")
    from transformers import AutoConfig, CONFIG_MAPPING

    if data["model_type"] not in CONFIG_MAPPING:
        raise ConfigError(f"{where}: unknown model_type {data['model_type']!r} (this transformers knows e.g. "
                          "bert, roberta, deberta-v2, t5, roformer, modernbert)")
    try:
        AutoConfig.for_model(**data)
    except (TypeError, ValueError, KeyError) as e:
        raise ConfigError(f"{where}: {' '.join(str(e).split())}") from None
    return data


def _check_weights(folder: Path) -> None:
    """Every safetensors file below ``folder`` has a complete header and covers its data (a truncated
    download is caught here, reading only the header)."""
    from safetensors import safe_open

    for weights in sorted(folder.rglob("*.safetensors")):
        try:
            with safe_open(str(weights), "pt"):
                pass
        except Exception as e:  # safetensors' SafetensorError: truncated, not a safetensors file
            raise ConfigError(f"cannot read the weights {weights}: {' '.join(str(e).split())}") from None


def _check_model_folder(model_path: str) -> None:
    folder = Path(model_path).expanduser()
    if folder.is_file():
        raise ConfigError(f"--model {model_path} is a file; expected a model folder (config.json and weights, "
                          "or a sentence-transformers / fastcse export)")
    if not folder.is_dir():
        raise ConfigError(f"model folder not found: {model_path}")
    for config in sorted(folder.glob("*/config.json")) + [folder / "config.json"]:
        if config.is_file():
            read_json_object(config, "model config")  # a corrupt config.json is one line, not a traceback
    try:
        detect_model_kind(folder)
    except ModelFolderError as e:
        # a config.json without weights is named as such; any other folder keeps the short line
        raise ConfigError(str(e) if (folder / "config.json").is_file()
                          else f"{model_path} is not a model folder (no config.json / modules.json)") from None
    _check_weights(folder)


def _check_hub_name(name: str) -> None:
    """A hub name is usable only when cached or the hub is reachable (checked quickly: no 20 s of retries)."""
    import os
    import socket
    from urllib.parse import urlparse

    try:
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache(name, "config.json"), str) or isinstance(
                try_to_load_from_cache(name, "modules.json"), str):
            return
    except Exception:  # an invalid repo name: the hub check below decides
        pass
    hint = (f"--model {name}: not a local folder, and the Hugging Face hub cannot be reached ({{why}}); "
            "pass a local model folder (--model /path/to/model)")
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        raise ConfigError(hint.format(why="HF_HUB_OFFLINE is set and it is not in the cache"))
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=5).close()
    except OSError as e:
        raise ConfigError(hint.format(why=f"{host}: {e}")) from None


def choose_model(m: ModelConfig) -> ModelChoice:
    """Which model ``m`` asks for, checked without loading it; a bad path or file is a ConfigError."""
    if m.config is not None:
        if m.tokenizer is not None and not Path(m.tokenizer).exists():
            raise ConfigError(f"tokenizer folder not found: {m.tokenizer}")
        if m.tokenizer is not None and not Path(m.tokenizer).is_dir():
            raise ConfigError(f"--tokenizer {m.tokenizer} is a file; expected a tokenizer folder "
                              "(tokenizer.json / vocab.txt, as save_pretrained writes it)")
        return ModelChoice("config", m.name_or_path, _read_model_config(m.config))
    if m.name_or_path is not None:
        path = m.name_or_path
        # a hub name is "name" or "org/name"; anything else is a local folder that must exist
        if path.startswith((".", "/", "~")) or path.count("/") > 1 or Path(path).expanduser().exists():
            _check_model_folder(path)
        else:
            _check_hub_name(path)
        return ModelChoice("pretrained", path, None)
    path = minilm_path()
    return ModelChoice("minilm", path, None) if path else ModelChoice("random-default", None, dict(DEFAULT_RANDOM_BERT))


# module attributes that hold a dropout probability as a plain float (not an nn.Dropout)
FLOAT_DROPOUT_ATTRS = ("dropout", "attention_dropout", "dropout_rate", "dropout_prob")


def set_dropout(encoder, p: float) -> None:
    """Every dropout probability of ``encoder`` (modules and backbone config) set to ``p``."""
    # HF reads most dropout probabilities from its nn.Dropout modules (SDPA included: self.dropout.p),
    # but some attention modules keep a plain float copied from the config when they were built
    # (T5Attention.dropout = config.dropout_rate, ModernBERT's attention_dropout): those too
    for module in encoder.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = p
        for attr in FLOAT_DROPOUT_ATTRS:
            if isinstance(getattr(module, attr, None), float):
                setattr(module, attr, float(p))
    cfg = encoder.backbone.config
    for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "dropout_rate", "attention_dropout"):
        if hasattr(cfg, name):
            setattr(cfg, name, p)


class _ZeRO3Flag:
    """What ``transformers.integrations.HfDeepSpeedConfig`` registers, without its accelerate
    dependency: transformers reads only ``is_zero3()`` and ``config`` from the registered object
    (``is_deepspeed_zero3_enabled`` / ``deepspeed_config``); ``from_pretrained`` then builds the model
    under ``deepspeed.zero.Init(config_dict_or_path=config)`` and rank 0 loads the checkpoint into
    the partitions module by module."""

    def __init__(self, config: dict):
        self.config = config

    def is_zero3(self) -> bool:
        return True


@contextlib.contextmanager
def _hf_zero3(ds_config: dict):
    from transformers.integrations import set_hf_deepspeed_config, unset_hf_deepspeed_config

    flag = _ZeRO3Flag(ds_config)  # transformers keeps a weakref: alive for the block only
    set_hf_deepspeed_config(flag)
    try:
        yield
    finally:
        unset_hf_deepspeed_config()


def _gathered_init(original):
    """``PreTrainedModel.initialize_weights`` with each module's parameters gathered (ZeRO-3) while
    its ``_init_weights`` runs, on every rank: the same draws in the same order as one process."""
    import deepspeed
    from transformers import PreTrainedModel

    def initialize_weights(self):
        models = [m for m in self.modules() if isinstance(m, PreTrainedModel)]
        for model in models:
            inner = model._initialize_weights

            def gathered(module, *args, _inner=inner, **kwargs):
                # what HF's own ZeRO-3 init gathers: the module's parameters and its direct
                # children's (an _init_weights may set e.g. attention.q.weight)
                params = list(module.parameters(recurse=False))
                for child in module.children():
                    if not isinstance(child, PreTrainedModel):
                        params.extend(child.parameters(recurse=False))
                params = [p for p in params if hasattr(p, "ds_id")]
                # modifier_rank 0: rank 0's values are kept (every rank draws the same ones)
                with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
                    return _inner(module, *args, **kwargs)

            model._initialize_weights = gathered  # smart_apply looks it up on the instance
        try:
            original(self)
        finally:
            for model in models:
                del model._initialize_weights
        initialize_weights.calls += 1

    initialize_weights.calls = 0
    return initialize_weights


@contextlib.contextmanager
def _zero3_random_init(ds_config: dict):
    """A random backbone created sharded, with the weights one process would draw.

    transformers' own ZeRO-3 random init (``_from_config`` under ``is_deepspeed_zero3_enabled``)
    suppresses the modules' constructor draws and initialises on rank 0 only, so its weights differ
    from a one-process build with the same seed. Here the modules are built under
    ``deepspeed.zero.Init`` as they are in one process (each module's parameters are created whole,
    drawn, and partitioned when its ``__init__`` returns: one module at a time is whole), then
    transformers' ``post_init`` runs its weight init with each module's parameters gathered in turn
    (:func:`_gathered_init`). Every rank makes the same draws, so every rank's generator stays where
    one process's is (the pooler and Dense layers built next get one process's values too).
    """
    import deepspeed
    from transformers import PreTrainedModel

    had_own = "initialize_weights" in vars(PreTrainedModel)
    original = PreTrainedModel.initialize_weights
    patched = _gathered_init(original)
    PreTrainedModel.initialize_weights = patched
    try:
        with deepspeed.zero.Init(config_dict_or_path=ds_config):
            yield
    finally:
        if had_own:
            PreTrainedModel.initialize_weights = original
        else:
            del PreTrainedModel.initialize_weights
    if patched.calls == 0:
        # a transformers whose post_init does not go through PreTrainedModel.initialize_weights
        # (or a model class that overrides it): the partitions would hold constructor values.
        # (Nested models call it more than once, T5EncoderModel and its T5Stack, as in one process.)
        raise RuntimeError("ZeRO-3 random init: transformers did not initialise the weights through "
                           f"PreTrainedModel.initialize_weights ({patched.calls} calls); this transformers "
                           "is not supported for sharded creation")


def _materialise(module: torch.nn.Module) -> None:
    """Replace ``module``'s ZeRO-3 parameters by whole plain ones (modules the encoder keeps aside,
    outside the engine: BERT's CLS pooler, which the export writes back)."""
    import deepspeed

    params = [p for p in module.parameters() if hasattr(p, "ds_id")]
    if not params:
        return
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        whole = {name: torch.nn.Parameter(p.data.clone(), requires_grad=p.requires_grad)
                 for name, p in module.named_parameters()}
    for name, p in whole.items():
        owner, _, leaf = name.rpartition(".")
        setattr(module.get_submodule(owner) if owner else module, leaf, p)


def backbone_context(zero3_config: dict | None, *, pretrained: bool):
    """The context the Hugging Face backbone is built in: None (plain), or under ZeRO-3
    (``zero3_config``: the filled DeepSpeed config, ``ds_config.zero_init_config``) sharded creation:
    transformers' ``from_pretrained`` integration for weights, :func:`_zero3_random_init` for a
    random model."""
    if zero3_config is None:
        return None
    if pretrained:
        return lambda: _hf_zero3(zero3_config)
    return lambda: _zero3_random_init(zero3_config)


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
                  rank: int, zero3_config: dict | None = None):
    """A ``SentenceEncoder`` on the CPU: random from ``model_config`` (a Hugging Face config mapping)
    when given, else loaded from ``model_path``. ``m`` supplies tokenizer, pooler, attention backend,
    length and the dropout override; ``output_dir`` holds the fallback tokenizer's cache.

    ``zero3_config`` (the filled DeepSpeed config of a ZeRO-3 run, every rank calling): the backbone's
    parameters are created sharded (``deepspeed.zero.Init``), so no rank holds the whole model; a
    random model gets the weights a one-process build with the same seed gets. The pooler and Dense
    layers are built whole (DeepSpeed partitions them when it wraps the encoder)."""
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
                                              attn_backend=m.attn_backend, max_seq_length=m.max_seq_length,
                                              backbone_context=backbone_context(zero3_config, pretrained=False))
    else:
        try:
            encoder = SentenceEncoder.from_pretrained(
                model_path, pooling=m.pooling, attn_backend=m.attn_backend, max_seq_length=m.max_seq_length,
                backbone_context=backbone_context(zero3_config, pretrained=True))
        except (OSError, ValueError, ModelFolderError) as e:  # what a pre-flight check could not see
            raise ConfigError(f"cannot load the model {model_path}: {' '.join(str(e).split())[:300]}") from None
        if encoder.tokenizer is None:
            raise ConfigError(f"{model_path} has no tokenizer files")
    for module in getattr(encoder, "unused_backbone_modules", {}).values():
        _materialise(module)  # kept aside, never in the engine: whole on every rank (hidden^2 at most)
    limit = model_max_length(encoder.backbone.config, encoder.tokenizer)
    if m.max_seq_length > limit:
        # before any step: otherwise the first long batch fails with an IndexError in the position table
        raise ConfigError(f"--max-seq-length {m.max_seq_length} exceeds the model's limit of {limit} tokens "
                          f"(its position table / tokenizer); pass --max-seq-length {limit} or less")
    if m.dropout is not None:
        set_dropout(encoder, m.dropout)
    return encoder
