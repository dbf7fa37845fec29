"""Time to compute expert placements for the full DeepSeek-V3 config (671B, FP8), goal < 5 s.

    python benchmarks/bench_placement.py [--json benchmarks/results/bench_placement.json]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import write_json  # noqa: E402

from modeling_deepseek_moe import DeepseekMoEV3Config  # noqa: E402
from modeling_deepseek_moe.placement import expert_device_map  # noqa: E402

CASES = {
    "8 GPUs expert-parallel": dict(devices=[f"cuda:{i}" for i in range(8)]),
    "8 GPUs, 70GiB each, overflow to CPU": dict(devices=[f"cuda:{i}" for i in range(8)],
                                                max_memory={**{f"cuda:{i}": "70GiB" for i in range(8)}, "cpu": "2TiB"}),
    "1 GPU, experts in CPU memory": dict(devices=["cuda:0"], offload_experts="cpu"),
    "3 GPUs (groups do not divide)": dict(devices=["cuda:0", "cuda:1", "cuda:2"]),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default="benchmarks/results/bench_placement.json")
    args = parser.parse_args()
    config = DeepseekMoEV3Config(quantization_config={"quant_method": "fp8", "weight_block_size": [128, 128]})
    results = {}
    print(f"{'case':<40}{'median s':>10}{'entries':>10}")
    for name, kwargs in CASES.items():
        times = []
        for _ in range(5):
            start = time.perf_counter()
            device_map = expert_device_map(config, **kwargs)
            times.append(time.perf_counter() - start)
        results[name] = {"median_s": statistics.median(times), "entries": len(device_map)}
        print(f"{name:<40}{results[name]['median_s']:>10.4f}{len(device_map):>10}")
    write_json(args.json, {"benchmark": "bench_placement", "results": results})


if __name__ == "__main__":
    main()
