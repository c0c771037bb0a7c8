"""Export a fastcse encoder as a sentence-transformers folder or a plain Hugging Face folder.

    python -m fastcse.export --checkpoint runs/fastcse/best --out my-simcse [--normalize]
    python -m fastcse.export --checkpoint runs/fastcse/best --out my-simcse-hf --format huggingface

A sentence-transformers folder loads with ``SentenceTransformer(path)`` and gives the embeddings of
fastcse's ``encoder.encode`` (no fastcse needed to read it). Its layout::

    config.json, model.safetensors, tokenizer files   the HF backbone (module 0, Transformer, at the root)
    sentence_bert_config.json                         {max_seq_length, do_lower_case}
    1_Pooling/config.json                             cls (also T5's "first") or mean
    2_Dense/                                          SimCSE's MLP (dense + tanh), only when it runs at
                                                      evaluation (cls_mlp with mlp_only_train=False)
    N_Normalize/                                      with normalize=True
    modules.json, config_sentence_transformers.json   the module list; cosine similarity
    fastcse_encoder.json (+ pooler.safetensors)       so SentenceEncoder.from_pretrained restores the
                                                      pooler exactly, MLP weights included

Files are written by hand in sentence-transformers' long-standing format (legacy ``pooling_mode_*``
keys, ``sentence_transformers.models.*`` class paths), which versions 2 to 6 all read, so that
exporting does not need sentence-transformers installed.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from fastcse.models.folders import model_max_length, write_encoder_meta

logger = logging.getLogger(__name__)

FORMATS = ("sentence-transformers", "huggingface")
_ST = "sentence_transformers.models."


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
    return model_max_length(encoder.backbone.config, encoder.tokenizer)


def _mlp_at_eval(encoder) -> bool:
    return encoder.pooling == "cls_mlp" and not encoder.mlp_only_train


def _save_backbone(encoder, out: Path) -> None:
    if encoder.tokenizer is None:
        raise ValueError("the encoder has no tokenizer: an exported model must carry one "
                         "(build it with tokenizer= or load it from a folder with tokenizer files)")
    encoder.backbone.save_pretrained(str(out))
    encoder.tokenizer.save_pretrained(str(out))


def export_sentence_transformers(encoder, out_dir, *, normalize: bool = False, max_seq_length: int | None = None,
                                 overwrite: bool = False) -> Path:
    """Write ``encoder`` as a sentence-transformers folder at ``out_dir``; returns the folder.

    Args:
        encoder: a :class:`~fastcse.models.SentenceEncoder` with a tokenizer (any pooling: ``cls`` /
            ``first`` -> CLS pooling, ``mean`` -> mean pooling, ``cls_mlp`` -> CLS pooling plus a
            Dense+Tanh module when the MLP runs at evaluation, ``mlp_only_train=False``).
        normalize: append a Normalize module (unit-length embeddings).
        max_seq_length: tokens the exported model reads. ``None``: the model's limit
            (:func:`fastcse.models.folders.model_max_length`), not the training length: a short
            ``max_seq_length`` such as SimCSE's 32 is a training cost knob, and SimCSE evaluates and
            publishes its models without that truncation.
        overwrite: allow a non-empty ``out_dir`` (files of the same names are replaced).

    ``out_dir`` must not exist or be empty unless ``overwrite``.
    """
    out = _prepare_out(out_dir, overwrite)
    length = _export_length(encoder, max_seq_length)
    _save_backbone(encoder, out)
    _write_json(out / "sentence_bert_config.json", {"max_seq_length": length, "do_lower_case": False})

    modules = [{"idx": 0, "name": "0", "path": "", "type": _ST + "Transformer"}]

    def add(kind: str) -> Path:
        idx = len(modules)
        modules.append({"idx": idx, "name": str(idx), "path": f"{idx}_{kind}", "type": _ST + kind})
        return out / f"{idx}_{kind}"

    dim = int(encoder.embedding_dim)
    mean = encoder.pooling == "mean"
    _write_json(add("Pooling") / "config.json", {
        "word_embedding_dimension": dim,
        "pooling_mode_cls_token": not mean,
        "pooling_mode_mean_tokens": mean,
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
        "pooling_mode_weightedmean_tokens": False,
        "pooling_mode_lasttoken": False,
        "include_prompt": True,
    })
    if _mlp_at_eval(encoder):
        from safetensors.torch import save_file

        dense = encoder.pooler.dense
        folder = add("Dense")
        _write_json(folder / "config.json", {"in_features": dense.in_features, "out_features": dense.out_features,
                                             "bias": dense.bias is not None,
                                             "activation_function": "torch.nn.modules.activation.Tanh"})
        weights = {"linear.weight": dense.weight.detach().cpu().contiguous()}
        if dense.bias is not None:
            weights["linear.bias"] = dense.bias.detach().cpu().contiguous()
        save_file(weights, str(folder / "model.safetensors"))
    if normalize:
        add("Normalize").mkdir(parents=True, exist_ok=True)
    _write_json(out / "modules.json", modules)

    import transformers

    from fastcse import __version__

    _write_json(out / "config_sentence_transformers.json", {
        "model_type": "SentenceTransformer",
        "__version__": {"fastcse": __version__, "transformers": transformers.__version__,
                        "pytorch": torch.__version__},
        "prompts": {},
        "default_prompt_name": None,
        "similarity_fn_name": "cosine",
    })
    # so that SentenceEncoder.from_pretrained restores the pooler exactly (MLP weights included)
    write_encoder_meta(out, encoder, max_seq_length=length)
    return out


def export_huggingface(encoder, out_dir, *, overwrite: bool = False) -> Path:
    """Write the backbone and tokenizer as a plain Hugging Face folder (``AutoModel`` loads it).

    A plain folder has no pooler: the pooling (and SimCSE's MLP weights, when they run at
    evaluation) are not part of it; a warning says so when that loses information.
    """
    out = _prepare_out(out_dir, overwrite)
    _save_backbone(encoder, out)
    if _mlp_at_eval(encoder):
        logger.warning("pooling 'cls_mlp' runs its MLP at evaluation, and a plain Hugging Face folder has no place for "
                       "it: export a sentence-transformers folder to keep it")
    elif encoder.pooling == "mean":
        logger.warning("a plain Hugging Face folder does not record the pooling: load it with pooling='mean'")
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
    parser.add_argument("--normalize", action="store_true",
                        help="append a Normalize module (sentence-transformers format only)")
    parser.add_argument("--pooling", choices=("cls", "cls_mlp", "mean", "first"), default=None,
                        help="override the folder's pooling")
    parser.add_argument("--max-seq-length", type=int, default=None,
                        help="tokens the exported model reads (default: the model's limit)")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.normalize and args.format != "sentence-transformers":
        parser.error("--normalize applies to the sentence-transformers format only")
    if args.max_seq_length is not None and args.max_seq_length < 2:
        parser.error("--max-seq-length must be at least 2")

    from fastcse.evaluation.loading import load_encoder

    try:
        encoder = load_encoder(args.checkpoint, pooling=args.pooling, attn_backend="auto")
        if args.format == "sentence-transformers":
            out = export_sentence_transformers(encoder, args.out, normalize=args.normalize,
                                               max_seq_length=args.max_seq_length, overwrite=args.overwrite)
        else:
            out = export_huggingface(encoder, args.out, overwrite=args.overwrite)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.format} folder {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
