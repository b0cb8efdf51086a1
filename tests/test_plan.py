"""rp-ray plan: plans for every shipped config, the memory model against the GPU check's measurements, the checks
that refuse a config which cannot run, and calibration from run summaries written in the jobs' own formats."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import REPO

from rp_ray.cli.main import main
from rp_ray.config import ConfigError, EvalConfig, ServeConfig, TrainConfig, load_config, read_yaml_mapping
from rp_ray.plan import Calibration, check, make_plan, plan_eval, plan_train, predicted, refuse, render
from rp_ray.plan import memory as mem
from rp_ray.plan.calibration import LOAD_BANDWIDTH, defaults
from rp_ray.plan.hardware import GIB, hardware
from rp_ray.plan.planner import job_kind, train_setup
from rp_ray.plan.runs import calibrate
from rp_ray.plan.shapes import ModelShape, model_shape
from rp_ray.plan.throughput import train_flops
from rp_ray.plan.tokens import MEASURED_STATS, eval_tokens, train_tokens

JOBS = REPO / "jobs" / "configs"
SERVE = REPO / "serve_configs"
SHIPPED = sorted(JOBS.glob("*.yaml")) + [SERVE / n for n in ("tiny_llama3.yaml", "llama31_8b.yaml", "gpt_oss_20b.yaml")]
NO_CALIBRATION = Calibration(path=None)


@pytest.fixture(autouse=True)
def _own_calibration_file(tmp_path, monkeypatch):
    """Plans read the calibration file a test writes, never the user's."""
    monkeypatch.setenv("RP_RAY_CALIBRATION", str(tmp_path / "calibration.json"))


def tiny_path(config: Path, tiny_llama3: Path, tiny_gpt_oss: Path) -> Path:
    return tiny_gpt_oss if "gpt_oss" in config.name else tiny_llama3


# -- every shipped config ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", SHIPPED, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_plan_runs_on_every_shipped_config(config, tiny_llama3, tiny_gpt_oss, capsys):
    """Tiny configs on this CPU with the tiny models built here; the 8B and 20B ones on H800 from their shipped
    shapes and the measured token statistics (no model files, no network)."""
    if "tiny" in config.name:
        args = [f"model.path={tiny_path(config, tiny_llama3, tiny_gpt_oss)}"]
    else:
        args = ["--gpu", "H800", "--price-per-gpu-hour", "2.5", "--requests-per-s", "10"]
    rc = main(["plan", str(config), *args])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "REFUSED" not in out
    kind = job_kind(read_yaml_mapping(config))
    expect = {"train": "largest micro-batch that fits", "eval": "prediction", "serve": "concurrent chats"}[kind]
    assert expect in out
    if "tiny" not in config.name:
        assert "NVIDIA H800" in out and "shipped shape of" in out
        if kind != "serve":
            assert "measured with the real tokenizer" in out and "GPU-hours x 2.5 =" in out


def test_hub_models_use_shipped_shapes_and_measured_statistics():
    llama = plan_train(load_config(TrainConfig, JOBS / "llama31_8b_4gpu.yaml"), gpu="H800", calibration=NO_CALIBRATION)
    assert llama.s.shape.total_params == 8_030_261_248  # Llama-3.1-8B
    assert not llama.tokens.exact and "measured with the real tokenizer" in llama.tokens.source
    stats = MEASURED_STATS[("llama3", "haruhi_train")]
    assert llama.tokens.examples == stats.examples
    assert abs(llama.tokens.tokens - stats.tokens) / stats.tokens < 1e-3
    assert abs(llama.tokens.supervised_tokens - stats.supervised) / stats.supervised < 1e-3
    assert llama.memory.fits and llama.largest_micro_batch >= 2

    oss = load_config(TrainConfig, JOBS / "gpt_oss_20b_8gpu.yaml")
    shape = model_shape(oss.model)
    assert shape.experts == 32 and shape.mxfp4
    assert round(shape.total_params / 1e9, 1) == 20.9 and round(shape.active_params / 1e9, 1) == 3.6
    assert shape.lora_modules("all").keys() == {"q_proj", "k_proj", "v_proj", "o_proj"}  # experts are not Linear
    by_id = model_shape(oss.model.model_copy(update={"path": "openai/gpt-oss-20b", "cache_dir": "/nonexistent"}))
    assert by_id.total_params == shape.total_params and "shipped shape" in by_id.source
    converted = model_shape(oss.model.model_copy(update={"path": "/mnt/shared/models/gpt-oss-20b-bf16"}))
    assert not converted.mxfp4 and converted.total_params == shape.total_params


def test_unknown_model_without_config_names_the_fix():
    cfg = load_config(TrainConfig, JOBS / "llama31_8b_4gpu.yaml", ["model.path=/nowhere/SomeModel-7B"])
    with pytest.raises(ConfigError, match="rp-ray download"):
        model_shape(cfg.model)


def test_kind_is_read_from_the_config():
    assert job_kind({"model": {}, "num_epochs": 1}) == "train"
    assert job_kind({"model": {}, "adapters": {}}) == "eval"
    assert job_kind({"applications": [{"args": {}}]}) == "serve"
    assert job_kind({"model": {}, "adapter_root": "outputs"}) == "serve"
    assert job_kind({"model": {}}, ["per_device_batch_size=2"]) == "train"
    with pytest.raises(ConfigError, match="cannot tell"):
        job_kind({"model": {}, "num_epochs": 1, "sampling": {}})


def test_exact_tokens_are_the_jobs_own_encodings(tiny_llama3):
    from rp_ray.data.report import load_splits
    from rp_ray.llm.models import load_tokenizer
    from rp_ray.llm.template import encode_prediction, get_template
    from rp_ray.preparation import encode_split

    cfg = load_config(TrainConfig, JOBS / "tiny_llama3.yaml", [f"model.path={tiny_llama3}"])
    shape = model_shape(cfg.model)
    tpl = get_template("llama3")
    tok = load_tokenizer(tiny_llama3, tpl)
    train, val, _ = load_splits(cfg.data)
    rows, stats = encode_split(tok, tpl, train, cfg.data.cutoff_len)
    t = train_tokens(cfg, shape)
    assert t.exact and t.lengths == [len(r["input_ids"]) for r in rows]
    assert (t.tokens, t.supervised_tokens, t.truncated) == (stats.tokens, stats.label_tokens, stats.truncated)

    ecfg = load_config(EvalConfig, JOBS / "eval_tiny_llama3.yaml", [f"model.path={tiny_llama3}"])
    e = eval_tokens(ecfg, shape)
    examples = [encode_prediction(tok, tpl, c, ecfg.data.cutoff_len) for c in val]
    assert e.lengths == [len(x.prompt_ids) for x in examples]
    assert e.supervised == [min(len(x.label_ids), ecfg.sampling.max_new_tokens) for x in examples]


# -- the memory and FLOP models ------------------------------------------------------------------------------------

# The GPU check's peak allocated memory on one H200 (README: GPU check): the shipped configs with one worker, rows
# of the lengths it ran (Llama: every row 2048 tokens; gpt-oss: random 300-2048, the peak at the longest), 30% of
# each row labelled.
GPU_CHECK_PEAKS = [
    ("llama31_8b_4gpu.yaml", [], 2, 2048, 40.1),
    ("llama31_8b_4gpu.yaml", ["gradient_checkpointing=true"], 2, 2048, 18.7),
    ("gpt_oss_20b_8gpu.yaml", ["per_device_batch_size=1"], 1, 2048, 41.0),
    ("gpt_oss_20b_8gpu.yaml", ["per_device_batch_size=1", "deepspeed.stage=3"], 1, 2048, 41.1),
    ("gpt_oss_20b_8gpu.yaml", ["per_device_batch_size=1", "gradient_checkpointing=false"], 1, 2048, 50.7),
    ("gpt_oss_20b_8gpu.yaml", [], 4, 1900, 46.3),
]


@pytest.mark.parametrize(("config", "overrides", "micro", "seq", "measured_gib"), GPU_CHECK_PEAKS)
def test_training_memory_within_20_percent_of_the_gpu_check(config, overrides, micro, seq, measured_gib):
    cfg = load_config(TrainConfig, JOBS / config, ["num_workers=1", *overrides])
    shape, hw = model_shape(cfg.model), hardware("H200")
    m = mem.train_memory(shape, train_setup(cfg, shape, 2, 1, hw), hw, micro, seq, 0.3)
    tensors = (m.total - m.get("runtime reserve")) / GIB  # the check measured allocated tensors
    assert abs(tensors - measured_gib) / measured_gib < 0.2, (tensors, measured_gib, m.lines)


def test_flops_per_token_of_lora_on_frozen_weights():
    shape = model_shape(load_config(TrainConfig, JOBS / "llama31_8b_4gpu.yaml").model)
    n_big, n = shape.active_params, shape.lora_params(8, "all")
    plain, ckpt = train_flops(shape, n, False), train_flops(shape, n, True)
    assert plain.dense_model == plain.dense_executed == 4 * n_big + 6 * n
    assert ckpt.dense_executed == 6 * n_big + 8 * n and ckpt.dense_model == plain.dense_model


def test_sliding_windows_bound_attention_and_kv_cache():
    shape = ModelShape(
        "w", "gpt_oss", 10, 8, 2, 2, 1, 4, 8, sliding_window=4, layer_types=("sliding_attention", "full_attention")
    )
    assert shape.attended_pairs(10) == (4 * 5 / 2 + 6 * 4) + 10 * 11 / 2
    assert shape.kv_bytes(10, 2) == 2 * 4 * 2 * (4 + 10)


# -- checks: each refusal, with the key and the fix ----------------------------------------------------------------


def test_micro_batch_that_does_not_fit_is_refused_with_its_fixes(capsys):
    cfg = load_config(TrainConfig, JOBS / "llama31_8b_4gpu.yaml", ["per_device_batch_size=16"])
    (problem,) = check(cfg, "H800")
    assert problem.startswith("per_device_batch_size=16: a step of 16 x 2048-token rows needs")
    assert "gradient_checkpointing=true" in problem and "deepspeed.stage=3" in problem
    largest = int(problem.split("per_device_batch_size=")[2].split(" ")[0])
    assert 1 <= largest < 16 and check(cfg.model_copy(update={"per_device_batch_size": largest}), "H800") == []
    with pytest.raises(ConfigError, match="per_device_batch_size=16"):
        refuse(cfg, "H800")
    assert main(["plan", str(JOBS / "llama31_8b_4gpu.yaml"), "per_device_batch_size=16", "--gpu", "H800"]) == 1
    out = capsys.readouterr().out
    assert "DOES NOT FIT" in out and "REFUSED" in out


def test_kv_cache_smaller_than_max_model_len_is_refused(tiny_llama3):
    cfg = load_config(ServeConfig, SERVE / "llama31_8b.yaml", ["max_model_len=1000000"])
    (problem,) = check(cfg, "H800")
    assert problem.startswith("max_model_len=1000000: one sequence needs") and "max_model_len<=" in problem
    assert check(load_config(ServeConfig, SERVE / "llama31_8b.yaml"), "H800") == []
    cpu = load_config(ServeConfig, SERVE / "tiny_llama3.yaml", [f"model.path={tiny_llama3}", "max_model_len=3000000"])
    (problem,) = check(cpu, "cpu")
    assert "cpu_kv_cache_gib=1" in problem and "Fix: cpu_kv_cache_gib=" in problem


def test_max_lora_rank_below_an_adapters_rank_is_refused(tmp_path):
    adapter = tmp_path / "big"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 64, "peft_type": "LORA"}))
    cfg = load_config(EvalConfig, JOBS / "eval_llama31_8b.yaml", [f"adapters={{big: {adapter}}}", "max_lora_rank=16"])
    (problem,) = check(cfg, "H800")
    assert problem.startswith("max_lora_rank=16: adapter big") and "has rank 64" in problem
    assert "max_lora_rank=64" in problem
    assert check(cfg.model_copy(update={"max_lora_rank": 64}), "H800") == []


def test_tensor_parallel_size_above_a_node_is_refused():
    cfg = load_config(ServeConfig, SERVE / "llama31_8b.yaml", ["tensor_parallel_size=16"])
    (problem,) = check(cfg, "H800")
    assert problem.startswith("tensor_parallel_size=16: a node has 8 GPUs") and "tensor_parallel_size<=8" in problem
    assert check(cfg, "H800", gpus_per_node=16) == []


def test_zero3_that_waits_on_its_all_gathers_is_refused():
    cfg = load_config(TrainConfig, JOBS / "gpt_oss_20b_8gpu.yaml", ["deepspeed.stage=3", "per_device_batch_size=1"])
    (problem,) = check(cfg, "H800")
    assert problem.startswith("deepspeed.stage=3 is communication-bound: a micro-batch all-gathers")
    assert "x as long" in problem and "deepspeed.stage=2" in problem
    ratio = float(problem.split("of compute, ")[1].split("x")[0])
    assert ratio > 1
    assert check(cfg.model_copy(update={"deepspeed": cfg.deepspeed.model_copy(update={"stage": 2})}), "H800") == []
    plan = plan_train(cfg, gpu="H800", calibration=NO_CALIBRATION)
    assert any(p.startswith("deepspeed.stage=3 is communication-bound") for p in plan.problems)


def test_shipped_gpu_configs_pass_every_check():
    for path, cls in [
        (JOBS / "llama31_8b_4gpu.yaml", TrainConfig),
        (JOBS / "gpt_oss_20b_8gpu.yaml", TrainConfig),
        (JOBS / "eval_llama31_8b.yaml", EvalConfig),
        (JOBS / "eval_gpt_oss_20b.yaml", EvalConfig),
        (SERVE / "llama31_8b.yaml", ServeConfig),
        (SERVE / "gpt_oss_20b.yaml", ServeConfig),
    ]:
        for gpu in ("H100", "H800"):
            assert check(load_config(cls, path), gpu) == [], (path, gpu)


# -- calibration ---------------------------------------------------------------------------------------------------


def write_training_summary(
    out: Path, cfg: TrainConfig, tokens: int, steps: int, train_s: float, wall_s: float, **measured
):
    """A finished run's training_summary.json, written by training's own writer (``measured``: more figures a run
    records, such as its peak memory)."""
    from rp_ray.train.state import TrainState
    from rp_ray.train.summary import write_summary

    out.mkdir(parents=True, exist_ok=True)
    history = [{"step": i + 1, "loss": 4.0 - i / steps, "lr": 1e-3} for i in range(steps)]
    state = TrainState(step=steps, tokens=tokens, train_seconds=train_s, history=history, world_size=cfg.num_workers)
    state.total_steps = steps
    write_summary(state, cfg, {"wall_seconds": wall_s, **measured}, out)


def test_calibration_round_trip_training(tiny_llama3, tmp_path):
    """A run twice as slow as the default efficiency says halves the fitted HFU; the next plan predicts it. A second
    run with other micro-batches separates the per-micro-batch overhead from the HFU."""
    cal = tmp_path / "calibration.json"
    cfg = load_config(TrainConfig, JOBS / "tiny_llama3.yaml", [f"model.path={tiny_llama3}", "max_steps=20"])
    plan = plan_train(cfg, gpu="cpu", calibration=NO_CALIBRATION)
    startup = 40.0
    weights = plan.s.shape.weight_bytes(4) / LOAD_BANDWIDTH
    rss = predicted(plan)["peak_memory_gib"] + 0.5  # the worker process is half a GiB larger than assumed
    write_training_summary(
        tmp_path / "a",
        cfg,
        plan.tokens_trained,
        20,
        2 * plan.train_s,
        2 * plan.train_s + startup + weights,
        peak_memory_gib=rss,
    )
    lines = calibrate([tmp_path / "a"], cal)
    assert f"peak memory: measured {rss} GiB" in "\n".join(lines)
    assert "fit over 1 run(s)" in lines[-2] and str(cal) in lines[-1]
    eff = Calibration.load(cal).efficiency("cpu", False)
    assert eff.train_hfu == pytest.approx(defaults("cpu", False).train_hfu / 2, rel=0.01)
    assert eff.train_startup_s == pytest.approx(startup, abs=0.2) and "calibrated" in eff.sources["train_hfu"]
    again = plan_train(cfg, gpu="cpu", calibration=Calibration.load(cal))
    assert again.train_s == pytest.approx(2 * plan.train_s, rel=0.01)
    assert again.total_s == pytest.approx(2 * plan.train_s + startup + weights, rel=0.01)
    assert predicted(again)["peak_memory_gib"] == pytest.approx(rss, abs=0.01)

    # two runs made of x / hfu + micro-batches x overhead: the fit recovers both
    hfu, overhead = 0.1, 0.05
    other = load_config(
        TrainConfig,
        JOBS / "tiny_llama3.yaml",
        [f"model.path={tiny_llama3}", "max_steps=10", "per_device_batch_size=1", "gradient_accumulation_steps=4"],
    )
    for name, c in (("a", cfg), ("b", other)):
        p = plan_train(c, gpu="cpu", calibration=NO_CALIBRATION)
        x = p.busiest_flops / p.worker.peak_flops
        measured = x / hfu + p.total_steps * c.gradient_accumulation_steps * overhead
        write_training_summary(tmp_path / name, c, p.tokens_trained, p.total_steps, measured, measured + startup)
    calibrate([tmp_path / "a", tmp_path / "b"], cal)
    eff = Calibration.load(cal).efficiency("cpu", False)
    assert eff.train_hfu == pytest.approx(hfu, rel=0.01) and eff.train_overhead_s == pytest.approx(overhead, rel=0.01)
    assert json.loads(cal.read_text())["kinds"]["cpu"]["train/dense"]["fit"]["n_runs"] == 2  # a refold replaces


def test_calibration_round_trip_evaluation(tiny_llama3, tmp_path):
    """An eval output dir in the pipeline's own formats (fingerprint, engines.json, eval_summary.json): the fitted
    scale makes the next plan predict the measured prediction time, start-up and the rest of the job."""
    from rp_ray.eval.engines import Run
    from rp_ray.eval.pipeline import fingerprint

    cal = tmp_path / "calibration.json"
    cfg = load_config(EvalConfig, JOBS / "eval_tiny_llama3.yaml", [f"model.path={tiny_llama3}", "adapters={}"])
    plan = plan_eval(cfg, gpu="cpu", calibration=NO_CALIBRATION)
    out = tmp_path / "eval"
    (out / "base").mkdir(parents=True)
    (out / "base" / "run_config.json").write_text(json.dumps(fingerprint(cfg, Run("base", None))))
    predict_s, prep_s, rest = 3 * plan.pass_s, 25.0, 12.0
    run = plan.runs[0]
    group = {
        "prep_s": prep_s,
        "predict_s": predict_s,
        "requests": run.requests,
        "prompt_tokens": run.prompt_tokens,
        "reply_tokens": run.reply_tokens,
        "engines": [{"index": 0, "bound": plan.engine.batch, "requests": run.requests, "ready_s": prep_s}],
    }
    (out / "engines.json").write_text(json.dumps({"base": group}))
    wall = prep_s + predict_s + rest
    (out / "eval_summary.json").write_text(json.dumps({"base": {"job_wall_seconds": wall}}))
    calibrate([out], cal)
    again = plan_eval(cfg, gpu="cpu", calibration=Calibration.load(cal))
    assert again.pass_s == pytest.approx(predict_s, rel=0.02)
    assert again.startup_s == pytest.approx(prep_s, rel=0.01)
    assert again.total_s == pytest.approx(wall, rel=0.02)
    assert predicted(again)["predict_runtime"] == pytest.approx(predict_s, rel=0.02)


def test_calibrate_refuses_a_folder_that_is_no_run(tmp_path, capsys):
    assert main(["plan", "--calibrate", str(tmp_path)]) == 2
    assert "neither a training output_dir" in capsys.readouterr().err


def test_render_names_every_memory_part():
    plan = make_plan(JOBS / "llama31_8b_4gpu.yaml", gpu="H800", calibration=NO_CALIBRATION)
    text = render(plan)
    for part in ("weights", "LoRA parameters", "LoRA gradients", "optimizer state", "activations", "logits + loss"):
        assert part in text
    assert "communication buckets" in text and "fits; largest micro-batch that fits" in text


# -- jobs: the plan before anything is scheduled ----------------------------------------------------------------------


def _nothing_scheduled(monkeypatch, module: str) -> None:
    """A job that reaches Ray (``ensure_ray``, the first thing that schedules) fails the test."""

    def scheduled(*args, **kwargs):
        raise AssertionError("the job reached Ray: the config should have been refused before")

    monkeypatch.setattr(f"{module}.ensure_ray", scheduled)


def test_a_training_job_that_cannot_run_is_refused_before_scheduling(tiny_llama3, tmp_path, monkeypatch):
    from rp_ray.train import run_training

    _nothing_scheduled(monkeypatch, "rp_ray.train.driver")
    cfg = load_config(
        TrainConfig,
        JOBS / "tiny_llama3.yaml",
        [f"model.path={tiny_llama3}", f"output_dir={tmp_path / 'out'}", "per_device_batch_size=1024"],
    )
    with pytest.raises(ConfigError, match="300 train examples make no whole optimizer step.*per_device_batch_size"):
        run_training(cfg)


def test_an_eval_job_with_an_adapter_over_max_lora_rank_is_refused_before_scheduling(
    tiny_llama3, tmp_path, monkeypatch
):
    from rp_ray.eval import run_eval

    _nothing_scheduled(monkeypatch, "rp_ray.eval.pipeline")
    adapter = tmp_path / "big"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 64, "peft_type": "LORA"}))
    cfg = load_config(
        EvalConfig,
        JOBS / "eval_tiny_llama3.yaml",
        [
            f"model.path={tiny_llama3}",
            f"output_dir={tmp_path / 'out'}",
            f"adapters={{big: {adapter}}}",
            "max_lora_rank=16",
        ],
    )
    with pytest.raises(ConfigError, match=r"this config cannot run as set:\n  - max_lora_rank=16: adapter big"):
        run_eval(cfg)


# -- calibration from one run ------------------------------------------------------------------------------------------


def test_a_runs_own_steps_give_the_relative_cost_of_attention(tiny_llama3):
    """Steps whose seconds are 1 per dense FLOP-second and 3 per attention one (at their mean row length): the
    regression over the run's steps finds the 3; steps all of one size tell nothing."""
    from rp_ray.plan.runs import attention_cost

    cfg = load_config(TrainConfig, JOBS / "tiny_llama3.yaml", [f"model.path={tiny_llama3}"])
    plan = plan_train(cfg, gpu="cpu", calibration=NO_CALIBRATION)
    rows, shape, flops = cfg.per_device_batch_size * cfg.gradient_accumulation_steps, plan.s.shape, plan.flops

    def seconds(tokens: int) -> float:
        per_rank = tokens / cfg.num_workers
        return 1e-9 * (
            flops.dense_executed * per_rank + 3 * flops.pair_executed * rows * shape.attended_pairs(per_rank / rows)
        )

    curve = [
        {"step": i, "tokens": t, "seconds": seconds(t)}
        for i, t in enumerate([9000, 2000, 4000, 6000, 8000, 3000, 7000])
    ]
    assert attention_cost(curve, plan, cfg) == pytest.approx(3.0, rel=1e-3)
    alike = [{"step": i, "tokens": 5000, "seconds": seconds(5000)} for i in range(8)]
    assert attention_cost(alike, plan, cfg) is None


def test_runs_of_one_size_fit_the_figure_they_tell():
    """One size of run tells one figure: a run mostly fixed cost per step at the defaults (a tiny model's decode
    steps) fits the overhead and keeps the default efficiency; one mostly compute fits the efficiency."""
    from rp_ray.plan.calibration import fit

    cpu = defaults("cpu", False)
    tiny = fit("eval", [{"x_s": 1.0, "count": 100, "measured_s": 5.0}], cpu)
    assert tiny["scale"] == 1.0 and tiny["eval_step_overhead_s"] == pytest.approx(0.04)
    big = fit("eval", [{"x_s": 10.0, "count": 10, "measured_s": 20.0}], cpu)
    assert big["scale"] == pytest.approx(0.5) and "eval_step_overhead_s" not in big
