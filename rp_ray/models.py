"""Loading local models safely.

Models load only from a local directory, only from safetensors, with
``trust_remote_code=False``. Tiny models for the tests and the demo are built
by ``rp_ray.tiny_model``.
"""

from __future__ import annotations

from pathlib import Path

from rp_ray.template import Template


class ModelDirError(ValueError):
    """A model directory that cannot or must not be loaded; the message says how to fix it."""


def check_model_dir(path: str | Path) -> Path:
    """A local HF-layout directory with config.json, safetensors weights and a tokenizer."""
    p = Path(path)
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


def resolve_dtype(dtype: str, use_gpu: bool) -> str:
    """``model.dtype`` as a torch dtype name: ``auto`` is bfloat16 on GPU and float32 on CPU."""
    return dtype if dtype != "auto" else ("bfloat16" if use_gpu else "float32")


def load_model(path: str | Path, dtype: str = "float32"):
    """A causal LM from local safetensors, never running code shipped with the weights."""
    import torch
    from transformers import AutoModelForCausalLM

    p = check_model_dir(path)
    return AutoModelForCausalLM.from_pretrained(
        p,
        dtype=getattr(torch, dtype),
        trust_remote_code=False,
        use_safetensors=True,
        local_files_only=True,
    )


def random_lora_adapter(model_dir: str | Path, out: str | Path, seed: int = 0, rank: int = 8,
                        target: list[str] | str = ("q_proj", "v_proj", "o_proj")) -> Path:
    """A peft LoRA adapter with random non-zero weights: a stand-in for a trained one in tests and benchmarks."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    target = target if isinstance(target, str) else list(target)
    model = get_peft_model(load_model(model_dir), LoraConfig(r=rank, lora_alpha=4 * rank, target_modules=target,
                                                             init_lora_weights=False))
    model.save_pretrained(out)
    return Path(out)
