"""A model's shape, from its ``config.json``: parameters, layers, attention and MoE sizes, the linear layers LoRA
adapts, and the KV cache a token takes.

The model's own ``config.json`` is read when it is here (a local folder, or a hub id already in the model cache).
For the shipped configs' hub models without their weights here, the few fields used are shipped below, copied from
the models' ``config.json`` on the hub, so a plan needs no download.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rp_ray.config import ConfigError, ModelConfig

# The fields of config.json a plan reads, as the hub's files hold them.
KNOWN_CONFIGS: dict[str, dict[str, Any]] = {
    "meta-llama/Llama-3.1-8B-Instruct": {
        "model_type": "llama",
        "vocab_size": 128256,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "tie_word_embeddings": False,
    },
    "openai/gpt-oss-20b": {
        "model_type": "gpt_oss",
        "vocab_size": 201088,
        "hidden_size": 2880,
        "intermediate_size": 2880,
        "num_hidden_layers": 24,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "num_local_experts": 32,
        "num_experts_per_tok": 4,
        "sliding_window": 128,
        "layer_types": ["sliding_attention", "full_attention"] * 12,
        "attention_bias": True,
        "tie_word_embeddings": False,
        "quantization_config": {"quant_method": "mxfp4"},
    },
}
# MXFP4: 4-bit values plus one 8-bit scale per block of 32
MXFP4_BYTES_PER_PARAM = (4 + 8 / 32) / 8


@dataclass(frozen=True)
class ModelShape:
    """The sizes a plan computes with (dense or MoE decoder, grouped-query attention, optional sliding windows)."""

    name: str
    model_type: str
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    experts: int = 0  # 0: a dense MLP
    experts_per_token: int = 0
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()
    tied_embeddings: bool = False
    attention_bias: bool = False
    mxfp4: bool = False  # experts stored as MXFP4 (gpt-oss's download); training loads them as bf16
    source: str = ""
    local_dir: str | None = field(default=None, compare=False)  # the folder holding config.json, when here

    @classmethod
    def from_config(cls, config: dict[str, Any], name: str, source: str, local_dir: str | None = None) -> ModelShape:
        heads = int(config["num_attention_heads"])
        hidden = int(config["hidden_size"])
        layers = int(config["num_hidden_layers"])
        window = config.get("sliding_window") if config.get("model_type") != "llama" else None
        types = tuple(config.get("layer_types") or ())
        if window and not types:  # every layer windowed (older configs without layer_types)
            types = ("sliding_attention",) * layers
        return cls(
            name=name,
            model_type=str(config.get("model_type", "llama")),
            vocab=int(config["vocab_size"]),
            hidden=hidden,
            layers=layers,
            heads=heads,
            kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or hidden // heads),
            intermediate=int(config["intermediate_size"]),
            experts=int(config.get("num_local_experts") or 0),
            experts_per_token=int(config.get("num_experts_per_tok") or config.get("experts_per_token") or 0),
            sliding_window=int(window) if window else None,
            layer_types=types,
            tied_embeddings=bool(config.get("tie_word_embeddings", False)),
            attention_bias=bool(config.get("attention_bias", False)),
            mxfp4=(config.get("quantization_config") or {}).get("quant_method") == "mxfp4",
            source=source,
            local_dir=local_dir,
        )

    # -- parameters ----------------------------------------------------------------------------------------------

    @property
    def q_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    def linears(self) -> dict[str, tuple[int, int]]:
        """The nn.Linear layers of one decoder layer, name -> (in, out): what ``lora.target`` may name. An MoE's
        experts are 3-D parameters and its router a bare weight, neither an nn.Linear."""
        h, q, kv, i = self.hidden, self.q_width, self.kv_width, self.intermediate
        out = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h)}
        if not self.experts:
            out |= {"gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
        return out

    @property
    def attention_params(self) -> int:
        h, q, kv = self.hidden, self.q_width, self.kv_width
        bias = (q + 2 * kv + h + self.heads) if self.attention_bias else 0  # + gpt-oss's sinks, one per head
        return 2 * h * q + 2 * h * kv + bias

    @property
    def expert_params(self) -> int:
        """One expert's parameters (gate and up fused, down), biases included."""
        h, i = self.hidden, self.intermediate
        return 3 * h * i + 2 * i + h

    @property
    def mlp_params(self) -> int:
        if not self.experts:
            return 3 * self.hidden * self.intermediate
        return self.experts * self.expert_params + self.hidden * self.experts + self.experts  # + the router

    @property
    def layer_params(self) -> int:
        return self.attention_params + self.mlp_params + 2 * self.hidden  # + two norms

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def head_params(self) -> int:
        return 0 if self.tied_embeddings else self.vocab * self.hidden

    @property
    def total_params(self) -> int:
        return self.embedding_params + self.layers * self.layer_params + self.hidden + self.head_params

    @property
    def all_expert_params(self) -> int:
        return self.layers * self.experts * self.expert_params

    @property
    def active_layer_params(self) -> int:
        """The parameters one token's matmuls pass through in a layer: its routed experts only."""
        if not self.experts:
            return self.layer_params
        return self.layer_params - (self.experts - self.experts_per_token) * self.expert_params

    @property
    def active_params(self) -> int:
        """Parameters a token passes through, the output head included and the input embedding (a lookup) not."""
        return self.layers * self.active_layer_params + self.vocab * self.hidden

    def weight_bytes(self, dtype_bytes: float, mxfp4_experts: bool = False) -> float:
        """All weights at ``dtype_bytes`` each; ``mxfp4_experts``: experts kept in MXFP4 (vLLM on GPUs)."""
        if mxfp4_experts and self.experts:
            experts = self.all_expert_params
            return (self.total_params - experts) * dtype_bytes + experts * MXFP4_BYTES_PER_PARAM
        return self.total_params * dtype_bytes

    def lora_modules(self, target: str | list[str]) -> dict[str, tuple[int, int]]:
        """The linear layers ``lora.target`` adapts in each layer (``all``: every one of :meth:`linears`)."""
        linears = self.linears()
        if target == "all":
            return linears
        unknown = [t for t in target if t not in linears]
        if unknown:
            raise ConfigError(
                f"lora.target names {unknown}, which {self.name} has no nn.Linear of; "
                f"its layers have {', '.join(linears)} (or lora.target=all)"
            )
        return {t: linears[t] for t in target}

    def lora_params(self, rank: int, target: str | list[str]) -> int:
        """LoRA's A (rank x in) and B (out x rank) matrices over every layer."""
        return self.layers * sum(rank * (i + o) for i, o in self.lora_modules(target).values())

    # -- attention and KV cache ----------------------------------------------------------------------------------

    def windows(self) -> list[int | None]:
        """Per layer: the attention window in tokens, None for full attention."""
        types = self.layer_types or ("full_attention",) * self.layers
        return [self.sliding_window if t == "sliding_attention" else None for t in types]

    def attended_pairs(self, length: float) -> float:
        """(query, key) pairs of one causal sequence of ``length`` tokens, summed over layers (windows honoured)."""
        total = 0.0
        for w in self.windows():
            if w is None or w >= length:
                total += length * (length + 1) / 2
            else:
                total += w * (w + 1) / 2 + (length - w) * w
        return total

    def kv_bytes(self, context: float, dtype_bytes: float) -> float:
        """KV cache one sequence of ``context`` tokens holds: K and V per layer, a windowed layer at most its window."""
        per_token_layer = 2 * self.kv_width * dtype_bytes
        return sum(per_token_layer * (context if w is None else min(context, w)) for w in self.windows())

    def kv_bytes_per_token(self, dtype_bytes: float) -> float:
        """KV bytes per token of the full-attention layers plus windowed layers as if full (the upper bound)."""
        return 2 * self.kv_width * dtype_bytes * self.layers


def _by_name(path: str) -> tuple[str, dict[str, Any], bool] | None:
    """A shipped shape for a hub id or a folder named like one (``.../gpt-oss-20b``; ``-bf16``: the copy
    ``rp-ray convert-mxfp4`` writes, experts in bf16)."""
    base = path.rstrip("/").rsplit("/", 1)[-1].lower()
    for model_id, config in KNOWN_CONFIGS.items():
        known = model_id.rsplit("/", 1)[-1].lower()
        if path.lower() == model_id.lower() or base == known:
            return model_id, config, False
        if base == f"{known}-bf16":
            return model_id, {k: v for k, v in config.items() if k != "quantization_config"}, True
    return None


def model_shape(model: ModelConfig) -> ModelShape:
    """The shape of a config's model: its config.json when here (a folder, or a hub id in the model cache), else the
    shipped shape of a known hub model. A ConfigError says how to make an unknown one available."""
    from rp_ray.llm.hub import HubError, is_model_id, resolve_model

    local: Path | None = Path(model.path).expanduser()
    if not (local / "config.json").is_file():
        local = None
        if is_model_id(model.path):
            try:
                cached = resolve_model(model)
                local = cached if (cached / "config.json").is_file() else None
            except HubError:
                local = None
    if local is not None:
        config = json.loads((local / "config.json").read_text(encoding="utf-8"))
        return ModelShape.from_config(config, model.path, f"{local / 'config.json'}", str(local))
    known = _by_name(model.path)
    if known is not None:
        model_id, config, converted = known
        note = " (bf16 copy: experts not MXFP4)" if converted else ""
        return ModelShape.from_config(config, model.path, f"shipped shape of {model_id}'s config.json{note}")
    raise ConfigError(
        f"model.path {model.path}: no config.json here and not a model whose shape rp-ray plan ships "
        f"({', '.join(KNOWN_CONFIGS)}). Give model.path a local model folder, or fetch the model once with "
        f"`rp-ray download ID` (a tiny one: rp-ray tiny-model --family llama3 --out {model.path})"
    )
