"""Plans: what a train, eval or serve config will take on given hardware, before anything is scheduled.

:func:`load_job` reads a config file of any kind (told apart by its keys), :func:`make_plan` computes the plan of
that kind from the model's shape (``rp_ray.plan.shapes``), the datasets' tokens (``rp_ray.plan.tokens``), memory
(``rp_ray.plan.memory``), time (``rp_ray.plan.throughput``) and the achieved efficiencies
(``rp_ray.plan.calibration``); ``rp_ray.plan.report`` prints it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from rp_ray.config import (
    ConfigError,
    EvalConfig,
    ServeConfig,
    TrainConfig,
    load_config,
    parse_overrides,
    read_yaml_mapping,
)
from rp_ray.plan import memory as mem
from rp_ray.plan import throughput as tp
from rp_ray.plan.calibration import LOAD_BANDWIDTH, Calibration, Efficiency
from rp_ray.plan.checks import (
    kv_cache_problem,
    lora_rank_problems,
    micro_batch_problem,
    tensor_parallel_problem,
    zero3_problem,
)
from rp_ray.plan.hardware import DEFAULT_GPU, Hardware, hardware, scaled
from rp_ray.plan.shapes import ModelShape, model_shape
from rp_ray.plan.tokens import SplitTokens, eval_tokens, train_tokens

JobConfig = TrainConfig | EvalConfig | ServeConfig
KIND_CLASSES: dict[str, type] = {"train": TrainConfig, "eval": EvalConfig, "serve": ServeConfig}
CPU_MAX_NUM_SEQS = 128  # vLLM 0.32's default for the engines rp_ray builds (engine usage context) on CPU
CPU_MAX_NUM_BATCHED_TOKENS = 2048
ASSUMED_LORA_RANK = 8  # an adapter that is not here to read


def job_kind(tree: dict[str, Any], overrides: list[str] | None = None) -> str:
    """``serve`` for a Serve config file (``applications:``) or serving keys, else ``train`` or ``eval`` by the keys
    only one of the two configs has."""
    if isinstance(tree.get("applications"), list):
        return "serve"
    keys = set(tree) | {k.split(".")[0] for k, _ in parse_overrides(overrides or [])}
    if keys & (set(ServeConfig.model_fields) - set(EvalConfig.model_fields) - set(TrainConfig.model_fields)):
        return "serve"  # a Serve config's args on their own
    train_only = keys & (set(TrainConfig.model_fields) - set(EvalConfig.model_fields))
    eval_only = keys & (set(EvalConfig.model_fields) - set(TrainConfig.model_fields))
    if train_only and not eval_only:
        return "train"
    if eval_only and not train_only:
        return "eval"
    raise ConfigError(
        "cannot tell whether this is a train or an eval config: "
        + (
            f"it has train keys {sorted(train_only)} and eval keys {sorted(eval_only)}; remove one kind's"
            if train_only
            else "it has no key only one of them has (train: num_epochs, per_device_batch_size, ...; "
            "eval: adapters, sampling, ...); add one, e.g. num_epochs=3"
        )
    )


def load_job(path: str | Path, overrides: list[str] | None = None) -> tuple[str, JobConfig, dict[str, Any]]:
    """(kind, validated config, the file's raw mapping) of a train, eval or serve config file with overrides."""
    tree = read_yaml_mapping(path)
    kind = job_kind(tree, overrides)
    return kind, load_config(KIND_CLASSES[kind], path, overrides), tree


@dataclass
class Setting:
    """The hardware and efficiencies a plan is made with, and what it was told."""

    hw: Hardware
    eff: Efficiency
    shape: ModelShape
    dtype_bytes: int
    price_per_hour: float | None
    notes: list[str] = field(default_factory=list)


def setting(cfg: JobConfig, gpu: str | None, price: float | None, calibration: Calibration | None) -> Setting:
    """The hardware (``gpu``, else H100 for GPU configs and this CPU for CPU ones), model shape, dtype and achieved
    efficiencies (``calibration``, else the default file) a plan of ``cfg`` is made with."""
    from rp_ray.llm.models import resolve_dtype

    notes = []
    if gpu is None:
        gpu = DEFAULT_GPU if cfg.use_gpu else "cpu"
        if cfg.use_gpu:
            notes.append(f"no --gpu given: {DEFAULT_GPU} assumed (cluster.yaml's workers)")
    hw = hardware(gpu)
    if hw.gpu and not cfg.use_gpu:
        notes.append(f"the config runs on CPU (use_gpu=false); planned as use_gpu=true on {hw.kind}")
    if not hw.gpu and cfg.use_gpu:
        notes.append("the config asks for GPUs (use_gpu=true); planned on this machine's CPU")
    shape = model_shape(cfg.model)
    dtype = resolve_dtype(cfg.model.dtype, hw.gpu)
    calib = calibration or Calibration.load()
    eff = calib.efficiency(hw.kind, bool(shape.experts))
    return Setting(hw, eff, shape, 4 if dtype == "float32" else 2, price, notes)


# -- training --------------------------------------------------------------------------------------------------------


@dataclass
class TrainPlan:
    cfg: TrainConfig
    s: Setting
    tokens: SplitTokens
    world: int
    worker: Hardware
    lora_params: int
    steps_per_epoch: int
    total_steps: int
    epochs: float
    schedule: tp.Schedule
    flops: tp.TrainFlops
    memory: mem.Breakdown
    seq_len: int
    largest_micro_batch: int
    alternatives: dict[str, float]  # a fix -> its peak bytes
    train_s: float
    validation_s: float
    startup_s: float
    comm_s: float  # communication not hidden behind compute (ZeRO-3 gathers, gradient reduction)
    gather_s: float  # ZeRO-3: one micro-batch's all-gathers
    micro_compute_s: float  # one mean micro-batch's compute
    tokens_trained: int
    supervised_trained: int
    model_flops: float
    busiest_flops: float  # executed FLOPs of the busiest rank, summed over steps
    busiest_pair_flops: float  # the attention-score part of them
    problems: list[str] = field(default_factory=list)

    @property
    def total_s(self) -> float:
        return self.startup_s + self.train_s + self.validation_s

    @property
    def device_hours(self) -> float:
        return self.world * self.total_s / 3600

    @property
    def mfu(self) -> float:
        return self.model_flops / (self.train_s * self.world * self.worker.peak_flops) if self.train_s else 0.0


def train_setup(
    cfg: TrainConfig, shape: ModelShape, dtype_bytes: int, world: int, hw: Hardware, eff: Efficiency | None = None
) -> mem.TrainSetup:
    from rp_ray.llm.models import resolve_attn_implementation

    try:
        attn = resolve_attn_implementation(cfg.model.template, cfg.model.attn_implementation, hw.gpu)
    except ValueError:
        attn = cfg.model.attn_implementation
    modules = shape.lora_modules(cfg.lora.target)
    return mem.TrainSetup(
        dtype_bytes=dtype_bytes,
        world=world,
        stage=cfg.deepspeed.stage,
        offload_params=cfg.deepspeed.offload_params,
        offload_optimizer=cfg.deepspeed.offload_optimizer,
        checkpointing=cfg.gradient_checkpointing,
        lora_params=shape.lora_params(cfg.lora.rank, cfg.lora.target),
        lora_rank=cfg.lora.rank,
        lora_modules=len(modules),
        eager_attention=attn == "eager",
        cpu_worker_runtime=(eff.train_worker_runtime_gib if eff else 1.0) * 2**30,
    )


def memory_fixes(
    shape: ModelShape, setup: mem.TrainSetup, hw: Hardware, micro_batch: int, seq_len: int, share: float
) -> dict[str, float]:
    """The step's peak bytes with each other setting that lowers it: gradient checkpointing, ZeRO-3."""
    from dataclasses import replace

    out = {}
    if not setup.checkpointing:
        alt = replace(setup, checkpointing=True)
        out["gradient_checkpointing=true"] = mem.train_memory(shape, alt, hw, micro_batch, seq_len, share).total
    if setup.stage != 3 and setup.world > 1:
        alt = replace(setup, stage=3)
        out["deepspeed.stage=3"] = mem.train_memory(shape, alt, hw, micro_batch, seq_len, share).total
    return out


def largest_micro_batch(
    shape: ModelShape, setup: mem.TrainSetup, hw: Hardware, seq_len: int, share: float, limit: int = 256
) -> int:
    """The largest micro-batch of ``seq_len``-token rows whose step fits (0: not even one)."""
    return mem.largest_that_fits(lambda n: mem.train_memory(shape, setup, hw, n, seq_len, share).fits, limit)


def train_threads(cfg: TrainConfig, hw: Hardware) -> int:
    """The threads each worker computes with: one GPU's, or its share of this CPU's cores."""
    return 1 if hw.gpu else max(1, min(int(cfg.cpus_per_worker), hw.cores // cfg.num_workers or 1))


def train_and_validation_lengths(
    cfg: TrainConfig, shape: ModelShape, lengths: list[int]
) -> tuple[list[int], list[int]]:
    """(train rows, validation rows) as token counts: validation held out of the train split (``val_size``) or read
    from the val split, none when the run does not validate."""
    if cfg.eval_every_steps and not cfg.data.val and cfg.val_size:
        held = max(1, round(len(lengths) * cfg.val_size))
        return lengths[:-held], lengths[-held:]
    if cfg.eval_every_steps and cfg.data.val:
        return lengths, train_tokens(cfg, shape, split="val").lengths
    return lengths, []


def optimizer_steps(cfg: TrainConfig, rows: int) -> tuple[int, int]:
    """(optimizer steps per epoch, optimizer steps in all) of ``rows`` train examples; none per epoch is an error."""
    from rp_ray.train.batching import steps_per_epoch

    world, micro_batch, accumulation = cfg.num_workers, cfg.per_device_batch_size, cfg.gradient_accumulation_steps
    per_epoch = steps_per_epoch(rows, world, micro_batch, accumulation)
    if per_epoch == 0:
        raise ConfigError(
            f"{rows} train examples make no whole optimizer step of num_workers x per_device_batch_size x "
            f"gradient_accumulation_steps = {world * micro_batch * accumulation} "
            f"rows; lower gradient_accumulation_steps or per_device_batch_size"
        )
    return per_epoch, cfg.max_steps or math.ceil(cfg.num_epochs * per_epoch)


def train_schedule(cfg: TrainConfig, shape: ModelShape, flops: tp.TrainFlops, lengths: list[int]) -> tp.Schedule:
    """One epoch's batch plan of the train rows, as the config's batching settles it."""
    return tp.epoch_schedule(
        lengths,
        shape,
        flops,
        world=cfg.num_workers,
        micro_batch=cfg.per_device_batch_size,
        accumulation=cfg.gradient_accumulation_steps,
        seed=cfg.seed,
        group_by_length=cfg.group_by_length,
    )


def gradient_reduce_seconds(lora_params: int, dtype_bytes: int, world: int, hw: Hardware, gpus_per_node: int) -> float:
    """One optimizer step's ring all-reduce of the LoRA gradients, over NVLink within a node, else the node network."""
    if world <= 1:
        return 0.0
    link = hw.interconnect if world <= gpus_per_node else hw.node_network / gpus_per_node
    return 2 * lora_params * dtype_bytes * (world - 1) / world / max(link * tp.NCCL_EFFICIENCY, 1.0)


def communication_seconds(cfg: TrainConfig, s: Setting, lora_params: int, gpus_per_node: int) -> tuple[float, float]:
    """(a micro-batch's ZeRO-3 all-gathers, none under ZeRO-2; an optimizer step's gradient all-reduce)."""
    world, b = cfg.num_workers, s.dtype_bytes
    gather = tp.zero3_gather_seconds(s.shape, b, world, s.hw, gpus_per_node) if cfg.deepspeed.stage == 3 else 0.0
    return gather, gradient_reduce_seconds(lora_params, b, world, s.hw, gpus_per_node)


def epoch_seconds(
    step_flops: list[float], rate: float, accumulation: int, overhead_s: float, gather_s: float, reduce_s: float
) -> tuple[float, float]:
    """(an epoch's seconds, those of its communication not hidden behind compute), from each step's FLOPs at
    ``rate`` FLOP/s, ``overhead_s`` and ``gather_s`` (ZeRO-3) per micro-batch and ``reduce_s`` per step."""
    epoch_s, comm_s = 0.0, 0.0
    for f in step_flops:
        compute = f / rate + accumulation * overhead_s
        # ZeRO-3 overlaps a micro-batch's gathers with its compute (overlap_comm): the longer of the two counts
        gathers = accumulation * gather_s
        epoch_s += max(compute, gathers) + reduce_s
        comm_s += max(0.0, gathers - compute) + reduce_s
    return epoch_s, comm_s


def validation_seconds(
    shape: ModelShape, lora_params: int, val_lengths: list[int], total_steps: int, every: int, world: int, rate: float
) -> float:
    """All validations of a run: a forward pass over the validation rows every ``every`` steps and at the end."""
    if not val_lengths:
        return 0.0
    evals = total_steps // every + (total_steps % every != 0)
    fwd = sum(
        (2 * shape.active_params + 2 * lora_params) * n + 4 * shape.q_width * shape.attended_pairs(n)
        for n in val_lengths
    )
    return evals * fwd / world / rate


def rank_weight_bytes(shape: ModelShape, dtype_bytes: int, world: int, stage: int) -> float:
    """The weights each training rank loads: all of them, or its 1/world part under ZeRO-3."""
    return shape.weight_bytes(dtype_bytes) / (world if stage == 3 else 1)


def train_step_memory(
    shape: ModelShape, setup: mem.TrainSetup, hw: Hardware, micro_batch: int, seq_len: int, share: float
) -> tuple[mem.Breakdown, dict[str, float], int]:
    """(a step's memory, the fixes that lower it when it does not fit, the largest micro-batch that fits)."""
    memory = mem.train_memory(shape, setup, hw, micro_batch, seq_len, share)
    alternatives = memory_fixes(shape, setup, hw, micro_batch, seq_len, share) if not memory.fits else {}
    return memory, alternatives, largest_micro_batch(shape, setup, hw, seq_len, share)


def plan_train(
    cfg: TrainConfig,
    gpu: str | None = None,
    gpus: int | None = None,
    price: float | None = None,
    calibration: Calibration | None = None,
    gpus_per_node: int = 8,
    tokens: SplitTokens | None = None,
) -> TrainPlan:
    """The plan of a training config; ``tokens``: the train split as already encoded (a job's driver has it),
    else it is read and encoded here."""
    if gpus:
        cfg = cfg.model_copy(update={"num_workers": gpus})
    s = setting(cfg, gpu, price, calibration)
    shape, hw, eff, world, accumulation = s.shape, s.hw, s.eff, cfg.num_workers, cfg.gradient_accumulation_steps
    worker = scaled(hw, train_threads(cfg, hw))
    tokens = tokens or train_tokens(cfg, shape)
    setup = train_setup(cfg, shape, s.dtype_bytes, world, hw, eff)
    flops = tp.train_flops(shape, setup.lora_params, cfg.gradient_checkpointing)
    lengths, val_lengths = train_and_validation_lengths(cfg, shape, tokens.lengths)
    per_epoch, total_steps = optimizer_steps(cfg, len(lengths))
    sched = train_schedule(cfg, shape, flops, lengths)
    runs = total_steps / per_epoch  # epochs run, whole or not
    rate = worker.peak_flops * eff.train_hfu
    gather, reduce_s = communication_seconds(cfg, s, setup.lora_params, gpus_per_node)
    weighted = [eff.train_x(f - p, p) for f, p in zip(sched.step_flops, sched.step_pair_flops)]
    epoch_s, comm_epoch = epoch_seconds(weighted, rate, accumulation, eff.train_overhead_s, gather, reduce_s)
    seq_len, share = max(lengths), tokens.supervised_share
    memory, alternatives, largest = train_step_memory(shape, setup, hw, cfg.per_device_batch_size, seq_len, share)
    weights = rank_weight_bytes(shape, s.dtype_bytes, world, cfg.deepspeed.stage)
    val_s = validation_seconds(shape, setup.lora_params, val_lengths, total_steps, cfg.eval_every_steps, world, rate)
    plan = TrainPlan(
        cfg=cfg,
        s=s,
        tokens=tokens,
        world=world,
        worker=worker,
        lora_params=setup.lora_params,
        steps_per_epoch=per_epoch,
        total_steps=total_steps,
        epochs=runs,
        schedule=sched,
        flops=flops,
        memory=memory,
        seq_len=seq_len,
        largest_micro_batch=largest,
        alternatives=alternatives,
        train_s=epoch_s * runs,
        validation_s=val_s,
        startup_s=eff.train_startup_s + weights / LOAD_BANDWIDTH,
        comm_s=comm_epoch * runs,
        gather_s=gather,
        micro_compute_s=sum(weighted) / (per_epoch * accumulation) / rate,
        tokens_trained=round(sched.tokens * runs),
        supervised_trained=round(sched.tokens * runs * share),
        model_flops=sched.model_flops * runs,
        busiest_flops=sum(sched.step_flops) * runs,
        busiest_pair_flops=sum(sched.step_pair_flops) * runs,
    )
    plan.problems = train_problems(plan, gpus_per_node)
    return plan


# -- evaluation ------------------------------------------------------------------------------------------------------


@dataclass
class RunPlan:
    name: str
    requests: int
    prompt_tokens: int
    reply_tokens: int
    prefill_s: float
    decode_s: float

    @property
    def seconds(self) -> float:
        return self.prefill_s + self.decode_s


@dataclass
class EnginePlan:
    """What each engine (one per actor) of a pass holds and does."""

    memory: mem.EngineMemory
    max_num_seqs: int
    batch: int
    max_model_len: int
    longest: int  # the longest single sequence its KV cache holds
    lora_rank: int | None
    lora_slots: int
    rates: tp.EngineRates
    decode_steps: int
    mean_batch: float
    at_len: Callable[[int], mem.EngineMemory]  # the engine's memory at another max_model_len


@dataclass
class EvalPlan:
    cfg: EvalConfig
    s: Setting
    tokens: SplitTokens
    actors: int
    gpus_per_engine: int
    engine: EnginePlan
    runs: list[RunPlan]
    passes: int
    pass_s: float  # all passes, first engine ready -> last reply
    startup_s: float  # per pass
    other_s: float  # data checks and Ray start-up, scoring
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def samples(self) -> int:
        return sum(r.requests for r in self.runs)

    @property
    def total_s(self) -> float:
        return self.other_s + self.passes * self.startup_s + self.pass_s

    @property
    def devices(self) -> int:
        return self.actors * self.gpus_per_engine

    @property
    def device_hours(self) -> float:
        return self.devices * (self.passes * self.startup_s + self.pass_s) / 3600


def _adapter_rank(path: str, notes: list[str]) -> int:
    from rp_ray.llm.vllm_engine import adapter_rank

    try:
        return adapter_rank(path)
    except ValueError:
        notes.append(f"adapter {path} is not here: its LoRA rank is taken as {ASSUMED_LORA_RANK}")
        return ASSUMED_LORA_RANK


def vllm_lora_rank(settings, adapter_paths: list[str], notes: list[str]) -> int | None:
    """vLLM's max_lora_rank for these adapters, as ``rp_ray.llm.vllm_engine.max_lora_rank`` sets it."""
    from rp_ray.llm.vllm_engine import VLLM_LORA_RANKS

    if not adapter_paths:
        return None
    if settings.max_lora_rank is not None:
        return settings.max_lora_rank
    need = max(_adapter_rank(p, notes) for p in adapter_paths)
    return next((r for r in VLLM_LORA_RANKS if r >= need), VLLM_LORA_RANKS[-1])


def engine_rates(hw: Hardware, eff: Efficiency, devices: int) -> tp.EngineRates:
    return tp.EngineRates(
        hw.peak_flops * devices * eff.eval_compute,
        hw.memory_bandwidth * devices * eff.eval_bandwidth,
        eff.eval_step_overhead_s,
    )


def engine_sizes(settings, hw: Hardware, max_model_len: int) -> tuple[int, int]:
    """(max_num_seqs, max_num_batched_tokens) as ``rp_ray.llm.vllm_engine.engine_kwargs`` and vLLM settle them."""
    from rp_ray.llm.vllm_engine import GPU_MAX_NUM_BATCHED_TOKENS, GPU_MAX_NUM_SEQS

    seqs = settings.max_num_seqs or (GPU_MAX_NUM_SEQS if hw.gpu else CPU_MAX_NUM_SEQS)
    tokens = settings.max_num_batched_tokens or (GPU_MAX_NUM_BATCHED_TOKENS if hw.gpu else CPU_MAX_NUM_BATCHED_TOKENS)
    return seqs, max(tokens, max_model_len)


def engine_adapters(cfg: EvalConfig | ServeConfig) -> dict[str, str]:
    """Name -> folder of the adapters an engine loads (none when eval merges them into the weights)."""
    if isinstance(cfg, EvalConfig):
        return {} if cfg.merge_adapter else dict(cfg.adapters)
    return {n: str(Path(cfg.adapter_root) / p) for n, p in cfg.adapters.items()}


def engine_lora(cfg: EvalConfig | ServeConfig, hw: Hardware, notes: list[str]) -> tuple[int | None, int]:
    """(max_lora_rank, LoRA slots) of an engine: every adapter plus, on CPU, the zero adapter; a serving engine at
    most ``max_loras`` at once."""
    adapters = engine_adapters(cfg)
    if isinstance(cfg, EvalConfig) and cfg.backend != "vllm":
        return None, 0
    rank = vllm_lora_rank(cfg, list(adapters.values()), notes)
    slots = len(adapters) + (1 if adapters and not hw.gpu else 0)
    if isinstance(cfg, ServeConfig):
        slots = min(cfg.max_loras, slots)
    return rank, slots if rank else 0


def engine_devices(cfg: EvalConfig | ServeConfig, hw: Hardware) -> int:
    """The devices one engine spans: its tensor-parallel GPUs, or one CPU."""
    return cfg.tensor_parallel_size if hw.gpu else 1


def engine_at(
    cfg: EvalConfig | ServeConfig, shape: ModelShape, hw: Hardware, dtype_bytes: int, notes: list[str]
) -> Callable[[int], mem.EngineMemory]:
    """An engine's memory for a given max_model_len (max_num_batched_tokens is raised to it, as rp_ray sets it)."""
    rank, slots = engine_lora(cfg, hw, notes)
    devices = engine_devices(cfg, hw)

    def at(max_model_len: int) -> mem.EngineMemory:
        seqs, batched = engine_sizes(cfg, hw, max_model_len)
        return mem.engine_memory(
            shape,
            hw,
            dtype_bytes=dtype_bytes,
            tp=devices,
            max_num_seqs=seqs,
            max_num_batched_tokens=batched,
            lora_slots=slots,
            lora_rank=rank or 0,
            cpu_kv_cache_gib=cfg.cpu_kv_cache_gib,
        )

    return at


def engine_setup(
    cfg: EvalConfig | ServeConfig, s: Setting, engine_hw: Hardware, max_model_len: int, notes: list[str]
) -> EnginePlan:
    """An engine at ``max_model_len`` on ``engine_hw`` (a GPU, or an actor's CPU threads): its memory, sizes, LoRA
    and rates. Its batch and decode steps are the plan's to fill in (``dataclasses.replace``)."""
    seqs, _ = engine_sizes(cfg, s.hw, max_model_len)
    rank, slots = engine_lora(cfg, s.hw, notes)
    at = engine_at(cfg, s.shape, engine_hw, s.dtype_bytes, [])
    em = at(max_model_len)
    rates = engine_rates(engine_hw, s.eff, engine_devices(cfg, s.hw))
    return EnginePlan(em, seqs, 0, max_model_len, em.longest(s.shape), rank, slots, rates, 0, 0.0, at)


def eval_engine_hw(cfg: EvalConfig, hw: Hardware) -> Hardware:
    """The hardware one eval engine computes on: its GPUs, or its actor's ``cpus_per_actor`` threads."""
    return scaled(hw, 1 if hw.gpu else cfg.cpus_per_actor)


def engine_lora_params(shape: ModelShape, lora_rank: int | None) -> int:
    """The LoRA parameters an engine adds to each prompt token of an adapter's request (all modules at its rank)."""
    return shape.lora_params(lora_rank, "all") if lora_rank else 0


def engine_weight_bytes(shape: ModelShape, dtype_bytes: int, hw: Hardware, devices: int) -> float:
    """The weights each device of an engine loads (MXFP4 experts stay packed on GPUs)."""
    return shape.weight_bytes(dtype_bytes, shape.mxfp4 and hw.gpu) / devices


def eval_run_names(cfg: EvalConfig) -> list[str]:
    """The runs of an evaluation: ``base`` (the model alone) when included, then each adapter."""
    return (["base"] if cfg.include_base else []) + list(cfg.adapters)


def pass_groups(cfg: EvalConfig, run_names: list[str]) -> list[list[str]]:
    """The runs of each prediction pass: all in one, or one a pass when each adapter is merged into the weights."""
    if not cfg.merge_adapter:
        return [run_names]
    return ([["base"]] if cfg.include_base else []) + [[a] for a in cfg.adapters]


def eval_batch(
    cfg: EvalConfig, engine: EnginePlan, shape: ModelShape, tokens: SplitTokens, rows: list[tuple[int, int]]
) -> int:
    """The requests an engine runs at once: a generate batch of ``shard_size`` (hf), else vLLM's bound for the mean
    request (max_num_seqs, its KV cache, ``max_inflight``)."""
    from rp_ray.eval.scheduler import request_bound

    if cfg.backend == "hf":
        return cfg.shard_size
    mean_request = (tokens.tokens + tokens.supervised_tokens) / max(1, len(rows))
    kv_tokens = engine.memory.sequences(shape, mean_request) * (mean_request + mem.VLLM_BLOCK / 2)
    return request_bound(
        {"max_num_seqs": engine.max_num_seqs, "kv_tokens": kv_tokens, "block_size": mem.VLLM_BLOCK},
        mean_request,
        cfg.max_inflight,
    )


def eval_notes(cfg: EvalConfig) -> list[str]:
    """What an eval plan leaves out or simplifies about its backend and merged adapters."""
    notes = []
    if cfg.backend == "hf":
        notes.append("backend hf: one left-padded generate batch per shard and run, no continuous batching")
    if cfg.merge_adapter and cfg.adapters:
        notes.append("merge_adapter: each adapter is merged into a copy of the weights first (not timed here)")
    return notes


def plan_eval(
    cfg: EvalConfig,
    gpu: str | None = None,
    gpus: int | None = None,
    price: float | None = None,
    calibration: Calibration | None = None,
    gpus_per_node: int = 8,
) -> EvalPlan:
    """The plan of an evaluation config: its prediction passes on ``num_actors`` engines, start-ups and scoring."""
    from rp_ray.eval.engines import eval_max_model_len

    if gpus:
        cfg = cfg.model_copy(update={"num_actors": max(1, gpus // cfg.tensor_parallel_size)})
    s = setting(cfg, gpu, price, calibration)
    shape, hw, eff, b = s.shape, s.hw, s.eff, s.dtype_bytes
    notes: list[str] = []
    tokens = eval_tokens(cfg, shape)
    devices, engine_hw = engine_devices(cfg, hw), eval_engine_hw(cfg, hw)
    engine = engine_setup(cfg, s, engine_hw, eval_max_model_len(cfg), notes)
    run_names = eval_run_names(cfg)
    rows = list(zip(tokens.lengths, tokens.supervised))
    batch = eval_batch(cfg, engine, shape, tokens, rows)
    lora_n = engine_lora_params(shape, engine.lora_rank)
    groups = pass_groups(cfg, run_names)
    done = prediction_passes(
        cfg,
        shape,
        engine.rates,
        b,
        rows,
        groups,
        batch=batch,
        lora_params=lora_n,
        gpu=hw.gpu,
        start_gap_s=eff.eval_startup_s,
    )
    notes += eval_notes(cfg)
    steps = done.steps_total
    engine = replace(engine, batch=batch, decode_steps=steps, mean_batch=done.batch_steps / steps if steps else 0.0)
    plan = EvalPlan(
        cfg,
        s,
        tokens,
        cfg.num_actors,
        devices,
        engine,
        [done.runs[n] for n in run_names],
        len(groups),
        done.seconds,
        eff.eval_startup_s + engine_weight_bytes(shape, b, hw, devices) / LOAD_BANDWIDTH,
        eff.eval_other_s + eff.eval_scoring_s_per_sample * len(rows) * len(run_names),
        notes=notes,
    )
    plan.problems = engine_problems(cfg, engine.at_len, shape, engine_hw, gpus_per_node)
    return plan


@dataclass
class PassResult:
    seconds: float  # first engine ready -> last reply
    busiest_steps: int  # decode steps of the engine with the most
    steps_total: int
    batch_steps: float  # running sequences summed over steps
    runs: dict[str, RunPlan]


def prediction_pass(
    cfg: EvalConfig,
    shape: ModelShape,
    rates: tp.EngineRates,
    dtype_bytes: int,
    rows: list[tuple[int, int]],
    group: list[str],
    *,
    batch: int,
    lora_params: int,
    gpu: bool,
    start_gap_s: float,
) -> PassResult:
    """One prediction pass of every run in ``group`` over ``rows`` ((prompt, reply) tokens) on ``cfg.num_actors``
    engines of ``cfg.backend`` (hf: generate batches of ``cfg.shard_size``).

    Requests go out shard by shard, every run of a row together, to whichever engine has room: taken here as dealt
    in turn. A run named ``base`` goes without LoRA; the others add ``lora_params`` to every prompt token.
    """
    actors = cfg.num_actors
    requests = [(name, p, r) for p, r in rows for name in group]
    engine_s, steps, runs = [], [], {name: RunPlan(name, 0, 0, 0, 0.0, 0.0) for name in group}
    batch_steps = 0.0
    for e in range(actors):
        mine = requests[e::actors]
        pre = dict.fromkeys(group, 0.0)
        for name, p, _ in mine:
            pre[name] += tp.prefill_flops(shape, p, lora_params if name != "base" else 0) / rates.flops
        if cfg.backend == "hf":
            dec = _hf_decode(shape, rates, dtype_bytes, mine, cfg.shard_size)
        else:
            dec = tp.simulate_decode(shape, rates, dtype_bytes, [(p, r) for _, p, r in mine], batch)
        engine_s.append(sum(pre.values()) + dec.seconds)
        steps.append(dec.steps)
        batch_steps += dec.mean_batch * dec.steps
        replies = max(1, sum(r for _, _, r in mine))
        for name in group:
            mine_run = [(p, r) for n, p, r in mine if n == name]
            rp = runs[name]
            rp.requests += len(mine_run)
            rp.prompt_tokens += sum(p for p, _ in mine_run)
            rp.reply_tokens += sum(r for _, r in mine_run)
            rp.prefill_s += pre[name] / actors  # the pool's time: engines work side by side
            rp.decode_s += dec.seconds * sum(r for _, r in mine_run) / replies / actors
    # GPU engines start side by side; CPU engines build one after another, the first predicting meanwhile
    seconds = max(engine_s, default=0.0) if gpu else tp.staggered_finish(sum(engine_s), actors, start_gap_s)
    return PassResult(seconds, max(steps, default=0), sum(steps), batch_steps, runs)


def prediction_passes(
    cfg: EvalConfig,
    shape: ModelShape,
    rates: tp.EngineRates,
    dtype_bytes: int,
    rows: list[tuple[int, int]],
    groups: list[list[str]],
    **pass_args: Any,
) -> PassResult:
    """The prediction passes of ``groups``, one after another (``pass_args``: those of :func:`prediction_pass`),
    as one result: their seconds, steps and runs summed."""
    runs: dict[str, RunPlan] = {}
    seconds, busiest, steps, batch_steps = 0.0, 0, 0, 0.0
    for group in groups:
        one = prediction_pass(cfg, shape, rates, dtype_bytes, rows, group, **pass_args)
        seconds += one.seconds
        busiest += one.busiest_steps
        steps += one.steps_total
        batch_steps += one.batch_steps
        runs.update(one.runs)
    return PassResult(seconds, busiest, steps, batch_steps, runs)


def _hf_decode(
    shape: ModelShape, rates: tp.EngineRates, b: int, mine: list[tuple[str, int, int]], size: int
) -> tp.DecodeResult:
    """transformers generate: a batch decodes until its longest reply is done, padded rows included."""
    seconds, steps = 0.0, 0
    for i in range(0, len(mine), size):
        batch = mine[i : i + size]
        longest, width = max(r for _, _, r in batch), max(p for _, p, _ in batch)
        for k in range(0, longest, 16):  # costed every 16 steps: contexts grow slowly
            n = min(16, longest - k)
            ctx = len(batch) * (width + k + n / 2)
            win = min(ctx, len(batch) * shape.sliding_window) if shape.sliding_window else ctx
            seconds += n * tp.decode_step_seconds(shape, rates, b, len(batch), ctx, win)
        steps += longest
    return tp.DecodeResult(seconds, steps, float(size))


# -- serving ---------------------------------------------------------------------------------------------------------


@dataclass
class ServePlan:
    cfg: ServeConfig
    s: Setting
    gpus_per_replica: int
    engine: EnginePlan
    context_tokens: int
    reply_tokens: int
    sequences: int  # at context_tokens
    step_s: float  # a decode step at the engine's batch
    single_step_s: float  # a decode step of one sequence
    prefill_s: float  # one request's prompt
    requests_per_s: float  # per replica, at its batch
    load_rps: float | None
    replicas: int | None
    max_replicas: int | None
    target_ongoing: int | None
    gpus: int | None
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.engine.batch / self.step_s if self.step_s else 0.0


def _serve_deployment(tree: dict[str, Any]) -> dict[str, Any]:
    apps = tree.get("applications") or [{}]
    for d in apps[0].get("deployments") or []:
        if d.get("name") == "ChatServer":
            return d
    return {}


def plan_serve(
    cfg: ServeConfig,
    tree: dict[str, Any] | None = None,
    gpu: str | None = None,
    gpus: int | None = None,
    price: float | None = None,
    calibration: Calibration | None = None,
    gpus_per_node: int = 8,
    context_tokens: int = 1536,
    reply_tokens: int = 200,
    requests_per_s: float | None = None,
) -> ServePlan:
    """The plan of a serving config: what a replica holds and serves, and the replicas a load of ``requests_per_s``
    chats of ``context_tokens`` (``reply_tokens`` of them the reply) needs."""
    s = setting(cfg, gpu, price, calibration)
    shape, hw, b = s.shape, s.hw, s.dtype_bytes
    notes: list[str] = []
    engine = engine_setup(cfg, s, hw, cfg.max_model_len, notes)
    rates = engine.rates
    context = min(context_tokens, cfg.max_model_len)
    fit = engine.memory.sequences(shape, context)
    batch = max(1, min(engine.max_num_seqs, fit))
    mid = context - reply_tokens / 2
    win = min(mid, shape.sliding_window) if shape.sliding_window else mid
    step = tp.decode_step_seconds(shape, rates, b, batch, batch * mid, batch * win)
    single = tp.decode_step_seconds(shape, rates, b, 1, mid, win)
    prompt = max(1, context - reply_tokens)
    prefill = tp.prefill_flops(shape, prompt) / rates.flops
    per_replica = 1 / (prefill + reply_tokens * step / batch)
    dep = _serve_deployment(tree or {})
    auto = dep.get("autoscaling_config") or {}
    plan = ServePlan(
        cfg,
        s,
        engine_devices(cfg, hw),
        replace(engine, batch=batch, mean_batch=float(batch)),
        context,
        reply_tokens,
        fit,
        step,
        single,
        prefill,
        per_replica,
        requests_per_s,
        tp.replicas_for(requests_per_s, per_replica) if requests_per_s else None,
        auto.get("max_replicas"),
        auto.get("target_ongoing_requests"),
        gpus,
        notes=notes,
    )
    plan.problems = engine_problems(cfg, engine.at_len, shape, hw, gpus_per_node)
    return plan


# -- problems of a plan ---------------------------------------------------------------------------------------------


def train_problems(plan: TrainPlan, gpus_per_node: int = 8) -> list[str]:
    cfg, hw = plan.cfg, plan.s.hw
    out = [
        micro_batch_problem(
            plan.memory,
            cfg.per_device_batch_size,
            plan.seq_len,
            plan.largest_micro_batch,
            plan.alternatives,
            hw,
            plan.world,
        )
    ]
    if cfg.deepspeed.stage == 3 and hw.gpu:
        setup = replace(train_setup(cfg, plan.s.shape, plan.s.dtype_bytes, plan.world, hw, plan.s.eff), stage=2)
        z2 = mem.train_memory(
            plan.s.shape, setup, hw, cfg.per_device_batch_size, plan.seq_len, plan.tokens.supervised_share
        )
        out.append(
            zero3_problem(
                plan.gather_s, plan.micro_compute_s, plan.s.shape.weight_bytes(plan.s.dtype_bytes), z2.fits, z2.total
            )
        )
    return [p for p in out if p]


def engine_problems(
    cfg: EvalConfig | ServeConfig,
    engine_at: Callable[[int], mem.EngineMemory],
    shape: ModelShape,
    hw: Hardware,
    gpus_per_node: int = 8,
) -> list[str]:
    """The checks of a vLLM engine (an eval with backend=hf has none but the node's)."""
    from rp_ray.eval.engines import eval_max_model_len

    is_eval = isinstance(cfg, EvalConfig)
    out = []
    if not is_eval or cfg.backend == "vllm":
        max_len = eval_max_model_len(cfg) if is_eval else cfg.max_model_len
        out.append(kv_cache_problem(engine_at, shape, max_len, hw, engine_devices(cfg, hw)))
        out += lora_rank_problems(cfg.max_lora_rank, engine_adapters(cfg))
    if hw.gpu:
        out.append(tensor_parallel_problem(cfg.tensor_parallel_size, gpus_per_node))
    return [p for p in out if p]


def make_plan(
    path: str | Path,
    overrides: list[str] | None = None,
    *,
    gpu: str | None = None,
    gpus: int | None = None,
    price: float | None = None,
    calibration: Calibration | None = None,
    gpus_per_node: int = 8,
    context_tokens: int = 1536,
    reply_tokens: int = 200,
    requests_per_s: float | None = None,
) -> TrainPlan | EvalPlan | ServePlan:
    """The plan of a config file of any kind."""
    kind, cfg, tree = load_job(path, overrides)
    common = dict(gpu=gpu, gpus=gpus, price=price, calibration=calibration, gpus_per_node=gpus_per_node)
    if kind == "train":
        return plan_train(cfg, **common)
    if kind == "eval":
        return plan_eval(cfg, **common)
    return plan_serve(
        cfg, tree, context_tokens=context_tokens, reply_tokens=reply_tokens, requests_per_s=requests_per_s, **common
    )
