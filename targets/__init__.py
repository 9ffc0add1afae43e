"""edgepack.targets: one module per target family and the registry of named targets (``jetson``,
``x86``, ``rpi4``, ...): which runtime, which default precision, which conversion steps and device
constraints."""
