"""The full ChatHaruhi splits ship in data/ as .json.xz: every row reads and validates, the reference config reads
them, a config whose files are missing stops naming them, and only the configs that ask for it read the sample.
The reader streams compressed and plain files alike, so a decompression bomb costs time, never memory."""

from __future__ import annotations

import hashlib
import json
import lzma
import os
import re
import shutil
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest
from conftest import REPO
from test_data import jsonl

from rp_ray.config import DataConfig, EvalConfig, TrainConfig, load_config
from rp_ray.data import DataFileError, RegistryError, load_splits, read_rows, resolve
from rp_ray.data import reader as reader_mod
from rp_ray.preparation import absolute_paths, prepare

RP_RAY = str(Path(sys.executable).parent / "rp-ray")
DATA = REPO / "data"
FULL = {"haruhi_train": 9792, "haruhi_val": 664}
SAMPLE = {"haruhi_train": 300, "haruhi_val": 100}
REFERENCE = REPO / "jobs/configs/llama31_8b_4gpu.yaml"
TINY_CONFIGS = ["tiny_llama3", "tiny_gpt_oss", "eval_tiny_llama3", "eval_tiny_gpt_oss"]


def counts(report) -> dict[str, tuple[int, int, int]]:
    return {d.name: (d.rows_read, d.kept, d.n_dropped) for d in report.datasets}


def xz(src: Path, dest: Path) -> Path:
    dest.write_bytes(lzma.compress(src.read_bytes()))
    return dest


@pytest.fixture
def data_without_full_splits(tmp_path) -> Path:
    """A copy of data/ with everything but the full splits (registry, sample, SOURCE.md)."""
    d = tmp_path / "data"
    shutil.copytree(DATA, d, ignore=shutil.ignore_patterns("*.xz"))
    return d


def test_full_splits_ship_compressed_and_match_their_provenance():
    """data/ holds both splits as .xz, registered as such, and they decompress to the SHA-256 SOURCE.md records."""
    info = json.loads((DATA / "dataset_info.json").read_text(encoding="utf-8"))
    assert {k: v["file_name"] for k, v in info.items()} == {k: f"{k}.json.xz" for k in FULL}
    source = (DATA / "SOURCE.md").read_text(encoding="utf-8")
    assert "CC BY-NC 4.0" in source
    for name in FULL:
        f = DATA / f"{name}.json.xz"
        assert f.stat().st_size < 2_500_000, f  # the repo carries ~2.1 MB, not 25 MB
        digest = hashlib.sha256(lzma.decompress(f.read_bytes())).hexdigest()
        assert re.search(rf"`{name}\.json`: `{digest}`", source), name


def test_full_splits_read_and_validate_every_row():
    train, val, report = load_splits(DataConfig())
    assert counts(report) == {name: (n, n, 0) for name, n in FULL.items()}
    assert (len(train), len(val)) == (9792, 664)
    assert all(d.file.endswith(".json.xz") for d in report.datasets)


def test_reference_config_prepares_the_full_splits(tiny_llama3, tmp_path):
    """What `rp-ray data` on the reference (4-GPU Llama) config does before encoding, with the tiny model."""
    cfg = load_config(TrainConfig, REFERENCE, [f"model.path={tiny_llama3}", "model.template=llama3"])
    assert cfg.data.use_sample is False
    cfg = absolute_paths(cfg)
    prep = prepare(cfg.model, cfg.data, tmp_path, need=("train", "val"))
    assert (len(prep.train), len(prep.val)) == (9792, 664)
    report = json.loads(prep.report_path.read_text(encoding="utf-8"))
    assert {d["name"]: (d["rows_read"], d["kept"]) for d in report["datasets"]} == {n: (k, k) for n, k in FULL.items()}


@pytest.mark.slow
def test_rp_ray_data_on_the_reference_config(tiny_llama3, tmp_path):
    """The command itself (encoding the 9,792 conversations takes ~20 s on 2 cores)."""
    r = subprocess.run(
        [RP_RAY, "data", "--config", str(REFERENCE), f"model.path={tiny_llama3}", "model.template=llama3"]
        + ["--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "haruhi_val: 664 rows read from" in r.stdout and "kept 664, dropped 0" in r.stdout
    assert "haruhi_train: 9792 rows read from" in r.stdout and "kept 9792, dropped 0" in r.stdout
    assert "train encoded: 9792 examples" in r.stdout


def test_missing_full_split_stops_naming_the_file_and_the_fix(data_without_full_splits):
    d = data_without_full_splits
    with pytest.raises(RegistryError) as e:
        load_splits(DataConfig(dataset_dir=str(d)))
    msg = str(e.value)
    assert f"{d / 'haruhi_val.json.xz'} not found" in msg and '"file_name"' in msg
    assert f"data.use_sample=true to read the shipped sample {d / 'sample/haruhi_val.json'}" in msg
    _, _, report = load_splits(DataConfig(dataset_dir=str(d), use_sample=True))  # the opt-in still works
    assert counts(report) == {name: (n, n, 0) for name, n in SAMPLE.items()}


def test_cli_on_the_reference_config_without_the_full_splits_exits_2(tiny_llama3, data_without_full_splits):
    r = subprocess.run(
        [RP_RAY, "data", "--config", str(REFERENCE), f"model.path={tiny_llama3}", "model.template=llama3"]
        + [f"data.dataset_dir={data_without_full_splits}", "--out", str(data_without_full_splits / "report")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"{data_without_full_splits / 'haruhi_val.json.xz'} not found" in r.stderr
    assert "data.use_sample=true" in r.stderr


@pytest.mark.parametrize("name", TINY_CONFIGS)
def test_tiny_configs_read_the_sample(name, caplog):
    cls = EvalConfig if name.startswith("eval_") else TrainConfig
    cfg = load_config(cls, REPO / f"jobs/configs/{name}.yaml")
    assert cfg.data.use_sample is True
    with caplog.at_level("INFO", logger="rp_ray.data.registry"):
        _, _, report = load_splits(cfg.data)
    assert counts(report) == {n: (SAMPLE[n], SAMPLE[n], 0) for n in cfg.data.train + cfg.data.val}
    assert all("/data/sample/" in d.file or d.file.startswith("data/sample/") for d in report.datasets)
    assert "data.use_sample=true: dataset 'haruhi_val' reads the shipped sample" in caplog.text


def test_only_the_tiny_configs_use_the_sample():
    for path in sorted((REPO / "jobs/configs").glob("*.yaml")):
        cls = EvalConfig if path.stem.startswith("eval_") else TrainConfig
        assert load_config(cls, path).data.use_sample is (path.stem in TINY_CONFIGS), path.name


def test_use_sample_without_a_shipped_sample_is_an_error(tmp_path):
    (tmp_path / "dataset_info.json").write_text(json.dumps({"d": {"file_name": "d.json.xz", "formatting": "sharegpt"}}))
    with pytest.raises(RegistryError, match=r"use_sample=true, but dataset 'd' has no shipped sample") as e:
        resolve(tmp_path, "d", use_sample=True)
    assert f"{tmp_path / 'sample/d.json.xz'}, {tmp_path / 'sample/d.json'} exists" in str(e.value)


# --- the reader on compressed files ---


def test_xz_files_read_exactly_like_the_plain_ones(tmp_path):
    """JSON array and JSON Lines, each plain and as .xz: the same rows, sizes and drops (here with every defect)."""
    plain = DATA / "sample/haruhi_val.json"
    assert list(read_rows(xz(plain, tmp_path / "v.json.xz"))) == list(read_rows(plain))
    lines = tmp_path / "t.jsonl"
    lines.write_bytes(b"\xef\xbb\xbf" + jsonl({"a": 1}, b"\xff{", b"{oops", "s", {"b": "x" * 3000}) + b"\n\n")
    xz(lines, tmp_path / "t.jsonl.xz")
    rows = list(read_rows(tmp_path / "t.jsonl.xz", max_row_bytes=2048))
    assert rows == list(read_rows(lines, max_row_bytes=2048))
    assert [r.drop for r in rows] == [None, "invalid_utf8", "invalid_json", None, "too_long"]


def test_xz_that_holds_no_rows_or_no_xz_is_a_clear_error(tmp_path):
    (tmp_path / "empty.jsonl.xz").write_bytes(lzma.compress(b"\n \n"))
    with pytest.raises(DataFileError, match="is empty"):
        list(read_rows(tmp_path / "empty.jsonl.xz"))
    (tmp_path / "fake.json.xz").write_bytes(b'[{"conversations": []}]')
    with pytest.raises(DataFileError, match=r"fake.json.xz: cannot decompress it .*xz -k FILE"):
        list(read_rows(tmp_path / "fake.json.xz"))
    whole = lzma.compress((DATA / "sample/haruhi_val.json").read_bytes())
    (tmp_path / "cut.json.xz").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataFileError, match="cannot decompress it"):
        list(read_rows(tmp_path / "cut.json.xz"))


def _bomb(path: Path, head: bytes, filler: bytes, n: int, tail: bytes) -> Path:
    """An .xz file whose text is head + filler * n + tail (n MiB of filler compress to a few KiB each)."""
    comp = lzma.LZMACompressor(preset=1)
    parts = [comp.compress(head)] + [comp.compress(filler * (1 << 20)) for _ in range(n)]
    path.write_bytes(b"".join(parts + [comp.compress(tail), comp.flush()]))
    return path


@pytest.mark.parametrize("layout", ["jsonl", "json"])
def test_decompression_bomb_is_dropped_by_max_row_bytes_without_filling_memory(layout, tmp_path):
    """A 256 MiB row in a ~40 KB .xz file: dropped as too_long, the rows around it kept, peak memory a few MiB."""
    good = json.dumps({"conversations": []}).encode()
    if layout == "jsonl":
        bomb = _bomb(tmp_path / "b.jsonl.xz", good + b'\n{"x": "', b"a", 256, b'"}\n' + good + b"\n")
    else:
        bomb = _bomb(tmp_path / "b.json.xz", b"[" + good + b', {"x": "', b"a", 256, b'"}, ' + good + b"]")
    assert bomb.stat().st_size < 100_000
    tracemalloc.start()
    try:
        rows = list(read_rows(bomb, max_row_bytes=1_048_576))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [r.drop for r in rows] == [None, "too_long", None]
    assert rows[1].size > 256 << 20 and "max_row_bytes=1048576" in rows[1].detail
    assert peak < 16 << 20, f"peak {peak / 2**20:.1f} MiB"


@pytest.mark.parametrize("chunk", [1, 2, 7, 4096])
def test_json_array_streams_across_chunk_boundaries(chunk, tmp_path, monkeypatch):
    """Any chunk size gives json's own rows and error positions (escapes, multi-byte characters, numbers cut)."""
    monkeypatch.setattr(reader_mod, "CHUNK", chunk)
    items = [{"a": 'q"\\u「春日」\\', "b": [1, {"c": []}]}, 12345.5e-3, "x\\", None, [], {"d": "\n"}]
    p = tmp_path / "t.json"
    for indent in (None, 1):
        p.write_text(json.dumps(items, ensure_ascii=False, indent=indent), encoding="utf-8")
        assert [r.value for r in read_rows(p)] == items
    sample = DATA / "sample/haruhi_val.json"
    if chunk >= 7:
        assert [r.value for r in read_rows(sample)] == json.loads(sample.read_text(encoding="utf-8"))
    p.write_text('[\n {"conversations": []},\n {oops}\n]', encoding="utf-8")
    with pytest.raises(DataFileError, match=r"line 3 column 3"):
        list(read_rows(p))
    p.write_bytes(b'[{"conversations": []}, "\xff"]')
    with pytest.raises(DataFileError, match=r"not valid UTF-8 at byte offset 25"):
        list(read_rows(p))
    for text, where in [("[1, 2,\n ]", "line 2 column 2"), ("[1 2]", "line 1 column 4"), ("[1]\nx", "line 2")]:
        p.write_text(text, encoding="utf-8")
        with pytest.raises(DataFileError, match=where):
            list(read_rows(p))


def test_datasets_library_reads_the_xz_splits(tmp_path):
    """What LLaMA-Factory's loader would call, offline: datasets decompresses .xz itself (see data/SOURCE.md)."""
    script = (
        "import sys\nfrom datasets import load_dataset\n"
        "d = load_dataset('json', data_files=sys.argv[1], split='train', cache_dir=sys.argv[2])\n"
        "print(len(d), d[0]['conversations'][0]['from'])\n"
    )
    env = os.environ | {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    r = subprocess.run(
        [sys.executable, "-c", script, str(DATA / "haruhi_val.json.xz"), str(tmp_path / "cache")],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == ["664", "system"]
