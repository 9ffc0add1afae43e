"""Fuzzing (hypothesis) of everything the device parses from outside: bundles, manifests, protocol messages, chunks."""
