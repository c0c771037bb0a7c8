"""Readers (file:line problems, --on-bad-row, every line accounted for), column conventions and formats,
several sources and their mix, no-duplicate batches, batch order and sharding, word repetition, config merge."""

from __future__ import annotations

import json
import random

import pytest
import torch

from fastcse.config import ConfigError, parse_args
from fastcse.data import (
    BatchSchedule,
    DataError,
    Triplet,
    concat_features,
    load_training_data,
    read_examples,
    read_sentences,
    read_training_data,
    read_triplets,
    step_rng,
    word_repetition,
    word_repetition_ids,
)

# ---------------------------------------------------------------------------------------------
# readers
# ---------------------------------------------------------------------------------------------


def test_text_reader_counts_empty_lines_and_reports_undecodable(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_bytes(b"first sentence\n\n   \nsecond \xff\xfe bad bytes\nthird sentence\n")
    sentences, report = read_sentences(path)
    assert sentences == ["first sentence", "third sentence"]
    assert report.empty_skipped == 2 and report.bad_skipped == 1 and report.lines == 5
    assert report.problems[0].startswith(f"{path}:4: undecodable bytes")
    with pytest.raises(DataError, match=rf"{path}:4: undecodable bytes"):
        read_sentences(path, on_bad_row="error")


def test_csv_reader_reports_bad_rows_with_line(tmp_path):
    path = tmp_path / "nli.csv"
    path.write_text(
        "sent0,sent1,hard_neg\n"
        "a man sings,someone sings,nobody sings\n"
        "\n"
        "too,few\n"
        '"a quoted\nmultiline",pos,neg\n'
        "x,,neg\n"
        "ok anchor,ok pos,ok neg\n", encoding="utf-8")
    triplets, report = read_triplets(path)
    assert [t.sent0 for t in triplets] == ["a man sings", "a quoted\nmultiline", "ok anchor"]
    assert report.empty_skipped == 1 and report.bad_skipped == 2
    assert report.problems[0] == f"{path}:4: expected 3 fields (sent0, sent1, hard_neg), got 2"
    assert report.problems[1] == f"{path}:7: column 'sent1' is empty"
    with pytest.raises(DataError, match=rf"{path}:4: expected 3 fields"):
        read_triplets(path, on_bad_row="error")


def test_csv_reader_undecodable_bytes(tmp_path):
    path = tmp_path / "nli.csv"
    path.write_bytes(b"sent0,sent1,hard_neg\na,b,c\nd\xff,e,f\n")
    triplets, report = read_triplets(path)
    assert len(triplets) == 1 and report.problems == [f"{path}:3: undecodable bytes (not UTF-8) in column 'sent0'"]


def test_csv_wrong_columns_is_one_clear_error(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text("premise,hypothesis\na,b\n")
    with pytest.raises(DataError, match=r"missing column\(s\) sent0, sent1, hard_neg; the header has premise, "
                                        r"hypothesis \(expected sent0, sent1, hard_neg as SimCSE, or anchor, positive, "
                                        r"negative as sentence-transformers"):
        read_triplets(path)


def test_jsonl_reader(tmp_path):
    path = tmp_path / "nli.jsonl"
    rows = [json.dumps({"sent0": "a", "sent1": "b", "hard_neg": "c"}), "{not json", "",
            json.dumps({"sent0": "a", "sent1": "b"}), json.dumps([1, 2]),
            json.dumps({"sent0": "d", "sent1": "e", "hard_neg": "f", "extra": 1})]
    path.write_text("\n".join(rows) + "\n")
    triplets, report = read_triplets(path)
    assert [tuple(t) for t in triplets] == [("a", "b", "c"), ("d", "e", "f")]
    assert report.empty_skipped == 1 and report.bad_skipped == 3
    assert report.problems[0].startswith(f"{path}:2: malformed JSON")
    assert report.problems[1] == f"{path}:4: column 'hard_neg' is missing or null"
    assert report.accounted() and report.lines == 6


def test_missing_file_and_method_file_mismatch(tmp_path):
    with pytest.raises(DataError, match="training file not found"):
        read_training_data("simcse-unsup", tmp_path / "nope.txt")
    csv_path = tmp_path / "t.csv"
    csv_path.write_text("sent0,sent1,hard_neg\na,b,c\n")
    with pytest.raises(DataError, match="an unsupervised method reads one sentence per line .* the table has "
                                        "sent0, sent1, hard_neg"):
        read_training_data("simcse-unsup", csv_path)
    (tmp_path / "t.txt").write_text("a sentence\n")
    with pytest.raises(DataError, match="supervised training reads a table"):
        read_training_data("simcse-sup", tmp_path / "t.txt")


def test_bundled_data():
    sentences, _ = read_training_data("simcse-unsup", None)
    triplets, _ = read_training_data("simcse-sup", None, max_examples=10)
    assert len(sentences) == 11914 and len(triplets) == 10 and all(len(t) == 3 for t in triplets)


# ---------------------------------------------------------------------------------------------
# every line accounted for (issue #16 D3)
# ---------------------------------------------------------------------------------------------


def test_stray_quote_is_reported_with_the_lines_it_swallowed_and_they_are_read_again(tmp_path):
    """60 unquoted rows, a stray quote at the start of line 11: before, 50 rows vanished unreported."""
    path = tmp_path / "nli.csv"
    rows = [f"anchor {i},positive {i},negative {i}" for i in range(60)]
    rows[9] = '"' + rows[9]  # line 11 (line 1 is the header)
    path.write_text("sent0,sent1,hard_neg\n" + "\n".join(rows) + "\n")
    triplets, report = read_triplets(path)
    assert report.lines == 61 and report.header_lines == 1
    assert (report.examples, report.bad_rows, report.empty_lines) == (59, 1, 0)
    assert report.examples + report.bad_rows + report.empty_lines == report.lines - report.header_lines
    assert report.accounted()
    assert [t.sent0 for t in triplets] == [f"anchor {i}" for i in range(60) if i != 9]
    assert report.problems == [f"{path}:11: expected 3 fields (sent0, sent1, hard_neg), got 1; an unbalanced quote "
                               f"on this line ran over lines 12-61, which are read again as rows of their own"]
    summary = report.summary()
    assert "59 examples from 61 lines" in summary and "(61 lines = 1 header + 59 examples + 1 bad + 0 empty)" in summary
    assert "lines 12-61" in summary


def test_stray_quote_in_the_bundled_snli_triplets(tmp_path):
    """One stray quote at line 102 used to merge lines 102-104 into one bad row: 103-104 vanished."""
    from fastcse.data import bundled_path

    lines = bundled_path("snli_triplets.csv").read_text(encoding="utf-8").splitlines(keepends=True)
    clean, clean_report = read_triplets(bundled_path("snli_triplets.csv"))
    lines[101] = '"' + lines[101]
    path = tmp_path / "snli.csv"
    path.write_text("".join(lines), encoding="utf-8")
    triplets, report = read_triplets(path)
    assert report.lines == len(lines) and report.accounted()
    assert report.bad_rows == clean_report.bad_rows + 1 and report.examples == clean_report.examples - 1
    assert f"{path}:102:" in report.problems[0] and "ran over lines 103-104" in report.problems[0]
    assert triplets == clean[:100] + clean[101:]  # rows 103 and 104 are there


def test_multiline_quoted_rows_and_bad_rows_spanning_lines_are_counted_by_line(tmp_path):
    path = tmp_path / "nli.csv"
    path.write_text('sent0,sent1,hard_neg\n"two\nlines",p,n\n"a,b\nc",d\n\nx,y,z\n', encoding="utf-8")
    triplets, report = read_triplets(path)
    assert [t.sent0 for t in triplets] == ["two\nlines", "x"]
    # the 2-field row spanning lines 4-5 is re-read line by line: two bad rows, nothing lost
    assert (report.lines, report.examples, report.example_lines, report.bad_rows, report.bad_lines,
            report.empty_lines) == (7, 2, 3, 2, 2, 1)
    assert report.accounted()
    assert "(7 lines = 1 header + 2 examples on 3 lines + 2 bad + 1 empty)" in report.summary()


def test_summary_lists_the_first_bad_rows_and_how_many_more(tmp_path):
    path = tmp_path / "corpus.csv"
    rows = ["sent0,sent1,hard_neg"] + [f"a{i},b{i},c{i}" if i % 2 else f"only{i},two" for i in range(40)]
    path.write_text("\n".join(rows) + "\n")
    _, report = read_triplets(path)
    summary = report.summary()
    assert report.bad_rows == 20 and report.accounted()
    assert summary.count("expected 3 fields") == 10 and "... and 10 more bad rows" in summary
    assert f"{path}:2: expected 3 fields" in summary


def test_binary_files_are_refused_as_a_whole(tmp_path):
    blob = tmp_path / "weights.txt"
    blob.write_bytes(bytes(range(256)) * 64)
    with pytest.raises(DataError, match=r"is a binary file, not UTF-8 text \(a NUL byte at offset 0\)"):
        read_training_data("simcse-unsup", blob)
    parquet_named_csv = tmp_path / "data.csv"
    parquet_named_csv.write_bytes(b"PAR1" + bytes(100))
    with pytest.raises(DataError, match="not a text file \\(a Parquet file: name it \\*.parquet\\)"):
        read_training_data("simcse-sup", parquet_named_csv)


def test_max_examples_is_in_the_summary_and_must_be_positive(tmp_path):
    data = load_training_data("simcse-unsup", None, max_examples=100)
    assert len(data.examples) == 100
    assert "11914 examples from" in data.summary() and "using the first 100 (max_examples=100)" in data.summary()
    for bad in (-1, 0, 2.5, True):
        with pytest.raises(DataError, match="max_examples must be a positive number of examples"):
            load_training_data("simcse-unsup", None, max_examples=bad)


# ---------------------------------------------------------------------------------------------
# column conventions and formats (issue #15 item 2)
# ---------------------------------------------------------------------------------------------


def test_sentence_transformers_columns_read_as_triplets_and_pairs(tmp_path):
    triplets = tmp_path / "triplets.csv"
    triplets.write_text("anchor,positive,negative\na man sings,someone sings,nobody sings\nx,y,z\n")
    examples, report = read_triplets(triplets)
    assert examples == [Triplet("a man sings", "someone sings", "nobody sings"), Triplet("x", "y", "z")]
    assert (report.kind, report.columns) == ("triplets", ("anchor", "positive", "negative"))

    pairs = tmp_path / "pairs.csv"
    pairs.write_text("anchor,positive\na man sings,someone sings\nx,y\n")
    with pytest.raises(DataError, match=r"missing column\(s\) negative: the table holds pairs"):
        read_triplets(pairs)  # a caller that needs triplets says so
    examples, report = read_triplets(pairs, allow_pairs=True)
    assert examples == [Triplet("a man sings", "someone sings", None), Triplet("x", "y", None)]
    assert report.kind == "pairs" and "pairs (anchor, positive)" in report.summary()
    simcse_pairs = tmp_path / "simcse_pairs.csv"
    simcse_pairs.write_text("sent0,sent1\na,b\n")
    data = load_training_data("simcse-sup", simcse_pairs)
    assert data.examples == [Triplet("a", "b", None)] and data.sources[0].kind == "pairs"


def test_numbered_negatives_take_the_first_and_say_so(tmp_path):
    path = tmp_path / "mined.jsonl"
    rows = [{"anchor": "q", "positive": "p", "negative_2": "n2", "negative_1": "n1", "negative_10": "n10",
             "score": 1.0}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    examples, report = read_triplets(path)
    assert examples == [Triplet("q", "p", "n1")] and report.columns == ("anchor", "positive", "negative_1")
    summary = report.summary()
    assert "columns negative_2, negative_10 left out (one hard negative per anchor: negative_1)" in summary
    assert "columns score ignored" in summary


def test_parquet_and_datasets_folders(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    table = pa.table({"anchor": ["a", "b", None, "d"], "positive": ["p", "q", "r", " "], "negative": ["x", "y", "z", "w"]})
    pq.write_table(table, tmp_path / "t.parquet")
    examples, report = read_triplets(tmp_path / "t.parquet")
    assert examples == [Triplet("a", "p", "x"), Triplet("b", "q", "y")]
    assert report.unit == "row" and report.accounted() and report.lines == 4
    assert report.problems == [f"{tmp_path / 't.parquet'}: row 3: column 'anchor' is missing or null",
                               f"{tmp_path / 't.parquet'}: row 4: column 'positive' is empty"]
    assert "4 rows = 2 examples + 2 bad + 0 empty" in report.summary()

    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"sentence": ["one", "two", "three"], "label": [0, 1, 0]})
    ds.save_to_disk(str(tmp_path / "ds"))
    sentences, report = read_sentences(tmp_path / "ds")
    assert sentences == ["one", "two", "three"] and "columns label ignored" in report.summary()
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "dd"))
    data = load_training_data("esimcse", tmp_path / "dd")
    assert data.examples == ["one", "two", "three"] and "the 'train' split" in data.summary()
    datasets.DatasetDict({"validation": ds}).save_to_disk(str(tmp_path / "nodd"))
    with pytest.raises(DataError, match="without a 'train' split"):
        load_training_data("esimcse", tmp_path / "nodd")
    (tmp_path / "empty_folder").mkdir()
    with pytest.raises(DataError, match="not a Hugging Face datasets folder"):
        load_training_data("esimcse", tmp_path / "empty_folder")


def test_unsupervised_methods_read_a_text_column(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text(json.dumps({"text": "first"}) + "\n" + json.dumps({"text": ""}) + "\n" +
                    json.dumps({"text": "second"}) + "\n")
    sentences, report = read_sentences(path)
    assert sentences == ["first", "second"] and report.problems == [f"{path}:2: column 'text' is empty"]


# ---------------------------------------------------------------------------------------------
# several sources, their mix, no-duplicate batches
# ---------------------------------------------------------------------------------------------


def _sentence_file(path, prefix, n):
    path.write_text("".join(f"{prefix} {i}\n" for i in range(n)))
    return path


@pytest.mark.parametrize("mix", ["proportional", "round_robin"])
def test_several_sources_mix_batch_by_batch(tmp_path, mix):
    a = _sentence_file(tmp_path / "a.txt", "a", 40)
    b = _sentence_file(tmp_path / "b.txt", "b", 16)
    data = load_training_data("simcse-unsup", [a, b], mix=mix)
    assert data.sizes == [40, 16] and len(data.examples) == 56
    assert data.summary().startswith(f"2 sources, mix={mix}: 56 examples (a.txt: 40, b.txt: 16)")
    sched = data.schedule(8, seed=1)
    per_epoch = sched.batches_per_epoch
    assert per_epoch == (5 + 2 if mix == "proportional" else 2 * 2)
    sources = [sched.source_of(step) for step in range(per_epoch)]
    for step in range(3 * per_epoch):
        batch = [data.examples[i] for i in sched.global_indices(step)]
        prefix = "ab"[sched.source_of(step)]
        assert all(s.startswith(prefix + " ") for s in batch) and len(set(batch)) == 8  # one source per batch
    if mix == "round_robin":
        assert sources == [0, 1, 0, 1]
    else:
        assert sorted(sources) == [0] * 5 + [1] * 2
        epoch0 = [i for step in range(per_epoch) for i in sched.global_indices(step)]
        assert len(set(epoch0)) == len(epoch0)  # every batch of every source once per epoch
    # a pure function of the position: a fresh schedule (a resumed run) gives the same batches
    again = data.schedule(8, seed=1)
    assert [again.global_indices(s) for s in range(5, 20)] == [sched.global_indices(s) for s in range(5, 20)]
    assert data.schedule(8, seed=2).global_indices(0) != sched.global_indices(0) or \
        data.schedule(8, seed=2).global_indices(1) != sched.global_indices(1)


def test_sources_are_checked(tmp_path):
    a = _sentence_file(tmp_path / "a.txt", "a", 40)
    small = _sentence_file(tmp_path / "small.txt", "s", 3)
    with pytest.raises(DataError, match="small.txt: 3 examples are fewer than one batch of 8"):
        load_training_data("simcse-unsup", [a, small]).schedule(8, seed=0)
    with pytest.raises(DataError, match="given twice"):
        load_training_data("simcse-unsup", [a, tmp_path / "." / "a.txt"])
    with pytest.raises(DataError, match="unknown mix 'random'"):
        load_training_data("simcse-unsup", [a], mix="random")


def test_no_duplicate_batches(tmp_path):
    """No text twice in a global batch, across all columns; still a pure function of the position."""
    rows = ["sent0,sent1,hard_neg"]
    for i in range(60):
        premise = f"premise {i // 3}"  # every premise three times, as in SNLI
        rows.append(f"{premise},hypothesis {i},contradiction {i % 13}")
    path = tmp_path / "nli.csv"
    path.write_text("\n".join(rows) + "\n")
    data = load_training_data("simcse-sup", path)
    plain = data.schedule(8, seed=0)
    assert any(len({t for i in plain.global_indices(s) for t in data.examples[i]}) < 24
               for s in range(plain.batches_per_epoch))  # without the option, batches repeat texts
    sched = data.schedule(8, seed=0, no_duplicates=True)
    steps = sum(sched.batches_in_epoch(e) for e in range(3))
    seen_epoch0 = []
    for step in range(steps):
        batch = [data.examples[i] for i in sched.global_indices(step)]
        texts = [t for ex in batch for t in ex]
        assert len(batch) == 8 and len(set(texts)) == len(texts), batch
        if step < sched.batches_in_epoch(0):
            seen_epoch0 += sched.global_indices(step)
    assert len(set(seen_epoch0)) == len(seen_epoch0)
    ranks = [data.schedule(8, seed=0, rank=r, world_size=2, no_duplicates=True) for r in range(2)]
    for step in range(steps):
        assert ranks[0].indices(step) + ranks[1].indices(step) == sched.global_indices(step)
    fresh = data.schedule(8, seed=0, no_duplicates=True)
    assert fresh.global_indices(steps - 1) == sched.global_indices(steps - 1)  # resume deep into a run
    same = tmp_path / "same.txt"
    same.write_text("one sentence\n" * 20)
    with pytest.raises(DataError, match="no batch of 4 without a repeated text"):
        load_training_data("simcse-unsup", same).schedule(4, seed=0, no_duplicates=True)


def test_single_source_schedule_is_unchanged():
    """Checkpoints of earlier runs resume on the same batches: one source draws as before."""
    sched = BatchSchedule(100, 8, seed=3)
    g = torch.Generator().manual_seed(3 * 1_000_003 + 1)
    assert sched.global_indices(12) == torch.randperm(100, generator=g)[:8].tolist()


# ---------------------------------------------------------------------------------------------
# batch order
# ---------------------------------------------------------------------------------------------


def test_rank_shards_concatenate_to_the_global_batch():
    world, batch = 4, 8
    shards = [BatchSchedule(100, batch, seed=3, rank=r, world_size=world) for r in range(world)]
    single = BatchSchedule(100, batch, seed=3)
    for step in range(30):  # crosses epochs (12 batches per epoch)
        assert sum((s.indices(step) for s in shards), []) == single.indices(step)
    epoch0 = sum((single.indices(s) for s in range(12)), [])
    assert len(set(epoch0)) == 96  # no example twice within an epoch
    assert single.indices(0) != single.indices(12)  # a new permutation each epoch
    assert BatchSchedule(100, batch, seed=4).indices(0) != single.indices(0)
    with pytest.raises(DataError, match="not divisible"):
        BatchSchedule(100, 6, seed=0, rank=0, world_size=4)


# ---------------------------------------------------------------------------------------------
# ESimCSE word repetition
# ---------------------------------------------------------------------------------------------


def test_word_repetition_repeats_only_real_tokens():
    specials = {101, 102}
    ids = [101] + list(range(1000, 1020)) + [102]
    for seed in range(50):
        out = word_repetition_ids(ids, dup_rate=0.32, rng=random.Random(seed), special_ids=specials, max_length=64)
        assert out[0] == 101 and out[-1] == 102 and out.count(101) == 1 and out.count(102) == 1
        dup = len(out) - len(ids)
        assert 0 <= dup <= max(2, int(0.32 * 20))
        # removing consecutive duplicates gives back the sentence: repetition happens in place
        assert [t for i, t in enumerate(out) if i == 0 or t != out[i - 1]] == ids
    lengths = {len(word_repetition_ids(ids, dup_rate=0.32, rng=random.Random(s), special_ids=specials,
                                       max_length=64)) for s in range(200)}
    assert lengths == set(range(22, 22 + int(0.32 * 20) + 1))  # dup_len covers [0, int(0.32 N)]


def test_word_repetition_truncates_keeping_sep_and_short_sentences():
    specials = {101, 102}
    ids = [101] + list(range(1000, 1030)) + [102]
    out = word_repetition_ids(ids, dup_rate=1.0, rng=random.Random(0), special_ids=specials, max_length=32)
    assert len(out) <= 32 and out[-1] == 102
    short = [101, 7, 102]  # N=1: dup_len in [0, 2] capped at 1
    outs = {tuple(word_repetition_ids(short, dup_rate=0.32, rng=random.Random(s), special_ids=specials,
                                      max_length=32)) for s in range(20)}
    assert outs == {(101, 7, 102), (101, 7, 7, 102)}


def test_word_repetition_batch_is_deterministic_per_row_stream():
    ids = torch.tensor([[101, 5, 6, 7, 8, 102, 0], [101, 9, 10, 102, 0, 0, 0]])
    feats = {"input_ids": ids, "attention_mask": (ids != 0).long(), "token_type_ids": torch.zeros_like(ids)}
    kw = dict(dup_rate=0.5, special_ids={0, 101, 102}, max_length=32, pad_id=0)
    a = word_repetition(feats, rngs=[step_rng(1, 3, r) for r in range(2)], **kw)
    b = word_repetition(feats, rngs=[step_rng(1, 3, r) for r in range(2)], **kw)
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["attention_mask"], b["attention_mask"])
    assert set(a) == set(feats) and a["attention_mask"].sum(1).tolist() >= [6, 4]
    both = concat_features(feats, a, pad_id=0)
    assert both["input_ids"].shape == (4, max(7, a["input_ids"].shape[1]))
    with pytest.raises(ValueError, match="2 rows"):
        word_repetition(feats, rngs=[random.Random(0)], **kw)


# ---------------------------------------------------------------------------------------------
# config: defaults <- file <- CLI
# ---------------------------------------------------------------------------------------------


def test_config_file_then_cli(tmp_path):
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("method:\n  name: esimcse\n  queue_size: 256\noptim:\n  lr: 1.0e-4\nbatch-size: 32\n")
    cfg = parse_args(["--config", str(yaml_file), "--lr", "5e-5"])
    assert cfg.method.name == "esimcse" and cfg.method.queue_size == 256
    assert cfg.optim.lr == 5e-5 and cfg.run.batch_size == 32 and cfg.model.max_seq_length == 32
    json_file = tmp_path / "c.json"
    json_file.write_text(json.dumps({"run": {"precision": "bf16"}, "temperature": 0.1}))
    cfg = parse_args(["--config", str(json_file)])
    assert cfg.run.precision == "bf16" and cfg.method.temperature == 0.1


@pytest.mark.parametrize("text,message", [
    ("method:\n  name: moco\n", "is not one of simcse-unsup, simcse-sup, esimcse"),
    ("optim:\n  learning_rate: 1\n", "unknown option optim.learning_rate"),
    ("lr: fast\n", "expected a number"),
    ("method: [unclosed\n", "cannot parse config file"),
    ("batch-size: 1\n", "at least 2"),
])
def test_config_errors(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        parse_args(["--config", str(path)])


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        parse_args(["--config", str(tmp_path / "none.yaml")])


def test_shipped_fallback_vocabulary_tokenizes_like_the_trained_tokenizer():
    """The fixed fallback vocabulary behaves as the tokenizer it was trained as: a tokenizer rebuilt
    from a freshly trained one's vocabulary splits real sentences identically, and the shipped one
    covers the wiki sample with BERT's special-token layout."""
    from tokenizers.models import WordPiece

    from fastcse.data import _wordpiece_tokenizer, bundled_path, fallback_tokenizer, train_fallback_tokenizer

    lines = [l for l in bundled_path("wiki_sample.txt").read_text(encoding="utf-8").splitlines() if l.strip()]
    sample = random.Random(3).sample(lines, 300) + ["Ünïcode, ÄCCENTS and 12,345 numbers!", "a"]
    trained = train_fallback_tokenizer(vocab_size=3000)
    rebuilt = _wordpiece_tokenizer(WordPiece(trained.get_vocab(), unk_token="[UNK]"))
    assert rebuilt(sample)["input_ids"] == trained(sample)["input_ids"]
    assert rebuilt("one sentence", "and two")["input_ids"] == trained("one sentence", "and two")["input_ids"]

    shipped = fallback_tokenizer()
    assert len(shipped) == 8192
    assert shipped.convert_ids_to_tokens(list(range(5))) == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert shipped.pad_token_id == 0
    ids = shipped(lines[:2000])["input_ids"]
    assert all(row[0] == shipped.cls_token_id and row[-1] == shipped.sep_token_id for row in ids)
    unknown = sum(row.count(shipped.unk_token_id) for row in ids) / sum(len(row) for row in ids)
    assert unknown < 0.001, unknown
    assert shipped.decode(shipped("A man is playing a guitar.")["input_ids"], skip_special_tokens=True) == \
        "a man is playing a guitar."
