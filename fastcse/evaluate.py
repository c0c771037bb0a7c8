"""Evaluate sentence encoders as the SimCSE paper does: ``python -m fastcse.evaluate``.

    python -m fastcse.evaluate --model runs/fastcse/best                      # STS-B test (bundled)
    python -m fastcse.evaluate --model M --senteval-dir SentEval/data/downstream   # all 7 tasks
    python -m fastcse.evaluate --model A B --tasks stsb sickr --sick-path data/sick --geometry \\
        --plot align_uniform.png --output results.json

Prints a table like the paper's (one row per model, Spearman x100 per task and the average) and,
with ``--geometry`` or ``--plot``, alignment / uniformity / isotropy on STS-B. ``--output`` writes
everything as JSON. Models are folders of any kind :mod:`fastcse.evaluation.loading` reads.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path

from fastcse.evaluation.sts import SPLITS, TASK_TITLES, TASKS, normalize_task

POOLINGS = ("cls", "cls_mlp", "mean", "first")


def _parse_tasks(values: list[str] | None) -> list[str] | None:
    if values is None:
        return None
    names = [name for value in values for name in value.replace(",", " ").split()]
    return list(dict.fromkeys(normalize_task(name) for name in names))


def _fmt(value, digits: int = 2) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def format_table(rows: list[dict], tasks: list[str]) -> str:
    """The paper-style table: one row per model, a column per task, then ``Avg.``."""
    header = ["Model"] + [TASK_TITLES[t] for t in tasks] + ["Avg."]
    body = []
    for row in rows:
        scores = row["sts"]["tasks"]
        body.append([row["label"]] + [_fmt(scores[t]["spearman"]) if t in scores else "-" for t in tasks]
                    + [_fmt(row["sts"]["average"])])
    return _grid(header, body)


def format_geometry(rows: list[dict]) -> str:
    header = ["Model", "align", "uniform", "isotropy", "mean cos", "pos. pairs", "sentences"]
    body = [[r["label"]] + [_fmt(g[k], 4) for k in ("alignment", "uniformity", "isotropy", "mean_cosine")]
            + [str(g["positive_pairs"]), str(g["sentences"])]
            for r in rows if (g := r.get("geometry"))]
    return _grid(header, body)


def _grid(header: list[str], body: list[list[str]]) -> str:
    widths = [max(len(str(line[i])) for line in [header] + body) for i in range(len(header))]

    def line(cells):
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    rule = "-" * len(line(header))
    return "\n".join([rule, line(header), rule] + [line(r) for r in body] + [rule])


def _labels(models: list[str], labels: list[str] | None) -> list[str]:
    if labels is not None:
        return labels
    names = [Path(m).expanduser().resolve().name or m for m in models]
    if len(set(names)) == len(names):
        return names
    return [str(Path(m)) for m in models]  # the same folder name twice: show the paths


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fastcse.evaluate",
        description="STS evaluation as in SimCSE (Spearman x100 of cosine similarity vs gold: STS12-16 pooled over "
                    "subsets, STS-B, SICK-R), alignment / uniformity / isotropy on STS-B.")
    parser.add_argument("--model", required=True, nargs="+", metavar="PATH",
                        help="one or more model folders: fastcse checkpoint, sentence-transformers or Hugging Face")
    parser.add_argument("--label", nargs="+", metavar="NAME", help="a name per model for the table and the plot")
    parser.add_argument("--tasks", nargs="+", metavar="TASK",
                        help=f"tasks to run ({', '.join(TASKS)}); default: stsb, plus sickr with SICK data and "
                             f"sts12-16 with --senteval-dir")
    parser.add_argument("--split", choices=SPLITS[:2], default="test",
                        help="test (the paper's figures, default) or dev (stsb and sickr)")
    parser.add_argument("--senteval-dir", metavar="DIR",
                        help="SentEval's data/downstream folder (or its STS subfolder): STS12-16 and SICK")
    parser.add_argument("--sick-path", metavar="PATH",
                        help="SICK file, or the folder holding SICK_test_annotated.txt / SICK_trial.txt")
    parser.add_argument("--pooling", choices=POOLINGS, help="override the pooling the model folder records")
    parser.add_argument("--attn-backend", default="auto", help="encoder attention backend (default auto)")
    parser.add_argument("--dtype", default=None, help="load the weights in this dtype (e.g. bfloat16)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument("--batch-size", type=int, default=128, help="sentences per encoding batch (default 128)")
    parser.add_argument("--max-seq-length", type=int, default=None,
                        help="tokens read per sentence (default: the model's limit; SimCSE does not truncate)")
    parser.add_argument("--geometry", action="store_true",
                        help="also measure alignment, uniformity, isotropy on STS-B (--split)")
    parser.add_argument("--plot", metavar="PNG", help="draw the alignment/uniformity plot of the models (implies "
                                                      "--geometry)")
    parser.add_argument("--output", metavar="JSON", help="write the results as JSON")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        tasks = _parse_tasks(args.tasks)
    except ValueError as exc:
        parser.error(str(exc))
    if args.label is not None and len(args.label) != len(args.model):
        parser.error(f"--label gives {len(args.label)} names for {len(args.model)} models")
    if args.batch_size < 1:
        parser.error("--batch-size must be positive")
    if args.max_seq_length is not None and args.max_seq_length < 2:
        parser.error("--max-seq-length must be at least 2")
    try:
        report = run(args, tasks)
    except (OSError, ValueError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_table(report["models"], report["tasks"]))
    if any("geometry" in r for r in report["models"]):
        print(f"\nGeometry on STS-B {args.split} (lower align / uniform is better; isotropy 1 = isotropic)")
        print(format_geometry(report["models"]))
    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
        print(f"wrote {out}")
    if args.plot:
        print(f"wrote {report['plot']}")
    return 0


def run(args: argparse.Namespace, tasks: list[str] | None) -> dict:
    """Evaluate every model of ``args``; returns the JSON-ready report."""
    import torch

    from fastcse import __version__
    from fastcse.evaluation.geometry import Geometry, evaluate_geometry, plot_alignment_uniformity
    from fastcse.evaluation.loading import load_encoder
    from fastcse.evaluation.sts import EmbeddingCache, load_tasks, score_tasks
    from fastcse.models.folders import detect_model_kind

    # read every data file and check every model folder before the (long) encoding starts
    datasets = load_tasks(tasks, split=args.split, senteval_dir=args.senteval_dir, sick_path=args.sick_path)
    tasks = [d.task for d in datasets]
    kinds = [detect_model_kind(m) for m in args.model]
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    geometry = bool(args.geometry or args.plot)
    labels = _labels(args.model, args.label)
    rows, points = [], []
    for path, kind, label in zip(args.model, kinds, labels):
        encoder = load_encoder(path, pooling=args.pooling, attn_backend=args.attn_backend, dtype=args.dtype,
                               device=device)
        cache = EmbeddingCache(encoder, batch_size=args.batch_size, progress=not args.no_progress,
                               max_seq_length=args.max_seq_length)
        results = score_tasks(datasets, cache, args.split)
        row = {"model": str(path), "label": label, "kind": kind, "pooling": encoder.pooling,
               "sts": results.to_dict()}
        if geometry:
            geo: Geometry = evaluate_geometry(encoder, split=args.split, cache=cache)
            row["geometry"] = geo.to_dict()
            points.append((label, geo))
        rows.append(row)
        del encoder, cache
    report = {"fastcse_version": __version__, "split": args.split, "tasks": tasks, "models": rows}
    if args.plot:
        report["plot"] = str(plot_alignment_uniformity(points, args.plot))
    return report


if __name__ == "__main__":
    sys.exit(main())
