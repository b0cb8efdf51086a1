"""Plain (dequantized) copies of MXFP4 gpt-oss checkpoints, so that ZeRO-3 can partition them while they load.

gpt-oss ships its MoE expert weights in MXFP4: each expert matrix is stored as ``*_blocks`` (uint8, two 4-bit
values per byte) and ``*_scales`` (uint8, one power-of-two exponent per 32 values), and config.json carries
``quantization_config: {"quant_method": "mxfp4"}``. transformers can dequantize those while loading
(``Mxfp4Config(dequantize=True)``, what ``rp_ray.llm.models.load_kwargs`` asks for), but any quantization config makes
``from_pretrained`` treat the load as quantized, and a quantized load skips ``deepspeed.zero.Init``: under ZeRO-3
every rank then builds and dequantizes the whole model in host memory instead of holding only its partition. A
copy whose experts are already plain tensors, with no ``quantization_config``, is an ordinary checkpoint, and
zero.Init partitions it as it loads. ``dequantize_checkpoint`` writes that copy, once, ahead of training.

The conversion streams: it reads one tensor at a time through safetensors' ``safe_open`` (memory-mapped), and
holds at most one output shard in memory before writing it. The experts are dequantized by transformers' own
``convert_moe_packed_tensors``, the function its ``Mxfp4Config(dequantize=True)`` load path calls, so the copy
holds exactly the tensors that load would have produced, under the names and in the layout ``GptOssExperts``
declares (``gate_up_proj`` as experts x hidden x 2*intermediate, ``down_proj`` as experts x intermediate x hidden).
Before any weight is written, the planned names and shapes are checked against the model transformers builds from
the new config (on the meta device, so without memory), so a layout transformers would not load fails at once
rather than after the whole copy.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rp_ray.llm.models import ModelDirError, is_mxfp4

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
# Written into the copy: where it came from and how, so a folder can be traced back to its source.
PROVENANCE_FILE = "rp_ray_dequantized.json"
DEFAULT_MAX_SHARD_SIZE = "5GB"
DTYPES = ("bfloat16", "float32")
# Files of other weight formats, never copied (the copy holds its own safetensors weights).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".h5", ".msgpack")
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
_OTHER_DTYPES = {"U8": "uint8", "I8": "int8", "I16": "int16", "I32": "int32", "I64": "int64", "BOOL": "bool"}


@dataclass(frozen=True)
class _Tensor:
    """One tensor of the copy: its name, where its data comes from, and its shape in the copy."""

    name: str
    sources: tuple[str, ...]  # source tensor names: (name,), or (X_blocks, X_scales) for an MXFP4 pair
    shape: tuple[int, ...]
    dtype: str  # torch dtype name in the copy


def _natural_key(name: str) -> list[Any]:
    """``layers.2`` before ``layers.10``: the copy's shards then follow the model's layer order."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _source_files(src: Path) -> dict[str, str]:
    """Every tensor name of the source checkpoint -> the safetensors file (in ``src``) holding it."""
    from safetensors import safe_open

    index = src / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map") or {}
        missing = sorted({f for f in weight_map.values() if not (src / f).is_file()})
        if missing:
            raise ModelDirError(f"{index} names shard(s) {missing} that are not in {src}; the download is incomplete")
        return dict(weight_map)
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise ModelDirError(f"{src} has no *.safetensors weights (and no {INDEX_FILE})")
    out: dict[str, str] = {}
    for f in files:
        with safe_open(f, framework="pt") as sf:
            out |= dict.fromkeys(sf.keys(), f.name)
    return out


def _plan(src: Path, handles: dict[str, Any], weight_map: dict[str, str], dtype: str) -> list[_Tensor]:
    """The copy's tensors, from the source's names, shapes and dtypes (no tensor data is read).

    Each ``X_blocks`` / ``X_scales`` pair becomes one tensor ``X``; every other tensor keeps its name, floating
    tensors cast to ``dtype``.
    """
    plan: list[_Tensor] = []
    for name in sorted(weight_map, key=_natural_key):
        sl = handles[weight_map[name]].get_slice(name)
        shape, st_dtype = tuple(sl.get_shape()), sl.get_dtype()
        if name.endswith("_scales"):
            if name.removesuffix("_scales") + "_blocks" not in weight_map:
                raise ModelDirError(f"{src}: {name} has no matching _blocks tensor; the checkpoint is incomplete")
            continue  # converted with its _blocks
        if name.endswith("_blocks"):
            base = name.removesuffix("_blocks")
            scales = base + "_scales"
            if scales not in weight_map:
                raise ModelDirError(f"{src}: {name} has no matching {scales}; the checkpoint is incomplete")
            scale_shape = tuple(handles[weight_map[scales]].get_slice(scales).get_shape())
            if len(shape) != 4 or shape[:-1] != scale_shape or st_dtype != "U8":
                raise ModelDirError(
                    f"{src}: {name} is {st_dtype} {list(shape)} with scales {list(scale_shape)}; expected gpt-oss's "
                    f"MXFP4 layout (uint8 experts x rows x groups x 16, scales experts x rows x groups)"
                )
            experts, rows, groups, nbytes = shape
            # convert_moe_packed_tensors unpacks 2 values per byte, then swaps the last two axes
            plan.append(_Tensor(base, (name, scales), (experts, groups * nbytes * 2, rows), dtype))
        elif st_dtype in _FLOAT_DTYPES:
            plan.append(_Tensor(name, (name,), shape, dtype))
        elif st_dtype in _OTHER_DTYPES:
            plan.append(_Tensor(name, (name,), shape, _OTHER_DTYPES[st_dtype]))
        else:
            raise ModelDirError(f"{src}: {name} has safetensors dtype {st_dtype}, which this conversion does not know")
    return plan


def _check_against_model(config_dir: Path, plan: list[_Tensor]) -> None:
    """The planned names and shapes are exactly what transformers' model for this config loads, unquantized."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(config_dir, trust_remote_code=False, local_files_only=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    planned = {t.name: t.shape for t in plan}
    unexpected = sorted(set(planned) - set(expected), key=_natural_key)
    missing = sorted(set(expected) - set(planned), key=_natural_key)
    if getattr(config, "tie_word_embeddings", False):
        missing = [k for k in missing if k != "lm_head.weight"]
    wrong = [f"{k} {list(v)} (model: {list(expected[k])})" for k, v in planned.items() if expected.get(k, v) != v]
    if unexpected or missing or wrong:
        raise ModelDirError(
            f"the dequantized tensors would not load into {type(model).__name__}: "
            f"unexpected {unexpected[:5]}, missing {missing[:5]}, wrong shape {wrong[:5]}"
            f"{' ...' if max(len(unexpected), len(missing), len(wrong)) > 5 else ''}; "
            "this conversion knows gpt-oss's MXFP4 layout only"
        )


def _read(t: _Tensor, handles: dict[str, Any], weight_map: dict[str, str]):
    """The copy's tensor ``t``, read (and for an MXFP4 pair, dequantized) from the source."""
    import torch
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    out_dtype = getattr(torch, t.dtype)
    tensors = [handles[weight_map[s]].get_tensor(s) for s in t.sources]
    value = convert_moe_packed_tensors(*tensors) if len(tensors) == 2 else tensors[0]
    value = value.to(out_dtype).contiguous()
    if tuple(value.shape) != t.shape:  # the plan's shape arithmetic and the dequantizer disagree: stop, write nothing
        raise RuntimeError(f"{t.name}: dequantized to {list(value.shape)}, planned {list(t.shape)}")
    return value


def _check_dest(src: Path, dest: Path) -> None:
    if dest.exists() and not dest.is_dir():
        raise ModelDirError(f"{dest} is a file; give DEST a new (or empty) folder for the dequantized copy")
    if dest.is_dir() and any(dest.iterdir()):
        raise ModelDirError(
            f"{dest} is not empty; the dequantized copy goes into a new or empty folder: pick another DEST "
            f"or remove {dest} first"
        )
    if dest.resolve() == src.resolve():
        raise ModelDirError(f"DEST {dest} is the source folder; give the dequantized copy a folder of its own")


def dequantize_checkpoint(
    src: str | Path,
    dest: str | Path,
    dtype: str = "bfloat16",
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    progress: bool = False,
) -> Path:
    """Write a plain safetensors copy of the MXFP4 gpt-oss checkpoint ``src`` into ``dest``; return ``dest``.

    The copy is laid out as ``save_pretrained(max_shard_size=...)`` writes a model: shards named
    ``model-0000i-of-0000n.safetensors`` with a ``model.safetensors.index.json`` (one ``model.safetensors`` when
    everything fits one shard), config.json without ``quantization_config``. Every expert is dequantized exactly as
    ``from_pretrained(src, quantization_config=Mxfp4Config(dequantize=True))`` does it (to bf16), then every floating
    tensor is cast to ``dtype``. (That load itself leaves the experts in bf16 whatever ``dtype`` it is given; the
    copy holds the same values, in one dtype throughout.) The other top-level files (tokenizer, chat template,
    generation config, model card, license) are copied as they are; sub-folders (gpt-oss's ``original/`` and
    ``metal/`` hold other weight formats) are not.

    ``dtype``: ``bfloat16`` (the checkpoint's own precision; MXFP4 values are exact in it) or ``float32``.
    ``progress``: show a tqdm bar over the bytes written.

    Refuses, naming the file and the fix, a source that is not MXFP4 and a ``dest`` that exists and is not empty.
    Everything is written into a hidden temporary folder next to ``dest`` and renamed to ``dest`` at the end, so
    an interrupted conversion never leaves a ``dest`` that looks complete.
    """
    src, dest = Path(src), Path(dest)
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: the dequantized copy is one of {', '.join(DTYPES)}")
    config = _mxfp4_config(src)
    _check_dest(src, dest)

    umask = os.umask(0)
    os.umask(umask)
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent))
    try:
        _write_copy(src, staging, config, dtype, max_shard_size, umask, progress)
        os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes it private; the copy is an ordinary model folder
        if dest.is_dir():
            dest.rmdir()  # empty: checked above
        os.replace(staging, dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return dest


def _write_copy(
    src: Path, staging: Path, config: dict[str, Any], dtype: str, max_shard_size: int | str, umask: int, progress: bool
) -> None:
    """Write the dequantized model folder (config, shards, other files, provenance) into ``staging``."""
    from safetensors import safe_open

    weight_map = _source_files(src)
    with contextlib.ExitStack() as stack:
        # memory-mapped: opening every shard reads nothing yet
        handles = {f: stack.enter_context(safe_open(src / f, framework="pt")) for f in set(weight_map.values())}
        plan = _plan(src, handles, weight_map, dtype)
        new_config = {k: v for k, v in config.items() if k not in ("quantization_config", "torch_dtype")}
        new_config["dtype"] = dtype
        (staging / "config.json").write_text(json.dumps(new_config, indent=2, sort_keys=True) + "\n")
        _check_against_model(staging, plan)
        log.info("dequantizing %s into %s", src, staging)
        _write_shards(plan, handles, weight_map, staging, max_shard_size, umask, progress)
    _copy_other_files(src, staging)
    provenance = {
        "source": str(src.resolve()),
        "dtype": dtype,
        "dequantized": sorted((t.name for t in plan if len(t.sources) == 2), key=_natural_key),
        "max_shard_size": max_shard_size,
        "how": "rp_ray.llm.checkpoint.dequantize_checkpoint (transformers' convert_moe_packed_tensors)",
    }
    (staging / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")


def _mxfp4_config(src: Path) -> dict[str, Any]:
    """``src``'s config.json, after checking it declares gpt-oss's MXFP4 weights."""
    if not src.is_dir():
        raise ModelDirError(f"source checkpoint folder {src} not found")
    config_file = src / "config.json"
    if not config_file.is_file():
        raise ModelDirError(f"{src} has no config.json; it is not a Hugging Face model folder")
    config = json.loads(config_file.read_text(encoding="utf-8"))
    if not is_mxfp4(config):
        quant = config.get("quantization_config")
        what = f"quant_method {quant.get('quant_method')!r}" if isinstance(quant, dict) else "no quantization_config"
        raise ModelDirError(
            f"{config_file} declares no MXFP4 weights ({what}, not 'mxfp4'): there is nothing to dequantize; "
            f"give model.path {src} itself"
        )
    if config.get("model_type") != "gpt_oss":
        raise ModelDirError(
            f"{config_file}: model_type {config.get('model_type')!r}; this conversion knows gpt-oss's MXFP4 layout "
            f"only (model_type 'gpt_oss')"
        )
    return config


def _write_shards(plan, handles, weight_map, staging: Path, max_shard_size, umask: int, progress: bool) -> None:
    """The planned tensors as ``save_pretrained`` shards them (and its index when sharded), one shard in memory."""
    import torch
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    meta = {t.name: torch.empty(t.shape, dtype=getattr(torch, t.dtype), device="meta") for t in plan}
    split = split_torch_state_dict_into_shards(meta, max_shard_size=max_shard_size)
    total = split.metadata["total_size"]
    free = shutil.disk_usage(staging).free
    if total > free:
        raise ModelDirError(
            f"the dequantized copy needs {total / 1e9:.1f} GB and {staging.parent} has {free / 1e9:.1f} GB free; "
            f"free space or give DEST on a bigger disk"
        )
    n_mxfp4 = sum(len(t.sources) == 2 for t in plan)
    msg = "%d tensors (%d MXFP4 expert tensors), %.2f GB in %d shard(s)"
    log.info(msg, len(plan), n_mxfp4, total / 1e9, len(split.filename_to_tensors))
    by_name = {t.name: t for t in plan}
    with tqdm(total=total, unit="B", unit_scale=True, desc="dequantize", disable=not progress) as bar:
        for filename, names in split.filename_to_tensors.items():
            shard = {}
            for name in names:
                shard[name] = _read(by_name[name], handles, weight_map)
                bar.update(shard[name].nbytes)
            save_file(shard, staging / filename, metadata={"format": "pt"})
            os.chmod(staging / filename, 0o666 & ~umask)  # safetensors writes 0600
            del shard
    if split.is_sharded:
        index = {
            "metadata": {"total_parameters": sum(m.numel() for m in meta.values()), **split.metadata},
            "weight_map": split.tensor_to_filename,
        }
        (staging / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _copy_other_files(src: Path, staging: Path) -> None:
    """The top-level files that are not weights (tokenizer, chat template, ...); sub-folders are skipped."""
    skipped = []
    for f in sorted(src.iterdir()):
        if f.is_dir():
            skipped.append(f.name + "/")
        elif f.name in ("config.json", INDEX_FILE, PROVENANCE_FILE) or f.name.endswith(WEIGHT_SUFFIXES):
            continue
        else:
            shutil.copy2(f, staging / f.name)
    if skipped:
        log.info("not copied from %s: %s (other weight formats, not needed to load the copy)", src, skipped)
