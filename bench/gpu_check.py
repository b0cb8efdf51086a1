"""The GPU check: training's own LoRA step, the attention paths and the hf eval engine on the real model shapes,
on one GPU without Ray, vLLM or internet, as one command that prints one JSON summary.

    bash bench/gpu_check.sh                     # on the GPU machine: installs the carried wheels, runs every check
    python bench/gpu_check.py --tiny            # CPU smoke run (gloo, float32, tiny shapes), what the suite runs
    python bench/gpu_check.py --only train_llama31_8b --budget-s 120

Each check runs in a child process of its own (a fresh CUDA context, so one run's memory never leaks into the
next, and a hung or crashed check costs only itself) under a plain ``torch.distributed`` group of world size 1,
NCCL on a GPU, gloo on CPU. Checks, most valuable first; each is skipped when the budget left is below its need:

- ``train_llama31_8b``: Llama-3.1-8B with random weights, set up exactly as ``jobs/configs/llama31_8b_4gpu.yaml``
  trains it (the config is loaded and ``prepare_for_lora`` / ``build_engine`` / ``optimizer_step`` from
  ``rp_ray.train.step`` do the work): ZeRO stage, bf16 with fp32 gradient accumulation, micro-batch x cutoff,
  accumulation, the config's gradient checkpointing. Peak memory, non-pad tokens/s per GPU, MFU.
- ``train_gpt_oss_20b_z2`` / ``_z3``: the gpt-oss-20b shape (all 24 layers, bf16, flex attention with sinks) as
  ``jobs/configs/gpt_oss_20b_8gpu.yaml`` trains it, at ZeRO-2 and ZeRO-3, micro-batches of random lengths
  300-2048 (each step's lengths new), with ``TORCH_LOGS=recompiles``: every micro-batch's time and the
  recompiles counted.
- ``train_llama31_8b_other_ckpt``: the Llama run with gradient checkpointing flipped (what it costs or saves).
- ``padding``: a right-padded micro-batch's loss equals the sum of its rows' losses run alone, through sdpa
  (llama) and flex attention (gpt-oss), on the real layer shapes with 2 layers.
- ``hf_engine_gpt_oss``: the ``hf`` eval backend's engine (``rp_ray.eval.engines.HfEngine``) on the gpt-oss layer
  shape (2 layers) at a real batch (64 prompts of ~1k tokens), with the attention it chooses and with eager.

MFU counts, per token, 4 x (active parameters but the input embedding) for a LoRA step (forward 2N; backward 2N for
activation gradients, none for frozen weights; checkpointing's recomputation not counted, as MFU goes) plus
attention (12 x head width per attended pair, causal, sliding windows honoured), over the GPU's dense bf16 peak
(989 TFLOP/s on H100 / H200 / H800 unless --peak-tflops).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python bench/gpu_check.py` from a bare checkout (no install)
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from rp_ray.config import TrainConfig, load_config  # noqa: E402
from rp_ray.llm.models import resolve_attn_implementation, resolve_dtype  # noqa: E402
from rp_ray.llm.template import IGNORE_INDEX  # noqa: E402
from rp_ray.train.batching import collate  # noqa: E402
from rp_ray.train.deepspeed_config import deepspeed_config  # noqa: E402
from rp_ray.train.step import (  # noqa: E402
    World,
    build_engine,
    join_deepspeed,
    optimizer_step,
    prepare_for_lora,
    step_loss_sum,
)

CONFIGS = {"llama31_8b": "jobs/configs/llama31_8b_4gpu.yaml", "gpt_oss_20b": "jobs/configs/gpt_oss_20b_8gpu.yaml"}
# check name -> (shape, overrides, seconds it needs on an H200, start-up included)
CHECKS: dict[str, tuple[str, list[str], int]] = {
    "train_llama31_8b": ("llama31_8b", [], 60),
    "train_gpt_oss_20b_z2": ("gpt_oss_20b", ["deepspeed.stage=2"], 120),
    "train_gpt_oss_20b_z3": ("gpt_oss_20b", ["deepspeed.stage=3"], 120),
    "train_llama31_8b_other_ckpt": ("llama31_8b", ["flip_checkpointing"], 60),
    "padding": ("", [], 45),
    "hf_engine_gpt_oss": ("", [], 90),
}
RECOMPILE = re.compile(r"Recompiling function")


def model_config(shape: str, tiny: bool, layers: int | None = None, vocab: int | None = None):
    """The real architecture's config (random weights: speed does not depend on them); ``tiny`` keeps its layout
    at toy sizes for the CPU smoke run."""
    from transformers import GptOssConfig, LlamaConfig

    if shape == "llama31_8b":
        kw: dict[str, Any] = dict(
            vocab_size=128256,
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            max_position_embeddings=131072,
            rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
            tie_word_embeddings=False,
        )
        if tiny:
            kw |= dict(
                vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4
            )
            kw |= dict(num_key_value_heads=2)
        if layers:
            kw["num_hidden_layers"] = layers
        if vocab:
            kw["vocab_size"] = vocab
        return LlamaConfig(**kw)
    kw = dict(
        vocab_size=201088,
        hidden_size=2880,
        intermediate_size=2880,
        num_hidden_layers=24,
        num_attention_heads=64,
        num_key_value_heads=8,
        head_dim=64,
        num_local_experts=32,
        num_experts_per_tok=4,
        sliding_window=128,
        max_position_embeddings=131072,
        tie_word_embeddings=False,
    )
    if tiny:
        kw |= dict(vocab_size=512, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
        kw |= dict(num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=16)
    if layers:
        kw["num_hidden_layers"] = layers
    if vocab:
        kw["vocab_size"] = vocab
    n = kw["num_hidden_layers"]
    kw["layer_types"] = ["sliding_attention", "full_attention"] * (n // 2) + ["sliding_attention"] * (n % 2)
    return GptOssConfig(**kw)


def train_config(shape: str, overrides: list[str], tiny: bool) -> TrainConfig:
    """The shipped config of ``shape`` as one worker runs it (``num_workers=1`` so DeepSpeed's batch sizes match
    a world of one); the tiny smoke run shortens cutoff and accumulation only."""
    extra = ["num_workers=1"]
    if tiny:
        extra += ["data.cutoff_len=64", "gradient_accumulation_steps=2"]
    return load_config(TrainConfig, ROOT / CONFIGS[shape], [*extra, *overrides])


def settings(cfg: TrainConfig, on_gpu: bool) -> dict[str, Any]:
    """What training derives from ``cfg`` for one GPU (or CPU) worker; a run records these and a test compares
    them with the training code's own derivation."""
    dtype = resolve_dtype(cfg.model.dtype, on_gpu) if on_gpu else "float32"  # the CPU smoke run: float32, gloo
    ds = deepspeed_config(cfg, bf16=dtype == "bfloat16")
    return {
        "attn_implementation": resolve_attn_implementation(cfg.model.template, cfg.model.attn_implementation, on_gpu),
        "gradient_checkpointing": cfg.gradient_checkpointing,
        "dtype": dtype,
        "zero_stage": ds["zero_optimization"]["stage"],
        "grad_accum_dtype": ds.get("data_types", {}).get("grad_accum_dtype"),
        "micro_batch": cfg.per_device_batch_size,
        "accumulation": cfg.gradient_accumulation_steps,
        "cutoff": cfg.data.cutoff_len,
        "lora_rank": cfg.lora.rank,
    }


def active_params(model, shape_cfg) -> int:
    """Parameters a token's matmuls pass through: routed experts only, the input embedding (a lookup) not at all."""
    total = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)
    experts = getattr(shape_cfg, "num_local_experts", None)
    if not experts:
        return total
    expert_params = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    return total - expert_params + expert_params * shape_cfg.num_experts_per_tok // experts


def attention_flops(seq: int, shape_cfg) -> float:
    """Forward + backward attention FLOPs of one causal sequence: 4w per attended pair forward, 8w backward."""
    width = shape_cfg.num_attention_heads * getattr(
        shape_cfg, "head_dim", shape_cfg.hidden_size // shape_cfg.num_attention_heads
    )
    types = getattr(shape_cfg, "layer_types", None) or ["full_attention"] * shape_cfg.num_hidden_layers
    window = getattr(shape_cfg, "sliding_window", None) or seq
    pairs_full = seq * (seq + 1) / 2
    w = min(window, seq)
    pairs_window = w * (w + 1) / 2 + (seq - w) * w
    return sum(12 * width * (pairs_window if t == "sliding_attention" else pairs_full) for t in types)


def micro_batches(cfg: TrainConfig, vocab: int, lengths: list[int], seed: int) -> list[dict[str, torch.Tensor]]:
    """One optimizer step: ``lengths`` split into micro-batches of the config's size, the last 30% of each row the
    labelled reply, right-padded by training's own ``collate``."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n in lengths:
        ids = torch.randint(1, vocab, (n,), generator=g).tolist()
        cut = int(n * 0.7)
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * cut + ids[cut:]})
    mb = cfg.per_device_batch_size
    return [collate(rows[i : i + mb], pad_id=0) for i in range(0, len(rows), mb)]


def sync(world: World) -> None:
    if world.device.type == "cuda":
        torch.cuda.synchronize()


def peak_gib(world: World) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if world.device.type == "cuda" else None


def check_train(name: str, world: World, tiny: bool, peak: float, steps: int, extra: list[str]) -> dict[str, Any]:
    """Training's step on a random-weight model of the real shape, set up by training's own functions; ``extra``:
    config overrides (``--set``) on top of the shipped config's."""
    from transformers import AutoModelForCausalLM

    shape, overrides, _ = CHECKS[name]
    on_gpu = world.device.type == "cuda"
    cfg = train_config(shape, [o for o in overrides if o != "flip_checkpointing"] + extra, tiny)
    if "flip_checkpointing" in overrides:
        cfg.gradient_checkpointing = not cfg.gradient_checkpointing
    s = settings(cfg, on_gpu)
    shape_cfg = model_config(shape, tiny)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with world.device:
        model = AutoModelForCausalLM.from_config(
            shape_cfg, dtype=getattr(torch, s["dtype"]), attn_implementation=s["attn_implementation"]
        )
    n_active = active_params(model, shape_cfg)
    model = prepare_for_lora(cfg, model)
    join_deepspeed(world)
    engine, _ = build_engine(cfg, model, total_steps=steps + 2, ds_config=deepspeed_config(cfg, bf16=on_gpu))
    setup_s = time.perf_counter() - t0
    experts_impl = getattr(engine.module.config, "_experts_implementation", None)
    rng = random.Random(1)
    n_rows = cfg.per_device_batch_size * cfg.gradient_accumulation_steps
    cutoff = cfg.data.cutoff_len

    def step_lengths() -> list[int]:
        if shape == "llama31_8b":  # the case: every row a full cutoff_len
            return [cutoff] * n_rows
        lo = min(300, cutoff // 2) if not tiny else cutoff // 4
        return [rng.randint(lo, cutoff) for _ in range(n_rows)]

    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    micro_s: list[list[float]] = []
    step_s, tokens, flops = [], 0, 0.0
    for i in range(steps + 1):  # step 0 warms up (allocations, kernels, compiles) and is not counted
        lengths = step_lengths()
        batches = micro_batches(cfg, shape_cfg.vocab_size, lengths, seed=i)
        sync(world)
        t = time.perf_counter()
        times: list[float] = []
        loss, n = _timed_step(engine, batches, world, cfg.gradient_accumulation_steps, times)
        sync(world)
        micro_s.append([round(x, 3) for x in times])
        if i:
            step_s.append(time.perf_counter() - t)
            tokens += n
            flops += sum(4 * n_active * n_ + attention_flops(n_, shape_cfg) for n_ in lengths)
    seconds = sum(step_s)
    out = {
        "check": name,
        "shape": shape,
        "layers": shape_cfg.num_hidden_layers,
        "settings": s,
        "experts_implementation": experts_impl,
        "active_params": n_active,
        "setup_s": round(setup_s, 1),
        "steps_timed": steps,
        "step_s": [round(x, 2) for x in step_s],
        "micro_batch_s": micro_s,
        "loss": round(loss, 4),
        "tokens_per_s_per_gpu": round(tokens / seconds, 1),
        "peak_memory_gib": peak_gib(world),
        "mfu": round(flops / seconds / peak, 4) if on_gpu else None,
    }
    del engine, model
    return out


def _timed_step(engine, batches, world: World, accumulation: int, times: list[float]) -> tuple[float, int]:
    """``optimizer_step`` with each micro-batch's forward + backward timed (the first one of a run includes any
    compile): the engine's forward is wrapped so the step itself is training's, unchanged."""
    orig = engine.forward
    state = {"t": None}

    def timed_forward(*a, **kw):
        sync(world)
        if state["t"] is not None:
            times.append(time.perf_counter() - state["t"])
        state["t"] = time.perf_counter()
        return orig(*a, **kw)

    engine.forward = timed_forward
    try:
        loss, n = optimizer_step(engine, batches, world, accumulation)
    finally:
        engine.forward = orig
    sync(world)
    times.append(time.perf_counter() - state["t"])
    return loss, n


def check_padding(world: World, tiny: bool) -> dict[str, Any]:
    """A right-padded micro-batch's summed loss against its rows' losses alone, per attention path (float32)."""
    from transformers import AutoModelForCausalLM

    on_gpu = world.device.type == "cuda"
    lengths = [40, 64] if tiny else [700, 1500]
    out: dict[str, Any] = {"check": "padding", "lengths": lengths, "dtype": "float32"}
    for shape, family in (("llama31_8b", "llama3"), ("gpt_oss_20b", "gpt_oss")):
        attn = resolve_attn_implementation(family, "auto", on_gpu)
        shape_cfg = model_config(shape, tiny, layers=2, vocab=4096 if not tiny else None)
        torch.manual_seed(0)
        with world.device:
            model = AutoModelForCausalLM.from_config(shape_cfg, dtype=torch.float32, attn_implementation=attn).eval()
        cfg = TrainConfig.model_validate(
            {"model": {"path": "-", "template": family}, "per_device_batch_size": 2, "gradient_accumulation_steps": 1}
        )
        (padded,) = micro_batches(cfg, shape_cfg.vocab_size, lengths, seed=3)
        alone = [{k: v[i : i + 1, :n] for k, v in padded.items()} for i, n in enumerate(lengths)]
        with torch.no_grad():
            dev = {k: v.to(world.device) for k, v in padded.items()}
            together = float(step_loss_sum(model, dev))
            separate = sum(float(step_loss_sum(model, {k: v.to(world.device) for k, v in b.items()})) for b in alone)
        out[attn] = {"padded": round(together, 4), "rows_alone": round(separate, 4)}
        out[attn]["rel_diff"] = abs(together - separate) / abs(separate)
        del model
    return out


def check_hf_engine(world: World, tiny: bool) -> dict[str, Any]:
    """The ``hf`` eval engine on the gpt-oss layer shape at a real batch, with its own attention choice and eager."""
    from transformers import AutoModelForCausalLM

    from rp_ray.config import EvalConfig, SamplingConfig
    from rp_ray.eval.engines import HfEngine, Request, Run
    from rp_ray.llm.models import load_tokenizer
    from rp_ray.llm.template import get_template, stop_token_ids
    from rp_ray.llm.tiny_model import build_tiny_model

    on_gpu = world.device.type == "cuda"
    tpl = get_template("gpt_oss")
    out: dict[str, Any] = {"check": "hf_engine_gpt_oss"}
    with tempfile.TemporaryDirectory() as d:
        tok_dir = build_tiny_model("gpt_oss", Path(d) / "tok", vocab_size=4096)  # its tokenizer (real layout)
        tok = load_tokenizer(tok_dir, tpl)
        shape_cfg = model_config("gpt_oss_20b", tiny, layers=2, vocab=len(tok))
        shape_cfg.eos_token_id = tok.eos_token_id
        model = AutoModelForCausalLM.from_config(shape_cfg, dtype=torch.bfloat16 if on_gpu else torch.float32)
        model_dir = Path(d) / "model"
        model.save_pretrained(model_dir)
        tok.save_pretrained(model_dir)
        del model
        batch, prompt_len, new = (8, 48, 4) if tiny else (64, 1000, 32)
        g = random.Random(0)
        prompts = [
            [g.randrange(10, 4000) for _ in range(prompt_len - g.randrange(0, prompt_len // 4))] for _ in range(batch)
        ]
        sampling = SamplingConfig(max_new_tokens=new, seed=0)
        out |= {"batch": batch, "prompt_tokens": prompt_len, "max_new_tokens": new}
        for attn in ("auto", "eager"):
            if on_gpu:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            try:
                model_cfg = {"path": str(model_dir), "template": "gpt_oss", "attn_implementation": attn}
                cfg = EvalConfig(model=model_cfg, use_gpu=on_gpu, max_model_len=prompt_len + new + 8, sampling=sampling)
                eng = HfEngine(cfg, str(model_dir), [Run("base", None)], stop_token_ids(tok, tpl))
                rounds, errors = [], []
                for k in range(2):  # the first round compiles what it compiles; the second, other widths, steady
                    batch_prompts = [p[: len(p) - 37 * k] for p in prompts]
                    t = time.perf_counter()
                    res = eng.generate_batch(
                        [Request(i, "base", False, p, new, sampling.seed) for i, p in enumerate(batch_prompts)]
                    )
                    sync(world)
                    rounds.append(round(time.perf_counter() - t, 2))
                    errors += [o.error for o in res if o.error]
                out[attn] = {
                    "attn_implementation": eng.attn_implementation,
                    "seconds": rounds,
                    "peak_memory_gib": peak_gib(world),
                    "errors": len(errors),
                    "first_error": errors[0][:300] if errors else None,
                }
                del eng
            except torch.OutOfMemoryError as e:
                out[attn] = {"error": f"out of memory: {str(e).splitlines()[0]}", "peak_memory_gib": peak_gib(world)}
            gc.collect()
    return out


def run_check(name: str, tiny: bool, peak: float, steps: int, extra: list[str]) -> dict[str, Any]:
    """One check in this process, under a world-of-one process group (as ``torchrun`` would start it)."""
    cuda = torch.cuda.is_available() and not tiny
    os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed requires it
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    if cuda:
        torch.cuda.set_device(0)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    world = World(0, 1, torch.device("cuda", 0) if cuda else torch.device("cpu"))
    t0 = time.perf_counter()
    try:
        if name.startswith("train_"):
            r = check_train(name, world, tiny, peak, steps, extra)
        elif name == "padding":
            r = check_padding(world, tiny)
        else:
            r = check_hf_engine(world, tiny)
    except torch.OutOfMemoryError as e:
        r = {"check": name, "error": f"out of memory: {str(e).splitlines()[0]}", "peak_memory_gib": peak_gib(world)}
    r["wall_s"] = round(time.perf_counter() - t0, 1)
    dist.destroy_process_group()
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny shapes, gloo, float32")
    ap.add_argument("--only", help="comma-separated check names (default: all, in order of value)")
    ap.add_argument("--steps", type=int, default=2, help="timed optimizer steps per training check (after a warm-up)")
    ap.add_argument("--budget-s", type=float, default=450, help="stop starting checks whose need exceeds what is left")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU")
    ap.add_argument("--out", help="write the JSON summary here too")
    ap.add_argument("--log", help="append each check's stderr here (recompile logs, warnings)")
    ap.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="training config override (repeatable)"
    )
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()

    if a.child:  # one check, its result as the last stdout line
        print(json.dumps(run_check(a.child, a.tiny, a.peak_tflops * 1e12, a.steps, a.set)), flush=True)
        return
    if not a.tiny and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here: run with --tiny for the CPU smoke run")
    names = a.only.split(",") if a.only else list(CHECKS)
    unknown = [n for n in names if n not in CHECKS]
    if unknown:
        raise SystemExit(f"unknown check(s) {unknown}; choose from {list(CHECKS)}")
    summary: dict[str, Any] = {"torch": torch.__version__, "tiny": a.tiny, "set": a.set, "checks": [], "skipped": []}
    if not a.tiny:
        import transformers

        summary |= {"gpu": torch.cuda.get_device_name(0), "transformers": transformers.__version__}
        summary["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    deadline = time.monotonic() + a.budget_s
    env = os.environ | {"TORCH_LOGS": os.environ.get("TORCH_LOGS", "recompiles"), "PYTHONUNBUFFERED": "1"}
    for name in names:
        need = CHECKS[name][2] if not a.tiny else 20
        left = deadline - time.monotonic()
        if left < need:
            summary["skipped"].append({"check": name, "need_s": need, "left_s": round(left)})
            continue
        cmd = [sys.executable, __file__, "--child", name, "--steps", str(a.steps), "--peak-tflops", str(a.peak_tflops)]
        cmd += ["--tiny"] if a.tiny else []
        cmd += [f"--set={o}" for o in a.set]
        t0 = time.monotonic()
        try:
            # a check may overrun its estimate, not starve every later one: at most 1.75 x its need
            limit = max(min(left, 1.75 * need), 1)
            p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=limit, cwd=ROOT)
            lines = [x for x in p.stdout.splitlines() if x.startswith("{")]
            r = json.loads(lines[-1]) if p.returncode == 0 and lines else {"check": name, "error": p.stderr[-2000:]}
            stderr = p.stderr
        except subprocess.TimeoutExpired as e:
            r = {"check": name, "error": f"timed out after {round(time.monotonic() - t0)} s (budget)"}
            stderr = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
        r["recompiles"] = len(RECOMPILE.findall(stderr))
        r["child_wall_s"] = round(time.monotonic() - t0, 1)
        if a.log:
            with open(a.log, "a") as f:
                f.write(f"===== {name}\n{stderr}\n")
        print(json.dumps(r), flush=True)
        summary["checks"].append(r)
        if a.out:  # after every check: a run stopped from outside still leaves what it measured
            Path(a.out).write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary), flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
