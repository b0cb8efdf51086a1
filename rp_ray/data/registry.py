"""The dataset registry: ``dataset_info.json`` in LLaMA-Factory's schema.

Only local sharegpt files are read (no hub is reachable on an offline box): JSON or JSON Lines, plain or xz-compressed.
A config reads the registered files, and a missing one is an error naming the file and the fix; only a config that sets
``data.use_sample`` reads the shipped sample under ``dataset_dir/sample/`` instead (the tiny CPU configs do: the demo
and the tests depend on its 300/100 rows), and the log and the data report say so.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from rp_ray.data.reader import COMPRESSED

log = logging.getLogger(__name__)

SAMPLE_SUBDIR = "sample"


class Columns(BaseModel):
    """Column names of a sharegpt file (LLaMA-Factory's `columns`)."""

    model_config = ConfigDict(extra="forbid")
    messages: str = "conversations"
    system: str | None = None
    tools: str | None = None
    images: str | None = None
    videos: str | None = None
    audios: str | None = None
    # alpaca / ranking columns: accepted so LLaMA-Factory files parse, refused below when used
    prompt: str | None = None
    query: str | None = None
    response: str | None = None
    history: str | None = None
    chosen: str | None = None
    rejected: str | None = None
    kto_tag: str | None = None


class Tags(BaseModel):
    """Role and content tags; defaults are LLaMA-Factory's sharegpt defaults."""

    model_config = ConfigDict(extra="forbid")
    role_tag: str = "from"
    content_tag: str = "value"
    user_tag: str = "human"
    assistant_tag: str = "gpt"
    observation_tag: str = "observation"
    function_tag: str = "function_call"
    system_tag: str | None = "system"


class DatasetAttr(BaseModel):
    """One entry of dataset_info.json."""

    model_config = ConfigDict(extra="forbid")
    name: str
    file_name: str | None = None
    formatting: str = "alpaca"
    columns: Columns = Field(default_factory=Columns)
    tags: Tags = Field(default_factory=Tags)
    ranking: bool = False
    hf_hub_url: str | None = None
    ms_hub_url: str | None = None
    om_hub_url: str | None = None
    script_url: str | None = None
    cloud_file_name: str | None = None
    subset: str | None = None
    split: str = "train"
    folder: str | None = None
    num_samples: int | None = None


class RegistryError(ValueError):
    """dataset_info.json, or a dataset named in a config, is unusable; the message says how to fix it."""


def load_registry(dataset_dir: str | Path) -> dict[str, DatasetAttr]:
    """Parse ``dataset_dir/dataset_info.json`` into validated entries."""
    info = Path(dataset_dir) / "dataset_info.json"
    if not info.is_file():
        raise RegistryError(f"{info} not found: dataset_dir must hold a dataset_info.json (see data/dataset_info.json)")
    try:
        raw = json.loads(info.read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RegistryError(f"{info} is not valid UTF-8 JSON: {e}") from None
    if not isinstance(raw, dict):
        raise RegistryError(f"{info} must be a JSON object of name -> entry")
    out = {}
    for name, entry in raw.items():
        if not isinstance(entry, dict):
            raise RegistryError(f"{info}: entry {name!r} must be an object")
        try:
            out[name] = DatasetAttr.model_validate({"name": name, **entry})
        except ValidationError as e:
            probs = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())
            raise RegistryError(f"{info}: entry {name!r}: {probs}") from None
    return out


def sample_candidates(dataset_dir: str | Path, file_name: str) -> list[Path]:
    """Where the shipped sample of a registered file lies: ``sample/<file_name>``, and for a compressed
    ``file_name`` its uncompressed name (``haruhi_train.json.xz`` -> ``sample/haruhi_train.json``)."""
    base = Path(dataset_dir) / SAMPLE_SUBDIR
    return [base / file_name] + [base / file_name.removesuffix(s) for s in COMPRESSED if file_name.endswith(s)]


def resolve(dataset_dir: str | Path, name: str, use_sample: bool = False) -> tuple[DatasetAttr, Path]:
    """Look a dataset up by name; return its entry and the file to read.

    ``use_sample``: the shipped sample of the registered file (see :func:`sample_candidates`) instead of it.
    Refuses what rp_ray cannot read (hub datasets, alpaca, ranking) with the fix, and a missing file naming it.
    """
    registry = load_registry(dataset_dir)
    if name not in registry:
        known = ", ".join(sorted(registry)) or "none"
        raise RegistryError(
            f"dataset {name!r} is not registered in {Path(dataset_dir) / 'dataset_info.json'} (registered: {known})"
        )
    attr = registry[name]
    if attr.file_name is None:
        raise RegistryError(
            f"dataset {name!r} has no file_name (hub/script datasets cannot be reached offline); "
            f'download the file into {dataset_dir} and set "file_name"'
        )
    if attr.formatting != "sharegpt":
        raise RegistryError(
            f"dataset {name!r}: formatting {attr.formatting!r} is not supported; rp_ray reads sharegpt role-play data"
        )
    if attr.ranking:
        raise RegistryError(
            f'dataset {name!r}: ranking (preference) data is not supported; remove "ranking" or use SFT data'
        )
    path = Path(dataset_dir) / attr.file_name
    samples = sample_candidates(dataset_dir, attr.file_name)
    sample = next((p for p in samples if p.is_file()), None)
    if use_sample:
        if sample is None:
            raise RegistryError(
                f"data.use_sample=true, but dataset {name!r} has no shipped sample: none of "
                f"{', '.join(map(str, samples))} exists. Set data.use_sample=false to read {path}"
            )
        log.info("data.use_sample=true: dataset %r reads the shipped sample %s (not %s)", name, sample, path)
        return attr, sample
    if not path.exists():
        hint = f", or set data.use_sample=true to read the shipped sample {sample} instead" if sample else ""
        raise RegistryError(
            f'dataset {name!r}: {path} not found. Put the file there or fix its "file_name" in '
            f"{Path(dataset_dir) / 'dataset_info.json'}{hint}"
        )
    return attr, path
