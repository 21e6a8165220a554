"""`hpcfed job run PLAN.json`: the in-job entry the rendered sbatch script execs."""

from __future__ import annotations

import sys

import click


@click.group()
def job():
    """Commands that run inside a Slurm job (called by the rendered sbatch script).

    \b
    Example:
      hpcfed job run plan.json
    """


@job.command("run")
@click.argument("plan_file", type=click.Path(exists=True, dir_okay=False))
def run(plan_file):
    """Run the role of PLAN_FILE: preflight, tunnel, workspace, role, signals, exit report.

    \b
    Example:
      hpcfed job run plan.json
    """
    from hpcfed.supervisor import run_plan

    sys.exit(run_plan(plan_file))
