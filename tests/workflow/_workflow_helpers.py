"""Run the workflow with Snakemake or DVC in a tiny workspace and tell which jobs ran.

Every job writes its own log file (logs/...), with either tool, so the jobs that ran are the ones whose log
changed; that works the same for Snakemake and DVC without parsing their console output.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from dinoflow.workflow import export_dvc

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PATH"] = f"{BIN}{os.pathsep}{e.get('PATH', '')}"  # dinoflow, snakemake, dvc of this interpreter
    e.setdefault("OMP_NUM_THREADS", "1")
    return e


def link_workflow(ws: Path) -> Path:
    """Make `ws` a workflow root: the repo's Snakefile and workflow/ linked in (so rules are never copied)."""
    for name in ("Snakefile", "workflow"):
        if not (ws / name).exists():
            (ws / name).symlink_to(REPO / name)
    return ws


def edit_params(ws: Path, section: str, key: str, value) -> None:
    path = ws / "params.yaml"
    params = yaml.safe_load(path.read_text())
    params[section][key] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def jobs(ws: Path) -> list[export_dvc.JobSpec]:
    return export_dvc.snakemake_jobs(ws)


def job_key(spec: export_dvc.JobSpec) -> tuple[str, str | None]:
    return spec.rule, spec.wildcards.get("model")


def _log_state(ws: Path, specs) -> dict[tuple[str, str | None], int | None]:
    state = {}
    for spec in specs:
        log = ws / spec.logs[0]
        state[job_key(spec)] = log.stat().st_mtime_ns if log.exists() else None
    return state


def _ran(ws: Path, specs, before) -> set[tuple[str, str | None]]:
    after = _log_state(ws, specs)
    return {k for k, v in after.items() if v is not None and v != before[k]}


def run(cmd: list[str], ws: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ws, env=env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        logs = "\n".join(f"--- {p}\n{p.read_text()[-3000:]}" for p in sorted((ws / "logs").rglob("*.log"))) \
            if (ws / "logs").exists() else ""
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode})\n{proc.stdout[-5000:]}\n"
                             f"{proc.stderr[-5000:]}\n{logs}")
    return proc


def dry_run(ws: Path, targets: list[str] = ()) -> set[tuple[str, str | None]]:
    """The (rule, model) jobs `snakemake -n` schedules in `ws` (from its job listing; target rules such as `all`
    left out)."""
    import re

    out = run([str(BIN / "snakemake"), "-n", "--cores", "1", "--nolock", *targets], ws).stdout
    scheduled, current = set(), None
    for line in out.splitlines():
        m = re.match(r"^(?:local)?rule (\w+):", line)
        if m:
            if current:
                scheduled.add(current)
            current = (m.group(1), None)
            continue
        m = re.match(r"^\s+wildcards: .*\bmodel=([^,\s]+)", line)
        if m and current:
            current = (current[0], m.group(1))
    if current:
        scheduled.add(current)
    return {j for j in scheduled if j[0] != "all"}


def snakemake(ws: Path, targets: list[str], *extra: str, specs=None) -> set[tuple[str, str | None]]:
    """Run snakemake on `targets` in `ws`; returns the (rule, model) jobs that ran (`specs`: jobs(ws), cached)."""
    specs = specs or jobs(ws)
    before = _log_state(ws, specs)
    run([str(BIN / "snakemake"), "--cores", "2", "--nolock", *extra, *targets], ws)
    return _ran(ws, specs, before)


def dvc_init(ws: Path) -> dict[tuple[str, str | None], str]:
    """`dvc init --no-scm` and the generated dvc.yaml; returns the DVC stage name of each job."""
    if not (ws / ".dvc").exists():
        run([str(BIN / "dvc"), "init", "--no-scm", "-q"], ws)
        run([str(BIN / "dvc"), "config", "core.analytics", "false"], ws)
    (ws / "dvc.yaml").write_text(export_dvc.render(ws))
    _, names = export_dvc.dvc_stages(jobs(ws))
    return names


def dvc_repro(ws: Path, stages: list[str], specs=None) -> set[tuple[str, str | None]]:
    specs = specs or jobs(ws)
    before = _log_state(ws, specs)
    run([str(BIN / "dvc"), "repro", *stages], ws)
    return _ran(ws, specs, before)


def upstream(specs, targets: set[tuple[str, str | None]]) -> set[tuple[str, str | None]]:
    """Jobs needed for `targets` (themselves included), from the DAG's files."""
    producer = {}
    for s in specs:
        for out in s.outs + s.metrics + s.plots:
            producer[out] = job_key(s)
    by_key = {job_key(s): s for s in specs}
    todo, seen = list(targets), set()
    while todo:
        k = todo.pop()
        if k in seen:
            continue
        seen.add(k)
        todo.extend(producer[d] for d in by_key[k].deps if d in producer)
    return seen


def downstream(specs, start: set[tuple[str, str | None]]) -> set[tuple[str, str | None]]:
    """`start` and every job that (transitively) reads their outputs."""
    result = set(start)
    changed = True
    while changed:
        changed = False
        outs = {o for s in specs if job_key(s) in result for o in s.outs + s.metrics + s.plots}
        for s in specs:
            if job_key(s) not in result and any(d in outs for d in s.deps):
                result.add(job_key(s))
                changed = True
    return result


def readers(specs, section: str, key: str | None = None) -> set[tuple[str, str | None]]:
    """Jobs whose rule declares `section` as a params entry, or a dotted key that covers `section.key`
    (`probes.knn_k`; without `key`: any key of the section)."""
    full = f"{section}.{key}" if key is not None else None

    def reads(declared: list[str]) -> bool:
        if section in declared:
            return True
        if full is None:
            return any(p.startswith(f"{section}.") for p in declared)
        return any(full == p or full.startswith(f"{p}.") for p in declared)

    return {job_key(s) for s in specs if reads(s.params)}


def have_stage(*modules: str) -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in modules)


def clean(ws: Path) -> None:
    for name in (".snakemake", ".dvc", "dvc.yaml", "dvc.lock"):
        p = ws / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


class TrackingParams(dict):
    """params.yaml as a dict that records which top-level sections a stage reads."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.read: set[str] = set()

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        self.read.add(key)
        return super().get(key, default)

    def __contains__(self, key):
        self.read.add(key)
        return super().__contains__(key)


def sections_read(ws: Path, stage: str, **options) -> set[str]:
    """Run `dinoflow <stage>` in-process in `ws` and return the params.yaml sections it read."""
    import importlib

    from dinoflow.cli import STAGES
    from dinoflow.config import load_params

    target = next(s.target for s in STAGES if s.name == stage)
    module, func = target.split(":")
    cwd = os.getcwd()
    os.chdir(ws)
    try:
        params = TrackingParams(load_params("params.yaml"))
        getattr(importlib.import_module(module), func)(params, **options)
    finally:
        os.chdir(cwd)
    return params.read
