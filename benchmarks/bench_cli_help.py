"""Wall time of ``deepseek-moe-convert --help``, of every subcommand's ``--help`` and of the conversion/*.py
scripts' ``--help``, each a fresh process started as the console script starts it, against a bare Python
start. The goal (issue 16) is under a second: help must not import torch, transformers or the package.
``--reference-tree`` also times the console script's entry point in another checkout (e.g. ``git archive
main`` unpacked), for a before/after comparison.

    python benchmarks/bench_cli_help.py [--rounds 5] [--reference-tree /tmp/before --reference-entry modeling_deepseek_moe.conversion:main]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

from timing import interleaved, summarise, write_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from deepseek_moe_convert import COMMANDS  # noqa: E402  (the checkout's, not an installed copy)

# What pip's generated console script does: import the entry point, call it.
BASELINE = "python -c pass"
CONSOLE_SCRIPT = "import sys; sys.argv[0] = 'deepseek-moe-convert'; from {module} import {function}; sys.exit({function}())"


def launcher(arguments: list[str], tree: str, prints_usage: bool = True):
    environment = {**os.environ, "PYTHONPATH": tree}

    def start() -> None:
        done = subprocess.run([sys.executable, *arguments], capture_output=True, text=True, env=environment, cwd=tree)
        assert done.returncode == 0 and ("usage:" in done.stdout or not prints_usage), done.stderr[-2000:]

    return start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="timed runs of each command (interleaved)")
    parser.add_argument("--reference-tree", help="another checkout whose console script is timed too")
    parser.add_argument("--reference-entry", default="modeling_deepseek_moe.conversion:main",
                        help="that checkout's console-script entry point (module:function)")
    parser.add_argument("--json", default=os.path.join(ROOT, "benchmarks", "results", "bench_cli_help.json"))
    args = parser.parse_args()

    console = ["-c", CONSOLE_SCRIPT.format(module="deepseek_moe_convert", function="main")]
    candidates = {BASELINE: launcher(["-c", "pass"], ROOT, prints_usage=False),
                  "deepseek-moe-convert --help": launcher([*console, "--help"], ROOT)}
    for name in COMMANDS:
        candidates[f"deepseek-moe-convert {name} --help"] = launcher([*console, name, "--help"], ROOT)
        script = os.path.join("conversion", f"{name.replace('-', '_')}.py")
        candidates[f"python {script} --help"] = launcher([script, "--help"], ROOT)
    if args.reference_tree:
        module, function = args.reference_entry.split(":")
        reference = ["-c", CONSOLE_SCRIPT.format(module=module, function=function)]
        candidates["reference: deepseek-moe-convert --help"] = launcher([*reference, "--help"], args.reference_tree)
        candidates["reference: deepseek-moe-convert to-mp --help"] = launcher([*reference, "to-mp", "--help"], args.reference_tree)

    times = interleaved(candidates, rounds=args.rounds, warmup=1)
    summary = summarise(times, reference=BASELINE)
    for name, values in times.items():
        summary[name]["max_ms"] = 1000 * max(values)
    width = max(map(len, summary))
    print(f"--help wall time, {args.rounds} runs each, interleaved (load average {os.getloadavg()[0]:.2f})")
    print(f"{'command':<{width}}  {'median ms':>10}  {'max ms':>8}  {'x interpreter start':>20}")
    for name, row in summary.items():
        print(f"{name:<{width}}  {row['median_ms']:>10.0f}  {row['max_ms']:>8.0f}  {row[f'ratio_to_{BASELINE}']:>20.1f}")
    slowest = max(v["max_ms"] for k, v in summary.items() if not k.startswith("reference"))
    print(f"slowest --help of this checkout: {slowest:.0f} ms ({'under' if slowest < 1000 else 'OVER'} one second)")
    write_json(args.json, {"rounds": args.rounds, "load_average": os.getloadavg(), "date": time.strftime("%Y-%m-%d"),
                           "reference_tree": args.reference_tree, "results": summary})

if __name__ == "__main__":
    main()
