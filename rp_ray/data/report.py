"""Load the configured splits and account for every row in a data report."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from pydantic import BaseModel, Field

from rp_ray.config import DataConfig
from rp_ray.data.conversation import DROP_REASONS, Conversation, Dropped, to_conversation
from rp_ray.data.reader import read_rows
from rp_ray.data.registry import resolve

log = logging.getLogger(__name__)
MAX_EXAMPLES = 3


class DatasetReport(BaseModel):
    """What happened to every row of one dataset file."""

    name: str
    split: str
    file: str
    rows_read: int = 0
    kept: int = 0
    dropped: dict[str, int] = Field(default_factory=dict)
    examples: dict[str, list[str]] = Field(default_factory=dict)  # where + detail of the first drops per reason

    @property
    def n_dropped(self) -> int:
        return sum(self.dropped.values())

    @property
    def drop_ratio(self) -> float:
        return self.n_dropped / self.rows_read if self.rows_read else 0.0

    def drop(self, reason: str, where: str, detail: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1
        ex = self.examples.setdefault(reason, [])
        if len(ex) < MAX_EXAMPLES:
            ex.append(f"{where}: {detail}" if detail else where)


class DataReport(BaseModel):
    """The report written before any training or evaluation."""

    datasets: list[DatasetReport]
    max_drop_ratio: float

    def summary(self) -> str:
        lines = []
        for d in self.datasets:
            lines.append(
                f"{d.split:5s} {d.name}: {d.rows_read} rows read from {d.file}; kept {d.kept}, "
                f"dropped {d.n_dropped} ({d.drop_ratio:.1%})"
            )
            for reason in DROP_REASONS:
                if reason in d.dropped:
                    lines.append(f"    {reason:18s} {d.dropped[reason]:6d}  e.g. {'; '.join(d.examples[reason])}")
        return "\n".join(lines)

    def write(self, out_dir: str | Path) -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        payload = self.model_dump() | {"drop_reasons": DROP_REASONS}
        (out / "data_report.json").write_text(json.dumps(payload, ensure_ascii=False, indent=2), encoding="utf-8")
        (out / "data_report.txt").write_text(self.summary() + "\n", encoding="utf-8")
        return out / "data_report.json"


class DataQualityError(ValueError):
    """Too many rows were dropped; the message carries the report."""


def _read_split(
    cfg: DataConfig, split: str, names: list[str], reports: list[DatasetReport], other: frozenset[str] = frozenset()
) -> tuple[list[Conversation], set[str]]:
    kept: list[Conversation] = []
    seen: set[str] = set()
    for name in names:
        attr, path = resolve(cfg.dataset_dir, name, cfg.use_sample)
        rep = DatasetReport(name=name, split=split, file=str(path))
        reports.append(rep)
        for raw in read_rows(path, cfg.max_row_bytes):
            rep.rows_read += 1
            if raw.drop:
                rep.drop(raw.drop, raw.where, raw.detail)
                continue
            try:
                conv = to_conversation(raw.value, attr)
            except Dropped as e:
                rep.drop(e.reason, raw.where, e.detail)
                continue
            key = conv.key()
            if key in seen:
                rep.drop("duplicate", raw.where, "")
            elif key in other:
                rep.drop("train_val_overlap", raw.where, "same conversation is in the val split")
            else:
                seen.add(key)
                kept.append(conv)
                rep.kept += 1
    return kept, seen


def load_splits(cfg: DataConfig) -> tuple[list[Conversation], list[Conversation], DataReport]:
    """Read, validate and deduplicate the train and val datasets of ``cfg``.

    Val is read first so its rows stay intact; a train conversation equal to a val one
    is dropped from train as ``train_val_overlap``. Every row read is either kept or
    counted under one drop reason. ``max_samples`` then trims each split.
    """
    reports: list[DatasetReport] = []
    val, val_keys = _read_split(cfg, "val", cfg.val, reports)
    train, _ = _read_split(cfg, "train", cfg.train, reports, frozenset(val_keys))
    if cfg.max_samples is not None:
        train, val = train[: cfg.max_samples], val[: cfg.max_samples]
    for d in reports:
        assert d.kept + d.n_dropped == d.rows_read, d
    return train, val, DataReport(datasets=reports, max_drop_ratio=cfg.max_drop_ratio)


def check_drop_ratio(report: DataReport) -> None:
    """Raise DataQualityError naming each dataset whose drop ratio is above the limit."""
    bad = [d for d in report.datasets if d.drop_ratio > report.max_drop_ratio]
    if bad:
        names = ", ".join(f"{d.name} ({d.drop_ratio:.1%})" for d in bad)
        raise DataQualityError(
            f"too many rows dropped in {names}; limit data.max_drop_ratio={report.max_drop_ratio}. "
            f"Fix the data, or raise the limit with data.max_drop_ratio=<ratio>.\n{report.summary()}"
        )


def load_checked_splits(cfg: DataConfig, report_dir: str | Path) -> tuple[list[Conversation], list[Conversation], Path]:
    """``load_splits``, then write the data report to ``report_dir`` and refuse a drop ratio over the limit.

    The report is written before the check, so a refused run leaves it behind.
    """
    train, val, report = load_splits(cfg)
    path = report.write(report_dir)
    log.info("data report: %s\n%s", path, report.summary())
    check_drop_ratio(report)
    return train, val, path
