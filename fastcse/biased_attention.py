"""Attention with a relative-position bias (T5, DeBERTa): input checks, the eager reference, the
chunked twin and the dispatch.

The score of query ``i`` and key ``j`` (per batch ``b`` and head ``h``) is::

    s[i, j] = sm_scale * <q_i, k_j>
              + row_table[b, h, i, row_index[i - j + L - 1]]     (optional "row" term)
              + col_table[b, h, j, col_index[i - j + L - 1]]     (optional "column" term)

and ``j`` is dropped when ``key_padding_mask[b, j]`` is false (:func:`biased_attention`; T5's
bucket table is a ``(1, H, 1, 2L - 1)`` row). DeBERTa's disentangled attention
(:func:`disentangled_attention`) takes the relative embeddings themselves (``pos_key`` /
``pos_query``): its terms are ``c2p[i, j] = q_i . pos_key[c2p_index[i - j + L - 1]]`` and
``p2c[i, j] = k_j . pos_query[p2c_index[i - j + L - 1]]``, divided by HF's scale with the content
score. The eager tier materialises them as the tables ``Q K_r^T / scale`` and ``K Q_r^T / scale``;
the kernel never does.

Three tiers, every one forced by ``backend=``:

* ``triton``: :mod:`fastcse.kernels.biased_attention`, flash-style tiles with the bias gathered
  inside the tile (DeBERTa's position terms multiplied inside the tile from the relative
  embeddings), never the L x L matrix nor a seq x entries table; dropout from a Philox stream of
  ``seed``.
* ``chunked``: :func:`chunked_attention`, pure PyTorch with the kernel's memory shape (query
  chunks, recomputed in the backward); dropout from torch's generator.
* ``eager``: :func:`biased_attention_reference` / :func:`disentangled_attention_reference`, the
  materialised formula: the reference of the tests and the ``eager`` provider of the benchmarks.

This module imports no Triton: the kernel module is imported only when the triton tier runs, so
the chunked and eager tiers work where Triton is not installed.
"""

from __future__ import annotations

from typing import Literal

import torch

from fastcse.kernels._triton_utils import require_triton, triton_can_run

Backend = Literal["auto", "triton", "chunked", "eager"]
BACKENDS = ("auto", "triton", "chunked", "eager")
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# the PyTorch tiers also take fp64 (a float64 reference of the kernel is an eager call in fp64)
TWIN_DTYPES = TRITON_DTYPES + (torch.float64,)
_DTYPE_NAMES = {torch.float64: "fp64", torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


# --------------------------------------------------------------------------------------------
# input checks and backend choice
# --------------------------------------------------------------------------------------------


def _dtype_names(dtypes) -> str:
    return "/".join(_DTYPE_NAMES[d] for d in dtypes)


def check_inputs(q, k, v, row_table, row_index, col_table, col_index, key_padding_mask, *,
                 dtypes: tuple[torch.dtype, ...] = TRITON_DTYPES) -> None:
    """Shapes, dtypes and the pairing of tables with their indices (no device synchronisation, so
    it costs nothing under torch.compile); raises a ``ValueError`` naming the problem."""
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(
            "biased_attention: q, k, v must all be (batch, heads, seq, head_dim) with equal shapes, "
            f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.dtype not in dtypes or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"biased_attention: q, k, v must share a dtype among {_dtype_names(dtypes)}, got "
                         f"{q.dtype}, {k.dtype}, {v.dtype}")
    batch, heads, seqlen, _ = q.shape
    for name, table, index in (("row", row_table, row_index), ("col", col_table, col_index)):
        if (table is None) != (index is None):
            raise ValueError(f"biased_attention: {name}_table and {name}_index go together")
        if table is None:
            continue
        if table.dim() != 4 or table.size(0) not in (1, batch) or table.size(1) != heads \
                or table.size(2) not in (1, seqlen):
            raise ValueError(
                f"biased_attention: {name}_table must be (1 or batch, heads, 1 or seq, entries) = "
                f"(1|{batch}, {heads}, 1|{seqlen}, n), got {tuple(table.shape)}")
        if index.shape != (2 * seqlen - 1,) or index.dtype not in (torch.int32, torch.int64):
            raise ValueError(
                f"biased_attention: {name}_index must be an integer vector of length 2 * seq - 1 = "
                f"{2 * seqlen - 1} (entry per distance i - j + seq - 1), got {tuple(index.shape)} "
                f"{index.dtype}")
    if key_padding_mask is not None and key_padding_mask.shape != (batch, seqlen):
        raise ValueError(f"biased_attention: key_padding_mask must be (batch, seq) = ({batch}, {seqlen}), "
                         f"got {tuple(key_padding_mask.shape)}")


def _check_positions(q, pos_key, c2p_index, pos_query, p2c_index) -> None:
    """DeBERTa's relative embeddings and their per-distance indices."""
    _, heads, seqlen, head_dim = q.shape
    for name, pos, index in (("pos_key", pos_key, c2p_index), ("pos_query", pos_query, p2c_index)):
        if (pos is None) != (index is None):
            raise ValueError(f"disentangled_attention: {name} and its index go together")
        if pos is None:
            continue
        if pos.dim() != 3 or pos.size(0) != heads or pos.size(2) != head_dim or pos.dtype != q.dtype:
            raise ValueError(f"disentangled_attention: {name} must be (heads, entries, head_dim) = "
                             f"({heads}, n, {head_dim}) in {q.dtype}, got {tuple(pos.shape)} {pos.dtype}")
        if index.shape != (2 * seqlen - 1,) or index.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"disentangled_attention: the index of {name} must be an integer vector "
                             f"of length 2 * seq - 1 = {2 * seqlen - 1}, got {tuple(index.shape)}")


def _check_dropout(op: str, dropout_p: float) -> None:
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{op}: dropout_p must be in [0, 1), got {dropout_p}")


def resolve_backend(backend: str, q: torch.Tensor) -> str:
    """``auto``: the kernel wherever Triton can run on ``q`` (CUDA, or CPU under Triton's
    interpreter), the chunked twin otherwise. Forced names are checked.

    Unlike the loss, ``auto`` takes the interpreter on CPU: the patched T5 / DeBERTa modules have
    always run the kernel there, which is how CI exercises it through whole models.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if triton_can_run(q) else "chunked"
    if backend == "triton":
        require_triton(q)
    return backend


def _eager_keep_mask(q: torch.Tensor, dropout_p: float) -> torch.Tensor | None:
    """The eager tier's dropout keep-mask, from torch's generator (the kernels' Philox stream
    needs Triton; tests that compare against the kernel pass its mask to the reference)."""
    if dropout_p == 0.0:
        return None
    batch, heads, seqlen, _ = q.shape
    return torch.rand((batch, heads, seqlen, seqlen), device=q.device) >= dropout_p


# --------------------------------------------------------------------------------------------
# dispatch
# --------------------------------------------------------------------------------------------


def biased_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
    row_table: torch.Tensor | None = None, row_index: torch.Tensor | None = None,
    col_table: torch.Tensor | None = None, col_index: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    sm_scale: float = 1.0, dropout_p: float = 0.0, seed: torch.Tensor | None = None,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Softmax attention with a relative-position bias (fused: never materialises seq x seq).

    Args:
        q, k, v: (batch, heads, seq, head_dim), fp32 / fp16 / bf16 (fp32 accumulation); fp64 on
            the chunked and eager tiers.
        row_table, row_index: bias ``row_table[b, h, i, row_index[i - j + seq - 1]]``; table
            (1 or batch, heads, 1 or seq, entries), index int (2 seq - 1,). Differentiable table.
        col_table, col_index: bias ``col_table[b, h, j, col_index[i - j + seq - 1]]``; same shapes.
        key_padding_mask: (batch, seq) bool, True = the key can be attended to.
        sm_scale: multiplies ``q . k`` (T5: 1; DeBERTa: 1 / sqrt(head_dim * scale_factor)).
        dropout_p: dropout on the probabilities (pass 0 in evaluation mode). On the triton tier
            the mask is Philox noise of ``seed`` (int64 tensor of shape (1,), drawn from torch's
            generator if None), regenerated in the backward, see
            :func:`fastcse.kernels.biased_attention.dropout_keep_mask`; the chunked and eager
            tiers draw from torch's generator and ignore ``seed``.
        backend: ``"auto"`` (see :func:`resolve_backend`), ``"triton"``, ``"chunked"``, ``"eager"``.

    Returns:
        (batch, heads, seq, head_dim); on the triton tier laid out as (batch, seq, heads,
        head_dim) in memory. A query row with no valid key returns zeros.
    """
    resolved = resolve_backend(backend, q)
    check_inputs(q, k, v, row_table, row_index, col_table, col_index, key_padding_mask,
                 dtypes=TRITON_DTYPES if resolved == "triton" else TWIN_DTYPES)
    _check_dropout("biased_attention", dropout_p)
    tables = dict(row_table=row_table, row_index=row_index, col_table=col_table, col_index=col_index,
                  key_padding_mask=key_padding_mask, sm_scale=sm_scale, dropout_p=dropout_p)
    if resolved == "triton":
        from fastcse.kernels.biased_attention import biased_attention_triton

        return biased_attention_triton(q, k, v, **tables, seed=seed)
    if resolved == "chunked":
        return chunked_attention(q, k, v, **tables)
    return biased_attention_reference(q, k, v, **tables, dropout_mask=_eager_keep_mask(q, dropout_p))


def disentangled_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
    pos_key: torch.Tensor | None = None, c2p_index: torch.Tensor | None = None,
    pos_query: torch.Tensor | None = None, p2c_index: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None, scale: float = 1.0,
    dropout_p: float = 0.0, seed: torch.Tensor | None = None,
    backend: Backend = "auto",
) -> torch.Tensor:
    """DeBERTa's disentangled attention, with HF's arithmetic::

        s[i, j] = (q_i . k_j + q_i . pos_key[c2p_index[i - j + L - 1]]
                   + k_j . pos_query[p2c_index[i - j + L - 1]]) / scale

    On the triton tier no c2p / p2c table (``Q K_r^T``, ``K Q_r^T``: seq x entries per sequence
    and head) exists: each tile multiplies its queries / keys with the relative embeddings its
    distances reach and picks the score's diagonal, and the backward (one fused pass) keeps the
    embeddings' gradients per distance, then adds the distances that share an embedding. No
    seq x seq or seq x entries tensor is kept for the backward. The chunked tier builds the
    tables per query chunk (rebuilt in its backward); the eager tier whole.

    Args:
        q, k, v: (batch, heads, seq, head_dim).
        pos_key, pos_query: (heads, entries, head_dim), HF's ``pos_key_layer`` / ``pos_query_layer``
            (relative embeddings through the key / query projection); either may be None.
        c2p_index, p2c_index: int (2 seq - 1,) table columns per distance ``i - j``.
        key_padding_mask, dropout_p, seed, backend: as :func:`biased_attention`.
        scale: HF's ``sqrt(head_dim * scale_factor)`` (in the activation dtype).
    """
    resolved = resolve_backend(backend, q)
    check_inputs(q, k, v, None, None, None, None, key_padding_mask,
                 dtypes=TRITON_DTYPES if resolved == "triton" else TWIN_DTYPES)
    _check_positions(q, pos_key, c2p_index, pos_query, p2c_index)
    _check_dropout("disentangled_attention", dropout_p)
    rel = dict(pos_key=pos_key, c2p_index=c2p_index, pos_query=pos_query, p2c_index=p2c_index,
               key_padding_mask=key_padding_mask, scale=scale, dropout_p=dropout_p)
    if resolved == "triton":
        from fastcse.kernels.biased_attention import disentangled_attention_triton

        return disentangled_attention_triton(q, k, v, **rel, seed=seed)
    if resolved == "chunked":
        return chunked_attention(q, k, v, **rel)
    return disentangled_attention_reference(q, k, v, **rel, dropout_mask=_eager_keep_mask(q, dropout_p))


# --------------------------------------------------------------------------------------------
# eager tier: the references
# --------------------------------------------------------------------------------------------


def biased_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
    row_table: torch.Tensor | None = None, row_index: torch.Tensor | None = None,
    col_table: torch.Tensor | None = None, col_index: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    sm_scale: float = 1.0, dropout_p: float = 0.0, dropout_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The eager reference of :func:`biased_attention`: the (batch, heads, seq, seq) scores
    materialised.

    Computes in the dtype of its inputs (pass float64 tensors for a reference). ``dropout_mask``
    is a (batch, heads, seq, seq) keep-mask, e.g.
    :func:`fastcse.kernels.biased_attention.dropout_keep_mask` of the kernel's seed.
    """
    batch, heads, seqlen, _ = q.shape
    pos = torch.arange(seqlen, device=q.device)
    dist = pos[:, None] - pos[None, :] + seqlen - 1  # [i, j] -> i - j + seq - 1
    scores = torch.matmul(q, k.transpose(-1, -2)) * sm_scale
    if row_table is not None:
        table = row_table.to(scores.dtype).expand(batch, heads, seqlen, row_table.size(-1))
        index = row_index.long()[dist].expand(batch, heads, seqlen, seqlen)
        scores = scores + torch.gather(table, -1, index)
    if col_table is not None:
        table = col_table.to(scores.dtype).expand(batch, heads, seqlen, col_table.size(-1))
        index = col_index.long()[dist].t().expand(batch, heads, seqlen, seqlen)  # [j, i]
        scores = scores + torch.gather(table, -1, index).transpose(-1, -2)
    if key_padding_mask is not None:
        scores = scores.masked_fill(~key_padding_mask.bool()[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    probs = torch.nan_to_num(probs, nan=0.0)  # rows with no valid key: zeros, as the kernel
    if dropout_mask is not None and dropout_p > 0.0:
        probs = probs * dropout_mask.to(probs.dtype) / (1.0 - dropout_p)
    return torch.matmul(probs, v)



def disentangled_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
    pos_key: torch.Tensor | None = None, c2p_index: torch.Tensor | None = None,
    pos_query: torch.Tensor | None = None, p2c_index: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None, scale: float = 1.0,
    dropout_p: float = 0.0, dropout_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The eager reference of :func:`disentangled_attention` (tables and scores materialised)."""
    row_table = None if pos_key is None else torch.matmul(q, pos_key.transpose(-1, -2)) / scale
    col_table = None if pos_query is None else torch.matmul(k, pos_query.transpose(-1, -2)) / scale
    return biased_attention_reference(
        q, k, v, row_table=row_table, row_index=c2p_index, col_table=col_table, col_index=p2c_index,
        key_padding_mask=key_padding_mask, sm_scale=1.0 / scale, dropout_p=dropout_p,
        dropout_mask=dropout_mask)


# --------------------------------------------------------------------------------------------
# chunked tier (pure PyTorch, the kernel's memory shape)
# --------------------------------------------------------------------------------------------


def _chunk_attention(q_rows, k, v, rows, row_table, row_index, col_table, col_index, pos_key,
                     pos_query, key_padding_mask, sm_scale, table_scale, dropout_p):
    """Attention of the query positions ``rows`` (one chunk) against all keys, materialised."""
    batch, heads, seqlen = k.shape[:3]
    if pos_key is not None:  # DeBERTa: this chunk's c2p rows, built here so they are not saved
        row_table = torch.matmul(q_rows, pos_key.transpose(-1, -2)) / table_scale
    elif row_table is not None and row_table.size(2) != 1:
        row_table = row_table[:, :, rows]
    if pos_query is not None:  # ... and all p2c rows
        col_table = torch.matmul(k, pos_query.transpose(-1, -2)) / table_scale
    pos = torch.arange(seqlen, device=k.device)
    dist = rows[:, None] - pos[None, :] + seqlen - 1  # [i, j] -> i - j + seq - 1
    scores = torch.matmul(q_rows, k.transpose(-1, -2)) * sm_scale
    if row_table is not None:
        table = row_table.to(scores.dtype).expand(batch, heads, rows.numel(), row_table.size(-1))
        scores = scores + torch.gather(table, -1, row_index.long()[dist].expand(batch, heads, -1, -1))
    if col_table is not None:
        table = col_table.to(scores.dtype).expand(batch, heads, seqlen, col_table.size(-1))
        index = col_index.long()[dist].t().expand(batch, heads, -1, -1)  # [j, i]
        scores = scores + torch.gather(table, -1, index).transpose(-1, -2)
    if key_padding_mask is not None:
        scores = scores.masked_fill(~key_padding_mask.bool()[:, None, None, :], float("-inf"))
    probs = torch.nan_to_num(torch.softmax(scores, dim=-1), nan=0.0)  # rows with no valid key: 0
    if dropout_p > 0.0:
        probs = torch.nn.functional.dropout(probs, p=dropout_p, training=True)
    return torch.matmul(probs, v)


def chunked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
    row_table: torch.Tensor | None = None, row_index: torch.Tensor | None = None,
    col_table: torch.Tensor | None = None, col_index: torch.Tensor | None = None,
    pos_key: torch.Tensor | None = None, c2p_index: torch.Tensor | None = None,
    pos_query: torch.Tensor | None = None, p2c_index: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None, sm_scale: float = 1.0, scale: float = 1.0,
    dropout_p: float = 0.0, chunk_size: int = 128,
) -> torch.Tensor:
    """Pure PyTorch twin of :func:`biased_attention` / :func:`disentangled_attention` with the
    kernel's memory shape: query rows in chunks of ``chunk_size``, each chunk recomputed in the
    backward (activation checkpointing), so only (batch, heads, chunk, seq) scores are ever alive.
    The CPU path when Triton's interpreter is off. Takes either the generic tables
    (``row_table`` ...) with ``sm_scale``, or DeBERTa's ``pos_key`` / ``pos_query`` with ``scale``
    (content scores and tables divided by it, as :func:`disentangled_attention`).
    Dropout: ``torch.nn.functional.dropout`` on the probabilities (torch's RNG, which the
    checkpoint replays in the backward), not the kernels' Philox stream.
    """
    from torch.utils.checkpoint import checkpoint

    if pos_key is not None or pos_query is not None:
        row_index, col_index, sm_scale = c2p_index, p2c_index, 1.0 / scale
    seqlen = q.size(-2)
    outs = []
    for start in range(0, seqlen, chunk_size):
        rows = torch.arange(start, min(seqlen, start + chunk_size), device=q.device)
        args = (q[:, :, start:start + chunk_size], k, v, rows, row_table, row_index, col_table, col_index,
                pos_key, pos_query, key_padding_mask, sm_scale, scale, dropout_p)
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                           for t in (q, k, v, row_table, col_table, pos_key, pos_query)):
            outs.append(checkpoint(_chunk_attention, *args, use_reentrant=False))
        else:
            outs.append(_chunk_attention(*args))
    return torch.cat(outs, dim=2)
