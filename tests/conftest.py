"""Session fixtures: one tiny model per family, built once per test session; one Ray cluster; one deployed Serve app
(``app``) shared by every module that talks to it (deploying costs minutes on 2 cores): the base model, adapters a1
and a2, the characters_file character ``haruhi`` (a1, with scene memory) and the imported V3 card ``aoi`` (a2, with
its lorebook and a standalone one)."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

# Token authentication on for every Ray process the tests start or connect to (dashboard and jobs API stay protected).
os.environ.setdefault("RAY_AUTH_MODE", "token")
# This session's Ray processes (and the jobs it starts) live under a temp dir of their own: the session never joins,
# nor stops, another Ray cluster on the machine, and tears down only its own.
SESSION_RAY_TMP = tempfile.mkdtemp(prefix="rpt", dir="/tmp")
os.environ["RAY_TMPDIR"] = SESSION_RAY_TMP
# Jobs plan themselves with the calibration file: this session's own (none: the defaults), never the user's
os.environ["RP_RAY_CALIBRATION"] = os.path.join(SESSION_RAY_TMP, "calibration.json")

from rp_ray.cluster import LOCAL_SERVE_ENV, free_port, haproxy_env
from rp_ray.llm.models import load_tokenizer, random_lora_adapter
from rp_ray.llm.template import get_template
from rp_ray.llm.tiny_model import build_tiny_model

REPO = Path(__file__).resolve().parents[1]
SHARED_HARUHI = REPO.parent / "shared" / "datasets" / "chatharuhi"
CARD_FIXTURES = REPO / "tests" / "fixtures" / "cards"


def pytest_collection_modifyitems(config, items):
    """`gpu` tests need CUDA: skipped cleanly (with the reason) on CPU-only machines."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none here)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def make_adapter(model_dir: Path, out: Path, seed: int = 0) -> Path:
    """A peft LoRA adapter with random non-zero weights (stands in for a trained one)."""
    return random_lora_adapter(model_dir, out, seed=seed)


@pytest.fixture(scope="session")
def tiny_llama3(tmp_path_factory) -> Path:
    return build_tiny_model(
        "llama3", tmp_path_factory.mktemp("tiny-llama3"), corpus_file=REPO / "data/sample/haruhi_train.json"
    )


@pytest.fixture(scope="session")
def tiny_gpt_oss(tmp_path_factory) -> Path:
    return build_tiny_model(
        "gpt_oss", tmp_path_factory.mktemp("tiny-gpt-oss"), corpus_file=REPO / "data/sample/haruhi_train.json"
    )


@pytest.fixture(scope="session")
def llama3_tok(tiny_llama3):
    return load_tokenizer(tiny_llama3, get_template("llama3"))


@pytest.fixture(scope="session")
def gpt_oss_tok(tiny_gpt_oss):
    return load_tokenizer(tiny_gpt_oss, get_template("gpt_oss"))


@pytest.fixture(scope="session", autouse=True)
def _run_from_repo_root():
    """Configs and the registry use repo-relative paths, as the README commands do."""
    import os

    old = os.getcwd()
    os.chdir(REPO)
    yield
    os.chdir(old)


def kill_ray_processes(ray_tmp: str, spare: frozenset[int] = frozenset()) -> int:
    """SIGKILL every process of the Ray cluster living under ``ray_tmp`` (`ray stop` would stop every Ray cluster on
    the machine) except the pids in ``spare``; returns how many were killed.

    A process belongs to it when its command line names ``ray_tmp`` (raylet, GCS) or one of its open files lies under
    it: Ray's agents rename themselves (``ray::DashboardAgent``) and keep only their log files there, and left alive
    they spin on a dead raylet, taking CPU from every later test."""
    killed = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid() or int(pid) in spare:
            continue
        if _in_ray_tmp(Path("/proc", pid), ray_tmp):
            try:
                os.kill(int(pid), signal.SIGKILL)
                killed += 1
            except OSError:
                pass
    return killed


def _in_ray_tmp(proc: Path, ray_tmp: str) -> bool:
    try:
        if ray_tmp in (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
            return True
        fds = list((proc / "fd").iterdir())
    except OSError:  # the process ended while we looked
        return False
    for fd in fds:
        try:
            if os.readlink(fd).startswith(ray_tmp + "/"):
                return True
        except OSError:  # that fd closed meanwhile
            continue
    return False


def ray_start_args(num_cpus: int) -> list[str]:
    """`ray start --head` with every port free, so it starts beside any other Ray cluster on the machine."""
    ports = {
        flag: free_port()
        for flag in (
            "port",
            "dashboard-agent-grpc-port",
            "runtime-env-agent-port",
            "metrics-export-port",
            "node-manager-port",
            "object-manager-port",
        )
    }
    args = [
        "start",
        "--head",
        *(f"--{k}={v}" for k, v in ports.items()),
        "--dashboard-agent-listen-port=0",
        f"--num-cpus={num_cpus}",
        "--disable-usage-stats",
    ]
    return args


def ray_env(ray_tmp: str) -> dict[str, str]:
    """The environment of a Ray cluster (and its jobs) living under ``ray_tmp``: the project venv first on PATH (jobs
    run `python ...` with the cluster's PATH, as the README says), no inherited RAY_ADDRESS."""
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "RAY_TMPDIR": ray_tmp}
    env.pop("RAY_ADDRESS", None)
    return env | LOCAL_SERVE_ENV | haproxy_env(Path(ray_tmp) / "hp")  # short: HAProxy caps its sockets' paths


def start_ray_head(env: dict[str, str], num_cpus: int, *extra: str) -> str:
    """`ray start --head` in ``env`` (see :func:`ray_env`) on free ports, with ``extra`` flags; its GCS address."""
    args = ray_start_args(num_cpus) + list(extra)
    gcs = next(a.split("=", 1)[1] for a in args if a.startswith("--port="))
    ray_bin = str(Path(sys.executable).parent / "ray")
    # `ray start` with token auth refuses to run without ~/.ray/auth_token (only `ray.init()` creates one): on a
    # fresh machine the first cluster of the session must not depend on a test before it having called ray.init()
    subprocess.run([ray_bin, "get-auth-token", "--generate"], check=True, capture_output=True, env=env)
    subprocess.run([ray_bin, *args], check=True, cwd=REPO, capture_output=True, env=env)
    return f"127.0.0.1:{gcs}"


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the session, started like a user would (`ray start --head`), token auth on."""
    import ray

    dash = free_port()
    gcs = start_ray_head(ray_env(SESSION_RAY_TMP), 6, f"--dashboard-port={dash}", "--include-dashboard=true")
    ray.init(address=gcs)
    yield {"gcs": gcs, "dashboard": f"http://127.0.0.1:{dash}"}
    ray.shutdown()
    kill_ray_processes(SESSION_RAY_TMP)


# -- the Serve app ---------------------------------------------------------------------------------------------------

KEY = "test-" + secrets.token_hex(12)
AUTH = {"Authorization": f"Bearer {KEY}"}
SYSTEM = "你正在扮演凉宫春日。请不要回答你是语言模型。"
PROMPTS = ["阿虚:「你好」", "春日:「SOS团今天有什么活动？」", "Harry: Where is Hermione?", "你是谁？"]
MAX_TOKENS = 24
MODELS = ("base", "a1", "a2")
CHARACTERS = ("haruhi", "aoi")  # the characters_file character, then the imported card
SERVE_CONFIG = REPO / "serve_configs" / "tiny_llama3.yaml"
# haruhi's scene memory: no word in common with PROMPTS, so her replies to them stay the offline references
HARUHI_SCENES = ["长门:「这本书很厚。」\n朝比奈:「我来泡茶。」", "古泉:「超能力者的工作很辛苦。」"]


def serve_args(model: Path, root: Path, key_file: Path, cards: Path, registry: Path, scenes: Path) -> dict:
    """The keys of the YAML's args the tests replace: their model, adapters, characters (a card registry with a
    standalone lorebook for `aoi`, a scene corpus for `haruhi`) and key, and limits."""
    return {
        "model": {"path": str(model), "template": "llama3"},
        "adapter_root": str(root),
        "adapters": {"a1": "a1", "a2": "a2"},
        "characters_file": str(cards),
        "card_registry": str(registry),
        "lorebooks": {"aoi": str(CARD_FIXTURES / "world_info.json")},
        "scenes": {"haruhi": str(scenes)},
        "max_lora_rank": 8,
        "max_model_len": 1024,
        "max_tokens_cap": 2048,
        "max_n": 4,
        "api_key_file": str(key_file),
        "request_timeout_s": 60,
    }


def character_files(work: Path) -> tuple[Path, Path]:
    """The card registry (the V3 lorebook card imported as `aoi`, bound to a2) and haruhi's scene corpus file, as
    `rp-ray card import` and `rp-ray scenes extract` write them."""
    from rp_ray.character.card import CardRegistry
    from rp_ray.character.scenes import CharacterScenes, SceneIndex, persona_hash, write_scene_corpus

    registry = work / "cards"
    CardRegistry(registry).import_file(CARD_FIXTURES / "v3_lorebook.json", name="aoi", adapter="a2")
    haruhi = CharacterScenes(
        key="haruhi", name="春日", persona_hash=persona_hash(SYSTEM), persona=SYSTEM, scenes=HARUHI_SCENES
    )
    write_scene_corpus({haruhi.persona_hash: haruhi}, work / "scenes")
    index = SceneIndex(HARUHI_SCENES)
    assert not any(index.retrieve(p) for p in PROMPTS), "a test prompt would bring haruhi's scenes into her prompt"
    return registry, work / "scenes" / "haruhi.jsonl"


def offline_replies(model: Path, root: Path):
    """Offline vLLM greedy replies, started in a Ray actor: (refs to the plain and the carded outputs, the actor).

    `haruhi` is adapter a1 with the card's system prompt.
    """
    import ray
    from engines import VllmEngine

    from rp_ray.config import SamplingConfig, VllmSettings
    from rp_ray.data import Message
    from rp_ray.eval.engines import Run
    from rp_ray.llm.template import LLAMA3, chat_prompt_ids

    tok = load_tokenizer(model, LLAMA3)
    runs = [Run("base", None), Run("a1", str(root / "a1")), Run("a2", str(root / "a2"))]
    engine = ray.remote(num_cpus=1)(VllmEngine).remote(
        str(model), tok, LLAMA3, runs, 1024, VllmSettings(max_lora_rank=8), 0
    )
    sampling = SamplingConfig(greedy=True, max_new_tokens=MAX_TOKENS)
    plain = [chat_prompt_ids(tok, LLAMA3, "", [Message("user", p)]) for p in PROMPTS]
    carded = [chat_prompt_ids(tok, LLAMA3, SYSTEM, [Message("user", p)]) for p in PROMPTS]
    out_plain = engine.generate.remote(plain, [None] * len(PROMPTS), runs, sampling)
    out_card = engine.generate.remote(carded, [None] * len(PROMPTS), [runs[1]], sampling)
    return out_plain, out_card, engine


@pytest.fixture(scope="session")
def app(ray_cluster, tiny_llama3, tmp_path_factory):
    """The app of serve_configs/tiny_llama3.yaml on the tiny model: adapters a1 and a2, the card `haruhi` (a1), the
    imported card `aoi` (a2), and the offline vLLM greedy reply of each model to each prompt (``ref``), deployed once
    for the session. Tests that import more cards into ``registry`` remove them again."""
    import ray
    import yaml
    from ray import serve

    from rp_ray.serve.app import deploy_config
    from rp_ray.serve.deployments import load_serve_config

    work = tmp_path_factory.mktemp("serve")
    root = work / "adapters"
    make_adapter(tiny_llama3, root / "a1", seed=1)
    make_adapter(tiny_llama3, root / "a2", seed=2)
    key_file = work / "api_key"
    key_file.write_text(KEY + "\n")
    cards = work / "characters.yaml"
    cards.write_text(
        yaml.safe_dump(
            {
                "characters": [
                    {
                        "name": "haruhi",
                        "display_name": "凉宫春日",
                        "system_prompt": SYSTEM,
                        "adapter": "a1",
                        "greeting": "「你好！」",
                    }
                ]
            },
            allow_unicode=True,
        )
    )
    registry, scenes = character_files(work)
    out_plain, out_card, engine = offline_replies(tiny_llama3, root)  # runs while the app starts
    t0 = time.monotonic()
    args = serve_args(tiny_llama3, root, key_file, cards, registry, scenes)
    url = deploy_config(SERVE_CONFIG, args, port=free_port())
    started = time.monotonic() - t0
    plain, card = ray.get([out_plain, out_card])
    ray.kill(engine)
    ref = {(m, p): plain[m][i].text for m in MODELS for i, p in enumerate(PROMPTS)}
    ref.update({("haruhi", p): card["a1"][i].text for i, p in enumerate(PROMPTS)})
    yield SimpleNamespace(
        url=url,
        ref=ref,
        root=root,
        work=work,
        registry=registry,
        started=started,
        dashboard=ray_cluster["dashboard"],
        args=load_serve_config(SERVE_CONFIG, args).applications[0].args,
    )  # the YAML's, replaced
    serve.shutdown()


def client(app, **kw):
    from openai import OpenAI

    return OpenAI(base_url=f"{app.url}/v1", api_key=KEY, max_retries=0, timeout=120, **kw)


def ask(app, model: str, prompt: str, **kw):
    return client(app).chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], temperature=0, max_tokens=MAX_TOKENS, **kw
    )


# -- multi-node clusters on one machine (test_multinode, test_autoscaler) --------------------------------------------


def token_env(ray_tmp: str) -> dict[str, str]:
    """:func:`ray_env` with a token of the cluster's own: a new random one in ``ray_tmp/auth_token``, named by
    RAY_AUTH_TOKEN_PATH (which Ray reads before ~/.ray/auth_token). Every node, job and client started in this env
    authenticates with it; the cluster needs no token in the home dir, and shares none with other clusters."""
    token = Path(ray_tmp) / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    return ray_env(ray_tmp) | {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}


def wait_for(what: str, check, timeout_s: float, poll_s: float = 1.0):
    """Poll ``check()`` until it returns a truthy value (returned) or ``timeout_s`` passes (AssertionError, with the
    last value seen)."""
    t0 = time.monotonic()
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() - t0 > timeout_s:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}; last seen: {got!r}")
        time.sleep(poll_s)


def ray_nodes(env: dict[str, str], gcs: str) -> list[dict]:
    """``ray.nodes()`` of the cluster at ``gcs``, read by a driver process of its own: a driver in the test process
    would tie it to one cluster (and Ray caches the first token it reads)."""
    import json

    driver = (
        "import json, ray\n"
        "ray.init(logging_level='ERROR', log_to_driver=False)\n"
        "print('NODES=' + json.dumps(ray.nodes(), default=str))\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", driver],
        env=env | {"RAY_ADDRESS": gcs},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(next(x for x in r.stdout.splitlines() if x.startswith("NODES="))[6:])


def alive_nodes(env: dict[str, str], gcs: str) -> list[dict]:
    return [n for n in ray_nodes(env, gcs) if n["Alive"]]
