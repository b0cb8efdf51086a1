"""The ``rp-ray`` command: tiny models, data checks, config reference, character cards, scene corpora and the
terminal chat."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from rp_ray import config as cfgmod
from rp_ray.character import card as cardmod
from rp_ray.character import prompt, scenes
from rp_ray.cli import chat as chat_repl
from rp_ray.cluster import wait_for_job_agent
from rp_ray.llm import tiny_model
from rp_ray.plan import command as plan_command
from rp_ray.preparation import absolute_paths, encode_split, prepare

DEFAULT_REGISTRY = "outputs/characters"
KINDS = {"train": cfgmod.TrainConfig, "eval": cfgmod.EvalConfig, "serve": cfgmod.ServeConfig}


def setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    # one INFO line per HTTP request would land in the middle of `rp-ray chat`'s conversation
    for name in ("httpx", "httpcore", "httpx2", "httpcore2"):  # httpx2: the openai client's
        logging.getLogger(name).setLevel(logging.WARNING)


def job_config(cls: type, doc: str | None, example: str, argv: list[str] | None = None):
    """The command line every job takes: ``--config FILE`` plus ``key=value`` overrides, validated as ``cls``."""
    kind = next(k for k, c in KINDS.items() if c is cls)
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help=f"{cls.__name__} YAML (every key: rp-ray config {kind})")
    ap.add_argument("overrides", nargs="*", help=f"key=value overrides, e.g. {example}")
    a = ap.parse_args(argv)
    return cfgmod.load_config(cls, a.config, a.overrides)


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


def cmd_download(a: argparse.Namespace) -> None:
    from rp_ray.llm.hub import cache_root, download
    from rp_ray.llm.models import check_model_dir

    folder = download(a.model_id, a.hub, a.cache_dir)
    check_model_dir(folder)  # e.g. a repo with pickle weights only: said now, not by the first job
    keys = [f"model.path={a.model_id}"] + (["model.hub=modelscope"] if a.hub == "modelscope" else [])
    keys += [f"model.cache_dir={cache_root(a.cache_dir)}"] if a.cache_dir else []
    print(f"{a.model_id} is in the model cache: {folder}\njobs load it, offline, with {' '.join(keys)}")


def cmd_convert_mxfp4(a: argparse.Namespace) -> None:
    from rp_ray.llm.checkpoint import dequantize_checkpoint

    out = dequantize_checkpoint(a.src, a.dest, dtype=a.dtype, max_shard_size=a.max_shard_size, progress=True)
    print(
        f"{a.dtype} copy of {a.src} written to {out}: set model.path={out} in the training config "
        f"(ZeRO-3 then partitions it as it loads)"
    )


def cmd_data(a: argparse.Namespace) -> None:
    cfg = absolute_paths(cfgmod.load_config(cfgmod.TrainConfig, a.config, a.overrides))
    prep = prepare(cfg.model, cfg.data, a.out, need=())
    _, stats = encode_split(prep.tok, prep.tpl, prep.train, cfg.data.cutoff_len, cfg.model.enable_thinking)
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


def cmd_card_import(a: argparse.Namespace) -> None:
    reg = cardmod.CardRegistry(a.registry)
    sampling = {"temperature": a.temperature, "top_p": a.top_p, "top_k": a.top_k, "max_tokens": a.max_tokens}
    name = reg.import_file(a.file, name=a.name, adapter=a.adapter, overwrite=a.force, sampling=sampling)
    card = reg.get(name)
    book = card.book.entries if card.book else []
    settings = cardmod.rp_settings(card)
    print(
        f"imported {a.file} as {name!r} ({card.spec}, character {card.name!r}, {len(prompt.greetings(card))} "
        f"greeting(s), {len(book)} lorebook entries, adapter {settings.adapter or 'none (base model)'}) "
        f"into {reg.root}"
    )


def cmd_card_export(a: argparse.Namespace) -> None:
    fmt = "png" if a.png else "json"
    out = cardmod.CardRegistry(a.registry).export(a.name, a.out or f"{a.name}.{fmt}", fmt)
    print(f"card {a.name!r} written to {out} ({fmt})")


def cmd_card_show(a: argparse.Namespace) -> None:
    """The card's prompt parts as the model gets them; card text is shown, never obeyed, by the terminal."""
    card = cardmod.CardRegistry(a.registry).get(a.name)
    settings = cardmod.rp_settings(card)
    sampling = settings.sampling.model_dump(exclude_none=True)
    print(
        f"{a.name}: {card.name!r} ({card.spec}); adapter: {settings.adapter or 'none (base model)'}; "
        f"sampling: {sampling or 'server defaults'}"
    )
    parts = [("system prompt", prompt.system_prompt(card, user_name=a.user))]
    note = prompt.depth_prompt(card)
    if note is not None:
        parts.append((f"Character's Note ({note[2]}, {note[1]} messages from the end)", note[0]))
    parts.append(("after the chat history (system)", prompt.post_history(card, a.user) or ""))
    parts += [(f"greeting {i + 1}", g) for i, g in enumerate(prompt.greetings(card, a.user))]
    for title, text in parts:
        if text.strip():
            print(f"\n== {title} ==")
            print(chat_repl.printable(text))


def cmd_card_list(a: argparse.Namespace) -> None:
    reg = cardmod.CardRegistry(a.registry)
    names = reg.names()
    if not names:
        print(f"no cards in {reg.root} (rp-ray card import FILE)")
    for n in names:
        card = reg.get(n)
        print(chat_repl.printable(f"{n}\t{card.name}\t{card.spec}\t{cardmod.rp_settings(card).adapter or '-'}"))


def cmd_scenes_extract(a: argparse.Namespace) -> None:
    from rp_ray.data import read_rows

    chars = scenes.extract_scenes(r.value for r in read_rows(a.dataset) if r.drop is None)
    if not chars:
        raise ValueError(f"{a.dataset}: no row has a system prompt; expected sharegpt rows with a system turn")
    index = scenes.write_scene_corpus(chars, a.out)
    for c in sorted(chars.values(), key=lambda c: c.key):
        print(f"{c.key}\t{len(c.scenes)} scenes")
    print(f"{len(chars)} characters, {sum(len(c.scenes) for c in chars.values())} scenes; index: {index}")


def card_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--registry", default=DEFAULT_REGISTRY, help=f"card registry folder (default {DEFAULT_REGISTRY})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rp-ray", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    for add in (
        _add_model_commands,
        _add_data_commands,
        _add_card_commands,
        _add_scenes_commands,
        chat_repl.add_parser,
        plan_command.add_parser,
    ):
        add(sub)
    return parser


def _add_model_commands(sub) -> None:
    """tiny-model, download, convert-mxfp4."""
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

    p = sub.add_parser(
        "download",
        help="fetch a model by hub id into the model cache, the one command that goes online (safetensors, "
        "configs, tokenizer files; never pickle weights or code); jobs then set model.path to the id",
    )
    p.add_argument("model_id", help="org/name, e.g. meta-llama/Llama-3.1-8B-Instruct (gated: set HF_TOKEN)")
    p.add_argument("--hub", choices=["huggingface", "modelscope"], default="huggingface", help="default huggingface")
    p.add_argument(
        "--cache-dir",
        default=None,
        help="the model cache (jobs: model.cache_dir); default $RP_RAY_MODEL_CACHE, else the hub's default cache",
    )
    p.set_defaults(func=cmd_download)

    p = sub.add_parser(
        "convert-mxfp4",
        help="write a plain safetensors copy of an MXFP4 gpt-oss checkpoint (experts dequantized), "
        "which DeepSpeed ZeRO-3 can partition while it loads",
    )
    p.add_argument("src", help="the MXFP4 checkpoint folder (e.g. a download of openai/gpt-oss-20b)")
    p.add_argument("dest", help="a new or empty folder for the copy")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16", help="default bfloat16")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    p.set_defaults(func=cmd_convert_mxfp4)


def _add_data_commands(sub) -> None:
    """data, wait-jobs, config."""
    p = sub.add_parser("data", help="validate + encode the config's datasets and write the data report")
    p.add_argument("--config", required=True, help="YAML config file (e.g. jobs/configs/tiny_llama3.yaml)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. data.cutoff_len=1024 lora.rank=16")
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


def _add_card_commands(sub) -> None:
    card = sub.add_parser("card", help="character cards (V1/V2/V3 JSON or PNG): import, export, show, list")
    card_sub = card.add_subparsers(dest="card_cmd", required=True)
    p = card_sub.add_parser("import", help="validate a card file (JSON or PNG) and add it to the registry")
    p.add_argument("file")
    p.add_argument("--name", help="registry name (the chat API's model); default: the character's name as a slug")
    p.add_argument("--adapter", help="served adapter this character speaks through (kept in the card)")
    p.add_argument("--temperature", type=float, help="default sampling kept in the card (likewise --top-p ...)")
    p.add_argument("--top-p", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--max-tokens", type=int)
    p.add_argument("--force", action="store_true", help="replace a card of the same name")
    card_args(p)
    p.set_defaults(func=cmd_card_import)
    p = card_sub.add_parser("export", help="write a registry card as a PNG (chara + ccv3 chunks) or as JSON")
    p.add_argument("name")
    fmt = p.add_mutually_exclusive_group(required=True)
    fmt.add_argument("--png", action="store_true")
    fmt.add_argument("--json", action="store_true")
    p.add_argument("--out", help="output file (default: NAME.png / NAME.json here)")
    card_args(p)
    p.set_defaults(func=cmd_card_export)
    p = card_sub.add_parser("show", help="print a card's assembled system prompt and greetings")
    p.add_argument("name")
    p.add_argument("--user", default="User", help="the {{user}} name (default User)")
    card_args(p)
    p.set_defaults(func=cmd_card_show)
    p = card_sub.add_parser("list", help="list the registry's cards")
    card_args(p)
    p.set_defaults(func=cmd_card_list)


def _add_scenes_commands(sub) -> None:
    sc = sub.add_parser("scenes", help="ChatHaruhi scene memory")
    sc_sub = sc.add_subparsers(dest="scenes_cmd", required=True)
    p = sc_sub.add_parser("extract", help="one scene corpus (JSONL) per character from a sharegpt dataset + index")
    p.add_argument("dataset", help="sharegpt JSON/JSONL whose system prompts hold persona + classic scenes")
    p.add_argument("--out", required=True, help="output folder (characters.json and one <key>.jsonl per character)")
    p.set_defaults(func=cmd_scenes_extract)


def run(func, *args) -> int:
    """Run a command; expected failures print one clear message and exit 2 instead of a traceback."""
    try:
        status = func(*args)
    except (ValueError, FileNotFoundError, TimeoutError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return status if isinstance(status, int) else 0


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    a = build_parser().parse_args(argv)
    return run(a.func, a)


if __name__ == "__main__":
    sys.exit(main())
