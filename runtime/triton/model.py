"""The `treespec` orchestrator inside Triton's python backend (decoupled: one request, 1..n responses).

The generated model.py imports this module after putting treespec's environment on sys.path.
One instance holds one SpeculativeGenerator (one KV cache) and serves its requests one after the
other; more instances (instance_group count) serve in parallel, each in its own stub process.

Requests follow Triton's LLM conventions (so /v2/models/treespec/generate and /generate_stream
work): text_input (or input_ids for clients that tokenize themselves), optional max_tokens,
temperature, top_p, top_k, seed, stream, tree (a preset name, "none" for plain autoregressive
decoding, or inline JSON) and raw (no chat template). Each response carries text_output (the
new text: the delta when streaming), output_ids, accepted_tokens (tokens this response adds) and
steps (decoding steps it covers). With stream=true there is one response per decoding step.

Bad requests get an error response (INVALID_ARG) with a message and the model keeps serving.
Custom metrics on Triton's metrics endpoint: treespec_requests_total{outcome}, treespec_tokens_total,
treespec_steps_total, treespec_accepted_tokens_per_step (histogram over verification steps) and
treespec_mean_accepted_tokens (tokens per verification step since the instance started).
"""
from __future__ import annotations

import json
import math
import os
import time
import traceback

import numpy as np
import triton_python_backend_utils as pb_utils

from treespec.runtime.api import MAX_NEW_TOKENS_LIMIT
from treespec.errors import InputError, TreespecError

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
ACCEPTED_BUCKETS = [1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 24, 32]


class _Cancelled(Exception):
    pass


def _error(message: str, code=None):
    code = pb_utils.TritonError.INVALID_ARG if code is None else code
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))


def _scalar(request, name: str, kind: type, default):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return default
    values = tensor.as_numpy().reshape(-1)
    if values.size != 1:
        raise InputError(f"{name} must be a single value, got {values.size} values")
    value = values[0]
    if kind is str:
        if not isinstance(value, (bytes, np.bytes_)):
            raise InputError(f"{name} must be a string")
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise InputError(f"{name} is not valid UTF-8") from None
    if kind is bool:
        return bool(value)
    if kind is float:
        value = float(value)
        if not math.isfinite(value):
            raise InputError(f"{name} must be a finite number, got {value}")
        return value
    return int(value)


class TreespecModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        self.model_name = args.get("model_name", "treespec")
        self.instance = args.get("model_instance_name", self.model_name)
        device = "cuda" if args.get("model_instance_kind") == "GPU" else "cpu"
        if device == "cuda":  # one GPU per instance: the one Triton assigned
            os.environ["CUDA_VISIBLE_DEVICES"] = str(args.get("model_instance_device_id", 0))
        artifact_dir = params.get("artifact_dir", "")
        if artifact_dir and not os.path.isabs(artifact_dir):
            artifact_dir = os.path.join(args["model_repository"], artifact_dir)
        threads = int(params.get("threads") or 0) or None
        self.default_max_tokens = int(params.get("default_max_tokens") or 128)
        self.backend = params.get("backend", "onnxruntime")
        self._check_treespec(params.get("treespec_root"))
        from treespec.runtime.api import SpeculativeGenerator

        t0 = time.perf_counter()
        self.gen = SpeculativeGenerator.from_artifacts(artifact_dir, backend=self.backend, device=device,
                                                       threads=threads, tree=params.get("tree") or None,
                                                       drafter=params.get("drafter") or None)
        self.max_context = self.gen.max_context
        from treespec.runtime.trees.presets import preset_names

        self.presets = preset_names()
        self.vocab = self.gen.manifest.dims.vocab_size
        pb_utils.Logger.log_info(
            f"treespec: loaded {artifact_dir} ({self.backend} on {device}) in {time.perf_counter() - t0:.1f} s")
        self._metrics()

    @staticmethod
    def _check_treespec(expected: str | None) -> None:
        import treespec

        here = os.path.dirname(os.path.realpath(treespec.__file__))
        if expected and os.path.realpath(expected) != here:
            pb_utils.Logger.log_warn(f"treespec: the repository was written by treespec at {expected}, "
                                     f"but the stub imported it from {here}")

    def _metrics(self) -> None:
        label = {"model": self.model_name}
        counter, gauge, hist = (pb_utils.MetricFamily.COUNTER, pb_utils.MetricFamily.GAUGE,
                                pb_utils.MetricFamily.HISTOGRAM)
        self._fam = {  # keep the families alive as long as their metrics
            "requests": pb_utils.MetricFamily("treespec_requests_total", "Requests by outcome", counter),
            "tokens": pb_utils.MetricFamily("treespec_tokens_total", "Tokens generated", counter),
            "steps": pb_utils.MetricFamily("treespec_steps_total",
                                           "Tree verification steps (after the prefill)", counter),
            "accepted": pb_utils.MetricFamily("treespec_accepted_tokens_per_step",
                                              "Tokens produced per verification step (accepted drafts + bonus)",
                                              hist),
            "mean": pb_utils.MetricFamily("treespec_mean_accepted_tokens",
                                          "Mean tokens per verification step since the instance started "
                                          "(per instance; the histogram's sum/count covers all)", gauge),
        }
        self.m_requests = {o: self._fam["requests"].Metric(labels={**label, "outcome": o})
                           for o in ("success", "invalid", "failed", "cancelled")}
        self.m_tokens = self._fam["tokens"].Metric(labels=label)
        self.m_steps = self._fam["steps"].Metric(labels=label)
        self.m_accepted = self._fam["accepted"].Metric(labels=label, buckets=ACCEPTED_BUCKETS)
        self.m_mean = self._fam["mean"].Metric(labels={**label, "instance": self.instance})
        self.total_accepted = 0
        self.total_steps = 0

    # requests -----------------------------------------------------------------------------------
    def _parse(self, request) -> dict:
        text = _scalar(request, "text_input", str, None)
        ids_tensor = pb_utils.get_input_tensor_by_name(request, "input_ids")
        if text is not None and ids_tensor is not None:
            raise InputError("give either text_input or input_ids, not both")
        if ids_tensor is not None:
            ids = ids_tensor.as_numpy().reshape(-1)
            if ids.size == 0:
                raise InputError("input_ids is empty")
            if ids.min() < 0 or ids.max() >= self.vocab:
                raise InputError(f"input_ids must lie in [0, {self.vocab})")
            prompt = [int(t) for t in ids]
        elif text is not None:
            prompt = text
        else:
            raise InputError("missing input: give text_input (text) or input_ids (token ids)")
        max_tokens = _scalar(request, "max_tokens", int, self.default_max_tokens)
        if max_tokens <= 0:
            raise InputError(f"max_tokens must be a positive integer, got {max_tokens}")
        if max_tokens > MAX_NEW_TOKENS_LIMIT:
            raise InputError(f"max_tokens {max_tokens} is over the limit {MAX_NEW_TOKENS_LIMIT} (generation "
                             f"stops at the context limit, {self.max_context} tokens, anyway)")
        temperature = _scalar(request, "temperature", float, 0.0)
        if temperature < 0:
            raise InputError(f"temperature must be >= 0, got {temperature}")
        top_p = _scalar(request, "top_p", float, 1.0)
        if not 0.0 < top_p <= 1.0:
            raise InputError(f"top_p must be in (0, 1], got {top_p}")
        top_k = _scalar(request, "top_k", int, 0)
        if top_k < 0:
            raise InputError(f"top_k must be >= 0, got {top_k}")
        tree = _scalar(request, "tree", str, None)
        if tree and tree != "none" and not tree.lstrip().startswith("{") and tree not in self.presets:
            # never a file path: a request must not make the server read files
            raise InputError(f"unknown tree '{tree}': use none, inline JSON or a preset "
                             f"({', '.join(self.presets)})")
        return dict(prompt=prompt, max_new_tokens=max_tokens, temperature=temperature, top_p=top_p,
                    top_k=top_k, seed=_scalar(request, "seed", int, None), tree=tree or None,
                    raw=_scalar(request, "raw", bool, False), stream=_scalar(request, "stream", bool, False))

    @staticmethod
    def _response(text: str, ids: list[int], accepted: int, steps: int):
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor("text_output", np.array([text.encode("utf-8")], dtype=np.object_)),
            pb_utils.Tensor("output_ids", np.array(ids, dtype=np.int64)),
            pb_utils.Tensor("accepted_tokens", np.array([accepted], dtype=np.int32)),
            pb_utils.Tensor("steps", np.array([steps], dtype=np.int32)),
        ])

    def execute(self, requests):
        for request in requests:
            self._serve(request)
        return None

    def _serve(self, request) -> None:
        sender = request.get_response_sender()
        try:
            args = self._parse(request)
            outcome = self._generate(request, sender, args)
        except InputError as exc:
            sender.send(_error(str(exc)), flags=FINAL)
            outcome = "invalid"
        except _Cancelled:
            sender.send(_error("the request was cancelled", pb_utils.TritonError.CANCELLED), flags=FINAL)
            outcome = "cancelled"
        except TreespecError as exc:
            sender.send(_error(str(exc)), flags=FINAL)
            outcome = "invalid"
        except Exception as exc:  # a bug or a backend failure: report it, keep serving
            pb_utils.Logger.log_error(f"treespec: request failed: {traceback.format_exc()}")
            sender.send(_error(f"internal error: {type(exc).__name__}: {exc}", pb_utils.TritonError.INTERNAL),
                        flags=FINAL)
            outcome = "failed"
        self.m_requests[outcome].increment(1)

    def _generate(self, request, sender, args: dict) -> str:
        stream = args.pop("stream")
        prompt = args.pop("prompt")
        text, ids, steps, first = [], [], 0, True
        sent_final = False
        for chunk in self.gen.stream(prompt, **args):
            if request.is_cancelled():
                raise _Cancelled
            if not first:  # the first chunk is the prefill's token; the rest are verification steps
                steps += 1
                self.m_accepted.observe(chunk.accepted)
                self.m_steps.increment(1)
                self.total_steps += 1
                self.total_accepted += chunk.accepted
            first = False
            self.m_tokens.increment(len(chunk.token_ids))
            if stream:
                sender.send(self._response(chunk.text, chunk.token_ids, chunk.accepted, 1),
                            flags=FINAL if chunk.finished else 0)
                sent_final = chunk.finished
            else:
                text.append(chunk.text)
                ids += chunk.token_ids
        if self.total_steps:
            self.m_mean.set(self.total_accepted / self.total_steps)
        if not stream:
            sender.send(self._response("".join(text), ids, len(ids), steps), flags=FINAL)
        elif not sent_final:
            sender.send(flags=FINAL)
        return "success"

    def finalize(self) -> None:
        gen = getattr(self, "gen", None)
        if gen is not None:
            gen.close()
