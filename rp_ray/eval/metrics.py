"""BLEU-4 and ROUGE-1/2/L exactly as LLaMA-Factory's predict step computes them.

Per (prediction, label) pair:
- BLEU-4: nltk ``sentence_bleu([list(label)], list(pred))`` on Unicode characters, default 4-gram weights,
  smoothing method3.
- ROUGE: both texts cut by jieba (accurate mode) and joined by spaces; if either has no non-space token all three
  scores are 0; otherwise rouge-chinese 1.0.3 semantics, re-implemented here as pure functions (so the top-level
  ``rouge`` package that rouge-chinese installs is never imported at run time): sentences split at 。！？? / ...... /
  ……, words = the sentences' space-split tokens flattened, ROUGE-N over the *set* of n-grams, ROUGE-L over the
  plain LCS of the word lists, F = 2PR / (P + R + 1e-8).
- Each score x100, rounded to 4 decimals; a reported figure is the mean of those.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

METRIC_KEYS = ("bleu-4", "rouge-1", "rouge-2", "rouge-l")
_SMOOTH = SmoothingFunction().method3

# rouge-chinese's sentence cutter, rule by rule
_CUTS = (
    (re.compile(r"([。！？?])([^”’])"), r"\1\n\2"),
    (re.compile(r"(\.{6})([^”’])"), r"\1\n\2"),
    (re.compile(r"(…{2})([^”’])"), r"\1\n\2"),
    (re.compile(r"([。！？?][”’])([^，。！？?])"), r"\1\n\2"),
)


def _jieba():
    import logging

    import jieba

    jieba.setLogLevel(logging.WARNING)
    return jieba


def bleu4(pred: str, label: str) -> float:
    """Character-level sentence BLEU-4 with smoothing method3, x100, 4 decimals."""
    return round(float(sentence_bleu([list(label)], list(pred), smoothing_function=_SMOOTH)) * 100, 4)


def _words(spaced: str) -> list[str]:
    """rouge-chinese's view of a space-joined text: cut into sentences, whitespace-normalised, flattened."""
    para = spaced
    for pattern, repl in _CUTS:
        para = pattern.sub(repl, para)
    sentences = [" ".join(s.split()) for s in para.rstrip().split("\n") if len(s) > 0]
    return [w for s in sentences for w in s.split(" ")]


def _f(overlap: int, hyp_count: int, ref_count: int) -> float:
    p = overlap / hyp_count if hyp_count else 0.0
    r = overlap / ref_count if ref_count else 0.0
    return 2.0 * ((p * r) / (p + r + 1e-8))


def _ngram_set(words: list[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def _lcs_len(x: Sequence[str], y: Sequence[str]) -> int:
    prev = [0] * (len(y) + 1)
    for xi in x:
        cur = [0]
        for j, yj in enumerate(y, start=1):
            cur.append(prev[j - 1] + 1 if xi == yj else max(prev[j], cur[j - 1]))
        prev = cur
    return prev[-1]


def rouge_from_words(hyp_tokens: list[str], ref_tokens: list[str]) -> dict[str, float]:
    """ROUGE-1/2/L F (x100, 4 decimals) of two jieba token lists, rouge-chinese semantics."""
    hyp_spaced, ref_spaced = " ".join(hyp_tokens), " ".join(ref_tokens)
    if not hyp_spaced.split() or not ref_spaced.split():
        return {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0}
    hyp, ref = _words(hyp_spaced), _words(ref_spaced)
    out = {}
    for n in (1, 2):
        h, r = _ngram_set(hyp, n), _ngram_set(ref, n)
        out[f"rouge-{n}"] = round(_f(len(h & r), len(h), len(r)) * 100, 4)
    out["rouge-l"] = round(_f(_lcs_len(ref, hyp), len(hyp), len(ref)) * 100, 4)
    return out


def score_pair(pred: str, label: str) -> dict[str, float]:
    """All four per-sample scores of one prediction against its label."""
    jieba = _jieba()
    scores = rouge_from_words(list(jieba.cut(pred)), list(jieba.cut(label)))
    scores["bleu-4"] = bleu4(pred, label)
    return {k: scores[k] for k in METRIC_KEYS}


def score_pairs(preds: Sequence[str], labels: Sequence[str]) -> list[dict[str, float]]:
    if len(preds) != len(labels):
        raise ValueError(f"{len(preds)} predictions but {len(labels)} labels")
    return [score_pair(p, lab) for p, lab in zip(preds, labels)]


def mean_scores(scores: Sequence[dict[str, float]]) -> dict[str, float]:
    """LLaMA-Factory's reported figures: ``predict_<metric>`` = mean of the per-sample scores."""
    if not scores:
        return {f"predict_{k}": 0.0 for k in METRIC_KEYS}
    return {f"predict_{k}": sum(s[k] for s in scores) / len(scores) for k in METRIC_KEYS}


def score_pairs_parallel(preds: Sequence[str], labels: Sequence[str], chunk_size: int = 2000) -> list[dict[str, float]]:
    """``score_pairs`` spread over the Ray cluster in chunks (order kept). Starts a local Ray if none is running."""
    import ray

    if len(preds) != len(labels):
        raise ValueError(f"{len(preds)} predictions but {len(labels)} labels")
    if not ray.is_initialized():
        ray.init()
    task = ray.remote(num_cpus=1)(score_pairs)
    starts = range(0, len(preds), chunk_size)
    refs = [task.remote(preds[i : i + chunk_size], labels[i : i + chunk_size]) for i in starts]
    return [s for chunk in ray.get(refs) for s in chunk]
