"""The CLI's shared behaviour (issue 8.10): -v before or after the subcommand, and what Ctrl-C says."""
from __future__ import annotations

import pytest

from cgnn_dgl import cli


@pytest.mark.parametrize("argv", [["-v", "graphs", "x", "--out", "y"], ["graphs", "x", "--out", "y", "-v"],
                                  ["cache", "info", "c", "-v"]])
def test_verbose_before_or_after_the_subcommand(argv):
    assert cli.build_parser().parse_args(argv).verbose is True


def test_without_verbose_it_is_off():
    assert cli.build_parser().parse_args(["graphs", "x", "--out", "y"]).verbose is False


@pytest.mark.parametrize("command, expected", [("train", "with --resume"), ("graphs", "the same command again")])
def test_ctrl_c_says_how_to_resume(monkeypatch, capsys, command, expected):
    real = cli.build_parser

    def parser_whose_command_is_interrupted():
        p = real()

        def interrupted(args):
            raise KeyboardInterrupt

        for action in p._actions:
            if hasattr(action, "choices") and isinstance(action.choices, dict) and command in action.choices:
                action.choices[command].set_defaults(func=interrupted)
        return p

    monkeypatch.setattr(cli, "build_parser", parser_whose_command_is_interrupted)
    argv = {"train": ["train", "--config", "c.yaml"], "graphs": ["graphs", "x", "--out", "y"]}[command]
    assert cli.main(argv) == 130
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1


@pytest.mark.parametrize("argv", [["examples", "--out", "x", "--limit", "-3"], ["examples", "--out", "x", "--limit", "0"],
                                  ["graphs", "a", "--out", "c", "--workers", "0"],
                                  ["graphs", "a", "--out", "c", "--shard-size", "two"]])
def test_counts_below_one_are_one_line_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.build_parser().parse_args(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "expected a whole number >= 1" in err and err.count("\n") == 1
