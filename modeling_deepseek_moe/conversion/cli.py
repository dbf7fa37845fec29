"""``deepseek-moe-convert SUBCOMMAND ...``: the command line over the conversion functions."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable

from ..safetensors_io import CheckpointError
from .configs import from_official, to_official
from .lora_merge import merge_lora
from .model_parallel import from_mp, to_mp
from .quantization import dequantize, quantize
from .verification import verify


def main(argv: Iterable[str] | None = None) -> int:
    """``deepseek-moe-convert SUBCOMMAND ...``; exit status 2 with a one-line error on a bad source."""
    parser = argparse.ArgumentParser(prog="deepseek-moe-convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    def add(name, help_text, *extra, positionals=("src", "dst"), writes=True):
        command = commands.add_parser(name, help=help_text)
        for positional in positionals:
            command.add_argument(positional)
        for flags, kwargs in extra:
            command.add_argument(*flags, **kwargs)
        if writes:
            command.add_argument("--overwrite", action="store_true", help="replace a non-empty DST")
            command.add_argument("--resume", action="store_true", help="continue an interrupted conversion into DST")
        command.add_argument("--quiet", action="store_true", help="no progress bar")

    add("from-official", "official folder -> this package's format",
        (["--dtype"], dict(choices=["keep", "bf16", "fp8"], default="keep")),
        (["--drop-mtp"], dict(action="store_true", help="leave out V3's multi-token-prediction layer")))
    add("to-official", "this package's format -> DeepSeek's config schema")
    add("dequantize", "FP8 -> BF16 on the CPU")
    add("quantize", "BF16 -> block-wise FP8", (["--scale-fmt"], dict(choices=["float", "ue8m0"], default="float")))
    add("to-mp", "-> DeepSeek-V3's inference format (model{i}-mp{N}.safetensors)",
        (["--model-parallel"], dict(type=int, required=True)),
        (["--drop-mtp"], dict(action="store_true", help="leave out V3's multi-token-prediction layer")))
    add("from-mp", "DeepSeek-V3's inference format -> official folder",
        (["--config"], dict(required=True, help="the official config.json of the model")))
    add("merge-lora", "merge a PEFT LoRA adapter into the base weights", positionals=("base", "adapter", "dst"))
    add("verify", "compare two checkpoints tensor by tensor", (["--ignore-mtp"], dict(action="store_true")),
        positionals=("a", "b"), writes=False)
    args = parser.parse_args(list(argv) if argv is not None else None)
    try:
        if args.command == "verify":
            print(json.dumps(verify(args.a, args.b, quiet=args.quiet, ignore_mtp=args.ignore_mtp)))
            return 0
        options = dict(overwrite=args.overwrite, resume=args.resume, quiet=args.quiet)
        run = {"from-official": lambda: from_official(args.src, args.dst, args.dtype, args.drop_mtp, **options),
               "to-official": lambda: to_official(args.src, args.dst, **options),
               "dequantize": lambda: dequantize(args.src, args.dst, **options),
               "quantize": lambda: quantize(args.src, args.dst, args.scale_fmt, **options),
               "to-mp": lambda: to_mp(args.src, args.dst, args.model_parallel, args.drop_mtp, **options),
               "from-mp": lambda: from_mp(args.src, args.dst, args.config, **options),
               "merge-lora": lambda: merge_lora(args.base, args.adapter, args.dst, **options)}[args.command]
        summary = run()
    except CheckpointError as error:
        print(f"deepseek-moe-convert {args.command}: {error}", file=sys.stderr)
        return 2
    print(f"{args.command}: {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
