"""The deepseek-moe-convert command line (deepseek_moe_convert.py) and its conversion/*.py scripts: help that
answers without importing torch, plain words for every argument, usage errors in the terms of the
subcommand or script that was run."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys

import pytest

import deepseek_moe_convert
from deepseek_moe_convert import COMMANDS, main, tool_parser

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(ROOT, "conversion")
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}


def run_python(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *arguments], capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=120)


def test_help_imports_neither_torch_nor_transformers_nor_the_package():
    """The package registers its models with transformers on import (seconds of torch and transformers):
    --help of the tool and of every subcommand must not need it."""
    heavy = ("torch", "transformers", "modeling_deepseek_moe")
    script = ("import sys, deepseek_moe_convert\n"
              f"for argv in [['--help'], *[[name, '--help'] for name in deepseek_moe_convert.COMMANDS]]:\n"
              "    try:\n        deepseek_moe_convert.main(argv)\n    except SystemExit:\n        pass\n"
              f"print('imported:', [m for m in {heavy!r} if m in sys.modules])")
    done = run_python("-c", script)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("imported: []")


def every_action():
    parser, parsers = tool_parser()
    for name, sub in [(deepseek_moe_convert.PROG, parser), *parsers.items()]:
        for action in sub._actions:  # argparse keeps no public list of a parser's arguments
            if not isinstance(action, argparse._SubParsersAction):
                yield name, action


def test_every_argument_has_help_in_plain_words():
    for command, action in every_action():
        name = "/".join(action.option_strings) or action.dest
        assert action.help and action.help != argparse.SUPPRESS, f"{command} {name} has no help"
        assert not re.search(r"``|:func:|:class:|:mod:", action.help), f"{command} {name}: {action.help}"
    parser, parsers = tool_parser()
    for text in [parser.format_help(), *(sub.format_help() for sub in parsers.values())]:
        assert not re.search(r"``|:func:|:class:|:mod:", text)


def test_tool_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert all(f"  {name}  " in out for name in COMMANDS)


@pytest.mark.parametrize("argv, usage", [
    (["to-mp", "src", "dst", "--model-paralel", "2"], "usage: deepseek-moe-convert to-mp"),  # misspelt required flag
    (["to-mp", "src", "dst", "--model-parallel", "2", "--bogus"], "usage: deepseek-moe-convert to-mp"),
    (["dequantize", "src", "dst", "extra"], "usage: deepseek-moe-convert dequantize"),
    (["quantize", "src", "dst", "--scale-fmt", "e5m2"], "usage: deepseek-moe-convert quantize"),
])
def test_usage_errors_show_the_subcommands_usage(capsys, argv, usage):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith(usage), err
    assert f"deepseek-moe-convert {argv[0]}: error:" in err


def test_every_subcommand_has_a_script_that_names_itself():
    scripts = sorted(f for f in os.listdir(SCRIPTS) if f.endswith(".py"))
    assert scripts == sorted(f"{name.replace('-', '_')}.py" for name in COMMANDS)
    done = run_python(os.path.join("conversion", "to_mp.py"), "src", "dst", "--bogus")
    assert done.returncode == 2
    assert done.stderr.startswith("usage: to_mp.py [-h] --model-parallel N") and "to_mp.py: error:" in done.stderr
    assert "deepseek-moe-convert" not in done.stderr
