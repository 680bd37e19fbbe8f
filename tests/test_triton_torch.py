"""Every backend the runtime has is servable: the torch backend (the fastest on CUDA) behind the real
tritonserver, on the CPU here, through the same repository, model and front as onnxruntime.

One service for the module (tiny model, 127.0.0.1). Its answers equal the Python API's with the same
backend, through Triton's generate endpoint, the streaming gRPC path and the OpenAI chat endpoint.
"""
from __future__ import annotations

import json

import pytest

from support.triton_helpers import grpc_stream, http_generate, openai_post

PROMPT = "Write a haiku about the sea."
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def expected(tiny_artifacts) -> tuple[str, list[int]]:
    from treespec.runtime.api import SpeculativeGenerator

    gen = SpeculativeGenerator.from_artifacts(tiny_artifacts, backend="torch")
    result = gen.generate(PROMPT, max_new_tokens=MAX_TOKENS)
    gen.close()
    return result.text, list(result.token_ids)


@pytest.fixture(scope="module")
def service(tiny_artifacts, tmp_path_factory):
    from treespec.exporter.triton_repo import write_triton_repo
    from treespec.runtime.triton.service import TritonService

    repo = write_triton_repo(tiny_artifacts, tmp_path_factory.mktemp("triton") / "repo", backend="torch")
    with TritonService(repo, None, None, None, startup_timeout=300, exit_timeout=3) as srv:
        yield srv


def test_the_torch_backend_serves_what_the_python_api_gives(service, expected):
    text, ids = expected
    code, out = http_generate(service, {"text_input": PROMPT, "max_tokens": MAX_TOKENS})
    assert code == 200 and out["output_ids"] == ids and out["text_output"] == text, out
    stream = grpc_stream(service.grpc_url, PROMPT, max_tokens=MAX_TOKENS)
    assert stream.ok and stream.ids == ids, stream.error
    body = {"model": "treespec", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": MAX_TOKENS,
            "temperature": 0}
    code, raw, _ = openai_post(service.http_url, "/v1/chat/completions", body)
    assert code == 200 and json.loads(raw)["choices"][0]["message"]["content"] == text, raw


def test_serve_offers_every_backend_the_runtime_has():
    from treespec.exporter.triton_repo import BACKENDS as SERVABLE
    from treespec.runtime.loader import BACKENDS

    assert set(BACKENDS) <= set(SERVABLE)
