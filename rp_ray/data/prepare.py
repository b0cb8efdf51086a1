"""Validate the configured splits, stop on too many drops, and encode them with the model's template."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from rp_ray.config import DataConfig, ModelConfig
from rp_ray.data.conversation import Conversation
from rp_ray.data.report import load_checked_splits
from rp_ray.models import load_tokenizer
from rp_ray.template import EncodeStats, encode_supervised_dataset, get_template

log = logging.getLogger(__name__)


@dataclass
class PreparedData:
    train: list[Conversation]
    val: list[Conversation]
    report_path: Path
    train_rows: list[dict[str, list[int]]]
    train_stats: EncodeStats


def prepare_data(model: ModelConfig, data: DataConfig, out_dir: str | Path) -> PreparedData:
    """Read + validate both splits, write the data report to ``out_dir``, refuse a bad drop ratio, encode train.

    The report is written before the drop-ratio check so a refused run leaves it behind.
    """
    tpl = get_template(model.template)
    tok = load_tokenizer(model.path, tpl)  # fail on a bad model before reading data
    train, val, report_path = load_checked_splits(data, out_dir)
    rows, stats = encode_supervised_dataset(tok, tpl, train, data.cutoff_len, model.enable_thinking)
    return PreparedData(train, val, report_path, rows, stats)
