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


def _leaf_parsers(parser, path=()):
    import argparse

    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
    for action in subs:
        for name, child in action.choices.items():
            yield from _leaf_parsers(child, (*path, name))


def test_every_command_takes_no_progress():
    leaves = list(_leaf_parsers(cli.build_parser()))
    assert len(leaves) >= 10
    missing = [" ".join(path) for path, p in leaves if "--no-progress" not in p._option_string_actions]
    assert missing == []


@pytest.mark.parametrize("where", ["before", "after", "env"])
def test_no_progress_silences_the_bars(where, monkeypatch, capsys, tmp_path):
    """With stderr a terminal, `cgnn graphs` shows a bar; --no-progress (either side) or the env var hides it."""
    import sys

    from cgnn_dgl import report

    monkeypatch.setattr(report, "_PROGRESS_OFF", False)
    monkeypatch.delenv("CGNN_NO_PROGRESS", raising=False)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert cli.main(["examples", "--out", str(tmp_path / "cifs"), "--limit", "12"]) == 0
    argv = ["graphs", str(tmp_path / "cifs"), "--out", str(tmp_path / "shown"), "--workers", "1"]
    assert cli.main(argv) == 0
    shown = capsys.readouterr().err
    assert "struct" in shown and "%" in shown  # the bar is there when nothing turns it off

    argv[argv.index("--out") + 1] = str(tmp_path / "quiet")
    if where == "before":
        argv = ["--no-progress", *argv]
    elif where == "after":
        argv = [*argv, "--no-progress"]
    else:
        monkeypatch.setenv("CGNN_NO_PROGRESS", "1")
    assert cli.main(argv) == 0
    quiet = capsys.readouterr().err
    assert "%|" not in quiet and "struct/s" not in quiet


def test_every_option_and_argument_has_a_help_text():
    """Issue 8.10: options without help (graphs --workers, evaluate --run, ...) left users guessing."""
    import argparse

    bare = [f"{' '.join(path)} {a.option_strings or a.dest}" for path, p in _leaf_parsers(cli.build_parser())
            for a in p._actions if not isinstance(a, argparse._HelpAction) and not a.help]
    assert bare == []
