"""Token counts of a job's datasets: exact, through the job's own encoding, or from measured statistics.

Exact: with the model's tokenizer here, the configured splits are read and checked as the job reads them
(``rp_ray.data.report.load_splits``) and encoded by the job's own functions: training's
``rp_ray.preparation.encode_split``, evaluation's ``rp_ray.llm.template.encode_prediction``.

Measured statistics: without the tokenizer (a hub model whose files are not here), the totals below stand in. They
were measured with the real Llama-3.1 and gpt-oss (o200k_harmony) vocabularies on the full ChatHaruhi splits as
LLaMA-Factory's training encodes them at cutoff 2048; rp_ray's encodings equal LLaMA-Factory's on every row. Rows
are still read (no tokenizer needed): each row's tokens are its characters times the split's tokens per character,
so the totals are the measured ones and the spread of lengths (padding, attention, the longest micro-batch) follows
the rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from rp_ray.config import ConfigError, DataConfig, EvalConfig, ModelConfig, TrainConfig
from rp_ray.data import Conversation
from rp_ray.plan.shapes import ModelShape


@dataclass(frozen=True)
class SplitStats:
    """One split's token statistics as training encodes it (cutoff 2048)."""

    examples: int
    tokens: int
    supervised: int
    mean: int
    p50: int
    p95: int
    max: int
    cut_1024: int
    cut_2048: int


# (template, dataset) -> statistics measured with the real tokenizer (see the module docstring)
MEASURED_STATS: dict[tuple[str, str], SplitStats] = {
    ("llama3", "haruhi_train"): SplitStats(9792, 6_220_059, 614_872, 635, 583, 1123, 2035, 694, 0),
    ("llama3", "haruhi_val"): SplitStats(664, 422_472, 40_851, 636, 594, 1113, 1603, 47, 0),
    ("gpt_oss", "haruhi_train"): SplitStats(9792, 6_203_328, 610_517, 634, 584, 1112, 2048, 669, 1),
    ("gpt_oss", "haruhi_val"): SplitStats(664, 421_207, 40_484, 634, 593, 1097, 1561, 46, 0),
}
MEASURED_CUTOFF = 2048
MEASURED_SOURCE = (
    "measured with the real tokenizer ({tokenizer}) on the full split at cutoff 2048; per-row lengths from "
    "each row's characters at the split's tokens per character"
)
TOKENIZER_NAMES = {"llama3": "Llama-3.1", "gpt_oss": "gpt-oss o200k_harmony"}
# template tokens around each message (header, role, end marker) and a row's start: only the spread of lengths
# uses them, the totals are the measured ones
MESSAGE_OVERHEAD_TOKENS = 5


@dataclass
class SplitTokens:
    """A split as a job encodes it: per row, the tokens it computes and the tokens that count.

    Training: ``lengths`` = input ids after cutoff, ``supervised`` = labelled ids. Evaluation: ``lengths`` = prompt
    ids, ``supervised`` = reply tokens (the label's length, capped at max_new_tokens and the context left).
    """

    datasets: list[str]
    lengths: list[int]
    supervised: list[int]
    truncated: int
    exact: bool
    source: str
    notes: list[str] = field(default_factory=list)

    @classmethod
    def from_rows(cls, rows: list[dict[str, Any]], datasets: list[str], cutoff_len: int) -> SplitTokens:
        """A split already encoded by ``rp_ray.preparation.encode_split`` (``input_ids`` and ``labels`` per row)."""
        from rp_ray.llm.template import IGNORE_INDEX

        lengths = [len(r["input_ids"]) for r in rows]
        return cls(
            datasets,
            lengths,
            [sum(1 for x in r["labels"] if x != IGNORE_INDEX) for r in rows],
            sum(n >= cutoff_len for n in lengths),
            True,
            "exact: the rows the job encoded",
        )

    @property
    def examples(self) -> int:
        return len(self.lengths)

    @property
    def tokens(self) -> int:
        return sum(self.lengths)

    @property
    def supervised_tokens(self) -> int:
        return sum(self.supervised)

    @property
    def mean(self) -> float:
        return self.tokens / self.examples if self.examples else 0.0

    @property
    def max(self) -> int:
        return max(self.lengths, default=0)

    @property
    def supervised_share(self) -> float:
        return self.supervised_tokens / self.tokens if self.tokens else 0.0


def _conversations(data: DataConfig, split: str) -> list[Conversation]:
    from rp_ray.data.report import load_splits

    keep_train = data if split == "train" else data.model_copy(update={"train": []})
    train, val, _ = load_splits(keep_train)
    return train if split == "train" else val


def _tokenizer(shape: ModelShape, model: ModelConfig):
    """The model's tokenizer when its folder is here and holds one, else None."""
    from rp_ray.llm.models import ModelDirError, load_tokenizer
    from rp_ray.llm.template import get_template

    if shape.local_dir is None:
        return None
    try:
        return load_tokenizer(shape.local_dir, get_template(model.template))
    except (ModelDirError, OSError):
        return None


def train_tokens(cfg: TrainConfig, shape: ModelShape, split: str = "train") -> SplitTokens:
    """The train split (or ``val``) as training encodes it: exact with the tokenizer here, else measured stats."""
    names = cfg.data.train if split == "train" else cfg.data.val
    convs = _conversations(cfg.data, split)
    tok = _tokenizer(shape, cfg.model)
    if tok is not None:
        from rp_ray.llm.template import get_template
        from rp_ray.preparation import encode_split

        tpl = get_template(cfg.model.template)
        rows, _ = encode_split(tok, tpl, convs, cfg.data.cutoff_len, cfg.model.enable_thinking)
        out = SplitTokens.from_rows(rows, names, cfg.data.cutoff_len)
        out.source = f"exact: encoded with the tokenizer in {shape.local_dir}, as training encodes it"
        return out
    est = _estimated(cfg.model, cfg.data, names, convs)
    lengths = [min(n, cfg.data.cutoff_len) for n in est.totals]
    supervised = [min(s, n) for s, n in zip(est.supervised, lengths)]
    measured_cut = {1024: "cut_1024", 2048: "cut_2048"}.get(cfg.data.cutoff_len)
    truncated = (
        sum(getattr(MEASURED_STATS[(cfg.model.template, n)], measured_cut) for n in names)
        if measured_cut
        else sum(n > cfg.data.cutoff_len for n in est.totals)
    )
    return SplitTokens(names, lengths, supervised, truncated, False, *est.why())


def eval_tokens(cfg: EvalConfig, shape: ModelShape) -> SplitTokens:
    """The val rows as evaluation predicts them: prompt ids, and replies as long as their labels (capped)."""
    from rp_ray.eval.engines import eval_max_model_len
    from rp_ray.llm.template import encode_prediction, get_template, infer_seqlen

    convs = _conversations(cfg.data, "val")
    max_len = eval_max_model_len(cfg)
    cap = cfg.sampling.max_new_tokens
    tok = _tokenizer(shape, cfg.model)
    if tok is not None:
        tpl = get_template(cfg.model.template)
        prompts, labels, cut = [], [], 0
        for c in convs:
            ex = encode_prediction(tok, tpl, c, cfg.data.cutoff_len, cfg.model.enable_thinking)
            prompts.append(len(ex.prompt_ids))
            labels.append(len(ex.label_ids))
            cut += ex.truncated
        source = f"exact: encoded with the tokenizer in {shape.local_dir}, as evaluation encodes it"
        exact, why = True, (source, [])
    else:
        est = _estimated(cfg.model, cfg.data, cfg.data.val, convs)
        prompts, labels, cut = [], [], 0
        for total, last in zip(est.totals, est.last_reply):
            p, lab = infer_seqlen(total - last, last, cfg.data.cutoff_len)
            prompts.append(p)
            labels.append(lab)
            cut += p + lab < total
        exact, why = False, est.why()
    replies = [max(0, min(lab, cap, max_len - p)) for p, lab in zip(prompts, labels)]
    out = SplitTokens(cfg.data.val, prompts, replies, cut, exact, *why)
    over = sum(lab > cap for lab in labels)
    if over:
        out.notes.append(f"{over} labels are longer than sampling.max_new_tokens={cap}: those replies are capped")
    return out


@dataclass
class _Estimate:
    totals: list[int]
    supervised: list[int]
    last_reply: list[int]
    template: str
    notes: list[str]

    def why(self) -> tuple[str, list[str]]:
        return MEASURED_SOURCE.format(tokenizer=TOKENIZER_NAMES[self.template]), self.notes


def _estimated(model: ModelConfig, data: DataConfig, names: list[str], convs: list[Conversation]) -> _Estimate:
    """Per-row token estimates whose totals are the measured statistics of ``names``."""
    missing = [n for n in names if (model.template, n) not in MEASURED_STATS]
    if missing or data.use_sample or data.max_samples is not None:
        what = (
            f"datasets {missing} have no measured statistics"
            if missing
            else "measured statistics cover the full splits only (data.use_sample / data.max_samples are set)"
        )
        raise ConfigError(
            f"model.path {model.path}: its tokenizer is not here, and {what}. Make the model local "
            f"(`rp-ray download {model.path}` or a local model.path) so rp-ray plan counts tokens exactly"
        )
    stats = [MEASURED_STATS[(model.template, n)] for n in names]
    tokens, supervised = sum(s.tokens for s in stats), sum(s.supervised for s in stats)
    reply_chars = [[len(m.content) for m in c.messages if m.role == "assistant"] for c in convs]
    other_chars = [len(c.system) + sum(len(m.content) for m in c.messages if m.role == "user") for c in convs]
    overhead = [MESSAGE_OVERHEAD_TOKENS * (len(c.messages) + 1) for c in convs]
    per_reply_char = supervised / max(1, sum(map(sum, reply_chars)))
    per_other_char = (tokens - supervised - sum(overhead)) / max(1, sum(other_chars))
    sup = [sum(r) * per_reply_char for r in reply_chars]
    totals = _fit([s + o * per_other_char + v for s, o, v in zip(sup, other_chars, overhead)], stats, tokens)
    notes = []
    if len(convs) != sum(s.examples for s in stats):
        notes.append(f"{len(convs)} rows read here, {sum(s.examples for s in stats)} in the measured statistics")
    if data.cutoff_len != MEASURED_CUTOFF:
        cut = sum(s.cut_1024 for s in stats) if data.cutoff_len == 1024 else None
        notes.append(
            f"statistics measured at cutoff {MEASURED_CUTOFF}; at data.cutoff_len={data.cutoff_len} rows are cut "
            "at their estimated length" + (f" ({cut} rows are longer than 1024 with the real tokenizer)" if cut else "")
        )
    return _Estimate(
        totals,
        [round(s) for s in sup],
        [max(1, math.ceil(r[-1] * per_reply_char)) if r else 0 for r in reply_chars],
        model.template,
        notes,
    )


def _fit(estimates: list[float], stats: list[SplitStats], total: int) -> list[int]:
    """Row estimates no longer than the longest measured row, rescaled so they still add up to ``total``."""
    cap = max(s.max for s in stats)
    rows = list(estimates)
    for _ in range(8):
        rows = [min(r, cap) for r in rows]
        free = sum(r for r in rows if r < cap)
        if not free or abs(sum(rows) - total) < 1:
            break
        scale = 1 + (total - sum(rows)) / free
        rows = [r * scale if r < cap else r for r in rows]
    return [max(1, round(r)) for r in rows]
