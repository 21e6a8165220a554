"""The `hpcfed` command line.

Sub-commands live one module per concern in this package and are imported only when used, so
`hpcfed --help` starts fast on a login node. A sub-command whose module is absent is simply not
listed. Errors: every HpcfedError becomes one line on stderr and its exit code (hpcfed.errors).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys

import click

from hpcfed.errors import ExitCode, HpcfedError

# command name -> "module:attribute" (module relative to hpcfed.cli)
COMMANDS: dict[str, str] = {
    "testcluster": "testcluster:testcluster",
    "submit": "deploy:submit",
    "status": "deploy:status",
    "logs": "deploy:logs",
    "cancel": "deploy:cancel",
    "sites": "sites:sites",
    "doctor": "doctor:doctor",
    "kit": "kit:kit",
    "image": "image:image",
    "gpus": "gpus:gpus",
    "tunnel": "tunnel:tunnel",
    "vpn": "tunnel:vpn",
    "hub": "hub:hub",
    "rejoin": "rejoin:rejoin",
    "cron": "rejoin:cron",
    "job": "job:job",
    "completion": "completion:completion",
}


class LazyGroup(click.Group):
    def _target(self, name: str):
        spec = COMMANDS.get(name)
        if spec is None:
            return None, None
        module, attr = spec.split(":")
        return f"hpcfed.cli.{module}", attr

    def list_commands(self, ctx):
        names = set(super().list_commands(ctx))
        for name in COMMANDS:
            module, _ = self._target(name)
            if importlib.util.find_spec(module) is not None:
                names.add(name)
        return sorted(names)

    def get_command(self, ctx, name):
        cmd = super().get_command(ctx, name)
        if cmd is not None:
            return cmd
        module, attr = self._target(name)
        if module is None or importlib.util.find_spec(module) is None:
            return None
        return getattr(importlib.import_module(module), attr, None)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="hpcfed", prog_name="hpcfed")
def cli():
    """Run federated-learning roles as Apptainer containers in Slurm GPU jobs.

    \b
    Example:
      hpcfed submit client --site ohsu --gpus 2 --dry-run
      hpcfed status --json
    """


def main(argv=None) -> None:
    """Entry point: run the CLI; turn known errors into one line and an exit code."""
    try:
        cli.main(args=argv, prog_name="hpcfed", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("hpcfed: aborted", err=True)
        sys.exit(ExitCode.INTERRUPTED)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except HpcfedError as exc:
        click.echo(f"hpcfed: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("hpcfed: interrupted", err=True)
        sys.exit(ExitCode.INTERRUPTED)
    except BrokenPipeError:
        sys.exit(ExitCode.OK)
    except Exception as exc:  # a bug: still no traceback unless asked for
        if os.environ.get("HPCFED_DEBUG"):
            raise
        click.echo(
            f"hpcfed: internal error: {type(exc).__name__}: {exc} "
            "(run with HPCFED_DEBUG=1 for the traceback)",
            err=True,
        )
        sys.exit(ExitCode.INTERNAL)
    sys.exit(ExitCode.OK)
