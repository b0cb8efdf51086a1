"""ChatHaruhi scene memory: the system-prompt layout (checked on every row of the real data when it is here),
scene corpora, BM25 retrieval (hit rate against chance on the real data) and ``rp-ray scenes extract``."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

from rp_ray.character.scenes import (
    SCENE_SEP,
    SCENES_HEADER,
    SceneIndex,
    extract_scenes,
    fit_scenes,
    join_system_prompt,
    load_scene_corpus,
    persona_hash,
    speaker_name,
    split_system_prompt,
    tokenize,
    write_scene_corpus,
)

SHARED = Path(__file__).parents[1] / ".." / "shared" / "datasets" / "chatharuhi"
SAMPLE = REPO / "data" / "sample" / "haruhi_train.json"


def row(system: str, *turns: str) -> dict:
    roles = ["user", "assistant"] * len(turns)
    return {
        "conversations": [{"from": "system", "value": system}, *({"from": r, "value": t} for r, t in zip(roles, turns))]
    }


def test_split_and_join_are_inverse():
    persona = "你正在扮演凉宫春日。\n\n请用春日的语气回答。"
    scenes = ["阿虚:「早」\n春日:「迟到了！」", "春日:「SOS团集合！」\n阿虚:「又来了」"]
    text = persona + SCENES_HEADER + SCENE_SEP.join(scenes)
    assert split_system_prompt(text) == (persona, scenes)
    assert join_system_prompt(persona, scenes) == text
    assert split_system_prompt(persona) == (persona, [])
    assert join_system_prompt(persona, []) == persona
    for odd in (persona + SCENES_HEADER, SCENES_HEADER + "x" + SCENE_SEP, "a" + SCENES_HEADER + "b" + SCENES_HEADER):
        assert join_system_prompt(*split_system_prompt(odd)) == odd


def test_scene_budget_in_the_data_layout():
    persona = "P"
    scenes = ["a b c", "d e", "f g h i"]
    count = lambda s: len(s.split())

    def build_system_prompt(persona, scenes, count, budget=1500):
        return join_system_prompt(persona, fit_scenes(scenes, count, budget))

    assert (
        build_system_prompt(persona, scenes, count, budget=5) == persona + SCENES_HEADER + "a b c" + SCENE_SEP + "d e"
    )
    assert build_system_prompt(persona, scenes, count, budget=4) == persona + SCENES_HEADER + "a b c"
    assert build_system_prompt(persona, scenes, count, budget=2) == persona  # nothing fits: the persona alone
    assert build_system_prompt(persona, [], count) == persona


def test_extract_scenes_dedups_and_names_characters():
    p1, p2 = "persona one", "persona two"
    rows = [
        row(join_system_prompt(p1, ["春日:「一」\n阿虚:「二」", "春日:「三」"]), "阿虚:「早」", "「早」"),
        row(join_system_prompt(p1, ["春日:「三」", "阿虚:「四」\n春日:「五」"]), "q", "a"),
        row(p2, "q", "a"),
        {"messages": [{"role": "system", "content": join_system_prompt(p2, ["Sheldon:「Bazinga」"])}]},
        {"conversations": [{"from": "user", "value": "no system"}]},
        "not a row",
    ]
    chars = extract_scenes(rows)
    assert list(chars) == [persona_hash(p1), persona_hash(p2)]
    one, two = chars.values()
    assert one.scenes == ["春日:「一」\n阿虚:「二」", "春日:「三」", "阿虚:「四」\n春日:「五」"]
    assert one.name == "春日" and one.key == f"春日-{persona_hash(p1)[:8]}" and one.persona == p1
    assert two.name == "Sheldon" and two.scenes == ["Sheldon:「Bazinga」"]
    assert speaker_name([]) == "character"


def test_corpus_files_round_trip(tmp_path):
    chars = extract_scenes([row(join_system_prompt("p", ["Ron:「a」", "Ron:「b」\nHarry:「c」"]), "q", "a")])
    index = write_scene_corpus(chars, tmp_path)
    listed = json.loads(index.read_text(encoding="utf-8"))
    assert [(c["name"], c["scenes"], c["file"]) for c in listed] == [("Ron", 2, f"Ron-{persona_hash('p')[:8]}.jsonl")]
    assert load_scene_corpus(tmp_path) == chars


def test_tokenize_and_retrieve():
    assert tokenize("Hello, World！ 你好，世界。") == ["hello", "world", "你好", "世界"]
    scenes = [
        "春日:「我们去找外星人、未来人和超能力者吧！」",
        "阿虚:「今天的天气真好。」\n春日:「无聊死了。」",
        "Harry:「Where is the Philosopher's Stone?」",
    ]
    idx = SceneIndex(scenes)
    assert idx.retrieve("外星人在哪里", k=2)[0] == scenes[0]
    assert idx.retrieve("the stone", k=1) == [scenes[2]]
    assert idx.retrieve("？！。", k=3) == []  # no word token: nothing retrieved
    assert idx.retrieve("zebra", k=3) == []  # no shared token: nothing retrieved
    assert SceneIndex([]).retrieve("外星人", k=2) == []


def test_cli_scenes_extract_on_the_sample(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "rp_ray.cli.main", "scenes", "extract", str(SAMPLE), "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    chars = load_scene_corpus(tmp_path)
    assert len(chars) == 31 and f"{len(chars)} characters" in r.stdout
    haruhi = next(c for c in chars.values() if c.name == "春日")
    assert haruhi.persona.startswith("你正在扮演凉宫春日") and haruhi.key in r.stdout
    r = subprocess.run(
        [sys.executable, "-m", "rp_ray.cli.main", "scenes", "extract", str(tmp_path / "missing.json"), "--out", "x"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "missing.json not found" in r.stderr and "Traceback" not in r.stderr


# -- the real ChatHaruhi splits ------------------------------------------------------------------------------------


def load_split(name: str) -> list[dict]:
    path = SHARED / f"haruhi_{name}.json"
    if not path.is_file():
        pytest.skip(f"the full ChatHaruhi splits are not at {SHARED.resolve()}")
    return json.loads(path.read_text(encoding="utf-8"))


def test_layout_matches_every_row_of_the_real_data():
    """Every system prompt of both splits (664 val + 9,792 train rows) is rebuilt exactly from its parts."""
    for split, n_rows, n_chars in (("val", 664, 34), ("train", 9792, 35)):
        rows = load_split(split)
        assert len(rows) == n_rows
        systems = [r["conversations"][0]["value"] for r in rows]
        assert sum(join_system_prompt(*split_system_prompt(s)) == s for s in systems) == n_rows
        with_scenes = [split_system_prompt(s)[1] for s in systems]
        assert all(1 <= len(sc) <= 2 for sc in with_scenes if sc)  # one or two scenes, or none
        assert len(extract_scenes(rows)) == n_chars
    print(f"\nlayout: {664 + 9792}/{664 + 9792} system prompts rebuilt exactly")


def chance(n: int, m: int, k: int) -> float:
    """The chance that k scenes drawn at random from n hold at least one of m relevant ones."""
    return 1 - math.comb(n - m, k) / math.comb(n, k)


def test_retrieval_beats_chance_on_the_real_data():
    """BM25 scene retrieval measured on the real data, k = 1, 2, 5, against the exact chance rate of a random k.

    1. Scene recall (asserted): train rows (every 3rd); query = the row's first user turn; corpus = that
       character's distinct train scenes; relevant = a scene holding a line of the character's first reply
       (``Name:「...」``). Then the same with every scene that holds the query's own line removed from the corpus
       (no verbatim copy left: the reply must be found through other words of the query).
    2. Recovering the data's own memory (printed): val rows; query = first user turn; corpus = the character's
       train scenes; relevant = a scene sharing a line with the row's memory scenes. It sits at chance: the data's
       memory scenes are not chosen by the conversation (the whole conversation as query does no better either).

    About 15 s on 2 idle cores (jieba tokenises the 8,397 train scenes once).
    """
    train, val = load_split("train"), load_split("val")
    chars = extract_scenes(train)
    index = {h: SceneIndex(c.scenes) for h, c in chars.items()}
    lines = {h: [set(s.split("\n")) for s in c.scenes] for h, c in chars.items()}
    position = {h: {s: i for i, s in enumerate(c.scenes)} for h, c in chars.items()}
    ks = (1, 2, 5)

    def measure(cases):
        """cases: (ranked scenes, n corpus, m relevant, relevant set); hit rate and chance rate per k."""
        cases = list(cases)
        hit = {k: sum(any(s in rel for s in ranked[:k]) for ranked, _, _, rel in cases) / len(cases) for k in ks}
        base = {k: sum(chance(n, m, k) for _, n, m, _ in cases) / len(cases) for k in ks}
        return len(cases), hit, base

    def recall_cases(exclude_query: bool):
        for r in train[::3]:
            conv = r["conversations"]
            h = persona_hash(split_system_prompt(conv[0]["value"])[0])
            query, reply = conv[1]["value"], conv[2]["value"]
            wanted = {f"{chars[h].name}:{line}" for line in reply.split("\n")}
            dropped = {i for i, ls in enumerate(lines[h]) if exclude_query and ls & set(query.split("\n"))}
            rel = {chars[h].scenes[i] for i, ls in enumerate(lines[h]) if ls & wanted and i not in dropped}
            if rel:
                hits = index[h].retrieve(query, max(ks) + len(dropped))
                ranked = [s for s in hits if position[h][s] not in dropped][: max(ks)]
                yield ranked, len(chars[h].scenes) - len(dropped), len(rel), rel

    def memory_cases():
        for r in val:
            conv = r["conversations"]
            persona, own = split_system_prompt(conv[0]["value"])
            h = persona_hash(persona)
            own_lines = {line for s in own for line in s.split("\n")}
            rel = {chars[h].scenes[i] for i, ls in enumerate(lines[h]) if ls & own_lines} if h in chars else set()
            if rel:
                yield index[h].retrieve(conv[1]["value"], max(ks)), len(chars[h].scenes), len(rel), rel

    results = {
        "scene recall (train, every 3rd row)": measure(recall_cases(False)),
        "scene recall, query's own scene removed": measure(recall_cases(True)),
        "data's memory scenes (val)": measure(memory_cases()),
    }
    for what, (n, hit, base) in results.items():
        table = ", ".join(f"hit@{k} {hit[k]:.3f} vs chance {base[k]:.4f}" for k in ks)
        print(f"\n{what}: {n} rows: {table}")
    n, hit, base = results["scene recall (train, every 3rd row)"]
    assert n > 2000 and all(hit[k] > 0.8 and hit[k] > 10 * base[k] for k in ks)
    n, hit, base = results["scene recall, query's own scene removed"]
    assert n > 100 and all(hit[k] > 2 * base[k] for k in ks)
    n, hit, base = results["data's memory scenes (val)"]
    assert n > 600  # measured and printed; at chance by construction of the data (see the docstring)
