"""Golden prompts: the exact prompt token ids (and the lore / scenes that went in) of every character rp_ray serves,
recorded from the serving code and compared on every run, so a refactor of the character or serving code changes
no visible prompt. Characters: every entry of ``serve_configs/characters.yaml``, a V1, a V2 and a V3 card (the V3
one with its lorebook and a standalone world info), and ChatHaruhi scene memory extracted from the shipped sample;
each on the tiny llama3 and gpt_oss models.

To re-record after an intended change of a prompt: ``RP_RAY_RECORD_GOLDEN=1 pytest tests/test_golden_prompts.py``
(and say in the commit why the prompts changed)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from rp_ray.character.card import CardRegistry
from rp_ray.character.catalog import load_catalog
from rp_ray.character.catalog import load_characters_file as load_cards
from rp_ray.character.scenes import extract_scenes, write_scene_corpus
from rp_ray.config import ServeConfig
from rp_ray.serve.chat import ChatServing, parse_request

REPO = Path(__file__).resolve().parents[1]
CARDS = REPO / "tests" / "fixtures" / "cards"
GOLDEN = REPO / "tests" / "fixtures" / "golden_prompts.json"
RECORD = os.environ.get("RP_RAY_RECORD_GOLDEN") == "1"

TURNS = [
    "Hello there, {{char}}.",
    "Hey, {{user}}.",
    "Meet me at the tavern, then we go to the Ark.",
    "Sure thing.",
    "A ship? In this storm? Let me eat ramen first.",
]


def chat(n_user_turns: int) -> list[dict]:
    turns = TURNS[: 2 * n_user_turns - 1]
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]


def own_system(n: int) -> list[dict]:
    return [{"role": "system", "content": "You are someone else."}, *chat(n)]


def scene_chats(rows: list[dict], persona: str, k: int = 2) -> list[list[dict]]:
    """The first ``k`` user turns of the sample rows of one ChatHaruhi character, each as a one-message chat."""
    out = []
    for row in rows:
        conv = row["conversations"]
        if conv[0]["from"] == "system" and conv[0]["value"].startswith(persona):
            out.append([{"role": "user", "content": conv[1]["value"]}])
        if len(out) == k:
            break
    return out


def build(model: Path, template: str, work: Path) -> tuple[ChatServing, dict[str, list[list[dict]]]]:
    """A ChatServing with every golden character, and the chats each one is asked."""
    cards = load_cards(REPO / "serve_configs" / "characters.yaml")
    registry = CardRegistry(work / "cards")
    registry.import_file(CARDS / "v1_card.json", name="v1")
    registry.import_file(CARDS / "v2_card.json", name="v2", adapter="a1")
    registry.import_file(CARDS / "v3_lorebook.json", name="v3", adapter="a1", sampling={"temperature": 0.8})
    rows = json.loads((REPO / "data" / "sample" / "haruhi_train.json").read_text(encoding="utf-8"))
    corpus = extract_scenes(rows)
    chosen = sorted(corpus.values(), key=lambda c: -len(c.scenes))[:2]
    write_scene_corpus({c.persona_hash: c for c in chosen}, work / "scenes")
    scene_cards = {}
    for i, c in enumerate(chosen):
        scene_cards[f"scene{i}"] = {"name": f"scene{i}", "display_name": c.name, "system_prompt": c.persona}
    (work / "chars.json").write_text(json.dumps(list(scene_cards.values())), encoding="utf-8")
    cards |= load_cards(work / "chars.json")
    cfg = ServeConfig(
        model={"path": str(model), "template": template},
        adapters={"tiny-lora": "tiny-lora", "a1": "a1"},
        max_model_len=4096,
        max_tokens_cap=64,
        card_registry=str(work / "cards"),
        lorebooks={"v3": str(CARDS / "world_info.json")},
        scenes={f"scene{i}": str(work / "scenes" / f"{c.key}.jsonl") for i, c in enumerate(chosen)},
    )
    serving = ChatServing(cfg, load_catalog(cfg, cards))
    chats = {name: [chat(1), chat(3), own_system(2)] for name in ("haruhi", "harry", "haruhi-base", "v1", "v2")}
    chats["v3"] = [chat(1), chat(2), chat(3), own_system(1)]
    for i, c in enumerate(chosen):
        chats[f"scene{i}"] = scene_chats(rows, c.persona)
    chats["base"] = [chat(2)]
    return serving, chats


def prompts(serving: ChatServing, chats: dict[str, list[list[dict]]]) -> dict[str, dict]:
    out = {}
    for name, convs in chats.items():
        model = serving.cfg.base_name if name == "base" else name
        for i, messages in enumerate(convs):
            prepared = serving.prepare(parse_request({"model": model, "messages": messages, "rp_debug": True}))
            out[f"{name}/{i}"] = {"prompt": prepared.prompt, "debug": prepared.debug}
    return out


@pytest.mark.parametrize("family", ["llama3", "gpt_oss"])
def test_prompts_are_the_recorded_ones(family, tiny_llama3, tiny_gpt_oss, tmp_path):
    model = tiny_llama3 if family == "llama3" else tiny_gpt_oss
    serving, chats = build(model, family, tmp_path)
    got = prompts(serving, chats)
    assert len(got) >= 20 and all(v["prompt"] for v in got.values())
    golden = json.loads(GOLDEN.read_text(encoding="utf-8")) if GOLDEN.is_file() else {}
    if RECORD:
        golden[family] = got
        GOLDEN.write_text(json.dumps(golden, ensure_ascii=False, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    assert family in golden, f"no golden prompts for {family}: record them with RP_RAY_RECORD_GOLDEN=1"
    want = golden[family]
    assert sorted(got) == sorted(want)
    for key in want:
        assert got[key] == want[key], f"{family} {key}: the prompt differs from the recorded one"
