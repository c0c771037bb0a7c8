"""Issue #15 in the training program: sentence-transformers data (columns, pairs, several sources),
the model card of every export, logging levels, quiet library loads, --report-to."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from fastcse.train import main
from tests.test_train import assets, step_losses, tiny_args  # noqa: F401  (assets: a fixture)

ROWS = [(f"a cat number {i} sits", f"cat {i} is sitting", f"a dog {i} runs") for i in range(24)]


def write_csv(path: Path, header: list[str]) -> Path:
    lines = [",".join(header)] + [",".join(row[:len(header)]) for row in ROWS]
    path.write_text("\n".join(lines) + "\n")
    return path


def sup_args(assets, out, *files, extra=()):
    return tiny_args(assets, out, "--method", "simcse-sup", "--max-steps", "2", "--eval-steps", "0",
                     "--save-steps", "0", "--train-file", *map(str, files), *extra)


def test_sentence_transformers_triplet_columns_train(assets, tmp_path, capsys):
    data = write_csv(tmp_path / "triplets.csv", ["anchor", "positive", "negative"])
    assert main(sup_args(assets, tmp_path / "run", data, extra=["--hard-negative-weight", "0.5"])) == 0
    assert "triplets" in capsys.readouterr().out
    assert sorted(step_losses(tmp_path / "run")) == [1, 2]


def test_pairs_train_supervised_simcse_without_hard_negatives(assets, tmp_path, capsys, monkeypatch):
    import fastcse.losses

    seen = []
    real = fastcse.losses.info_nce

    def spy(anchors, positives, hard_negatives=None, **kw):
        seen.append(hard_negatives)
        return real(anchors, positives, hard_negatives, **kw)

    monkeypatch.setattr(fastcse.losses, "info_nce", spy)
    data = write_csv(tmp_path / "pairs.csv", ["anchor", "positive"])
    assert main(sup_args(assets, tmp_path / "run", data)) == 0
    assert "pairs" in capsys.readouterr().out
    assert len(seen) == 2 and all(h is None for h in seen)


def test_two_train_files_round_robin_and_the_summary_names_both(assets, tmp_path, capsys):
    a = write_csv(tmp_path / "first.csv", ["anchor", "positive", "negative"])
    b = tmp_path / "second.jsonl"
    b.write_text("".join(json.dumps({"anchor": x, "positive": y, "negative": z}) + "\n" for x, y, z in ROWS))
    assert main(sup_args(assets, tmp_path / "run", a, b, extra=["--mix", "round_robin", "--no-duplicates"])) == 0
    out = capsys.readouterr().out
    assert "2 sources, mix=round_robin" in out and "first.csv" in out and "second.jsonl" in out
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["data"]
    assert saved["train_files"] == [str(a), str(b)] and saved["mix"] == "round_robin" and saved["no_duplicates"]


def test_resume_refuses_other_train_files_or_mix(assets, tmp_path, capsys):
    a = write_csv(tmp_path / "first.csv", ["anchor", "positive", "negative"])
    b = write_csv(tmp_path / "second.csv", ["sent0", "sent1", "hard_neg"])
    run = tmp_path / "run"
    assert main(sup_args(assets, run, a, b)) == 0
    capsys.readouterr()
    assert main(sup_args(assets, run, a, b, extra=["--mix", "round_robin", "--resume"])) == 2
    err = capsys.readouterr().err
    assert "--mix proportional in the checkpoint, round_robin now" in err
    assert main(sup_args(assets, run, a, extra=["--resume"])) == 2
    assert "--train-file" in capsys.readouterr().err


def test_the_final_model_card_names_base_model_method_and_data(assets, tmp_path):
    data = write_csv(tmp_path / "my-triplets.csv", ["anchor", "positive", "negative"])
    args = sup_args(assets, tmp_path / "run", data)
    args.remove("--no-export")
    assert main(args) == 0
    card = (tmp_path / "run" / "final" / "README.md").read_text()
    assert "simcse-sup" in card and "my-triplets.csv" in card and "InfoNCE" in card
    # a random model has no base model to name; one loaded from a folder does
    base = tmp_path / "run" / "final"
    args2 = [a for a in tiny_args(assets, tmp_path / "run2", "--method", "simcse-sup", "--max-steps", "1",
                                  "--save-steps", "0", "--train-file", str(data))]
    args2 = args2[4:]  # without --model-config / --tokenizer
    args2.remove("--no-export")
    assert main(["--model", str(base), *args2]) == 0
    assert str(base) in (tmp_path / "run2" / "final" / "README.md").read_text()


def test_log_level_warning_prints_no_info_lines(assets, tmp_path, capsys):
    assert main(tiny_args(assets, tmp_path / "run", "--max-steps", "2", "--save-steps", "0",
                          "--log-level", "WARNING")) == 0
    captured = capsys.readouterr()
    assert captured.out == "" and "fastcse.train:" not in captured.err
    assert main(tiny_args(assets, tmp_path / "run2", "--max-steps", "1", "--save-steps", "0")) == 0
    assert "fastcse.train: method=" in capsys.readouterr().out  # INFO, the default, shows them


def test_progress_loss_keeps_small_values():
    from fastcse.runlog import format_loss

    assert format_loss(1.2e-5) == "1.2e-05" and float(format_loss(1e-5)) != 0
    assert format_loss(2.345678) == "2.35"


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_report_to_wandb_without_wandb_is_one_line(assets, tmp_path, capsys):
    assert main(tiny_args(assets, tmp_path / "run", "--max-steps", "1", "--report-to", "wandb")) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastcse.train: error: --report-to wandb needs the `wandb` package")
    assert len(err.strip().splitlines()) == 1


def test_no_progress_export_prints_no_library_bars(assets, tmp_path, capfd):
    args = tiny_args(assets, tmp_path / "run", "--max-steps", "1", "--save-steps", "0")
    args.remove("--no-export")
    assert main(args) == 0
    err = capfd.readouterr().err
    assert (tmp_path / "run" / "final" / "modules.json").is_file()
    for noise in ("Writing model shards", "Loading weights", "it/s]", "Setting accelerator", "UNEXPECTED"):
        assert noise not in err, err
