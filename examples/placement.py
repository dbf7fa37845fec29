"""Print expert placements for DeepSeek-V3 (671B, FP8 as released): 8 GPUs expert-parallel, and 1 GPU
with the routed experts in CPU memory. Nothing is loaded: sizes come from the config.

    python examples/placement.py [--gpus 8] [--gpu-memory 70GiB]
"""

from __future__ import annotations

import argparse

from modeling_deepseek_moe import DeepseekMoEV3Config
from modeling_deepseek_moe.placement import expert_device_map, placement_summary

V3_FP8 = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--gpu-memory", default="70GiB", help="per GPU, leaving room for activations")
    args = parser.parse_args()
    config = DeepseekMoEV3Config(quantization_config=V3_FP8)
    gpus = [f"cuda:{i}" for i in range(args.gpus)]

    parallel = expert_device_map(config, gpus)
    print(f"DeepSeek-V3 FP8, {args.gpus} GPUs, experts split in {config.n_group} routing groups:")
    print(placement_summary(parallel, config))

    memory = {gpu: args.gpu_memory for gpu in gpus} | {"cpu": "2TiB"}
    fitted = expert_device_map(config, gpus, max_memory=memory)
    print(f"\nthe same within max_memory={args.gpu_memory} per GPU (overflowing expert chunks go to CPU memory):")
    print(placement_summary(fitted, config))

    offloaded = expert_device_map(config, ["cuda:0"], offload_experts="cpu")
    print("\n1 GPU, routed experts in CPU memory:")
    print(placement_summary(offloaded, config))


if __name__ == "__main__":
    main()
