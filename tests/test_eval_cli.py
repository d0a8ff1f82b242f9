"""The ahfa-eval command line: help text, and bad input ending in one line with exit status 2."""

from __future__ import annotations

import argparse
import re

import pytest
import torch

from hf_ahfa.eval import cli
from hf_ahfa.eval.perplexity_data import document_start_token
from hf_ahfa.eval.runs import resolve_dtype
from hf_ahfa.eval.usage import HelpFormatter, UsageError


def _help(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as exit_:
        cli.main([*argv, "--help"])
    assert exit_.value.code == 0
    return capsys.readouterr().out


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    for command in cli.COMMANDS:
        command.add_parser(sub)
    return sub.choices


def test_every_command_and_option_has_plain_help(capsys):
    commands = _subparsers()
    assert sorted(commands) == ["calibrate", "glue", "needle", "perplexity", "speed", "train"]
    top = _help(capsys)
    assert all(name in top for name in commands) and "``" not in top
    for name, parser in commands.items():
        text = _help(capsys, name)
        assert parser.description and parser.description.splitlines()[0] in text
        assert "``" not in text, f"{name}: reStructuredText in the help"
        for action in parser._actions:
            if action.option_strings and action.help is not argparse.SUPPRESS:
                assert action.help, f"{name} {action.option_strings[0]} has no help"


def test_help_shows_defaults_the_way_options_take_them():
    parser = argparse.ArgumentParser(formatter_class=HelpFormatter)
    parser.add_argument("--lens", type=int, nargs="+", default=[1, 2], help="lengths")
    parser.add_argument("--sizes", default=[3, 4], help="sizes, comma-separated")
    parser.add_argument("--zero", type=int, default=0, help="a zero")
    parser.add_argument("--unset", help="nothing by default")
    parser.add_argument("--flag", action="store_true", help="a flag")
    text = " ".join(parser.format_help().split())
    assert "lengths (default: 1 2)" in text and "sizes, comma-separated (default: 3,4)" in text
    assert "a zero (default: 0)" in text
    assert "(default: None)" not in text and "(default: False)" not in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="the kernel sweep runs where there is a GPU")
def test_speed_without_gpu_is_a_one_line_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["speed"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err == "ahfa-eval speed: error: kernel benchmarks need a CUDA GPU " \
        "(pass --model for whole-model measurements)\n"


def test_helpers_raise_usage_error_not_system_exit():
    class NoBos:
        bos_token_id = None

    with pytest.raises(UsageError, match="--window-start bos: the tokenizer has no BOS token"):
        document_start_token(NoBos(), "bos")
    with pytest.raises(UsageError, match="--dtype must be"):
        resolve_dtype("int8", "cpu")


def test_speed_bad_tau_and_missing_model_are_one_line(capsys, tmp_path):
    for argv, message in ((["speed", "--model", str(tmp_path / "none")], r"--model path .*none does not exist"),
                          (["speed", "--model", "x", "--mode", "adaptive", "--tau", "2"], r"--mode/--tau/--skip-mass: tau must be in")):
        with pytest.raises(SystemExit) as exit_:
            cli.main(argv)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and len(err.splitlines()) == 1 and re.search(message, err), err
