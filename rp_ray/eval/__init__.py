"""Batch prediction on Ray Data with vLLM (or transformers) and LLaMA-Factory-exact scoring."""

from rp_ray.eval.pipeline import EvalResult, run_eval

__all__ = ["EvalResult", "run_eval"]
