"""The ``edgepack`` command line: the one place that wires the shared core, compiler, agent and fleet.

Each command group lives in its own module and registers itself on :data:`app`; heavy imports happen
inside the commands, so ``edgepack --help`` and the device-side commands stay fast and work without the
compiler's dependencies. :func:`main` turns every :class:`~edgepack.errors.EdgepackError` into a red
message and exit code 1 (no traceback: the message says what to do); usage errors exit 2.
"""

from __future__ import annotations

import logging
import sys

import typer
from rich.markup import escape

from edgepack import __version__
from edgepack.cli import bundle_cmd, keys_cmd, trust_cmd
from edgepack.cli.console import err_console
from edgepack.errors import EdgepackError

app = typer.Typer(
    name="edgepack",
    help="Compile, sign, ship and serve ML models on fleets of edge devices.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"edgepack {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log what edgepack does (INFO level)."),
) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )


keys_cmd.register(app)
trust_cmd.register(app)
bundle_cmd.register(app)
for _optional in ("compile_cmd", "agent_cmd", "mqtt_cmd", "fleet_cmd", "toolchain_cmd"):
    try:
        __import__(f"edgepack.cli.{_optional}", fromlist=["register"]).register(app)
    except ModuleNotFoundError as _exc:  # the module itself may not exist in a slim install
        if _exc.name != f"edgepack.cli.{_optional}":
            raise


def main() -> None:
    try:
        app()  # standalone mode: click reports usage errors itself and exits
    except EdgepackError as exc:
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
        sys.exit(1)
