"""SentenceEncoder: a Hugging Face backbone + a pooler (+ Dense layers, Normalize) + an attention backend."""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import logging
import warnings
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from . import attention as attn
from .folders import (DENSE_WEIGHTS, MODEL_CARD_FILE, POOLER_WEIGHTS, SIMILARITY_FNS, ST_MODULES_FILE,
                      check_sentence_transformers_modules, folder_kind, has_tokenizer_files, model_max_length,
                      read_dense_weights, read_encoder_meta, read_sentence_transformers_folder, write_encoder_meta)
from .poolers import POOLINGS, Dense, build_pooler
from .unpad import unpack

logger = logging.getLogger(__name__)

T5_MODEL_TYPES = frozenset({"t5", "mt5", "umt5"})


class TruncationWarning(UserWarning):
    """Sentences were longer than ``max_seq_length`` tokens and were cut."""


def _backbone_class(config):
    """HF class of the encoder-only backbone for ``config`` (for T5 the T5EncoderModel)."""
    import transformers

    if config.model_type in T5_MODEL_TYPES:
        name = {"t5": "T5EncoderModel", "mt5": "MT5EncoderModel", "umt5": "UMT5EncoderModel"}[config.model_type]
        return getattr(transformers, name)
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    try:
        return MODEL_MAPPING[type(config)]
    except KeyError as exc:
        raise ValueError(f"no Hugging Face encoder class for model type {config.model_type!r}") from exc


def _has_pooling_layer(cls) -> bool:
    """Whether the HF class builds a tanh pooler on CLS (BERT family: ``add_pooling_layer``)."""
    return "add_pooling_layer" in inspect.signature(cls.__init__).parameters


def _checkpoint_keys(path) -> set[str] | None:
    """The parameter names of a local checkpoint folder (read from the file headers), or None."""
    folder = Path(str(path))
    if (folder / "model.safetensors").is_file():
        from safetensors import safe_open

        with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
            return set(f.keys())
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / index).is_file():
            return set(json.loads((folder / index).read_text()).get("weight_map", {}))
    if (folder / "pytorch_model.bin").is_file():
        return set(torch.load(folder / "pytorch_model.bin", map_location="meta", weights_only=True, mmap=True))
    return None


def _fresh_pooling_layer(model_cls, config) -> nn.Module:
    """The HF class's own CLS pooler, initialised as HF does (normal(0, initializer_range), zero bias)."""
    with torch.device("meta"):
        full = model_cls(copy.deepcopy(config), add_pooling_layer=True)
    module = full.pooler.to_empty(device="cpu")
    std = getattr(config, "initializer_range", 0.02)
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            nn.init.normal_(sub.weight, std=std)
            if sub.bias is not None:
                nn.init.zeros_(sub.bias)
    return module.float()


def _resolve_dtype(dtype):
    if dtype is None or isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype  # "auto": the checkpoint's own dtype (from_pretrained only)
    if isinstance(dtype, str) and isinstance(getattr(torch, dtype, None), torch.dtype):
        return getattr(torch, dtype)
    raise ValueError(f"dtype must be a torch.dtype or its name (e.g. 'bfloat16'), got {dtype!r}")


class SentenceEncoder(nn.Module):
    """Sentence embeddings from a Hugging Face encoder: BERT, RoBERTa, DeBERTa-v2/v3, T5 encoder,
    RoFormer, ModernBERT.

    Build with :meth:`from_pretrained` (HF folder, a folder written by :meth:`save`, or a
    sentence-transformers folder) or :meth:`from_config` (random init).

    Shapes: :meth:`forward` takes padded ``input_ids`` / ``attention_mask`` / ``token_type_ids``
    ``(batch, seqlen)`` (right-padded) and returns the pooled ``(batch, embedding_dim)``.

    Attention backends (``attn_backend``; details and dropout in :mod:`fastcse.models.attention`):
    ``eager`` (HF's own, the reference), ``sdpa`` (HF's padded SDPA), ``varlen`` (BERT family and
    ModernBERT on packed tokens; on CPU its attention runs through a padded SDPA twin), ``biased``
    (T5 / DeBERTa-v2 fused relative-bias attention; where Triton cannot run, e.g. on CPU without
    its interpreter, the chunked PyTorch twin of :mod:`fastcse.biased_attention`), ``rotary``
    (RoFormer / ModernBERT fused rotary), ``auto`` (resolved when built: ``varlen`` for the BERT
    family; for the others the fused backend on a CUDA machine, else sdpa or eager).
    In training mode every backend applies the model's attention and hidden dropout, so two
    forwards of one batch differ (SimCSE's augmentation); evaluation mode is deterministic.

    Poolings: ``cls`` (first token), ``cls_mlp`` (SimCSE: CLS -> dense -> tanh; with
    ``mlp_only_train=True`` only in training mode), ``mean`` (masked mean), ``first`` (T5's first
    token, same as ``cls``).

    The pipeline after the pooler is a sentence-transformers model's: ``dense`` (a list of
    :class:`~fastcse.models.poolers.Dense`, trainable) and ``normalize`` (unit-length output), both
    applied in :meth:`forward`; ``similarity_fn_name`` is what :meth:`similarity` computes.
    :meth:`from_pretrained` of a sentence-transformers folder reads them in, and an export writes
    them back, with the folder's prompts, model card and ``max_seq_length``
    (``export_max_seq_length``).

    BERT-family backbones run without their tanh pooler on CLS (fastcse never uses it), but the
    encoder keeps its weights (the checkpoint's, or HF's initialisation) outside the module tree:
    no parameter without a gradient in training, and :meth:`save` / an export write the complete
    checkpoint, so Hugging Face reports nothing missing when it loads the folder.

    Example::

        >>> from transformers import BertConfig
        >>> cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
        ...                  num_attention_heads=4, intermediate_size=64)
        >>> enc = SentenceEncoder.from_config(cfg, pooling="mean", attn_backend="eager")
        >>> ids = torch.randint(1, 100, (3, 7)); mask = torch.ones(3, 7, dtype=torch.long)
        >>> enc(ids, mask).shape
        torch.Size([3, 32])
    """

    def __init__(self, backbone: nn.Module, *, tokenizer=None, pooling: str = "cls", attn_backend: str = "auto",
                 max_seq_length: int = 32, mlp_only_train: bool = True, dense: Sequence[Dense] = (),
                 normalize: bool = False, similarity_fn_name: str | None = None):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; valid poolings: {', '.join(POOLINGS)}")
        similarity_fn_name = similarity_fn_name or "cosine"
        if similarity_fn_name not in SIMILARITY_FNS:
            raise ValueError(f"unknown similarity_fn_name {similarity_fn_name!r}; valid: {', '.join(SIMILARITY_FNS)}")
        config = backbone.config
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.mlp_only_train = mlp_only_train
        self.max_seq_length = int(max_seq_length)
        self.hidden_size = int(config.hidden_size)
        self.pooler = build_pooler(pooling, self.hidden_size, mlp_only_train=mlp_only_train,
                                   initializer_range=getattr(config, "initializer_range", 0.02))
        width = self.hidden_size
        for i, layer in enumerate(dense):
            if layer.in_features != width:
                raise ValueError(f"Dense layer {i} takes {layer.in_features} features, but its input has {width}")
            width = layer.out_features
        self.dense = nn.ModuleList(dense)
        self.embedding_dim = width
        """Width of the sentence embedding (the last Dense layer's, else the backbone's hidden size)."""
        self.normalize_output = bool(normalize)
        self.similarity_fn_name = similarity_fn_name
        # what the source folder said beyond the model, written back by an export
        self.prompts: dict[str, str] = {}
        self.default_prompt_name: str | None = None
        self.model_card_text: str | None = None
        self.export_max_seq_length: int | None = None
        self.source_name_or_path: str | None = None
        # backbone modules fastcse does not run (BERT's CLS pooler), kept to be saved: a plain dict,
        # so they are neither parameters nor part of state_dict()
        self.unused_backbone_modules: dict[str, nn.Module] = {}
        param = next(backbone.parameters(), None)
        if param is not None:
            self.pooler.to(device=param.device, dtype=param.dtype)
            self.dense.to(device=param.device, dtype=param.dtype)
        if attn_backend == "auto":
            # a backbone handed in directly: varlen where it applies, else the HF attention it was built with
            supports_sdpa = getattr(config, "_attn_implementation", "eager") == "sdpa"
            attn_backend = attn.resolve_backend("auto", config.model_type, supports_sdpa, cuda=False)
        elif attn_backend not in attn.ATTN_BACKENDS:
            raise ValueError(f"unknown attn_backend {attn_backend!r}; valid backends: {', '.join(attn.ATTN_BACKENDS)}")
        # the resolved backend name; from_config / from_pretrained built the backbone for it
        self.attn_backend = attn_backend
        # knobs of the varlen path (fastcse additions): the attention kernel and, for ModernBERT, the rotary
        self.varlen_kernel: attn.VarlenKernel = "auto"
        self.varlen_rotary = "auto"
        self._checkpoint = False
        forward_params = inspect.signature(backbone.forward).parameters
        self._takes_token_type_ids = "token_type_ids" in forward_params

    # ------------------------------------------------------------------------------------------
    # construction

    @classmethod
    def _build(cls, config, *, weights_path=None, tokenizer=None, pooling="cls", attn_backend="auto",
               dtype=None, max_seq_length=32, mlp_only_train=True, dense=(), normalize=False,
               similarity_fn_name=None, backbone_context=None) -> "SentenceEncoder":
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; valid poolings: {', '.join(POOLINGS)}")
        dtype = _resolve_dtype(dtype)
        if dtype == "auto" and weights_path is None:
            dtype = None  # a random init has no checkpoint dtype to follow
        model_cls = _backbone_class(config)
        supports_sdpa = bool(getattr(model_cls, "_supports_sdpa", False))
        backend = attn.resolve_backend(attn_backend, config.model_type, supports_sdpa)
        if backend in ("biased", "rotary") and not attn.patch_available(backend):
            # fail here, before loading weights, with the reason
            attn.apply_patch(None, backend)
        kwargs = dict(attn_implementation=attn.hf_attn_implementation(backend, supports_sdpa))
        pooling_layer = _has_pooling_layer(model_cls)
        # BERT's CLS pooler: loaded with the backbone when the checkpoint holds it (no UNEXPECTED
        # report), else made fresh; either way taken out of the module tree below
        load_pooler = False
        if pooling_layer:
            keys = _checkpoint_keys(weights_path) if weights_path is not None else set()
            prefix = f"{getattr(model_cls, 'base_model_prefix', '')}.pooler."
            load_pooler = weights_path is None or any(k.startswith(("pooler.", prefix)) for k in keys or ())
            kwargs["add_pooling_layer"] = load_pooler
        if dtype is not None:
            kwargs["dtype"] = dtype
        # backbone_context: what the Hugging Face model alone is built in (fastcse.build: created
        # sharded under ZeRO-3); the poolers and Dense layers below are small and built plainly
        with backbone_context() if backbone_context is not None else contextlib.nullcontext():
            if weights_path is None:
                backbone = model_cls._from_config(copy.deepcopy(config), **kwargs)
            else:
                backbone = model_cls.from_pretrained(weights_path, config=config, **kwargs)
        unused = {}
        if pooling_layer:
            if load_pooler:
                unused["pooler"] = backbone.pooler.cpu()
                backbone.pooler = None
            else:
                unused["pooler"] = _fresh_pooling_layer(model_cls, config)
        if backend in ("biased", "rotary"):
            count = attn.apply_patch(backbone, backend)
            logger.info("attn_backend=%s: patched %d modules of %s", backend, count, type(backbone).__name__)
        encoder = cls(backbone, tokenizer=tokenizer, pooling=pooling, attn_backend=backend,
                      max_seq_length=max_seq_length, mlp_only_train=mlp_only_train, dense=dense, normalize=normalize,
                      similarity_fn_name=similarity_fn_name)
        encoder.unused_backbone_modules = unused
        return encoder

    @classmethod
    def from_config(cls, config, *, tokenizer=None, pooling: str = "cls", attn_backend: str = "auto", dtype=None,
                    max_seq_length: int = 32, mlp_only_train: bool = True, normalize: bool = False,
                    similarity_fn_name: str | None = None, backbone_context=None) -> "SentenceEncoder":
        """A randomly initialised encoder for a HF ``PretrainedConfig`` (the config is copied).

        ``mlp_only_train`` (fastcse addition) applies to ``pooling="cls_mlp"`` only; ``normalize``
        gives unit-length embeddings (a Normalize module in an export); ``backbone_context``: a
        callable giving the context manager the Hugging Face backbone alone is built in.
        """
        return cls._build(config, tokenizer=tokenizer, pooling=pooling, attn_backend=attn_backend, dtype=dtype,
                          max_seq_length=max_seq_length, mlp_only_train=mlp_only_train, normalize=normalize,
                          similarity_fn_name=similarity_fn_name, backbone_context=backbone_context)

    @classmethod
    def from_pretrained(cls, name_or_path, *, pooling: str | None = None, attn_backend: str = "auto", dtype=None,
                        max_seq_length: int | None = None, tokenizer=None,
                        mlp_only_train: bool | None = None, backbone_context=None) -> "SentenceEncoder":
        """Load an encoder from a folder (or a HF hub name, which needs the network).

        Folder kinds:
        - written by :meth:`save` (or an export): the metadata file
          (:data:`~fastcse.models.folders.ENCODER_META_FILE`) gives pooling, ``mlp_only_train``,
          ``max_seq_length``, Dense layers, Normalize, similarity function and prompts; the
          ``cls_mlp`` and Dense weights come from ``pooler.safetensors`` / ``dense.safetensors``.
          The saved ``attn_backend`` is informational: ``attn_backend`` here (default ``auto``)
          decides, since the right backend depends on the machine.
        - sentence-transformers (``modules.json``): the Transformer module's folder is the
          backbone, the Pooling module the pooling (``cls`` or ``mean``; others are refused), then
          the Dense modules (trainable) and Normalize, as :func:`~fastcse.models.folders.read_sentence_transformers_folder`
          reads them; ``max_seq_length`` from ``sentence_bert_config.json`` or the tokenizer.
        - a plain Hugging Face model: pooling ``cls`` (``mean`` for T5, as Sentence-T5) unless given;
          ``max_seq_length`` from the tokenizer / position embeddings, at most 512.

        Explicit arguments override what the folder says (``max_seq_length`` changes the length
        the encoder reads, e.g. SimCSE's 32 in training, not the length its export will read,
        ``export_max_seq_length``). ``tokenizer`` defaults to the folder's (None when it has no
        tokenizer files); a path or name loads that tokenizer instead.
        ``dtype``: a ``torch.dtype``, its name, or ``"auto"`` (the checkpoint's dtype); None: float32.
        ``backbone_context``: as :meth:`from_config`.
        """
        from transformers import AutoConfig

        path = Path(str(name_or_path))
        saved: dict = {}
        backbone_path = str(name_or_path)
        folder_pooling = folder_max_len = None
        dense_configs: list[dict] = []
        dense_states: list[dict] = []
        normalize, similarity, prompts, default_prompt, card = False, None, {}, None, None
        # a Hugging Face folder or a hub name (kind None) goes to Hugging Face as it is
        kind = folder_kind(path)
        if kind == "fastcse":
            saved = read_encoder_meta(path)
            folder_pooling, folder_max_len = saved.get("pooling"), saved.get("max_seq_length")
            dense_configs = list(saved.get("dense") or [])
            if dense_configs:
                dense_states = [{} for _ in dense_configs]
                if (path / DENSE_WEIGHTS).is_file():
                    from safetensors.torch import load_file

                    for key, value in load_file(str(path / DENSE_WEIGHTS), device="cpu").items():
                        index, _, name = key.partition(".")
                        dense_states[int(index)][name] = value
            normalize = saved.get("normalize")
            if normalize is None:  # written before the field: an export's modules.json says
                normalize = (path / ST_MODULES_FILE).is_file() and any(
                    m["kind"] == "Normalize" for m in check_sentence_transformers_modules(path))
            similarity = saved.get("similarity_fn_name")
            prompts, default_prompt = dict(saved.get("prompts") or {}), saved.get("default_prompt_name")
            export_len = saved.get("export_max_seq_length")
            if export_len is None and (path / ST_MODULES_FILE).is_file():
                export_len = folder_max_len  # an export records the length it reads
        elif kind == "sentence-transformers":
            st = read_sentence_transformers_folder(path)
            backbone_path, folder_pooling, folder_max_len = str(st.backbone), st.pooling, st.max_seq_length
            dense_configs = [config for config, _ in st.dense]
            dense_states = [read_dense_weights(folder) for _, folder in st.dense]
            normalize, similarity = st.normalize, st.similarity_fn_name
            prompts, default_prompt = st.prompts, st.default_prompt_name
            export_len = folder_max_len
        else:
            export_len = None
        if kind in ("fastcse", "sentence-transformers") and (path / MODEL_CARD_FILE).is_file():
            card = (path / MODEL_CARD_FILE).read_text(encoding="utf-8")
        config = AutoConfig.from_pretrained(backbone_path)
        if pooling is None:
            pooling = folder_pooling or ("mean" if config.model_type in T5_MODEL_TYPES else "cls")
        if mlp_only_train is None:
            mlp_only_train = bool(saved.get("mlp_only_train", True))
        if tokenizer is None:
            tokenizer = _load_tokenizer(backbone_path)
        elif isinstance(tokenizer, (str, Path)):
            tokenizer = _load_tokenizer(str(tokenizer))
        if kind is not None and export_len is None:
            export_len = model_max_length(config, tokenizer)
        if max_seq_length is None:
            max_seq_length = folder_max_len or model_max_length(config, tokenizer)
        dense = []
        for i, (layer_config, state) in enumerate(zip(dense_configs, dense_states)):
            layer = Dense(**layer_config)
            try:
                layer.load_state_dict(state)
            except RuntimeError as exc:
                raise ValueError(f"{name_or_path}: weights of Dense layer {i} do not fit its config ({exc})") from None
            dense.append(layer)
        encoder = cls._build(config, weights_path=backbone_path, tokenizer=tokenizer, pooling=pooling,
                             attn_backend=attn_backend, dtype=dtype, max_seq_length=max_seq_length,
                             mlp_only_train=mlp_only_train, dense=dense, normalize=bool(normalize),
                             similarity_fn_name=similarity, backbone_context=backbone_context)
        encoder.prompts, encoder.default_prompt_name = dict(prompts), default_prompt
        encoder.model_card_text, encoder.export_max_seq_length = card, export_len
        encoder.source_name_or_path = str(name_or_path)
        pooler_file = path / POOLER_WEIGHTS
        if any(True for _ in encoder.pooler.parameters()):
            if pooler_file.is_file() and saved.get("pooling") == pooling:
                from safetensors.torch import load_file

                state = load_file(str(pooler_file), device="cpu")
                encoder.pooler.load_state_dict(state)
                encoder.pooler.to(device=next(encoder.backbone.parameters()).device,
                                  dtype=next(encoder.backbone.parameters()).dtype)
            else:
                logger.warning("pooling=%r has parameters that %s does not hold: they start from random init",
                               pooling, name_or_path)
        return encoder

    # ------------------------------------------------------------------------------------------
    # saving

    def save(self, path) -> None:
        """Write a fastcse folder that :meth:`from_pretrained` reads back exactly.

        Contents: the HF backbone (``config.json``, ``model.safetensors``; BERT's CLS pooler
        included), the tokenizer files, :data:`~fastcse.models.folders.ENCODER_META_FILE`,
        ``pooler.safetensors`` when the pooler has parameters (``cls_mlp``), ``dense.safetensors``
        when there are Dense layers, and the source's model card (``README.md``) when it had one.
        :meth:`save_pretrained` writes a sentence-transformers folder instead.
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.save_backbone(path)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(str(path))
        write_encoder_meta(path, self)
        if self.model_card_text is not None:
            (path / MODEL_CARD_FILE).write_text(self.model_card_text, encoding="utf-8")

    def save_pretrained(self, path, *, card=None, **export_kwargs) -> Path:
        """Write a sentence-transformers folder (as ``SentenceTransformer.save_pretrained``): what
        :func:`fastcse.export.export_sentence_transformers` writes, into ``path`` even when it is
        not empty. ``card``: the model card's training details (see there); without it the source
        folder's card is kept, as sentence-transformers keeps a loaded card."""
        # the export module owns the sentence-transformers format; imported here, not at the top, since
        # it sits above the models package (it also loads evaluation helpers)
        from fastcse.export import export_sentence_transformers

        export_kwargs.setdefault("keep_source_card", card is None)
        return export_sentence_transformers(self, path, card=card, overwrite=True, **export_kwargs)

    def save_backbone(self, path) -> None:
        """``backbone.save_pretrained(path)`` with the modules fastcse does not run put back in
        (BERT's CLS pooler), so the folder is the complete checkpoint of the HF class."""
        param = next(self.backbone.parameters())
        attached = []
        try:
            for name, module in self.unused_backbone_modules.items():
                if getattr(self.backbone, name, None) is None:
                    setattr(self.backbone, name, module.to(device=param.device, dtype=param.dtype))
                    attached.append(name)
            self.backbone.save_pretrained(str(path))
        finally:
            for name in attached:
                self.unused_backbone_modules[name] = getattr(self.backbone, name).cpu()
                setattr(self.backbone, name, None)

    # ------------------------------------------------------------------------------------------
    # the model

    def gradient_checkpointing_enable(self) -> None:
        """Recompute each encoder layer in backward (fastcse addition): HF's own checkpointing for
        the padded backends, ``torch.utils.checkpoint`` per layer on the varlen path. Dropout masks
        are replayed (the RNG state is restored), so gradients match the stored-activation run."""
        self._checkpoint = True
        kwargs = {"use_reentrant": False}
        if hasattr(self.backbone, "activation_checkpointing_enable"):  # transformers >= 5.2x
            self.backbone.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            self.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    def gradient_checkpointing_disable(self) -> None:
        self._checkpoint = False
        if hasattr(self.backbone, "activation_checkpointing_disable"):
            self.backbone.activation_checkpointing_disable()
        else:
            self.backbone.gradient_checkpointing_disable()

    def _varlen(self, input_ids, attention_mask, token_type_ids):
        checkpoint = self._checkpoint
        if self.backbone.config.model_type == "modernbert":
            return attn.modernbert_varlen_forward(self.backbone, input_ids, attention_mask, kernel=self.varlen_kernel,
                                                  checkpoint=checkpoint, rotary_backend=self.varlen_rotary)
        return attn.bert_varlen_forward(self.backbone, input_ids, attention_mask, token_type_ids,
                                        kernel=self.varlen_kernel, checkpoint=checkpoint)

    def encode_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      token_type_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Last hidden states and sentence embeddings (fastcse addition, for tests and analysis).

        Returns ``(hidden, pooled)``: ``hidden`` ``(batch, seqlen, hidden)`` (the varlen backend
        gives zeros at padded positions, the padded backends whatever HF computes there) and
        ``pooled`` ``(batch, embedding_dim)``, what :meth:`forward` returns.
        """
        if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
            raise ValueError(f"input_ids and attention_mask must both be (batch, seqlen); got "
                             f"{tuple(input_ids.shape)} and {tuple(attention_mask.shape)}")
        if not self._takes_token_type_ids:
            token_type_ids = None  # T5 / ModernBERT have no segment embeddings
        if self.attn_backend == "varlen":
            packed_hidden, packed = self._varlen(input_ids, attention_mask, token_type_ids)
            return unpack(packed_hidden, packed), self._head(self.pooler.forward_packed(packed_hidden, packed))
        kwargs = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        return hidden, self._head(self.pooler(hidden, attention_mask))

    def _head(self, pooled: torch.Tensor) -> torch.Tensor:
        """The pipeline after the pooler: Dense layers, then Normalize."""
        for layer in self.dense:
            pooled = layer(pooled)
        if self.normalize_output:
            pooled = torch.nn.functional.normalize(pooled, dim=-1)
        return pooled

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Sentence embeddings ``(batch, embedding_dim)`` of a padded ``(batch, seqlen)`` batch:
        pooled, through the Dense layers, unit length when ``normalize_output``.

        ``token_type_ids`` is ignored by models without segment embeddings (T5, ModernBERT).
        """
        if self.attn_backend == "varlen":
            if not self._takes_token_type_ids:
                token_type_ids = None
            packed_hidden, packed = self._varlen(input_ids, attention_mask, token_type_ids)
            return self._head(self.pooler.forward_packed(packed_hidden, packed))
        return self.encode_tokens(input_ids, attention_mask, token_type_ids)[1]

    # ------------------------------------------------------------------------------------------
    # text in, vectors out

    def _require_tokenizer(self):
        if self.tokenizer is None:
            raise RuntimeError("this SentenceEncoder has no tokenizer: pass tokenizer= to from_config / from_pretrained")
        return self.tokenizer

    def _tokenize(self, sentences: Sequence[str], max_length: int | None):
        """Tokenize, padded to the longest; returns (batch dict, number of truncated sentences)."""
        tok = self._require_tokenizer()
        if isinstance(sentences, str):
            raise TypeError("tokenize() takes a list of sentences, not one string")
        sentences = list(sentences)
        if not sentences:
            raise ValueError("tokenize() got an empty list of sentences")
        bad = [i for i, s in enumerate(sentences) if not isinstance(s, str)]
        if bad:
            raise TypeError(f"sentences must be str; item {bad[0]} is {type(sentences[bad[0]]).__name__}")
        max_length = int(max_length or self.max_seq_length)
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {max_length}")
        # one token of slack tells the sentences that do not fit apart from those that fill it exactly
        probe = tok(sentences, truncation=True, max_length=max_length + 1)["input_ids"]
        too_long = [i for i, ids in enumerate(probe) if len(ids) > max_length]
        if too_long:
            cut = tok([sentences[i] for i in too_long], truncation=True, max_length=max_length)["input_ids"]
            for i, ids in zip(too_long, cut):
                probe[i] = ids
        features = {"input_ids": probe}
        batch = tok.pad(features, padding="longest", return_tensors="pt", return_attention_mask=True)
        out = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        if self._takes_token_type_ids and getattr(self.backbone.config, "type_vocab_size", 0):
            # single sentences: segment 0 everywhere, as the tokenizers produce
            out["token_type_ids"] = torch.zeros_like(out["input_ids"])
        return out, len(too_long)

    def tokenize(self, sentences: list[str], max_length: int | None = None) -> dict[str, torch.Tensor]:
        """Tokenize ``sentences`` padded to the longest, truncated to ``max_length`` (default
        ``max_seq_length``) tokens including special tokens.

        Returns ``input_ids`` / ``attention_mask`` (and ``token_type_ids`` for models that take them),
        each ``(batch, seqlen)`` on CPU. Warns (:class:`TruncationWarning`) with the number of
        sentences that were truncated. Raises ValueError for an empty list, TypeError for
        non-strings; empty strings are fine (special tokens only).
        """
        batch, n_cut = self._tokenize(sentences, max_length)
        if n_cut:
            warnings.warn(f"{n_cut} of {len(batch['input_ids'])} sentences were longer than "
                          f"{max_length or self.max_seq_length} tokens and were truncated",
                          TruncationWarning, stacklevel=2)
        return batch

    @torch.no_grad()
    def encode(self, sentences: str | Sequence[str], batch_size: int = 32, *, prompt_name: str | None = None,
               prompt: str | None = None, show_progress_bar: bool | None = None,
               output_value: str | None = "sentence_embedding", precision: str = "float32",
               convert_to_numpy: bool | None = None, convert_to_tensor: bool | None = None, device=None,
               normalize_embeddings: bool = False, truncate_dim: int | None = None, pool=None,
               chunk_size: int | None = None, normalize: bool | None = None, progress: bool | None = None):
        """Embed sentences for inference, in input order; sentence-transformers' ``encode``.

        Takes ``SentenceTransformer.encode``'s arguments (``batch_size`` also second positionally,
        as in sentence-transformers 2). Differences, all fastcse's long-standing behaviour:

        - the default result is a float32 CPU tensor ``(n, embedding_dim)`` (sentence-transformers:
          a numpy array). ``convert_to_numpy=True`` gives the array, ``convert_to_tensor=True`` the
          tensor (on CPU), both ``False`` a list of 1-D tensors. One string in gives one vector.
        - ``normalize`` and ``progress`` are kept as aliases of ``normalize_embeddings`` and
          ``show_progress_bar`` (default: shown when logging is at INFO, as sentence-transformers).
        - ``pool`` (multi-process encoding) and a list of devices are not supported.

        ``prompt`` (or ``prompt_name``, a key of the source folder's ``prompts``; by default its
        ``default_prompt_name``) is prepended to every sentence. ``output_value="token_embeddings"``
        gives one ``(tokens, hidden)`` tensor per sentence (real tokens only). ``truncate_dim`` keeps
        the first dimensions (before normalising); ``precision`` other than ``float32`` goes through
        ``sentence_transformers.quantize_embeddings``.

        Evaluation mode and ``no_grad`` (the previous mode is restored); batches are formed from
        sentences sorted by length so that little padding is computed. ``device`` moves the encoder
        there first (default: where it is). An empty list gives a ``(0, embedding_dim)`` tensor.
        Sentences over ``max_seq_length`` tokens are truncated and counted in one
        :class:`TruncationWarning`.
        """
        if normalize is not None:
            normalize_embeddings = normalize_embeddings or normalize
        if progress is not None and show_progress_bar is None:
            show_progress_bar = progress
        if show_progress_bar is None:
            show_progress_bar = logging.getLogger("fastcse").getEffectiveLevel() <= logging.INFO
        if pool is not None or isinstance(device, (list, tuple)):
            raise ValueError("SentenceEncoder.encode runs in this process on one device: pool= and a list of "
                             "devices (multi-process encoding) are not supported")
        if output_value not in ("sentence_embedding", "token_embeddings"):
            raise ValueError(f"output_value={output_value!r} is not supported; use 'sentence_embedding' or "
                             f"'token_embeddings'")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        single = isinstance(sentences, str)
        if single:
            sentences = [sentences]
        sentences = list(sentences)
        bad = [i for i, s in enumerate(sentences) if not isinstance(s, str)]
        if bad:
            raise TypeError(f"sentences must be str; item {bad[0]} is {type(sentences[bad[0]]).__name__}")
        if prompt is None:
            prompt_name = prompt_name if prompt_name is not None else self.default_prompt_name
            if prompt_name is not None:
                if prompt_name not in self.prompts:
                    raise ValueError(f"prompt_name {prompt_name!r} is not one of this model's prompts "
                                     f"({', '.join(self.prompts) or 'none'})")
                prompt = self.prompts[prompt_name]
        if prompt:
            sentences = [prompt + s for s in sentences]
        tokens = output_value == "token_embeddings"
        if device is not None:
            self.to(device)
        param = next(self.parameters())
        device = param.device
        order = sorted(range(len(sentences)), key=lambda i: -len(sentences[i]))
        dim = self.embedding_dim if truncate_dim is None else min(int(truncate_dim), self.embedding_dim)
        out = torch.empty(len(sentences), dim, dtype=torch.float32)
        per_sentence: list = [None] * len(sentences)
        was_training = self.training
        self.eval()
        n_cut = 0
        try:
            starts = range(0, len(order), batch_size)
            if show_progress_bar and sentences:
                from tqdm.auto import tqdm

                starts = tqdm(starts, desc="encode", unit="batch")
            for start in starts:
                idx = order[start:start + batch_size]
                batch, cut = self._tokenize([sentences[i] for i in idx], None)
                n_cut += cut
                batch = {k: v.to(device) for k, v in batch.items()}
                if tokens:
                    hidden, _ = self.encode_tokens(**batch)
                    for row, i in enumerate(idx):
                        per_sentence[i] = hidden[row][batch["attention_mask"][row].bool()].float().cpu()
                    continue
                emb = self(**batch).float()[:, :dim]
                if normalize_embeddings:
                    emb = torch.nn.functional.normalize(emb, dim=-1)
                out[torch.tensor(idx)] = emb.cpu()
        finally:
            self.train(was_training)
        if n_cut:
            warnings.warn(f"{n_cut} of {len(sentences)} sentences were longer than {self.max_seq_length} tokens "
                          f"and were truncated", TruncationWarning, stacklevel=2)
        if tokens:
            if convert_to_numpy:
                per_sentence = [t.numpy() for t in per_sentence]
            return per_sentence[0] if single else per_sentence
        if precision != "float32":
            try:
                from sentence_transformers import quantize_embeddings
            except ImportError:
                raise ValueError(f"precision={precision!r} needs sentence-transformers (quantize_embeddings)") from None
            quantized = quantize_embeddings(out.numpy(), precision=precision)
            out = quantized if convert_to_numpy or not convert_to_tensor else torch.from_numpy(quantized)
            return out[0] if single else out
        if convert_to_tensor or (convert_to_tensor is None and convert_to_numpy is None):
            return out[0] if single else out
        if convert_to_numpy:
            return out[0].numpy() if single else out.numpy()
        rows = list(out)
        return rows[0] if single else rows

    def similarity(self, embeddings1, embeddings2) -> torch.Tensor:
        """``(n, m)`` similarities of two sets of embeddings by ``similarity_fn_name`` (sentence-
        transformers' functions: ``cosine``, ``dot``, ``euclidean`` and ``manhattan``, the last two
        as negative distances). Takes tensors, arrays or lists of vectors; one vector is one row."""
        a, b = _as_matrix(embeddings1), _as_matrix(embeddings2)
        name = self.similarity_fn_name
        if name == "cosine":
            return torch.nn.functional.normalize(a, dim=-1) @ torch.nn.functional.normalize(b, dim=-1).T
        if name == "dot":
            return a @ b.T
        return -torch.cdist(a, b, p=2.0 if name == "euclidean" else 1.0)

    def similarity_pairwise(self, embeddings1, embeddings2) -> torch.Tensor:
        """``(n,)`` similarities of row ``i`` with row ``i`` (same functions as :meth:`similarity`)."""
        a, b = _as_matrix(embeddings1), _as_matrix(embeddings2)
        if a.shape != b.shape:
            raise ValueError(f"similarity_pairwise needs two sets of the same shape, got {tuple(a.shape)} and "
                             f"{tuple(b.shape)}")
        name = self.similarity_fn_name
        if name == "cosine":
            return torch.nn.functional.cosine_similarity(a, b, dim=-1)
        if name == "dot":
            return (a * b).sum(-1)
        return -(a - b).norm(p=2.0 if name == "euclidean" else 1.0, dim=-1)

    def get_sentence_embedding_dimension(self) -> int:
        """``embedding_dim`` (sentence-transformers' name)."""
        return self.embedding_dim

    def extra_repr(self) -> str:
        return (f"pooling={self.pooling!r}, attn_backend={self.attn_backend!r}, "
                f"max_seq_length={self.max_seq_length}, embedding_dim={self.embedding_dim}, "
                f"normalize={self.normalize_output}, similarity_fn_name={self.similarity_fn_name!r}")


def _as_matrix(embeddings) -> torch.Tensor:
    if isinstance(embeddings, (list, tuple)):
        embeddings = torch.stack([torch.as_tensor(e) for e in embeddings]) if embeddings else torch.empty(0, 0)
    x = torch.as_tensor(embeddings)
    return (x.unsqueeze(0) if x.dim() == 1 else x).float()


def _load_tokenizer(path: str):
    from transformers import AutoTokenizer

    folder = Path(path)
    if folder.is_dir() and not has_tokenizer_files(folder):
        # transformers 5 would build an empty tokenizer from the config alone: better none at all
        return None
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError) as exc:
        logger.info("no tokenizer loaded from %s (%s)", path, exc)
        return None
