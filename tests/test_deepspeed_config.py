"""The DeepSpeed JSON for bf16 GPUs: ZeRO-3 overlaps its communication, bf16 gradients accumulate in fp32.

The JSON is checked as data, then handed to DeepSpeed itself: two gloo processes on CPU
initialize an engine from it and take optimizer steps with gradient accumulation, so a
setting DeepSpeed refuses (as it refuses fp32 accumulation of bf16 at stage 0) fails here.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from conftest import REPO

from rp_ray.cluster import free_port
from rp_ray.config import TrainConfig
from rp_ray.train.deepspeed_config import deepspeed_config


def train_cfg(**kw) -> TrainConfig:
    return TrainConfig.model_validate(
        {
            "model": {"path": "m", "template": "llama3"},
            "num_workers": 2,
            "per_device_batch_size": 2,
            "gradient_accumulation_steps": 2,
            **kw,
        }
    )


@pytest.mark.parametrize(
    "stage, bf16, overlap, accum",
    [
        (3, True, True, "fp32"),  # the GPU setting: gathers overlap compute, fp32 accumulation
        (3, False, True, None),  # CPU: same flags (no streams on CPU: overlap is a no-op there), fp32 anyway
        (2, True, False, "fp32"),  # only LoRA gradients to reduce: nothing to overlap
        (2, False, False, None),
        (0, True, None, None),  # DeepSpeed refuses fp32 accumulation of bf16 without ZeRO
    ],
)
def test_generated_json(stage, bf16, overlap, accum):
    ds = deepspeed_config(train_cfg(deepspeed={"stage": stage}), bf16=bf16)
    assert ds["zero_optimization"]["stage"] == stage
    assert ds["zero_optimization"].get("overlap_comm") == overlap
    assert ds.get("data_types") == ({"grad_accum_dtype": accum} if accum else None)
    assert ds["bf16"] == {"enabled": bf16} and ds["fp16"] == {"enabled": False}
    sizes = (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"])
    assert sizes == (2, 2, 8)
    json.dumps(ds)  # DeepSpeed gets it as JSON-able data


def test_user_file_keeps_its_data_types(tmp_path):
    own = tmp_path / "own.json"
    own.write_text(json.dumps({"zero_optimization": {"stage": 3}, "data_types": {"grad_accum_dtype": "bf16"}}))
    assert deepspeed_config(train_cfg(deepspeed={"config_file": str(own)}), bf16=True)["data_types"] == {
        "grad_accum_dtype": "bf16"
    }
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    assert deepspeed_config(train_cfg(deepspeed={"config_file": str(plain)}), bf16=True)["data_types"] == {
        "grad_accum_dtype": "fp32"
    }
    bare = tmp_path / "bare.json"
    bare.write_text("{}")  # no ZeRO section: stage 0, bf16 accumulates in bf16
    assert "data_types" not in deepspeed_config(train_cfg(deepspeed={"config_file": str(bare)}), bf16=True)


RUN = textwrap.dedent("""
    import json, os, sys
    import torch, torch.multiprocessing as mp

    def run(rank, port, configs, out):
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                          LOCAL_RANK=str(rank))
        import deepspeed
        from rp_ray.train.step import World, join_deepspeed
        join_deepspeed(World(rank, 2, torch.device("cpu")))  # as training joins: gloo, no shm op compiled
        results = {}
        for name, cfg in configs.items():
            dtype = torch.bfloat16 if cfg["bf16"]["enabled"] else torch.float32
            torch.manual_seed(0)
            model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)).to(dtype)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
            engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg, dist_init_required=False)
            for _ in range(2 * cfg["gradient_accumulation_steps"]):
                loss = engine(torch.randn(2, 32, dtype=dtype)).float().pow(2).mean()
                engine.backward(loss)
                engine.step()
            results[name] = {"steps": engine.global_steps, "overlap": engine.zero_overlap_comm(),
                             "accum": str(engine.get_data_types()[1]),
                             "opt_accum": str(getattr(engine.optimizer, "gradient_accumulation_dtype", None))}
            engine.destroy()
        if rank == 0:
            json.dump(results, open(out, "w"))
        torch.distributed.destroy_process_group()

    if __name__ == "__main__":
        configs = json.load(open(sys.argv[1]))
        mp.spawn(run, args=(int(sys.argv[2]), configs, sys.argv[3]), nprocs=2, join=True)
""")


@pytest.mark.slow
def test_deepspeed_runs_the_generated_json_on_two_gloo_ranks(tmp_path):
    configs = {
        f"stage{s}-{'bf16' if b else 'fp32'}": deepspeed_config(train_cfg(deepspeed={"stage": s}), bf16=b)
        for s, b in ((3, True), (3, False), (2, True), (0, True))
    }
    (tmp_path / "configs.json").write_text(json.dumps(configs))
    (tmp_path / "run.py").write_text(RUN)
    out = tmp_path / "out.json"
    res = subprocess.run(
        [sys.executable, str(tmp_path / "run.py"), str(tmp_path / "configs.json"), str(free_port()), str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(out.read_text())
    assert {k: v["steps"] for k, v in got.items()} == dict.fromkeys(configs, 2)  # 2 optimizer steps of 2 micro-batches
    assert got["stage3-bf16"]["overlap"] and got["stage3-fp32"]["overlap"] and not got["stage2-bf16"]["overlap"]
    for name in ("stage3-bf16", "stage2-bf16"):
        assert got[name]["accum"] == got[name]["opt_accum"] == "torch.float32", got[name]
    assert got["stage0-bf16"]["accum"] == "torch.bfloat16"
