"""click's exception classes and parameter types, wherever this typer keeps them: typer up to
0.2x depends on click, later versions vendor it as typer._click. Nothing else of click is used
directly."""

try:
    from typer._click import exceptions, types
except ImportError:  # typer that depends on the click package
    # click is not installed beside a typer that vendors it (mypy sees this typer's first).
    from click import exceptions, types  # type: ignore[import-not-found, no-redef]

UsageError = exceptions.UsageError
ClickException = exceptions.ClickException
FloatParamType = types.FloatParamType
StringParamType = types.StringParamType
import typer

Abort = typer.Abort
