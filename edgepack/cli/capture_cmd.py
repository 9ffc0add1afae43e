"""``edgepack fleet capture …``: pull the data a device captured (``fleet/capture.py``, ``docs/capture.md``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from edgepack.cli.console import console, err_console
from edgepack.cli.mqtt_cmd import BROKER, CA, CERT, PASSWORD, PREFIX, PROTOCOL, TLS_KEY, USERNAME, _operator_options


def read_capture_settings(path: Path) -> dict[str, Any]:
    """A TOML file with the fields of ``[capture.models.NAME]`` at its top level, checked as the device will."""
    from pydantic import ValidationError

    from edgepack.agent.config import CaptureModelSettings, tomllib  # tomllib, or tomli before Python 3.11
    from edgepack.errors import ConfigError
    from edgepack.manifest import validation_summary

    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read capture settings {path}: {exc}") from exc
    try:
        return CaptureModelSettings.model_validate(raw).model_dump(mode="json")
    except ValidationError as exc:
        raise ConfigError(f"capture settings {path}: {validation_summary(exc)} (see docs/capture.md)") from exc


def register(fleet: typer.Typer) -> None:
    capture = typer.Typer(help="Data captured on devices: pull it as calibration files.", no_args_is_help=True)
    fleet.add_typer(capture, name="capture")

    @capture.command("pull")
    def pull_cmd(
        device: str = typer.Option(..., "--device", help="The device whose captured records to pull."),
        out: Path = typer.Option(..., "-o", "--output", file_okay=False, help="Folder: DIR/MODEL/*.npz."),
        key: list[Path] = typer.Option(..., "--key", help="Key with the trust store's 'command' role."),
        timeout: float = typer.Option(120.0, "--timeout", help="Seconds to wait for the device's records."),
        broker: str = BROKER, prefix: str = PREFIX, protocol: str = PROTOCOL, ca: Path | None = CA,
        cert: Path | None = CERT, tls_key: Path | None = TLS_KEY, username: str | None = USERNAME,
        password: str | None = PASSWORD,
        as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    ) -> None:  # fmt: skip
        """Pull a device's captured records into DIR (acknowledged, so the device deletes them)."""
        from edgepack.fleet.capture import pull_captures
        from edgepack.keys import SigningKey

        options = _operator_options(broker, "capture", protocol, ca, cert, tls_key, username, password)
        report = pull_captures(options, device, out, [SigningKey.load(k) for k in key], prefix=prefix,
                               timeout=timeout)  # fmt: skip
        if as_json:
            typer.echo(json.dumps(report.to_json(), indent=2))
        else:
            console.print(
                f"{device}: {report.records} record(s) pulled into {out}"
                + (f", {report.duplicates} already there" if report.duplicates else "")
                + (f"; the device dropped {report.dropped_on_device} (buffer full)" if report.dropped_on_device else "")
            )
            models = sorted({p.parent.name for p in report.written})
            for model in models:
                console.print(f"  edgepack compile … --calibration {out / model}")
        if not report.complete:
            err_console.print(f"{device} did not finish within {timeout:g} s (offline?); pull again to go on")
            raise typer.Exit(1)

    @capture.command("set")
    def set_cmd(
        device: str = typer.Option(..., "--device", help="The device to configure."),
        model: str = typer.Option(..., "--model", help="The model whose capture to turn on or off."),
        settings: Path | None = typer.Option(None, "--settings", exists=True, dir_okay=False,
                                             help="TOML: the fields of [capture.models.NAME] (docs/capture.md)."),
        off: bool = typer.Option(False, "--off", help="Stop capturing this model (what the operator turned on)."),
        key: list[Path] = typer.Option(..., "--key", help="Key with the trust store's 'command' role."),
        broker: str = BROKER, prefix: str = PREFIX, protocol: str = PROTOCOL, ca: Path | None = CA,
        cert: Path | None = CERT, tls_key: Path | None = TLS_KEY, username: str | None = USERNAME,
        password: str | None = PASSWORD,
    ) -> None:  # fmt: skip
        """Turn capture of a model on a device on (--settings) or off (--off): a retained, signed config."""
        from edgepack.errors import ConfigError
        from edgepack.fleet.capture import send_capture_config
        from edgepack.keys import SigningKey

        if (settings is None) == (not off):
            raise ConfigError("give exactly one of --settings FILE or --off")
        values = read_capture_settings(settings) if settings is not None else None
        options = _operator_options(broker, "capture", protocol, ca, cert, tls_key, username, password)
        config = send_capture_config(options, device, model, values, [SigningKey.load(k) for k in key], prefix=prefix)
        state = "off" if values is None else "on"
        console.print(f"capture of {model} on {device}: {state} (seq {config.seq}); the device applies it if its "
                      "agent.toml has [capture] enabled = true and does not set this model itself")  # fmt: skip
