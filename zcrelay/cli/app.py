"""The typer application every command registers on, and the options several commands share."""

import typer

app = typer.Typer(
    name="zcrelay",
    help="Zero-copy relay for Linux: port forwarding, stream capture and netcat-style pipes, "
    "moving payloads with splice(2), tee(2) and sendfile(2) so they never enter user space.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        from zcrelay import __version__

        typer.echo(f"zcrelay {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """Zero-copy relay for Linux: port forwarding, stream capture and netcat-style pipes,
    moving payloads with splice(2), tee(2) and sendfile(2) so they never enter user space."""


PROGRESS = typer.Option(None, "--progress/--no-progress", help="Show a progress display on stderr.  \\[default: when stderr is a terminal and the data's stdin and stdout are not]", show_default=False)
