"""``edgepack toolchain install NAME`` and ``edgepack toolchain list``: the managed converter toolchains.

A toolchain is an isolated, pinned Python environment for a converter that cannot share edgepack's
(onnx2tf for TFLite needs its own TensorFlow and numpy 1.x); see :mod:`edgepack.compiler.toolchain`. The
compiler creates one on first use; ``install`` does it ahead of time (e.g. while building a CI image) and
``list`` shows where they are, whether installed, and their key versions.
"""

from __future__ import annotations

import json
import time

import typer
from rich.markup import escape
from rich.table import Table

from edgepack.cli.console import console, err_console

toolchain_app = typer.Typer(
    name="toolchain", help="Managed converter toolchains (isolated, pinned environments).", no_args_is_help=True
)


def register(app: typer.Typer) -> None:
    app.add_typer(toolchain_app)


@toolchain_app.command("install")
def install_command(
    name: str = typer.Argument(..., help="Toolchain to install: tflite (onnx2tf, for the LiteRT targets)."),
    force: bool = typer.Option(False, "--force", help="Reinstall even if it is installed."),
) -> None:
    """Create the toolchain's environment now (minutes, once; later compiles reuse it)."""
    from edgepack.compiler.toolchain import find_toolchain, install_toolchain, toolchains_root

    existing = find_toolchain(name)
    if existing is not None and not force:
        console.print(f"toolchain {name} is installed at {escape(str(existing.path))} (use --force to reinstall)")
        return
    start = time.perf_counter()
    with err_console.status(f"installing toolchain {name} into {escape(str(toolchains_root()))}") as status:
        chain = install_toolchain(name, force=force, on_progress=lambda text: status.update(escape(text)))
    seconds = time.perf_counter() - start
    versions = ", ".join(f"{k} {v}" for k, v in chain.key_versions().items())
    console.print(f"installed toolchain {name} at {escape(str(chain.path))} in {seconds:.0f} s ({versions})")


@toolchain_app.command("list")
def list_command(as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")) -> None:
    """The toolchains edgepack knows, where they live and whether they are installed."""
    from edgepack.compiler.toolchain import list_toolchains, toolchains_root

    statuses = list_toolchains()
    if as_json:
        console.print_json(json.dumps([s.to_dict() for s in statuses]))
        return
    table = Table(title=f"toolchains in {escape(str(toolchains_root()))}")
    for column in ("name", "installed", "pins", "versions", "size", "install time", "what"):
        table.add_column(column)
    for s in statuses:
        table.add_row(
            s.name,
            "yes" if s.installed else "no",
            s.pin_hash,
            escape(", ".join(f"{k} {v}" for k, v in s.versions.items())) or "-",
            f"{s.size_bytes / 1e9:.1f} GB" if s.size_bytes else "-",
            f"{s.install_seconds:.0f} s" if s.install_seconds else "-",
            escape(s.description),
        )
    console.print(table)
