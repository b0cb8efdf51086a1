"""The preparation step every job starts with: absolute paths, the tokenizer, checked splits, one encoding loop.

Training (``rp_ray.train``), evaluation (``rp_ray.eval``) and ``rp-ray data`` all call :func:`prepare`, so a bad
model path or a bad dataset fails the same way, before any Ray work, and the data report is written the same way.
:class:`SupervisedEncoder` is the one loop that turns conversations into training ids and labels; training and
``rp-ray data`` both run it through :func:`encode_locally`, so the report gives the statistics of exactly what
training will see.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel

from rp_ray.config import DataConfig, EvalConfig, ModelConfig, TrainConfig
from rp_ray.data import Conversation
from rp_ray.data.report import load_checked_splits
from rp_ray.models import load_tokenizer
from rp_ray.template import IGNORE_INDEX, Template, encode_supervised, get_template

C = TypeVar("C", bound=BaseModel)
Split = Literal["train", "val"]


def absolute_paths(cfg: C) -> C:
    """A copy of a job config whose paths are absolute, so Ray workers in any working directory find the same files."""
    out = cfg.model_copy(deep=True)
    if isinstance(getattr(out, "model", None), ModelConfig):
        out.model.path = os.path.abspath(out.model.path)
    if isinstance(getattr(out, "data", None), DataConfig):
        out.data.dataset_dir = os.path.abspath(out.data.dataset_dir)
    if isinstance(out, TrainConfig | EvalConfig):
        out.output_dir = os.path.abspath(out.output_dir)
    if isinstance(out, TrainConfig):
        out.storage_path = os.path.abspath(out.storage_path or os.path.join(out.output_dir, "ray"))
        if out.deepspeed.config_file:
            out.deepspeed.config_file = os.path.abspath(out.deepspeed.config_file)
    return out


@dataclass
class Prepared:
    """What a job needs before its first Ray call."""

    tok: Any  # the model's tokenizer, checked against the template's special tokens
    tpl: Template
    train: list[Conversation]
    val: list[Conversation]
    report_path: Path  # data_report.json (a .txt twin beside it)


def prepare(model: ModelConfig, data: DataConfig, report_dir: str | Path, need: tuple[Split, ...]) -> Prepared:
    """Load the tokenizer (a bad model fails before any data work), read and check the splits, write the data report.

    ``model`` and ``data`` should carry absolute paths (:func:`absolute_paths`). Every split named in ``need``
    must keep at least one conversation. The report is written before the drop-ratio check, so a refused run
    leaves it behind.
    """
    tpl = get_template(model.template)
    tok = load_tokenizer(model.path, tpl)
    train, val, report_path = load_checked_splits(data, report_dir)
    for split, convs in (("train", train), ("val", val)):
        if split in need and not convs:
            names = data.train if split == "train" else data.val
            raise ValueError(f"no {split} conversations left in {names}; see {report_path}")
    return Prepared(tok, tpl, train, val, report_path)


def conversation_items(convs: list[Conversation]) -> list[dict[str, Any]]:
    """Rows for :class:`SupervisedEncoder`: the conversation index and the conversation as JSON."""
    return [{"idx": i, "conv": json.dumps(c.to_dict(), ensure_ascii=False)} for i, c in enumerate(convs)]


class SupervisedEncoder:
    """Conversations -> ``input_ids`` / ``labels`` with the model's template: the one supervised encoding loop.

    Called on pandas batches with ``idx`` and ``conv`` (JSON) columns; adds ``input_ids``, ``labels``,
    ``n_tokens``, ``n_label_tokens`` and ``truncated``.
    """

    def __init__(self, model_path: str, template: str, cutoff_len: int, enable_thinking: bool):
        self.tpl = get_template(template)
        self.tok = load_tokenizer(model_path, self.tpl)
        self.cutoff_len, self.thinking = cutoff_len, enable_thinking

    def __call__(self, batch):
        ids, labels = [], []
        for raw in batch["conv"]:
            conv = Conversation.from_dict(json.loads(raw))
            i, lab = encode_supervised(self.tok, self.tpl, conv, self.cutoff_len, self.thinking)
            ids.append(i)
            labels.append(lab)
        out = batch[["idx"]].copy()
        out["input_ids"], out["labels"] = ids, labels
        out["n_tokens"] = [len(i) for i in ids]
        out["n_label_tokens"] = [sum(1 for x in lab if x != IGNORE_INDEX) for lab in labels]
        out["truncated"] = [len(i) >= self.cutoff_len for i in ids]
        return out


@dataclass
class EncodeStats:
    """What supervised encoding of a split produced."""

    examples: int = 0
    tokens: int = 0
    label_tokens: int = 0
    truncated: int = 0
    max_len: int = 0
    seconds: float = 0.0

    def add(self, batch) -> None:
        """Account for one output batch of :class:`SupervisedEncoder`."""
        self.examples += len(batch)
        self.tokens += int(batch["n_tokens"].sum())
        self.label_tokens += int(batch["n_label_tokens"].sum())
        self.truncated += int(batch["truncated"].sum())
        self.max_len = max(self.max_len, int(batch["n_tokens"].max()) if len(batch) else 0)

    def summary(self) -> str:
        mean = self.tokens / self.examples if self.examples else 0
        return (
            f"{self.examples} examples, {self.tokens} tokens (mean {mean:.0f}, max {self.max_len}), "
            f"{self.label_tokens} supervised, {self.truncated} truncated at cutoff, {self.seconds:.1f}s"
        )


def encode_locally(
    model: ModelConfig, cutoff_len: int, convs: list[Conversation], batch_size: int = 256
) -> tuple[list[dict[str, list[int]]], EncodeStats]:
    """Run :class:`SupervisedEncoder` in this process over ``convs``: rows (``idx``, ``input_ids``, ``labels``) and
    their statistics. Training encodes its split with it in the driver, which has the tokenizer loaded already (a
    Ray Data actor pool of one cost 8-9 s of process start and tokenizer load per run, for no parallelism), then
    hands the rows to the workers through Ray Data; ``rp-ray data`` reports the same statistics."""
    import pandas as pd
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    enc = SupervisedEncoder(model.path, model.template, cutoff_len, model.enable_thinking)
    items = conversation_items(convs)
    stats, rows = EncodeStats(), []
    with tqdm(total=len(items), desc="encode", unit="conv", mininterval=2.0, disable=len(items) < 2000) as bar:
        for start in range(0, len(items), batch_size):
            out = enc(pd.DataFrame(items[start : start + batch_size]))
            stats.add(out)
            rows += [
                {"idx": int(k), "input_ids": i, "labels": lab}
                for k, i, lab in zip(out["idx"], out["input_ids"], out["labels"])
            ]
            bar.update(len(out))
    stats.seconds = time.perf_counter() - t0
    return rows, stats
