"""`walkaudit version` and `walkaudit help [COMMAND]`."""

from __future__ import annotations

import click

from walkaudit import __version__
from walkaudit.cli.app import main


@main.command("version")
def version_command():
    """Print walkaudit's version."""
    click.echo(f"walkaudit, version {__version__}")


@main.command("help")
@click.argument("command", required=False)
@click.pass_context
def help_command(ctx, command):
    """Show the help of walkaudit, or of one COMMAND (the same as 'walkaudit COMMAND --help')."""
    group = ctx.parent.command
    if command is None:
        click.echo(group.get_help(ctx.parent))
        return
    cmd = group.get_command(ctx.parent, command)
    if cmd is None:
        raise click.UsageError(f"no command {command!r} (commands: {', '.join(group.list_commands(ctx.parent))})",
                               ctx=ctx)
    with click.Context(cmd, info_name=command, parent=ctx.parent) as sub:
        click.echo(cmd.get_help(sub))
