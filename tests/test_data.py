"""The data layer accounts for every row: kept + dropped[reason] == rows read, per reason, exactly."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import pytest
from conftest import SHARED_HARUHI

from rp_ray.config import DataConfig
from rp_ray.data import (
    DataFileError,
    DataQualityError,
    RegistryError,
    check_drop_ratio,
    load_registry,
    load_splits,
    read_rows,
    resolve,
)

TAGS = {
    "role_tag": "from",
    "content_tag": "value",
    "user_tag": "user",
    "assistant_tag": "assistant",
    "system_tag": "system",
}


def conv(*pairs, system="你是凉宫春日。"):
    msgs = [{"from": "system", "value": system}] if system is not None else []
    msgs += [{"from": r, "value": c} for r, c in pairs]
    return {"conversations": msgs}


def good(i: int):
    return conv(("user", f"阿虚:「第{i}次」"), ("assistant", f"「回答{i}」"))


def write_registry(d: Path, **entries):
    info = {
        name: {"file_name": f, "formatting": "sharegpt", "columns": {"messages": "conversations"}, "tags": TAGS}
        for name, f in entries.items()
    }
    (d / "dataset_info.json").write_text(json.dumps(info), encoding="utf-8")


def jsonl(*rows) -> bytes:
    return b"\n".join(r if isinstance(r, bytes) else json.dumps(r, ensure_ascii=False).encode() for r in rows) + b"\n"


@pytest.fixture
def malformed(tmp_path):
    """A train JSONL with every defect (and a BOM and blank lines), and a clean val file."""
    val_rows = [good(100), good(101)]
    train = jsonl(
        good(1),
        good(2),
        good(3),
        good(4),
        good(5),  # 5 kept
        b'\xff\xfe{"conversations": []}',  # invalid_utf8
        b'{"conversations": [',
        b"not json at all",  # invalid_json x2
        json.dumps(conv(("user", "x" * 5000), ("assistant", "y"))).encode(),  # too_long (max_row_bytes=4096)
        [1, 2],
        "a string",  # not_object x2
        {"messages": []},
        {"conversations": "hello"},  # missing_messages x2
        {"conversations": ["just text"]},  # bad_message
        {"conversations": [{"from": "user", "value": 3}, {"from": "assistant", "value": "a"}]},  # bad_message
        conv(("narrator", "旁白"), ("assistant", "a")),  # unknown_role
        conv(("user", "q"), ("function_call", "{}")),  # tool_turn
        conv(("assistant", "a"), ("user", "q")),  # role_order
        {
            "conversations": [
                {"from": "user", "value": "q"},
                {"from": "system", "value": "s"},
                {"from": "assistant", "value": "a"},
            ]
        },  # role_order
        conv(),  # no_turns (system only)
        {"conversations": []},  # no_turns
        conv(("user", "q"), ("assistant", "a"), ("user", "q2")),  # odd_turn_count
        conv(("user", "q"), ("assistant", "   ")),  # empty_content
        good(1),
        good(2),  # duplicate x2
        good(100),  # train_val_overlap
    )
    (tmp_path / "train.jsonl").write_bytes(b"\xef\xbb\xbf" + train.replace(b"\n", b"\n\n", 3))
    (tmp_path / "val.json").write_text(json.dumps(val_rows, ensure_ascii=False), encoding="utf-8")
    write_registry(tmp_path, t="train.jsonl", v="val.json")
    return tmp_path


EXPECTED = {
    "invalid_utf8": 1,
    "invalid_json": 2,
    "too_long": 1,
    "not_object": 2,
    "missing_messages": 2,
    "bad_message": 2,
    "unknown_role": 1,
    "tool_turn": 1,
    "role_order": 2,
    "no_turns": 2,
    "odd_turn_count": 1,
    "empty_content": 1,
    "duplicate": 2,
    "train_val_overlap": 1,
}


def test_malformed_fixture_exact_counts(malformed):
    cfg = DataConfig(dataset_dir=str(malformed), train=["t"], val=["v"], max_row_bytes=4096)
    train, val, report = load_splits(cfg)
    t = next(d for d in report.datasets if d.name == "t")
    assert t.dropped == EXPECTED
    assert t.kept == 5 and len(train) == 5 and len(val) == 2
    assert t.rows_read == 5 + sum(EXPECTED.values())
    assert t.kept + t.n_dropped == t.rows_read
    assert t.examples["invalid_json"][0].startswith("line ")


def test_report_is_written_and_drop_ratio_stops(malformed, tmp_path):
    cfg = DataConfig(dataset_dir=str(malformed), train=["t"], val=["v"], max_row_bytes=4096)
    _, _, report = load_splits(cfg)
    path = report.write(tmp_path / "report")
    payload = json.loads(path.read_text(encoding="utf-8"))
    assert payload["datasets"][1]["dropped"] == EXPECTED
    assert "train_val_overlap" in (tmp_path / "report" / "data_report.txt").read_text(encoding="utf-8")
    with pytest.raises(DataQualityError, match="data.max_drop_ratio=0.05") as e:
        check_drop_ratio(report)
    assert "invalid_utf8" in str(e.value)  # the message carries the report
    report.max_drop_ratio = 0.99
    check_drop_ratio(report)


def test_fifty_megabyte_line_is_counted_not_loaded(tmp_path):
    big = json.dumps(conv(("user", "啊" * (17 * 1024 * 1024)), ("assistant", "a")), ensure_ascii=False).encode()
    assert len(big) > 50_000_000
    (tmp_path / "t.jsonl").write_bytes(jsonl(good(1), big, good(2)))
    rows = list(read_rows(tmp_path / "t.jsonl"))
    assert [r.drop for r in rows] == [None, "too_long", None]


def test_json_array_with_bad_utf8_is_a_clear_error(tmp_path):
    p = tmp_path / "t.json"
    p.write_bytes(b'[{"conversations": []}, "\xff"]')
    with pytest.raises(DataFileError, match=r"not valid UTF-8 at byte offset 25"):
        list(read_rows(p))


def test_json_array_syntax_error_names_line_and_column(tmp_path):
    p = tmp_path / "t.json"
    p.write_text('[\n {"conversations": []},\n {oops}\n]', encoding="utf-8")
    with pytest.raises(DataFileError, match=r"line 3 column 3"):
        list(read_rows(p))


def test_bom_is_accepted_in_json_array(tmp_path):
    p = tmp_path / "t.json"
    p.write_bytes(b"\xef\xbb\xbf" + json.dumps([good(1)]).encode())
    assert [r.value for r in read_rows(p)] == [good(1)]


@pytest.mark.parametrize("content", [b"", b"\n\n  \n", b"\xef\xbb\xbf"])
def test_empty_file_is_a_clear_error(tmp_path, content):
    p = tmp_path / "t.jsonl"
    p.write_bytes(content)
    with pytest.raises(DataFileError, match="is empty"):
        list(read_rows(p))


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(DataFileError, match="not found"):
        list(read_rows(tmp_path / "nope.json"))


def test_registry_defaults_are_llama_factory_sharegpt(tmp_path):
    """No `tags`/`columns`: role_tag from, content_tag value, human/gpt/system; messages column conversations."""
    (tmp_path / "dataset_info.json").write_text(json.dumps({"d": {"file_name": "d.json", "formatting": "sharegpt"}}))
    (tmp_path / "d.json").write_text(
        json.dumps([{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}])
    )
    cfg = DataConfig(dataset_dir=str(tmp_path), train=["d"], val=[])
    train, _, report = load_splits(cfg)
    assert len(train) == 1 and train[0].messages[1].content == "a" and report.datasets[0].dropped == {}


@pytest.mark.parametrize(
    "entry, match",
    [
        ({"hf_hub_url": "org/data", "formatting": "sharegpt"}, "no file_name"),
        ({"file_name": "d.json"}, "formatting 'alpaca' is not supported"),
        ({"file_name": "d.json", "formatting": "sharegpt", "ranking": True}, "ranking"),
    ],
)
def test_registry_refuses_what_it_cannot_read(tmp_path, entry, match):
    (tmp_path / "dataset_info.json").write_text(json.dumps({"d": entry}))
    with pytest.raises(RegistryError, match=match):
        resolve(tmp_path, "d")


def test_registry_errors_name_the_problem(tmp_path):
    (tmp_path / "dataset_info.json").write_text(json.dumps({"d": {"file_name": "d.json", "tags": {"rol_tag": "x"}}}))
    with pytest.raises(RegistryError, match="rol_tag"):
        load_registry(tmp_path)
    (tmp_path / "dataset_info.json").write_text(json.dumps({"d": {"file_name": "d.json"}}))
    with pytest.raises(RegistryError, match="not registered.*registered: d"):
        resolve(tmp_path, "other")
    with pytest.raises(RegistryError, match="dataset_info.json not found"):
        load_registry(tmp_path / "missing")


def test_shipped_registry_reads_the_full_split_and_the_sample_only_when_asked():
    attr, path = resolve("data", "haruhi_train")
    assert attr.tags.user_tag == "user" and attr.columns.messages == "conversations"
    assert path == Path("data/haruhi_train.json.xz")
    assert resolve("data", "haruhi_train", use_sample=True)[1] == Path("data/sample/haruhi_train.json")


def test_shipped_sample_is_clean():
    train, val, report = load_splits(DataConfig(use_sample=True))
    assert (len(train), len(val)) == (300, 100)
    assert all(d.n_dropped == 0 for d in report.datasets)


@pytest.mark.skipif(not SHARED_HARUHI.is_dir(), reason="../shared/datasets/chatharuhi not present")
def test_full_chatharuhi_loads_and_validates():
    train, val, report = load_splits(DataConfig(dataset_dir=str(SHARED_HARUHI)))
    for d in report.datasets:
        assert d.kept + d.n_dropped == d.rows_read
    counts = {d.name: (d.rows_read, d.kept) for d in report.datasets}
    assert counts == {"haruhi_train": (9792, 9792), "haruhi_val": (664, 664)}
    assert len(train) == 9792 and len(val) == 664


DEEP = "[" * 100_000 + "]" * 100_000  # valid JSON, nested past Python's recursion limit
HUGE_INT = "7" * 5000  # valid JSON, more digits than int() converts


@pytest.mark.parametrize("layout, where", [("jsonl", "line 2"), ("json", "item 1")])
@pytest.mark.parametrize(
    "item, detail", [(DEEP, "nested too deeply"), (f'{{"n": {HUGE_INT}}}', "Exceeds the limit (4300 digits)")]
)
def test_json_that_python_cannot_hold_is_a_dropped_row(tmp_path, layout, where, item, detail):
    """Deep nesting or a 5,000-digit number is one bad row, counted like any other, in either layout."""
    rows = [json.dumps(good(1)), item, json.dumps(good(2))]
    p = tmp_path / f"t.{layout}"
    p.write_text("\n".join(rows) + "\n" if layout == "jsonl" else "[" + ",\n".join(rows) + "]", encoding="utf-8")
    got = list(read_rows(p))
    assert [r.drop for r in got] == [None, "unparsable_json", None]
    assert got[1].where == where and detail in got[1].detail
    assert [r.value for r in got[::2]] == [good(1), good(2)]


def test_lone_surrogate_is_dropped_with_the_row_and_turn_named(tmp_path):
    """json accepts an unpaired "\\ud800" escape; the row is dropped before the tokenizer would fail on it."""
    bad = conv(("user", "q\ud800"), ("assistant", "a"))
    bad_system = conv(("user", "q"), ("assistant", "a"), system="s\udfff")
    escaped = [json.dumps(r).encode() for r in (bad, bad_system)]  # "\\ud800" in the file, as ASCII
    (tmp_path / "train.jsonl").write_bytes(jsonl(good(1), escaped[0], good(2), escaped[1]))
    (tmp_path / "val.json").write_text(json.dumps([good(100), bad]), encoding="utf-8")
    write_registry(tmp_path, t="train.jsonl", v="val.json")
    cfg = DataConfig(dataset_dir=str(tmp_path), train=["t"], val=["v"], max_drop_ratio=0.5)
    train, val, report = load_splits(cfg)
    v, t = report.datasets
    assert (len(train), len(val)) == (2, 1)
    assert t.dropped == {"invalid_unicode": 2} and v.dropped == {"invalid_unicode": 1}
    assert t.examples["invalid_unicode"] == [
        "line 2: turn 0: text is not valid Unicode (a lone surrogate \\ud800 at character 1); the JSON escapes half "
        "of a UTF-16 pair: fix or drop that text",
        "line 4: system prompt: text is not valid Unicode (a lone surrogate \\udfff at character 1); the JSON "
        "escapes half of a UTF-16 pair: fix or drop that text",
    ]
    assert v.examples["invalid_unicode"][0].startswith("item 1: turn 0: text is not valid Unicode")
    report.write(tmp_path / "report")  # the report itself is valid UTF-8
    with pytest.raises(DataQualityError, match="invalid_unicode"):
        check_drop_ratio(report.model_copy(update={"max_drop_ratio": 0.05}))


def test_oversized_line_is_refused_in_bounded_memory(tmp_path):
    """A line far over max_row_bytes is measured in chunks, never held: peak memory stays about one chunk."""
    big = json.dumps(conv(("user", "x" * (24 << 20)), ("assistant", "a"))).encode()
    (tmp_path / "t.jsonl").write_bytes(jsonl(good(1), big, good(2)))
    del big
    tracemalloc.start()
    try:
        rows = list(read_rows(tmp_path / "t.jsonl", max_row_bytes=4096))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [r.drop for r in rows] == [None, "too_long", None] and rows[1].size > 24 << 20
    assert peak < 4 << 20, f"peak {peak / 2**20:.1f} MiB"
