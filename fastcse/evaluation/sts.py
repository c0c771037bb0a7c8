"""Semantic textual similarity, scored as the SimCSE paper scores it.

Score of a task: Spearman correlation x100 between the cosine similarity of each pair's two
embeddings and the pair's gold score. Tasks (the paper's Table order):

=========  ==================================================================================
``sts12``   SentEval ``STS12-en-test`` ... ``STS16-en-test``: every subset of a year pooled into
 ...        one list of pairs, one correlation (SimCSE's "all" setting); pairs whose gold line is
``sts16``   empty have no score and are skipped. Read from a SentEval folder (``senteval_dir``).
``stsb``    STS Benchmark (SentEval-processed), dev and test bundled with the package.
``sickr``   SICK relatedness; ``SICK_test_annotated.txt`` (test), ``SICK_trial.txt`` (dev),
            ``SICK_train.txt`` (train), read from ``sick_path`` or the SentEval folder.
=========  ==================================================================================

Sentences are whitespace-normalised (``" ".join(s.split())``), which is what SentEval's readers
followed by SimCSE's batcher feed the tokenizer. Embeddings come from ``encoder.encode`` (evaluation
mode, length-sorted batches), each distinct sentence once. Evaluation reads sentences up to the
model's position limit, not the (short) training ``max_seq_length``: SimCSE's evaluation does not
truncate either (see :func:`evaluation_length`).

Readers raise :class:`DataFormatError` (a ``ValueError``) naming the file and line of bad input.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

from fastcse.models.folders import model_max_length

logger = logging.getLogger(__name__)

# the paper's column order
TASKS = ("sts12", "sts13", "sts14", "sts15", "sts16", "stsb", "sickr")
TASK_TITLES = {"sts12": "STS12", "sts13": "STS13", "sts14": "STS14", "sts15": "STS15", "sts16": "STS16",
               "stsb": "STS-B", "sickr": "SICK-R"}
SENTEVAL_YEARS = ("sts12", "sts13", "sts14", "sts15", "sts16")
SPLITS = ("test", "dev", "train")
# other spellings users type (SentEval's task names among them)
_ALIASES = {"sts-b": "stsb", "stsbenchmark": "stsb", "sick-r": "sickr", "sick": "sickr",
            "sickrelatedness": "sickr"}

# The subsets SemEval released per year (SentEval's downloads; STS13's SMT subset is not
# redistributable). Pooled over these, the scored pairs are 3108 / 1500 / 3750 / 3000 / 1186.
SEMEVAL_SUBSETS = {
    "sts12": ("MSRpar", "MSRvid", "SMTeuroparl", "surprise.OnWN", "surprise.SMTnews"),
    "sts13": ("FNWN", "HDL", "OnWN"),
    "sts14": ("deft-forum", "deft-news", "headlines", "images", "OnWN", "tweet-news"),
    "sts15": ("answers-forums", "answers-students", "belief", "headlines", "images"),
    "sts16": ("answer-answer", "headlines", "plagiarism", "postediting", "question-question"),
}
# scored pairs per year in SimCSE's "all" setting over SEMEVAL_SUBSETS
SEMEVAL_PAIRS = {"sts12": 3108, "sts13": 1500, "sts14": 3750, "sts15": 3000, "sts16": 1186}
SICK_FILES = {"test": "SICK_test_annotated.txt", "dev": "SICK_trial.txt", "train": "SICK_train.txt"}


class DataFormatError(ValueError):
    """A data file is missing a column, has a bad score or cannot be decoded (file and line named)."""


# ------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------

@dataclass
class STSData:
    """Scored sentence pairs of one task.

    ``scores`` are the gold scores (float64, one per pair); ``skipped`` counts pairs without a
    gold score; ``subsets`` maps subset name -> scored pairs for the pooled SentEval years.
    """

    task: str
    sentences1: list[str]
    sentences2: list[str]
    scores: np.ndarray
    source: str
    subsets: dict[str, int] = field(default_factory=dict)
    skipped: int = 0

    def __len__(self) -> int:
        return len(self.scores)


def normalize_task(name: str) -> str:
    """Canonical task key for ``name`` (case-insensitive, a few aliases); ValueError lists valid ones."""
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    if key not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}")
    return key


def _normalize_space(sentence: str) -> str:
    return " ".join(sentence.split())


def _read_lines(path: Path) -> list[str]:
    """Lines of a UTF-8 text file (without line ends); a decoding error names the line."""
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise DataFormatError(f"{path}:{line}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    if text.startswith("\ufeff"):
        text = text[1:]
    # only "\n" ends a line: str.splitlines would also split on form feeds and other separators
    # that occur inside sentences of the STS files
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def _parse_score(text: str, path: Path, lineno: int, low: float, high: float) -> float:
    try:
        value = float(text)
    except ValueError:
        raise DataFormatError(f"{path}:{lineno}: score {text!r} is not a number") from None
    if not math.isfinite(value) or not low <= value <= high:
        raise DataFormatError(f"{path}:{lineno}: score {value} is outside [{low:g}, {high:g}]")
    return value


def read_stsb(path) -> STSData:
    """Read an STS Benchmark file (``sts-dev.csv`` / ``sts-test.csv`` / ``sts-train.csv``).

    Tab-separated, no header, no quoting (the files have unbalanced double quotes): genre, file,
    year, id, score (0-5), sentence1, sentence2, then optional source columns (original release).
    Blank lines are ignored.
    """
    path = Path(path)
    s1, s2, scores = [], [], []
    for lineno, line in enumerate(_read_lines(path), start=1):
        if not line.strip():
            continue
        cols = line.split("\t")
        if len(cols) < 7:
            raise DataFormatError(f"{path}:{lineno}: expected at least 7 tab-separated columns (genre, file, year, "
                                  f"id, score, sentence1, sentence2), found {len(cols)}")
        scores.append(_parse_score(cols[4], path, lineno, 0.0, 5.0))
        s1.append(_normalize_space(cols[5]))
        s2.append(_normalize_space(cols[6]))
    if not scores:
        raise DataFormatError(f"{path}: no sentence pairs")
    return STSData("stsb", s1, s2, np.asarray(scores, dtype=np.float64), str(path))


@contextlib.contextmanager
def _bundled(name: str) -> Iterator[Path]:
    with resources.as_file(resources.files("fastcse") / "resources" / name) as path:
        yield path


def load_stsb(split: str = "test") -> STSData:
    """The bundled STS Benchmark ``dev`` (1500 pairs) or ``test`` (1379 pairs) split."""
    if split not in ("dev", "test"):
        raise ValueError(f"the package bundles STS-B dev and test, not {split!r}; "
                         f"read other files with read_stsb(path)")
    with _bundled(f"sts-{split}.csv") as path:
        data = read_stsb(path)
    data.source = f"fastcse/resources/sts-{split}.csv"
    return data


def read_sick(path) -> STSData:
    """Read a SICK file: tab-separated with a header naming ``sentence_A``, ``sentence_B`` and
    ``relatedness_score`` (1-5); other columns (``pair_ID``, ``entailment_judgment``) are ignored."""
    path = Path(path)
    lines = _read_lines(path)
    if not lines:
        raise DataFormatError(f"{path}: empty file")
    header = lines[0].split("\t")
    need = ("sentence_A", "sentence_B", "relatedness_score")
    missing = [name for name in need if name not in header]
    if missing:
        raise DataFormatError(f"{path}:1: header must name the columns {', '.join(need)}; "
                              f"missing {', '.join(missing)} (found {header})")
    ia, ib, isc = (header.index(name) for name in need)
    width = max(ia, ib, isc) + 1
    s1, s2, scores = [], [], []
    for lineno, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        cols = line.split("\t")
        if len(cols) < width:
            raise DataFormatError(f"{path}:{lineno}: expected {len(header)} tab-separated columns "
                                  f"({', '.join(header)}), found {len(cols)}")
        scores.append(_parse_score(cols[isc], path, lineno, 1.0, 5.0))
        s1.append(_normalize_space(cols[ia]))
        s2.append(_normalize_space(cols[ib]))
    if not scores:
        raise DataFormatError(f"{path}: no sentence pairs after the header")
    return STSData("sickr", s1, s2, np.asarray(scores, dtype=np.float64), str(path))


_INPUT_FILE = re.compile(r"^STS\.input\.(.+)\.txt$")


def read_senteval_sts(folder, task: str | None = None) -> STSData:
    """Read one SentEval STS year folder (``STS12-en-test`` ...) in SimCSE's "all" setting.

    Every subset ``<s>`` is a pair of line-aligned files, ``STS.input.<s>.txt`` (sentence1 TAB
    sentence2) and ``STS.gs.<s>.txt`` (gold score 0-5, or an empty line: that pair has no score and
    is skipped). All subsets found are pooled into one list of pairs. A subset list that differs
    from SemEval's release for the year is logged (the pooled score would not compare with
    published ones).
    """
    folder = Path(folder)
    if task is None:
        match = re.match(r"^STS(1[2-6])", folder.name)
        task = f"sts{match.group(1)}" if match else folder.name
    if not folder.is_dir():
        raise FileNotFoundError(f"SentEval STS folder not found: {folder}")
    subsets = sorted(m.group(1) for p in folder.iterdir() if (m := _INPUT_FILE.match(p.name)))
    if not subsets:
        raise FileNotFoundError(f"{folder}: no STS.input.<subset>.txt files (expected a SentEval STS folder such as "
                                f"STS12-en-test)")
    expected = SEMEVAL_SUBSETS.get(task)
    if expected is not None and set(subsets) != set(expected):
        logger.warning("%s: subsets %s differ from SemEval's %s for %s; the pooled score is not comparable with "
                       "published figures", folder, subsets, list(expected), task)
    s1, s2, scores, counts, skipped = [], [], [], {}, 0
    for subset in subsets:
        input_path = folder / f"STS.input.{subset}.txt"
        gold_path = folder / f"STS.gs.{subset}.txt"
        if not gold_path.is_file():
            raise FileNotFoundError(f"{input_path} has no gold file {gold_path.name} beside it")
        pairs = _read_lines(input_path)
        golds = _read_lines(gold_path)
        if len(pairs) != len(golds):
            raise DataFormatError(f"{input_path} has {len(pairs)} lines but {gold_path} has {len(golds)}: "
                                  f"the files must be line-aligned")
        n = 0
        for lineno, (pair, gold) in enumerate(zip(pairs, golds), start=1):
            gold = gold.strip()
            if not gold:
                skipped += 1
                continue
            cols = pair.split("\t")
            if len(cols) < 2:
                raise DataFormatError(f"{input_path}:{lineno}: expected sentence1 TAB sentence2, found no tab")
            scores.append(_parse_score(gold, gold_path, lineno, 0.0, 5.0))
            s1.append(_normalize_space(cols[0]))
            s2.append(_normalize_space(cols[1]))
            n += 1
        counts[subset] = n
    if not scores:
        raise DataFormatError(f"{folder}: no scored pairs (every gold line is empty)")
    if expected is not None and set(subsets) == set(expected) and len(scores) != SEMEVAL_PAIRS[task]:
        logger.warning("%s: %d scored pairs, but SemEval's %s release has %d: the files differ from SentEval's",
                       folder, len(scores), task, SEMEVAL_PAIRS[task])
    return STSData(task, s1, s2, np.asarray(scores, dtype=np.float64), str(folder), counts, skipped)


def _senteval_sts_folder(senteval_dir: Path, task: str) -> Path:
    name = f"STS{task[3:]}-en-test"
    tried = [senteval_dir / name, senteval_dir / "STS" / name, senteval_dir / "downstream" / "STS" / name,
             senteval_dir / "data" / "downstream" / "STS" / name]
    for folder in tried:
        if folder.is_dir():
            return folder
    raise FileNotFoundError(f"{task}: no {name} folder under {senteval_dir} (looked for "
                            f"{', '.join(str(p) for p in tried)}); --senteval-dir takes SentEval's data/downstream "
                            f"folder or its STS subfolder")


def resolve_sick_file(sick_path=None, senteval_dir=None, split: str = "test") -> Path | None:
    """The SICK file to read: ``sick_path`` itself when it is a file, else ``SICK_FILES[split]`` in
    ``sick_path`` or in SentEval's ``SICK`` folder under ``senteval_dir``. None when neither is given.
    """
    if split not in SICK_FILES:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SICK_FILES)}")
    name = SICK_FILES[split]
    if sick_path is not None:
        path = Path(sick_path)
        if path.is_dir():
            path = path / name
        if not path.is_file():
            raise FileNotFoundError(f"SICK file not found: {path}")
        return path
    if senteval_dir is None:
        return None
    base = Path(senteval_dir)
    tried = [base / "SICK" / name, base.parent / "SICK" / name, base / "downstream" / "SICK" / name,
             base / "data" / "downstream" / "SICK" / name]
    for path in tried:
        if path.is_file():
            return path
    raise FileNotFoundError(f"sickr: no {name} under {base} (looked for {', '.join(str(p) for p in tried)}); "
                            f"give the file or its folder with --sick-path")


def load_task(task: str, *, split: str = "test", senteval_dir=None, sick_path=None) -> STSData:
    """Read the data of one task (see the module docstring for where each comes from)."""
    task = normalize_task(task)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    if task == "stsb":
        return load_stsb(split)
    if task == "sickr":
        path = resolve_sick_file(sick_path, senteval_dir, split)
        if path is None:
            raise ValueError("sickr needs the SICK data: give --sick-path (the file or its folder) or --senteval-dir")
        return read_sick(path)
    if split != "test":
        raise ValueError(f"{task} has only a test split (SimCSE's dev-mode evaluation uses stsb and sickr)")
    if senteval_dir is None:
        raise ValueError(f"{task} needs SentEval's STS folders: give --senteval-dir")
    return read_senteval_sts(_senteval_sts_folder(Path(senteval_dir), task), task)


def default_tasks(*, split: str = "test", senteval_dir=None, sick_path=None) -> list[str]:
    """Tasks whose data is at hand: stsb always, sickr with SICK data, sts12-16 with a SentEval dir."""
    tasks = []
    if senteval_dir is not None and split == "test":
        tasks += list(SENTEVAL_YEARS)
    tasks.append("stsb")
    if sick_path is not None or (senteval_dir is not None and _has_sick(senteval_dir, split)):
        tasks.append("sickr")
    return tasks


def _has_sick(senteval_dir, split: str) -> bool:
    try:
        return resolve_sick_file(None, senteval_dir, split) is not None
    except FileNotFoundError:
        return False


# ------------------------------------------------------------------------------------------------
# scoring
# ------------------------------------------------------------------------------------------------

def spearman(predicted, gold) -> float:
    """Spearman rank correlation x100 (ties get average ranks), from ``scipy.stats.spearmanr``.

    NaN when either side is constant (the correlation is undefined).
    """
    from scipy.stats import spearmanr

    x = np.asarray(predicted, dtype=np.float64).ravel()
    y = np.asarray(gold, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"spearman: {x.size} predictions for {y.size} gold scores")
    if x.size < 2:
        raise ValueError("spearman needs at least 2 pairs")
    if np.all(x == x[0]) or np.all(y == y[0]):
        return float("nan")
    return float(spearmanr(x, y).statistic) * 100.0


def cosine_scores(emb1: torch.Tensor, emb2: torch.Tensor) -> np.ndarray:
    """Row-wise cosine similarity of two ``(n, dim)`` embedding matrices, as float64."""
    a = torch.nn.functional.normalize(emb1.double(), dim=-1)
    b = torch.nn.functional.normalize(emb2.double(), dim=-1)
    return (a * b).sum(-1).numpy()


def evaluation_length(encoder) -> int:
    """How many tokens evaluation reads: :func:`fastcse.models.folders.model_max_length` of the
    encoder's backbone and tokenizer (the position limit, the tokenizer's limit, at most 512).

    SimCSE evaluates without truncation, so a model trained at ``max_seq_length`` 32 is still
    evaluated on whole sentences.
    """
    return model_max_length(encoder.backbone.config, getattr(encoder, "tokenizer", None))


@contextlib.contextmanager
def _reading_length(encoder, max_seq_length: int | None):
    """Temporarily set ``encoder.max_seq_length`` (``None``: :func:`evaluation_length`)."""
    saved = encoder.max_seq_length
    encoder.max_seq_length = int(max_seq_length) if max_seq_length is not None else evaluation_length(encoder)
    try:
        yield
    finally:
        encoder.max_seq_length = saved


class EmbeddingCache:
    """Embeds sentences with ``encoder.encode``, each distinct sentence once per cache.

    One cache shared by several tasks (and by the geometry measures, which reuse STS-B) encodes a
    sentence that occurs in several places once. ``max_seq_length`` as in :func:`evaluate_sts`.
    """

    def __init__(self, encoder, *, batch_size: int = 128, progress: bool = True, max_seq_length: int | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.encoder = encoder
        self.batch_size = batch_size
        self.progress = progress
        self.max_seq_length = max_seq_length
        self._rows: dict[str, torch.Tensor] = {}

    def __call__(self, sentences: Sequence[str]) -> torch.Tensor:
        """``(len(sentences), dim)`` float32 embeddings in input order."""
        new = list(dict.fromkeys(s for s in sentences if s not in self._rows))
        if new:
            with _reading_length(self.encoder, self.max_seq_length):
                emb = self.encoder.encode(new, batch_size=self.batch_size, progress=self.progress)
            self._rows.update(zip(new, emb.float()))
        if not sentences:
            return torch.empty(0, self.encoder.embedding_dim)
        return torch.stack([self._rows[s] for s in sentences])


@dataclass
class TaskResult:
    """Score of one task: ``spearman`` (x100), scored ``pairs``, ``skipped`` pairs without gold."""

    task: str
    split: str
    spearman: float
    pairs: int
    skipped: int
    source: str
    subsets: dict[str, int] = field(default_factory=dict)

    @property
    def title(self) -> str:
        return TASK_TITLES[self.task]


@dataclass
class STSResults:
    """Scores of several tasks, in the paper's column order, and their average."""

    tasks: dict[str, TaskResult]

    @property
    def average(self) -> float:
        values = [r.spearman for r in self.tasks.values()]
        return float(np.mean(values)) if values else float("nan")

    def __getitem__(self, task: str) -> float:
        return self.tasks[normalize_task(task)].spearman

    def to_dict(self) -> dict:
        return {"tasks": {k: _jsonable(asdict(v)) for k, v in self.tasks.items()}, "average": _finite(self.average)}


def _finite(value: float):
    return value if isinstance(value, float) and math.isfinite(value) else None


def _jsonable(d: dict) -> dict:
    return {k: (_finite(v) if isinstance(v, float) else v) for k, v in d.items()}


def score_task(data: STSData, embed, split: str = "test") -> TaskResult:
    """Score one task's pairs with ``embed`` (an :class:`EmbeddingCache` or any sentences -> tensor)."""
    emb = embed(data.sentences1 + data.sentences2)
    n = len(data.sentences1)
    rho = spearman(cosine_scores(emb[:n], emb[n:]), data.scores)
    return TaskResult(data.task, split, rho, len(data), data.skipped, data.source, dict(data.subsets))


def evaluate_sts(encoder, tasks: Iterable[str] | None = None, *, split: str = "test", senteval_dir=None,
                 sick_path=None, batch_size: int = 128, progress: bool = True, max_seq_length: int | None = None,
                 cache: EmbeddingCache | None = None) -> STSResults:
    """Spearman x100 of cosine similarity vs gold for each task, as the SimCSE paper reports.

    Args:
        encoder: a :class:`~fastcse.models.SentenceEncoder` (anything with its ``encode``,
            ``max_seq_length``, ``backbone`` and ``embedding_dim``).
        tasks: task keys (:data:`TASKS`; case-insensitive). ``None``: :func:`default_tasks`.
        split: ``test`` (the paper's numbers) or ``dev`` (stsb and sickr only).
        senteval_dir: SentEval's ``data/downstream`` folder (or its ``STS`` subfolder) for sts12-16,
            and for sickr when ``sick_path`` is not given.
        sick_path: a SICK file, or the folder holding ``SICK_test_annotated.txt`` / ``SICK_trial.txt``.
        batch_size, progress: passed to ``encoder.encode`` (progress bar).
        max_seq_length: tokens read per sentence; ``None``: the model's limit
            (:func:`evaluation_length`), as SimCSE evaluates without truncation.
        cache: an :class:`EmbeddingCache` to share encodings with other measures.

    All data is read (and checked) before anything is encoded.

    Example::

        >>> enc = SentenceEncoder.from_pretrained("path/to/all-MiniLM-L6-v2")   # doctest: +SKIP
        >>> evaluate_sts(enc, ["stsb"])["stsb"]                                 # doctest: +SKIP
        82.03...
    """
    datasets = load_tasks(tasks, split=split, senteval_dir=senteval_dir, sick_path=sick_path)
    embed = cache if cache is not None else EmbeddingCache(encoder, batch_size=batch_size, progress=progress,
                                                           max_seq_length=max_seq_length)
    return score_tasks(datasets, embed, split)


def load_tasks(tasks: Iterable[str] | None = None, *, split: str = "test", senteval_dir=None,
               sick_path=None) -> list[STSData]:
    """Read (and check) the data of ``tasks`` (``None``: :func:`default_tasks`), in the paper's order."""
    if tasks is None:
        keys = default_tasks(split=split, senteval_dir=senteval_dir, sick_path=sick_path)
    else:
        keys = list(dict.fromkeys(normalize_task(t) for t in tasks))
        if not keys:
            raise ValueError(f"no tasks given; valid tasks: {', '.join(TASKS)}")
    keys.sort(key=TASKS.index)
    return [load_task(k, split=split, senteval_dir=senteval_dir, sick_path=sick_path) for k in keys]


def score_tasks(datasets: Sequence[STSData], embed, split: str = "test") -> STSResults:
    """Score already-read tasks (see :func:`score_task`)."""
    return STSResults({d.task: score_task(d, embed, split) for d in datasets})


def evaluate_stsb(encoder, split: str = "dev", batch_size: int = 128, progress: bool = False,
                  max_seq_length: int | None = None) -> float:
    """STS-B Spearman x100 on the bundled ``dev`` (model selection during training) or ``test`` split.

    The encoder's training mode is restored afterwards (``encode`` runs in evaluation mode).
    """
    data = load_stsb(split)
    embed = EmbeddingCache(encoder, batch_size=batch_size, progress=progress, max_seq_length=max_seq_length)
    return score_task(data, embed, split).spearman
