"""Tiny models are real HF models with the family's special tokens; loading refuses unsafe folders."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from rp_ray.models import ModelDirError, check_model_dir, load_model, load_tokenizer
from rp_ray.template import GPT_OSS, LLAMA3, encode_supervised
from test_template import CONV


@pytest.mark.parametrize("family", ["llama3", "gpt_oss"])
def test_tiny_model_layout_and_forward(family, tiny_llama3, tiny_gpt_oss):
    path, tpl = (tiny_llama3, LLAMA3) if family == "llama3" else (tiny_gpt_oss, GPT_OSS)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja"):
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
    (d / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\nfrom transformers import LlamaForCausalLM as Evil\n")
    cfg = json.loads((d / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "evil.Evil", "AutoConfig": "evil.Evil"}
    (d / "config.json").write_text(json.dumps(cfg))
    try:
        load_model(d)
    except ValueError:
        pass  # refusing is fine too; executing is not
    assert not marker.exists()


def test_model_dtype_auto_means_bf16_on_gpu_fp32_on_cpu_and_explicit_wins():
    from rp_ray.models import resolve_dtype

    assert resolve_dtype("auto", True) == "bfloat16" and resolve_dtype("auto", False) == "float32"
    assert resolve_dtype("float16", True) == "float16" and resolve_dtype("bfloat16", False) == "bfloat16"
