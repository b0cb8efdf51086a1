"""Property tests: role validation accepts exactly what the sharegpt rules allow, and all of it encodes."""

from __future__ import annotations

from conftest import REPO
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rp_ray.data import Dropped, load_registry, to_conversation
from rp_ray.llm.template import GPT_OSS, IGNORE_INDEX, LLAMA3, encode_prediction, encode_supervised

ATTR = load_registry(REPO / "data")["haruhi_train"]  # tags from/value, user/assistant/system
ROLES = ["system", "user", "assistant", "observation", "function_call", "narrator", "human", "gpt"]
text = st.one_of(st.text(max_size=12), st.sampled_from(["", " ", "\n\t", "「哼」", "<|eot_id|>"]))
message = st.fixed_dictionaries({"from": st.sampled_from(ROLES), "value": text})
conversation = st.lists(message, max_size=8)


def allowed(msgs: list[dict]) -> bool:
    """The sharegpt rules, written independently of the library: optional leading system, then
    user/assistant strictly alternating, at least one pair, even count, no blank user/assistant text."""
    if msgs and msgs[0]["from"] == "system":
        msgs = msgs[1:]
    return (
        len(msgs) >= 2
        and len(msgs) % 2 == 0
        and all(m["from"] == ("user", "assistant")[i % 2] for i, m in enumerate(msgs))
        and all(m["value"].strip() for m in msgs)
    )


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(conversation)
def test_validation_accepts_exactly_the_allowed(msgs):
    try:
        conv = to_conversation({"conversations": msgs}, ATTR)
        accepted = True
    except Dropped:
        accepted = False
    assert accepted == allowed(msgs)
    if accepted:
        assert [m.content for m in conv.messages] == [
            m["value"] for m in msgs if not (m is msgs[0] and m["from"] == "system")
        ]


# Only valid shapes, so encoding is exercised on many accepted conversations.
valid_conversation = st.builds(
    lambda system, pairs: (
        ([{"from": "system", "value": system}] if system is not None else [])
        + [{"from": r, "value": c} for p in pairs for r, c in zip(("user", "assistant"), p)]
    ),
    st.one_of(st.none(), text),
    st.lists(st.tuples(text.filter(str.strip), text.filter(str.strip)), min_size=1, max_size=4),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(valid_conversation, st.integers(min_value=8, max_value=300), st.booleans())
def test_every_accepted_conversation_encodes(llama3_tok, gpt_oss_tok, msgs, cutoff, thinking):
    conv = to_conversation({"conversations": msgs}, ATTR)
    for tok, tpl, think in ((llama3_tok, LLAMA3, False), (gpt_oss_tok, GPT_OSS, thinking)):
        ids, labels = encode_supervised(tok, tpl, conv, cutoff, think)
        assert len(ids) == len(labels) <= cutoff  # gpt_oss reserves room for its closing <|return|>
        # a label is ignored, the input itself, or (gpt_oss efficient_eos) the eos on the <|start|> of a later user turn
        eos_on_turn = tok.convert_tokens_to_ids([tpl.efficient_eos, "<|start|>"]) if tpl.efficient_eos else None
        assert all(lab in (IGNORE_INDEX, t) or [lab, t] == eos_on_turn for lab, t in zip(labels, ids))
        ex = encode_prediction(tok, tpl, conv, cutoff, think)
        assert len(ex.prompt_ids) + len(ex.label_ids) <= cutoff
        assert ex.label == conv.messages[-1].content
