"""The registry of named targets: what ``--target NAME`` means.

A :class:`Target` is plain data (runtime, precisions, accelerator, constraints) plus the
:class:`TargetFamily` that knows the runtime-specific parts: which ops the runtime can run and the
execution plan recorded in the bundle's manifest. Each family lives in its own module beside this one and
registers its targets when imported; the registry imports the family modules listed in
``FAMILY_MODULES`` the first time a target is looked up. A new runtime family (OpenVINO, LiteRT) is one
new module and one line in that list.

Usage::

    target = get_target("jetson")          # alias of jetson-orin
    target.default_precision               # "fp16"
    plan = target.family.execution_plan(target, precision="fp16", model_sha256=digest)
    for t in list_targets(): ...
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from edgepack.errors import ConfigError

log = logging.getLogger(__name__)

Precision = Literal["fp32", "fp16", "int8"]
PRECISIONS: tuple[Precision, ...] = ("fp32", "fp16", "int8")

# Family modules, imported on first use; each calls register() for its targets.
FAMILY_MODULES: tuple[str, ...] = (
    "edgepack.targets.onnxruntime_family",
    "edgepack.targets.openvino_family",
    "edgepack.targets.litert_family",
)


@dataclass(frozen=True)
class UnsupportedNode:
    """A node the target's runtime cannot run: its name, op type and domain, and why."""

    node: str
    op_type: str
    domain: str
    reason: str


class TargetFamily(Protocol):
    """What a runtime family knows about its targets; implemented once per family module."""

    name: str
    # The compiler side, "module:attribute" of an edgepack.compiler.family.Converter (a string, so that this
    # package imports nothing of the compiler).
    converter: str

    def unsupported_nodes(self, target: Target, model: Any) -> list[UnsupportedNode]:
        """Nodes of ``model`` (an onnx.ModelProto) that ``target``'s runtime cannot run."""
        ...

    def execution_plan(self, target: Target, *, precision: Precision, model_sha256: str) -> dict[str, Any]:
        """The runtime settings recorded in the manifest's ``execution`` for a model at ``precision``."""
        ...

    def host_plan(self, target: Target, *, precision: Precision) -> dict[str, Any]:
        """The execution plan that reproduces, on the build host's CPU, what the device computes.

        The compiler measures accuracy and writes self-test outputs with it.
        """
        ...

    def runtime_version(self, target: Target, *, opset: int) -> str:
        """The PEP 440 range of runtime versions that run a model of ``opset`` on ``target``."""
        ...


@dataclass(frozen=True)
class Target:
    """A named kind of device the compiler builds bundles for."""

    name: str
    family: TargetFamily
    runtime: str
    default_precision: Precision
    precisions: tuple[Precision, ...]
    accelerator: str
    static_shapes: bool
    notes: str = ""
    aliases: tuple[str, ...] = ()
    # Family-specific knobs (e.g. TensorRT workspace size, DLA); read only by the family module.
    options: Mapping[str, Any] = field(default_factory=dict)

    def check_precision(self, precision: str) -> Precision:
        """``precision`` if this target can run it, else a ConfigError that lists what it can."""
        if precision not in self.precisions:
            raise ConfigError(
                f"target {self.name!r} does not support precision {precision!r}; "
                f"it supports {', '.join(self.precisions)} (default {self.default_precision})"
            )
        return precision  # type: ignore[return-value]


_TARGETS: dict[str, Target] = {}
_ALIASES: dict[str, str] = {}
_loaded = False


def register(target: Target) -> None:
    """Add a target (called by family modules when imported). Names and aliases must be unique."""
    for name in (target.name, *target.aliases):
        if name in _TARGETS or name in _ALIASES:
            raise ValueError(f"target name {name!r} is registered twice")
    if target.default_precision not in target.precisions:
        raise ValueError(f"target {target.name!r}: default precision not among its precisions")
    _TARGETS[target.name] = target
    for alias in target.aliases:
        _ALIASES[alias] = target.name


def _ensure_loaded() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in FAMILY_MODULES:
        importlib.import_module(module)


def get_target(name: str) -> Target:
    """The target called ``name`` (or one of its aliases); ConfigError lists the known names."""
    _ensure_loaded()
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    try:
        return _TARGETS[key]
    except KeyError:
        known = ", ".join(sorted([*_TARGETS, *_ALIASES]))
        raise ConfigError(f"unknown target {name!r}; known targets: {known} (see `edgepack targets`)") from None


def list_targets() -> list[Target]:
    """Every registered target, in registration order."""
    _ensure_loaded()
    return list(_TARGETS.values())
