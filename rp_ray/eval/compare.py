"""Side-by-side report of base vs fine-tuned runs (table, JSON, bar chart, the samples that changed most)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rp_ray.metrics import METRIC_KEYS

TOP_CHANGES = 20
HEADERS = ("BLEU-4", "ROUGE-1", "ROUGE-2", "ROUGE-L")


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def markdown_table(model_name: str, results: dict[str, dict[str, Any]]) -> str:
    """The comparison table users know from LLaMA-Factory model cards: one row per run."""
    lines = ["| model | run | BLEU-4 | ROUGE-1 | ROUGE-2 | ROUGE-L | predict samples/s | scored / total |",
             "|---|---|---|---|---|---|---|---|"]
    for run, r in results.items():
        vals = " | ".join(f"{r[f'predict_{k}']:.2f}" for k in METRIC_KEYS)
        lines.append(f"| {model_name} | {run} | {vals} | {r['predict_samples_per_second']:.1f} | {r['n_scored']} / {r['n_total']} |")
    return "\n".join(lines)


def top_changes(out: Path, base: str, run: str, k: int = TOP_CHANGES) -> list[dict[str, Any]]:
    """The k val rows whose mean score moved most between ``base`` and ``run`` (either direction)."""
    def by_index(name: str) -> dict[int, float]:
        return {s["index"]: sum(s[m] for m in METRIC_KEYS) / len(METRIC_KEYS) for s in _read_jsonl(out / name / "sample_scores.jsonl")}

    b, t = by_index(base), by_index(run)
    preds_b = _read_jsonl(out / base / "generated_predictions.jsonl")
    preds_t = _read_jsonl(out / run / "generated_predictions.jsonl")
    rows = []
    for i in sorted(b.keys() & t.keys(), key=lambda i: -abs(t[i] - b[i]))[:k]:
        rows.append({"index": i, "delta": round(t[i] - b[i], 4), "base_score": round(b[i], 4), "tuned_score": round(t[i], 4),
                     "prompt_tail": preds_b[i]["prompt"][-200:], "label": preds_b[i]["label"],
                     "base_predict": preds_b[i]["predict"], "tuned_predict": preds_t[i]["predict"]})
    return rows


def bar_chart(results: dict[str, dict[str, Any]], path: Path, title: str) -> Path:
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
    return path


def write_comparison(out: Path, model_name: str, results: dict[str, dict[str, Any]]) -> dict[str, Path]:
    """comparison.md / comparison.json / comparison.png in ``out``; the base run is compared with every other run."""
    table = markdown_table(model_name, results)
    changes = {run: top_changes(out, "base", run) for run in results if run != "base" and "base" in results}
    md = [f"# Base vs fine-tuned: {model_name}", "", table, ""]
    for run, rows in changes.items():
        md += [f"## {run}: the {len(rows)} samples whose mean score changed most vs base", "",
               "| row | delta | base | tuned | label | base reply | tuned reply |", "|---|---|---|---|---|---|---|"]
        for r in rows:
            cells = [r["label"], r["base_predict"], r["tuned_predict"]]
            esc = [c.replace("|", "\\|").replace("\n", " ")[:120] for c in cells]
            md.append(f"| {r['index']} | {r['delta']:+.2f} | {r['base_score']:.2f} | {r['tuned_score']:.2f} | {' | '.join(esc)} |")
        md.append("")
    paths = {"markdown": out / "comparison.md", "json": out / "comparison.json", "png": out / "comparison.png"}
    paths["markdown"].write_text("\n".join(md), encoding="utf-8")
    paths["json"].write_text(json.dumps({"model": model_name, "results": results, "top_changes": changes},
                                        indent=2, ensure_ascii=False), encoding="utf-8")
    bar_chart(results, paths["png"], f"{model_name}: base vs fine-tuned on the val set")
    return paths
