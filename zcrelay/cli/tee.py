"""`zcrelay tee FILE...` (a tee(1) that never copies) and
`zcrelay tee --listen L --target T --capture-dir DIR` (a forwarder that records each direction).

The pipeline mode itself is zcrelay.cli.teepipe, which `zcrelay tee [-a] FILE...` reaches
without typer.
"""

from __future__ import annotations

from typing import Optional

import typer

from zcrelay.cli.app import LISTEN_FORMS, PROGRESS, TARGET_FORMS, app
from zcrelay.cli.common import address, pipe_size_value, setup_logging
from zcrelay.cli.teepipe import APPEND_FLAGS, PIPE_SIZE, run_pipeline_tee
from zcrelay.exitcodes import ExitCode
from zcrelay.tee import DEFAULT, MODES

OUTPUT_ERROR_HELP = (
    "What an error writing an output does (GNU tee's modes): warn, warn-nopipe, exit, exit-nopipe. "
    "Default, as GNU tee without the option: an output pipe that closes ends zcrelay tee at once as "
    "SIGPIPE would (status 141 in a shell); errors on other outputs are reported, that output is "
    "dropped, the rest continue, and the exit status is 9. Unlike GNU tee, a SIGPIPE ignored by "
    "whoever started zcrelay (trap '' PIPE, a systemd service) still ends it so: Python cannot tell; "
    "use -p to carry on.")


def _relay_capture(listen, target, capture_dir: str, pipe_size: int) -> ExitCode:
    """`zcrelay tee --listen L --target T --capture-dir DIR`: `zcrelay forward L T
    --capture-dir DIR` with forward's defaults."""
    from zcrelay.cli.forward import capture_directory, check_rules, run_forwarder
    from zcrelay.forward import ForwardConfig, Rule

    rule = Rule(listen, target)
    check_rules([("--listen/--target", rule)])  # a relay to its own listener: as forward refuses it
    settings = ForwardConfig(rules=(rule,), pipe_size=pipe_size,
                             capture_dir=capture_directory(capture_dir))
    return run_forwarder(settings, f" (capturing to {capture_dir})")


@app.command()
def tee(
    files: Optional[list[str]] = typer.Argument(None, metavar="[FILE]...", help="Files to write as well as standard output.", show_default=False),
    append: bool = typer.Option(False, *APPEND_FLAGS, help="Append to the FILEs instead of truncating them. zcrelay writes from each FILE's size at start, at offsets of its own (splice refuses O_APPEND): unlike GNU tee -a, another writer appending to the same FILE meanwhile is overwritten, zcrelay's own stdout included (tee -a f >> f)."),
    output_error: Optional[str] = typer.Option(None, "--output-error", metavar="MODE", help=OUTPUT_ERROR_HELP, show_default=False),
    nopipe: bool = typer.Option(False, "-p", help="Same as --output-error warn-nopipe."),
    pipe_size: str = typer.Option(PIPE_SIZE, "--pipe-size", metavar="SIZE", help="Grow stdin's and stdout's pipes (and zcrelay's own) to SIZE with F_SETPIPE_SZ; clamped to what the kernel allows."),
    listen: Optional[str] = typer.Option(None, "--listen", "-l", metavar="LISTEN", help=f"Relay capture mode: where to listen: {LISTEN_FORMS}.", show_default=False),
    target: Optional[str] = typer.Option(None, "--target", "-t", metavar="TARGET", help=f"Relay capture mode: where to forward each connection: {TARGET_FORMS}.", show_default=False),
    capture_dir: Optional[str] = typer.Option(None, "--capture-dir", metavar="DIR", help="Relay capture mode: write each direction of each connection to its own file in DIR (see 'zcrelay forward --capture-dir').", show_default=False),
    progress: Optional[bool] = PROGRESS,
    verbose: int = typer.Option(0, "--verbose", "-v", count=True, help="Say how stdin and the outputs are handled (pipe sizes, fallbacks)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only warnings and errors on stderr (and, with --listen, the listening line and the summary)."),
) -> ExitCode:
    """Copy standard input to standard output and to each FILE with tee(2) and splice(2)."""
    setup_logging(verbose, quiet)
    size = pipe_size_value(pipe_size)
    if listen is not None or target is not None or capture_dir is not None:
        if files:
            raise typer.BadParameter("FILE arguments do not go with --listen/--target/--capture-dir")
        if listen is None or target is None or capture_dir is None:
            raise typer.BadParameter("relay capture needs --listen, --target and --capture-dir together")
        if progress:
            raise typer.BadParameter("relay capture logs a line per connection; --progress is for "
                                     "the pipeline mode", param_hint="--progress")
        # Options of the pipeline mode alone: relay capture ignored them, a bad MODE included.
        for name, given in (("--append", append), ("--output-error", output_error is not None),
                            ("-p", nopipe)):
            if given:
                raise typer.BadParameter("this is for the pipeline mode (stdin to FILEs), not for "
                                         "relay capture", param_hint=name)
        return _relay_capture(address(listen, listen=True, option="--listen"),
                              address(target, listen=False, option="--target"),
                              capture_dir, size)
    mode = "warn-nopipe" if nopipe and output_error is None else (output_error or DEFAULT)
    if mode not in MODES and mode != DEFAULT:
        raise typer.BadParameter(f"{mode!r}: choose one of {', '.join(MODES)}", param_hint="--output-error")
    return run_pipeline_tee(files or (), append, mode, size, progress)
