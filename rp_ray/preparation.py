"""The preparation step every job starts with: absolute paths, the tokenizer, checked splits, one encoding loop.

Training (``rp_ray.train``), evaluation (``rp_ray.eval``) and ``rp-ray data`` all call :func:`prepare`, so a bad
model path or a bad dataset fails the same way, before any Ray work, and the data report is written the same way.
:func:`encode_split` is the one loop that turns conversations into training ids and labels; training and
``rp-ray data`` both run it, so the report gives the statistics of exactly what training will see.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from rp_ray.config import C, DataConfig, EvalConfig, ModelConfig, TrainConfig
from rp_ray.data import Conversation
from rp_ray.data.report import load_checked_splits
from rp_ray.llm.hub import resolve_model
from rp_ray.llm.models import load_tokenizer
from rp_ray.llm.template import IGNORE_INDEX, Template, encode_supervised, get_template

Split = Literal["train", "val"]


def absolute_paths(cfg: C) -> C:
    """A copy of a job config whose paths are absolute, so Ray workers in any working directory find the same files."""
    out = cfg.model_copy(deep=True)
    if isinstance(getattr(out, "model", None), ModelConfig):
        out.model.path = str(resolve_model(out.model))  # a hub model id: its folder in the model cache (offline)
    if isinstance(getattr(out, "data", None), DataConfig):
        out.data.dataset_dir = os.path.abspath(out.data.dataset_dir)
    if isinstance(out, TrainConfig | EvalConfig):
        out.output_dir = os.path.abspath(out.output_dir)
    if isinstance(out, TrainConfig):
        storage = out.storage_path or os.path.join(out.output_dir, "ray")
        # s3:// gs:// ... as Ray Train takes them (a multi-node cluster's checkpoints); local paths made absolute
        out.storage_path = storage if "://" in storage else os.path.abspath(storage)
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
    must keep at least one conversation.
    """
    tpl = get_template(model.template)
    tok = load_tokenizer(model.path, tpl)
    train, val, report_path = load_checked_splits(data, report_dir)
    for split, convs in (("train", train), ("val", val)):
        if split in need and not convs:
            names = data.train if split == "train" else data.val
            raise ValueError(f"no {split} conversations left in {names}; see {report_path}")
    return Prepared(tok, tpl, train, val, report_path)


@dataclass
class EncodeStats:
    """What supervised encoding of a split produced."""

    examples: int = 0
    tokens: int = 0
    label_tokens: int = 0
    truncated: int = 0
    max_len: int = 0
    seconds: float = 0.0

    def add(self, ids: list[int], labels: list[int], cutoff_len: int) -> None:
        """Account for one encoded conversation."""
        self.examples += 1
        self.tokens += len(ids)
        self.label_tokens += sum(1 for x in labels if x != IGNORE_INDEX)
        self.truncated += len(ids) >= cutoff_len
        self.max_len = max(self.max_len, len(ids))

    def summary(self) -> str:
        mean = self.tokens / self.examples if self.examples else 0
        return (
            f"{self.examples} examples, {self.tokens} tokens (mean {mean:.0f}, max {self.max_len}), "
            f"{self.label_tokens} supervised, {self.truncated} truncated at cutoff, {self.seconds:.1f}s"
        )


def encode_split(
    tok: Any, tpl: Template, convs: list[Conversation], cutoff_len: int, enable_thinking: bool = False
) -> tuple[list[dict[str, Any]], EncodeStats]:
    """The one supervised encoding loop: ``convs`` -> rows (``idx``, ``input_ids``, ``labels``) and their statistics.

    Training runs it in the driver with the tokenizer :func:`prepare` loaded (an actor pool would pay a process start
    and a tokenizer load per run, for no parallelism).
    """
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    stats, rows = EncodeStats(), []
    for idx, conv in enumerate(tqdm(convs, desc="encode", unit="conv", mininterval=2.0, disable=len(convs) < 2000)):
        ids, labels = encode_supervised(tok, tpl, conv, cutoff_len, enable_thinking)
        stats.add(ids, labels, cutoff_len)
        rows.append({"idx": idx, "input_ids": ids, "labels": labels})
    stats.seconds = time.perf_counter() - t0
    return rows, stats
