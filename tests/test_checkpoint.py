"""The MXFP4 -> plain copy of a gpt-oss checkpoint (``rp_ray.llm.checkpoint``), on a synthetic MXFP4 checkpoint.

The synthetic checkpoint is a random tiny gpt-oss whose experts are quantized here into gpt-oss's on-disk MXFP4
format (``*_blocks`` + ``*_scales``, the real model's ``quantization_config``, bf16 elsewhere), split over two
shards with one blocks/scales pair across them. The reference for the copy is transformers' own dequantizing load
(``Mxfp4Config(dequantize=True)``, what ``rp_ray.llm.models.load_model`` does for MXFP4); the ZeRO-3 test documents
why the copy exists: zero.Init partitions the copy as it loads, and never the MXFP4 original.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from rp_ray.cli import main as cli
from rp_ray.llm.checkpoint import INDEX_FILE, PROVENANCE_FILE, dequantize_checkpoint
from rp_ray.llm.models import ModelDirError, check_model_dir, load_model, load_tokenizer
from rp_ray.llm.template import get_template
from rp_ray.llm.tiny_model import build_tiny_model

REPO = Path(__file__).resolve().parents[1]
NUM_LAYERS = 2
SHARD_BYTES = 200_000  # forces a multi-shard copy of the tiny model (its tensors are 130 kB at most)
# gpt-oss-20b's quantization_config, verbatim
QUANTIZATION_CONFIG = {
    "modules_to_not_convert": [
        "model.layers.*.self_attn",
        "model.layers.*.mlp.router",
        "model.embed_tokens",
        "lm_head",
    ],
    "quant_method": "mxfp4",
}
FP4_MAGNITUDES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def quantize_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., rows, cols) -> gpt-oss's MXFP4 blocks (..., rows, cols/32, 16) uint8 and scales (..., rows, cols/32).

    Per group of 32 values along ``cols``: a power-of-two scale (E8M0, stored as exponent + 127) that brings the
    largest magnitude within FP4's 6, then each value rounded to the nearest E2M1 code (bit 3 the sign), two codes
    a byte, the even element in the low nibble (the order transformers' dequantizer unpacks).
    """
    *lead, cols = w.shape
    g = w.float().reshape(*lead, cols // 32, 32)
    exp = torch.ceil(torch.log2(g.abs().amax(-1).clamp(min=2.0**-120) / 6.0)).clamp(-127, 127)
    scaled = g / torch.exp2(exp)[..., None]
    code = (scaled.abs()[..., None] - FP4_MAGNITUDES).abs().argmin(-1) + 8 * (scaled < 0)
    code = code.to(torch.uint8)
    return code[..., 0::2] | (code[..., 1::2] << 4), (exp + 127).to(torch.uint8)


def write_mxfp4_checkpoint(plain: Path, out: Path) -> dict[str, torch.Tensor]:
    """An MXFP4 gpt-oss checkpoint in ``out`` made from the float32 tiny model in ``plain``; returns its tensors.

    As gpt-oss stores them: experts as blocks + scales of the transposed matrices (``gate_up_proj`` as
    experts x 2*intermediate x hidden, ``down_proj`` as experts x hidden x intermediate), expert biases and every
    other tensor in bf16, config.json with the real ``quantization_config`` and ``torch_dtype`` bfloat16.
    """
    out.mkdir()
    tensors: dict[str, torch.Tensor] = {}
    for name, t in load_file(plain / "model.safetensors").items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            tensors[f"{name}_blocks"], tensors[f"{name}_scales"] = quantize_mxfp4(t.transpose(1, 2))
        else:
            tensors[name] = t.to(torch.bfloat16)
    names = sorted(tensors)
    # two shards, cut between layer 0's down_proj blocks and its scales: pairs need not share a file
    cut = names.index("model.layers.0.mlp.experts.down_proj_scales")
    shards = {"model-00001-of-00002.safetensors": names[:cut], "model-00002-of-00002.safetensors": names[cut:]}
    for fname, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, out / fname, metadata={"format": "pt"})
    weight_map = {k: f for f, keys in shards.items() for k in keys}
    (out / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = json.loads((plain / "config.json").read_text())
    config.pop("dtype", None)
    config |= {"torch_dtype": "bfloat16", "quantization_config": QUANTIZATION_CONFIG}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja"):
        if (plain / f).is_file():
            shutil.copy(plain / f, out / f)
    (out / "original").mkdir()  # as on the hub: other weight formats in sub-folders, not copied
    (out / "original" / "model.safetensors").write_bytes(b"not needed")
    return tensors


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> Path:
    return build_tiny_model(
        "gpt_oss",
        tmp_path_factory.mktemp("plain"),
        corpus_file=REPO / "data/sample/haruhi_train.json",
        vocab_size=512,
        hidden_size=64,
        num_layers=NUM_LAYERS,
    )


@pytest.fixture(scope="module")
def mxfp4(plain, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mxfp4") / "gpt-oss-tiny-mxfp4"
    write_mxfp4_checkpoint(plain, out)
    return out


@pytest.fixture(scope="module")
def converted(mxfp4, tmp_path_factory) -> Path:
    return dequantize_checkpoint(
        mxfp4, tmp_path_factory.mktemp("bf16") / "gpt-oss-tiny-bf16", max_shard_size=SHARD_BYTES
    )


def copy_tensors(d: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out |= load_file(f)
    return out


def test_copy_is_a_plain_sharded_checkpoint(mxfp4, converted):
    config = json.loads((converted / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    assert {k: v for k, v in config.items() if k not in ("dtype",)} == {
        k: v
        for k, v in json.loads((mxfp4 / "config.json").read_text()).items()
        if k not in ("quantization_config", "torch_dtype")
    }
    index = json.loads((converted / INDEX_FILE).read_text())
    shards = sorted(converted.glob("*.safetensors"))
    assert len(shards) >= 3 and set(index["weight_map"].values()) == {f.name for f in shards}
    for f in shards:
        with safe_open(f, framework="pt") as sf:
            assert set(sf.keys()) == {k for k, v in index["weight_map"].items() if v == f.name}
            assert sf.metadata() == {"format": "pt"}
        assert f.stat().st_size <= SHARD_BYTES + 10_000  # the limit counts tensor bytes, not the JSON header
    tensors = copy_tensors(converted)
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in tensors.values())
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    assert not any(k.endswith(("_blocks", "_scales")) for k in tensors)
    experts = "model.layers.1.mlp.experts"
    assert tensors[f"{experts}.gate_up_proj"].shape == (4, 64, 256)  # experts x hidden x 2*intermediate
    assert tensors[f"{experts}.down_proj"].shape == (4, 128, 64)  # experts x intermediate x hidden
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja"):
        assert (converted / f).read_bytes() == (mxfp4 / f).read_bytes()
    assert not (converted / "original").exists()
    assert json.loads((converted / PROVENANCE_FILE).read_text())["dequantized"] == [
        f"model.layers.{i}.mlp.experts.{p}" for i in range(NUM_LAYERS) for p in ("down_proj", "gate_up_proj")
    ]
    check_model_dir(converted)
    load_tokenizer(converted, get_template("gpt_oss"))
    assert not list(converted.parent.glob(".*partial"))  # the staging folder became the copy


def test_copy_holds_what_transformers_dequantizing_load_holds(plain, mxfp4, converted):
    """Same names, same values: the copy is the MXFP4 load, saved. And the experts are the tiny model's, within
    FP4's rounding, so the synthetic quantizer (and the transposition both sides agree on) is not vacuous."""
    reference = load_model(mxfp4, "bfloat16", "eager").state_dict()  # Mxfp4Config(dequantize=True)
    tensors = copy_tensors(converted)
    assert set(tensors) == set(reference)
    for k, t in tensors.items():
        assert torch.equal(t, reference[k].to(torch.bfloat16)), k
    original = load_file(plain / "model.safetensors")
    for k in (k for k in tensors if k.endswith(("gate_up_proj", "down_proj"))):
        err = (tensors[k].float() - original[k]).norm() / original[k].norm()
        assert 0 < err < 0.15, (k, err)


def test_copy_loads_plainly_and_gives_the_mxfp4_load_logits(mxfp4, converted):
    """bf16: the same logits, bit for bit. float32: transformers' dequantizing load leaves the experts in bf16
    whatever dtype is asked (it dequantizes to bf16 and does not cast), while the copy loads them as float32 like
    every other tensor; the values are the same (bf16 is exact in float32), so the logits agree to bf16 rounding,
    and exactly once the reference's experts are cast too."""
    ids = load_tokenizer(converted)("Haruhi looked out of the window.", return_tensors="pt")["input_ids"]

    def logits(model):
        with torch.no_grad():
            return model(input_ids=ids).logits

    ref, copy = load_model(mxfp4, "bfloat16", "eager"), load_model(converted, "bfloat16", "eager")
    assert {p.dtype for p in copy.parameters()} == {torch.bfloat16}
    assert torch.isfinite(logits(copy)).all() and torch.equal(logits(ref), logits(copy))

    ref, copy = load_model(mxfp4, "float32", "eager"), load_model(converted, "float32", "eager")
    assert {p.dtype for p in copy.parameters()} == {torch.float32}
    torch.testing.assert_close(logits(copy), logits(ref), atol=2e-2, rtol=2e-2)  # bf16 vs float32 experts
    assert torch.equal(logits(ref.to(torch.float32)), logits(copy))


ZERO3_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path
    import deepspeed
    import torch
    from safetensors.torch import load_file
    import torch.distributed as dist
    from transformers.integrations import HfDeepSpeedConfig
    from rp_ray.cluster import free_port
    from rp_ray.llm.models import load_model
    from rp_ray.train.step import World, join_deepspeed

    os.environ["LOCAL_RANK"] = "0"  # as torchrun sets it; DeepSpeed requires it
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    join_deepspeed(World(0, 1, torch.device("cpu")))  # what rp_ray's training setup() does before loading
    ds = {"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1, "train_batch_size": 1,
          "bf16": {"enabled": False}}
    hf_ds = HfDeepSpeedConfig(ds)  # alive during from_pretrained: zero.Init on load
    out = {}
    for name, path in zip(("converted", "mxfp4"), sys.argv[1:]):
        model = load_model(path, "float32", "eager")
        params = list(model.parameters())
        out[name] = [sum(hasattr(p, "ds_id") for p in params), len(params)]
        if name == "converted":  # the partitions hold the checkpoint's values, not an init
            with deepspeed.zero.GatheredParameters(params):
                loaded = {k: v.detach().clone() for k, v in model.state_dict().items()}
            saved = {}
            for f in Path(path).glob("*.safetensors"):
                saved |= load_file(f)
            out["values_match"] = loaded.keys() == saved.keys() and all(
                torch.equal(loaded[k], saved[k].float()) for k in saved)
    print("COUNTS " + json.dumps(out))
    """
)


def test_zero3_partitions_the_copy_and_not_the_mxfp4_original(mxfp4, converted):
    """Under a stage-3 HfDeepSpeedConfig, zero.Init partitions every parameter of the copy as it loads; the MXFP4
    original (loaded dequantized) gets none partitioned: the whole model on every rank, the problem the copy fixes.
    In a subprocess, so the process group does not outlive the test."""
    r = subprocess.run(
        [sys.executable, "-c", ZERO3_SCRIPT, str(converted), str(mxfp4)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    line = next((x for x in r.stdout.splitlines() if x.startswith("COUNTS ")), None)
    assert r.returncode == 0 and line, r.stdout[-3000:] + r.stderr[-3000:]
    counts = json.loads(line.removeprefix("COUNTS "))
    n = 3 + 17 * NUM_LAYERS  # embeddings, final norm, lm_head; per layer 2 norms, q/k/v/o + biases, sinks, router 2,
    # experts 4
    assert counts == {"converted": [n, n], "mxfp4": [0, n], "values_match": True}


def test_cli_converts_and_says_where_the_copy_is(mxfp4, tmp_path, capsys):
    dest = tmp_path / "copy"
    dest.mkdir()  # an empty folder is fine
    assert cli.main(["convert-mxfp4", str(mxfp4), str(dest)]) == 0
    out = capsys.readouterr().out
    assert str(dest) in out and f"model.path={dest}" in out
    assert (dest / "model.safetensors").is_file() and not (dest / INDEX_FILE).exists()  # one shard under 5 GB
    check_model_dir(dest)


def test_cli_refuses_a_source_that_is_not_mxfp4(plain, tmp_path, capsys):
    assert cli.main(["convert-mxfp4", str(plain), str(tmp_path / "copy")]) == 2
    err = capsys.readouterr().err
    assert f"{plain / 'config.json'} declares no MXFP4 weights" in err and f"give model.path {plain} itself" in err
    assert not (tmp_path / "copy").exists()


def test_cli_refuses_a_non_empty_dest(mxfp4, tmp_path, capsys):
    dest = tmp_path / "copy"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    assert cli.main(["convert-mxfp4", str(mxfp4), str(dest)]) == 2
    err = capsys.readouterr().err
    assert f"{dest} is not empty" in err and "pick another DEST" in err
    assert [f.name for f in dest.iterdir()] == ["keep.txt"] and not list(tmp_path.glob(".*partial"))


def test_incomplete_pair_is_refused_and_leaves_nothing(mxfp4, tmp_path):
    src = tmp_path / "broken"
    shutil.copytree(mxfp4, src)
    index = json.loads((src / INDEX_FILE).read_text())
    del index["weight_map"]["model.layers.1.mlp.experts.gate_up_proj_scales"]
    (src / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(ModelDirError, match="gate_up_proj_blocks has no matching .*gate_up_proj_scales"):
        dequantize_checkpoint(src, tmp_path / "copy")
    assert sorted(f.name for f in tmp_path.iterdir()) == ["broken"]


def test_training_refuses_an_mxfp4_checkpoint_under_zero3_and_names_the_fix(mxfp4, converted, tmp_path):
    """Refused in the driver, before Ray or any worker starts; the converted copy and ZeRO-2 pass the check."""
    from rp_ray.config import TrainConfig, load_config
    from rp_ray.llm.models import ModelDirError, check_partitionable
    from rp_ray.train import run_training

    cfg = load_config(
        TrainConfig,
        Path(__file__).resolve().parents[1] / "jobs/configs/tiny_gpt_oss.yaml",
        [f"model.path={mxfp4}", "deepspeed.stage=3", f"output_dir={tmp_path}"],
    )
    with pytest.raises(ModelDirError, match=r"rp-ray convert-mxfp4 .* and set model.path=.*-bf16"):
        run_training(cfg)
    assert not (tmp_path / "data").exists()  # nothing was prepared
    check_partitionable(converted, 3)
    check_partitionable(mxfp4, 2)
