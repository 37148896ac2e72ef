"""``app.grpc.codec`` and the servicer's parameter reading, without a server: outputs go back as
the general encoders write them, whatever the array's byte order or layout."""

from __future__ import annotations

import numpy as np
import pytest

from app.grpc import codec
from app.grpc.proto import pb
from app.grpc.servicer import sequence_parameters
from app.services import tensor_codec


@pytest.mark.parametrize("order", ["<", ">", "="])
@pytest.mark.parametrize("datatype", list(tensor_codec.DTYPES))
def test_outputs_go_back_as_the_general_encoders_write_them(datatype: str, order: str) -> None:
    dtype = tensor_codec.DTYPES[datatype].newbyteorder(order)
    array = (np.arange(6) % 2 if datatype == "BOOL" else np.arange(6)).reshape(2, 3).astype(dtype)
    arrays = [array, array.T]  # a C-ordered array and a transposed view
    response = codec.infer_response("m", "1", "x", [(f"o{i}", a) for i, a in enumerate(arrays)])
    for out, raw, sent in zip(response.outputs, response.raw_output_contents, arrays, strict=True):
        assert out.datatype == tensor_codec.datatype_of(sent) == datatype
        assert raw == tensor_codec.encode_binary(sent)
        assert list(out.shape) == list(sent.shape)
        back = np.frombuffer(raw, tensor_codec.DTYPES[datatype]).reshape(sent.shape)
        assert np.array_equal(back, sent)


def test_sequence_parameters_read_without_adding_any() -> None:
    request = pb.ModelInferRequest(model_name="echo_rnn")
    assert sequence_parameters(request) == {} and len(request.parameters) == 0
    request.parameters["sequence_id"].string_param = "s"
    request.parameters["sequence_end"].bool_param = True
    request.parameters["sequence_start"].CopyFrom(pb.InferParameter())  # no value set
    found = sequence_parameters(request)
    assert found == {"sequence_id": "s", "sequence_end": True, "sequence_start": None}
    assert len(request.parameters) == 3
