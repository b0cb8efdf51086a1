"""Tiny models in Hugging Face layout, built locally: for the tests, the benchmarks and the demo.

A tiny model is a small Llama / GPT-OSS config whose byte-level BPE tokenizer is trained in-process on role-play text
and carries the family's real special tokens, so the templates encode them exactly as they would the real model.

Two kinds are built here:

- random weights (``pretrain=None``): seconds on a CPU; what the tests use, where only shapes, token layouts and
  plumbing matter;
- pretrained (``pretrain=PretrainConfig(...)``): the same architecture trained as a plain language model on the text of
  a train split (each conversation's messages one per line, no chat layout, no special tokens but the document-opening
  bos). The demo's default base model is built this way (``rp-ray tiny-model --pretrain``): a random-weight model cannot
  learn a character in a few minutes of LoRA on a CPU, a model that already knows the corpus's words can. The val split
  is never read, so the base model has not seen the rows it is evaluated on.

Every build is cached: the folder's ``rp_ray_tiny.json`` holds a hash of all of its inputs (corpus bytes, family, sizes,
seed, pretraining settings, ``BUILD_VERSION``), and a build whose hash matches the folder's returns at once. A
``README.md`` model card in the folder says what the model is, how it was made and how long it took.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import time
from collections.abc import Iterable
from pathlib import Path

from pydantic import Field

from rp_ray.config import Family, StrictModel
from rp_ray.data import read_rows
from rp_ray.llm.template import Template, chat_template_jinja, get_template

log = logging.getLogger(__name__)

# Bump when a change here or in the chat template (``chat_template_jinja``) changes what a build writes: every
# cached model is rebuilt.
BUILD_VERSION = 6
STAMP = "rp_ray_tiny.json"
DEFAULT_CORPUS = "data/sample/haruhi_train.json"
# Between the messages of a pretraining document. Not a bare "\n": Llama-3's pre-tokenizer fuses a
# newline with the punctuation before it ("。」\n" is one token), while in the chat layout a reply ends
# with "。」" and the end-of-turn token. The space keeps "。」" a token of its own, so the model learns to
# end a reply on the same token a fine-tune then teaches it to follow with <|eot_id|>.
MESSAGE_SEPARATOR = " \n"

# Llama-3's pre-tokenizer split (tiktoken cl100k-style), so text is segmented like the real tokenizer.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Which special token fills which slot, per family (as in the real tokenizer_config / generation_config).
SPECIAL_TOKEN_SLOTS = {
    "llama3": {
        "bos": "<|begin_of_text|>",
        "eos": "<|eot_id|>",
        "pad": "<|finetune_right_pad_id|>",
        "gen_eos": ["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"],
    },
    "gpt_oss": {
        "bos": "<|startoftext|>",
        "eos": "<|return|>",
        "pad": "<|endoftext|>",
        "gen_eos": ["<|return|>", "<|endoftext|>", "<|call|>"],
    },
}


class PretrainConfig(StrictModel):
    """Plain language-model pretraining of a tiny model on a train split's text (one CPU process)."""

    steps: int = Field(ge=1, description="Optimizer steps.")
    seq_len: int = Field(256, ge=16, description="Tokens per packed training sequence.")
    batch_size: int = Field(16, ge=1, description="Sequences per optimizer step.")
    learning_rate: float = Field(3e-3, gt=0, description="Peak AdamW learning rate.")
    warmup_steps: int = Field(20, ge=0, description="Linear warmup steps, then cosine decay.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Learning rate at the last step, relative to the peak.")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay.")


# The demo's default base model: big enough to learn the sample corpus's words, small enough that
# pretraining (about a minute) and the LoRA run after it fit in a few minutes on 2 CPU cores.
DEFAULT_SIZES = {"vocab_size": 4096, "hidden_size": 128, "num_layers": 4}
DEFAULT_PRETRAIN = PretrainConfig(steps=200, seq_len=256, batch_size=8, learning_rate=3e-3)


def _train_tokenizer(texts: Iterable[str], tpl: Template, vocab_size: int):
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(tpl.special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    # special tokens after the learned vocab, as in the real tokenizers
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in tpl.special_tokens])
    if tpl.bos:
        bos = SPECIAL_TOKEN_SLOTS[tpl.name]["bos"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    return tok


def _documents(train_file: Path) -> list[list[str]]:
    """The message texts of every conversation in a sharegpt file, one list per conversation."""
    convs = ((row.value or {}).get("conversations", []) for row in read_rows(train_file))
    docs = [[m["value"] for m in c if isinstance(m, dict) and isinstance(m.get("value"), str)] for c in convs]
    return [d for d in docs if d]


def build_key(
    family: Family,
    corpus_file: str | Path,
    vocab_size: int,
    hidden_size: int,
    num_layers: int,
    seed: int,
    pretrain: PretrainConfig | None,
) -> str:
    """Hash of everything a build depends on: a folder stamped with the same hash needs no rebuild."""
    inputs = {
        "version": BUILD_VERSION,
        "family": family,
        "corpus_sha256": hashlib.sha256(Path(corpus_file).read_bytes()).hexdigest(),
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "num_layers": num_layers,
        "seed": seed,
        "pretrain": pretrain.model_dump() if pretrain else None,
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def built_key(out_dir: str | Path) -> str | None:
    """The build hash a folder was stamped with, or None when it holds no finished tiny-model build."""
    stamp = Path(out_dir) / STAMP
    if not stamp.is_file() or not (Path(out_dir) / "model.safetensors").is_file():
        return None
    try:
        return json.loads(stamp.read_text()).get("build_key")
    except (json.JSONDecodeError, AttributeError):
        return None


def _check_writable(out: Path) -> None:
    """Refuse to write into a folder that holds something other than a tiny-model build."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file; give --out (or model.path) a folder for the tiny model")
    if out.is_dir() and any(out.iterdir()) and not (out / STAMP).is_file():
        raise ValueError(
            f"{out} is not empty and was not written by `rp-ray tiny-model` (no {STAMP}); "
            f"pick another output folder or remove this one"
        )


def token_stream(tok, docs: list[list[str]]) -> list[int]:
    """The pretraining text as one id list: per conversation, bos then its messages joined by ``MESSAGE_SEPARATOR``."""
    ids: list[int] = []
    for enc in tok([MESSAGE_SEPARATOR.join(d) for d in docs], add_special_tokens=False)["input_ids"]:
        ids += [tok.bos_token_id, *enc]
    return ids


def bigram_init(model, ids: list[int], smoothing: float = 0.6) -> None:
    """Start the model as the corpus's bigram model: embeddings from a low-rank factorisation of its log-bigram table,
    and every residual branch's output projection at zero.

    With ``o_proj`` / ``down_proj`` at zero each layer adds nothing yet, so the logits are the output rows times the
    (normalised) input row: set to the top ``hidden_size`` singular vectors of ``log P(next | token)`` (interpolated
    with the unigram, ``smoothing`` on the bigram), they give the bigram's predictions at step 0. Pretraining then only
    has to add what context brings. From a random init, a model this size does not even reach bigram quality in the few
    hundred steps the build can afford (its greedy text loops on the commonest token); from here it does in none. The
    zero branches still learn: their weights get gradients from non-zero inputs.
    """
    import torch

    vocab, hidden = model.config.vocab_size, model.config.hidden_size
    x = torch.tensor(ids)
    uni = torch.bincount(x, minlength=vocab).float()
    bi = torch.bincount(x[:-1] * vocab + x[1:], minlength=vocab * vocab).float().view(vocab, vocab)
    p_uni = (uni + 0.1) / (uni.sum() + 0.1 * vocab)
    p = smoothing * bi / uni.clamp(min=1)[:, None] + (1 - smoothing) * p_uni[None, :]
    p[uni == 0] = p_uni
    u, sv, v = torch.svd_lowrank(p.log(), q=hidden, niter=4)
    emb, out = u * sv.sqrt(), v * sv.sqrt()
    with torch.no_grad():
        model.get_input_embeddings().weight.copy_(emb)
        # the final RMSNorm scales each input row to unit RMS: give the output rows that scale back
        model.get_output_embeddings().weight.copy_(out * emb.pow(2).mean(1).sqrt().mean())
        for name, param in model.named_parameters():
            if ".o_proj" in name or ".down_proj" in name:
                param.zero_()


def pretrain_lm(model, tok, docs: list[list[str]], cfg: PretrainConfig, seed: int) -> list[float]:
    """Train ``model`` in place as a plain causal LM on ``docs``; return the loss of every step.

    The model starts from the corpus's bigram model (``bigram_init``). Each conversation becomes one document
    (``token_stream``); documents are concatenated and cut into ``seq_len + 1``-token blocks; each step draws
    ``batch_size`` blocks in a seeded order (a fresh permutation per pass), so a build is reproducible.

    Runs on one CPU thread (:func:`_pretrain` sets it): the result is then the same on any machine whatever its core
    count, and a box whose other core is busy does not stall every operation on thread synchronisation.
    """
    import torch

    ids = token_stream(tok, docs)
    bigram_init(model, ids)
    block = cfg.seq_len + 1
    n_blocks = len(ids) // block
    if n_blocks < cfg.batch_size:
        raise ValueError(
            f"pretraining corpus has {len(ids)} tokens, fewer than one batch of "
            f"{cfg.batch_size} x {block}; lower batch_size / seq_len or use a bigger corpus"
        )
    data = torch.tensor(ids[: n_blocks * block]).view(n_blocks, block)
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []

    params = [p for p in model.parameters() if p.requires_grad]
    opt, sched = _pretrain_optimizer(params, cfg)
    model.train()
    losses = []
    t0 = time.perf_counter()
    for step in range(cfg.steps):
        while len(order) < cfg.batch_size:
            order += torch.randperm(n_blocks, generator=gen).tolist()
        batch = data[order[: cfg.batch_size]]
        del order[: cfg.batch_size]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(round(loss.item(), 4))
        if (step + 1) % 25 == 0 or step + 1 == cfg.steps:
            elapsed = time.perf_counter() - t0
            log.info("pretrain step %d/%d | loss %.4f | %.0f s", step + 1, cfg.steps, losses[-1], elapsed)
    model.eval()
    return losses


def _pretrain_optimizer(params: list, cfg: PretrainConfig):
    """AdamW (no weight decay on biases and norms) with linear warmup, then cosine decay to ``min_lr_ratio``."""
    import torch

    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.learning_rate,
    )

    def lr_at(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_at)


def init_unseen_rows(model, token_ids: list[int], seed: int) -> None:
    """Give the input and output embedding rows of ``token_ids`` fresh values drawn like a trained row.

    The chat special tokens never occur in the plain-text corpus: their input rows keep the small random init and their
    output rows are only ever pushed down, so a later LoRA fine-tune (which leaves both embeddings frozen) could never
    make the model end its turn. Their mean row would not do either: with a frozen output head, a row equal to the mean
    of the others gives a logit equal to the mean logit, never the largest. So each row is drawn from a normal
    distribution with the mean and covariance of the trained rows (what transformers' ``resize_token_embeddings`` does
    for added tokens, at the full spread): a typical token the fine-tune can learn to emit.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for emb in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
            keep = torch.ones(emb.shape[0], dtype=torch.bool)
            keep[token_ids] = False
            mean = emb[keep].mean(0)
            centered = emb[keep] - mean
            z = torch.randn(len(token_ids), centered.shape[0], generator=gen)
            emb[token_ids] = mean + z @ centered / (centered.shape[0] - 1) ** 0.5


def _model_card(meta: dict, params: int, out: Path) -> str:
    mb = sum(f.stat().st_size for f in out.iterdir() if f.is_file()) / 2**20
    pre = meta["pretrain"]
    if pre:
        how = (
            f"Started as the corpus's bigram model (embeddings from a rank-{meta['hidden_size']} factorisation of "
            f"its log-bigram table, residual branches at zero), then pretrained as a plain causal language model "
            f"for {pre['steps']} steps "
            f"(batch {pre['batch_size']} x {pre['seq_len']} tokens, {meta['pretrain_tokens']:,} tokens seen; "
            f"the corpus has {meta['corpus_tokens']:,}), AdamW lr {pre['learning_rate']} with {pre['warmup_steps']} "
            f"warmup steps and cosine decay to {pre['min_lr_ratio']:.0%}, seed {meta['seed']}. "
            f"Loss {meta['loss_first']:.3f} -> {meta['loss_last']:.3f} (mean of the last 10 steps).\n\n"
            "Text: each train conversation is one document, `<bos>` then its messages (system prompt, "
            "user lines, character lines), one per line (' \\n' between them, so a line's closing "
            "punctuation stays its own token as in the chat layout). No chat layout, no other special token: "
            "the chat format and the end-of-turn token are what a LoRA fine-tune teaches it. The special "
            "tokens other than `<bos>`, never seen in pretraining, then get input and output rows drawn "
            "from the mean and covariance of the trained rows (as for tokens added to a pretrained model), "
            "so a fine-tune with frozen embeddings can learn to emit them."
        )
    else:
        how = "Random weights (not trained): for tests and plumbing only; it cannot hold a conversation."
    arch = (
        f"{meta['architecture']}: hidden {meta['hidden_size']}, {meta['num_layers']} layers, vocab {meta['vocab_size']}"
    )
    return f"""# {out.name}: tiny {meta["family"]} model built by rp_ray

| | |
|---|---|
| architecture | {arch} |
| parameters | {params:,} ({mb:.1f} MiB on disk, float32 safetensors) |
| tokenizer | byte-level BPE trained on the corpus below, with the family's real special tokens |
| corpus | `{meta["corpus"]}` (sha256 {meta["corpus_sha256"][:16]}...), train split only |
| build time | {meta["build_seconds"]:.1f} s on {meta["machine"]} |

## How it was made

{how}

The val split is never read by the build, so the model has not seen the rows it is evaluated on.
Built by `rp_ray.llm.tiny_model.build_tiny_model` (build version {BUILD_VERSION}); rebuilt only when one of its
inputs changes (build key `{meta["build_key"][:16]}...` in `{STAMP}`).
"""


def build_tiny_model(
    family: Family,
    out_dir: str | Path,
    corpus_file: str | Path = DEFAULT_CORPUS,
    vocab_size: int = 4096,
    hidden_size: int = 128,
    num_layers: int = 2,
    seed: int = 0,
    pretrain: PretrainConfig | None = None,
) -> Path:
    """Write a small model in Hugging Face layout, random-weight (seconds) or pretrained on ``corpus_file``.

    Returns at once when ``out_dir`` already holds a build with the same inputs.
    """
    import torch
    from transformers import GenerationConfig

    out, corpus = Path(out_dir), Path(corpus_file)
    key = build_key(family, corpus, vocab_size, hidden_size, num_layers, seed, pretrain)
    if built_key(out) == key:
        log.info("tiny %s model in %s is up to date (build key %s...)", family, out, key[:12])
        return out
    _check_writable(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / STAMP).unlink(missing_ok=True)  # a build killed halfway must not look finished
    t0 = time.perf_counter()

    tpl = get_template(family)
    docs = _documents(corpus)
    tok = _tokenizer(tpl, docs, vocab_size)
    slots = SPECIAL_TOKEN_SLOTS[family]
    ids = {k: tok.convert_tokens_to_ids(v) for k, v in slots.items() if k != "gen_eos"}
    gen_eos = [tok.convert_tokens_to_ids(t) for t in slots["gen_eos"]]
    torch.manual_seed(seed)
    model = _random_model(family, len(tok), hidden_size, num_layers, ids)
    meta = {"family": family, "architecture": type(model).__name__, "corpus": str(corpus)}
    meta["corpus_sha256"] = hashlib.sha256(corpus.read_bytes()).hexdigest()
    meta |= {"vocab_size": len(tok), "hidden_size": hidden_size, "num_layers": num_layers, "seed": seed}
    meta["pretrain"] = pretrain.model_dump() if pretrain else None
    if pretrain is not None:
        unseen = [tok.convert_tokens_to_ids(t) for t in tpl.special_tokens if t != slots["bos"]]
        meta |= _pretrain(model, tok, docs, pretrain, seed, unseen)
    model.generation_config = GenerationConfig(bos_token_id=ids["bos"], eos_token_id=gen_eos, pad_token_id=ids["pad"])
    model.to(torch.float32).save_pretrained(out)
    tok.save_pretrained(out)
    params = sum(p.numel() for p in model.parameters())
    meta |= {
        "params": params,
        "build_seconds": round(time.perf_counter() - t0, 1),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs" + (", pretrained on 1 thread" if pretrain else ""),
        "build_key": key,
    }
    (out / "README.md").write_text(_model_card(meta, params, out), encoding="utf-8")
    (out / STAMP).write_text(json.dumps(meta, indent=2, ensure_ascii=False))  # last: marks the build finished
    how = "pretrained" if pretrain else "random weights"
    log.info("tiny %s model (%d params, %s) written to %s in %.1f s", family, params, how, out, meta["build_seconds"])
    return out


def _tokenizer(tpl: Template, docs: list[list[str]], vocab_size: int):
    """A byte-level BPE tokenizer trained on ``docs`` with the family's special tokens and chat template."""
    from transformers import PreTrainedTokenizerFast

    raw_tok = _train_tokenizer((t for doc in docs for t in doc), tpl, vocab_size)
    slots = SPECIAL_TOKEN_SLOTS[tpl.name]
    return PreTrainedTokenizerFast(
        tokenizer_object=raw_tok,
        bos_token=slots["bos"],
        eos_token=slots["eos"],
        pad_token=slots["pad"],
        chat_template=chat_template_jinja(tpl),
        model_max_length=4096,
        clean_up_tokenization_spaces=False,
    )


def _random_model(family: Family, vocab_size: int, hidden_size: int, num_layers: int, ids: dict[str, int]):
    """The family's architecture at a tiny size, random weights (from torch's current seed)."""
    from transformers import GptOssConfig, GptOssForCausalLM, LlamaConfig, LlamaForCausalLM

    heads, head_dim = 4, hidden_size // 4
    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=2,
        head_dim=head_dim,
        max_position_embeddings=4096,
        bos_token_id=ids["bos"],
        eos_token_id=ids["eos"],
        pad_token_id=ids["pad"],
        tie_word_embeddings=False,
    )
    if family == "llama3":
        return LlamaForCausalLM(LlamaConfig(**common, rope_parameters={"rope_type": "default", "rope_theta": 500000.0}))
    layers = ["sliding_attention", "full_attention"] * (num_layers // 2) + ["sliding_attention"] * (num_layers % 2)
    cfg = GptOssConfig(
        **common,
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=128,
        layer_types=layers,
        rope_parameters={"rope_type": "default", "rope_theta": 150000.0},
    )
    return GptOssForCausalLM(cfg)


def _pretrain(model, tok, docs: list[list[str]], pretrain: PretrainConfig, seed: int, unseen: list[int]) -> dict:
    """Pretrain ``model`` on ``docs`` deterministically (one thread), then give the special tokens the corpus never
    shows a usable embedding; what the model card reports of it."""
    import torch

    deterministic, threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    try:
        losses = pretrain_lm(model, tok, docs, pretrain, seed)
    finally:
        torch.use_deterministic_algorithms(deterministic)
        torch.set_num_threads(threads)
    init_unseen_rows(model, unseen, seed)
    return {
        "corpus_tokens": len(token_stream(tok, docs)),
        "pretrain_tokens": pretrain.steps * pretrain.batch_size * pretrain.seq_len,
        "loss_first": losses[0],
        "loss_last": round(sum(losses[-10:]) / len(losses[-10:]), 4),
        "loss_curve": losses,
    }
