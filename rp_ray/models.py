"""Loading local models safely, and building tiny ones for tests and the demo.

Real models load only from a local directory, only from safetensors, with
``trust_remote_code=False``. Tiny models are random-weight Llama / GPT-OSS
configs in Hugging Face layout whose byte-level BPE tokenizer is trained
in-process on role-play text and carries the family's real special tokens, so
the templates encode them exactly as they would the real model.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from rp_ray.config import AttnImplementation, Family
from rp_ray.template import Template, chat_template_jinja, get_template

log = logging.getLogger(__name__)

# Llama-3's pre-tokenizer split (tiktoken cl100k-style), so text is segmented like the real tokenizer.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Which special token plays which part, per family (as in the real tokenizer_config / generation_config).
ROLES = {
    "llama3": {"bos": "<|begin_of_text|>", "eos": "<|eot_id|>", "pad": "<|finetune_right_pad_id|>",
               "gen_eos": ["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"]},
    "gpt_oss": {"bos": "<|startoftext|>", "eos": "<|return|>", "pad": "<|endoftext|>",
                "gen_eos": ["<|return|>", "<|endoftext|>", "<|call|>"]},
}


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


def resolve_attn_implementation(family: Family, requested: AttnImplementation, use_gpu: bool) -> str:
    """The transformers ``attn_implementation`` to load a model with.

    ``auto``: llama3 -> ``sdpa``. gpt_oss has no SDPA path (its attention sinks, a learned
    logit per head, do not fit SDPA's softmax) and needs ``flex_attention`` on GPU, which
    applies the sinks by renormalising with flex's log-sum-exp; transformers 5.19 cannot
    return that log-sum-exp on CPU and refuses sinks there, so gpt_oss on CPU is ``eager``.
    An explicit choice is kept, but the combinations that cannot load fail here, before any
    weights are read, naming the setting to change.
    """
    if requested == "auto":
        if family == "llama3":
            return "sdpa"
        return "flex_attention" if use_gpu else "eager"
    if family == "gpt_oss" and requested == "sdpa":
        raise ValueError(
            "model.attn_implementation=sdpa: gpt-oss has no SDPA attention in transformers (attention sinks); "
            "use auto, flex_attention (GPU) or eager"
        )
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

    MXFP4 checkpoints (gpt-oss ships its experts that way) load dequantized, explicitly:
    left to itself transformers keeps them quantized when Triton and the ``kernels``
    package are present, and quantized experts are frozen blocks that DeepSpeed cannot
    partition and peft cannot train through; without those packages it dequantizes anyway.
    Asking for it makes the result the same on every machine.
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
    quant = config.get("quantization_config") or {}
    if quant.get("quant_method") == "mxfp4":
        from transformers import Mxfp4Config

        kwargs["quantization_config"] = Mxfp4Config(dequantize=True)
    return kwargs


def load_model(path: str | Path, dtype: str = "float32", attn_implementation: str | None = None):
    """A causal LM from local safetensors, never running code shipped with the weights.

    ``attn_implementation``: what ``resolve_attn_implementation`` chose; None leaves
    transformers' own default for the architecture.
    """
    from transformers import AutoModelForCausalLM

    p = check_model_dir(path)
    config = json.loads((p / "config.json").read_text(encoding="utf-8"))
    return AutoModelForCausalLM.from_pretrained(p, **load_kwargs(config, dtype, attn_implementation))


def _train_tokenizer(texts: Iterable[str], tpl: Template, vocab_size: int):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from tokenizers import AddedToken

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(tpl.special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    # special tokens after the learned vocab, as in the real tokenizers
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in tpl.special_tokens])
    if tpl.bos:
        bos = ROLES[tpl.name]["bos"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    return tok


def _corpus(train_file: Path) -> list[str]:
    from rp_ray.data import read_rows

    texts = []
    for row in read_rows(train_file):
        for m in (row.value or {}).get("conversations", []):
            if isinstance(m, dict) and isinstance(m.get("value"), str):
                texts.append(m["value"])
    return texts


def build_tiny_model(
    family: Family,
    out_dir: str | Path,
    corpus_file: str | Path = "data/sample/haruhi_train.json",
    vocab_size: int = 4096,
    hidden_size: int = 128,
    num_layers: int = 2,
    seed: int = 0,
) -> Path:
    """Write a small random-weight model in Hugging Face layout; seconds on a CPU."""
    import torch
    from transformers import GenerationConfig, GptOssConfig, GptOssForCausalLM, LlamaConfig, LlamaForCausalLM
    from transformers import PreTrainedTokenizerFast

    tpl = get_template(family)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    corpus = Path(corpus_file)
    raw_tok = _train_tokenizer(_corpus(corpus), tpl, vocab_size)
    roles = ROLES[family]
    tok = PreTrainedTokenizerFast(
        tokenizer_object=raw_tok,
        bos_token=roles["bos"],
        eos_token=roles["eos"],
        pad_token=roles["pad"],
        chat_template=chat_template_jinja(tpl),
        model_max_length=4096,
        clean_up_tokenization_spaces=False,
    )
    ids = {k: tok.convert_tokens_to_ids(v) for k, v in roles.items() if k != "gen_eos"}
    gen_eos = [tok.convert_tokens_to_ids(t) for t in roles["gen_eos"]]
    heads, head_dim = 4, hidden_size // 4
    common = dict(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=2,
        head_dim=head_dim,
        max_position_embeddings=4096,
        bos_token_id=ids["bos"],
        eos_token_id=ids["eos"],
        pad_token_id=ids["pad"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    if family == "llama3":
        cfg = LlamaConfig(**common, rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
        model = LlamaForCausalLM(cfg)
    else:
        cfg = GptOssConfig(
            **common,
            num_local_experts=4,
            num_experts_per_tok=2,
            sliding_window=128,
            layer_types=["sliding_attention", "full_attention"] * (num_layers // 2) + ["sliding_attention"] * (num_layers % 2),
            rope_parameters={"rope_type": "default", "rope_theta": 150000.0},
        )
        model = GptOssForCausalLM(cfg)
    model.generation_config = GenerationConfig(bos_token_id=ids["bos"], eos_token_id=gen_eos, pad_token_id=ids["pad"])
    model.to(torch.float32).save_pretrained(out)
    tok.save_pretrained(out)
    (out / "rp_ray_tiny.json").write_text(
        json.dumps({"family": family, "corpus": str(corpus), "vocab_size": len(tok), "seed": seed}, indent=2)
    )
    log.info("tiny %s model (%d params) written to %s", family, sum(p.numel() for p in model.parameters()), out)
    return out


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
