"""The peer's model runtime: an MLServer ``MLModel`` that serves one ONNX file with onnxruntime.

MLServer ships no onnxruntime runtime, so the benchmark brings this one (the ~40 lines a user comparing
the two would write). It runs inside MLServer's own venv; ``model-settings.json`` names it as
``runtime.OnnxModel`` and gives the model file as ``parameters.uri`` and the thread count as
``parameters.extra.threads``.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse
from mlserver.utils import get_model_uri


class OnnxModel(MLModel):
    async def load(self) -> bool:
        uri = await get_model_uri(self.settings)
        extra = (self.settings.parameters.extra if self.settings.parameters else None) or {}
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(extra.get("threads", 1))
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(uri, options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        feeds = {}
        for request_input in payload.inputs:
            array = NumpyCodec.decode_input(request_input)
            feeds[request_input.name] = np.ascontiguousarray(array, dtype=np.float32)
        results = self.session.run(self.output_names, feeds)
        outputs = [NumpyCodec.encode_output(name, value) for name, value in zip(self.output_names, results)]
        return InferenceResponse(model_name=self.name, outputs=outputs)
