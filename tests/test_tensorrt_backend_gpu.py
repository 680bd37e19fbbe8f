"""TensorRTBackend on a real GPU, with TensorRT's engine replaced by tests/fake_tensorrt.py.

Neither TensorRT nor a GPU TensorRT-RTX accepts exists on this project's machines, so this runs the
backend's own work for real (device buffers, bindings, profile choice, shapes, H2D/D2H copies,
commit of accepted rows, CUDA-graph capture and replay) around a stand-in engine that computes a
TinyTreeDecoder at the bound addresses, and compares every step with that model run on the CPU
against a plainly kept cache.
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.gpu

from support import fake_tensorrt  # noqa: E402
from support import tiny_tree_graphs as tiny  # noqa: E402

from treespec import trt_api  # noqa: E402
from treespec.errors import BackendError  # noqa: E402
from treespec.runtime.backends.base import StepInputs  # noqa: E402
from treespec.engine_record import sha256_of  # noqa: E402

PROFILES = [
    {"name": "tree", "batch": [1, 2, 2], "tree_tokens": [1, 4, 8], "past": [1, 48, 64]},
    {"name": "prefill", "batch": [1, 2, 2], "tree_tokens": [1, 16, 16], "past": [1, 48, 64]},
]


@pytest.fixture
def fake_trt(monkeypatch):
    real = trt_api.TrtApi.load.__func__

    def load(cls, builder):
        if builder == "tensorrt":
            return cls(builder="tensorrt", module=fake_tensorrt, version=fake_tensorrt.__version__)
        return real(cls, builder)

    monkeypatch.setattr(trt_api.TrtApi, "load", classmethod(load))


def _engine(tmp_path, seed=0):
    blob = fake_tensorrt.engine_blob(seed, "fp32", PROFILES)
    path = tmp_path / "target.tensorrt.engine"
    path.write_bytes(blob)
    record = {"file": path.name, "builder": "tensorrt", "builder_version": fake_tensorrt.__version__,
              "precision": "fp32", "profiles": PROFILES, "compute_capabilities": ["current"],
              "build_seconds": 0.0, "sha256": sha256_of(blob), "size_bytes": len(blob)}
    return path, record


class Reference:
    """The same model on the CPU with a cache kept the obvious way."""

    def __init__(self, seed, batch, capacity):
        self.model = tiny.TinyTreeDecoder(seed).eval()
        shape = (batch, tiny.KV_HEADS, capacity, tiny.HEAD_DIM)
        self.cache = [torch.zeros(shape) for _ in range(2 * tiny.LAYERS)]
        self.lengths = np.zeros(batch, dtype=np.int64)

    def step(self, ids, pos, mask):
        with torch.no_grad():
            out = self.model(torch.from_numpy(ids), torch.from_numpy(pos), torch.from_numpy(mask),
                             torch.from_numpy(self.lengths.copy()), *self.cache)
        self.new = out[2:]
        return out[0].numpy(), out[1].numpy()

    def commit(self, accepted):
        for b, rows in enumerate(accepted):
            start = int(self.lengths[b])
            for buf, new in zip(self.cache, self.new):
                buf[b, :, start:start + len(rows)] = new[b][:, list(rows)]
            self.lengths[b] += len(rows)


def _tree(rng, batch, tokens, lengths):
    """Random trees: node 0 is the root, each later node's parent is an earlier node."""
    ids = rng.integers(0, tiny.VOCAB, (batch, tokens))
    mask = np.zeros((batch, tokens, tokens), dtype=bool)
    pos = np.zeros((batch, tokens), dtype=np.int64)
    paths = []
    for b in range(batch):
        parent = [-1] + [int(rng.integers(0, i)) for i in range(1, tokens)]
        for i in range(tokens):
            j = i
            while j >= 0:
                mask[b, i, j] = True
                j = parent[j]
            pos[b, i] = lengths[b] + mask[b, i].sum() - 1
        leaf = int(rng.integers(0, tokens))
        path = [j for j in range(tokens) if mask[b, leaf, j]]
        paths.append(path[: int(rng.integers(1, len(path) + 1))])
    return ids, pos, mask, paths


@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_backend_matches_the_model(fake_trt, tmp_path, cuda_graphs):
    from treespec.runtime.backends.tensorrt import TensorRTBackend

    rng = np.random.default_rng(0)
    path, record = _engine(tmp_path)
    backend = TensorRTBackend(path, record, cuda_graphs=cuda_graphs)
    assert backend.name == "tensorrt" and len(backend.profiles) == 2
    batch, capacity = 2, 48
    backend.reset(batch, capacity)
    ref = Reference(0, batch, capacity)

    prompt = 10  # longer than the tree profile's 8: runs on the prefill profile

    def inputs(step):
        if step == 0:
            pos = np.tile(np.arange(prompt), (batch, 1))
            mask = np.tril(np.ones((prompt, prompt), dtype=bool))[None].repeat(batch, 0)
            return rng.integers(0, tiny.VOCAB, (batch, prompt)), pos, mask, [list(range(prompt)), list(range(7))]
        return _tree(rng, batch, 4, ref.lengths)

    for step in range(9):
        ids, pos, mask, accepted = inputs(step)
        out = backend.step(StepInputs(ids, pos, mask))
        logits, hidden = ref.step(ids, pos, mask)
        np.testing.assert_allclose(out.logits, logits, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(out.hidden_states, hidden, rtol=1e-4, atol=1e-4)
        backend.commit(out, accepted)
        ref.commit(accepted)
        np.testing.assert_array_equal(backend.lengths, ref.lengths)

    for (k, v), k_ref, v_ref in zip(backend.read_cache(), ref.cache[0::2], ref.cache[1::2]):
        for b in range(batch):
            n = int(ref.lengths[b])
            np.testing.assert_allclose(k[b, :, :n], k_ref[b, :, :n].numpy(), rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(v[b, :, :n], v_ref[b, :, :n].numpy(), rtol=1e-5, atol=1e-5)
    if cuda_graphs:
        assert set(backend._graphs) == {(1, batch, prompt), (0, batch, 4)}
        # The tree shape ran once eagerly and once under capture; the other 7 steps were replays.
        assert backend._graphs[(0, batch, 4)].context.runs == 2
    backend.close()


def test_stale_outputs_and_bad_shapes_are_refused(fake_trt, tmp_path):
    from treespec.runtime.backends.tensorrt import TensorRTBackend

    path, record = _engine(tmp_path)
    backend = TensorRTBackend(path, record)
    with pytest.raises(BackendError, match="outside it"):
        backend.reset(4, 48)
    backend.reset(1, 16)
    ids, pos, mask, _ = _tree(np.random.default_rng(1), 1, 4, [0])
    first = backend.step(StepInputs(ids, pos, mask))
    backend.step(StepInputs(ids, pos, mask))
    with pytest.raises(BackendError, match="latest step"):
        backend.commit(first, [[0]])
    with pytest.raises(BackendError, match="1..16"):
        long = np.zeros((1, 17), dtype=np.int64)
        backend.step(StepInputs(long, long, np.ones((1, 17, 17), dtype=bool)))
