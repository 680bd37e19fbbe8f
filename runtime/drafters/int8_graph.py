"""Drafter graphs with int8 weights for ONNX Runtime on the CPU (issue 15).

Why: on a 2-core CPU an EAGLE head step is a GEMV over its lm_head (16,384 draft-vocabulary rows,
38 MB of fp32 weights), bound by memory: 2.14 ms a step at one token for SmolLM2, so a 4-level
draft cost 16 ms against a 26 ms target step and EAGLE barely beat plain decoding. With its MatMul
weights in int8 (ONNX Runtime's dynamic quantization: activations quantized per step, weights per
tensor) a step takes 0.75 ms; the tokens accepted per step stayed 1.79 against 1.80 (a chain of 4)
and 2.35 against 2.41 (eagle2 d4 k4 n16) on four bench prompts (`treespec demo` prompts, 64 tokens).
Lossless whatever the head proposes: the target verifies every drafted token exactly.

The draft LM and the Medusa heads get the same (their lm_heads are the full vocabulary's). The
quantized copy is made when the drafter loads (about 2 s for SmolLM2's EAGLE head) into a temporary
folder that lives as long as the object; the artifact directory is not touched. The target graph is
never quantized (its logits decide the output). TREESPEC_DRAFTER_INT8=0 keeps the fp32 graphs.
"""
from __future__ import annotations

import logging
import os
import tempfile
import warnings
from pathlib import Path


def int8_wanted(graph: str, device: str, precision: str) -> bool:
    """Whether a drafter's graph runs with int8 weights: fp32 drafter graphs on the CPU."""
    wanted = os.environ.get("TREESPEC_DRAFTER_INT8", "1") != "0"
    return wanted and graph != "target" and device == "cpu" and precision == "fp32"


class Int8Graph:
    """`source` (an fp32 ONNX graph, external data beside it) with int8 MatMul weights, at `.path`."""

    @classmethod
    def of(cls, source: Path) -> "Int8Graph | None":
        """The quantized copy, or None when the quantizer cannot read or rewrite the graph: the caller
        then opens the fp32 graph, which either runs or fails with the loader's own clear error."""
        try:
            return cls(source)
        except Exception as exc:  # a broken or unusual graph: fp32 is always a correct fallback
            warnings.warn(f"{source.name}: running the fp32 graph, its int8 copy failed: {exc}"[:300])
            return None

    def __init__(self, source: Path):
        from onnxruntime.quantization import QuantType, quantize_dynamic

        self._folder = tempfile.TemporaryDirectory(prefix="treespec-int8-")
        self.path = Path(self._folder.name) / source.name
        logging.disable(logging.WARNING)  # its advice to pre-process the graph, printed on every call
        try:
            quantize_dynamic(source, self.path, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"],
                             use_external_data_format=True, extra_options={"MatMulConstBOnly": True})
        finally:
            logging.disable(logging.NOTSET)
