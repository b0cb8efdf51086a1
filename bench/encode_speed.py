"""Load, validate and encode the full ChatHaruhi train split (9,792 conversations) with a tiny model's tokenizer.

Usage: .venv/bin/python bench/encode_speed.py [--data data] [--family llama3]
Prints the wall time of each phase; the target is under 60 s in total on a 2-core box.
"""

import argparse
import tempfile
import time

from rp_ray.config import DataConfig
from rp_ray.data import load_splits
from rp_ray.llm.models import load_tokenizer
from rp_ray.llm.template import get_template
from rp_ray.llm.tiny_model import build_tiny_model
from rp_ray.preparation import encode_split


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", default="data", help="folder with dataset_info.json + the full splits (shipped: data/)")
    ap.add_argument("--family", default="llama3", choices=["llama3", "gpt_oss"])
    ap.add_argument("--cutoff-len", type=int, default=2048)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        build_tiny_model(a.family, d)
        t0 = time.perf_counter()
        train, val, report = load_splits(DataConfig(dataset_dir=a.data, cutoff_len=a.cutoff_len))
        t1 = time.perf_counter()
        tpl = get_template(a.family)
        _, stats = encode_split(load_tokenizer(d, tpl), tpl, train, a.cutoff_len)
        t2 = time.perf_counter()
    print(report.summary())
    print(f"load+validate: {t1 - t0:.2f} s ({len(train)} train + {len(val)} val conversations)")
    print(f"encode ({a.family}, cutoff {a.cutoff_len}): {t2 - t1:.2f} s, {stats.summary()}")
    print(f"total load+encode: {t2 - t0:.2f} s ({'under' if t2 - t0 < 60 else 'OVER'} the 60 s target)")


if __name__ == "__main__":
    main()
