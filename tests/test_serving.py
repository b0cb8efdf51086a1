"""The chat logic without Ray or an engine: request -> sampling (request, card, defaults), request -> prompt and
limits, engine deltas -> OpenAI responses and stream chunks (their exact JSON), and the config validators."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest

from rp_ray.character.card import Card, card_from_dict
from rp_ray.character.card import Sampling as CardSampling
from rp_ray.character.catalog import entry_card, load_catalog
from rp_ray.character.prompt import card_turns, leading_system
from rp_ray.config import ConfigError, ServeConfig
from rp_ray.data import Message
from rp_ray.llm.template import LLAMA3, chat_prompt_ids
from rp_ray.serve.chat import ChatCompletionChunk, ChatServing, DeltaMessage, parse_request
from rp_ray.serve.completion import CompletionRequest
from rp_ray.serve.protocol import (
    APIError,
    Delta,
    DetokenizeRequest,
    Limits,
    SamplingDefaults,
    TokenizeRequest,
    TokenLogprob,
    Usage,
    parse_body,
    token_logprobs,
)
from rp_ray.serve.serving import DONE

USER = [{"role": "user", "content": "阿虚:「早」"}]
STOP_IDS = [7, 9]


def req(**kw):
    return parse_request({"model": "haruhi", "messages": USER, **kw})


# -- sampling ------------------------------------------------------------------------------------------------


def test_to_sampling_takes_the_request_then_the_card_then_openai_defaults():
    card = CardSampling(temperature=0.7, top_p=0.9, max_tokens=128)
    s = req().to_sampling_params(SamplingDefaults(512, STOP_IDS, card))
    assert (s.temperature, s.top_p, s.top_k) == (0.7, 0.9, -1)  # card, card, default
    assert s.max_tokens == 128  # the card's max_tokens lowers the cap when the request names none
    s = req(temperature=0.0, top_k=5, max_tokens=300).to_sampling_params(SamplingDefaults(512, STOP_IDS, card))
    assert (s.temperature, s.max_tokens) == (0.0, 512)  # the request's own max_tokens; greedy: vLLM drops top_p/k
    s = req(temperature=0.5, top_k=5, max_tokens=300).to_sampling_params(SamplingDefaults(512, STOP_IDS, card))
    assert (s.temperature, s.top_p, s.top_k, s.max_tokens) == (0.5, 0.9, 5, 512)
    s = req(max_completion_tokens=20).to_sampling_params(SamplingDefaults(20, STOP_IDS, card))
    assert s.max_tokens == 20
    s = req().to_sampling_params(SamplingDefaults(512, STOP_IDS, None))
    assert (s.temperature, s.top_p, s.top_k, s.max_tokens) == (1.0, 1.0, -1, 512)
    s = req().to_sampling_params(SamplingDefaults(512, STOP_IDS, CardSampling(max_tokens=1024)))
    assert s.max_tokens == 512  # a card never raises the cap


def test_to_sampling_carries_the_rest_of_the_request():
    from vllm.sampling_params import RequestOutputKind

    r = req(n=2, seed=3, stop="」", presence_penalty=0.5, frequency_penalty=-0.5, stream=True)
    s = r.to_sampling_params(SamplingDefaults(64, STOP_IDS, None))
    fields = ("n", "temperature", "top_p", "top_k", "max_tokens", "seed", "stop", "presence_penalty")
    assert [getattr(s, f) for f in fields] == [2, 1.0, 1.0, -1, 64, 3, ["」"], 0.5]
    assert (s.frequency_penalty, s.stop_token_ids, s.output_kind) == (-0.5, STOP_IDS, RequestOutputKind.DELTA)
    assert req(stop=["a", "b"]).to_sampling_params(SamplingDefaults(8, [], None)).stop == ["a", "b"]
    assert not req(stop=[]).to_sampling_params(SamplingDefaults(8, [], None)).stop


def test_sampling_becomes_vllm_sampling_params():
    from vllm.sampling_params import RequestOutputKind

    p = req(seed=1, stop="x", stream=True).to_sampling_params(
        SamplingDefaults(16, STOP_IDS, CardSampling(temperature=0.7))
    )
    assert (p.temperature, p.top_p, p.top_k, p.max_tokens, p.seed) == (0.7, 1.0, -1, 16, 1)
    assert p.stop == ["x"] and p.stop_token_ids == STOP_IDS and not p.skip_special_tokens
    assert p.output_kind == RequestOutputKind.DELTA
    assert req().to_sampling_params(SamplingDefaults(16, [], None)).output_kind == RequestOutputKind.FINAL_ONLY


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


def card(name: str, adapter: str | None = None, **entry):
    return entry_card({"name": name, "display_name": name, "system_prompt": "S", "adapter": adapter, **entry}, name)


def check_cards(cards, served_adapters, reserved):
    (base,) = reserved
    load_catalog(
        ServeConfig(model={"path": "m", "template": "llama3"}, base_name=base, adapters=served_adapters), cards
    )


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
        "haruhi": entry_card(
            {
                "name": "haruhi",
                "display_name": "H",
                "system_prompt": "你是凉宫春日。",
                "adapter": "a1",
                "sampling": {"temperature": 0.7, "max_tokens": 32},
            },
            "haruhi",
        )
    }
    return ChatServing(cfg, load_catalog(cfg, cards))


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
        (
            {"model": "base", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            400,
            "messages.0.content",
        ),
        ({"model": "base", "messages": USER, "max_tokens": 65}, 400, "max_tokens"),
        ({"model": "base", "messages": [{"role": "user", "content": "你好" * 400}]}, 400, "messages"),
    ]:
        with pytest.raises(APIError) as e:
            serving.prepare(parse_request(body))
        assert (e.value.status, e.value.param) == (status, param)


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


# -- SillyTavern's surface: leading system messages, text completions, tokenize, logprobs ----------------------


def test_leading_system_messages_are_one_system_prompt(serving):
    msgs = parse_request(
        {
            "model": "base",
            "messages": [
                {"role": "system", "content": "你是凉宫春日。"},
                {"role": "system", "content": ""},
                {"role": "system", "content": "[Start a new chat]", "name": "example_user"},
                {"role": "assistant", "content": "「你好！」"},
                *USER,
            ],
        }
    ).messages
    _, system, turns = leading_system(msgs)
    assert system == "你是凉宫春日。\n\n[Start a new chat]" and [m.role for m in turns] == ["assistant", "user"]
    chat = serving.prepare(parse_request({"model": "haruhi", "messages": msgs}))
    want = [Message("assistant", "「你好！」"), Message("user", USER[0]["content"])]
    assert chat.prompt == chat_prompt_ids(serving.tok, LLAMA3, system, want)  # the request's system wins the card's


def note_card(note: dict | None, post: str = "Stay {{char}}.") -> Card:
    ext = {"depth_prompt": note} if note is not None else {}
    data = {"name": "Aoi", "post_history_instructions": post, "extensions": ext}
    return card_from_dict({"spec": "chara_card_v2", "spec_version": "2.0", "data": data}, "test card")


def test_characters_note_and_post_history_land_where_sillytavern_puts_them():
    """The Character's Note (``extensions.depth_prompt``) ``depth`` messages from the end of the history, in its
    role; the post-history instructions after the history, as a system message."""
    turns = [Message("user", "u0"), Message("assistant", "a0"), Message("user", "u1")]
    note = {"prompt": "[{{char}} is tired]", "depth": 2, "role": "system"}
    assert card_turns(note_card(note), turns) == [
        turns[0],
        Message("system", "[Aoi is tired]"),
        *turns[1:],
        Message("system", "Stay Aoi."),
    ]
    at_end = card_turns(note_card(note | {"depth": 0, "role": "user"}, post=""), turns)
    assert at_end == [*turns, Message("user", "[Aoi is tired]")]
    assert card_turns(note_card(note | {"depth": 99}, post=""), turns)[0] == Message("system", "[Aoi is tired]")
    # as SillyTavern reads a malformed note: depth 4 (here: before everything), role system
    odd = card_turns(note_card(note | {"depth": "x", "role": "narrator"}, post=""), turns)
    assert odd[0] == Message("system", "[Aoi is tired]")
    assert card_turns(note_card({"prompt": " "}, post=""), turns) == turns


def completion(**kw):
    return parse_body({"model": "base", "prompt": "阿虚:「早」", **kw}, CompletionRequest)


def test_completion_prompt_is_the_raw_text_with_one_bos(serving):
    tok, bos = serving.tok, serving.tok.bos_token_id
    raw = tok.encode("阿虚:「早」", add_special_tokens=False)
    chat = serving.prepare_completion(completion())
    assert chat.prompt == [bos, *raw] and chat.adapter is None
    assert serving.prepare_completion(completion(prompt=["<|begin_of_text|>阿虚:「早」"])).prompt == [bos, *raw]
    assert serving.prepare_completion(completion(prompt=[5, 6, 7])).prompt == [5, 6, 7]  # ids go as they are
    s = chat.sampling
    assert s.max_tokens == 16 and s.temperature == 1.0 and s.skip_special_tokens and s.stop_token_ids
    p = s  # already vLLM SamplingParams
    assert p.skip_special_tokens and p.logprobs is None and p.logit_bias is None
    # a card lends its adapter and sampling, never its system prompt; its max_tokens is the default
    carded = serving.prepare_completion(completion(model="haruhi"))
    assert carded.prompt == chat.prompt and carded.adapter == "a1"
    assert carded.sampling.temperature == 0.7 and carded.sampling.max_tokens == 32
    assert serving.prepare_completion(completion(model="haruhi", max_tokens=40)).sampling.max_tokens == 40
    assert serving.prepare_completion(completion(ignore_eos=True)).sampling.stop_token_ids == []


def test_completion_sampling_carries_sillytaverns_fields(serving):
    s = serving.prepare_completion(
        completion(
            max_tokens=20,
            temperature=0.5,
            min_p=0.1,
            repetition_penalty=1.2,
            top_k=0,
            logit_bias={"5": -100, "6": 2.5},
            logprobs=5,
            stop=["\nUser:", "", "<|eot_id|>"],
            seed=3,
            n=2,
            best_of=2,
            min_tokens=2,
            skip_special_tokens=False,
            include_stop_str_in_output=True,
            # sent by SillyTavern, no effect here
            typical_p=1,
            dynatemp_low=0.5,
            length_penalty=1,
            early_stopping=False,
            truncate_prompt_tokens=None,
        )
    ).sampling
    assert (s.min_p, s.repetition_penalty, s.top_k, s.logprobs, s.n, s.seed) == (0.1, 1.2, 0, 5, 2, 3)
    assert s.logit_bias == {5: -100.0, 6: 2.5} and s.stop == ["\nUser:", "<|eot_id|>"]
    p = s  # already vLLM SamplingParams
    assert (p.min_p, p.repetition_penalty, p.logprobs, p.min_tokens) == (0.1, 1.2, 5, 2)
    assert p.logit_bias == {5: -100.0, 6: 2.5} and not p.skip_special_tokens and p.include_stop_str_in_output
    chat = serving.prepare(req(logprobs=True, top_logprobs=3, logit_bias={"9": 1}, min_p=0.2))
    assert chat.sampling.logprobs == 3 and chat.sampling.logit_bias == {9: 1.0} and chat.sampling.min_p == 0.2
    assert serving.prepare(req(logprobs=True)).sampling.logprobs == 0
    assert not chat.sampling.skip_special_tokens  # chat replies are cleaned by the ingress


@pytest.mark.parametrize(
    "body, status, param",
    [
        ({"prompt": [4096]}, 400, "prompt"),
        ({"prompt": [1, 2, 99999]}, 400, "prompt"),
        ({"logit_bias": {"4096": 1}}, 400, "logit_bias"),
        ({"echo": True}, 400, "echo"),
        ({"suffix": "」"}, 400, "suffix"),
        ({"best_of": 3}, 400, "best_of"),
        ({"min_tokens": 10, "max_tokens": 5}, 400, "min_tokens"),
        ({"max_tokens": 65}, 400, "max_tokens"),
        ({"n": 9}, 400, "n"),
        ({"prompt": "你好" * 400}, 400, "prompt"),
        ({"model": "nobody"}, 404, "model"),
    ],
)
def test_bad_completions(serving, body, status, param):
    with pytest.raises(APIError) as e:
        serving.prepare_completion(completion(**body))
    assert (e.value.status, e.value.param) == (status, param)


def test_chat_checks_the_new_fields(serving):
    for body, param in [
        ({"logit_bias": {"4096": 1}}, "logit_bias"),
        ({"top_logprobs": 2}, "top_logprobs"),
    ]:
        with pytest.raises(APIError) as e:
            serving.prepare(req(**body))
        assert (e.value.status, e.value.param) == (400, param)


def test_tokenize_counts_what_the_completions_send(serving):
    t = serving.tokenize(TokenizeRequest(model="base", prompt="阿虚:「早」"))
    assert t.tokens == serving.prepare_completion(completion()).prompt and t.count == len(t.tokens)
    assert t.max_model_len == 256 and t.token_strs is None
    raw = serving.tokenize(TokenizeRequest(model="base", prompt="阿虚:「早」", add_special_tokens=False))
    assert raw.tokens == t.tokens[1:]
    m = serving.tokenize(TokenizeRequest(model="haruhi", messages=USER, return_token_strs=True))
    assert m.tokens == serving.prepare(req()).prompt  # the card's system prompt applied, as chat applies it
    assert m.token_strs == serving.tok.convert_ids_to_tokens(m.tokens)
    d = serving.detokenize(DetokenizeRequest(model="base", tokens=t.tokens))
    assert d.prompt == "<|begin_of_text|>阿虚:「早」"
    for call, body, status, param in [
        (serving.tokenize, TokenizeRequest(model="nobody", prompt="x"), 404, "model"),
        (serving.tokenize, TokenizeRequest(model="base"), 400, "prompt"),
        (serving.tokenize, TokenizeRequest(model="base", prompt="x", messages=USER), 400, "prompt"),
        (serving.detokenize, DetokenizeRequest(model="base", tokens=[1, 4096]), 400, "tokens"),
        (serving.detokenize, DetokenizeRequest(model="nobody", tokens=[1]), 404, "model"),
    ]:
        with pytest.raises(APIError) as e:
            call(body)
        assert (e.value.status, e.value.param) == (status, param)
    # the message-count limit names its param (the error type stays the OpenAI one)
    too_many = [{"role": "user", "content": "x"}] * (serving.limits.max_messages + 1)
    with pytest.raises(APIError) as e:
        serving.tokenize(TokenizeRequest(model="base", messages=too_many))
    assert e.value.body()["error"]["type"] == "invalid_request_error" and e.value.body()["error"]["param"] == "messages"


@dataclass
class FakeLogprob:  # vLLM's Logprob: logprob, rank, decoded_token
    logprob: float
    rank: int | None
    decoded_token: str | None


def test_token_logprobs_keep_the_top_alternatives_by_rank():
    positions = [
        {7: FakeLogprob(-0.1, 1, "「"), 9: FakeLogprob(-2.5, 2, "你")},
        {3: FakeLogprob(-float("inf"), 40, "x"), 5: FakeLogprob(-0.2, 1, "好"), 6: FakeLogprob(-1.0, 2, "嗯")},
    ]
    lps = token_logprobs([7, 3], positions, top=2)
    assert lps[0] == TokenLogprob(7, "「", -0.1, ((7, "「", -0.1), (9, "你", -2.5)))
    assert lps[1] == TokenLogprob(3, "x", -9999.0, ((5, "好", -0.2), (6, "嗯", -1.0)))  # -inf floored, as OpenAI
    assert token_logprobs([7], positions[:1], top=0)[0].top == ()


def test_logprobs_in_openais_shapes(serving):
    tok = serving.tok
    ids = tok.encode("你好 world", add_special_tokens=False)
    lps = [TokenLogprob(i, tok.decode([i]), -0.5, ((i, tok.decode([i]), -0.5),)) for i in ids]
    content = json.loads(serving.chat_logprobs(lps).model_dump_json())["content"]
    assert [c["token"] for c in content] == [tok.decode([i]) for i in ids]
    assert bytes(b for c in content for b in c["bytes"]).decode() == "你好 world"  # a token's own bytes
    assert content[0]["top_logprobs"] == [{"token": content[0]["token"], "logprob": -0.5, "bytes": content[0]["bytes"]}]
    legacy, end = serving.completion_logprobs(
        [TokenLogprob(1, "ab", -1.0, ((2, "c", -0.5),)), TokenLogprob(3, "d", -2.0)], 5
    )
    assert legacy.model_dump() == {
        "tokens": ["ab", "d"],
        "token_logprobs": [-1.0, -2.0],
        "top_logprobs": [{"c": -0.5, "ab": -1.0}, {"d": -2.0}],  # the sampled token always among them
        "text_offset": [5, 7],
    }
    assert end == 8


def _lp(text):
    return (TokenLogprob(1, text, -0.25, ((1, text, -0.25),)),)


LP_RAW = [
    [Delta(0, "「你", 1, logprobs=_lp("「你"))],
    [Delta(0, "好」 ", 2, logprobs=_lp("好」 ") * 2)],
    [Delta(0, "<|eot_id|>", 1, "stop", logprobs=_lp("<|eot_id|>"))],
]


def test_chat_stream_and_response_carry_the_logprobs(serving):
    r = req(stream=True, logprobs=True, top_logprobs=1)
    chat = serving.prepare(r)

    async def run():
        return [e async for e in serving.stream(_deltas(*LP_RAW), "c1", r, chat, float("inf"), lambda: None)]

    bodies = [json.loads(e[len("data: ") :]) for e in asyncio.run(run())[:-1]]
    tokens = [t["token"] for b in bodies for c in b["choices"] if c.get("logprobs") for t in c["logprobs"]["content"]]
    assert tokens == ["「你", "好」 ", "好」 ", "<|eot_id|>"]  # every generated token, the end token included
    text = "".join(c["delta"].get("content", "") for b in bodies for c in b["choices"])
    assert text == "「你好」"
    replies = asyncio.run(serving.collect(_deltas(*LP_RAW), 1))
    body = json.loads(serving.response("c1", req(logprobs=True), chat, replies).model_dump_json())
    assert [t["token"] for t in body["choices"][0]["logprobs"]["content"]] == tokens
    assert body["choices"][0]["message"]["content"] == text
    plain = json.loads(serving.response("c1", req(), chat, replies).model_dump_json())
    assert "logprobs" not in plain["choices"][0]


TEXT_RAW = [
    [Delta(0, " 你", 1, logprobs=_lp(" 你")), Delta(1, "x", 1, logprobs=_lp("x"))],
    [Delta(0, "好", 1, "stop", logprobs=_lp("好")), Delta(1, "", 1, "length", logprobs=_lp("<|eot_id|>"))],
]


def test_completion_stream_and_response_agree(serving):
    r = completion(stream=True, n=2, logprobs=1, stream_options={"include_usage": True})
    prepared = serving.prepare_completion(r)

    async def run():
        return [
            e async for e in serving.completion_stream(_deltas(*TEXT_RAW), "c2", r, prepared, float("inf"), lambda: 0)
        ]

    events = asyncio.run(run())
    assert events[-1] == DONE
    bodies = [json.loads(e[len("data: ") :]) for e in events[:-1]]
    assert all(b["object"] == "text_completion" and b["id"] == "c2" for b in bodies)
    texts, offsets, finishes = {0: "", 1: ""}, {0: [], 1: []}, {}
    for b in bodies[:-1]:
        (c,) = b["choices"]
        texts[c["index"]] += c["text"]
        offsets[c["index"]] += c["logprobs"]["text_offset"]
        if c["finish_reason"]:
            finishes[c["index"]] = c["finish_reason"]
    assert texts == {0: " 你好", 1: "x"} and finishes == {0: "stop", 1: "length"}
    assert offsets == {0: [0, 2], 1: [0, 1]}  # offsets run on across the events
    assert bodies[-1]["choices"] == [] and bodies[-1]["usage"]["completion_tokens"] == 4
    choices = asyncio.run(serving.collect_text(_deltas(*TEXT_RAW), 2))
    body = json.loads(
        serving.completion_response("c2", completion(n=2, logprobs=1), prepared, choices).model_dump_json()
    )
    assert [c["text"] for c in body["choices"]] == [" 你好", "x"]
    assert body["choices"][0]["logprobs"]["tokens"] == [" 你", "好"] and body["object"] == "text_completion"
    assert body["usage"] == {
        "prompt_tokens": len(prepared.prompt),
        "completion_tokens": 4,
        "total_tokens": len(prepared.prompt) + 4,
    }
    plain = json.loads(serving.completion_response("c2", completion(n=2), prepared, choices).model_dump_json())
    assert plain["choices"][1] == {"index": 1, "text": "x", "logprobs": None, "finish_reason": "length"}


# -- imported character cards: lorebooks, scene memory, rp_debug, the registry ---------------------------------

FIXTURES = Path(__file__).parent / "fixtures" / "cards"
AOI = "Aoi Kurosawa"
# a scripted chat with the V3 lorebook card (its book: budget 40 tokens, scan depth 2, recursive) and the
# SillyTavern world info configured beside it (no budget set: 2048; scan depth 2)
TURNS = [
    "Hello there.",
    "Hey.",
    "Meet me at the tavern, then we go to the Ark.",
    "Sure thing.",
    "A ship? In this storm? Let me eat ramen first.",
]


def chat_of(n_user_turns: int) -> list[dict]:
    turns = TURNS[: 2 * n_user_turns - 1]
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]


@pytest.fixture(scope="module")
def carded(tiny_llama3, tmp_path_factory):
    """A ChatServing with the card registry (the V3 lorebook card as `aoi`, bound to a1 with its own sampling),
    the world info as aoi's standalone lorebook, and scene memory for the characters_file character `haruhi`."""
    from rp_ray.character.card import CardRegistry
    from rp_ray.character.scenes import CharacterScenes, write_scene_corpus

    work = tmp_path_factory.mktemp("carded")
    CardRegistry(work / "cards").import_file(
        FIXTURES / "v3_lorebook.json", name="aoi", adapter="a1", sampling={"temperature": 0.8, "max_tokens": 24}
    )
    scenes = ["长门:「这本书很厚。」\n朝比奈:「我来泡茶。」", "古泉:「超能力者的工作很辛苦。」"]
    persona = "你是凉宫春日。"
    write_scene_corpus(
        {"h": CharacterScenes(key="春日-00000000", name="春日", persona_hash="h", persona=persona, scenes=scenes)},
        work / "scenes",
    )
    cfg = ServeConfig(
        model={"path": str(tiny_llama3), "template": "llama3"},
        adapters={"a1": "a1", "a2": "a2"},
        max_model_len=1024,
        max_tokens_cap=64,
        card_registry=str(work / "cards"),
        lorebooks={"aoi": str(FIXTURES / "world_info.json")},
        scenes={"haruhi": str(work / "scenes" / "春日-00000000.jsonl")},
    )
    yaml_cards = {
        "haruhi": entry_card({"name": "haruhi", "display_name": "H", "system_prompt": persona, "adapter": "a1"}, "h")
    }
    data = load_catalog(cfg, yaml_cards)
    assert set(data["cards"]) == {"aoi"} and data["scenes"]["haruhi"]["scenes"] == scenes
    return SimpleNamespace(serving=ChatServing(cfg, data), cfg=cfg, yaml=yaml_cards, data=data)


def aoi_system(lore_before: list[str], lore_after: list[str], user: str = "User") -> str:
    char = AOI
    parts = [
        f"Write {char}'s next reply in a fictional chat between {char} and {user}. Stay in character, keep the reply "
        f"short and in the language of the chat.\nNever speak for {user}.",  # {{original}} = the default
        *lore_before,
        f"{char} is a courier in rain-soaked Neo-Kyoto who takes odd jobs from {user}.",
        f"{char}'s personality: curious, blunt, secretly kind",
        f"Scenario: {user} hires {char} to carry a sealed box across the city.",
        *lore_after,
        f"[Example Chat]\n{user}: Where are you headed?\n{char}: Wherever the rain isn't.",
        f"[Example Chat]\n{user}: Are you fast?\n{char}: Faster than the trains.",
    ]
    return "\n\n".join(parts)


def test_a_v3_card_prompt_in_sillytaverns_order(carded):
    """System prompt ({{original}}), lore before_char, description, personality, scenario, lore after_char,
    examples; then the history (macros applied); post_history_instructions last, as a system message after the
    history; creator_notes nowhere."""
    s = carded.serving
    history = [*chat_of(2), {"role": "assistant", "content": "Fine, {{user}}."}, chat_of(3)[-1]]
    chat = s.prepare(parse_request({"model": "aoi", "messages": history, "rp_debug": True}))
    system = aoi_system(
        ["The year is 2099; the city never dries.", "Fog rolls in every evening."],
        [f"{AOI} eats at the same noodle stall every night.", "A ship sank here in the storm of '98."],
    )
    turns = [Message(m["role"], m["content"]) for m in history[:-1]]
    turns[-1] = Message("assistant", "Fine, User.")
    turns += [Message("user", TURNS[4]), Message("system", f"Reply as {AOI} in under 60 words.")]
    assert chat.debug["system_prompt"] == system
    assert chat.prompt == chat_prompt_ids(s.tok, LLAMA3, system, turns)
    text = s.tok.decode(chat.prompt)
    assert "CREATOR-NOTE-SENTINEL" not in text and "DISABLED-SENTINEL" not in text and "{{" not in text
    assert text.index("2099") < text.index("courier") < text.index("noodle") < text.index("[Example Chat]")
    assert text.rindex(TURNS[4]) < text.rindex("Reply as")
    # the card's adapter and sampling; /tokenize counts exactly this prompt
    assert chat.adapter == "a1" and (chat.sampling.temperature, chat.sampling.max_tokens) == (0.8, 24)
    assert s.tokenize(TokenizeRequest(model="aoi", messages=history)).tokens == chat.prompt


def test_the_requests_own_system_messages_replace_the_card_prompt(carded):
    """As for characters_file characters: the card then lends only its adapter and sampling."""
    s = carded.serving
    msgs = [{"role": "system", "content": "You are Aoi."}, {"role": "system", "content": ""}, *chat_of(3)]
    chat = s.prepare(parse_request({"model": "aoi", "messages": msgs, "rp_debug": True}))
    want = [Message(m["role"], m["content"]) for m in chat_of(3)]
    assert chat.prompt == chat_prompt_ids(s.tok, LLAMA3, "You are Aoi.", want)
    assert chat.debug == {"lore": [], "scenes": [], "system_prompt": "You are Aoi."}
    assert chat.adapter == "a1" and chat.sampling.temperature == 0.8
    empty = s.prepare(parse_request({"model": "aoi", "messages": [{"role": "system", "content": ""}, *chat_of(1)]}))
    assert empty.prompt == chat_prompt_ids(s.tok, LLAMA3, "", [Message("user", TURNS[0])])


def test_a_scripted_lorebook_conversation_inserts_exactly_these_entries(carded, llama3_tok):
    """Turn by turn: the entries in the prompt, as (id, name), by insertion_order. The card's book has a budget of
    40 tiny-tokenizer tokens: its constant entry (17) + the Ark (21) fit; the Tower, reached by recursion from the
    Ark's text, does not (45); the world info (no budget set: 2048) adds its constant fog, the tavern, the wreck."""
    from rp_ray.character.card import read_card_file
    from rp_ray.character.lorebook import entry_text, load_lorebook_file

    s = carded.serving
    count = lambda t: len(llama3_tok.encode(t, add_special_tokens=False))
    book = read_card_file(FIXTURES / "v3_lorebook.json").book.entries
    world = load_lorebook_file(FIXTURES / "world_info.json").entries
    texts = {(e.id, e.name or e.comment): entry_text(e) for e in [*book, *world]}
    want = [
        [(1, "world"), (2, "always")],
        [(1, "world"), (3, "ark"), (2, "always"), (0, "tavern")],  # order 5, 10, 10 (the card's book first), 100
        [(1, "world"), (2, "always"), (6, "noodles"), (1, "wreck")],  # the ramen regex; "ship" + "storm" (selective)
    ]
    for n, expected in enumerate(want, 1):
        debug = s.prepare(parse_request({"model": "aoi", "messages": chat_of(n), "rp_debug": True})).debug
        assert [(e["id"], e["name"]) for e in debug["lore"]] == expected, n
        assert [e["tokens"] for e in debug["lore"]] == [count(texts[k]) for k in expected]
        assert sum(e["tokens"] for e in debug["lore"] if e["name"] in {"world", "ark", "noodles"}) <= 40
    ark = s.prepare(parse_request({"model": "aoi", "messages": chat_of(2), "rp_debug": True})).debug["lore"][1]
    assert ark == {"id": 3, "name": "ark", "keys": ["Ark"], "tokens": 21}
    assert (count(texts[1, "world"]), count(texts[4, "tower"])) == (17, 45)  # 17 + 21 + 45 > 40: no Tower


def test_scene_memory_for_a_characters_file_character(carded):
    """haruhi's system_prompt is the persona; the scenes retrieved for the last user message follow it in
    ChatHaruhi's layout; none shares a word with the message: the persona alone."""
    from rp_ray.character.scenes import join_system_prompt, split_system_prompt

    s = carded.serving
    chat = s.prepare(
        parse_request({"model": "haruhi", "messages": [{"role": "user", "content": "长门呢？"}], "rp_debug": True})
    )
    system = chat.debug["system_prompt"]
    persona, scenes = split_system_prompt(system)
    assert persona == "你是凉宫春日。" and scenes == ["长门:「这本书很厚。」\n朝比奈:「我来泡茶。」"]
    assert system == join_system_prompt(persona, scenes) and chat.debug["scenes"] == scenes
    assert chat.prompt == chat_prompt_ids(s.tok, LLAMA3, system, [Message("user", "长门呢？")])
    plain = s.prepare(parse_request({"model": "haruhi", "messages": USER, "rp_debug": True}))
    assert plain.debug == {"lore": [], "scenes": [], "system_prompt": "你是凉宫春日。"}


def test_rp_debug_rides_on_the_response_and_the_first_chunk_only(carded):
    s = carded.serving
    r = parse_request({"model": "aoi", "messages": chat_of(1), "rp_debug": True, "stream": True, "n": 2})
    chat = s.prepare(r)

    async def run(req, prepared):
        return [e async for e in s.stream(_deltas(*RAW), "c1", req, prepared, float("inf"), lambda: None)]

    bodies = [json.loads(e[len("data: ") :]) for e in asyncio.run(run(r, chat))[:-1]]
    assert bodies[0]["rp_ray"] == chat.debug and all("rp_ray" not in b for b in bodies[1:])
    assert [e["name"] for e in bodies[0]["rp_ray"]["lore"]] == ["world", "always"]
    replies = asyncio.run(s.collect(_deltas(*RAW), 2))
    body = json.loads(s.response("c1", r, chat, replies).model_dump_json())
    assert body["rp_ray"] == chat.debug and set(body["rp_ray"]) == {"lore", "scenes", "system_prompt"}
    plain_req = parse_request({"model": "aoi", "messages": chat_of(1), "stream": True})
    plain = s.prepare(plain_req)
    assert plain.debug is None and plain.prompt == chat.prompt
    assert not any("rp_ray" in e for e in asyncio.run(run(plain_req, plain)))
    assert "rp_ray" not in s.response("c1", plain_req, plain, replies).model_dump_json()


def test_models_list_card_characters_without_creator_notes(carded):
    models = carded.serving.models()
    entries = {m["id"]: m for m in models["data"]}
    assert list(entries) == ["base", "a1", "a2", "haruhi", "aoi"]
    aoi = entries["aoi"]
    assert aoi["kind"] == "character" and aoi["spec"] == "chara_card_v3" and aoi["adapter"] == "a1"
    assert aoi["display_name"] == "Aoi"  # the V3 nickname
    assert aoi["greeting"] == "Hey User. Rain's heavy tonight. Got a package for me?"
    assert aoi["alternate_greetings"] == [
        "Rainy night, User. Need a runner?",
        f"User, you're late. {AOI} doesn't wait.",
    ]
    assert "CREATOR-NOTE" not in json.dumps(models)
    assert set(entries["haruhi"]) >= {"display_name", "greeting", "system_prompt", "adapter"}  # as before


def test_completions_with_a_card_use_its_adapter_and_sampling_only(carded):
    s = carded.serving
    carded_ = s.prepare_completion(completion(model="aoi"))
    assert carded_.prompt == s.prepare_completion(completion()).prompt  # the raw prompt: no card text, no lore
    assert carded_.adapter == "a1" and carded_.sampling.temperature == 0.8 and carded_.sampling.max_tokens == 24


def test_personas_are_checked_where_the_config_is_read(carded, tmp_path, caplog):
    import logging
    import re

    from rp_ray.character.card import CardError, CardRegistry
    from rp_ray.character.scenes import CharacterScenes, write_scene_corpus

    cfg, yaml_cards = carded.cfg, carded.yaml

    def fails(match: str, exc=ConfigError, **update):
        with pytest.raises(exc, match=match):
            load_catalog(cfg.model_copy(update=update), yaml_cards)

    def skipped(match: str, **update):
        """A bad card in the registry is left out with a warning; the rest of the app deploys."""
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="rp_ray.character.catalog"):
            data = load_catalog(cfg.model_copy(update={"lorebooks": {}, **update}), yaml_cards)
        assert data["cards"] == {} and re.search(match, caplog.text), caplog.text

    fails(r"card_registry .*nowhere: no such folder; create it", card_registry=str(tmp_path / "nowhere"))
    reg = CardRegistry(tmp_path / "reg")
    reg.import_file(FIXTURES / "v2_card.json", name="haruhi")
    skipped(
        r"haruhi.json: the card's name 'haruhi' .* is taken by a character of characters_file",
        card_registry=str(reg.root),
    )
    reg.path("haruhi").rename(reg.path("a2"))
    skipped(r"a2.json: the card's name 'a2' .* is taken by a served adapter", card_registry=str(reg.root))
    reg.path("a2").unlink()
    reg.import_file(FIXTURES / "v2_card.json", name="brigade", adapter="a9-unserved")
    skipped(
        r"brigade.json: field data.extensions.rp_ray.adapter: 'a9-unserved' is not a served adapter",
        card_registry=str(reg.root),
    )
    reg.path("brigade").write_text('{"spec": "chara_card_v2", "spec_version": "2.0", "data": {"name": 3}}')
    skipped(r"brigade.json: field data.name", card_registry=str(reg.root))
    fails(r"lorebooks.nobody: no imported card named 'nobody'", lorebooks={"nobody": str(FIXTURES / "world_info.json")})
    fails(r"v2_card.json: not a lorebook", CardError, lorebooks={"aoi": str(FIXTURES / "v2_card.json")})
    fails(r"scenes.nobody: no character named 'nobody'", scenes={"nobody": cfg.scenes["haruhi"]})
    fails(r"scenes.haruhi: .*missing.jsonl: no such file", scenes={"haruhi": str(tmp_path / "missing.jsonl")})
    fails(
        r"not a scene corpus of `rp-ray scenes extract` \(no characters.json",
        scenes={"haruhi": str(FIXTURES / "v2_card.json")},
    )
    two = {k: CharacterScenes(key=k, name=k, persona_hash=k, persona=k, scenes=["x"]) for k in ("one", "two")}
    write_scene_corpus(two, tmp_path / "corpus")
    fails(r"holds 2 characters; name one's file: one.jsonl, two.jsonl", scenes={"haruhi": str(tmp_path / "corpus")})
    data = load_catalog(cfg.model_copy(update={"scenes": {"aoi": str(tmp_path / "corpus" / "two.jsonl")}}), yaml_cards)
    assert data["scenes"] == {"aoi": {"key": "two", "persona": "two", "scenes": ["x"]}}


def test_a_card_imported_through_one_replica_is_served_by_the_others(carded, tmp_path):
    """POST /v1/characters: validated, written into the registry and served at once; another replica finds it when a
    request names it (the folder's mtime changed), and drops it once its file is gone."""
    from rp_ray.character.card import card_png_bytes, parse_card

    cfg = carded.cfg.model_copy(update={"card_registry": str(tmp_path / "reg"), "lorebooks": {}})
    (tmp_path / "reg").mkdir()
    data = load_catalog(cfg, carded.yaml)
    one, two = (ChatServing(cfg, data, tok=carded.serving.tok) for _ in range(2))
    raw = (FIXTURES / "v2_card.json").read_bytes()

    def refused(status, code_or_param, *args, serving=one, **kw):
        with pytest.raises(APIError) as e:
            serving.import_card(*args, **kw)
        assert e.value.status == status and code_or_param in (e.value.code, e.value.param), e.value.message
        return e.value.message

    nothing = ChatServing(carded.cfg.model_copy(update={"card_registry": None, "lorebooks": {}}), tok=one.tok)
    assert "set card_registry" in refused(409, "no_card_registry", raw, serving=nothing)
    assert "not valid JSON" in refused(400, "invalid_card", b"{nope")
    assert "not a character card" in refused(400, "invalid_card", b'{"entries": []}')
    assert "not usable JSON" in refused(400, "invalid_card", b'{"spec": ' + b"1" * 5000 + b"}")  # too many digits
    assert "'a9' is not served" in refused(400, "adapter", raw, adapter="a9")
    # the card's name, Haruhi, slugs to the characters_file character's name
    assert "'haruhi' is taken by a character of characters_file" in refused(409, "name_taken", raw)
    refused(409, "name_taken", raw, name="base")
    refused(400, "name", raw, name="../etc")
    entry = one.import_card(raw, adapter="a2", name="brigade")
    assert entry == {
        "id": "brigade",
        "object": "model",
        "created": one.created,
        "owned_by": "rp_ray",
        "kind": "character",
        "display_name": "Haruhi",
        "greeting": "User! You're late. The brigade waits for no one.",
        "alternate_greetings": [],
        "adapter": "a2",
        "spec": "chara_card_v2",
    }
    assert one.prepare(parse_request({"model": "brigade", "messages": USER})).adapter == "a2"
    refused(409, "name_taken", raw, name="brigade")  # imported already (here, or through another replica)
    refused(409, "name_taken", raw, name="brigade", serving=two)
    # the other replica: the name is unknown, the folder changed, so it reads the registry again
    assert "brigade" in [m["id"] for m in two.models()["data"]]
    assert two.prepare(parse_request({"model": "brigade", "messages": USER})).adapter == "a2"
    # a PNG card keeps its image in the registry
    png = card_png_bytes(parse_card(raw, "v2"))
    assert one.import_card(png, name="png-card")["spec"] == "chara_card_v3"  # exported PNGs carry the V3 card
    assert (tmp_path / "reg" / "png-card.png").read_bytes() == png
    # a card file removed from the folder is no longer served, after the next rescan
    (tmp_path / "reg" / "brigade.json").unlink()
    assert "brigade" not in [m["id"] for m in two.models()["data"]]
    with pytest.raises(APIError) as e:
        two.prepare(parse_request({"model": "brigade", "messages": USER}))
    assert e.value.status == 404
    # a broken file written by hand is not served (and breaks nothing else)
    (tmp_path / "reg" / "broken.json").write_text("{")
    assert [m["id"] for m in two.models()["data"]][-1] == "png-card"


def test_served_scene_memory_has_the_chatharuhi_layout(tiny_llama3, tmp_path):
    """Val rows of Haruhi on the characters_file character whose system_prompt is her persona, with the scene corpus
    `rp-ray scenes extract` writes from the train split: the served system prompt is the data's layout, its persona
    the val row's, its scenes the train corpus's (the best for the last user message, within the budget)."""
    from conftest import SHARED_HARUHI

    from rp_ray.character.scenes import (
        SceneIndex,
        corpus_file_name,
        extract_scenes,
        fit_scenes,
        join_system_prompt,
        persona_hash,
        split_system_prompt,
        write_scene_corpus,
    )

    if not (SHARED_HARUHI / "haruhi_val.json").is_file() or not (SHARED_HARUHI / "haruhi_train.json").is_file():
        pytest.skip(f"the full ChatHaruhi splits are not at {SHARED_HARUHI}")
    train = json.loads((SHARED_HARUHI / "haruhi_train.json").read_text(encoding="utf-8"))
    val = json.loads((SHARED_HARUHI / "haruhi_val.json").read_text(encoding="utf-8"))
    chars = extract_scenes(train)
    write_scene_corpus(chars, tmp_path / "scenes")
    rows = [r for r in val if "凉宫春日" in split_system_prompt(r["conversations"][0]["value"])[0]]
    assert len(rows) >= 3
    persona = split_system_prompt(rows[0]["conversations"][0]["value"])[0]
    corpus = chars[persona_hash(persona)]
    cfg = ServeConfig(
        model={"path": str(tiny_llama3), "template": "llama3"},
        max_model_len=4096,
        max_tokens_cap=64,
        scenes={"haruhi": str(tmp_path / "scenes" / corpus_file_name(corpus))},
    )
    yaml_cards = {"haruhi": entry_card({"name": "haruhi", "display_name": "凉宫春日", "system_prompt": persona}, "h")}
    serving = ChatServing(cfg, load_catalog(cfg, yaml_cards))
    count = serving.count_tokens
    for row in rows[:5]:
        conv = row["conversations"]
        turns = [Message("user" if t["from"] == "user" else "assistant", t["value"]) for t in conv[1:-1]]
        body = {
            "model": "haruhi",
            "messages": [{"role": m.role, "content": m.content} for m in turns],
            "rp_debug": True,
        }
        chat = serving.prepare(parse_request(body))
        system = chat.debug["system_prompt"]
        got_persona, scenes = split_system_prompt(system)
        assert got_persona == split_system_prompt(conv[0]["value"])[0] == persona
        assert system == join_system_prompt(persona, scenes) and scenes == chat.debug["scenes"]
        assert 0 < len(scenes) <= cfg.scene_top_k and all(s in corpus.scenes for s in scenes)
        assert scenes == fit_scenes(SceneIndex(corpus.scenes).retrieve(turns[-1].content, 2), count, 1500)
        assert sum(count(s) for s in scenes) <= cfg.scene_budget
        assert chat.prompt == chat_prompt_ids(serving.tok, LLAMA3, system, turns)
