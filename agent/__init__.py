"""edgepack.agent: the device side — bundle store, install/swap state machine, local API, MQTT link.

Imports only from the shared core (``edgepack``); never from the compiler, so a device installs it
without the compiler's heavy dependencies (``pip install edgepack[agent-onnx]``).
"""
