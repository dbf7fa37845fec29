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


@pytest.fixture
def fp8_source(tmp_path) -> str:
    from modeling_deepseek_moe.synthetic import write_fp8_official_checkpoint

    write_fp8_official_checkpoint(tmp_path / "src", "v3", num_shards=3)
    return str(tmp_path / "src")


def interrupt_in_second_shard(monkeypatch):
    """Ctrl-C while the second shard is being written."""
    from modeling_deepseek_moe.conversion import engine

    class Writer(engine.SafetensorsWriter):
        opened = 0

        def __enter__(self):
            Writer.opened += 1
            return self

        def add(self, key, tensor):
            if Writer.opened == 2:
                raise KeyboardInterrupt
            super().add(key, tensor)

    monkeypatch.setattr(engine, "SafetensorsWriter", Writer)


def test_an_interrupt_says_how_to_resume_and_a_rerun_asks_for_resume_or_overwrite(tmp_path, fp8_source, capsys, monkeypatch):
    dst = str(tmp_path / "dst")
    interrupt_in_second_shard(monkeypatch)
    assert main(["dequantize", fp8_source, dst, "--quiet"]) == 130
    err = capsys.readouterr().err
    assert err == (f"deepseek-moe-convert dequantize: interrupted with 1 of 3 shards finished in {dst}.partial: run the "
                   "same command with --resume to continue (or --overwrite to start over)\n")
    monkeypatch.undo()

    assert main(["dequantize", fp8_source, dst, "--quiet"]) == 2  # not silently started over
    assert capsys.readouterr().err == (f"deepseek-moe-convert dequantize: {dst}.partial holds an interrupted conversion "
                                       "(dequantize, finished shards: 1): pass --resume to continue it, or --overwrite to start over\n")
    assert main(["quantize", fp8_source, dst, "--resume", "--quiet"]) == 2
    assert "holds a different conversion (dequantize of" in capsys.readouterr().err
    assert main(["dequantize", fp8_source, dst, "--resume", "--quiet"]) == 0
    assert "1 finished shards reused" in capsys.readouterr().out
    assert main(["dequantize", fp8_source, str(tmp_path / "again"), "--quiet"]) == 0
    assert main(["verify", dst, str(tmp_path / "again"), "--quiet"]) == 0
    assert '"max_abs_diff": 0.0' in capsys.readouterr().out


def test_overwrite_starts_an_interrupted_conversion_over(tmp_path, fp8_source, capsys, monkeypatch):
    interrupt_in_second_shard(monkeypatch)
    assert main(["dequantize", fp8_source, str(tmp_path / "dst"), "--quiet"]) == 130
    monkeypatch.undo()
    assert main(["dequantize", fp8_source, str(tmp_path / "dst"), "--overwrite", "--quiet"]) == 0
    assert "reused" not in capsys.readouterr().out and not os.path.exists(tmp_path / "dst.partial")


@pytest.mark.parametrize("command", ["quantize", "merge-lora", "dequantize", "verify"])
def test_the_final_progress_bar_is_drawn_once(tmp_path, fp8_source, capsys, monkeypatch, command):
    """tqdm draws the last update and again when closed; with every update drawn (mininterval=0) a log
    showed the 100% line twice."""
    import functools

    from modeling_deepseek_moe.conversion import engine

    monkeypatch.setattr(engine, "tqdm", functools.partial(engine.tqdm, mininterval=0))
    if command == "quantize":
        assert main(["dequantize", fp8_source, str(tmp_path / "bf16"), "--quiet"]) == 0
        argv = ["quantize", str(tmp_path / "bf16"), str(tmp_path / "dst")]
    elif command == "merge-lora":
        (tmp_path / "adapter").mkdir()  # an adapter that changes nothing: no LoRA factor at all
        (tmp_path / "adapter" / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4, "lora_alpha": 8}')
        from safetensors.torch import save_file
        save_file({}, str(tmp_path / "adapter" / "adapter_model.safetensors"))
        argv = ["merge-lora", fp8_source, str(tmp_path / "adapter"), str(tmp_path / "dst")]
    elif command == "dequantize":
        argv = ["dequantize", fp8_source, str(tmp_path / "dst")]
    else:
        argv = ["verify", fp8_source, fp8_source]
    capsys.readouterr()
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert err.count("100%") == 1, err


def test_the_command_lines_choices_are_the_librarys():
    """The command line cannot import the package to read them (--help would load torch): same lists."""
    from modeling_deepseek_moe.conversion.configs import DTYPES
    from modeling_deepseek_moe.fp8 import SCALE_FORMATS

    choices = {flags[0]: keywords.get("choices") for command in COMMANDS.values() for flags, keywords in command.arguments}
    assert tuple(choices["--dtype"]) == DTYPES and tuple(choices["--scale-fmt"]) == SCALE_FORMATS
