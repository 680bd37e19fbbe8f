"""The `treespec` orchestrator inside Triton's python backend (decoupled: one request, 1..n responses).

The model.py that Triton loads (runtime/triton/repo_model.py, copied into the repository) imports
this module after putting treespec's environment on sys.path. One instance holds one
SpeculativeGenerator (one KV cache) and serves its requests one after the other; more instances
(instance_group count) serve in parallel, each in its own stub process.

Requests follow Triton's LLM conventions (so /v2/models/treespec/generate and /generate_stream
work); their fields and limits are runtime/triton/schema.py's, checked before any work (tokenizing
included): a bad request costs microseconds, not the model's time. Each response carries
text_output (the new text: the delta when streaming), output_ids, accepted_tokens (tokens this
response adds) and steps (decoding steps it covers). With stream=true there is one response per step.

In-flight batching: with the parameter `batch_slots` > 0 (treespec serve --batch-slots), requests
are not served one after the other but join a running batch of slots at step boundaries
(runtime/batching.py, runtime/triton/inflight.py); execute() then only checks and enqueues.

Deadlines: a request holds the model at most its `timeout` (schema.py). The loop checks it at every
step and answers "deadline exceeded"; and while it works the instance writes its deadline to
$TREESPEC_TRITON_WATCH/<pid>.json, so the supervisor (runtime/triton/supervisor.py) can kill a stub
that is stuck inside one step past it, and the model is reloaded for the next request.

Custom metrics on Triton's metrics endpoint: treespec_requests_total{outcome}, treespec_tokens_total,
treespec_steps_total, treespec_steps_by_tokens_total{tokens} (verification steps by the tokens each produced:
the acceptance's distribution) and treespec_mean_accepted_tokens (tokens per verification step since the
instance started); per instance, the batch engine's gauges (treespec_tree_budget, treespec_batch_width,
treespec_batch_running, treespec_tokens_per_step, treespec_requests_plain_under_load) and where its thread's
time went (treespec_engine_{admit,draft,target,host}_seconds_total). Tokens, steps and seconds are counted in
the instance and published in bulk (publish_counts: before a request's final response, and with the engine's
gauges): every metric call from the stub is a round trip to the server process, and counting as it happened
took three such calls per step and request, beside the response's own send.
"""
from __future__ import annotations

import json
import os
import threading
import time
import traceback

import numpy as np
import triton_python_backend_utils as pb_utils

import treespec
from treespec.errors import InputError, TreespecError
from treespec.runtime.api import SpeculativeGenerator
from treespec.runtime.batch_sizing import max_budget
from treespec.runtime.batching import PHASES, BatchEngine
from treespec.runtime.triton.client_watch import take_cancelled
from treespec.runtime.triton.inflight import ResponseWorker, slot_request
from treespec.runtime.triton.env import WATCH_ENV
from treespec.runtime.triton.schema import DEADLINE_MESSAGE, FIELDS, MAX_INPUT_IDS, GenerateRequest, check_request
from treespec.runtime.trees.config import show_value

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class _Cancelled(Exception):
    pass


class _DeadlineExceeded(Exception):
    pass


def _error(message: str, code=None):
    code = pb_utils.TritonError.INVALID_ARG if code is None else code
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))


def _value(request, name: str):
    """One input as a plain Python value (None when absent): a string, a list of ids or a scalar."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return None
    values = tensor.as_numpy().reshape(-1)
    if name == "input_ids":
        if values.size > MAX_INPUT_IDS:  # refused before a list of millions is built
            raise InputError(f"input_ids has {values.size} ids, over the limit of {MAX_INPUT_IDS}")
        return [int(v) for v in values]
    if values.size != 1:
        raise InputError(f"{name} must be a single value, got {values.size} values")
    value = values[0]
    if isinstance(value, (bytes, np.bytes_)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise InputError(f"{name} is not valid UTF-8") from None
    return value.item() if isinstance(value, np.generic) else value


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
        t0 = time.perf_counter()
        self.gen = SpeculativeGenerator.from_artifacts(artifact_dir, backend=self.backend, device=device,
                                                       threads=threads, tree=params.get("tree") or None,
                                                       drafter=params.get("drafter") or None)
        self.max_context = self.gen.max_context
        self.vocab = self.gen.manifest.dims.vocab_size
        # More characters than this cannot fit the context whatever they are: refused untokenized.
        longest = max((len(t) for t in self.gen.tokenizer.get_vocab()), default=64)
        self.max_text_chars = 2 * longest * self.max_context
        watch = os.environ.get(WATCH_ENV)
        self.cancel_dir = watch if watch and os.path.isdir(watch) else None  # the front's cancellation markers
        self.watch_file = os.path.join(watch, f"{os.getpid()}.json") if watch and os.path.isdir(watch) else None
        slots = int(params.get("batch_slots") or 0)  # within an engine's batch profile: checked by plan_repo
        self.batch = None
        self._metrics()
        if slots > 0:
            self.batch = BatchEngine(self.gen.engine, slots, self.gen.manifest.profile("target").tree_tokens[2],
                                     sizing=params.get("tree_sizing", "load") != "fixed",
                                     budget=max_budget(self.gen.default_tree))
            self.responses = ResponseWorker(self.cancel_dir, gauges=self.update_engine_gauges)
        pb_utils.Logger.log_info(
            f"treespec: loaded {artifact_dir} ({self.backend} on {device}) in {time.perf_counter() - t0:.1f} s")

    @staticmethod
    def _check_treespec(expected: str | None) -> None:
        here = os.path.dirname(os.path.realpath(treespec.__file__))
        if expected and os.path.realpath(expected) != here:
            pb_utils.Logger.log_warn(f"treespec: the repository was written by treespec at {expected}, "
                                     f"but the stub imported it from {here}")
    def _metrics(self) -> None:
        label = {"model": self.model_name}
        counter, gauge = pb_utils.MetricFamily.COUNTER, pb_utils.MetricFamily.GAUGE
        self._fam = {  # keep the families alive as long as their metrics
            "requests": pb_utils.MetricFamily("treespec_requests_total", "Requests by outcome", counter),
            "tokens": pb_utils.MetricFamily("treespec_tokens_total", "Tokens generated", counter),
            "steps": pb_utils.MetricFamily("treespec_steps_total",
                                           "Tree verification steps (after the prefill)", counter),
            "by_tokens": pb_utils.MetricFamily("treespec_steps_by_tokens_total", "Verification steps by the "
                                               "tokens each produced (accepted drafts + bonus)", counter),
            "mean": pb_utils.MetricFamily("treespec_mean_accepted_tokens",
                                          "Mean tokens per verification step since the instance started "
                                          "(per instance; treespec_steps_by_tokens_total covers all)", gauge),
            # in-flight batching (runtime/batching.py, runtime/batch_sizing.py), per instance
            "budget": pb_utils.MetricFamily("treespec_tree_budget", "Drafted nodes per sequence of the last "
                                            "batched step, chosen for the load (0: plain decoding)", gauge),
            "width": pb_utils.MetricFamily("treespec_batch_width", "Batch width the backend steps", gauge),
            "running": pb_utils.MetricFamily("treespec_batch_running", "Requests in the running batch", gauge),
            "rate": pb_utils.MetricFamily("treespec_tokens_per_step", "Tokens per sequence and speculative "
                                          "batched step (moving average: the acceptance)", gauge),
            "plain": pb_utils.MetricFamily("treespec_requests_plain_under_load", "Greedy requests decoded "
                                           "plainly because no tree paid at the batch width (since start)", gauge),
            **{f"seconds_{phase}": pb_utils.MetricFamily(f"treespec_engine_{phase}_seconds_total",
                                                         f"Seconds the batch engine spent in {phase}", counter)
               for phase in PHASES},
        }
        self.m_requests = {o: self._fam["requests"].Metric(labels={**label, "outcome": o})
                           for o in ("success", "invalid", "failed", "cancelled")}
        self.m_tokens = self._fam["tokens"].Metric(labels=label)
        self.m_steps = self._fam["steps"].Metric(labels=label)
        self.m_by_tokens: dict[int, object] = {}  # made on first use, one per count of tokens
        self.m_mean = self._fam["mean"].Metric(labels={**label, "instance": self.instance})
        self.m_engine = {k: self._fam[k].Metric(labels={**label, "instance": self.instance})
                         for k in ("budget", "width", "running", "rate", "plain")}
        self.m_seconds = {phase: self._fam[f"seconds_{phase}"].Metric(labels={**label, "instance": self.instance})
                          for phase in PHASES}
        self._published_seconds = dict.fromkeys(PHASES, 0.0)
        self.total_accepted = 0
        self.total_steps = 0
        self._counts_lock = threading.Lock()  # the execute thread and the response thread both count
        self._unpublished: dict[int, int] = {}  # tokens of a step -> steps, since the last publish
        self._unpublished_tokens = 0

    # requests -----------------------------------------------------------------------------------
    def _parse(self, request) -> GenerateRequest:
        """Every check before any work: fields (schema.py), then what needs the model's sizes."""
        req = check_request({name: value for name in FIELDS if (value := _value(request, name)) is not None})
        if req.input_ids is not None and max(req.input_ids) >= self.vocab:
            raise InputError(f"input_ids must lie in [0, {self.vocab})")
        if req.text_input is not None and len(req.text_input) > self.max_text_chars:
            raise InputError(f"text_input has {len(req.text_input)} characters: far more than the context "
                             f"limit of {self.max_context} tokens can hold")
        if req.max_tokens is None:
            req.max_tokens = self.default_max_tokens
        return req

    @staticmethod
    def _response(text: str, ids: list[int], accepted: int, steps: int, prompt_tokens: int):
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor("text_output", np.array([text.encode("utf-8")], dtype=np.object_)),
            pb_utils.Tensor("output_ids", np.array(ids, dtype=np.int64)),
            pb_utils.Tensor("accepted_tokens", np.array([accepted], dtype=np.int32)),
            pb_utils.Tensor("steps", np.array([steps], dtype=np.int32)),
            pb_utils.Tensor("prompt_tokens", np.array([prompt_tokens], dtype=np.int32)),
        ])

    def execute(self, requests):
        for request in requests:
            if self.batch is None:
                self._serve(request)
            else:
                self._enqueue(request)
        return None

    def _enqueue(self, request) -> None:
        """Checked now (a bad request is answered at once), decoded by the batch engine's thread."""
        sender = request.get_response_sender()
        try:
            req = self._parse(request)
            slot = slot_request(self, request, sender, req, time.monotonic())
        except TreespecError as exc:  # InputError included
            sender.send(_error(str(exc)), flags=FINAL)
            self.m_requests["invalid"].increment(1)
            return
        self.batch.submit(slot if slot is not None else (lambda: self._serve(request, sender)))

    # what runtime/triton/inflight.py's Responder uses
    error_response = staticmethod(_error)

    def response(self, *args):
        return self._response(*args)

    def count_step(self, tokens: int) -> None:
        """A verification step that produced `tokens`, published by publish_counts (module doc)."""
        with self._counts_lock:
            self._unpublished[tokens] = self._unpublished.get(tokens, 0) + 1
            self.total_steps += 1
            self.total_accepted += tokens

    def count_tokens(self, tokens: int) -> None:
        with self._counts_lock:
            self._unpublished_tokens += tokens

    def publish_counts(self) -> None:
        """What count_step and count_tokens counted since the last call, onto the metrics endpoint."""
        with self._counts_lock:
            steps, tokens = self._unpublished, self._unpublished_tokens
            self._unpublished, self._unpublished_tokens = {}, 0
            mean = self.total_accepted / self.total_steps if self.total_steps else None
            seconds = self._unpublished_seconds()
        for phase, spent in seconds.items():
            if spent > 0:
                self.m_seconds[phase].increment(spent)
        if tokens:
            self.m_tokens.increment(tokens)
        if steps:
            self.m_steps.increment(sum(steps.values()))
        for count, n in steps.items():
            if count not in self.m_by_tokens:
                self.m_by_tokens[count] = self._fam["by_tokens"].Metric(
                    labels={"model": self.model_name, "tokens": str(count)})
            self.m_by_tokens[count].increment(n)
        if steps and mean is not None:
            self.m_mean.set(mean)

    def _unpublished_seconds(self) -> dict[str, float]:
        """The batch engine's seconds per phase since the last call (under _counts_lock)."""
        if self.batch is None:
            return {}
        totals = dict(self.batch.stats.seconds)  # a copy: the engine thread adds to them meanwhile
        spent = {phase: totals[phase] - self._published_seconds[phase] for phase in PHASES}
        self._published_seconds = totals
        return spent

    def update_engine_gauges(self) -> None:
        """The batch engine's load and tree sizing on the metrics endpoint, and the counts so far
        (called by the response thread every GAUGES_S)."""
        self.publish_counts()
        stats, sizer = self.batch.stats, self.batch.sizer
        self.m_engine["budget"].set(stats.budget)
        self.m_engine["width"].set(stats.width)
        self.m_engine["plain"].set(stats.plain_under_load)
        self.m_engine["running"].set(sum(s is not None for s in self.batch.slots))
        if sizer is not None:
            self.m_engine["rate"].set(sizer.tokens_per_step)

    def _watch(self, deadline: float | None) -> None:
        """Tell the supervisor until when this instance may work on the current request (None: idle)."""
        if self.watch_file is None:
            return
        tmp = f"{self.watch_file}.tmp"
        try:
            with open(tmp, "w") as handle:
                json.dump({"pid": os.getpid(), "instance": self.instance, "deadline": deadline}, handle)
            os.replace(tmp, self.watch_file)
        except OSError:
            pass

    def _serve(self, request, sender=None) -> None:
        sender = sender or request.get_response_sender()
        started = time.monotonic()
        try:
            req = self._parse(request)
            self._watch(started + req.timeout)
            outcome = self._generate(request, sender, req, started + req.timeout)
        except InputError as exc:
            sender.send(_error(str(exc)), flags=FINAL)
            outcome = "invalid"
        except _Cancelled:
            sender.send(_error("the request was cancelled", pb_utils.TritonError.CANCELLED), flags=FINAL)
            outcome = "cancelled"
        except _DeadlineExceeded as exc:
            sender.send(_error(f"{DEADLINE_MESSAGE}: {exc}", pb_utils.TritonError.UNAVAILABLE), flags=FINAL)
            outcome = "cancelled"
        except TreespecError as exc:
            sender.send(_error(str(exc)), flags=FINAL)
            outcome = "invalid"
        except Exception as exc:  # a bug or a backend failure: report it, keep serving
            pb_utils.Logger.log_error(f"treespec: request failed: {traceback.format_exc()}")
            sender.send(_error(f"internal error: {type(exc).__name__}: {show_value(str(exc))}",
                               pb_utils.TritonError.INTERNAL), flags=FINAL)
            outcome = "failed"
        finally:
            self._watch(None)
        self.m_requests[outcome].increment(1)

    def _generate(self, request, sender, req: GenerateRequest, deadline: float) -> str:
        prompt = req.messages or (req.input_ids if req.input_ids is not None else req.text_input)
        prompt_ids = self.gen.encode(prompt, req.raw)  # once: its length goes back as prompt_tokens
        chunks = self.gen.stream(prompt_ids, max_new_tokens=req.max_tokens, temperature=req.temperature,
                                 top_p=req.top_p, top_k=req.top_k, seed=req.seed, tree=req.tree, raw=req.raw)
        text, ids, steps, first = [], [], 0, True
        sent_final = False
        for chunk in chunks:
            if take_cancelled(self.cancel_dir, request.request_id()) or request.is_cancelled():
                chunks.close()  # releases the generator at once
                raise _Cancelled
            if time.monotonic() > deadline and not chunk.finished:
                chunks.close()
                raise _DeadlineExceeded(f"the request's timeout of {req.timeout:g} s ran out after "
                                        f"{len(ids) + len(chunk.token_ids)} tokens")
            if not first:  # the first chunk is the prefill's token; the rest are verification steps
                steps += 1
                self.count_step(chunk.accepted)
            first = False
            self.count_tokens(len(chunk.token_ids))
            if chunk.finished:
                self.publish_counts()  # before the final response: a client may read the metrics next
            if req.stream:
                sender.send(self._response(chunk.text, chunk.token_ids, chunk.accepted, 1, len(prompt_ids)),
                            flags=FINAL if chunk.finished else 0)
                sent_final = chunk.finished
            else:
                text.append(chunk.text)
                ids += chunk.token_ids
        self.publish_counts()
        if not req.stream:
            sender.send(self._response("".join(text), ids, len(ids), steps, len(prompt_ids)),
                        flags=FINAL)
        elif not sent_final:
            sender.send(flags=FINAL)
        return "success"

    def finalize(self) -> None:
        if getattr(self, "batch", None) is not None:
            self.batch.close()
            self.responses.close()
        gen = getattr(self, "gen", None)
        if gen is not None:
            gen.close()
        if getattr(self, "watch_file", None):
            try:
                os.unlink(self.watch_file)
            except OSError:
                pass
