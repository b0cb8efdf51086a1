"""Models by hub id (rp_ray.llm.hub): a tiny model laid out as a real Hugging Face cache and as a ModelScope cache
resolves and loads offline; a model that is not cached names the `rp-ray download` command; pickle-only and
interrupted downloads are refused. No network: the one online step, the download itself, runs against a stand-in
for huggingface_hub's fetch that fills the cache the way a download does."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import REPO

from rp_ray.config import EvalConfig, ModelConfig, TrainConfig, load_config
from rp_ray.llm import hub
from rp_ray.llm.hub import HubError, download, is_model_id, ms_candidates, resolve_model, resolve_model_path
from rp_ray.llm.models import ModelDirError, check_model_dir
from rp_ray.preparation import absolute_paths

RP_RAY = str(Path(sys.executable).parent / "rp-ray")
REPO_ID = "rp-test/Tiny-Llama-3.1"
COMMIT = hashlib.sha1(b"rp_ray test commit").hexdigest()
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def hf_cache(model_dir: Path, cache: Path, repo_id: str = REPO_ID, tree: bool = False) -> Path:
    """Lay ``model_dir`` out as huggingface_hub's cache holds a download of ``repo_id`` at ``main``; return the
    snapshot folder.

    ``models--<org>--<name>/``: ``blobs/<etag>`` (an LFS file's etag is its sha256, a plain file's its git blob
    sha1), ``snapshots/<commit>/<path>`` relative links to them, ``refs/main`` holding the commit, and with
    ``tree`` the repo's file list as a download records it (``trees/<commit>.json``, format 1).
    """
    storage = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = storage / "snapshots" / COMMIT
    files = {}
    for f in sorted(p for p in model_dir.rglob("*") if p.is_file()):
        data, rel = f.read_bytes(), f.relative_to(model_dir).as_posix()
        blob_id = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        lfs = f.suffix in (".safetensors", ".bin")
        sha256 = hashlib.sha256(data).hexdigest()
        blob = storage / "blobs" / (sha256 if lfs else blob_id)
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        pointer = snapshot / rel
        pointer.parent.mkdir(parents=True, exist_ok=True)
        pointer.symlink_to(os.path.relpath(blob, pointer.parent))
        files[rel] = {"size": len(data), "blob_id": blob_id} | (
            {"lfs_sha256": sha256, "lfs_size": len(data)} if lfs else {}
        )
    (storage / "refs").mkdir(parents=True, exist_ok=True)
    (storage / "refs" / "main").write_text(COMMIT)  # huggingface_hub writes it without a newline
    if tree:
        (storage / "trees").mkdir()
        (storage / "trees" / f"{COMMIT}.json").write_text(json.dumps({"format_version": 1, "files": files}))
    return snapshot


def ms_cache(model_dir: Path, cache: Path, repo_id: str = REPO_ID) -> Path:
    """Lay ``model_dir`` out as modelscope 1.x's snapshot_download(cache_dir=cache) leaves it: ``<cache>/<org>/<name>``
    with ``.`` in the name stored as ``___``."""
    org, name = repo_id.split("/")
    folder = cache / org / name.replace(".", "___")
    shutil.copytree(model_dir, folder)
    return folder


@pytest.fixture(scope="module")
def caches(tiny_llama3, tmp_path_factory):
    root = tmp_path_factory.mktemp("model-caches")
    return {
        "hf": root / "hf",
        "hf_snapshot": hf_cache(tiny_llama3, root / "hf"),
        "ms": root / "ms",
        "ms_folder": ms_cache(tiny_llama3, root / "ms"),
    }


def test_hf_cache_is_huggingface_hubs_own_layout(caches):
    """huggingface_hub itself finds the snapshot offline, lists the repo without a warning, and maps its files."""
    from huggingface_hub import scan_cache_dir, snapshot_download, try_to_load_from_cache

    snap = caches["hf_snapshot"]
    assert snapshot_download(REPO_ID, cache_dir=caches["hf"], local_files_only=True) == str(snap)
    info = scan_cache_dir(caches["hf"])
    assert info.warnings == [] and [r.repo_id for r in info.repos] == [REPO_ID]
    (repo,) = info.repos
    assert {r.commit_hash for r in repo.revisions} == {COMMIT} and set(repo.refs) == {"main"}
    assert {f.file_name for f in next(iter(repo.revisions)).files} >= {"config.json", "model.safetensors"}
    assert try_to_load_from_cache(REPO_ID, "config.json", cache_dir=caches["hf"]) == str(snap / "config.json")


def test_model_ids_resolve_and_load_offline(caches, tmp_path):
    """With HF_HUB_OFFLINE=1, an unreachable hub endpoint and an empty default cache, both caches resolve, and the
    tokenizer and the model load from what they resolve to: through the config (absolute_paths, as jobs do),
    and straight through models.py with the cache in $RP_RAY_MODEL_CACHE."""
    script = textwrap.dedent(
        f"""
        import json
        from rp_ray.config import TrainConfig
        from rp_ray.llm.hub import resolve_model
        from rp_ray.llm.models import load_model, load_tokenizer
        from rp_ray.preparation import absolute_paths
        from rp_ray.llm.template import LLAMA3

        out = {{}}
        for hub, cache in (("huggingface", {str(caches["hf"])!r}), ("modelscope", {str(caches["ms"])!r})):
            cfg = TrainConfig.model_validate(
                {{"model": {{"path": {REPO_ID!r}, "template": "llama3", "hub": hub, "cache_dir": cache}}}}
            )
            path = absolute_paths(cfg).model.path
            assert path == str(resolve_model(cfg.model))
            tok = load_tokenizer(path, LLAMA3)
            model = load_model(path)
            out[hub] = [path, len(tok), model.config.model_type]
        # $RP_RAY_MODEL_CACHE, and the id given to models.py as it is
        tok = load_tokenizer({REPO_ID!r}, LLAMA3)
        out["env"] = [len(tok), load_model({REPO_ID!r}).config.model_type]
        print(json.dumps(out))
        """
    )
    env = os.environ | OFFLINE_ENV
    env |= {"HF_HOME": str(tmp_path / "hf-home"), "HF_ENDPOINT": "http://127.0.0.1:9"}
    env[hub.CACHE_ENV] = str(caches["hf"])
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["huggingface"][0] == str(caches["hf_snapshot"]) and out["modelscope"][0] == str(caches["ms_folder"])
    assert out["huggingface"][1:] == out["modelscope"][1:] == out["env"] == [out["env"][0], "llama"]
    assert not (tmp_path / "hf-home" / "hub").exists()  # nothing was fetched into the default cache


def test_a_model_that_is_not_cached_names_the_download_command(tmp_path, monkeypatch):
    monkeypatch.delenv(hub.CACHE_ENV, raising=False)
    with pytest.raises(HubError, match=rf"`rp-ray download org/absent --cache-dir {tmp_path}`") as e:
        resolve_model_path("org/absent", cache_dir=tmp_path)
    assert "Jobs never download" in str(e.value) and "rp-ray tiny-model" in str(e.value)
    with pytest.raises(HubError, match=r"`rp-ray download org/absent --hub modelscope`"):
        resolve_model(ModelConfig(path="org/absent", template="llama3", hub="modelscope"))
    monkeypatch.setenv(hub.CACHE_ENV, str(tmp_path))
    with pytest.raises(HubError, match=rf"not in the model cache {tmp_path} .*`rp-ray download org/absent`"):
        check_model_dir("org/absent")  # the env's cache: the command needs no --cache-dir


def test_cli_job_on_an_uncached_model_exits_2_naming_the_download(tmp_path):
    r = subprocess.run(
        [RP_RAY, "data", "--config", "jobs/configs/tiny_llama3.yaml", "model.path=org/absent"]
        + [f"model.cache_dir={tmp_path}", "--out", str(tmp_path / "out")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env=os.environ | OFFLINE_ENV,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"rp-ray download org/absent --cache-dir {tmp_path}" in r.stderr


def test_pickle_only_snapshot_is_refused(tiny_llama3, tmp_path, monkeypatch):
    src = tmp_path / "bin-only"
    shutil.copytree(tiny_llama3, src)
    (src / "model.safetensors").rename(src / "pytorch_model.bin")
    snap = hf_cache(src, tmp_path / "hf", "org/bin-only")
    assert resolve_model_path("org/bin-only", cache_dir=tmp_path / "hf") == snap
    monkeypatch.setenv(hub.CACHE_ENV, str(tmp_path / "hf"))
    with pytest.raises(ModelDirError, match=r"found pytorch_model.bin: pickle weights are refused"):
        check_model_dir("org/bin-only")


def test_interrupted_download_is_refused_as_incomplete(tiny_llama3, tmp_path):
    """The download recorded the repo's files; a snapshot missing the weights is not handed to a job."""
    snap = hf_cache(tiny_llama3, tmp_path / "hf", tree=True)
    assert resolve_model_path(REPO_ID, cache_dir=tmp_path / "hf") == snap  # complete: fine
    (snap / "model.safetensors").unlink()
    with pytest.raises(HubError, match=rf"incomplete.*model.safetensors.*rp-ray download {REPO_ID} --cache-dir"):
        resolve_model_path(REPO_ID, cache_dir=tmp_path / "hf")


def test_local_paths_win_and_only_org_name_strings_are_ids(caches, tmp_path, monkeypatch):
    local = tmp_path / REPO_ID
    shutil.copytree(caches["ms_folder"], local)
    monkeypatch.chdir(tmp_path)
    assert resolve_model_path(REPO_ID, cache_dir=caches["hf"]) == local  # the local folder, not the cache
    assert resolve_model_path("missing/dir/model") == tmp_path / "missing/dir/model"  # not an id: a local path
    assert resolve_model_path("~/x") == Path.home() / "x"
    ids = ["meta-llama/Llama-3.1-8B-Instruct", "openai/gpt-oss-20b", "Qwen/Qwen2.5-7B"]
    not_ids = ["/abs/org/name", "./org/name", "../org/name", "org/name/sub", "org", "org/a..b", "org/a--b", "o/"]
    assert all(map(is_model_id, ids)) and not any(map(is_model_id, not_ids))


def test_modelscope_layouts_of_each_version_resolve(tiny_llama3, tmp_path, monkeypatch):
    """modelscope 1.x with a cache_dir, its default cache (~/.cache/modelscope/hub/models), and 2.x's snapshots."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MODELSCOPE_CACHE", raising=False)
    monkeypatch.delenv(hub.CACHE_ENV, raising=False)
    layouts = {
        "1.x cache_dir": (tmp_path / "c1", tmp_path / "c1/Qwen/Qwen2___5-7B"),
        "1.x default": (None, tmp_path / "home/.cache/modelscope/hub/models/Qwen/Qwen2___5-7B"),
        "2.x cache_dir": (tmp_path / "c2", tmp_path / "c2/models/Qwen--Qwen2.5-7B/snapshots/master"),
    }
    for name, (cache, folder) in layouts.items():
        assert folder in ms_candidates("Qwen/Qwen2.5-7B", cache), name
        shutil.copytree(tiny_llama3, folder)
        assert resolve_model_path("Qwen/Qwen2.5-7B", "modelscope", cache) == folder, name
        assert check_model_dir(folder) == folder
        shutil.rmtree(folder)
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path / "msc"))
    folder = tmp_path / "msc/models/Qwen/Qwen2___5-7B"
    shutil.copytree(tiny_llama3, folder)
    assert resolve_model_path("Qwen/Qwen2.5-7B", "modelscope") == folder


def test_configs_carry_the_resolved_folder(caches):
    """Train and eval configs made absolute (what jobs hand to Ray workers and vLLM) name the cached folder."""
    model = {"path": REPO_ID, "template": "llama3", "cache_dir": str(caches["hf"])}
    train = absolute_paths(TrainConfig.model_validate({"model": model}))
    ev = absolute_paths(EvalConfig.model_validate({"model": model | {"hub": "huggingface"}, "include_base": True}))
    assert train.model.path == ev.model.path == str(caches["hf_snapshot"])
    cfg = load_config(TrainConfig, REPO / "jobs/configs/llama31_8b_4gpu.yaml", [f"model.path={REPO_ID}"])
    assert cfg.model.hub == "huggingface" and cfg.model.cache_dir is None
    with pytest.raises(ValueError, match="model.hub"):
        load_config(TrainConfig, REPO / "jobs/configs/llama31_8b_4gpu.yaml", ["model.hub=civitai"])


def test_download_fetches_only_safe_files_under_a_lock(tiny_llama3, tmp_path, monkeypatch):
    """`rp-ray download`'s code path, the fetch replaced by a stand-in that fills the cache as a download does:
    the lock is held while it runs, the patterns exclude pickle weights and code, the result is checked."""
    import huggingface_hub
    from filelock import FileLock, Timeout

    calls = []
    lock_file = tmp_path / "hf" / ".locks" / f"rp_ray--{REPO_ID.replace('/', '--')}.lock"

    def fetch(repo_id, **kwargs):
        with pytest.raises(Timeout):
            FileLock(str(lock_file)).acquire(timeout=0)  # another download of it would wait
        calls.append((repo_id, kwargs))
        return str(hf_cache(tiny_llama3, kwargs["cache_dir"], repo_id))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fetch)
    folder = download(REPO_ID, cache_dir=tmp_path / "hf")
    ((repo_id, kwargs),) = calls
    assert repo_id == REPO_ID and kwargs["cache_dir"] == tmp_path / "hf" and "local_files_only" not in kwargs
    assert "*.bin" in kwargs["ignore_patterns"] and "*.py" in kwargs["ignore_patterns"]
    assert not any(p.endswith((".bin", ".py", ".pt")) for p in kwargs["allow_patterns"])
    assert folder == tmp_path / "hf" / f"models--{REPO_ID.replace('/', '--')}" / "snapshots" / COMMIT
    FileLock(str(lock_file)).acquire(timeout=0)  # released
    monkeypatch.undo()
    assert resolve_model_path(REPO_ID, cache_dir=tmp_path / "hf") == folder  # and jobs find it offline


def test_download_command_prints_the_keys_jobs_use(tiny_llama3, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    from rp_ray.cli import main as cli

    fetch = lambda repo_id, **kw: str(hf_cache(tiny_llama3, kw["cache_dir"], repo_id))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fetch)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["download", REPO_ID, "--cache-dir", "hub-cache"]) == 0
    out = capsys.readouterr().out
    assert f"model.path={REPO_ID} model.cache_dir={tmp_path / 'hub-cache'}" in out and COMMIT in out
    assert cli.main(["download", "not-an-id"]) == 2 and "is not a model id" in capsys.readouterr().err


def test_download_from_modelscope_needs_its_package(tmp_path):
    try:
        import modelscope  # noqa: F401

        pytest.skip("modelscope is installed here")
    except ImportError:
        pass
    with pytest.raises(HubError, match="pip install modelscope"):
        download("Qwen/Qwen2.5-7B", "modelscope", tmp_path)
    r = subprocess.run(
        [RP_RAY, "download", "Qwen/Qwen2.5-7B", "--hub", "modelscope", "--cache-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "pip install modelscope" in r.stderr and "Traceback" not in r.stderr
