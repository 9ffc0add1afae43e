"""Runtime backends (onnxruntime, OpenVINO, LiteRT) behind one small interface."""
