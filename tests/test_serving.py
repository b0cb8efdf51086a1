"""The chat logic without Ray or an engine: request -> sampling (request, card, defaults), request -> prompt and
limits, engine deltas -> OpenAI responses and stream chunks (their exact JSON), and the config validators."""

from __future__ import annotations

import asyncio
import json

import pytest

from rp_ray.config import ConfigError, ServeConfig
from rp_ray.data import Message
from rp_ray.serve.characters import CardSampling, CharacterCard, check_cards
from rp_ray.serve.protocol import (
    APIError,
    ChatCompletionChunk,
    ChatSampling,
    Delta,
    DeltaMessage,
    Limits,
    Usage,
    parse_request,
)
from rp_ray.serve.serving import DONE, ChatServing, split_system
from rp_ray.template import LLAMA3, chat_prompt_ids

USER = [{"role": "user", "content": "阿虚:「早」"}]
STOP_IDS = [7, 9]


def req(**kw):
    return parse_request({"model": "haruhi", "messages": USER, **kw})


# -- sampling ------------------------------------------------------------------------------------------------


def test_to_sampling_takes_the_request_then_the_card_then_openai_defaults():
    card = CardSampling(temperature=0.7, top_p=0.9, max_tokens=128)
    s = req().to_sampling(card, max_tokens=512, stop_token_ids=STOP_IDS)
    assert (s.temperature, s.top_p, s.top_k) == (0.7, 0.9, -1)  # card, card, default
    assert s.max_tokens == 128  # the card's max_tokens lowers the cap when the request names none
    s = req(temperature=0.0, top_k=5, max_tokens=300).to_sampling(card, 512, STOP_IDS)
    assert (s.temperature, s.top_p, s.top_k, s.max_tokens) == (0.0, 0.9, 5, 512)  # the request's own max_tokens
    s = req(max_completion_tokens=20).to_sampling(card, 20, STOP_IDS)
    assert s.max_tokens == 20
    s = req().to_sampling(None, 512, STOP_IDS)
    assert (s.temperature, s.top_p, s.top_k, s.max_tokens) == (1.0, 1.0, -1, 512)
    s = req().to_sampling(CardSampling(max_tokens=1024), 512, STOP_IDS)
    assert s.max_tokens == 512  # a card never raises the cap


def test_to_sampling_carries_the_rest_of_the_request():
    s = req(n=2, seed=3, stop="」", presence_penalty=0.5, frequency_penalty=-0.5, stream=True).to_sampling(
        None, 64, STOP_IDS
    )
    assert s == ChatSampling(
        n=2,
        temperature=1.0,
        top_p=1.0,
        top_k=-1,
        max_tokens=64,
        seed=3,
        stop=["」"],
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        stop_token_ids=STOP_IDS,
        stream=True,
    )
    assert req(stop=["a", "b"]).to_sampling(None, 8, []).stop == ["a", "b"]
    assert req(stop=[]).to_sampling(None, 8, []).stop is None
    with pytest.raises(Exception):  # noqa: B017 -- frozen: what crosses the handle is not changed on the way
        s.n = 3


def test_sampling_becomes_vllm_sampling_params():
    from vllm.sampling_params import RequestOutputKind

    s = req(seed=1, stop="x", stream=True).to_sampling(CardSampling(temperature=0.7), 16, STOP_IDS)
    p = s.to_sampling_params()
    assert (p.temperature, p.top_p, p.top_k, p.max_tokens, p.seed) == (0.7, 1.0, -1, 16, 1)
    assert p.stop == ["x"] and p.stop_token_ids == STOP_IDS and not p.skip_special_tokens
    assert p.output_kind == RequestOutputKind.DELTA
    assert req().to_sampling(None, 16, []).to_sampling_params().output_kind == RequestOutputKind.FINAL_ONLY


# -- limits and validators -----------------------------------------------------------------------------------


def test_limits_come_from_the_serve_config():
    cfg = ServeConfig(model={"path": "m", "template": "llama3"}, max_messages=3, max_tokens_cap=100, max_n=2)
    assert Limits.from_config(cfg) == Limits(
        max_messages=3, max_tokens_cap=100, max_n=2, max_body_bytes=cfg.max_body_bytes
    )
    default = ServeConfig(model={"path": "m", "template": "llama3"})
    assert Limits.from_config(default).model_dump() == {
        name: ServeConfig.model_fields[name].default for name in Limits.model_fields
    }


def test_adapter_names_may_not_be_the_base_name():
    with pytest.raises(ValueError, match="adapter 'base' has the base model's name"):
        ServeConfig(model={"path": "m", "template": "llama3"}, adapters={"base": "x"})
    with pytest.raises(ValueError, match="adapter 'chat' has the base model's name"):
        ServeConfig(model={"path": "m", "template": "llama3"}, base_name="chat", adapters={"chat": "x"})
    ServeConfig(model={"path": "m", "template": "llama3"}, base_name="chat", adapters={"base": "x"})


def card(name: str, adapter: str | None = None) -> CharacterCard:
    return CharacterCard(name=name, display_name=name, system_prompt="S", adapter=adapter)


def test_check_cards_messages():
    check_cards(
        {"haruhi": card("haruhi", "a1"), "plain": card("plain")}, served_adapters={"a1": "/x"}, reserved={"base"}
    )
    for cards, match in [
        ({"base": card("base")}, "character 'base' has the name of the base model or an adapter"),
        ({"a1": card("a1")}, "character 'a1' has the name of the base model or an adapter"),
        ({"h": card("h", "a2")}, r"character 'h' speaks through adapter 'a2', which is not in adapters: \['a1'\]"),
    ]:
        with pytest.raises(ConfigError, match=match):
            check_cards(cards, served_adapters={"a1": "/x"}, reserved={"base"})


# -- responses -----------------------------------------------------------------------------------------------


def test_chunks_have_openais_exact_json():
    first = ChatCompletionChunk.of("c1", "m", 0, DeltaMessage(role="assistant", content=""))
    role = json.loads(first.model_dump_json())
    created = role.pop("created")
    assert isinstance(created, int)
    assert role == {
        "id": "c1",
        "object": "chat.completion.chunk",
        "model": "m",
        "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}],
    }
    text = ChatCompletionChunk.of("c1", "m", 1, DeltaMessage(content="「哼」")).sse()
    assert text.startswith("data: {") and text.endswith("}\n\n") and "「哼」" in text  # UTF-8, not \u escapes
    body = json.loads(text[len("data: ") :])
    assert body["choices"] == [{"index": 1, "delta": {"content": "「哼」"}, "finish_reason": None}]
    assert "usage" not in body
    end = json.loads(ChatCompletionChunk.of("c1", "m", 0, DeltaMessage(), "stop").model_dump_json())
    assert end["choices"] == [{"index": 0, "delta": {}, "finish_reason": "stop"}]
    usage = json.loads(ChatCompletionChunk(id="c1", model="m", choices=[], usage=Usage.of(5, 2)).model_dump_json())
    assert usage["choices"] == [] and usage["usage"] == {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}


@pytest.fixture(scope="module")
def serving(tiny_llama3):
    cfg = ServeConfig(
        model={"path": str(tiny_llama3), "template": "llama3"},
        adapters={"a1": "a1"},
        max_model_len=256,
        max_tokens_cap=64,
    )
    cards = {
        "haruhi": CharacterCard(
            name="haruhi",
            display_name="H",
            system_prompt="你是凉宫春日。",
            adapter="a1",
            sampling=CardSampling(temperature=0.7, max_tokens=32),
        )
    }
    return ChatServing(cfg, cards)


def test_prepare_builds_the_prompt_adapter_and_sampling(serving):
    chat = serving.prepare(req())
    want = chat_prompt_ids(serving.tok, LLAMA3, "你是凉宫春日。", [Message("user", USER[0]["content"])])
    assert chat.prompt == want and chat.adapter == "a1"
    assert chat.sampling.temperature == 0.7 and chat.sampling.max_tokens == 32
    assert chat.sampling.stop_token_ids == serving.stop_ids and serving.stop_ids
    own = serving.prepare(req(messages=[{"role": "system", "content": ""}, *USER]))
    assert own.prompt == chat_prompt_ids(serving.tok, LLAMA3, "", [Message("user", USER[0]["content"])])
    base = serving.prepare(parse_request({"model": "base", "messages": USER}))
    assert base.adapter is None and base.sampling.max_tokens == 64 and base.sampling.temperature == 1.0
    assert serving.prepare(parse_request({"model": "a1", "messages": USER})).adapter == "a1"
    for body, status, param in [
        ({"model": "nobody", "messages": USER}, 404, "model"),
        ({"model": "base", "messages": [*USER, {"role": "system", "content": "x"}, *USER]}, 400, "messages"),
        ({"model": "base", "messages": USER, "max_tokens": 65}, 400, "max_tokens"),
        ({"model": "base", "messages": [{"role": "user", "content": "你好" * 400}]}, 400, "messages"),
    ]:
        with pytest.raises(APIError) as e:
            serving.prepare(parse_request(body))
        assert (e.value.status, e.value.param) == (status, param)
    assert split_system(req().messages) == ("", req().messages)


async def _deltas(*batches):
    for batch in batches:
        for d in batch:
            yield d


RAW = [
    [Delta(0, "「你", 1), Delta(1, "好", 1)],
    [Delta(0, "好」 ", 2)],
    [Delta(0, "<|eot_id|>", 1, "stop"), Delta(1, "」<|eot_id|>", 2, "length")],
]


def test_stream_and_response_agree(serving):
    r = req(n=2, stream=True, stream_options={"include_usage": True})
    chat = serving.prepare(r)
    cancelled = []

    async def run():
        return [
            e async for e in serving.stream(_deltas(*RAW), "c1", r, chat, float("inf"), lambda: cancelled.append(1))
        ]

    events = asyncio.run(run())
    assert events[-1] == DONE and not cancelled
    bodies = [json.loads(e[len("data: ") :]) for e in events[:-1]]
    texts = {0: "", 1: ""}
    finishes = {}
    for b in bodies[:-1]:
        (c,) = b["choices"]
        texts[c["index"]] += c["delta"].get("content", "")
        if c["finish_reason"]:
            finishes[c["index"]] = c["finish_reason"]
    assert texts == {0: "「你好」", 1: "好」"} and finishes == {0: "stop", 1: "length"}
    assert bodies[-1]["usage"] == {
        "prompt_tokens": len(chat.prompt),
        "completion_tokens": 7,
        "total_tokens": len(chat.prompt) + 7,
    }
    replies = asyncio.run(serving.collect(_deltas(*RAW), 2))
    body = json.loads(serving.response("c1", req(n=2), chat, replies).model_dump_json())
    assert [c["message"]["content"] for c in body["choices"]] == [texts[0], texts[1]]
    assert body["choices"][0] == {
        "index": 0,
        "message": {"role": "assistant", "content": "「你好」"},
        "finish_reason": "stop",
    }
    assert body["usage"]["completion_tokens"] == 7 and body["object"] == "chat.completion" and body["id"] == "c1"


def test_stream_past_the_deadline_cancels_and_reports_a_timeout(serving):
    r = req(stream=True)
    cancelled = []

    async def run():
        return [
            e
            async for e in serving.stream(_deltas(*RAW), "c1", r, serving.prepare(r), 0.0, lambda: cancelled.append(1))
        ]

    events = asyncio.run(run())
    assert cancelled == [1] and events[-1] == DONE
    assert json.loads(events[-2][len("data: ") :])["error"]["code"] == "timeout"
