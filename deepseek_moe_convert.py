"""The ``deepseek-moe-convert`` command line and the ``conversion/*.py`` scripts: parse the arguments, then
run one function of ``modeling_deepseek_moe.conversion``.

This module sits outside the package on purpose: importing ``modeling_deepseek_moe`` registers the model
families with transformers, which loads torch and transformers (seconds). Here the arguments are parsed
with the standard library alone, so that ``--help`` and usage errors answer at once; the package is
imported only when a command runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass

PROG = "deepseek-moe-convert"
DESCRIPTION = """\
Convert DeepSeek MoE checkpoints (DeepSeekMoE V1, DeepSeek-V2, DeepSeek-V3): between DeepSeek's released \
format and this package's, between FP8 and BF16, and to and from DeepSeek-V3's inference format; merge a \
LoRA adapter into its base; compare two checkpoints.

Every command checks its input before writing anything and stops with one line naming the file, tensor \
or config field at fault (exit status 2). It writes into DST.partial and renames that to DST when done; \
if it is interrupted, run the same command again with --resume to continue where it stopped."""


@dataclass
class Command:
    """One subcommand: its line in the tool's help, its own help, its arguments, and how it runs."""

    summary: str
    description: str
    arguments: list[tuple[tuple[str, ...], dict]]  # (name or flags, argparse keywords), in order
    run: Callable  # (conversion module, parsed arguments, **options) -> what the command prints
    writes: bool = True  # takes DST, --overwrite and --resume


SRC = (("src",), dict(help="the checkpoint folder to read (config.json and .safetensors files)"))
DST = (("dst",), dict(help="the folder to write; it must not exist, or be empty unless --overwrite is given"))
WRITING = [
    (("--overwrite",), dict(action="store_true", help="replace DST if it holds files, and start over instead of "
                                                       "continuing an interrupted run left in DST.partial")),
    (("--resume",), dict(action="store_true", help="continue the interrupted run left in DST.partial, keeping the "
                                                    "shards it finished")),
]
QUIET = (("--quiet",), dict(action="store_true", help="do not show the progress bar"))

COMMANDS = {
    "from-official": Command(
        "DeepSeek's released format -> this package's format",
        "Convert a checkpoint folder in DeepSeek's released format into this package's format: the same tensors, "
        "a config.json that names this package's model classes, and the modeling code, so that transformers "
        "loads the folder (with trust_remote_code) where this package is not installed.",
        [SRC, DST,
         (("--dtype",), dict(choices=["keep", "bf16", "fp8"], default="keep",
                             help="keep: the weights as they are (default); bf16: FP8 weights dequantized to bfloat16; "
                                  "fp8: the weights DeepSeek quantizes, quantized to its block-wise FP8")),
         (("--drop-mtp",), dict(action="store_true", help="leave out DeepSeek-V3's multi-token-prediction layer"))],
        lambda conversion, a, **options: conversion.from_official(a.src, a.dst, a.dtype, a.drop_mtp, **options)),
    "to-official": Command(
        "this package's format -> DeepSeek's released format",
        "Convert a folder in this package's format back to DeepSeek's config.json schema (DeepSeek's model_type, "
        "rope_theta and rope_scaling; this package's own fields removed). The tensors are copied unchanged, so "
        "from-official followed by to-official gives back the original files bit for bit.",
        [SRC, DST],
        lambda conversion, a, **options: conversion.to_official(a.src, a.dst, **options)),
    "dequantize": Command(
        "FP8 -> BF16, on the CPU",
        "Turn a checkpoint in DeepSeek-V3's block-wise FP8 format into bfloat16: each FP8 weight multiplied by "
        "its block scales, the scales and the quantization_config removed. Runs on the CPU; no GPU needed.",
        [SRC, DST],
        lambda conversion, a, **options: conversion.dequantize(a.src, a.dst, **options)),
    "quantize": Command(
        "BF16 -> DeepSeek's block-wise FP8",
        "Quantize a bfloat16 or float32 checkpoint to DeepSeek-V3's block-wise FP8: exactly the weights DeepSeek "
        "stores in FP8 (attention and MLP projections), each 128 x 128 block with its own scale; embeddings, norms, "
        "router and output head stay as they are.",
        [SRC, DST,
         (("--scale-fmt",), dict(choices=["float", "ue8m0"], default="float",
                                 help="float: scales as computed, as in DeepSeek-V3 (default); ue8m0: scales rounded "
                                      "up to powers of two, as in DeepSeek-V3.1"))],
        lambda conversion, a, **options: conversion.quantize(a.src, a.dst, a.scale_fmt, **options)),
    "to-mp": Command(
        "-> DeepSeek-V3's inference format (one file per GPU)",
        "Write the format that DeepSeek-V3's inference code loads (what its inference/convert.py writes): one file "
        "model{i}-mp{N}.safetensors per GPU, the routed experts divided among the GPUs, the other weights split or "
        "copied. V2 and V3 models only. The format has no multi-token-prediction layer, so a DeepSeek-V3 source "
        "needs --drop-mtp.",
        [SRC, DST,
         (("--model-parallel",), dict(type=int, required=True, metavar="N",
                                      help="how many GPUs (files) to split the model over; it must divide the number "
                                           "of routed experts")),
         (("--drop-mtp",), dict(action="store_true",
                                help="leave out DeepSeek-V3's multi-token-prediction layer, which the format cannot "
                                     "hold (needed when the source has one; from-mp cannot bring it back)"))],
        lambda conversion, a, **options: conversion.to_mp(a.src, a.dst, a.model_parallel, a.drop_mtp, **options)),
    "from-mp": Command(
        "DeepSeek-V3's inference format -> DeepSeek's released format",
        "Join the model{i}-mp{N}.safetensors files of DeepSeek-V3's inference format back into a folder in "
        "DeepSeek's released format, sharded, with an index. The inference format keeps no config: give the "
        "model's config.json with --config.",
        [(("src",), dict(help="the folder holding the model{i}-mp{N}.safetensors files")), DST,
         (("--config",), dict(required=True, metavar="CONFIG_JSON",
                              help="the model's config.json, from its released folder"))],
        lambda conversion, a, **options: conversion.from_mp(a.src, a.dst, a.config, **options)),
    "merge-lora": Command(
        "merge a LoRA adapter into its base checkpoint",
        "Add a PEFT LoRA adapter (including this package's LoRA on routed experts) into the weights of its base "
        "checkpoint: W + scaling * B A, computed in float32. FP8 weights are dequantized, merged and quantized "
        "again with the base's scale format; every other tensor is copied unchanged.",
        [(("base",), dict(help="the base model's checkpoint folder (DeepSeek's format or this package's)")),
         (("adapter",), dict(help="the adapter folder, as PEFT saves it (adapter_config.json and "
                                  "adapter_model.safetensors)")),
         DST],
        lambda conversion, a, **options: conversion.merge_lora(a.base, a.adapter, a.dst, **options)),
    "verify": Command(
        "compare two checkpoints tensor by tensor",
        "Compare two checkpoint folders tensor by tensor, FP8 weights dequantized first (so that an FP8 folder "
        "compares with its BF16 copy), and print the largest absolute and relative differences as JSON.",
        [(("a",), dict(help="a checkpoint folder")),
         (("b",), dict(help="the checkpoint folder to compare it with")),
         (("--ignore-mtp",), dict(action="store_true",
                                  help="when the only tensors one folder lacks are DeepSeek-V3's multi-token-prediction "
                                       "layer (as after to-mp --drop-mtp and from-mp), compare the others"))],
        lambda conversion, a, **options: conversion.verify(a.a, a.b, ignore_mtp=a.ignore_mtp, **options),
        writes=False),
}


def paragraphs(text: str) -> str:
    """``text`` wrapped paragraph by paragraph at argparse's width (argparse would run them together)."""
    width = shutil.get_terminal_size().columns - 2
    return "\n\n".join(textwrap.fill(paragraph, width) for paragraph in text.split("\n\n"))


def command_list() -> str:
    """The tool's list of commands (argparse's own misaligns names longer than its help column)."""
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {command.summary}" for name, command in COMMANDS.items()]
    return "commands:\n" + "\n".join(lines) + f"\n\nRun '{PROG} COMMAND --help' for the arguments of a command."


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    command = COMMANDS[name]
    for flags, keywords in command.arguments + (WRITING if command.writes else []) + [QUIET]:
        parser.add_argument(*flags, **keywords)


def tool_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The ``deepseek-moe-convert`` parser and its subcommands' parsers."""
    parser = argparse.ArgumentParser(prog=PROG, usage=f"{PROG} [-h] COMMAND ...", description=paragraphs(DESCRIPTION),
                                     epilog=command_list(), formatter_class=argparse.RawDescriptionHelpFormatter)
    subcommands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", help=argparse.SUPPRESS)
    parsers = {}
    for name, command in COMMANDS.items():
        parsers[name] = subcommands.add_parser(name, prog=f"{PROG} {name}", description=paragraphs(command.description),
                                               formatter_class=argparse.RawDescriptionHelpFormatter)
        add_arguments(parsers[name], name)
    return parser, parsers


def command_parser(name: str, prog: str) -> argparse.ArgumentParser:
    """One subcommand's parser, as the script ``prog`` (e.g. ``conversion/dequantize.py``)."""
    parser = argparse.ArgumentParser(prog=prog, description=paragraphs(COMMANDS[name].description),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, name)
    return parser


def main(argv: Sequence[str] | None = None, command: str | None = None) -> int:
    """``deepseek-moe-convert COMMAND ...`` or, with ``command``, that command as a script named after
    ``sys.argv[0]``. Returns the exit status: 0 done, 2 refused (one line on stderr), 130 interrupted (Ctrl-C)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if command is None:
        parser, parsers = tool_parser()
        args, unknown = parser.parse_known_args(argv)
        command, prog = args.command, parsers[args.command].prog
        if unknown:  # the subcommand's usage, not the tool's
            parsers[command].error(f"unrecognized arguments: {' '.join(unknown)}")
    else:
        parser = command_parser(command, os.path.basename(sys.argv[0]))
        args, prog = parser.parse_args(argv), parser.prog
    return run(command, args, prog)


def run(command: str, args: argparse.Namespace, prog: str) -> int:
    try:
        from modeling_deepseek_moe import conversion
        from modeling_deepseek_moe.safetensors_io import CheckpointError
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; nothing was written", file=sys.stderr)
        return 130
    options = {"quiet": args.quiet}
    if COMMANDS[command].writes:
        options.update(overwrite=args.overwrite, resume=args.resume)
    try:
        result = COMMANDS[command].run(conversion, args, **options)
    except CheckpointError as error:
        print(f"{prog}: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:  # the engine's says what is finished and how to resume
        print(f"{prog}: {interrupt or 'interrupted; nothing was written'}", file=sys.stderr)
        return 130
    print(json.dumps(result) if command == "verify" else f"{command}: {result}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
