"""Geometry of an embedding space: alignment, uniformity (Wang & Isola 2020), isotropy.

As in the SimCSE paper's analysis: positive pairs are the STS-B pairs with a gold score >= 4,
uniformity runs over all (distinct) STS-B sentences of the split, embeddings are L2-normalised.

- alignment  = E_(x, x+) ||f(x) - f(x+)||^2          (lower: positives closer)
- uniformity = log E_(x, y) exp(-2 ||f(x) - f(y)||^2)  over all pairs x != y (lower: more uniform)
- isotropy   = min_c Z(c) / max_c Z(c), Z(c) = sum_i exp(c . f(x_i)), c over the eigenvectors of
  W^T W of the normalised embeddings W and their negations (Mu & Viswanath 2018); 1 is perfectly
  isotropic, near 0 means the embeddings crowd into a narrow cone.
- mean_cosine = the average cosine over all pairs of distinct sentences (Ethayarajh 2019's
  anisotropy baseline): near 0 for isotropic spaces.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .sts import EmbeddingCache, load_stsb

POSITIVE_THRESHOLD = 4.0


def _unit(x: torch.Tensor) -> torch.Tensor:
    if x.dim() != 2:
        raise ValueError(f"embeddings must be (n, dim), got shape {tuple(x.shape)}")
    return F.normalize(x.double(), dim=-1)


def alignment(x: torch.Tensor, y: torch.Tensor, alpha: float = 2.0) -> float:
    """Mean ``||x_i - y_i||^alpha`` of the normalised rows of two ``(n, dim)`` matrices (pairs i)."""
    if x.shape != y.shape:
        raise ValueError(f"alignment: shapes {tuple(x.shape)} and {tuple(y.shape)} differ")
    if x.shape[0] == 0:
        raise ValueError("alignment needs at least one positive pair")
    return float((_unit(x) - _unit(y)).norm(dim=-1).pow(alpha).mean())


def uniformity(x: torch.Tensor, t: float = 2.0, chunk: int = 512) -> float:
    """``log mean_{i<j} exp(-t ||x_i - x_j||^2)`` over the normalised rows of ``x`` ``(n, dim)``.

    Computed in float64 over row chunks (``||a - b||^2 = 2 - 2 a.b`` for unit vectors) so that
    ``n`` in the tens of thousands needs ``chunk * n`` memory, not ``n^2``.
    """
    u = _unit(x)
    n = u.shape[0]
    if n < 2:
        raise ValueError("uniformity needs at least 2 embeddings")
    parts = []
    for start in range(0, n - 1, chunk):
        block = u[start:start + chunk]
        sq = (2.0 - 2.0 * block @ u.T).clamp_min(0.0)
        rows = torch.arange(start, start + block.shape[0]).unsqueeze(1)
        upper = torch.arange(n).unsqueeze(0) > rows  # each unordered pair once
        parts.append(torch.logsumexp((-t * sq)[upper], dim=0))
    total = torch.logsumexp(torch.stack(parts), dim=0)
    return float(total - math.log(n * (n - 1) / 2))


def isotropy(x: torch.Tensor) -> float:
    """Mu & Viswanath's ``I(W) = min_c Z(c) / max_c Z(c)`` on the normalised rows of ``x``.

    ``c`` ranges over the eigenvectors of ``W^T W`` and their negations (an eigenvector's sign is
    arbitrary); computed with log-sum-exp.
    """
    w = _unit(x)
    if w.shape[0] < 2:
        raise ValueError("isotropy needs at least 2 embeddings")
    _, vectors = torch.linalg.eigh(w.T @ w)
    directions = torch.cat([vectors.T, -vectors.T])  # (2 dim, dim)
    log_z = torch.logsumexp(directions @ w.T, dim=1)
    return float(torch.exp(log_z.min() - log_z.max()))


def mean_cosine(x: torch.Tensor) -> float:
    """Average cosine similarity over all pairs i != j: ``(||sum u||^2 - n) / (n (n - 1))``."""
    u = _unit(x)
    n = u.shape[0]
    if n < 2:
        raise ValueError("mean_cosine needs at least 2 embeddings")
    return float((u.sum(0).pow(2).sum() - n) / (n * (n - 1)))


@dataclass
class Geometry:
    """Measures of one model on one STS-B split (see the module docstring)."""

    alignment: float
    uniformity: float
    isotropy: float
    mean_cosine: float
    positive_pairs: int
    sentences: int
    split: str

    def to_dict(self) -> dict:
        """JSON-ready: a non-finite measure (degenerate embeddings) becomes None."""
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(self).items()}


def evaluate_geometry(encoder, *, split: str = "test", threshold: float = POSITIVE_THRESHOLD, batch_size: int = 128,
                      progress: bool = True, max_seq_length: int | None = None,
                      cache: EmbeddingCache | None = None) -> Geometry:
    """Alignment on STS-B pairs scored >= ``threshold``, uniformity / isotropy / mean cosine over
    all distinct STS-B sentences of ``split`` (bundled dev or test)."""
    data = load_stsb(split)
    embed = cache if cache is not None else EmbeddingCache(encoder, batch_size=batch_size, progress=progress,
                                                           max_seq_length=max_seq_length)
    keep = np.flatnonzero(data.scores >= threshold)
    if keep.size == 0:
        raise ValueError(f"no STS-B {split} pair is scored >= {threshold}")
    sentences = list(dict.fromkeys(data.sentences1 + data.sentences2))
    emb = embed(sentences)
    index = {s: i for i, s in enumerate(sentences)}
    left = emb[[index[data.sentences1[i]] for i in keep]]
    right = emb[[index[data.sentences2[i]] for i in keep]]
    return Geometry(alignment=alignment(left, right), uniformity=uniformity(emb), isotropy=isotropy(emb),
                    mean_cosine=mean_cosine(emb), positive_pairs=int(keep.size), sentences=len(sentences),
                    split=split)


def plot_alignment_uniformity(points: Mapping[str, Geometry] | Sequence[tuple[str, Geometry]], path,
                              *, title: str | None = None) -> Path:
    """Draw the SimCSE paper's alignment (y) vs uniformity (x) plot, one labelled point per model,
    into a PNG at ``path``. Lower-left is better on both axes. Needs matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError("--plot needs matplotlib: pip install 'fastcse[plot]'") from exc

    items = list(points.items()) if isinstance(points, Mapping) else list(points)
    if not items:
        raise ValueError("plot_alignment_uniformity needs at least one model")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(5.0, 4.0), dpi=150)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    xs = [g.uniformity for _, g in items]
    ys = [g.alignment for _, g in items]
    colors = [f"C{i % 10}" for i in range(len(items))]
    ax.scatter(xs, ys, c=colors, s=60, zorder=3)
    for (label, g), color in zip(items, colors):
        ax.annotate(label, (g.uniformity, g.alignment), textcoords="offset points", xytext=(6, 6), fontsize=8,
                    color=color)
    ax.set_xlabel(r"$\ell_{\mathrm{uniform}}$ (lower is better)")
    ax.set_ylabel(r"$\ell_{\mathrm{align}}$ (lower is better)")
    ax.set_title(title or f"alignment vs uniformity (STS-B {items[0][1].split})")
    ax.grid(True, alpha=0.3)
    # pad the limits so a single point or labels near the edge stay readable
    for lo, hi, setter in ((min(xs), max(xs), ax.set_xlim), (min(ys), max(ys), ax.set_ylim)):
        pad = max(0.1 * (hi - lo), 0.05 * max(abs(lo), abs(hi)), 1e-3)
        setter(lo - pad, hi + pad)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path
