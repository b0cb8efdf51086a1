"""Models by hub id: ``model.path`` is a local folder, or a Hugging Face / ModelScope model id found in a cache.

Resolution never goes online. A path that exists locally is used as it is. A string shaped like ``org/name``
that is not a local path is looked up in the model cache (``model.cache_dir``, else ``$RP_RAY_MODEL_CACHE``, else
the hub's own default cache); when it is not there, the error names the ``rp-ray download`` command that fetches
it. Anything else is a local folder that is missing, which ``rp_ray.llm.models.check_model_dir`` reports.

Only ``rp-ray download`` (:func:`download`) contacts a hub, under a file lock in the cache (two nodes of a
cluster sharing the cache never download the same model at once), and fetches only what a job loads:
``ALLOW_PATTERNS`` (safetensors weights, JSON configs, tokenizer files, chat templates), never pickle weights or
code (``IGNORE_PATTERNS``). ``HF_TOKEN`` (gated models) is read by huggingface_hub itself.

Cache layouts read, offline:

* Hugging Face, huggingface_hub's own layout, resolved by huggingface_hub itself
  (``snapshot_download(..., local_files_only=True)``): ``<cache>/models--<org>--<name>/`` holding ``blobs/``,
  ``refs/main`` (the commit of ``main``) and ``snapshots/<commit>/<file>`` (links into ``blobs/``). The folder
  returned is ``snapshots/<commit>``; when the download recorded the repo's file list (``trees/<commit>.json``),
  an interrupted download is refused as incomplete.
* ModelScope, whose package rp_ray does not install (``rp-ray download --hub modelscope`` asks for it); the
  layouts, from modelscope's source (``modelscope/hub/file_download.py`` ``create_temporary_directory_and_cache``
  up to 1.x, ``modelscope_hub`` ``_download.py`` ``_repo_cache_dir`` / ``_find_legacy_repo_dir`` from 2.0):
  modelscope 1.x with a cache_dir ``<cache>/<org>/<name>``, with ``.`` in the name stored as ``___``
  (``Qwen/Qwen2.5-7B`` -> ``Qwen/Qwen2___5-7B``); its default cache ``~/.cache/modelscope/hub`` (or
  ``$MODELSCOPE_CACHE``) adds ``models/``; modelscope 2.x ``<cache>/models/<org>--<name>/snapshots/master``
  (default cache ``~/.cache/modelscope``). The first of these folders that holds a config.json is used.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
from pathlib import Path

from rp_ray.config import Hub, ModelConfig

log = logging.getLogger(__name__)

CACHE_ENV = "RP_RAY_MODEL_CACHE"
# What a job loads. fnmatch patterns on the repo path ("*" also matches "/").
ALLOW_PATTERNS = [
    "*.safetensors",
    "*.json",  # config.json, generation_config.json, model.safetensors.index.json, tokenizer_config.json, ...
    "tokenizer*",
    "*.jinja",  # chat_template.jinja
    "*.model",  # sentencepiece tokenizers
    "*.tiktoken",
    "*.txt",  # merges.txt, vocab.txt
]
# Never: pickle weights (loading one can run code), code shipped with the weights, other formats, and the
# duplicate checkpoints some repos carry (meta-llama's original/*.pth, openai/gpt-oss's original/ and metal/).
IGNORE_PATTERNS = ["*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.py", "*.gguf", "*.onnx", "*.h5", "*.msgpack"]
IGNORE_PATTERNS += ["original/*", "metal/*"]
PATTERNS = {"allow_patterns": ALLOW_PATTERNS, "ignore_patterns": IGNORE_PATTERNS}  # snapshot_download's filter
MS_REVISION = "master"  # the branch modelscope downloads by default
_MODEL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}")


class HubError(ValueError):
    """A model id that is not in the cache or cannot be downloaded; the message says what to run."""


def is_model_id(path: str) -> bool:
    """Whether ``path`` is shaped like a hub model id ``org/name`` (it may still be meant as a local path)."""
    return bool(_MODEL_ID.fullmatch(path)) and ".." not in path and "--" not in path


def cache_root(cache_dir: str | Path | None = None) -> Path | None:
    """The model cache: ``cache_dir``, else ``$RP_RAY_MODEL_CACHE``, else None (the hub library's default)."""
    d = cache_dir or os.environ.get(CACHE_ENV)
    return Path(os.path.abspath(Path(d).expanduser())) if d else None


def download_command(model_id: str, hub: Hub = "huggingface", cache_dir: str | Path | None = None) -> str:
    """The ``rp-ray download`` command line that puts ``model_id`` into the cache a job reads."""
    cmd = ["rp-ray", "download", model_id]
    if hub != "huggingface":
        cmd += ["--hub", hub]
    if cache_dir:
        cmd += ["--cache-dir", str(cache_dir)]
    return shlex.join(cmd)


def hf_default_cache() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def ms_default_caches() -> list[Path]:
    """ModelScope's default cache roots: ``$MODELSCOPE_CACHE``, else ~/.cache/modelscope/hub (1.x) and
    ~/.cache/modelscope (2.x)."""
    env = os.environ.get("MODELSCOPE_CACHE")
    if env:
        return [Path(env).expanduser()]
    home = Path.home() / ".cache" / "modelscope"
    return [home / "hub", home]


def ms_candidates(model_id: str, cache: Path | None) -> list[Path]:
    """Every folder a ModelScope download of ``model_id`` may sit in (see the module docstring), in order."""
    org, name = model_id.split("/")
    names = list(dict.fromkeys([name.replace(".", "___"), name]))
    out: list[Path] = []
    for base in [cache] if cache is not None else ms_default_caches():
        for root in (base, base / "models"):
            out += [root / org / n for n in names]
        out.append(base / "models" / f"{org}--{name}" / "snapshots" / MS_REVISION)
    return list(dict.fromkeys(out))


def ms_cached(model_id: str, cache: Path | None) -> Path | None:
    """The ModelScope cache folder of ``model_id`` (the first candidate holding a config.json), or None.

    Only the folder layout is read: modelscope's own cache index (``.msc``) is a pickle and is never loaded.
    """
    return next((p for p in ms_candidates(model_id, cache) if (p / "config.json").is_file()), None)


def hf_cached(model_id: str, cache: Path | None) -> Path | None:
    """The cached Hugging Face snapshot of ``model_id`` at ``main``, resolved offline by huggingface_hub, or None.

    Raises HubError for a snapshot that huggingface_hub knows to be incomplete (an interrupted download).
    """
    from huggingface_hub import errors, snapshot_download

    incomplete = getattr(errors, "IncompleteSnapshotError", ())  # huggingface_hub >= 2.x
    try:
        folder = snapshot_download(model_id, cache_dir=cache, local_files_only=True, **PATTERNS)
    except incomplete as e:
        raise HubError(
            f"{model_id}: the cached download is incomplete ({e}). Finish it: "
            f"{download_command(model_id, 'huggingface', cache)}"
        ) from None
    except errors.LocalEntryNotFoundError:
        return None
    return Path(folder)


def resolve_model_path(path: str, hub: Hub = "huggingface", cache_dir: str | Path | None = None) -> Path:
    """``model.path`` as an absolute local folder, without going online (see the module docstring)."""
    local = Path(path).expanduser()
    if local.exists() or not is_model_id(path):
        return Path(os.path.abspath(local))
    cache = cache_root(cache_dir)
    found = hf_cached(path, cache) if hub == "huggingface" else ms_cached(path, cache)
    if found is not None:
        log.info("model.path %s: %s cache folder %s", path, hub, found)
        return found
    roots = [cache] if cache is not None else [hf_default_cache()] if hub == "huggingface" else ms_default_caches()
    where = " or ".join(map(str, roots))
    raise HubError(
        f"model.path {path!r} is not a local folder ({os.path.abspath(local)} does not exist), and {hub} model "
        f"{path} is not in the model cache {where} (model.cache_dir, ${CACHE_ENV}). Jobs never download: "
        f"fetch it once with `{download_command(path, hub, cache_dir)}` (online; HF_TOKEN for gated models), "
        f"or give model.path a local model folder (a tiny one: rp-ray tiny-model --family llama3 --out {path})"
    )


def resolve_model(model: ModelConfig) -> Path:
    """The local folder of a config's model (``model.path``, ``model.hub``, ``model.cache_dir``)."""
    return resolve_model_path(model.path, model.hub, model.cache_dir)


def _locked(lock_dir: Path, model_id: str):
    """A file lock held while a model downloads (waiting, with a log line, for another download of it)."""
    from filelock import FileLock, Timeout

    lock_file = lock_dir / f"rp_ray--{model_id.replace('/', '--')}.lock"
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(lock_file))
    try:
        lock.acquire(timeout=1)
    except Timeout:
        log.info("another download of this model holds %s; waiting for it to finish", lock_file)
        lock.acquire()
    return lock


def _hf_download(model_id: str, cache: Path | None) -> Path:
    from huggingface_hub import errors, snapshot_download

    lock = _locked((cache or hf_default_cache()) / ".locks", model_id)
    try:
        return Path(snapshot_download(model_id, cache_dir=cache, **PATTERNS))
    except errors.GatedRepoError as e:
        raise HubError(f"{model_id} is gated: accept its license on the hub and set HF_TOKEN ({e})") from None
    except errors.RepositoryNotFoundError as e:
        raise HubError(f"{model_id}: no such model on the hub, or a private one (set HF_TOKEN) ({e})") from None
    except errors.LocalEntryNotFoundError as e:  # offline (HF_HUB_OFFLINE=1) or the hub unreachable
        raise HubError(f"{model_id}: cannot download ({e}); it needs the network (and HF_HUB_OFFLINE unset)") from None
    except (errors.HfHubHTTPError, OSError) as e:
        raise HubError(f"{model_id}: download failed: {e}") from None
    finally:
        lock.release()


def _ms_download(model_id: str, cache: Path | None) -> Path:
    try:
        from modelscope import snapshot_download
    except ImportError:
        raise HubError(
            "--hub modelscope needs the modelscope package, which rp_ray does not install: "
            "pip install modelscope (then run this command again)"
        ) from None
    lock = _locked((cache or ms_default_caches()[0]) / ".lock", model_id)
    try:
        folder = snapshot_download(model_id, cache_dir=str(cache) if cache else None, **PATTERNS)
    except Exception as e:  # modelscope raises its own error types, and requests'
        raise HubError(f"{model_id}: ModelScope download failed: {e}") from None
    finally:
        lock.release()
    return Path(folder)


def download(model_id: str, hub: Hub = "huggingface", cache_dir: str | Path | None = None) -> Path:
    """Fetch ``model_id`` into the model cache (``ALLOW_PATTERNS`` only).

    Returns the local folder; a job with ``model.path=<model_id>`` (and the same ``model.hub`` and cache) then
    resolves to it offline. ``rp-ray download`` then checks the folder loads (``rp_ray.llm.models.check_model_dir``).
    """
    if not is_model_id(model_id):
        raise HubError(f"{model_id!r} is not a model id (org/name, e.g. meta-llama/Llama-3.1-8B-Instruct)")
    cache = cache_root(cache_dir)
    return _hf_download(model_id, cache) if hub == "huggingface" else _ms_download(model_id, cache)
