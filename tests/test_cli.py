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


def _omp_policy(env_extra: dict[str, str]) -> str:
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"} | env_extra
    code = ("import sys; import dinoflow; assert 'torch' not in sys.modules, 'torch imported before the CLI module';"
            " import dinoflow.cli, os; print(os.environ['OMP_WAIT_POLICY'])")
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_cli_sets_passive_openmp_wait_before_torch_and_respects_the_user():
    assert _omp_policy({}) == "PASSIVE"
    assert _omp_policy({"OMP_WAIT_POLICY": "ACTIVE"}) == "ACTIVE"
