"""Readers (file:line problems, --on-bad-row), batch order and sharding, word repetition, config merge."""

from __future__ import annotations

import json
import random

import pytest
import torch

from fastcse.config import ConfigError, parse_args
from fastcse.data import (
    BatchSchedule,
    DataError,
    concat_features,
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
    with pytest.raises(DataError, match=r"missing column\(s\) sent0, sent1, hard_neg; the header has premise, hypothesis"):
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
    assert report.problems[1] == f"{path}:4: column 'hard_neg' is missing or not a string"


def test_missing_file_and_method_file_mismatch(tmp_path):
    with pytest.raises(DataError, match="training file not found"):
        read_training_data("simcse-unsup", tmp_path / "nope.txt")
    csv_path = tmp_path / "t.csv"
    csv_path.write_text("sent0,sent1,hard_neg\na,b,c\n")
    with pytest.raises(DataError, match="simcse-unsup reads a text file"):
        read_training_data("simcse-unsup", csv_path)


def test_bundled_data():
    sentences, _ = read_training_data("simcse-unsup", None)
    triplets, _ = read_training_data("simcse-sup", None, max_examples=10)
    assert len(sentences) == 11914 and len(triplets) == 10 and all(len(t) == 3 for t in triplets)


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
