"""Scene memory as ChatHaruhi builds it: a character's persona followed by a few "classic scenes" of its script.

The ChatHaruhi data's system prompt is the persona text alone, or, when the row has scenes,

    persona + "\\n\\nClassic scenes for the role are as follows:\\n" + "\\n###\\n".join(scenes)

(``SCENES_HEADER``, ``SCENE_SEP``; 9,759 of the 9,792 train rows have one or two scenes, the other 33 the persona
alone). ``split_system_prompt`` and ``join_system_prompt`` are exact inverses on every such text.

A character is identified by its persona text: ``persona_hash`` is the first 12 hex digits of its UTF-8 SHA-256.
Its readable name is the speaker with the most lines across its scenes (scene lines read ``Name:「line」``), and its
key is ``<name>-<first 8 hex of the hash>`` (stable across runs and splits). ``extract_scenes`` gathers each
character's distinct scenes in first-seen order.

``SceneIndex`` ranks a character's scenes against a query with BM25 (the ``bm25s`` library) over ``jieba``
tokens (lower-cased; tokens made only of whitespace, punctuation or symbols dropped), which serves Chinese and
English text alike. ``fit_scenes`` keeps the retrieved scenes while their token count (``count_tokens``, summed over
the scenes) stays within the budget (1500 by default, as ChatHaruhi's story budget); the first scene that does not
fit ends the list; with no scene the system prompt is the persona alone, as in the data.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel

log = logging.getLogger(__name__)

SCENES_HEADER = "\n\nClassic scenes for the role are as follows:\n"
SCENE_SEP = "\n###\n"
DEFAULT_SCENE_BUDGET = 1500
SPEAKER = re.compile(r"^([^\n:：「」]{1,40})[:：]「")
INDEX_FILE = "characters.json"


def split_system_prompt(text: str) -> tuple[str, list[str]]:
    """``(persona, scenes)`` of a ChatHaruhi system prompt (no header: the whole text is the persona)."""
    persona, header, rest = text.partition(SCENES_HEADER)
    return persona, rest.split(SCENE_SEP) if header else []


def join_system_prompt(persona: str, scenes: Sequence[str]) -> str:
    """The data's layout: the persona, then the header and the scenes when there are any."""
    return persona + SCENES_HEADER + SCENE_SEP.join(scenes) if scenes else persona


def fit_scenes(
    scenes: Iterable[str], count_tokens: Callable[[str], int], budget: int = DEFAULT_SCENE_BUDGET
) -> list[str]:
    """The leading scenes whose summed token count stays within ``budget``."""
    out, used = [], 0
    for scene in scenes:
        used += count_tokens(scene)
        if used > budget:
            break
        out.append(scene)
    return out


def persona_hash(persona: str) -> str:
    return hashlib.sha256(persona.encode("utf-8")).hexdigest()[:12]


def speaker_name(scenes: Iterable[str]) -> str:
    """The speaker with the most lines in ``scenes`` (first seen wins a tie); ``character`` when none."""
    counts: Counter[str] = Counter()
    for scene in scenes:
        for line in scene.split("\n"):
            m = SPEAKER.match(line)
            if m:
                counts[m.group(1).strip()] += 1
    return counts.most_common(1)[0][0] if counts else "character"


class CharacterScenes(BaseModel):
    """One character's scene corpus."""

    key: str
    name: str
    persona_hash: str
    persona: str
    scenes: list[str]


def _system_text(row: Any) -> str | None:
    """The system message of a sharegpt (``conversations``/from/value) or OpenAI-style (``messages``) row."""
    if not isinstance(row, dict):
        return None
    for msgs, role_key, text_key in (("conversations", "from", "value"), ("messages", "role", "content")):
        turns = row.get(msgs)
        if isinstance(turns, list) and turns and isinstance(turns[0], dict) and turns[0].get(role_key) == "system":
            text = turns[0].get(text_key)
            return text if isinstance(text, str) else None
    system = row.get("system")
    return system if isinstance(system, str) else None


def extract_scenes(rows: Iterable[Any]) -> dict[str, CharacterScenes]:
    """Each character's distinct scenes (first-seen order) from the rows' system prompts, keyed by persona hash;
    rows without a system prompt are skipped."""
    personas: dict[str, str] = {}
    scenes: dict[str, dict[str, None]] = {}
    for row in rows:
        text = _system_text(row)
        if text is None:
            continue
        persona, found = split_system_prompt(text)
        h = persona_hash(persona)
        personas.setdefault(h, persona)
        bucket = scenes.setdefault(h, {})
        for s in found:
            if s.strip():
                bucket.setdefault(s, None)
    out = {}
    for h, persona in personas.items():
        corpus = list(scenes[h])
        name = speaker_name(corpus)
        out[h] = CharacterScenes(key=f"{name}-{h[:8]}", name=name, persona_hash=h, persona=persona, scenes=corpus)
    return out


def corpus_file_name(character: CharacterScenes) -> str:
    return re.sub(r"[^\w.-]+", "_", character.key) + ".jsonl"


def write_scene_corpus(characters: dict[str, CharacterScenes], out_dir: str | Path) -> Path:
    """One ``<key>.jsonl`` per character (a ``{"scene": text}`` per line) and ``characters.json`` listing each
    character's key, name, persona_hash, number of scenes, file and persona; returns the index path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    index = []
    for c in sorted(characters.values(), key=lambda c: c.key):
        name = corpus_file_name(c)
        with (out / name).open("w", encoding="utf-8") as f:
            for s in c.scenes:
                f.write(json.dumps({"scene": s}, ensure_ascii=False) + "\n")
        index.append(
            {
                "key": c.key,
                "name": c.name,
                "persona_hash": c.persona_hash,
                "scenes": len(c.scenes),
                "file": name,
                "persona": c.persona,
            }
        )
    path = out / INDEX_FILE
    path.write_text(json.dumps(index, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return path


def load_scene_corpus(out_dir: str | Path) -> dict[str, CharacterScenes]:
    """What ``write_scene_corpus`` wrote, keyed by persona hash."""
    root = Path(out_dir)
    out = {}
    for item in json.loads((root / INDEX_FILE).read_text(encoding="utf-8")):
        with (root / item["file"]).open(encoding="utf-8") as f:
            scenes = [json.loads(line)["scene"] for line in f if line.strip()]
        fields = {k: item[k] for k in ("key", "name", "persona_hash", "persona")}
        out[item["persona_hash"]] = CharacterScenes(**fields, scenes=scenes)
    return out


def _is_word(token: str) -> bool:
    return any(unicodedata.category(ch)[0] in "LN" for ch in token)


def tokenize(text: str) -> list[str]:
    """jieba tokens, lower-cased, without whitespace / punctuation / symbol-only tokens."""
    import jieba

    jieba.setLogLevel(logging.WARNING)
    return [t for t in jieba.lcut(text.lower()) if _is_word(t)]


class SceneIndex:
    """BM25 over a list of scenes (``bm25s``, jieba tokens); ``retrieve`` gives the best scenes for a query."""

    def __init__(self, scenes: Sequence[str]):
        import bm25s

        self.scenes = list(scenes)
        self._bm25 = None
        if self.scenes:
            self._bm25 = bm25s.BM25()
            self._bm25.index([tokenize(s) for s in self.scenes], show_progress=False)

    def retrieve(self, query: str, k: int = 2) -> list[str]:
        """Up to ``k`` scenes, best first (ties in corpus order); only scenes sharing a token with the query."""
        if self._bm25 is None or k <= 0:
            return []
        tokens = tokenize(query)
        if not tokens:
            return []
        import numpy as np

        scores = self._bm25.get_scores(tokens)
        return [self.scenes[i] for i in np.argsort(-scores, kind="stable")[:k] if scores[i] > 0]
