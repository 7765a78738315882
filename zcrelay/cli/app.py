"""The typer application every command registers on, the command class its help is rendered
with, and the options several commands share."""

import typer
from typer.core import TyperArgument, TyperCommand

from zcrelay.cli._click import StringParamType


class _Named(StringParamType):
    """A string argument's type that adds nothing to its metavar in the help table."""

    def get_metavar(self, param, ctx) -> str:
        return ""


def _reflowed(text: str) -> str:
    """Each paragraph of a docstring on one line: with rich markup, typer keeps a docstring's line
    breaks, so the root --help broke send's summary after "1 if"."""
    return "\n\n".join(block if block.startswith("\b") else " ".join(block.split())
                       for block in text.split("\n\n"))


class Command(TyperCommand):
    """typer's command, with --help that reads like a man page's synopsis. No parameter of typer
    0.28 does any of this (typer/core.py, typer/rich_utils.py):

    - a required argument is ADDR in the usage line, where typer writes {ADDR};
    - an argument's row shows its metavar only: typer added the type, as <str>, when the type
      names no metavar of its own;
    - a count option (-v) shows no metavar and no default: typer showed "<int>" and
      "[default: 0]", as if it took a value (fastapi/typer#1869);
    - a number's range is not appended to its metavar ("SECONDS [x>=0]"): that column squeezed
      forward's help texts to 22 characters at 80 columns. An option whose bounds are not
      obvious states them in its help (tests/test_docs.py checks it), and a value out of range
      is refused with the range, as before."""

    def __init__(self, name, *, params=None, help=None, **kwargs):
        for param in params or ():
            if isinstance(param, TyperArgument) and param.metavar and type(param.type) is StringParamType:
                param.type = _Named()
            if getattr(param, "count", False):
                param.metavar, param.show_default = "", False
        super().__init__(name, params=params, help=_reflowed(help) if help else help, **kwargs)

    def collect_usage_pieces(self, ctx) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if isinstance(param, TyperArgument) and param.required:
                pieces.append(param.make_metavar(ctx))
            else:
                pieces.extend(param.get_usage_pieces(ctx))
        return pieces

    def format_help(self, ctx, formatter) -> None:
        try:  # imported here: rich is no start-up cost of a command that prints no help
            from typer import rich_utils
        except ImportError:  # typer without rich: click's plain help, as it is
            return super().format_help(ctx, formatter)
        # rich_utils' format for the " [x>=0]" after a number's metavar, one of the module's
        # settings (rich-click's, which it took over); set only while this help is rendered.
        saved, rich_utils.RANGE_STRING = rich_utils.RANGE_STRING, ""
        try:
            super().format_help(ctx, formatter)
        finally:
            rich_utils.RANGE_STRING = saved


class _Typer(typer.Typer):
    """A Typer whose commands are Commands, unless one asks for another class."""

    def command(self, name=None, *, cls=None, **kwargs):
        return super().command(name, cls=cls or Command, **kwargs)


app = _Typer(
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


# The address forms zcrelay.addresses.parse takes, for the help of each address a command takes
# (tests/test_docs.py checks them against the parser).
LISTEN_FORMS = ("PORT (binds 127.0.0.1), :PORT (every interface), HOST:PORT, [IPV6]:PORT, unix:PATH, "
                "unix:@NAME (abstract); port 0 picks a free port")
TARGET_FORMS = "PORT (127.0.0.1:PORT), HOST:PORT, [IPV6]:PORT, unix:PATH, unix:@NAME (abstract)"

PROGRESS = typer.Option(None, "--progress/--no-progress", help="Show a progress display on stderr.  \\[default: when stderr is a terminal and the data's stdin and stdout are not]", show_default=False)
TARGET = typer.Argument(..., metavar="ADDR", help=f"Where to connect: {TARGET_FORMS}.", show_default=False)
