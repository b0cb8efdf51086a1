"""Shard files: the unit of resume of batch evaluation.

The val rows are cut into shards of ``shard_size``; ``<run>/shards/shard_NNNNN.jsonl`` holds one output line per row of
that shard, in input order, and is written (atomically: ``rp_ray.files.write_atomic``) the moment the last of its rows
is predicted. A rerun with the same settings skips every (run, shard) whose file holds all of its rows, so a killed job
loses at most the shards that were in flight.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rp_ray.eval.engines import Output
from rp_ray.files import write_atomic

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Row:
    """One val row, encoded by the driver."""

    index: int
    prompt_ids: list[int]
    prompt_text: str  # the prompt as text (special tokens dropped), as LLaMA-Factory writes it
    label: str  # the reference reply, cleaned like a prediction


def shard_path(out: Path, run: str, shard: int) -> Path:
    return out / run / "shards" / f"shard_{shard:05d}.jsonl"


def shard_lines(path: Path) -> list[str]:
    """The output lines of a shard file, each with its newline (the last one without, if it was cut).

    Split on "\\n" only: ``json.dumps(..., ensure_ascii=False)`` leaves U+2028, U+0085 and the like unescaped in a
    reply or label, and ``str.splitlines`` would cut a record at them.
    """
    *lines, tail = path.read_text(encoding="utf-8").split("\n")
    return [line + "\n" for line in lines] + ([tail] if tail else [])


def shard_done(path: Path, n_rows: int) -> bool:
    """Whether the shard file ``path`` is finished: it holds ``n_rows`` output lines, each a JSON object.

    Any other file (empty, cut short, a shard of another ``shard_size``) is deleted, with a warning saying why, so
    that its rows are predicted again.
    """
    try:
        lines = shard_lines(path)
    except FileNotFoundError:
        return False
    except UnicodeDecodeError as e:
        lines, problem = [], f"is not valid UTF-8 ({e.reason} at byte {e.start})"
    else:
        problem = None
    if problem is None and len(lines) != n_rows:
        problem = f"holds {len(lines)} lines, {n_rows} expected"
    for i, line in enumerate(lines if problem is None else [], 1):
        try:
            ok = isinstance(json.loads(line), dict)
        except ValueError:
            ok = False
        if not ok:
            problem = f"line {i} is not a JSON object"
            break
    if problem is None:
        return True
    log.warning("%s %s (an interrupted or foreign write): predicting its rows again", path, problem)
    path.unlink(missing_ok=True)
    return False


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
        write_atomic(shard_path(self.out, run, s), "".join(lines))
        self.written.append((run, s))

    @property
    def done(self) -> bool:
        return not self.outputs
