"""Scale-out across GPUs with Triton's instance groups (issue 18), what a CPU machine can check.

`treespec serve --gpus N` writes a repository whose treespec model has one KIND_GPU instance group
per GPU (each of `--instances` instances, each with its own KV cache and batch): the generated
config.pbtxt for N = 1, 2 and 8 parses with tritonclient's ModelConfig (protobuf text format) and
holds exactly those groups. Several instances really serve: the real tritonserver on the CPU with
two CPU instances and in-flight batching answers 8 concurrent streams, every output equal to the
request's output when sent alone, and both instances took requests.
"""
from __future__ import annotations

import threading

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from support.triton_helpers import grpc_stream, metrics
from treespec.errors import InputError
from treespec.exporter.triton_repo import plan_repo

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "List three primary colors.",
           "Explain what a CPU does in one sentence.", "Name a fruit that is yellow.", "What is 12 times 12?",
           "Translate 'good morning' into French.", "Give one tip for writing clean code."]
MAX_TOKENS = 16


@pytest.mark.parametrize("count", [1, 2, 8])
def test_the_config_has_one_kind_gpu_group_per_gpu(tiny_artifacts, count):
    plan = plan_repo(tiny_artifacts, backend="torch", device="cuda", instances=2, gpus=tuple(range(count)),
                     graphs=False, batch_slots=16)
    config = text_format.Parse(plan["treespec/config.pbtxt"], model_config_pb2.ModelConfig())
    groups = list(config.instance_group)
    assert len(groups) == count
    for gpu, group in enumerate(groups):
        assert group.kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
        assert list(group.gpus) == [gpu] and group.count == 2
    assert config.parameters["batch_slots"].string_value == "16"


def test_gpus_need_cuda_and_distinct_ids(tiny_artifacts):
    with pytest.raises(InputError, match="gpus needs device cuda"):
        plan_repo(tiny_artifacts, device="cpu", gpus=(0,))
    with pytest.raises(InputError, match="distinct GPU ids"):
        plan_repo(tiny_artifacts, backend="torch", device="cuda", gpus=(0, 0))


@pytest.fixture(scope="module")
def service(tiny_artifacts, tmp_path_factory):
    from treespec.exporter.triton_repo import write_triton_repo
    from treespec.runtime.triton.service import TritonService

    repo = write_triton_repo(tiny_artifacts, tmp_path_factory.mktemp("triton") / "repo", instances=2, batch_slots=4)
    with TritonService(repo, None, None, None, startup_timeout=300, exit_timeout=3) as srv:
        yield srv


def test_two_instances_serve_concurrent_streams_with_the_lone_outputs(service, tiny_artifacts):
    from treespec.runtime.api import SpeculativeGenerator

    gen = SpeculativeGenerator.from_artifacts(tiny_artifacts)
    alone = {p: list(gen.generate(p, max_new_tokens=MAX_TOKENS).token_ids) for p in PROMPTS}
    gen.close()
    assert len(service.server.stub_pids()) == 2  # two model instances, two processes
    results: dict = {}
    for _ in range(2):  # two rounds: the second finds both instances warm
        threads = [threading.Thread(target=lambda p=p: results.__setitem__(p, grpc_stream(
            service.grpc_url, p, max_tokens=MAX_TOKENS, timeout=120)), daemon=True) for p in PROMPTS]
        for t in threads:
            t.start()
        for t in threads:
            t.join(240)
        assert all(results[p].ok for p in PROMPTS), [results[p].error for p in PROMPTS]
        assert {p: results[p].ids for p in PROMPTS} == alone
    widths = {k: v for k, v in metrics(service).items() if k.startswith("treespec_batch_width")}
    print(f"\nper instance: {widths}")
    assert len(widths) == 2 and all(v >= 1 for v in widths.values())  # both instances took requests
