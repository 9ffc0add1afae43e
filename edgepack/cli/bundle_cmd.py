"""``edgepack bundle create``, ``sign``, ``verify`` and ``inspect``: the low-level bundle tools.

``bundle create`` packs a model file as it is (no compilation); the compiler writes bundles through the
same :func:`edgepack.bundle.write_bundle`.
"""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import typer
from rich.table import Table

from edgepack.bundle import BundleFile, add_signature, read_info, verify_bundle, write_bundle
from edgepack.cli.console import console
from edgepack.errors import ConfigError
from edgepack.keys import SigningKey, short_id
from edgepack.manifest import Manifest, RuntimeRequirement, utc_now
from edgepack.trust import DEFAULT_BUNDLE_EXPIRY, TrustStore, parse_expires

RUNTIME_BY_SUFFIX = {".onnx": "onnxruntime", ".xml": "openvino", ".tflite": "litert"}


EXPIRES_HELP = (
    "When devices stop accepting the bundle: a duration (90d, 12h, 2w), an ISO 8601 time, or 'never' "
    "(default 90d; see docs/security.md)."
)


def register(app: typer.Typer) -> None:
    bundle = typer.Typer(help="Pack model files into signed bundles (low level; see 'compile').", no_args_is_help=True)
    app.add_typer(bundle, name="bundle")

    @bundle.command("create")
    def create(
        model_file: Path = typer.Argument(
            ..., exists=True, dir_okay=False, help="Model: .onnx, .tflite or OpenVINO .xml."
        ),
        target: str = typer.Option(..., "--target", help="Target name the bundle is for (see 'edgepack targets')."),
        name: str = typer.Option(..., "--name", help="Model name; versions only go forward per name."),
        version: str = typer.Option(..., "--version", help="Semantic version, e.g. 1.0.0."),
        key: list[Path] = typer.Option(..., "--key", help="Private key to sign with; repeat for several."),
        out: Path = typer.Option(..., "-o", "--out", help="Bundle file to write (.epk)."),
        metadata: list[str] = typer.Option([], "--meta", help="Metadata KEY=VALUE (VALUE may be JSON); repeatable."),
        expires_in_days: float | None = typer.Option(None, "--expires-in-days", help="Same as --expires Nd."),
        expires: str | None = typer.Option(None, "--expires", help=EXPIRES_HELP),
    ) -> None:
        """Pack MODEL_FILE as it is into a signed bundle, reading its inputs and outputs from the model."""
        runtime_name = RUNTIME_BY_SUFFIX.get(model_file.suffix.lower())
        if runtime_name is None:
            raise ConfigError(f"{model_file}: unknown model type; use one of {', '.join(RUNTIME_BY_SUFFIX)}")
        from edgepack.runtimes.base import get_backend

        backend = get_backend(runtime_name)
        loaded = backend.load(model_file)
        try:
            inputs, outputs = loaded.inputs, loaded.outputs
        finally:
            loaded.close()
        files = [BundleFile(model_file.name, model_file, "model")]
        if runtime_name == "openvino":
            files.append(BundleFile(model_file.with_suffix(".bin").name, model_file.with_suffix(".bin"), "weights"))
        manifest = write_bundle(
            out,
            files=files,
            signers=[SigningKey.load(k) for k in key],
            name=name,
            version=version,
            target=target,
            runtime=RuntimeRequirement(name=runtime_name, version=f">={_major_minor(backend.installed_version())}"),
            model_file=model_file.name,
            inputs=inputs,
            outputs=outputs,
            metadata=_parse_metadata(metadata),
            toolchain={runtime_name: backend.installed_version() or "unknown"},
            expires_at=utc_now() + timedelta(days=expires_in_days)
            if expires_in_days
            else parse_expires(expires, DEFAULT_BUNDLE_EXPIRY),
        )
        console.print(f"wrote {out}: {manifest.name} {manifest.version} for {manifest.target}")

    @app.command("sign")
    def sign_cmd(
        bundle_path: Path = typer.Argument(
            ..., exists=True, dir_okay=False, metavar="BUNDLE", help="Bundle to co-sign."
        ),
        key: Path = typer.Option(..., "--key", help="Private key to add a signature with."),
    ) -> None:
        """Add a signature to a bundle (for k-of-n trust stores, or after a key rotation)."""
        signing_key = SigningKey.load(key)
        signatures = add_signature(bundle_path, signing_key)
        console.print(f"signed {bundle_path} with {short_id(signing_key.key_id)}; {len(signatures)} signature(s) now")

    @app.command("verify")
    def verify_cmd(
        bundle_path: Path = typer.Argument(
            ..., exists=True, dir_okay=False, metavar="BUNDLE", help="Bundle to verify."
        ),
        trust: Path = typer.Option(..., "--trust", help="Trust store directory ('edgepack trust init')."),
    ) -> None:
        """Verify a bundle's archive, signatures, expiry and every payload hash. Exit 0 only if it verifies."""
        manifest = verify_bundle(bundle_path, TrustStore.load(trust))
        console.print(f"[green]verified[/] {manifest.name} {manifest.version} for {manifest.target}")

    @app.command("inspect")
    def inspect_cmd(
        bundle_path: Path = typer.Argument(..., exists=True, dir_okay=False, metavar="BUNDLE", help="Bundle to show."),
        as_json: bool = typer.Option(False, "--json", help="Print the manifest and signatures as JSON."),
    ) -> None:
        """Show what a bundle holds (without verifying it; use 'verify' for that)."""
        info = read_info(bundle_path)
        if as_json:
            doc = {
                "manifest": info.manifest.model_dump(mode="json"),
                "signatures": [s.keyid for s in info.signatures],
                "size": info.size,
            }
            typer.echo(json.dumps(doc, indent=2))
            return
        _print_manifest(info.manifest, [s.keyid for s in info.signatures], info.size)


def _print_manifest(m: Manifest, signers: list[str], size: int) -> None:
    console.print(
        f"[bold]{m.name}[/] {m.version}  target [bold]{m.target}[/]  runtime {m.runtime.name} {m.runtime.version}"
    )
    console.print(
        f"created {m.created_at.isoformat()}  expires {m.expires_at.isoformat() if m.expires_at else 'never'}"
    )
    console.print(f"{size} bytes, signed by {', '.join(short_id(s) for s in signers) or 'nobody'}")
    for title, specs in (("inputs", m.inputs), ("outputs", m.outputs)):
        table = Table(title=title)
        for column in ("name", "dtype", "shape", "layout"):
            table.add_column(column)
        for spec in specs:
            table.add_row(spec.name, spec.dtype, str(spec.shape), spec.layout or "")
        console.print(table)
    files = Table(title="files")
    for column in ("path", "role", "size", "sha256"):
        files.add_column(column)
    for f in m.files:
        files.add_row(f.path, f.role, str(f.size), f.sha256[:16] + "…")
    console.print(files)
    if m.quantization:
        console.print("quantization:", m.quantization)
    if m.accuracy:
        console.print("accuracy:", m.accuracy)


def _parse_metadata(items: list[str]) -> dict[str, object]:
    result: dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--meta {item!r}: expected KEY=VALUE")
        try:
            result[key] = json.loads(value)
        except json.JSONDecodeError:
            result[key] = value
    return result


def _major_minor(version: str | None) -> str:
    parts = (version or "0").split(".")
    return ".".join(parts[:2]) if len(parts) >= 2 else parts[0]
