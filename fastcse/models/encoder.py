"""SentenceEncoder: a Hugging Face backbone + a pooler + an attention backend."""

from __future__ import annotations

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
from .folders import (POOLER_WEIGHTS, check_sentence_transformers_modules, folder_kind, has_tokenizer_files,
                      model_max_length, read_encoder_meta, write_encoder_meta)
from .poolers import POOLINGS, build_pooler
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


def _backbone_kwargs(cls) -> dict:
    # BERT-family classes build a tanh pooler on CLS that fastcse never uses: leave it out
    return {"add_pooling_layer": False} if "add_pooling_layer" in inspect.signature(cls.__init__).parameters else {}


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
                 max_seq_length: int = 32, mlp_only_train: bool = True):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; valid poolings: {', '.join(POOLINGS)}")
        config = backbone.config
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.mlp_only_train = mlp_only_train
        self.max_seq_length = int(max_seq_length)
        self.embedding_dim = int(config.hidden_size)
        self.pooler = build_pooler(pooling, self.embedding_dim, mlp_only_train=mlp_only_train,
                                   initializer_range=getattr(config, "initializer_range", 0.02))
        param = next(backbone.parameters(), None)
        if param is not None:
            self.pooler.to(device=param.device, dtype=param.dtype)
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
               dtype=None, max_seq_length=32, mlp_only_train=True) -> "SentenceEncoder":
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
        kwargs = dict(_backbone_kwargs(model_cls), attn_implementation=attn.hf_attn_implementation(backend, supports_sdpa))
        if dtype is not None:
            kwargs["dtype"] = dtype
        if weights_path is None:
            backbone = model_cls._from_config(copy.deepcopy(config), **kwargs)
        else:
            backbone = model_cls.from_pretrained(weights_path, config=config, **kwargs)
        if backend in ("biased", "rotary"):
            count = attn.apply_patch(backbone, backend)
            logger.info("attn_backend=%s: patched %d modules of %s", backend, count, type(backbone).__name__)
        encoder = cls(backbone, tokenizer=tokenizer, pooling=pooling, attn_backend=backend,
                      max_seq_length=max_seq_length, mlp_only_train=mlp_only_train)
        return encoder

    @classmethod
    def from_config(cls, config, *, tokenizer=None, pooling: str = "cls", attn_backend: str = "auto", dtype=None,
                    max_seq_length: int = 32, mlp_only_train: bool = True) -> "SentenceEncoder":
        """A randomly initialised encoder for a HF ``PretrainedConfig`` (the config is copied).

        ``mlp_only_train`` (fastcse addition) applies to ``pooling="cls_mlp"`` only.
        """
        return cls._build(config, tokenizer=tokenizer, pooling=pooling, attn_backend=attn_backend, dtype=dtype,
                          max_seq_length=max_seq_length, mlp_only_train=mlp_only_train)

    @classmethod
    def from_pretrained(cls, name_or_path, *, pooling: str | None = None, attn_backend: str = "auto", dtype=None,
                        max_seq_length: int | None = None, tokenizer=None,
                        mlp_only_train: bool | None = None) -> "SentenceEncoder":
        """Load an encoder from a folder (or a HF hub name, which needs the network).

        Folder kinds:
        - written by :meth:`save`: the metadata file (:data:`~fastcse.models.folders.ENCODER_META_FILE`)
          gives pooling, ``mlp_only_train`` and ``max_seq_length``; the ``cls_mlp`` weights come from
          ``pooler.safetensors``. The saved ``attn_backend`` is informational: ``attn_backend`` here
          (default ``auto``) decides, since the right backend depends on the machine.
        - sentence-transformers (``modules.json``): the Transformer module's folder is the
          backbone, ``1_Pooling/config.json`` the pooling (``cls`` or ``mean``; others are refused),
          ``sentence_bert_config.json`` the ``max_seq_length``. A Normalize module is not part of
          the encoder: call ``encode(..., normalize=True)``.
        - a plain Hugging Face model: pooling ``cls`` (``mean`` for T5, as Sentence-T5) unless given;
          ``max_seq_length`` from the tokenizer / position embeddings, at most 512.

        Explicit arguments override what the folder says. ``tokenizer`` defaults to the folder's
        (None when it has no tokenizer files); a path or name loads that tokenizer instead.
        ``dtype``: a ``torch.dtype``, its name, or ``"auto"`` (the checkpoint's dtype); None: float32.
        """
        from transformers import AutoConfig

        path = Path(str(name_or_path))
        saved: dict = {}
        backbone_path = str(name_or_path)
        folder_pooling = folder_max_len = None
        # a Hugging Face folder or a hub name (kind None) goes to Hugging Face as it is
        kind = folder_kind(path)
        if kind == "fastcse":
            saved = read_encoder_meta(path)
            folder_pooling, folder_max_len = saved.get("pooling"), saved.get("max_seq_length")
        elif kind == "sentence-transformers":
            backbone_path, folder_pooling, folder_max_len = _read_sentence_transformers(path)
        config = AutoConfig.from_pretrained(backbone_path)
        if pooling is None:
            pooling = folder_pooling or ("mean" if config.model_type in T5_MODEL_TYPES else "cls")
        if mlp_only_train is None:
            mlp_only_train = bool(saved.get("mlp_only_train", True))
        if tokenizer is None:
            tokenizer = _load_tokenizer(backbone_path)
        elif isinstance(tokenizer, (str, Path)):
            tokenizer = _load_tokenizer(str(tokenizer))
        if max_seq_length is None:
            max_seq_length = folder_max_len or model_max_length(config, tokenizer)
        encoder = cls._build(config, weights_path=backbone_path, tokenizer=tokenizer, pooling=pooling,
                             attn_backend=attn_backend, dtype=dtype, max_seq_length=max_seq_length,
                             mlp_only_train=mlp_only_train)
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
        """Write a folder that :meth:`from_pretrained` reads back.

        Contents: the HF backbone (``config.json``, ``model.safetensors``), the tokenizer files,
        :data:`~fastcse.models.folders.ENCODER_META_FILE` ({pooling, mlp_only_train, max_seq_length,
        attn_backend}) and ``pooler.safetensors`` when the pooler has parameters (``cls_mlp``).
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.backbone.save_pretrained(str(path))
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(str(path))
        write_encoder_meta(path, self)

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
        """Last hidden states and pooled embeddings (fastcse addition, for tests and analysis).

        Returns ``(hidden, pooled)``: ``hidden`` ``(batch, seqlen, hidden)`` (the varlen backend
        gives zeros at padded positions, the padded backends whatever HF computes there) and
        ``pooled`` ``(batch, embedding_dim)``.
        """
        if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
            raise ValueError(f"input_ids and attention_mask must both be (batch, seqlen); got "
                             f"{tuple(input_ids.shape)} and {tuple(attention_mask.shape)}")
        if not self._takes_token_type_ids:
            token_type_ids = None  # T5 / ModernBERT have no segment embeddings
        if self.attn_backend == "varlen":
            packed_hidden, packed = self._varlen(input_ids, attention_mask, token_type_ids)
            return unpack(packed_hidden, packed), self.pooler.forward_packed(packed_hidden, packed)
        kwargs = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        return hidden, self.pooler(hidden, attention_mask)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Pooled embeddings ``(batch, embedding_dim)`` of a padded ``(batch, seqlen)`` batch.

        ``token_type_ids`` is ignored by models without segment embeddings (T5, ModernBERT).
        """
        if self.attn_backend == "varlen":
            if not self._takes_token_type_ids:
                token_type_ids = None
            packed_hidden, packed = self._varlen(input_ids, attention_mask, token_type_ids)
            return self.pooler.forward_packed(packed_hidden, packed)
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
    def encode(self, sentences: Sequence[str], *, batch_size: int = 64, normalize: bool = False, progress: bool = True,
               device=None) -> torch.Tensor:
        """Embed sentences for inference: ``(n, embedding_dim)`` float32 on CPU, in input order.

        Evaluation mode and ``no_grad`` (the previous mode is restored); batches are formed from
        sentences sorted by length so that little padding is computed. ``device`` moves the encoder
        there first (default: where it is). ``normalize`` L2-normalises each row. An empty list
        gives a ``(0, embedding_dim)`` tensor; one string is treated as a list of one. Sentences
        over ``max_seq_length`` tokens are truncated and counted in one :class:`TruncationWarning`.
        """
        if isinstance(sentences, str):
            sentences = [sentences]
        sentences = list(sentences)
        bad = [i for i, s in enumerate(sentences) if not isinstance(s, str)]
        if bad:
            raise TypeError(f"sentences must be str; item {bad[0]} is {type(sentences[bad[0]]).__name__}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not sentences:
            return torch.empty(0, self.embedding_dim, dtype=torch.float32)
        if device is not None:
            self.to(device)
        param = next(self.parameters())
        device = param.device
        order = sorted(range(len(sentences)), key=lambda i: -len(sentences[i]))
        out = torch.empty(len(sentences), self.embedding_dim, dtype=torch.float32)
        was_training = self.training
        self.eval()
        n_cut = 0
        try:
            starts = range(0, len(order), batch_size)
            if progress:
                from tqdm.auto import tqdm

                starts = tqdm(starts, desc="encode", unit="batch")
            for start in starts:
                idx = order[start:start + batch_size]
                batch, cut = self._tokenize([sentences[i] for i in idx], None)
                n_cut += cut
                batch = {k: v.to(device) for k, v in batch.items()}
                emb = self(**batch).float()
                if normalize:
                    emb = torch.nn.functional.normalize(emb, dim=-1)
                out[torch.tensor(idx)] = emb.cpu()
        finally:
            self.train(was_training)
        if n_cut:
            warnings.warn(f"{n_cut} of {len(sentences)} sentences were longer than {self.max_seq_length} tokens "
                          f"and were truncated", TruncationWarning, stacklevel=2)
        return out

    def extra_repr(self) -> str:
        return (f"pooling={self.pooling!r}, attn_backend={self.attn_backend!r}, "
                f"max_seq_length={self.max_seq_length}, embedding_dim={self.embedding_dim}")


# sentence-transformers < 6 wrote one boolean per pooling mode; >= 6 writes {"pooling_mode": ...}
_ST_LEGACY_POOLING = {"pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max",
                      "pooling_mode_mean_tokens": "mean", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
                      "pooling_mode_weightedmean_tokens": "weightedmean", "pooling_mode_lasttoken": "lasttoken"}


def _st_pooling(cfg: dict, folder: Path) -> str:
    modes = cfg.get("pooling_mode")
    if modes is None:
        modes = [mode for key, mode in _ST_LEGACY_POOLING.items() if cfg.get(key)]
    modes = [modes] if isinstance(modes, str) else list(modes)
    if modes == ["mean"] or modes == ["cls"]:
        return modes[0]
    raise ValueError(f"{folder}: pooling {modes} is not supported; fastcse supports cls or mean")


def _read_sentence_transformers(path: Path):
    """(backbone folder, pooling, max_seq_length or None) of a sentence-transformers folder.

    Reads both layouts: sentence-transformers < 6 (``pooling_mode_*_tokens`` booleans,
    ``max_seq_length`` in ``sentence_bert_config.json``) and >= 6 (``pooling_mode``; the length is
    the tokenizer's ``model_max_length``). Modules other than Transformer, Pooling and Normalize
    (Dense, ...) would change the embedding, so such folders are refused
    (:func:`~fastcse.models.folders.check_sentence_transformers_modules`).
    """
    backbone = pooling = max_len = None
    for module in check_sentence_transformers_modules(path):
        folder = path / module.get("path", "")
        if module["kind"] == "Transformer":
            backbone = folder
            cfg_file = folder / "sentence_bert_config.json"
            if cfg_file.is_file():
                max_len = json.loads(cfg_file.read_text()).get("max_seq_length")
        elif module["kind"] == "Pooling":
            pooling = _st_pooling(json.loads((folder / "config.json").read_text()), folder)
    if backbone is None:
        raise ValueError(f"{path}/modules.json lists no Transformer module")
    return str(backbone), pooling, max_len


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
