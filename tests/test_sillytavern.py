"""SillyTavern's surface of the running app (the session's shared ``app``): the request bodies SillyTavern sends in
its Chat Completion mode (custom OpenAI-compatible source) and its Text Completion mode (API type vLLM), streamed and
not, through plain HTTP and through the official ``openai`` client; ``/tokenize`` and ``/detokenize`` as its token
counter calls them; and what the new sampling fields do (logprobs, logit_bias, stop strings, seeds, min_p,
repetition_penalty, n).

The bodies follow SillyTavern's own code: ``public/scripts/openai.js`` and ``src/endpoints/backends/
chat-completions.js`` (custom source: messages, model, temperature, max_tokens, stream, penalties, top_p, top_k,
stop, logit_bias, seed, n, logprobs + top_logprobs), ``public/scripts/textgen-settings.js`` filtered by
``VLLM_KEYS`` in ``src/constants.js`` (text completion, vLLM type), and ``src/endpoints/tokenizers.js``
(``POST /tokenize {model, prompt}``).
"""

from __future__ import annotations

import json
import re

import httpx
import pytest
from conftest import AUTH, KEY, PROMPTS, REPO, SYSTEM, client

from rp_ray.llm.reply import clean_reply
from rp_ray.llm.template import LLAMA3

pytestmark = pytest.mark.slow  # talks to the real Serve app

BAD = "\ufffd"  # a reply cut inside a UTF-8 character ends differently as bytes and as vLLM's text
SPECIAL = re.compile(r"<\|[a-z_]+\|>")


def rendered(prompt: str, system: str = "") -> str:
    """The llama3 prompt text SillyTavern's Llama 3 instruct template writes: what the chat route builds."""
    text = "<|begin_of_text|>"
    if system:
        text += LLAMA3.system_slot.replace("{content}", system)
    return text + LLAMA3.user_slot.replace("{content}", prompt)


def post(app, path: str, body, **kw) -> httpx.Response:
    return httpx.post(f"{app.url}{path}", json=body, headers=AUTH, timeout=120, **kw)


def sse(r: httpx.Response) -> list[dict]:
    """The JSON events of a server-sent event stream, after checking it ends with [DONE]."""
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream"), r.text
    lines = [line[len("data: ") :] for line in r.text.split("\n") if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(x) for x in lines[:-1]]


# What SillyTavern sends. Chat Completion, custom source: its prompt manager's system messages (main prompt,
# character description, scenario, the new-chat marker), the greeting, then the chat; logprobs when "Request token
# probabilities" is on (its logprobs 10 becomes top_logprobs 10 on the way out).
ST_CHAT = {
    "messages": [
        {"role": "system", "content": "Write 凉宫春日's next reply in a fictional chat between 凉宫春日 and 阿虚."},
        {"role": "system", "content": SYSTEM},
        {"role": "system", "content": "[Start a new Chat]"},
        {"role": "assistant", "content": "「你好！」"},
        {"role": "user", "content": PROMPTS[0]},
    ],
    "model": "haruhi",
    "temperature": 1,
    "max_tokens": 48,
    "stream": False,
    "presence_penalty": 0,
    "frequency_penalty": 0,
    "top_p": 1,
    "top_k": 0,
    "logit_bias": {},
    "seed": 1234,
    "n": 1,
    "logprobs": True,
    "top_logprobs": 10,
}
# Text Completion, API type vLLM: the preset's samplers, filtered to vLLM's keys; logprobs 5 when token
# probabilities are on; stop strings: the names and the instruct template's sequences (more than OpenAI's 4).
ST_TEXT = {
    "model": "haruhi",
    "prompt": rendered(PROMPTS[0], SYSTEM),
    "max_tokens": 48,
    "logprobs": 5,
    "temperature": 0.7,
    "top_p": 0.9,
    "typical_p": 1,  # dropped by SillyTavern's vLLM filter in new versions; ignored here either way
    "min_p": 0.05,
    "repetition_penalty": 1.1,
    "frequency_penalty": 0,
    "presence_penalty": 0,
    "top_k": 40,
    "min_tokens": 0,
    "stop": [
        "\n阿虚:",
        "\n凉宫春日:",
        "<|eot_id|>",
        "<|start_header_id|>user<|end_header_id|>",
        "<|start_header_id|>assistant<|end_header_id|>",
        "<|start_header_id|>system<|end_header_id|>",
    ],
    "skip_special_tokens": True,
    "n": 1,
    "ignore_eos": False,
    "spaces_between_special_tokens": True,
    "seed": 4321,
    "stream": False,
    "include_stop_str_in_output": False,
    "truncate_prompt_tokens": None,
    "early_stopping": False,
    "length_penalty": 1,
    "use_beam_search": False,
}


def test_models_list_what_sillytavern_shows(app):
    r = httpx.get(f"{app.url}/v1/models", headers=AUTH, timeout=30)
    assert r.status_code == 200
    assert {m["id"] for m in r.json()["data"]} == {"base", "a1", "a2", "haruhi", "aoi"}  # its picker reads data[].id


def test_sillytavern_chat_completion_body_streamed_and_not(app):
    r = post(app, "/v1/chat/completions", ST_CHAT)
    assert r.status_code == 200, r.text
    body = r.json()
    (choice,) = body["choices"]
    text = choice["message"]["content"]
    assert choice["finish_reason"] in ("stop", "length") and (text or choice["finish_reason"] == "stop")
    content = choice["logprobs"]["content"]
    assert len(content) == body["usage"]["completion_tokens"] > 0
    for t in content:
        assert t["logprob"] <= 0 and len(t["top_logprobs"]) == 10
        tops = [a["logprob"] for a in t["top_logprobs"]]
        assert tops == sorted(tops, reverse=True)  # best first
    # the tokens are the ones generated (the end token too): the reply is the clean text of their bytes
    raw = b"".join(bytes(t["bytes"]) for t in content).decode("utf-8", errors="replace")
    assert clean_reply(LLAMA3, raw.replace(BAD, "")) == text.replace(BAD, "")

    events = sse(post(app, "/v1/chat/completions", ST_CHAT | {"stream": True}))
    streamed = "".join(c["delta"].get("content", "") for e in events for c in e["choices"])
    assert streamed == text  # same seed, same reply
    tokens = [t["token"] for e in events for c in e["choices"] if c.get("logprobs") for t in c["logprobs"]["content"]]
    assert tokens == [t["token"] for t in content]


def test_sillytavern_text_completion_body_streamed_and_not(app):
    r = post(app, "/v1/completions", ST_TEXT)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-") and body["model"] == "haruhi"
    (choice,) = body["choices"]
    assert choice["finish_reason"] in ("stop", "length") and choice["index"] == 0
    lp = choice["logprobs"]
    n = body["usage"]["completion_tokens"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == n
    assert all(1 <= len(top) <= 6 for top in lp["top_logprobs"]) and all(v <= 0 for v in lp["token_logprobs"])
    assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])
    assert not any(s in choice["text"] for s in ST_TEXT["stop"])

    events = sse(post(app, "/v1/completions", ST_TEXT | {"stream": True}))
    assert all(e["object"] == "text_completion" for e in events)
    assert "".join(c["text"] for e in events for c in e["choices"]) == choice["text"]
    assert [t for e in events for c in e["choices"] for t in c["logprobs"]["tokens"]] == lp["tokens"]
    assert [o for e in events for c in e["choices"] for o in c["logprobs"]["text_offset"]] == lp["text_offset"]


def _system(text: str) -> dict:
    return {"role": "system", "content": text}


_HEAD = ST_CHAT["messages"][:4]  # the prompt manager's system messages and the greeting
_USER = ST_CHAT["messages"][4]
_REPLY = {"role": "assistant", "content": "春日:「你来晚了！」"}
_CUT = {"role": "assistant", "content": "春日:「你来"}
# SillyTavern's everyday Chat Completion shapes, as its openai.js builds them
ST_SHAPES = {
    "post_history_instructions": [*_HEAD, _USER, _system("Stay in character as 凉宫春日.")],
    "impersonate": [
        *[*_HEAD, _USER, _REPLY],
        _system(
            "[Write your next reply from the point of view of 阿虚, using the chat history so far as a guideline.]"
        ),
    ],
    "group_nudge": [*_HEAD, _USER, _system("[Write the next reply only as 凉宫春日.]")],
    "quiet_prompt": [*_HEAD, _USER, _REPLY, _system("[Pause your roleplay. Summarize the story so far.]")],
    "continue": [*_HEAD, _USER, _CUT, _system(f"[Continue the following message: {_CUT['content']}]")],
    "continue_prefill": [*_HEAD, _USER, _CUT],
    "after_greeting": _HEAD,
    "authors_note": [
        *[*_HEAD, _USER, _REPLY, _system("[Author's note: it is raining in the story.]")],
        *[_USER, _REPLY, _USER, _REPLY, _USER],
    ],
    "long_chat": [*_HEAD, *[{"role": "user", "content": "早"}, {"role": "assistant", "content": "嗯"}] * 37, _USER],
    "text_parts": [
        *_HEAD,
        {"role": "user", "content": [{"type": "text", "text": PROMPTS[0]}, {"type": "text", "text": "(笑)"}]},
    ],
}


def _template_ids(tok, messages: list[dict]) -> list[int]:
    """The prompt ids the model's own chat template gives (its chat_template.jinja through apply_chat_template), a
    final assistant message continued."""
    flat = [
        m | {"content": "\n".join(p["text"] for p in m["content"])} if isinstance(m["content"], list) else m
        for m in messages
    ]
    cont = flat[-1]["role"] == "assistant"
    text = tok.apply_chat_template(flat, add_generation_prompt=not cont, continue_final_message=cont, tokenize=False)
    return tok(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("shape", sorted(ST_SHAPES))
def test_sillytaverns_message_shapes_get_replies_on_the_templates_prompt(app, llama3_tok, shape):
    """Each shape, through plain HTTP and the official client, streamed and not: 200 and a non-empty reply; the
    served prompt is the chat template's (``/tokenize`` of the messages, whose count is the reply's
    ``usage.prompt_tokens``)."""
    messages = ST_SHAPES[shape]
    if shape == "long_chat":
        assert len(messages) == 79
    body = ST_CHAT | {"messages": messages, "logprobs": False, "top_logprobs": None}
    r = post(app, "/tokenize", {"model": "haruhi", "messages": messages})
    assert r.status_code == 200, r.text
    assert r.json()["tokens"] == _template_ids(llama3_tok, messages)
    count = r.json()["count"]

    r = post(app, "/v1/chat/completions", body)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] and r.json()["usage"]["prompt_tokens"] == count
    events = sse(post(app, "/v1/chat/completions", body | {"stream": True, "stream_options": {"include_usage": True}}))
    assert "".join(c["delta"].get("content", "") for e in events for c in e["choices"])
    assert events[-1]["usage"]["prompt_tokens"] == count

    kw = {k: body[k] for k in ("temperature", "max_tokens", "seed", "top_p")}
    oa = client(app)
    reply = oa.chat.completions.create(model="haruhi", messages=messages, **kw)
    assert reply.choices[0].message.content and reply.usage.prompt_tokens == count
    stream = oa.chat.completions.create(model="haruhi", messages=messages, stream=True, **kw)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)


def test_sillytaverns_text_completion_presets_beyond_openais_ranges(app):
    """A sampler preset at the repetition-penalty slider's maximum and a group chat's 18 stop strings."""
    stops = [*ST_TEXT["stop"], *(f"\nMember {i}:" for i in range(12))]
    body = ST_TEXT | {"repetition_penalty": 3.0, "stop": stops}
    assert len(stops) == 18
    r = post(app, "/v1/completions", body)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"]
    events = sse(post(app, "/v1/completions", body | {"stream": True}))
    assert "".join(c["text"] for e in events for c in e["choices"])
    reply = client(app).completions.create(
        model="haruhi", prompt=body["prompt"], max_tokens=48, stop=stops, extra_body={"repetition_penalty": 3.0}
    )
    assert reply.choices[0].text


def test_a_cut_greedy_reply_sent_back_continues_to_the_same_text(app):
    """Continue: on 10 val rows, the greedy reply cut at a token boundary and sent back as a trailing assistant
    message continues to the uncut reply's text (the cut text is tokenized anew, so a row may differ: 9 of 10)."""
    rows = json.loads((REPO / "data" / "sample" / "haruhi_val.json").read_text(encoding="utf-8"))
    same, tried = 0, 0
    for row in rows:
        messages = [{"role": t["from"], "content": t["value"]} for t in row["conversations"][:-1]]
        if len(json.dumps(messages, ensure_ascii=False)) > 2500:  # keep the prompt well inside the tiny context
            continue
        greedy = {"model": "base", "messages": messages, "temperature": 0, "max_tokens": 24, "logprobs": True}
        r = post(app, "/v1/chat/completions", greedy).json()
        full, tokens = r["choices"][0]["message"]["content"], r["choices"][0]["logprobs"]["content"]
        cut = len(tokens) // 2
        while cut > 0:  # a boundary that is also a character boundary
            try:
                prefix = b"".join(bytes(t["bytes"]) for t in tokens[:cut]).decode("utf-8")
                break
            except UnicodeDecodeError:
                cut -= 1
        if cut == 0 or not full.startswith(prefix):
            continue
        body = greedy | {"messages": [*messages, {"role": "assistant", "content": prefix}], "max_tokens": 24 - cut}
        r = post(app, "/v1/chat/completions", body | {"logprobs": False})
        assert r.status_code == 200, r.text
        same += prefix + r.json()["choices"][0]["message"]["content"] == full
        tried += 1
        if tried == 10:
            break
    print(f"continued to the same text: {same} of {tried}")
    assert tried == 10 and same >= 9, f"{same} of {tried} continued to the same text"


@pytest.mark.parametrize("model", ["base", "a1", "haruhi"])
def test_text_completion_of_the_rendered_chat_prompt_is_the_chat_reply(app, model):
    """The raw prompt a llama3 instruct template writes gives, token for token, what the chat route answers; a card
    lends its adapter to a text completion but not its system prompt."""
    oai = client(app)
    for p in PROMPTS[:2]:
        r = oai.completions.create(
            model=model,
            prompt=rendered(p),
            temperature=0,
            max_tokens=24,
            extra_body={"skip_special_tokens": False},
        )
        want = app.ref[("a1" if model == "haruhi" else model, p)]
        assert clean_reply(LLAMA3, r.choices[0].text) == want, (model, p)
        assert r.object == "text_completion" and r.usage.completion_tokens > 0
    kw = dict(model="a1", prompt=rendered(PROMPTS[1], SYSTEM), temperature=0, max_tokens=24)
    raw = oai.completions.create(**kw, extra_body={"skip_special_tokens": False}).choices[0].text
    assert clean_reply(LLAMA3, raw) == app.ref[("haruhi", PROMPTS[1])]
    assert oai.completions.create(**kw).choices[0].text == SPECIAL.sub("", raw)  # special tokens skipped by default


def test_openai_client_streams_text_completions(app):
    oai = client(app)
    kw = dict(model="a2", prompt=rendered(PROMPTS[2]), temperature=0, max_tokens=24)
    whole = oai.completions.create(**kw)
    chunks = list(oai.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        whole.choices[0].finish_reason
    ]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    # a prompt of token ids, and a list of one string, are the same prompt
    ids = httpx.post(f"{app.url}/tokenize", json={"model": "a2", "prompt": kw["prompt"]}, headers=AUTH).json()
    assert oai.completions.create(**kw | {"prompt": ids["tokens"]}).choices[0].text == whole.choices[0].text
    assert oai.completions.create(**kw | {"prompt": [kw["prompt"]]}).choices[0].text == whole.choices[0].text


def test_chat_logprobs_through_the_openai_client(app):
    r = client(app).chat.completions.create(
        model="base",
        messages=[{"role": "user", "content": PROMPTS[1]}],
        temperature=0,
        max_tokens=24,
        logprobs=True,
        top_logprobs=3,
    )
    assert r.choices[0].message.content == app.ref[("base", PROMPTS[1])]
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for t in content:  # greedy: the sampled token is the most likely one
        assert len(t.top_logprobs) == 3 and t.top_logprobs[0].token == t.token
        assert t.top_logprobs[0].logprob == pytest.approx(t.logprob, abs=1e-4)
    chunks = list(
        client(app).chat.completions.create(
            model="base",
            messages=[{"role": "user", "content": PROMPTS[1]}],
            temperature=0,
            max_tokens=24,
            logprobs=True,
            stream=True,
        )
    )
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [t.token for t in streamed] == [t.token for t in content] and all(t.top_logprobs == [] for t in streamed)
    plain = client(app).chat.completions.create(
        model="base", messages=[{"role": "user", "content": PROMPTS[1]}], temperature=0, max_tokens=4
    )
    assert plain.choices[0].logprobs is None


def test_seeds_and_greedy_replies_repeat(app):
    oai = client(app)
    msgs = [{"role": "user", "content": PROMPTS[3]}]
    seeded = [
        oai.chat.completions.create(model="a1", messages=msgs, temperature=1.0, seed=11, max_tokens=24)
        .choices[0]
        .message.content
        for _ in range(2)
    ]
    assert seeded[0] == seeded[1]
    texts = [
        oai.completions.create(model="base", prompt=PROMPTS[3], temperature=0, max_tokens=24).choices[0].text
        for _ in range(2)
    ]
    assert texts[0] == texts[1]
    texts = [
        oai.completions.create(model="base", prompt=PROMPTS[3], temperature=1.3, seed=5, max_tokens=24).choices[0].text
        for _ in range(2)
    ]
    assert texts[0] == texts[1]


def test_stop_strings_cut_the_reply(app):
    oai = client(app)
    kw = dict(model="base", prompt=PROMPTS[2], temperature=0, max_tokens=32, extra_body={"ignore_eos": True})
    text = oai.completions.create(**kw).choices[0].text
    assert len(text) >= 4
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    cut = oai.completions.create(**kw, stop=[stop, "never-there"])
    assert cut.choices[0].text == text[: text.index(stop)] and cut.choices[0].finish_reason == "stop"
    msgs = [{"role": "user", "content": PROMPTS[2]}]
    reply = app.ref[("a2", PROMPTS[2])]
    stop = next(reply[i : i + 2] for i in range(3, len(reply)) if reply[i : i + 2].strip() == reply[i : i + 2])
    r = oai.chat.completions.create(model="a2", messages=msgs, temperature=0, max_tokens=24, stop=stop)
    assert r.choices[0].message.content == reply[: reply.index(stop)].strip() and r.choices[0].finish_reason == "stop"


def _ids_of(tok, text: str) -> list[int]:
    return [i for i in range(len(tok)) if tok.decode([i]) == text]


def test_logit_bias_removes_and_forces_tokens(app, llama3_tok):
    oai = client(app)
    kw = dict(model="base", prompt=rendered(PROMPTS[0]), temperature=0, max_tokens=8, logprobs=0)
    first = oai.completions.create(**kw).choices[0].logprobs.tokens[0]
    banned = {str(i): -100 for i in _ids_of(llama3_tok, first)}
    assert 0 < len(banned) <= 300
    again = oai.completions.create(**kw, logit_bias=banned).choices[0].logprobs.tokens
    assert first not in again  # the greedy first token, and every token with its text, is gone
    forced = next(
        i for i in range(len(llama3_tok)) if llama3_tok.decode([i]).isalpha() and len(llama3_tok.decode([i])) > 2
    )
    word = llama3_tok.decode([forced])
    r = oai.completions.create(**kw, logit_bias={str(forced): 100})
    assert r.choices[0].text == word * 8 and r.choices[0].finish_reason == "length"
    r = oai.chat.completions.create(
        model="haruhi",
        messages=[{"role": "user", "content": PROMPTS[0]}],
        temperature=0,
        max_tokens=5,
        logit_bias={str(forced): 100},
    )
    assert r.choices[0].message.content == word * 5


def test_min_p_repetition_penalty_and_n(app):
    oai = client(app)
    r = oai.completions.create(
        model="a1",
        prompt=rendered(PROMPTS[1]),
        max_tokens=16,
        n=2,
        seed=3,
        extra_body={"min_p": 0.2, "repetition_penalty": 1.5, "top_k": 20},
    )
    assert [c.index for c in r.choices] == [0, 1] and all(c.finish_reason in ("stop", "length") for c in r.choices)
    r = oai.chat.completions.create(
        model="haruhi",
        messages=[{"role": "user", "content": PROMPTS[1]}],
        max_tokens=16,
        n=2,
        seed=3,
        extra_body={"min_p": 0.5, "repetition_penalty": 2.0},
    )
    assert [c.index for c in r.choices] == [0, 1] and all(c.finish_reason in ("stop", "length") for c in r.choices)
    greedy = oai.chat.completions.create(
        model="base",
        messages=[{"role": "user", "content": PROMPTS[1]}],
        temperature=0,
        max_tokens=24,
        extra_body={"min_p": 0.9},
    )
    assert greedy.choices[0].message.content == app.ref[("base", PROMPTS[1])]  # min_p keeps the most likely token


def test_tokenize_and_detokenize_as_sillytavern_counts(app):
    t = post(app, "/tokenize", {"model": "haruhi", "prompt": ST_TEXT["prompt"]}).json()
    assert (
        set(t) == {"count", "max_model_len", "tokens"} and t["count"] == len(t["tokens"]) and t["max_model_len"] == 1024
    )
    assert t["tokens"].count(t["tokens"][0]) == 1  # the prompt's own BOS, not a second one
    r = client(app).completions.create(model="haruhi", prompt=ST_TEXT["prompt"], max_tokens=1)
    assert r.usage.prompt_tokens == t["count"]
    d = post(app, "/detokenize", {"model": "haruhi", "tokens": t["tokens"]}).json()
    assert d == {"prompt": ST_TEXT["prompt"]}
    m = post(app, "/tokenize", {"model": "haruhi", "messages": [{"role": "user", "content": PROMPTS[0]}]}).json()
    chat = client(app).chat.completions.create(
        model="haruhi", messages=[{"role": "user", "content": PROMPTS[0]}], max_tokens=1
    )
    assert m["count"] == chat.usage.prompt_tokens  # the card's system prompt counted, as chat sends it
    assert (
        m["tokens"] == post(app, "/tokenize", {"model": "a1", "prompt": rendered(PROMPTS[0], SYSTEM)}).json()["tokens"]
    )


@pytest.mark.parametrize(
    "path, body, status, param",
    [
        ("/v1/completions", {"model": "base"}, 400, "prompt"),
        ("/v1/completions", {"model": "base", "prompt": [4096]}, 400, "prompt"),
        ("/v1/completions", {"model": "base", "prompt": [1, -2]}, 400, "prompt"),
        ("/v1/completions", {"model": "base", "prompt": ["a", "b"]}, 400, "prompt"),
        ("/v1/completions", {"model": "base", "prompt": "hi", "echo": True}, 400, "echo"),
        ("/v1/completions", {"model": "base", "prompt": "hi", "suffix": "x"}, 400, "suffix"),
        ("/v1/completions", {"model": "base", "prompt": "hi", "best_of": 3}, 400, "best_of"),
        ("/v1/completions", {"model": "base", "prompt": "hi", "logprobs": 21}, 400, "logprobs"),
        ("/v1/completions", {"model": "base", "prompt": "hi", "logit_bias": {"9999": 1}}, 400, "logit_bias"),
        ("/v1/completions", {"model": "base", "prompt": "hi", "logit_bias": {"5": 200}}, 400, "logit_bias.5"),
        ("/v1/completions", {"model": "base", "prompt": "hi", "min_p": 2}, 400, "min_p"),
        ("/v1/completions", {"model": "base", "prompt": "hi", "repetition_penalty": -1}, 400, "repetition_penalty"),
        ("/v1/completions", {"model": "base", "prompt": "hi", "stop": ["s"] * 257}, 400, "stop"),
        ("/v1/completions", {"model": "base", "prompt": "hi", "stop": ["s" * 300]}, 400, "stop.0"),
        ("/v1/completions", {"model": "base", "prompt": "hi", "max_tokens": 5000}, 400, "max_tokens"),
        ("/v1/completions", {"model": "base", "prompt": "hi", "max_tokens": 1023}, 400, "max_tokens"),
        ("/v1/completions", {"model": "base", "prompt": "hi", "min_tokens": 9, "max_tokens": 4}, 400, "min_tokens"),
        ("/v1/completions", {"model": "base", "prompt": "hi", "n": 5}, 400, "n"),
        ("/v1/completions", {"model": "base", "prompt": "你好" * 2000}, 400, "prompt"),
        ("/v1/completions", {"model": "nope", "prompt": "hi"}, 404, "model"),
        ("/tokenize", {"model": "base"}, 400, "prompt"),
        ("/tokenize", {"model": "base", "prompt": 7}, 400, "prompt"),
        ("/tokenize", {"model": "nope", "prompt": "hi"}, 404, "model"),
        (
            "/tokenize",
            {"model": "base", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            400,
            "messages.0.content",
        ),
        ("/detokenize", {"model": "base", "tokens": [1, -1]}, 400, "tokens.1"),
        ("/detokenize", {"model": "base", "tokens": [4096]}, 400, "tokens"),
        ("/detokenize", {"model": "base", "tokens": "12"}, 400, "tokens"),
        ("/detokenize", {"model": "nope", "tokens": [1]}, 404, "model"),
    ],
)
def test_bad_input_on_the_new_routes_gets_a_4xx_naming_the_param(app, path, body, status, param):
    r = post(app, path, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"] and err["type"], err


def test_new_routes_refuse_big_bodies_and_wrong_keys(app):
    big = {"model": "base", "prompt": "x" * (2 << 20)}
    for path in ("/v1/completions", "/tokenize"):
        r = post(app, path, big)
        assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    from openai import AuthenticationError, OpenAI

    with pytest.raises(AuthenticationError):
        OpenAI(base_url=f"{app.url}/v1", api_key=KEY + "x", max_retries=0).completions.create(model="base", prompt="hi")
