"""Serving building blocks without an engine: OpenAI request validation and limits, error bodies,
character cards, and adapter folders that cannot escape the adapter root."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest
from conftest import make_adapter
from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

from rp_ray.character.card import CardError, check_name, rp_settings
from rp_ray.character.catalog import load_characters_file as load_cards
from rp_ray.character.names import is_name
from rp_ray.config import ConfigError, ServeConfig
from rp_ray.llm.models import random_lora_adapter
from rp_ray.serve.adapters import resolve_adapter
from rp_ray.serve.app import build_app
from rp_ray.serve.auth import AuthSetupError, key_matches, load_api_key, presented_key
from rp_ray.serve.chat import AssistantMessage, ChatCompletionChoice, ChatCompletionResponse, parse_request
from rp_ray.serve.completion import CompletionRequest
from rp_ray.serve.protocol import APIError, DetokenizeRequest, Limits, TokenizeRequest, Usage, check_limits, parse_body

OK = {"model": "haruhi", "messages": [{"role": "user", "content": "阿虚:「早」"}]}


def test_valid_request_with_unknown_extras():
    req = parse_request(OK | {"logprobs": False, "stream_options": {"include_usage": True}, "max_completion_tokens": 8})
    assert req.model == "haruhi" and req.requested_max_tokens == 8 and req.stream_options.include_usage


@pytest.mark.parametrize(
    "payload, param",
    [
        ([1, 2], None),
        ({"messages": OK["messages"]}, "model"),
        (OK | {"messages": []}, "messages"),
        (OK | {"messages": [{"role": "narrator", "content": "x"}]}, "messages.0.role"),
        (OK | {"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
        (
            OK | {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            "messages.0.content",
        ),
        (OK | {"messages": [{"role": "user", "content": ["q"]}]}, "messages.0.content"),
        (OK | {"temperature": "hot"}, "temperature"),
        (OK | {"temperature": 3}, "temperature"),
        (OK | {"n": 0}, "n"),
        (OK | {"max_tokens": -1}, "max_tokens"),
        (OK | {"logit_bias": {"abc": 1}}, "logit_bias"),
        (OK | {"logit_bias": {"-5": 1}}, "logit_bias"),
        (OK | {"logit_bias": {"5": 101}}, "logit_bias.5"),
        (OK | {"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias"),
        (OK | {"logit_bias": [5]}, "logit_bias"),
        (OK | {"min_p": 1.5}, "min_p"),
        (OK | {"repetition_penalty": 0}, "repetition_penalty"),
        (OK | {"repetition_penalty": float("inf")}, "repetition_penalty"),
        (OK | {"top_logprobs": 21}, "top_logprobs"),
        (OK | {"logprobs": "lots"}, "logprobs"),
        (OK | {"seed": 1 << 64}, "seed"),
        (OK | {"stop": ["a"] * 257}, "stop"),
        (OK | {"stop": ["x" * 257]}, "stop.0"),
        (OK | {"stop": 5}, "stop"),
    ],
)
def test_bad_requests_are_400_with_openai_error_body(payload, param):
    with pytest.raises(APIError) as e:
        parse_request(payload)
    assert e.value.status == 400
    body = e.value.body()["error"]
    assert set(body) == {"message", "type", "param", "code"}
    assert body["param"] == param and body["type"] == "invalid_request_error"


TEXT = {"model": "base", "prompt": "阿虚:「早」"}


@pytest.mark.parametrize(
    "payload, param",
    [
        ({"model": "base"}, "prompt"),
        (TEXT | {"prompt": []}, "prompt"),
        (TEXT | {"prompt": ["a", "b"]}, "prompt"),
        (TEXT | {"prompt": [1, -2]}, "prompt"),
        (TEXT | {"prompt": [[1, 2]]}, "prompt"),
        (TEXT | {"prompt": [True]}, "prompt"),
        (TEXT | {"prompt": 7}, "prompt"),
        (TEXT | {"logprobs": 21}, "logprobs"),
        (TEXT | {"logprobs": -1}, "logprobs"),
        (TEXT | {"max_tokens": 0}, "max_tokens"),
        (TEXT | {"min_tokens": -1}, "min_tokens"),
        (TEXT | {"best_of": 0}, "best_of"),
        (TEXT | {"stop": ["s"] * 257}, "stop"),
        (TEXT | {"temperature": -0.5}, "temperature"),
        (TEXT | {"ignore_eos": "maybe"}, "ignore_eos"),
    ],
)
def test_bad_completion_requests_are_400(payload, param):
    with pytest.raises(APIError) as e:
        parse_body(payload, CompletionRequest)
    assert (e.value.status, e.value.param) == (400, param)


def test_sillytaverns_text_completion_body_validates():
    """The body SillyTavern's text completion mode (API type vLLM) sends: its settings, filtered to vLLM's keys."""
    body = {
        "model": "haruhi",
        "prompt": "凉宫春日's persona: ...\n阿虚: 早\n凉宫春日:",
        "max_tokens": 300,
        "logprobs": 5,
        "temperature": 0.7,
        "top_p": 0.9,
        "min_p": 0.05,
        "repetition_penalty": 1.1,
        "frequency_penalty": 0,
        "presence_penalty": 0,
        "top_k": 0,
        "min_tokens": 0,
        "stop": ["\n阿虚:", "\n凉宫春日:", "<|eot_id|>", "<|start_header_id|>user<|end_header_id|>", "\nUser:", "###"],
        "skip_special_tokens": True,
        "n": 1,
        "ignore_eos": False,
        "spaces_between_special_tokens": True,
        "seed": 42,
        "stream": True,
        "logit_bias": {"1001": -100, "1002": 5},
        "include_stop_str_in_output": False,
        "use_beam_search": False,
        "length_penalty": 1,
        "early_stopping": False,
        "truncate_prompt_tokens": None,
        "response_format": None,
        "guided_json": None,
    }
    req = parse_body(body, CompletionRequest)
    assert req.logprobs == 5 and len(req.stop) == 6 and req.logit_bias == {"1001": -100.0, "1002": 5.0}


def test_tokenize_bodies():
    assert parse_body({"model": "base", "prompt": "x"}, TokenizeRequest).add_special_tokens
    assert parse_body({"model": "base", "messages": OK["messages"]}, TokenizeRequest).prompt is None
    for payload, param in [
        ({"prompt": "x"}, "model"),
        ({"model": "base", "prompt": 5}, "prompt"),
        ({"model": "base", "messages": []}, "messages"),
    ]:
        with pytest.raises(APIError) as e:
            parse_body(payload, TokenizeRequest)
        assert e.value.param == param
    for payload, param in [({"model": "base"}, "tokens"), ({"model": "base", "tokens": [1, -1]}, "tokens.1")]:
        with pytest.raises(APIError) as e:
            parse_body(payload, DetokenizeRequest)
        assert e.value.param == param


def test_limits():
    lim = Limits(max_messages=3, max_tokens_cap=100, max_n=2, max_body_bytes=1024)
    assert check_limits(parse_request(OK), lim, context_len=1000, prompt_tokens=50) == 100
    assert check_limits(parse_request(OK | {"max_tokens": 10}), lim, 1000, 50) == 10
    assert check_limits(parse_request(OK), lim, 120, 50) == 70  # default capped by the room left
    cases = [
        (OK | {"n": 3}, 1000, 50, "n"),
        (OK | {"max_tokens": 101}, 1000, 50, "max_tokens"),
        (OK | {"max_tokens": 60}, 100, 50, "max_tokens"),  # does not fit the context
        (OK, 50, 50, "messages"),  # prompt alone fills the context
        (OK | {"messages": [{"role": "user", "content": "q"}] * 4}, 1000, 50, "messages"),
    ]
    for payload, ctx, prompt, param in cases:
        with pytest.raises(APIError) as e:
            check_limits(parse_request(payload), lim, ctx, prompt)
        assert e.value.status == 400 and e.value.param == param


def test_completion_body_shape():
    body = ChatCompletionResponse(
        id="chatcmpl-1",
        model="haruhi",
        usage=Usage.of(prompt_tokens=7, completion_tokens=3),
        choices=[ChatCompletionChoice(index=0, message=AssistantMessage(content="「哼」"), finish_reason="stop")],
    ).model_dump(mode="json")
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "「哼」"}
    assert body["usage"] == {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}


def test_cards_load(tmp_path):
    p = tmp_path / "cards.yaml"
    p.write_text(
        "characters:\n  - name: haruhi\n    display_name: 凉宫春日\n    system_prompt: 你是凉宫春日。\n"
        "    adapter: haruhi-lora\n    greeting: 「我对普通的人类没有兴趣！」\n    sampling: {temperature: 0.7}\n",
        encoding="utf-8",
    )
    cards = load_cards(p)
    card = rp_settings(cards["haruhi"])
    assert card.adapter == "haruhi-lora" and card.sampling.temperature == 0.7


def test_a_name_is_a_full_match():
    """A trailing newline (which ``$`` lets through) or anything around the name is refused everywhere."""
    assert is_name("haruhi-1.v2") and not is_name("name\n") and not is_name(" name") and not is_name("x" * 65)
    with pytest.raises(CardError, match=r"card name 'name\\n'"):
        check_name("name\n")
    with pytest.raises(ValueError, match="base_name"):
        ServeConfig(model={"path": "m", "template": "llama3"}, base_name="name\n")


@pytest.mark.parametrize(
    "content, match",
    [
        ([{"name": "../x", "display_name": "x", "system_prompt": "s"}], "card 0: name"),
        ([{"name": "a", "display_name": "x", "system_prompt": "s", "colour": "red"}], "colour"),
        ([{"name": "a", "display_name": "x", "system_prompt": "s"}] * 2, "two cards are named 'a'"),
        ({"a": 1}, "expected a list"),
    ],
)
def test_bad_cards(tmp_path, content, match):
    p = tmp_path / "cards.json"
    p.write_text(json.dumps(content))
    with pytest.raises(CardError, match=match):
        load_cards(p)


def test_adapter_folders_stay_inside_the_root(tmp_path):
    root = tmp_path / "adapters"
    good = root / "haruhi"
    good.mkdir(parents=True)
    (good / "adapter_config.json").write_text("{}")
    (good / "adapter_model.safetensors").write_bytes(b"")
    assert resolve_adapter(root, "haruhi", "haruhi") == good.resolve()
    outside = tmp_path / "etc"
    outside.mkdir()
    (root / "link").symlink_to(outside)
    with pytest.raises(CardError, match="outside the adapter root"):
        resolve_adapter(root, "x", "../../etc")
    with pytest.raises(CardError, match="outside the adapter root"):
        resolve_adapter(root, "x", "link")
    with pytest.raises(CardError, match="adapter name"):
        resolve_adapter(root, "../../etc", "haruhi")
    (good / "adapter_model.safetensors").unlink()
    (good / "adapter_model.bin").write_bytes(b"")
    with pytest.raises(CardError, match="pickle weights are refused"):
        resolve_adapter(root, "haruhi", "haruhi")


def test_api_key_sources_and_header_forms(tmp_path, monkeypatch):
    monkeypatch.delenv("RP_TEST_KEY", raising=False)
    with pytest.raises(AuthSetupError, match="no API key: set the environment variable RP_TEST_KEY"):
        load_api_key("RP_TEST_KEY", None)
    with pytest.raises(AuthSetupError, match="does not exist"):
        load_api_key("RP_TEST_KEY", str(tmp_path / "missing"))
    (tmp_path / "k").write_text("file-key-123\n")
    assert load_api_key("RP_TEST_KEY", str(tmp_path / "k")) == "file-key-123"
    monkeypatch.setenv("RP_TEST_KEY", "env-key-1234")
    assert load_api_key("RP_TEST_KEY", str(tmp_path / "k")) == "env-key-1234"  # the variable wins
    monkeypatch.setenv("RP_TEST_KEY", "short")
    with pytest.raises(AuthSetupError, match="at least 8"):
        load_api_key("RP_TEST_KEY", None)
    basic = base64.b64encode(b"me:s3cret-key").decode()
    assert presented_key("Bearer s3cret-key") == presented_key(f"Basic {basic}") == "s3cret-key"
    assert (
        presented_key(None)
        is presented_key("Bearer ")
        is presented_key("Basic !!!")
        is presented_key("s3cret-key")
        is None
    )
    assert key_matches("s3cret-key", "s3cret-key") and not key_matches("s3cret-kez", "s3cret-key")


def test_build_app_refuses_bad_configs_before_any_replica_starts(tiny_llama3, tmp_path, monkeypatch):
    """Config mistakes fail in the process that reads the config, with the reason (no Ray needed)."""
    root = tmp_path / "adapters"
    make_adapter(tiny_llama3, root / "a1")
    random_lora_adapter(tiny_llama3, root / "r32", rank=32)
    (tmp_path / "outside").mkdir()
    cards = tmp_path / "cards.yaml"
    cards.write_text("- {name: haruhi, display_name: H, system_prompt: S, adapter: missing}\n")
    base = {
        "model": {"path": str(tiny_llama3), "template": "llama3"},
        "adapter_root": str(root),
        "adapters": {"a1": "a1"},
    }
    monkeypatch.delenv("RP_RAY_API_KEY", raising=False)
    with pytest.raises(AuthSetupError, match="RP_RAY_API_KEY"):
        build_app(base)
    monkeypatch.setenv("RP_RAY_API_KEY", "a-key-for-tests")
    for change, err, match in [
        ({"adapters": {"x": "../outside"}}, CardError, "outside the adapter root"),
        ({"adapters": {"x": "/etc"}}, CardError, "outside the adapter root"),
        ({"adapters": {"base": "a1"}}, ConfigError, "base model's name"),
        ({"characters_file": str(cards)}, ConfigError, "adapter 'missing', which is not in adapters"),
        ({"model": {"path": str(tmp_path), "template": "llama3"}}, ValueError, "config.json"),
        ({"max_loras": 0}, ConfigError, "max_loras"),
        ({"adapters": {"a1": "a1", "r32": "r32"}, "max_lora_rank": 16}, CardError, "rank 32; .*max_lora_rank=16"),
        ({"base_name": "../x"}, ConfigError, "base_name"),
    ]:
        with pytest.raises(err, match=match):
            build_app(base | change)


def test_build_app_reads_imported_cards_lorebooks_and_scenes_and_sends_them_as_data(
    tiny_llama3, tmp_path, monkeypatch, caplog
):
    """Relative paths resolve where the config is read; the replicas get card JSON, lorebooks and corpora as data;
    a bad lorebook or corpus fails there, naming the file and the field; a stale card is left out with a warning."""
    CharacterCardError = CardError
    from rp_ray.character.card import CardRegistry
    from rp_ray.character.scenes import CharacterScenes, write_scene_corpus

    fixtures = Path(__file__).parent / "fixtures" / "cards"
    monkeypatch.setenv("RP_RAY_API_KEY", "a-key-for-tests")
    monkeypatch.chdir(tmp_path)
    make_adapter(tiny_llama3, tmp_path / "adapters" / "a1")
    CardRegistry("reg").import_file(fixtures / "v3_lorebook.json", name="aoi", adapter="a1")
    (tmp_path / "cards.yaml").write_text("- {name: haruhi, display_name: H, system_prompt: P, adapter: a1}\n")
    one = {"h": CharacterScenes(key="h", name="h", persona_hash="h", persona="P", scenes=["A:「x」"])}
    write_scene_corpus(one, "scenes")
    args = {
        "model": {"path": str(tiny_llama3), "template": "llama3"},
        "adapter_root": "adapters",
        "adapters": {"a1": "a1"},
        "characters_file": "cards.yaml",
        "card_registry": "reg",
        "lorebooks": {"aoi": str(fixtures / "world_info.json")},
        "scenes": {"haruhi": "scenes/h.jsonl", "aoi": "scenes"},
    }
    # called as `serve run` / `serve deploy` call an application builder (one parameter, checked by Serve)
    app = call_user_app_builder_with_args_if_necessary(build_app, args)
    conf, _, personas = app._bound_deployment.init_args  # (config, adapter dirs, characters)
    cards = personas["characters"]
    assert conf["card_registry"] == str(tmp_path / "reg") and conf["scenes"]["haruhi"] == str(
        tmp_path / "scenes/h.jsonl"
    )
    assert set(cards) == {"haruhi"} and set(personas["cards"]) == {"aoi"}
    assert personas["cards"]["aoi"]["data"]["extensions"]["rp_ray"] == {"adapter": "a1"}
    assert [e["content"] for e in personas["lorebooks"]["aoi"]["entries"]][0] == "The tavern is the Salty Gull."
    assert personas["scenes"] == {n: {"key": "h", "persona": "P", "scenes": ["A:「x」"]} for n in ("haruhi", "aoi")}
    for change, err, match in [
        ({"card_registry": "nowhere"}, ConfigError, "nowhere: no such folder"),
        ({"lorebooks": {"haruhi": "x.json"}}, ConfigError, "lorebooks.haruhi: no imported card named 'haruhi'"),
        ({"lorebooks": {"aoi": "x.json"}}, CharacterCardError, "x.json: no such file"),
        ({"scenes": {"nobody": "scenes"}}, ConfigError, "scenes.nobody: no character named 'nobody'"),
    ]:
        with pytest.raises(err, match=match):
            build_app(args | change)

    def served_cards(**change) -> set[str]:
        return set(build_app(args | change)._bound_deployment.init_args[2]["cards"])

    assert served_cards(adapters={}, characters_file=None, scenes={}) == set()
    assert "field data.extensions.rp_ray.adapter: 'a1'" in caplog.text
    CardRegistry("reg").import_file(fixtures / "v2_card.json", name="a1")
    assert served_cards() == {"aoi"}
    assert re.search(r"reg/a1.json is not served: .*the card's name 'a1' .* is taken by a served adapter", caplog.text)
