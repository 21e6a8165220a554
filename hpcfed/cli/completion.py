"""`hpcfed completion bash|zsh|fish`: the shell's completion script (commands, options, site
names, deployment names), from click's own completion support."""

from __future__ import annotations

import click

SHELLS = ("bash", "zsh", "fish")


@click.command()
@click.argument("shell", type=click.Choice(SHELLS))
def completion(shell):
    """Print the completion script for SHELL; load it from the shell's startup file.

    \b
    Example:
      bash:  echo 'eval "$(hpcfed completion bash)"' >> ~/.bashrc
      zsh:   echo 'eval "$(hpcfed completion zsh)"' >> ~/.zshrc
      fish:  hpcfed completion fish > ~/.config/fish/completions/hpcfed.fish
    """
    from click.shell_completion import get_completion_class

    from hpcfed.cli import cli

    comp_cls = get_completion_class(shell)
    assert comp_cls is not None  # click ships all three
    comp = comp_cls(cli, {}, "hpcfed", "_HPCFED_COMPLETE")
    click.echo(comp.source())
