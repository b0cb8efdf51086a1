"""Tiny models are real HF models with the family's special tokens; loading refuses unsafe folders."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from test_template import CONV

from rp_ray.llm.models import ModelDirError, check_model_dir, load_model, load_tokenizer
from rp_ray.llm.template import GPT_OSS, LLAMA3, encode_supervised


@pytest.mark.parametrize("family", ["llama3", "gpt_oss"])
def test_tiny_model_layout_and_forward(family, tiny_llama3, tiny_gpt_oss):
    path, tpl = (tiny_llama3, LLAMA3) if family == "llama3" else (tiny_gpt_oss, GPT_OSS)
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "chat_template.jinja",
    ):
        assert (path / name).is_file(), name
    tok = load_tokenizer(path, tpl)
    assert set(tpl.special_tokens) <= set(tok.get_vocab())
    model = load_model(path)
    ids, labels = encode_supervised(tok, tpl, CONV, cutoff_len=256)
    out = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels]))
    assert out.logits.shape == (1, len(ids), len(tok)) and torch.isfinite(out.loss)
    gen = json.loads((path / "generation_config.json").read_text())
    assert tok.convert_tokens_to_ids(tpl.stop_words[0]) in gen["eos_token_id"]


def test_tokenizer_compresses_role_play_text(llama3_tok):
    """The in-process tokenizer is trained, not bytes: Chinese role-play text takes fewer tokens than UTF-8 bytes."""
    text = "「哼，阿虚你又迟到了！我们SOS团今天要去找外星人。」"
    assert len(llama3_tok.encode(text, add_special_tokens=False)) < len(text.encode("utf-8")) / 2


def test_wrong_family_is_refused(tiny_llama3):
    with pytest.raises(ModelDirError, match=r"lacks gpt_oss special tokens.*model.template=gpt_oss"):
        load_tokenizer(tiny_llama3, GPT_OSS)


def test_pickle_weights_are_refused(tiny_llama3, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(tiny_llama3, d)
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    with pytest.raises(ModelDirError, match="pickle weights are refused"):
        check_model_dir(d)


def test_missing_dir_says_how_to_build_one(tmp_path):
    with pytest.raises(ModelDirError, match="rp-ray tiny-model --family llama3"):
        check_model_dir(tmp_path / "nope")


def test_remote_code_never_runs(tiny_llama3, tmp_path):
    """A config that points at custom code (auto_map) loads the built-in class; the shipped .py never executes."""
    d = tmp_path / "m"
    shutil.copytree(tiny_llama3, d)
    marker = tmp_path / "pwned"
    (d / "evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('x')\nfrom transformers import LlamaForCausalLM as Evil\n"
    )
    cfg = json.loads((d / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "evil.Evil", "AutoConfig": "evil.Evil"}
    (d / "config.json").write_text(json.dumps(cfg))
    try:
        load_model(d)
    except ValueError:
        pass  # refusing is fine too; executing is not
    assert not marker.exists()


def test_model_dtype_auto_means_bf16_on_gpu_fp32_on_cpu_and_explicit_wins():
    from rp_ray.llm.models import resolve_dtype

    assert resolve_dtype("auto", True) == "bfloat16" and resolve_dtype("auto", False) == "float32"
    assert resolve_dtype("float16", True) == "float16" and resolve_dtype("bfloat16", False) == "bfloat16"


@pytest.mark.parametrize(
    "family, requested, use_gpu, want",
    [
        ("llama3", "auto", True, "sdpa"),
        ("llama3", "auto", False, "sdpa"),
        ("gpt_oss", "auto", True, "flex_attention"),  # attention sinks need flex (or eager) on GPU
        ("gpt_oss", "auto", False, "eager"),  # transformers runs sinks under flex on CUDA only
        ("gpt_oss", "eager", True, "eager"),
        ("llama3", "flash_attention_2", True, "flash_attention_2"),
        ("llama3", "flex_attention", False, "flex_attention"),
    ],
)
def test_attn_implementation_per_family_and_device(family, requested, use_gpu, want):
    from rp_ray.llm.models import resolve_attn_implementation

    assert resolve_attn_implementation(family, requested, use_gpu) == want


@pytest.mark.parametrize(
    "family, requested, use_gpu, match",
    [
        ("gpt_oss", "sdpa", True, "no SDPA attention"),
        ("gpt_oss", "flex_attention", False, "use auto or eager on CPU"),
        ("llama3", "flash_attention_2", False, "needs a GPU"),
    ],
)
def test_attn_implementation_that_cannot_load_fails_early(family, requested, use_gpu, match):
    from rp_ray.llm.models import resolve_attn_implementation

    with pytest.raises(ValueError, match=rf"model.attn_implementation={requested}.*{match}"):
        resolve_attn_implementation(family, requested, use_gpu)


def test_gpt_oss_sdpa_is_refused_by_the_config():
    from pydantic import ValidationError

    from rp_ray.config import ModelConfig

    with pytest.raises(ValidationError, match="model.attn_implementation=sdpa"):
        ModelConfig(path="m", template="gpt_oss", attn_implementation="sdpa")
    assert ModelConfig(path="m", template="gpt_oss").attn_implementation == "auto"


@pytest.mark.parametrize("family", ["llama3", "gpt_oss"])
def test_model_loads_with_the_cpu_attn_implementation_and_trains(family, tiny_llama3, tiny_gpt_oss):
    """What auto picks on CPU loads, and a forward and backward pass run through it."""
    from rp_ray.llm.models import resolve_attn_implementation

    path, tpl = (tiny_llama3, LLAMA3) if family == "llama3" else (tiny_gpt_oss, GPT_OSS)
    impl = resolve_attn_implementation(family, "auto", use_gpu=False)
    model = load_model(path, attn_implementation=impl)
    assert model.config._attn_implementation == impl
    tok = load_tokenizer(path, tpl)
    ids, labels = encode_supervised(tok, tpl, CONV, cutoff_len=256)
    out = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels]))
    out.loss.backward()
    assert torch.isfinite(out.loss) and model.model.layers[0].self_attn.q_proj.weight.grad is not None


def test_gpt_oss_flex_attention_is_refused_on_cpu_by_transformers(tiny_gpt_oss):
    """Why auto is eager for gpt_oss on CPU: transformers' flex path needs flex's log-sum-exp for the
    attention sinks, which it does not ask for on CPU. If a transformers upgrade lifts this, this test
    fails and auto can pick flex_attention on CPU too."""
    model = load_model(tiny_gpt_oss, attn_implementation="flex_attention")
    with pytest.raises(ValueError, match="Attention sinks cannot be run on CPU"):
        model(input_ids=torch.tensor([[1, 2, 3]]))


def _mxfp4_dir(src, tmp_path):
    d = tmp_path / "mxfp4"
    shutil.copytree(src, d)
    cfg = json.loads((d / "config.json").read_text())
    # as gpt-oss-20b's config.json declares it
    cfg["quantization_config"] = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": [
            "model.layers.*.self_attn",
            "model.layers.*.mlp.router",
            "model.embed_tokens",
            "lm_head",
        ],
    }
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def test_mxfp4_checkpoints_load_dequantized(tiny_gpt_oss, tmp_path, monkeypatch):
    """A config.json that declares MXFP4 gets Mxfp4Config(dequantize=True), whatever kernels are installed."""
    from transformers import AutoModelForCausalLM, Mxfp4Config

    from rp_ray.llm.models import load_kwargs

    d = _mxfp4_dir(tiny_gpt_oss, tmp_path)
    kw = load_kwargs(json.loads((d / "config.json").read_text()), "bfloat16", "eager")
    assert isinstance(kw["quantization_config"], Mxfp4Config) and kw["quantization_config"].dequantize is True
    assert (kw["dtype"], kw["attn_implementation"], kw["trust_remote_code"]) == (torch.bfloat16, "eager", False)
    assert "quantization_config" not in load_kwargs(json.loads((tiny_gpt_oss / "config.json").read_text()))

    seen = {}
    real = AutoModelForCausalLM.from_pretrained

    def spy(path, **kwargs):
        seen.update(kwargs)
        return real(path, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    model = load_model(d)
    assert seen["quantization_config"].dequantize is True
    experts = model.model.layers[0].mlp.experts
    assert experts.gate_up_proj.dim() == 3 and experts.gate_up_proj.dtype == torch.float32  # plain, trainable tensors
    assert torch.isfinite(model(input_ids=torch.tensor([[1, 2, 3]])).logits).all()


def test_lora_all_on_gpt_oss_reaches_only_the_attention_projections(tiny_gpt_oss):
    """What the lora.target description promises: on gpt-oss the nn.Linear layers (LoRA `all`) are the
    attention projections; the router and the experts are bare parameters."""
    model = load_model(tiny_gpt_oss)
    head = model.get_output_embeddings()
    linear = {
        n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head
    }
    assert linear == {"q_proj", "k_proj", "v_proj", "o_proj"}
    mlp = model.model.layers[0].mlp
    assert not isinstance(mlp.router, torch.nn.Linear) and mlp.experts.down_proj.dim() == 3
