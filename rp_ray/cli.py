"""The ``rp-ray`` command: tiny models, data checks, and config reference."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from rp_ray import config as cfgmod
from rp_ray import tiny_model
from rp_ray.cluster import wait_for_job_agent
from rp_ray.preparation import absolute_paths, encode_locally, prepare

KINDS = {"train": cfgmod.TrainConfig, "eval": cfgmod.EvalConfig, "serve": cfgmod.ServeConfig}
EXPECTED_ERRORS: tuple[type[Exception], ...] = (ValueError, FileNotFoundError, TimeoutError)


def setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )


def job_config(cls: type, doc: str | None, example: str, argv: list[str] | None = None):
    """The command line every job takes: ``--config FILE`` plus ``key=value`` overrides, validated as ``cls``."""
    kind = next(k for k, c in KINDS.items() if c is cls)
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help=f"{cls.__name__} YAML (every key: rp-ray config {kind})")
    ap.add_argument("overrides", nargs="*", help=f"key=value overrides, e.g. {example}")
    a = ap.parse_args(argv)
    return cfgmod.load_config(cls, a.config, a.overrides)


def config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML config file (e.g. jobs/configs/tiny_llama3.yaml)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. data.cutoff_len=1024 lora.rank=16")


def cmd_tiny_model(a: argparse.Namespace) -> None:
    sizes = tiny_model.DEFAULT_SIZES if a.pretrain else {"vocab_size": 4096, "hidden_size": 128, "num_layers": 2}
    pretrain = tiny_model.DEFAULT_PRETRAIN.model_copy(update={"steps": a.pretrain_steps}) if a.pretrain else None
    out = tiny_model.build_tiny_model(
        a.family,
        a.out,
        corpus_file=a.corpus,
        vocab_size=a.vocab_size or sizes["vocab_size"],
        hidden_size=a.hidden_size or sizes["hidden_size"],
        num_layers=a.num_layers or sizes["num_layers"],
        seed=a.seed,
        pretrain=pretrain,
    )
    print(f"tiny {a.family} model written to {out} (model card: {out / 'README.md'})")


def cmd_data(a: argparse.Namespace) -> None:
    cfg = absolute_paths(cfgmod.load_config(cfgmod.TrainConfig, a.config, a.overrides))
    prep = prepare(cfg.model, cfg.data, a.out, need=())
    _, stats = encode_locally(cfg.model, cfg.data.cutoff_len, prep.train)
    print(prep.report_path.with_suffix(".txt").read_text(encoding="utf-8"), end="")
    print(f"train encoded: {stats.summary()}")
    print(f"data report: {prep.report_path}")


def cmd_config(a: argparse.Namespace) -> None:
    cls = KINDS[a.kind]
    print(f"{cls.__name__}: {cls.__doc__}")
    print("\n".join(cfgmod.describe(cls)))


def cmd_wait_jobs(a: argparse.Namespace) -> None:
    waited = wait_for_job_agent(a.address, a.timeout)
    print(f"the cluster at {a.address} accepts jobs (waited {waited:.1f} s)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rp-ray", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser(
        "tiny-model",
        help="build a tiny model in Hugging Face layout: random weights (seconds) "
        "or, with --pretrain, pretrained on --corpus (about a minute)",
    )
    p.add_argument("--family", choices=["llama3", "gpt_oss"], required=True)
    p.add_argument("--out", required=True, help="output directory (rebuilt only when an input changed)")
    p.add_argument(
        "--corpus",
        default=tiny_model.DEFAULT_CORPUS,
        help="sharegpt train file the tokenizer (and, with --pretrain, the model) is trained on",
    )
    p.add_argument(
        "--pretrain",
        action="store_true",
        help="pretrain as a plain language model on the corpus's text, with the demo's sizes "
        f"({tiny_model.DEFAULT_SIZES}); this is the demo's default base model",
    )
    p.add_argument(
        "--pretrain-steps",
        type=int,
        default=tiny_model.DEFAULT_PRETRAIN.steps,
        help=f"optimizer steps of --pretrain (batch {tiny_model.DEFAULT_PRETRAIN.batch_size} x "
        f"{tiny_model.DEFAULT_PRETRAIN.seq_len} tokens)",
    )
    p.add_argument("--vocab-size", type=int, default=None, help="default 4096")
    p.add_argument("--hidden-size", type=int, default=None, help="default 128")
    p.add_argument("--num-layers", type=int, default=None, help="default 2, or 4 with --pretrain")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_tiny_model)

    p = sub.add_parser("data", help="validate + encode the config's datasets and write the data report")
    config_args(p)
    p.add_argument("--out", default="outputs/data", help="where data_report.json/.txt go")
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("wait-jobs", help="wait until a fresh `ray start` cluster accepts `ray job submit` (bounded)")
    p.add_argument(
        "--address",
        default=os.environ.get("RAY_ADDRESS", "http://127.0.0.1:8265"),
        help="the cluster's dashboard URL (default: $RAY_ADDRESS or http://127.0.0.1:8265)",
    )
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait at most (default 300)")
    p.set_defaults(func=cmd_wait_jobs)

    p = sub.add_parser("config", help="list every key of a config kind with its default and meaning")
    p.add_argument("kind", choices=sorted(KINDS))
    p.set_defaults(func=cmd_config)
    return parser


def run(func, *args) -> int:
    """Run a command; expected failures print one clear message and exit 2 instead of a traceback."""
    try:
        func(*args)
    except EXPECTED_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    a = build_parser().parse_args(argv)
    return run(a.func, a)


if __name__ == "__main__":
    sys.exit(main())
