"""Train the small Mixtral the MoE quality test and bench/moe_quality.py quantize, into the
cache (tests/trained_moe.py). Run once: PYTHONPATH=. python bench/moe_train.py"""

from __future__ import annotations

import time

from tests.trained_moe import MoeSpec, cache_dir, trained_moe

if __name__ == "__main__":
    began = time.perf_counter()
    cached = (cache_dir(MoeSpec()) / "config.json").is_file()
    path = trained_moe()
    print(f"{'cached' if cached else 'trained'}: {path} ({time.perf_counter() - began:.0f} s)")
