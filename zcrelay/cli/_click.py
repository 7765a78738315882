"""click's exception classes, wherever this typer keeps them: typer up to 0.2x depends on click,
later versions vendor it as typer._click. Nothing else of click is used directly."""

try:
    from typer._click import exceptions
except ImportError:  # typer that depends on the click package
    from click import exceptions

UsageError = exceptions.UsageError
ClickException = exceptions.ClickException
import typer

Abort = typer.Abort
