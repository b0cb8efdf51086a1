"""Loading local models safely.

Models load only from a local directory (a hub model id is resolved to its folder in the model cache first, offline:
``rp_ray.llm.hub``), only from safetensors, with ``trust_remote_code=False``. Tiny models for the tests and the demo are
built by ``rp_ray.llm.tiny_model``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rp_ray.config import GPT_OSS_SDPA, AttnImplementation, Family
from rp_ray.llm.hub import is_model_id, resolve_model_path
from rp_ray.llm.template import Template


class ModelDirError(ValueError):
    """A model directory that cannot or must not be loaded; the message says how to fix it."""


def check_model_dir(path: str | Path) -> Path:
    """A local HF-layout directory with config.json, safetensors weights and a tokenizer.

    ``path`` may also be a Hugging Face model id (``org/name``) that is not a local path: it is looked up in the
    model cache ($RP_RAY_MODEL_CACHE, else huggingface_hub's), offline, and its snapshot folder checked. Jobs
    resolve their config's model (hub, cache_dir) first (``rp_ray.llm.hub.resolve_model``) and pass the folder.
    """
    p = Path(path)
    if not p.exists() and is_model_id(str(path)):
        p = resolve_model_path(str(path))  # not cached: a HubError naming `rp-ray download`
    if not p.is_dir():
        raise ModelDirError(
            f"model directory {p} not found. Give model.path a local folder in Hugging Face layout, "
            f"or build a tiny one: rp-ray tiny-model --family llama3 --out {p}"
        )
    if not (p / "config.json").is_file():
        raise ModelDirError(f"{p} has no config.json; it is not a Hugging Face model folder")
    if not any(p.glob("*.safetensors")):
        bins = [f.name for f in p.glob("*.bin")] + [f.name for f in p.glob("*.pt")]
        hint = f" (found {', '.join(bins)}: pickle weights are refused; convert them to safetensors)" if bins else ""
        raise ModelDirError(f"{p} has no *.safetensors weights{hint}")
    if not (p / "tokenizer.json").is_file() and not (p / "tokenizer_config.json").is_file():
        raise ModelDirError(f"{p} has no tokenizer.json / tokenizer_config.json")
    return p


def weights_problem(folder: str | Path, name: str = "model.safetensors") -> str | None:
    """Why the safetensors weights of ``folder`` are not whole, or None when they are.

    ``name`` is the weights file (``adapter_model.safetensors`` for a peft adapter); a model saved in shards lists
    them in ``<name>.index.json``. ``save_pretrained`` writes the config first, so an interrupted save leaves a folder
    whose config looks complete: its weights file is what tells. safetensors' header check refuses a file cut short
    (its header's tensors not covered by the bytes there).
    """
    from safetensors import SafetensorError, safe_open

    p = Path(folder)
    index = p / f"{name}.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            return f"{index.name} is not a readable safetensors index ({e})"
    elif (p / name).is_file():
        files = [name]
    else:
        return f"no {name}"
    for f in files:
        try:
            with safe_open(str(p / f), "pt"):
                pass
        except FileNotFoundError:
            return f"no {f} (listed in {index.name})"
        except (SafetensorError, OSError) as e:
            return f"{f} is cut short or damaged ({e})"
    return None


def is_mxfp4(config: dict[str, Any]) -> bool:
    """Whether a config.json (as a dict) declares MXFP4-quantized weights (gpt-oss ships its experts that way)."""
    return (config.get("quantization_config") or {}).get("quant_method") == "mxfp4"


def check_partitionable(path: str | Path, zero_stage: int) -> None:
    """Refuse an MXFP4 checkpoint under ZeRO-3, before any worker starts.

    transformers loads a quantized checkpoint (MXFP4, even dequantized on load) without ``deepspeed.zero.Init``,
    so under stage 3 every rank would dequantize and hold the whole model in host memory instead of its partition.
    A plain copy (``rp-ray convert-mxfp4``) loads partitioned; ZeRO-2 reads either.
    """
    p = Path(path)
    config = p / "config.json"
    if zero_stage != 3 or not config.is_file():
        return
    if is_mxfp4(json.loads(config.read_text(encoding="utf-8"))):
        raise ModelDirError(
            f"model.path {p} is an MXFP4 checkpoint ({config}: quantization_config.quant_method is 'mxfp4'). "
            f"transformers loads quantized checkpoints without deepspeed.zero.Init, so under deepspeed.stage=3 every "
            f"rank would dequantize and hold the whole model in host memory instead of its ZeRO-3 partition. "
            f"Convert it once with `rp-ray convert-mxfp4 {p} {p}-bf16` and set model.path={p}-bf16, "
            f"or train with deepspeed.stage=2."
        )


def load_tokenizer(path: str | Path, template: Template | None = None):
    """The model's fast tokenizer; with ``template``, check it knows the family's special tokens."""
    from transformers import AutoTokenizer

    p = check_model_dir(path)
    tok = AutoTokenizer.from_pretrained(p, trust_remote_code=False, local_files_only=True)
    if template is not None:
        missing = [t for t in template.special_tokens if t not in tok.get_vocab()]
        if missing:
            raise ModelDirError(
                f"tokenizer in {p} lacks {template.name} special tokens {missing}; "
                f"is model.template={template.name} the right family for this model?"
            )
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token  # LLaMA-Factory does the same
    return tok


def device_name(device=None) -> str:
    """What a job records as its hardware (the plan's calibration reads the kind from it): the name of the CUDA
    ``device`` (a torch device; None: this process's first GPU, if it has one), else "cpu"."""
    import torch

    if device is None:
        device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def resolve_dtype(dtype: str, use_gpu: bool) -> str:
    """``model.dtype`` as a torch dtype name: ``auto`` is bfloat16 on GPU and float32 on CPU."""
    return dtype if dtype != "auto" else ("bfloat16" if use_gpu else "float32")


def resolve_attn_implementation(family: Family, requested: AttnImplementation, use_gpu: bool) -> str:
    """The transformers ``attn_implementation`` to load a model with.

    ``auto``: llama3 -> ``sdpa``. gpt_oss has no SDPA path (its attention sinks, a learned logit per head, do not fit
    SDPA's softmax) and needs ``flex_attention`` on GPU, which applies the sinks by renormalising with flex's
    log-sum-exp; transformers 5.19 cannot return that log-sum-exp on CPU and refuses sinks there, so gpt_oss on CPU is
    ``eager``. An explicit choice is kept, but the combinations that cannot load fail here, before any weights are read,
    naming the setting to change.
    """
    if requested == "auto":
        return "sdpa" if family == "llama3" else "flex_attention" if use_gpu else "eager"
    if family == "gpt_oss" and requested == "sdpa":
        raise ValueError(GPT_OSS_SDPA)
    if not use_gpu and requested == "flash_attention_2":
        raise ValueError("model.attn_implementation=flash_attention_2 needs a GPU; use auto on CPU")
    if not use_gpu and family == "gpt_oss" and requested == "flex_attention":
        raise ValueError(
            "model.attn_implementation=flex_attention: transformers runs gpt-oss's attention sinks with flex "
            "attention on CUDA only; use auto or eager on CPU"
        )
    return requested


def load_kwargs(
    config: dict[str, Any], dtype: str = "float32", attn_implementation: str | None = None
) -> dict[str, Any]:
    """``from_pretrained`` keyword arguments for a model whose config.json is ``config``.

    MXFP4 checkpoints (gpt-oss ships its experts that way) load dequantized, explicitly: left to itself transformers
    keeps them quantized when Triton and the ``kernels`` package are present, and quantized experts are frozen blocks
    that DeepSpeed cannot partition and peft cannot train through; without those packages it dequantizes anyway. Asking
    for it makes the result the same on every machine.
    """
    import torch

    kwargs: dict[str, Any] = {
        "dtype": getattr(torch, dtype),
        "trust_remote_code": False,
        "use_safetensors": True,
        "local_files_only": True,
    }
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if is_mxfp4(config):
        from transformers import Mxfp4Config

        kwargs["quantization_config"] = Mxfp4Config(dequantize=True)
    return kwargs


def load_model(
    path: str | Path, dtype: str = "float32", attn_implementation: str | None = None, device: str | None = None
):
    """A causal LM from local safetensors, never running code shipped with the weights.

    ``attn_implementation``: what ``resolve_attn_implementation`` chose; None leaves transformers' own default for the
    architecture. ``device``: load the weights straight onto it, shard by shard (a GPU worker then never holds the whole
    model in host memory); None = CPU.
    """
    from transformers import AutoModelForCausalLM

    p = check_model_dir(path)
    config = json.loads((p / "config.json").read_text(encoding="utf-8"))
    kwargs = load_kwargs(config, dtype, attn_implementation)
    if device is not None and device != "cpu":
        kwargs["device_map"] = {"": device}
    return AutoModelForCausalLM.from_pretrained(p, **kwargs)


def random_lora_adapter(
    model_dir: str | Path,
    out: str | Path,
    seed: int = 0,
    rank: int = 8,
    target: list[str] | str = ("q_proj", "v_proj", "o_proj"),
) -> Path:
    """A peft LoRA adapter with random non-zero weights: a stand-in for a trained one in tests and benchmarks."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    target = target if isinstance(target, str) else list(target)
    model = get_peft_model(
        load_model(model_dir), LoraConfig(r=rank, lora_alpha=4 * rank, target_modules=target, init_lora_weights=False)
    )
    model.save_pretrained(out)
    return Path(out)
