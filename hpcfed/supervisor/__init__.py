"""The in-job supervisor (`hpcfed job run plan.json`, exec'd by the rendered sbatch script).

In order: (1) GPU preflight, (2) tunnel, (3) the role's workspace from its kit, (4) the role
itself (in its container when the plan has an image), (5) signals: SIGTERM and the user signal
asked for with --signal=B:SIG@lead stop the role gracefully, (6) the role's exit is reported in
the job log and in `status-JOBID.json`, and becomes the job's exit code.

Modules: job_environment (what Slurm tells the job, the job's files, `scontrol requeue`),
signals (which end a signal means), prepare (steps 1-3), role_process (step 4 and the graceful
stop), records (log, events, exit report), run (composes them). Exit codes come from the one
table in hpcfed.errors.

The parts come from other packages (hpcfed.gpu, hpcfed.container, hpcfed.kit, `hpcfed tunnel`);
each import is guarded so a part that is not installed is skipped with a log line - unless the
plan asks for it, then the job fails with a clear message.
"""

from hpcfed.supervisor.run import run_plan

__all__ = ["run_plan"]
