"""What keeps the demo honest: warnings for mostly-empty replies and for a loss that barely moved,
and the cached, reproducible build of the pretrained default base model.

Everything runs on constructed inputs or on a model small enough to pretrain in about a second.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
from conftest import REPO

from rp_ray.cli.main import main as rp_ray_main
from rp_ray.config import TrainConfig, load_config
from rp_ray.eval.compare import MAX_EMPTY_SHARE, empty_share, markdown_table, write_comparison
from rp_ray.llm.tiny_model import STAMP, PretrainConfig, build_tiny_model, built_key
from rp_ray.train.state import TrainState
from rp_ray.train.summary import loss_warnings, write_summary

RESULT = {
    "predict_bleu-4": 1.0,
    "predict_rouge-1": 2.0,
    "predict_rouge-2": 0.5,
    "predict_rouge-l": 1.5,
    "predict_samples_per_second": 10.0,
    "n_total": 10,
    "n_scored": 10,
    "n_error": 0,
}


def _history(losses: list[float]) -> list[dict]:
    return [{"step": i + 1, "loss": x, "lr": 1e-3} for i, x in enumerate(losses)]


def _write_run(out: Path, run: str, replies: list[str]) -> None:
    d = out / run
    d.mkdir(parents=True)
    preds = [{"prompt": f"p{i}", "predict": r, "label": "「好。」"} for i, r in enumerate(replies)]
    (d / "generated_predictions.jsonl").write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in preds))
    scores = [
        {"index": i, "bleu-4": 0.0, "rouge-1": float(bool(r)), "rouge-2": 0.0, "rouge-l": 0.0}
        for i, r in enumerate(replies)
    ]
    (d / "sample_scores.jsonl").write_text("".join(json.dumps(s) + "\n" for s in scores))


# -- empty replies -------------------------------------------------------------------------------


def test_empty_share_counts_blank_replies_and_skips_errors():
    preds = [{"predict": ""}, {"predict": "  \n"}, {"predict": "「好。」"}, {"predict": "x"}, {"error": "boom"}]
    assert empty_share(preds) == 0.5
    assert empty_share([]) == 0.0


def test_table_warns_about_a_run_with_mostly_empty_replies(tmp_path, caplog):
    _write_run(tmp_path, "base", ["「嗯。」"] * 10)
    _write_run(tmp_path, "tuned", [""] * 7 + ["「好。」"] * 3)
    _write_run(tmp_path, "edge", [""] * 2 + ["「好。」"] * 8)  # exactly 20%: not over the line
    results = {"base": RESULT, "tuned": RESULT | {"predict_rouge-1": 0.0}, "edge": RESULT}
    with caplog.at_level(logging.WARNING, logger="rp_ray.eval.compare"):
        paths = write_comparison(tmp_path, "tiny", results)
    md = paths["markdown"].read_text(encoding="utf-8")
    assert "| tiny | tuned |" in md and "| 70% (WARNING) |" in md
    assert "| tiny | base |" in md and "| 0% |" in md and "| 20% |" in md
    warning_lines = [x for x in md.splitlines() if x.startswith("WARNING:")]
    assert len(warning_lines) == 1 and "tuned: 70% of its replies are empty" in warning_lines[0]
    assert any("tuned: 70%" in r.message for r in caplog.records if r.levelno == logging.WARNING)
    data = json.loads(paths["json"].read_text(encoding="utf-8"))
    assert data["empty_reply_share"] == {"base": 0.0, "tuned": 0.7, "edge": 0.2}
    assert len(data["empty_reply_warnings"]) == 1 and MAX_EMPTY_SHARE == 0.2


def test_table_without_empty_shares_keeps_its_columns():
    table = markdown_table("tiny", {"base": RESULT})
    assert table.splitlines()[0].endswith("| scored / total |") and "WARNING" not in table


# -- loss that barely moved ----------------------------------------------------------------------


def test_flat_loss_is_flagged():
    """A random-weight model that only learns to end its turn at once: 8.34 -> 8.21 over 37 steps."""
    flat = [8.34 - 0.13 * i / 36 for i in range(37)]
    (w,) = loss_warnings(_history(flat))
    assert w.startswith("loss barely moved") and "optim.learning_rate" in w


def test_falling_loss_is_not_flagged():
    falling = [6.0 * 0.97**i for i in range(40)]  # about -70%
    assert loss_warnings(_history(falling)) == []


def test_one_lucky_last_step_does_not_hide_a_flat_run():
    """The last tenth is averaged: a low last batch (8.3 -> 7.0 alone is -16%) cannot pass for learning."""
    flat = [8.3] * 39 + [7.0]
    assert loss_warnings(_history(flat))


def test_a_run_that_learns_in_its_first_steps_is_not_flagged():
    """A fast early drop then a plateau is learning: the reference is the first step, before any update."""
    early = [7.07, 6.8, 6.7] + [6.6] * 37
    assert loss_warnings(_history(early)) == []


def test_too_few_steps_are_flagged():
    assert "too few" in loss_warnings(_history([5.0]))[0]


def test_summary_json_and_log_carry_the_warning(tmp_path, caplog):
    cfg = load_config(TrainConfig, REPO / "jobs/configs/tiny_llama3.yaml", [f"output_dir={tmp_path}"])
    state = TrainState(
        step=37,
        total_steps=37,
        steps_per_epoch=37,
        tokens=1000,
        train_seconds=10.0,
        padding_ratio=0.1,
        world_size=2,
        history=_history([8.34 - 0.0036 * i for i in range(37)]),
    )
    with caplog.at_level(logging.WARNING, logger="rp_ray.train.summary"):
        summary_path, plot_path, summary = write_summary(state, cfg, {}, tmp_path)
    saved = json.loads(summary_path.read_text())
    assert saved["warnings"] == summary["warnings"] and len(saved["warnings"]) == 1
    assert "loss barely moved" in saved["warnings"][0]
    assert any("loss barely moved" in r.message for r in caplog.records)
    assert plot_path.stat().st_size > 1000


# -- the pretrained base model's build -------------------------------------------------------------

SMALL = dict(vocab_size=512, hidden_size=32, num_layers=1)
PRE = PretrainConfig(steps=20, seq_len=32, batch_size=4, learning_rate=1e-2, warmup_steps=2)


@pytest.fixture
def corpus(tmp_path) -> Path:
    """A 40-conversation slice of the train split: enough text for a tokenizer and a few steps."""
    rows = json.loads((REPO / "data/sample/haruhi_train.json").read_text(encoding="utf-8"))[:40]
    p = tmp_path / "train.json"
    p.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    return p


def test_pretraining_lowers_the_loss_is_reproducible_and_writes_a_card(corpus, tmp_path):
    a = build_tiny_model("llama3", tmp_path / "a", corpus_file=corpus, **SMALL, pretrain=PRE)
    b = build_tiny_model("llama3", tmp_path / "b", corpus_file=corpus, **SMALL, pretrain=PRE)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    meta = json.loads((a / STAMP).read_text())
    losses = meta["loss_curve"]
    assert len(losses) == 20 and sum(losses[-5:]) / 5 < losses[0] - 0.2
    assert losses[0] < math.log(SMALL["vocab_size"]) - 1  # step 0 is the bigram model, far below a uniform guess
    card = (a / "README.md").read_text(encoding="utf-8")
    assert (
        "bigram model" in card
        and "pretrained as a plain causal language model" in card
        and "never read" in card
        and str(corpus) in card
    )
    random_weights = build_tiny_model("llama3", tmp_path / "r", corpus_file=corpus, **SMALL)
    assert (random_weights / "model.safetensors").read_bytes() != (a / "model.safetensors").read_bytes()


def test_build_is_cached_until_an_input_changes(corpus, tmp_path, caplog):
    out = tmp_path / "m"
    build_tiny_model("llama3", out, corpus_file=corpus, **SMALL, pretrain=PRE)
    key, mtime = built_key(out), (out / "model.safetensors").stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="rp_ray.llm.tiny_model"):
        build_tiny_model("llama3", out, corpus_file=corpus, **SMALL, pretrain=PRE)
    assert "up to date" in caplog.text
    assert built_key(out) == key and (out / "model.safetensors").stat().st_mtime_ns == mtime  # not rebuilt

    build_tiny_model("llama3", out, corpus_file=corpus, **SMALL, pretrain=PRE.model_copy(update={"steps": 3}))
    assert built_key(out) != key
    key2 = built_key(out)
    rows = json.loads(corpus.read_text(encoding="utf-8"))
    corpus.write_text(json.dumps(rows[:-1], ensure_ascii=False), encoding="utf-8")  # one conversation less
    build_tiny_model("llama3", out, corpus_file=corpus, **SMALL, pretrain=PRE.model_copy(update={"steps": 3}))
    assert built_key(out) not in (key, key2)


def test_build_refuses_a_folder_it_did_not_write(corpus, tmp_path):
    out = tmp_path / "real-model"
    out.mkdir()
    (out / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="was not written by `rp-ray tiny-model`"):
        build_tiny_model("llama3", out, corpus_file=corpus, **SMALL)
    assert (out / "config.json").read_text() == "{}"


def test_tiny_model_command_pretrains(corpus, tmp_path, capsys):
    out = tmp_path / "cli"
    rc = rp_ray_main(
        [
            "tiny-model",
            "--family",
            "llama3",
            "--out",
            str(out),
            "--corpus",
            str(corpus),
            "--pretrain",
            "--pretrain-steps",
            "2",
            "--vocab-size",
            "512",
            "--hidden-size",
            "32",
            "--num-layers",
            "1",
        ]
    )
    assert rc == 0 and "model card" in capsys.readouterr().out
    meta = json.loads((out / STAMP).read_text())
    assert meta["pretrain"]["steps"] == 2 and meta["hidden_size"] == 32 and len(meta["loss_curve"]) == 2
