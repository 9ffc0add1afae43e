"""edgepack.compiler: the host side — load and validate a model, optimize, quantize, convert, compare
against the original, and write a signed bundle. Imports ``edgepack`` and ``edgepack.targets``, never the
agent."""
