"""``edgepack compile`` and ``edgepack targets``: the compiler's command line.

``compile`` runs :func:`edgepack.compiler.pipeline.compile_model` with a rich progress display (one line
per pipeline step, a bar where a step counts samples) and prints the accuracy report as a table;
``targets`` lists the registered targets. The compiler is imported inside the commands, so the CLI works
on a device without the compiler's dependencies.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.markup import escape
from rich.table import Table

from edgepack.cli.console import console, err_console

if TYPE_CHECKING:
    from edgepack.compiler.pipeline import CompileResult
    from edgepack.compiler.progress import Progress as StepProgress


def register(app: typer.Typer) -> None:
    app.command("compile")(compile_command)
    app.command("targets")(targets_command)


def compile_command(
    model: Path = typer.Argument(..., help="The ONNX model to compile."),
    target: str = typer.Option(..., "--target", "-t", help="Target name or alias (see `edgepack targets`)."),
    calibration: Path = typer.Option(
        ..., "--calibration", "-c", help=".npz keyed by input name (optional 'labels'), .npy, or a folder of them."
    ),
    key: list[Path] = typer.Option(..., "--key", "-k", help="Private key to sign with; repeat for several."),
    out: Path = typer.Option(..., "-o", "--out", help="Bundle file to write (.epk)."),
    validation: Path | None = typer.Option(
        None, "--validation", help="Data to measure accuracy on (same layout; 'labels' enables task accuracy)."
    ),
    precision: str = typer.Option("auto", "--precision", "-p", help="auto (the target's default), fp32, fp16, int8."),
    input_shape: list[str] = typer.Option(
        [], "--input-shape", help="Fix an input's dynamic dims: NAME=1,3,224,224 (repeatable)."
    ),
    name: str | None = typer.Option(None, "--name", help="Model name (default: the model's metadata or file name)."),
    version: str = typer.Option("0.1.0", "--version", help="Semantic version of this build."),
    max_accuracy_drop: float = typer.Option(
        1.0, "--max-accuracy-drop", help="Allowed labelled-accuracy drop in points (top-1 agreement >= 100 - X)."
    ),
    selftest_samples: int = typer.Option(8, "--selftest-samples", help="Samples in the self-test vectors."),
    output_slices: list[str] = typer.Option(
        [],
        "--output-slices",
        help="Judge an output per slice: NAME:AXIS:START-END,START-END (END exclusive; repeatable). "
        "Found automatically for outputs that join parts of different scales.",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON instead of tables."),
    expires: str | None = typer.Option(
        None, "--expires", help="When devices stop accepting the bundle: 90d, 12h, an ISO time or 'never' (default 90d)."
    ),
) -> None:
    """Compile MODEL for a target: optimize, quantize or convert, check accuracy, sign a bundle."""
    from edgepack.compiler.load import parse_input_shapes
    from edgepack.compiler.pipeline import CompileRequest, compile_model
    from edgepack.trust import DEFAULT_BUNDLE_EXPIRY, parse_expires

    with _input_errors_exit_2():
        request = CompileRequest(
            model=model,
            target=target,
            calibration=calibration,
            validation=validation,
            output=out,
            keys=key,
            precision=precision,
            input_shapes=parse_input_shapes(input_shape),
            name=name,
            version=version,
            max_accuracy_drop=max_accuracy_drop,
            selftest_samples=selftest_samples,
            output_slices=output_slices,
            expires_at=parse_expires(expires, DEFAULT_BUNDLE_EXPIRY),
        )
        with _rich_progress() as progress:
            result = compile_model(request, progress)
    if as_json:
        console.print_json(json.dumps(result.to_dict()))
        return
    _print_result(result)


def targets_command() -> None:
    """List the targets the compiler builds for."""
    from edgepack.targets.registry import list_targets

    table = Table(title="edgepack targets")
    for column in ("name", "runtime", "default precision", "precisions", "accelerator", "notes"):
        table.add_column(column, overflow="fold")
    for t in list_targets():
        aliases = f" ({', '.join(t.aliases)})" if t.aliases else ""
        table.add_row(
            f"[bold]{t.name}[/]{escape(aliases)}",
            t.runtime,
            t.default_precision,
            ", ".join(t.precisions),
            escape(t.accelerator),
            escape(t.notes),
        )
    console.print(table)


# --- output ----------------------------------------------------------------------------------------


def _print_result(result: CompileResult) -> None:
    m = result.manifest
    console.print(
        f"[bold green]compiled[/] {m.name} {m.version} for [bold]{result.target}[/] at [bold]{result.precision}[/] "
        f"(asked: {result.requested_precision}) -> {escape(str(result.output))}"
    )
    acc = result.accuracy
    table = Table(title=escape(f"accuracy vs original ({acc.samples} samples of {acc.data})"))
    for column in ("output", "max |diff|", "mean |diff|", "cosine", "top-1 agree", "accuracy (orig -> compiled)"):
        table.add_column(column, justify="right" if column != "output" else "left")
    for o in acc.outputs:
        accuracy = "—"
        if o.accuracy_reference is not None and o.accuracy_compiled is not None:
            accuracy = f"{o.accuracy_reference:.2f}% -> {o.accuracy_compiled:.2f}%"
        table.add_row(
            escape(o.name),
            f"{o.max_abs_diff:.4g}",
            f"{o.mean_abs_diff:.4g}",
            "—" if o.cosine_mean is None else f"{o.cosine_mean:.5f}",
            "—" if o.top1_agreement is None else f"{o.top1_agreement:.2f}%",
            accuracy,
        )
        for sl in o.slices:
            table.add_row(
                escape(f"  {sl.start}:{sl.end} (axis {sl.axis}, ~{sl.scale:.3g})"),
                f"{sl.max_abs_diff:.4g}",
                "",
                f"{sl.cosine_mean:.5f}",
                "—",
                "—",
            )
    console.print(table)
    bar = acc.bar
    console.print(
        f"bar: top-1 agreement >= {bar.min_top1_agreement:g}%, accuracy drop <= {bar.max_accuracy_drop:g} points, "
        f"cosine >= {bar.min_cosine:g}: [bold green]passed[/]"
    )
    if result.kept_in_float:
        kept = Table(title="nodes kept in float (accuracy-aware int8)")
        kept.add_column("step", justify="right")
        kept.add_column("nodes")
        kept.add_column("why")
        for k in result.kept_in_float:
            kept.add_row(str(k.step), escape(", ".join(k.nodes)), escape(k.reason))
        console.print(kept)
    if result.speed:
        s = result.speed
        console.print(
            f"speed on this host: fp32 {s['fp32_ms']:.3f} ms, {result.precision} {s['compiled_ms']:.3f} ms "
            f"-> {s['speedup_1_thread']:.2f}x (1 thread)"
        )
        if s.get("warning"):
            console.print(f"[yellow]warning: {s['warning']}[/]", highlight=False)
    for attempt in result.attempts[:-1]:
        why = attempt.get("rejected") or attempt.get("error") or "it failed the bar"
        console.print(f"[yellow]tried {attempt['precision']} first: {why}[/]", highlight=False)


# What the user gave is wrong (the model file, a flag, the data): exit 2, like a usage error. Everything else
# a compile can fail with (accuracy, an op the target cannot run, a toolchain) exits 1 through edgepack.cli.main.
INPUT_ERROR_EXIT = 2


@contextmanager
def _input_errors_exit_2() -> Iterator[None]:
    from edgepack.errors import ConfigError, DataError, ModelLoadError

    try:
        yield
    except (ConfigError, DataError, ModelLoadError) as exc:
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
        raise typer.Exit(INPUT_ERROR_EXIT) from exc


@contextmanager
def _rich_progress() -> Iterator[StepProgress]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    display = Progress(
        SpinnerColumn(finished_text=" "),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console,
        transient=False,
    )
    from edgepack.compiler.progress import Progress as StepProgress
    from edgepack.compiler.progress import Step

    class RichStep(Step):
        def __init__(self, name: str, total: int | None, task: Any) -> None:
            super().__init__(name, total)
            self.task = task

        def advance(self, n: int = 1) -> None:
            super().advance(n)
            display.update(self.task, advance=n)

        def set_total(self, total: int | None) -> None:
            super().set_total(total)
            display.update(self.task, total=total)

    class RichProgress(StepProgress):
        """compiler.progress.Progress drawn with rich: a spinner or bar per step, a tick when done."""

        def _open(self, name: str, total: int | None) -> Step:
            return RichStep(name, total, display.add_task(name, total=total))

        def _close(self, step: Step, ok: bool, seconds: float) -> None:
            assert isinstance(step, RichStep)
            if not ok:
                display.update(step.task, description=f"[red]✗ {step.name}[/]", total=1, completed=1)
                return
            note = f" — {step.note}" if step.note else ""
            display.update(
                step.task, description=f"[green]✓[/] {step.name}{note} [dim]({seconds:.1f}s)[/]", total=1, completed=1
            )

    with display:
        yield RichProgress()
