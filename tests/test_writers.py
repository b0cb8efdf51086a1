"""Writers leave whole files or nothing (after a kill, beside a second job), and a resumed job trusts only what is
whole: eval shards of the right length, adapter and merged-model weights that load, a run_config that matches."""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path

import pytest
from conftest import REPO, make_adapter

from rp_ray import files
from rp_ray.config import EvalConfig, load_config
from rp_ray.eval.engines import Output, Run
from rp_ray.eval.pipeline import (
    MERGE_STAMP,
    check_adapter,
    check_or_write_fingerprint,
    configured_runs,
    merge_adapter,
    todo_shards,
)
from rp_ray.eval.shards import Row, ShardWriter, shard_lines, shard_path
from rp_ray.files import publish_dir, write_atomic
from rp_ray.llm.models import weights_problem
from rp_ray.serve.adapters import AdapterRegistry


def leftovers(folder: Path) -> list[str]:
    """Hidden temporary files or folders a writer left behind."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.fixture
def fsyncs(monkeypatch):
    """Every os.fsync call of the writers, as the path synced."""
    calls: list[str] = []
    real = os.fsync

    def fsync(fd):
        calls.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(files.os, "fsync", fsync)
    return calls


# -- write_atomic ------------------------------------------------------------------------------------------------


def test_write_atomic_replaces_whole_synced_and_leaves_nothing_behind(tmp_path, fsyncs):
    p = tmp_path / "out.json"
    write_atomic(p, "「春日」\n")
    write_atomic(p, b"new")
    assert p.read_bytes() == b"new" and leftovers(tmp_path) == []
    assert fsyncs.count(str(tmp_path)) == 2  # the folder, after each rename
    assert len([c for c in fsyncs if c != str(tmp_path)]) == 2  # the file's data, before each rename
    assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~_umask()  # readable by others as any file (mkstemp: 0600)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_write_atomic_exclusive_never_replaces(tmp_path):
    p = tmp_path / "card.json"
    write_atomic(p, "first", exclusive=True)
    with pytest.raises(FileExistsError):
        write_atomic(p, "second", exclusive=True)
    assert p.read_text() == "first" and leftovers(tmp_path) == []


def test_write_atomic_failure_keeps_the_old_file(tmp_path, monkeypatch):
    p = tmp_path / "out.json"
    p.write_text("old")

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        write_atomic(p, "new")
    assert p.read_text() == "old" and leftovers(tmp_path) == []


# -- eval shards -------------------------------------------------------------------------------------------------


def rows(n: int) -> list[Row]:
    return [Row(i, [1, 2], f"p{i}", f"l{i}") for i in range(n)]


def test_shard_temp_name_is_never_shared_with_another_job(tmp_path, fsyncs):
    """Two jobs on one output_dir: each writes under its own temporary name (a fixed ``shard_00000.tmp``, here
    held by the other job, was renamed by whichever job finished first, publishing the other's half file)."""
    path = shard_path(tmp_path, "base", 0)
    path.parent.mkdir(parents=True)
    path.with_suffix(".tmp").mkdir()  # the other job's temporary name, taken
    w = ShardWriter(tmp_path, rows(2), 2, {"base": [0]}, lambda ids: "x")
    for i in range(2):
        w.add("base", i, Output(text=f"reply {i}"))
    assert [json.loads(x)["predict"] for x in path.read_text().splitlines()] == ["reply 0", "reply 1"]
    assert any(c.startswith(str(path.parent / f".{path.name}.")) for c in fsyncs)  # the shard's data was synced


def test_a_shard_counts_as_done_only_with_all_of_its_rows(tmp_path, caplog):
    """25 rows in shards of 10: an empty, a short or a damaged shard file is predicted again, with a warning why."""
    line = json.dumps({"prompt": "p", "predict": "x", "label": "l"}) + "\n"
    files_of = {
        ("a", 0): line * 10,  # whole
        ("a", 1): "",  # empty (an interrupted write)
        ("a", 2): line * 4,  # short: the last shard holds 5
        ("b", 0): line * 9 + '{"prompt": "p", "pre',  # 10 lines, the last cut
        ("b", 1): line * 10,
        ("b", 2): line * 5,
    }
    for (run, s), text in files_of.items():
        shard_path(tmp_path, run, s).parent.mkdir(parents=True, exist_ok=True)
        shard_path(tmp_path, run, s).write_text(text)
    with caplog.at_level(logging.WARNING, logger="rp_ray.eval.shards"):
        todo = todo_shards(tmp_path, [Run("a", None), Run("b", None)], n_rows=25, shard_size=10)
    assert todo == {"a": [1, 2], "b": [0]}
    text = caplog.text
    assert "shard_00001.jsonl holds 0 lines, 10 expected" in text and "holds 4 lines, 5 expected" in text
    assert "line 10 is not a JSON object" in text
    assert not shard_path(tmp_path, "a", 1).exists()  # gone: its rows are predicted again
    assert todo_shards(tmp_path, [Run("a", None), Run("b", None)], 25, 10) == todo  # and no second warning needed


def test_a_reply_with_unicode_line_separators_stays_one_line(tmp_path):
    """json.dumps(ensure_ascii=False) leaves U+2028 and U+0085 raw; the shard is still one record per row."""
    reply = "「春日」\u2028第二行\x85第三行\u2029"
    w = ShardWriter(tmp_path, rows(2), 2, {"base": [0]}, lambda ids: "x")
    for i in range(2):
        w.add("base", i, Output(text=reply))
    path = shard_path(tmp_path, "base", 0)
    assert [json.loads(x)["predict"] for x in shard_lines(path)] == [reply, reply]
    assert todo_shards(tmp_path, [Run("base", None)], n_rows=2, shard_size=2) == {"base": []}


# -- the eval run's recorded config ------------------------------------------------------------------------------


@pytest.fixture
def fake_adapter(tmp_path):
    """A peft-looking adapter folder with whole (tiny) safetensors weights."""
    import torch
    from safetensors.torch import save_file

    d = tmp_path / "adapter"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"r": 8, "peft_type": "LORA"}))
    save_file({"w": torch.zeros(4)}, str(d / "adapter_model.safetensors"))
    return d


def eval_config(tmp_path: Path, *overrides: str) -> EvalConfig:
    model = tmp_path / "model"
    if not model.is_dir():  # once: its files' mtimes are part of the recorded config
        model.mkdir()
        (model / "config.json").write_text("{}")
    base = [f"model.path={model}", f"output_dir={tmp_path / 'out'}", "adapters={}"]
    return load_config(EvalConfig, REPO / "jobs/configs/eval_tiny_llama3.yaml", [*base, *overrides])


def test_resuming_an_eval_with_other_settings_is_refused_naming_them(tmp_path):
    out = tmp_path / "out"
    cfg = eval_config(tmp_path)
    (run,) = configured_runs(cfg)
    check_or_write_fingerprint(out, cfg, run)
    # how fast, not what: may change
    check_or_write_fingerprint(out, eval_config(tmp_path, "num_actors=3", "max_inflight=7", "cpus_per_actor=2"), run)
    for override, key in [
        ("sampling.max_new_tokens=7", "sampling"),
        ("sampling.temperature=0.5", "sampling"),
        ("sampling.seed=3", "sampling"),
        ("model.template=gpt_oss", "model"),
        ("data.cutoff_len=100", "cutoff_len"),
        ("data.val=[haruhi_train]", "val"),
        ("max_model_len=300", "max_model_len"),
        ("use_gpu=true", "use_gpu"),
    ]:
        with pytest.raises(ValueError, match=rf"{out / 'base'} holds predictions made with different settings") as e:
            check_or_write_fingerprint(out, eval_config(tmp_path, override), run)
        assert f"{key}: " in str(e.value) and "->" in str(e.value), override
    check_or_write_fingerprint(out, cfg, run)  # the refused attempts left the record as it was


def test_a_merged_runs_recorded_config_names_its_adapter(tmp_path, fake_adapter):
    """merge_adapter=true: the adapter behind a merged run is part of what a resumption must match."""
    out = tmp_path / "out"
    cfg = eval_config(tmp_path, f"adapters.tuned={fake_adapter}", "merge_adapter=true", "include_base=false")
    (run,) = configured_runs(cfg)
    assert run == Run("tuned", str(fake_adapter))
    check_or_write_fingerprint(out, cfg, run)
    other = tmp_path / "other"
    other.mkdir()
    for f in fake_adapter.iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    cfg2 = eval_config(tmp_path, f"adapters.tuned={other}", "merge_adapter=true", "include_base=false")
    with pytest.raises(ValueError, match="different settings.*adapter: "):
        check_or_write_fingerprint(out, cfg2, configured_runs(cfg2)[0])


# -- adapters and merged models: complete by their weights -------------------------------------------------------


def test_an_adapter_without_whole_weights_is_refused_naming_the_fix(tmp_path, fake_adapter):
    weights = fake_adapter / "adapter_model.safetensors"
    check_adapter(str(fake_adapter), "adapters.tuned")
    weights.write_bytes(weights.read_bytes()[:-3])  # cut short
    with pytest.raises(ValueError, match=rf"adapters.tuned: {fake_adapter} is not a complete .*cut short.*re-run"):
        check_adapter(str(fake_adapter), "adapters.tuned")
    weights.unlink()  # the config written, the weights never were
    with pytest.raises(ValueError, match=r"no adapter_model.safetensors.*point adapters.tuned at a complete adapter"):
        configured_runs(eval_config(tmp_path, f"adapters.tuned={fake_adapter}"))
    with pytest.raises(ValueError, match="adapter: .* not a complete peft adapter"):
        merge_adapter("unused-base", str(fake_adapter), tmp_path / "merged")


def test_an_interrupted_merge_is_merged_again(tiny_llama3, tmp_path, caplog):
    """A merged folder holding only the config.json that save_pretrained writes first is not taken as done."""
    adapter = make_adapter(tiny_llama3, tmp_path / "a")
    dest = tmp_path / "merged" / "tuned"
    dest.mkdir(parents=True)
    (dest / "config.json").write_text((tiny_llama3 / "config.json").read_text())
    with caplog.at_level(logging.WARNING, logger="rp_ray.eval.pipeline"):
        assert merge_adapter(str(tiny_llama3), str(adapter), dest) == str(dest)
    assert "no model.safetensors; merging again" in caplog.text
    assert weights_problem(dest) is None and (dest / MERGE_STAMP).is_file() and (dest / "tokenizer.json").is_file()
    assert leftovers(dest.parent) == []
    made = (dest / "model.safetensors").stat().st_mtime_ns
    assert merge_adapter(str(tiny_llama3), str(adapter), dest) == str(dest)  # whole and from this adapter: reused
    assert (dest / "model.safetensors").stat().st_mtime_ns == made
    other = make_adapter(tiny_llama3, tmp_path / "b", seed=1)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rp_ray.eval.pipeline"):
        merge_adapter(str(tiny_llama3), str(other), dest)  # another adapter in the same place: merged again
    assert "merged from another base, adapter or dtype" in caplog.text


# -- folders -----------------------------------------------------------------------------------------------------


def test_publish_dir_swaps_in_a_synced_readable_copy(tmp_path, fsyncs):
    src = tmp_path / "ckpt"
    (src / "sub").mkdir(parents=True)
    (src / "adapter_model.safetensors").write_bytes(b"weights")
    (src / "sub" / "x.json").write_text("{}")
    dest = tmp_path / "out" / "adapter"
    publish_dir(src, dest)
    assert (dest / "adapter_model.safetensors").read_bytes() == b"weights"
    (src / "adapter_model.safetensors").write_bytes(b"better")
    (src / "sub" / "x.json").unlink()
    publish_dir(src, dest)
    assert (dest / "adapter_model.safetensors").read_bytes() == b"better" and not (dest / "sub" / "x.json").exists()
    assert leftovers(dest.parent) == []
    assert stat.S_IMODE(dest.stat().st_mode) == 0o777 & ~_umask()  # not mkdtemp's 0700: servers read it
    synced = {Path(c).name for c in fsyncs}
    assert {"adapter_model.safetensors", "x.json"} <= synced  # the files' data before the swap


def test_publish_dir_failure_keeps_the_old_folder(tmp_path):
    dest = tmp_path / "adapter"
    dest.mkdir()
    (dest / "a").write_text("old")
    with pytest.raises(FileNotFoundError):
        publish_dir(tmp_path / "missing", dest)
    assert (dest / "a").read_text() == "old" and leftovers(tmp_path) == []


# -- the other writers use it ------------------------------------------------------------------------------------


def test_adapter_registry_is_written_whole_and_readable(tmp_path, fsyncs):
    reg = AdapterRegistry(tmp_path)
    reg.update(lambda t: t.update(x="/a/x"))
    assert reg.read() == {"x": "/a/x"} and leftovers(tmp_path) == [
        ".rp_ray_adapters.json",
        ".rp_ray_adapters.json.lock",
    ]
    assert str(tmp_path.resolve()) in fsyncs


def test_calibration_is_saved_whole_beside_another_writer(tmp_path):
    from rp_ray.plan.calibration import Calibration

    p = tmp_path / "calibration.json"
    p.with_suffix(".tmp").mkdir()  # a fixed temporary name, taken by another writer
    Calibration(p, {"H200": {"x": 1.0}}).save()
    assert Calibration.load(p).kinds == {"H200": {"x": 1.0}}
