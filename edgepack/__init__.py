"""edgepack: compile, sign, ship and serve ML models on fleets of edge devices.

This package is the shared core that both the host side (``edgepack.compiler``, ``edgepack.fleet``) and the
device side (``edgepack.agent``) import: the bundle format, signatures and the trust store, runtime
backends, the MQTT wire protocol, and the CLI. It imports nothing from those subpackages (the CLI alone
wires them), and its heavy dependencies (runtimes, ONNX tooling) are imported only where used.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("edgepack")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
