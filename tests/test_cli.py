"""`dinoflow --help` and every stage's `--help` work (argparse formats help text with %-placeholders)."""

from __future__ import annotations

import pytest

from dinoflow.cli import STAGES, build_parser


def test_top_level_help_lists_every_stage(capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for stage in STAGES:
        assert stage.name in out


@pytest.mark.parametrize("stage", [s.name for s in STAGES])
def test_stage_help(stage, capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args([stage, "--help"])
    assert exc.value.code == 0
    assert "--params" in capsys.readouterr().out
