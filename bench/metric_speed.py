"""Metric scoring time: the full ChatHaruhi val split, and 50k replies of ~70 characters over Ray.

Predictions are real role-play lines (another row's reply), so jieba and the LCS see
realistic text. Usage: .venv/bin/python bench/metric_speed.py [--n 50000]
"""

import argparse
import time

from rp_ray.config import DataConfig
from rp_ray.data import load_splits
from rp_ray.eval.metrics import mean_scores, score_pairs, score_pairs_parallel


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--data", default="data", help="folder with dataset_info.json and the full splits (shipped: data/)")
    a = ap.parse_args()
    train, val, _ = load_splits(DataConfig(dataset_dir=a.data))
    labels = [c.messages[-1].content for c in val]
    preds = labels[1:] + labels[:1]
    score_pairs(preds[:5], labels[:5])  # jieba dictionary load, not part of the figure
    t0 = time.perf_counter()
    m = mean_scores(score_pairs(preds, labels))
    print(f"full val ({len(labels)} pairs, one process): {time.perf_counter() - t0:.2f} s -> {m}")

    replies = [m.content for c in train for m in c.messages if m.role == "assistant"]
    replies = [r for r in replies if 40 <= len(r) <= 100]
    big_labels = [replies[i % len(replies)] for i in range(a.n)]
    big_preds = [replies[(i * 7 + 3) % len(replies)] for i in range(a.n)]
    mean_len = sum(map(len, big_labels)) / len(big_labels)
    import ray

    ray.init(num_cpus=2)
    score_pairs_parallel(big_preds[:100], big_labels[:100], chunk_size=50)  # warm the workers
    t0 = time.perf_counter()
    scores = score_pairs_parallel(big_preds, big_labels)
    print(f"{len(scores)} pairs of ~{mean_len:.0f} chars over Ray (2 CPUs): {time.perf_counter() - t0:.2f} s")


if __name__ == "__main__":
    main()
