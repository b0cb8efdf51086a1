"""BLEU-4 / ROUGE equal LLaMA-Factory's computation (jieba + rouge-chinese 1.0.3 + nltk) to 1e-4.

The reference below is LLaMA-Factory's ComputeSimilarity written out with the real
rouge-chinese and nltk packages; rp_ray.eval.metrics re-implements ROUGE as pure code.
"""

from __future__ import annotations

import importlib.metadata
import sys

import jieba
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

from rp_ray.eval.metrics import mean_scores, score_pair, score_pairs, score_pairs_parallel


def llama_factory_reference(pred: str, label: str) -> dict[str, float]:
    from rouge_chinese import Rouge

    hyp, ref = list(jieba.cut(pred)), list(jieba.cut(label))
    if len(" ".join(hyp).split()) == 0 or len(" ".join(ref).split()) == 0:
        result = {"rouge-1": {"f": 0.0}, "rouge-2": {"f": 0.0}, "rouge-l": {"f": 0.0}}
    else:
        result = Rouge().get_scores(" ".join(hyp), " ".join(ref))[0]
    out = {k: round(v["f"] * 100, 4) for k, v in result.items()}
    out["bleu-4"] = round(
        sentence_bleu([list(label)], list(pred), smoothing_function=SmoothingFunction().method3) * 100, 4
    )
    return out


def test_llama_factory_golden_pair():
    """The numbers LLaMA-Factory 0.9.5 reports for this pair (compute_metrics: jieba + rouge-chinese, nltk BLEU-4)."""
    assert score_pair("哼，阿虚你又迟到了！", "阿虚，你怎么又迟到了？") == {
        "bleu-4": 30.3744,
        "rouge-1": 75.0,
        "rouge-2": 28.5714,
        "rouge-l": 62.5,
    }


@pytest.mark.parametrize(
    "pred, label",
    [
        ("", "阿虚，你怎么又迟到了？"),  # empty prediction
        ("   \n ", "「好。」"),  # whitespace only
        ("「好。」", ""),  # empty label
        ("I am Sheldon Cooper, and I have a theory.", "I'm Sheldon. I have a theory about that."),  # English
        ("Harry:「Expelliarmus!」哈利大喊。", "哈利:「除你武器！」Harry shouted."),  # mixed
        ("哈哈哈哈哈哈哈哈", "哈哈哈"),  # repeated n-grams (ROUGE counts the set)
        ("the the the the cat", "the cat the cat"),
        ("我们走吧。他说：“快点！”然后离开了……好吗？是的", "我们走。他说快点！离开了……好？是"),  # multi-sentence
        ("......结束了......吗", "结束了吗"),
        ("「哼」", "「哼」"),  # identical
        ("完全不同的回答", "Something else entirely"),
    ],
)
def test_matches_llama_factory(pred, label):
    ours, ref = score_pair(pred, label), llama_factory_reference(pred, label)
    assert ours.keys() == ref.keys()
    for k in ours:
        assert ours[k] == pytest.approx(ref[k], abs=1e-4), (k, ours, ref)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.sampled_from(list("哼阿虚你又迟到了！？。，我们 the cat a.…”’?!\n") + ["......", "……"]), max_size=30
    ).map("".join),
    st.lists(
        st.sampled_from(list("哼阿虚你怎么又迟到了？。，他 the dog a.…”’?!\n") + ["......", "……"]), max_size=30
    ).map("".join),
)
def test_matches_llama_factory_on_random_text(pred, label):
    ours, ref = score_pair(pred, label), llama_factory_reference(pred, label)
    for k in ours:
        assert ours[k] == pytest.approx(ref[k], abs=1e-4), (k, pred, label, ours, ref)


def test_mean_is_over_rounded_per_sample_scores():
    scores = score_pairs(["哼，阿虚你又迟到了！", ""], ["阿虚，你怎么又迟到了？", "「好」"])
    assert mean_scores(scores) == {
        "predict_bleu-4": pytest.approx(30.3744 / 2),
        "predict_rouge-1": 37.5,
        "predict_rouge-2": pytest.approx(28.5714 / 2),
        "predict_rouge-l": 31.25,
    }


def test_parallel_scoring_keeps_order(ray_cluster):
    preds = [f"「第{i}句」哼。" for i in range(50)]
    labels = [f"「第{i % 7}句」" for i in range(50)]
    assert score_pairs_parallel(preds, labels, chunk_size=8) == score_pairs(preds, labels)


def test_rouge_chinese_does_not_shadow_other_modules():
    """rouge-chinese installs a top-level `rouge` package; it must be rouge-chinese's own (no second `rouge`
    distribution fighting over the name), rouge_score must still import, and rp_ray never imports `rouge`."""
    import subprocess

    code = (
        "import rp_ray.eval.metrics, sys; rp_ray.eval.metrics.score_pair('a', 'b'); "
        "print('rouge' in sys.modules, 'rouge_chinese' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]
    owners = [
        d.metadata["Name"]
        for d in importlib.metadata.distributions()
        if any(str(f).startswith("rouge/") for f in (d.files or []))
    ]
    assert owners == ["rouge_chinese"] or owners == ["rouge-chinese"], owners
    import rouge
    import rouge_score.rouge_scorer  # noqa: F401  (Google's rouge-score)

    assert rouge.Rouge.__module__.startswith("rouge_chinese")
