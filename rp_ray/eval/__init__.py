"""Batch prediction with vLLM (or transformers) and LLaMA-Factory-exact scoring.

The pipeline (and so Ray) is imported on first use of ``run_eval`` / ``EvalResult``: the engines import without
Ray, as the GPU check needs.
"""

from __future__ import annotations

__all__ = ["EvalResult", "run_eval"]


def __getattr__(name: str):
    if name in __all__:
        from rp_ray.eval import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
