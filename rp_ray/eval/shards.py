"""Shard files: the unit of resume of batch evaluation.

The val rows are cut into shards of ``shard_size``; ``<run>/shards/shard_NNNNN.jsonl`` holds one output line per row of
that shard, in input order, and is written (atomically) the moment the last of its rows is predicted. A rerun with the
same settings skips every (run, shard) whose file exists, so a killed job loses at most the shards that were in flight.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rp_ray.eval.engines import Output


@dataclass(frozen=True)
class Row:
    """One val row, encoded by the driver."""

    index: int
    prompt_ids: list[int]
    prompt_text: str  # the prompt as text (special tokens dropped), as LLaMA-Factory writes it
    label: str  # the reference reply, cleaned like a prediction


def shard_path(out: Path, run: str, shard: int) -> Path:
    return out / run / "shards" / f"shard_{shard:05d}.jsonl"


def write_atomic(path: Path, lines: list[str]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(lines), encoding="utf-8")
    os.replace(tmp, path)


class ShardWriter:
    """Collects the outputs of (run, row) pairs and writes each (run, shard) file as soon as it is complete.

    ``decode`` turns a reply's token ids into the clean reply text (the driver's tokenizer and template).
    """

    def __init__(
        self,
        out: Path,
        rows: list[Row],
        shard_size: int,
        todo: dict[str, list[int]],
        decode: Callable[[tuple[int, ...]], str],
    ):
        self.out, self.rows, self.size, self.decode = out, rows, shard_size, decode
        self.outputs: dict[tuple[str, int], list[Output | None]] = {}
        self.remaining: dict[tuple[str, int], int] = {}
        for run, shards in todo.items():
            shard_path(out, run, 0).parent.mkdir(parents=True, exist_ok=True)
            for s in shards:
                n = len(self.rows_of(s))
                self.outputs[(run, s)] = [None] * n
                self.remaining[(run, s)] = n
        self.written: list[tuple[str, int]] = []
        self.reply_tokens = 0  # tokens generated (replies with token ids)

    def rows_of(self, shard: int) -> list[Row]:
        return self.rows[shard * self.size : (shard + 1) * self.size]

    def add(self, run: str, row: int, out: Output) -> None:
        s, pos = divmod(row, self.size)
        slot = self.outputs[(run, s)]
        if slot[pos] is not None:
            return  # a row handed out twice (its actor died after finishing it): the first answer stands
        slot[pos] = out
        self.reply_tokens += len(out.token_ids)
        self.remaining[(run, s)] -= 1
        if self.remaining[(run, s)] == 0:
            self._write(run, s)

    def _write(self, run: str, s: int) -> None:
        lines = []
        for row, o in zip(self.rows_of(s), self.outputs.pop((run, s))):
            assert o is not None
            predict = "" if o.error else (self.decode(o.token_ids) if o.token_ids else o.text)
            rec = {"prompt": row.prompt_text, "predict": predict, "label": row.label}
            if o.error:
                rec["error"] = o.error
            lines.append(json.dumps(rec, ensure_ascii=False) + "\n")
        write_atomic(shard_path(self.out, run, s), lines)
        self.written.append((run, s))

    @property
    def done(self) -> bool:
        return not self.outputs
