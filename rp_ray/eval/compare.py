"""Side-by-side report of base vs fine-tuned runs (table, JSON, bar chart, the samples that changed most)."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rp_ray.eval.metrics import METRIC_KEYS

log = logging.getLogger(__name__)

TOP_CHANGES = 20
HEADERS = ("BLEU-4", "ROUGE-1", "ROUGE-2", "ROUGE-L")
# Above this share of empty replies a run's scores measure silence, not quality: the table says so.
MAX_EMPTY_SHARE = 0.2


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def empty_share(predictions: list[dict[str, Any]]) -> float:
    """Share of predicted rows (rows with an ``error`` are not predictions) whose reply is blank."""
    preds = [p for p in predictions if "error" not in p]
    return sum(1 for p in preds if not str(p.get("predict", "")).strip()) / len(preds) if preds else 0.0


def empty_shares(out: Path, runs: list[str]) -> dict[str, float]:
    """``empty_share`` of each run's ``generated_predictions.jsonl`` in ``out``."""
    return {run: empty_share(_read_jsonl(out / run / "generated_predictions.jsonl")) for run in runs}


def empty_warnings(empty: Mapping[str, float]) -> list[str]:
    """One line per run whose replies are mostly empty: its scores are no measure of the model."""
    return [
        f"WARNING: {run}: {share:.0%} of its replies are empty (over {MAX_EMPTY_SHARE:.0%}); its scores measure "
        f"silence, not role-play quality. The model ends its turn at once: train longer or with a higher "
        f"learning rate, or check the base model"
        for run, share in empty.items()
        if share > MAX_EMPTY_SHARE
    ]


def markdown_table(
    model_name: str, results: dict[str, dict[str, Any]], empty: Mapping[str, float] | None = None
) -> str:
    """The comparison table: one row per run (``predict samples/s`` counts prediction time only, ``job wall s`` the
    whole eval job); with ``empty`` (run -> share of empty replies), a column
    for it and a warning line under the table for every run over ``MAX_EMPTY_SHARE``."""
    head = "| model | run | BLEU-4 | ROUGE-1 | ROUGE-2 | ROUGE-L | predict samples/s | job wall s | scored / total |"
    lines = [head + (" empty replies |" if empty is not None else ""), "|---" * (9 + (empty is not None)) + "|"]
    for run, r in results.items():
        vals = " | ".join(f"{r[f'predict_{k}']:.2f}" for k in METRIC_KEYS)
        speed = f"{r['predict_samples_per_second']:.1f}"
        wall = f"{r['job_wall_seconds']:.0f}" if "job_wall_seconds" in r else "-"
        row = f"| {model_name} | {run} | {vals} | {speed} | {wall} | {r['n_scored']} / {r['n_total']} |"
        if empty is not None:
            share = empty.get(run, 0.0)
            row += f" {share:.0%}{' (WARNING)' if share > MAX_EMPTY_SHARE else ''} |"
        lines.append(row)
    warnings = empty_warnings(empty or {})
    return "\n".join(lines + ([""] + warnings if warnings else []))


def top_changes(out: Path, base: str, run: str, k: int = TOP_CHANGES) -> list[dict[str, Any]]:
    """The k val rows whose mean score moved most between ``base`` and ``run`` (either direction)."""

    def by_index(name: str) -> dict[int, float]:
        return {
            s["index"]: sum(s[m] for m in METRIC_KEYS) / len(METRIC_KEYS)
            for s in _read_jsonl(out / name / "sample_scores.jsonl")
        }

    b, t = by_index(base), by_index(run)
    preds_b = _read_jsonl(out / base / "generated_predictions.jsonl")
    preds_t = _read_jsonl(out / run / "generated_predictions.jsonl")
    return [
        {
            "index": i,
            "delta": round(t[i] - b[i], 4),
            "base_score": round(b[i], 4),
            "tuned_score": round(t[i], 4),
            "prompt_tail": preds_b[i]["prompt"][-200:],
            "label": preds_b[i]["label"],
            "base_predict": preds_b[i]["predict"],
            "tuned_predict": preds_t[i]["predict"],
        }
        for i in sorted(b.keys() & t.keys(), key=lambda i: -abs(t[i] - b[i]))[:k]
    ]


def bar_chart(results: dict[str, dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = list(results)
    width = 0.8 / max(len(runs), 1)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for j, run in enumerate(runs):
        xs = [i + j * width for i in range(len(METRIC_KEYS))]
        vals = [results[run][f"predict_{k}"] for k in METRIC_KEYS]
        bars = ax.bar(xs, vals, width, label=run)
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_xticks([i + width * (len(runs) - 1) / 2 for i in range(len(METRIC_KEYS))], HEADERS)
    ax.set(ylabel="score (x100)", title=title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_comparison(out: Path, model_name: str, results: dict[str, dict[str, Any]]) -> dict[str, Path]:
    """comparison.md / comparison.json / comparison.png in ``out``; the base run is compared with every other run.

    Runs whose replies are mostly empty are flagged in the table and logged as warnings.
    """
    empty = empty_shares(out, list(results))
    warnings = empty_warnings(empty)
    for w in warnings:
        log.warning("%s", w)
    table = markdown_table(model_name, results, empty)
    changes = {run: top_changes(out, "base", run) for run in results if run != "base" and "base" in results}
    md = [f"# Base vs fine-tuned: {model_name}", "", table, ""]
    for run, rows in changes.items():
        md += [
            f"## {run}: the {len(rows)} samples whose mean score changed most vs base",
            "",
            "| row | delta | base | tuned | label | base reply | tuned reply |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            cells = [r["label"], r["base_predict"], r["tuned_predict"]]
            esc = [c.replace("|", "\\|").replace("\n", " ")[:120] for c in cells]
            md.append(
                f"| {r['index']} | {r['delta']:+.2f} | {r['base_score']:.2f} | {r['tuned_score']:.2f} | "
                f"{' | '.join(esc)} |"
            )
        md.append("")
    paths = {"markdown": out / "comparison.md", "json": out / "comparison.json", "png": out / "comparison.png"}
    paths["markdown"].write_text("\n".join(md), encoding="utf-8")
    report = {
        "model": model_name,
        "results": results,
        "empty_reply_share": empty,
        "empty_reply_warnings": warnings,
        "top_changes": changes,
    }
    paths["json"].write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
    bar_chart(results, paths["png"], f"{model_name}: base vs fine-tuned on the val set")
    return paths
