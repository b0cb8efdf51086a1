"""A plan in words: the full report ``rp-ray plan`` prints, the short block a job prints when it starts, and the
figures a summary records beside what was measured."""

from __future__ import annotations

from typing import Any

from rp_ray.plan.hardware import GIB
from rp_ray.plan.planner import EvalPlan, ServePlan, Setting, TrainPlan


def _n(x: float) -> str:
    return f"{x:,.0f}"


def _dur(s: float) -> str:
    if s < 120:
        return f"{s:.0f} s"
    if s < 2 * 3600:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.2f} h"


def _gib(x: float) -> str:
    return f"{x / GIB:.1f} GiB" if x >= GIB / 10 or x == 0 else f"{x / 2**20:.1f} MiB"


def _flop(n: float) -> str:
    for unit, size in (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.0f} FLOP"


def _count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.0f}"


def _model(s: Setting) -> list[str]:
    m = s.shape
    moe = (
        f", MoE {m.experts_per_token} of {m.experts} experts: {_count(m.active_params)} active per token"
        if m.experts
        else f", {_count(m.active_params)} per token (output head in, embedding out)"
    )
    window = (
        f", sliding window {m.sliding_window} on {sum(w is not None for w in m.windows())} layers"
        if m.sliding_window
        else ""
    )
    return [
        f"model     {m.name}: {_count(m.total_params)} parameters{moe}",
        f"          {m.layers} layers, hidden {m.hidden}, {m.heads} heads ({m.kv_heads} KV, head {m.head_dim}), "
        f"intermediate {m.intermediate}, vocab {m.vocab}{window}",
        f"          from {m.source}",
    ]


def _hardware(s: Setting, count: int, what: str) -> str:
    hw = s.hw
    if not hw.gpu:
        return (
            f"hardware  {count} x {what} on {hw.name}: {hw.peak_flops / 1e9:.1f} GFLOP/s float32 and "
            f"{hw.memory_bandwidth / 1e9:.1f} GB/s per thread, {_gib(hw.memory_bytes)} host memory ({hw.source})"
        )
    return (
        f"hardware  {count} x {hw.name}: {hw.peak_flops / 1e12:.0f} TFLOP/s bf16 dense, "
        f"{hw.memory_bandwidth / 1e12:.2f} TB/s, {_gib(hw.memory_bytes)}, {hw.interconnect_name}\n"
        f"          source: {hw.source}"
    )


def _cost(s: Setting, device_hours: float, unit: str) -> str:
    line = f"cost      {device_hours:.2f} {unit}-hours"
    if s.price_per_hour is not None:
        line += f" x {s.price_per_hour:g} = {device_hours * s.price_per_hour:,.2f}"
    else:
        line += " (--price-per-gpu-hour X for money)"
    return line


def _efficiency(s: Setting, keys: list[str]) -> str:
    src = s.eff.sources
    parts = []
    for k in keys:
        v = getattr(s.eff, k)
        parts.append(f"{k}={v:.3g} ({src.get(k, src.get('*', ''))})")
    return "assumed   " + "\n          ".join(parts)


def _tail(s: Setting, problems: list[str], notes: list[str]) -> list[str]:
    out = [f"note      {n}" for n in s.notes + notes]
    if problems:
        out.append("REFUSED   this config cannot run as set:")
        out += [f"  - {p}" for p in problems]
    return out


def render_train(p: TrainPlan) -> str:
    cfg, s, t, sch = p.cfg, p.s, p.tokens, p.schedule
    unit = "GPU" if s.hw.gpu else "worker"
    device = "GPU" if s.hw.gpu else "worker"
    mem_lines = [f"            {n:<22} {_gib(b):>10}  {note}" for n, b, note in p.memory.lines]
    verdict = "fits" if p.memory.fits else "DOES NOT FIT"
    rows = p.world * cfg.per_device_batch_size * cfg.gradient_accumulation_steps
    f = p.flops
    lines = [
        f"plan      train: {cfg.model.path} LoRA r={cfg.lora.rank} ({cfg.lora.target}), "
        f"{p.world} workers, ZeRO-{cfg.deepspeed.stage}, {'bf16' if s.dtype_bytes == 2 else 'float32'}",
        _hardware(s, p.world, "workers"),
        *_model(s),
        f"data      {', '.join(t.datasets)}: {_n(t.examples)} examples, {_n(t.tokens)} tokens after cutoff "
        f"{cfg.data.cutoff_len} ({_n(t.supervised_tokens)} supervised), mean {t.mean:.0f}, max {t.max}, "
        f"{t.truncated} cut",
        f"          {t.source}",
        *[f"          {n}" for n in t.notes],
        f"steps     {p.steps_per_epoch} per epoch ({p.world} x {cfg.per_device_batch_size} x "
        f"{cfg.gradient_accumulation_steps} = {rows} rows a step), {p.total_steps} steps ({p.epochs:.2f} epochs): "
        f"{_n(p.tokens_trained)} tokens trained, {_n(p.supervised_trained)} supervised; padding "
        f"{sch.padding_ratio:.1%}, rank imbalance {sch.imbalance:.3f}",
        f"LoRA      {_count(p.lora_params)} parameters; FLOPs per token: forward 2N + 2n, backward 2N + 4n"
        f"{', recomputation 2N + 2n' if cfg.gradient_checkpointing else ''}, N = {_count(s.shape.active_params)} "
        f"active, n = LoRA; attention {f.pair_executed // s.shape.q_width} w per attended pair",
        f"          = {_flop(f.dense_model)} per token model, {_flop(f.dense_executed)} executed, plus attention",
        f"memory    per {device}, micro-batch {cfg.per_device_batch_size} x {p.seq_len} tokens "
        f"(the longest row), checkpointing {'on' if cfg.gradient_checkpointing else 'off'}:",
        *mem_lines,
        f"            {'total':<22} {_gib(p.memory.total):>10}  of {_gib(p.memory.capacity)}: {verdict}; largest "
        f"micro-batch that fits: {p.largest_micro_batch}",
        f"time      training {_dur(p.train_s)} at {s.eff.train_hfu:.1%} of peak on executed FLOPs (MFU {p.mfu:.1%}), "
        f"{p.tokens_trained / p.train_s / p.world if p.train_s else 0:,.0f} tokens/s per {device}"
        + (f"; communication not hidden {_dur(p.comm_s)}" if p.comm_s > 1 else ""),
        f"          + validation {_dur(p.validation_s)} + start-up {_dur(p.startup_s)} = {_dur(p.total_s)}",
        _cost(s, p.device_hours, unit),
        _efficiency(s, ["train_hfu", "train_overhead_s", "train_startup_s"]),
    ]
    return "\n".join(lines + _tail(s, p.problems, []))


def render_eval(p: EvalPlan) -> str:
    cfg, s, t, e = p.cfg, p.s, p.tokens, p.engine
    unit = "GPU" if s.hw.gpu else "engine"
    kv = e.memory
    lines = [
        f"plan      eval: {cfg.model.path}, runs {', '.join(r.name for r in p.runs)}; {p.actors} engine(s) x "
        f"{p.gpus_per_engine} {'GPU' if s.hw.gpu else 'CPU thread(s)'} ({cfg.backend}), "
        f"{'greedy' if cfg.sampling.greedy else 'sampled'}, max_new_tokens {cfg.sampling.max_new_tokens}",
        _hardware(s, p.devices, "engines"),
        *_model(s),
        f"data      {', '.join(t.datasets)}: {_n(t.examples)} rows, per run {_n(t.tokens)} prompt tokens (mean "
        f"{t.mean:.0f}, max {t.max}), {_n(t.supervised_tokens)} reply tokens (the labels' lengths, capped), "
        f"{t.truncated} cut at {cfg.data.cutoff_len}",
        f"          {t.source}",
        *[f"          {n}" for n in t.notes],
        f"engine    per {'GPU' if s.hw.gpu else 'engine'}: "
        + ", ".join(f"{n} {_gib(b)}" for n, b, _ in kv.breakdown.lines)
        + (f"; LoRA rank {e.lora_rank} x {e.lora_slots} slots" if e.lora_rank else ""),
        f"          KV cache holds {e.memory.sequences(s.shape, t.mean + t.supervised_tokens / max(1, t.examples)):,} "
        f"requests of the mean size, one of at most {e.longest:,} tokens (max_model_len {e.max_model_len}); batch "
        f"{e.batch} (max_num_seqs {e.max_num_seqs}), {e.mean_batch:.0f} running on average over {_n(e.decode_steps)} "
        "decode steps",
    ]
    for r in p.runs:
        lines.append(
            f"run       {r.name:<14} {r.requests:>6} requests, {_n(r.prompt_tokens):>10} prompt + "
            f"{_n(r.reply_tokens):>9} reply tokens: prefill {_dur(r.prefill_s)} + decode {_dur(r.decode_s)} "
            f"({r.seconds / max(1, r.requests) * 1000:.1f} ms of the pass per sample)"
        )
    lines += [
        f"time      prediction {_dur(p.pass_s)} ({p.passes} pass{'es' if p.passes > 1 else ''}, {p.samples} samples, "
        f"{p.samples / p.pass_s if p.pass_s else 0:.2f} samples/s) + engine start-up {_dur(p.startup_s)}"
        f"{' x ' + str(p.passes) if p.passes > 1 else ''} + data checks and scoring {_dur(p.other_s)} "
        f"= {_dur(p.total_s)}",
        f"          prefill at {s.eff.eval_compute:.0%} of peak FLOP/s (compute-bound), decode steps at "
        f"{s.eff.eval_bandwidth:.0%} of memory bandwidth or compute, whichever binds",
        _cost(s, p.device_hours, unit),
        _efficiency(s, ["eval_compute", "eval_bandwidth", "eval_step_overhead_s", "eval_startup_s", "eval_other_s"]),
    ]
    return "\n".join(lines + _tail(s, p.problems, p.notes))


def render_serve(p: ServePlan) -> str:
    cfg, s, e = p.cfg, p.s, p.engine
    lines = [
        f"plan      serve: {cfg.model.path}, {len(cfg.adapters)} adapter(s), max_model_len {cfg.max_model_len}, "
        f"{p.gpus_per_replica} {'GPU' if s.hw.gpu else 'CPU thread'} per replica",
        _hardware(s, p.gpus_per_replica, "replica"),
        *_model(s),
        f"engine    per {'GPU' if s.hw.gpu else 'engine'}: "
        + ", ".join(f"{n} {_gib(b)}" for n, b, _ in e.memory.breakdown.lines)
        + (f"; LoRA rank {e.lora_rank} x {e.lora_slots} slots" if e.lora_rank else ""),
        f"capacity  {p.sequences:,} concurrent chats of {p.context_tokens} tokens per replica (KV cache); batch "
        f"{e.batch} (max_num_seqs {e.max_num_seqs}); the longest single sequence {e.longest:,} tokens",
        f"speed     per replica at batch {e.batch}: {p.tokens_per_s:,.0f} tokens/s "
        f"({1 / p.step_s if p.step_s else 0:.1f} tokens/s per chat); one chat alone: "
        f"{1 / p.single_step_s if p.single_step_s else 0:.0f} tokens/s; a "
        f"{p.context_tokens - p.reply_tokens}-token prompt's prefill {p.prefill_s * 1000:.0f} ms",
        f"          {p.requests_per_s:.2f} requests/s per replica ({p.reply_tokens}-token replies)",
    ]
    if p.load_rps:
        gpus = p.replicas * p.gpus_per_replica
        lines.append(
            f"load      {p.load_rps:g} requests/s needs {p.replicas} replica(s) = {gpus} "
            f"{'GPU' if s.hw.gpu else 'core'}(s)"
            + (f"; autoscaling allows at most {p.max_replicas}" if p.max_replicas else "")
            + ("  (MORE THAN max_replicas)" if p.max_replicas and p.replicas > p.max_replicas else "")
        )
        if s.price_per_hour is not None:
            lines.append(f"cost      {gpus * s.price_per_hour:,.2f} per hour at that load")
    else:
        lines.append("load      --requests-per-s X for the replicas a load needs")
    if p.gpus:
        n = p.gpus // p.gpus_per_replica
        lines.append(f"          {p.gpus} GPUs hold {n} replica(s): {n * p.requests_per_s:.1f} requests/s")
    if p.target_ongoing:
        lines.append(f"          autoscaling target_ongoing_requests {p.target_ongoing} of batch {e.batch}")
    lines.append(_efficiency(s, ["eval_compute", "eval_bandwidth", "eval_step_overhead_s"]))
    lines.append(
        f"assumed   a chat of {p.context_tokens} tokens (card + history + reply), {p.reply_tokens}-token replies "
        "(--context-tokens, --reply-tokens)"
    )
    return "\n".join(lines + _tail(s, p.problems, p.notes))


def render(plan: TrainPlan | EvalPlan | ServePlan) -> str:
    if isinstance(plan, TrainPlan):
        return render_train(plan)
    if isinstance(plan, EvalPlan):
        return render_eval(plan)
    return render_serve(plan)


def short_block(plan: TrainPlan | EvalPlan) -> str:
    """The few lines a job prints when it starts: time, memory, cost."""
    s = plan.s
    if isinstance(plan, TrainPlan):
        return (
            f"plan: {_dur(plan.total_s)} ({plan.total_steps} steps, {_dur(plan.train_s)} training), "
            f"{_gib(plan.memory.total)} per {'GPU' if s.hw.gpu else 'worker'} of {_gib(plan.memory.capacity)} "
            f"({'fits' if plan.memory.fits else 'does NOT fit'}), {plan.device_hours:.2f} device-hours on {s.hw.kind}"
        )
    return (
        f"plan: {_dur(plan.total_s)} ({plan.samples} samples, prediction {_dur(plan.pass_s)}), KV batch "
        f"{plan.engine.batch}, {plan.device_hours:.2f} device-hours on {s.hw.kind}"
    )


def predicted(plan: TrainPlan | EvalPlan) -> dict[str, Any]:
    """What a summary records as predicted, beside its measured figures (same names, same units)."""
    s = plan.s
    base = {"hardware": s.hw.kind, "device_hours": round(plan.device_hours, 4)}
    if isinstance(plan, TrainPlan):
        return base | {
            "wall_seconds": round(plan.total_s, 1),
            "train_seconds": round(plan.train_s, 1),
            # GPU: allocated tensors (torch.cuda.max_memory_allocated); CPU: the worker process's peak RSS
            "peak_memory_gib": round(
                (plan.memory.total - (plan.memory.get("runtime reserve") if s.hw.gpu else 0)) / GIB, 2
            ),
            "tokens_per_s": round(plan.tokens_trained / plan.train_s, 1) if plan.train_s else None,
            "tokens": plan.tokens_trained,
            "mfu": round(plan.mfu, 4),
        }
    return base | {
        "job_wall_seconds": round(plan.total_s, 1),
        "predict_runtime": round(plan.pass_s, 1),
        "predict_model_preparation_time": round(plan.startup_s, 1),
        "predict_samples_per_second": round(plan.samples / plan.pass_s, 3) if plan.pass_s else None,
        "prompt_tokens": sum(r.prompt_tokens for r in plan.runs),
        "reply_tokens": sum(r.reply_tokens for r in plan.runs),
    }
