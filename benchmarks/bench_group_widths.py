"""What one expert's grouped products cost by column-group width on this CPU: the measurement behind
``experts.SMALL_GROUP_WIDTHS`` / ``SLOT_ALIGNMENT`` (each expert's group of columns is padded to the width
that runs fastest). Then the MoE block at small batches with those widths against padding every group to
a multiple of 8 (batches of 512+ assignments) or not at all, as before.

Grouped gate/up and down products of 64 V3-sized experts (hidden 1024, moe_intermediate_size 256, fp32),
every group of the same width, widths timed interleaved round by round.

    python benchmarks/bench_group_widths.py [--rounds 15] [--json benchmarks/results/bench_group_widths.json]
"""

from __future__ import annotations

import argparse
import statistics

import torch

from bench_moe import SHAPE, build_pair
from modeling_deepseek_moe import experts as experts_module
from timing import interleaved, print_table, summarise, write_json

WIDTHS = [*range(1, 41), *range(88, 129, 8)]


def width_costs(rounds: int) -> dict[int, float]:
    """Microseconds per expert (gate/up + down product) for each group width."""
    torch.manual_seed(0)
    experts, hidden, inter = SHAPE["n_routed_experts"], SHAPE["hidden_size"], SHAPE["moe_intermediate_size"]
    gate_up = torch.randn(experts, 2 * inter, hidden)
    down = torch.randn(experts, hidden, inter)

    def products(width: int):
        columns = torch.randn(experts * width, hidden).t()  # column-major, as the gathered tokens
        activations = torch.randn(inter, experts * width)
        offsets = torch.arange(1, experts + 1, dtype=torch.int32) * width
        return lambda: (torch._grouped_mm(gate_up, columns, offs=offsets), torch._grouped_mm(down, activations, offs=offsets))

    times = interleaved({width: products(width) for width in WIDTHS}, rounds, warmup=1)
    return {width: 1e6 * statistics.median(values) / experts for width, values in times.items()}


def old_widths(counts: torch.Tensor) -> torch.Tensor:
    """The earlier rule: a multiple of 8 for batches of at least 8 assignments per expert, else none."""
    multiple = 8 if int(counts.sum()) >= 8 * counts.numel() else 1
    return (counts + multiple - 1) // multiple * multiple


def block_at_small_batches(rounds: int) -> dict[int, dict]:
    ours, _, _ = build_pair(torch.float32)
    ours.eval()
    current = experts_module.padded_widths

    def with_widths(rule, x):
        def call():
            experts_module.padded_widths = rule
            return ours(x)
        return call

    results = {}
    with torch.inference_mode():
        for tokens in (4, 16, 32, 64, 128):
            torch.manual_seed(tokens)
            x = torch.randn(1, tokens, SHAPE["hidden_size"])
            times = interleaved({"padded by width (current)": with_widths(current, x),
                                 "multiple of 8 or none (before)": with_widths(old_widths, x)}, rounds)
            summary = summarise(times, "multiple of 8 or none (before)")
            print_table(f"MoE block forward, {tokens} tokens, float32", summary)
            results[tokens] = summary
    experts_module.padded_widths = current
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--json", default="benchmarks/results/bench_group_widths.json")
    args = parser.parse_args()
    costs = width_costs(args.rounds)
    print("width  us per expert  us per column  padded width of this count (current rule)")
    for width, cost in costs.items():
        padded = int(experts_module.padded_widths(torch.tensor([width]))[0])
        print(f"{width:5d}  {cost:13.1f}  {cost / width:13.1f}  {padded:5d}")
    blocks = block_at_small_batches(args.rounds)
    write_json(args.json, {"benchmark": "bench_group_widths", "shape": SHAPE,
                           "microseconds_per_expert_by_width": costs, "block_by_tokens": blocks})


if __name__ == "__main__":
    main()
