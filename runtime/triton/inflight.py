"""The Triton model's side of in-flight batching (runtime/batching.py): requests in, slot requests out.

With `batch_slots` > 0 in the model's parameters, execute() no longer serves its requests one after
the other: each is checked (a bad one is answered at once), turned into a SlotRequest whose emit
callback is a Responder, and handed to the BatchEngine's thread; execute() returns at once, so
Triton hands the model the next requests while earlier ones are still decoding (decoupled mode
lets any thread send a request's responses). A request the slots cannot carry exactly
(runtime/batching.py `batchable`) runs alone between batches, on the sequential path.

Why a response thread (ResponseWorker): every call into Triton from the stub is a round trip to
the server process. Measured on the CPU with 8 streams: `send` 340 us, `is_cancelled` 95 us, the
text decode 60 us per slot and step, so at 64 slots the engine thread would spend ~30 ms per step
talking to Triton instead of ~5 ms on the GPU step. So the engine thread only hands each slot's
new tokens to a queue (microseconds); the worker sends them, coalescing what piled up for one
request into one response (one per step while it keeps up, several steps per response under
load: `steps` says how many), counts the metrics, and polls `is_cancelled` for every live request
every CANCEL_POLL_S (and the front's marker, runtime/triton/client_watch.py): a cancelled request
(its client left) gets its CANCELLED answer there, and its flag tells the engine to free the slot
(or never to admit it) at the next step boundary.

The answers are the sequential path's: text deltas held back while a multi-byte character is
incomplete when streaming, one whole response otherwise; "deadline exceeded" when the request's
timeout runs out.
"""
from __future__ import annotations

import queue
import threading
import time
import traceback

import triton_python_backend_utils as pb_utils

from treespec.runtime.api import check_request as check_sampling
from treespec.runtime.batching import SlotRequest, batchable, drain
from treespec.runtime.detokenize import IncrementalText
from treespec.runtime.triton.client_watch import take_cancelled
from treespec.runtime.triton.schema import DEADLINE_MESSAGE, GenerateRequest
from treespec.runtime.trees.config import show_value

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
CANCEL_POLL_S = 0.05
GAUGES_S = 0.5  # how often the engine's load gauges are published


class Responder:
    """emit(new_ids, finished) for one request's slot, called on the engine thread: it only queues;
    the ResponseWorker answers (deliver / stop)."""

    def __init__(self, model, request, sender, req: GenerateRequest, deadline: float, prompt_tokens: int):
        self.model, self.request, self.sender, self.req = model, request, sender, req
        self.deadline, self.prompt_tokens = deadline, prompt_tokens
        self.ids: list[int] = []
        self.text = IncrementalText(model.gen.tokenizer)
        self.emits = 0
        self.cancelled = False  # the client left: the engine frees the slot, the worker answers CANCELLED
        self.started = False  # the engine emitted for it (it holds a slot)
        self.done = False  # the final response went out (worker thread only)
        self.checked = 0.0

    # engine thread ----------------------------------------------------------------------------
    def __call__(self, new: list[int], finished: bool) -> bool:
        self.started = True
        if self.cancelled:
            return False
        if time.monotonic() > self.deadline and not finished:
            self.model.responses.post(self, None, False, f"{DEADLINE_MESSAGE}: the request's timeout of "
                                                         f"{self.req.timeout:g} s ran out")
            return False
        self.model.responses.post(self, list(new), finished)
        return True

    def is_cancelled(self) -> bool:
        """The engine asks before every step; a request still waiting for a slot also looks for the
        front's marker here, so that it is not admitted even if the worker has not polled it yet."""
        if not self.cancelled and not self.started:
            self.cancelled = take_cancelled(self.model.responses.cancel_dir, self.request.request_id())
        return self.cancelled

    def fail(self, exc: Exception) -> None:
        """The engine failed this request (a bug or a backend failure): reported, the engine serves on."""
        pb_utils.Logger.log_error(f"treespec: batched request failed: {traceback.format_exception(exc)}")
        self.model.responses.post(self, None, False, f"internal error: {type(exc).__name__}: {show_value(str(exc))}",
                                  pb_utils.TritonError.INTERNAL, "failed")

    # worker thread ----------------------------------------------------------------------------
    def stop(self, message: str, code, outcome: str) -> None:
        if self.done:
            return
        self.done = True
        self.sender.send(self.model.error_response(message, code), flags=FINAL)
        self.model.m_requests[outcome].increment(1)

    def deliver(self, groups: list[list[int]], finished: bool) -> None:
        """The tokens of one or more emits (the first emit is the prefill's token) as one response."""
        if self.done:
            return
        steps = len(groups) - (1 if self.emits == 0 else 0)
        for new in groups[1:] if self.emits == 0 else groups:
            self.model.count_step(len(new))
        self.emits += len(groups)
        new = [t for g in groups for t in g]
        self.ids += new
        self.model.count_tokens(len(new))
        if finished:
            self.model.publish_counts()  # before the final response: a client may read the metrics next
        if self.req.stream:
            self.sender.send(self.model.response(self.text.add(new, finished), new, len(new), max(steps, 1),
                                                 self.prompt_tokens), flags=FINAL if finished else 0)
        elif finished:
            full = self.model.gen.tokenizer.decode(self.ids, skip_special_tokens=True)
            self.sender.send(self.model.response(full, self.ids, len(self.ids), self.emits - 1, self.prompt_tokens),
                             flags=FINAL)
        if finished:
            self.done = True
            self.model.m_requests["success"].increment(1)


class ResponseWorker:
    """One thread that answers every batched request (see the module's head for why)."""

    def __init__(self, cancel_dir: str | None = None, gauges=lambda: None):
        self.cancel_dir = cancel_dir  # where the front marks requests whose client left (client_watch.py)
        self.gauges, self._published = gauges, 0.0
        self._queue: queue.Queue = queue.Queue()
        self._live: set[Responder] = set()
        self._thread = threading.Thread(target=self._loop, name="treespec-responses", daemon=True)
        self._thread.start()

    def register(self, responder: Responder) -> None:
        self._queue.put(("register", responder))

    def post(self, responder: Responder, new: list[int] | None, finished: bool, error: str | None = None,
             code=None, outcome: str = "cancelled") -> None:
        self._queue.put(("emit", responder, new, finished, error, code, outcome))

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _loop(self) -> None:
        while True:
            items = self._drain()
            if items is None:
                return
            try:
                self._answer(items)
                self._poll_cancelled()
                if time.monotonic() - self._published > GAUGES_S:
                    self._published = time.monotonic()
                    self.gauges()
            except Exception:  # never let one bad response end the thread that answers everyone
                pb_utils.Logger.log_error(f"treespec: response worker: {traceback.format_exc()}")

    def _drain(self) -> list | None:
        items = drain(self._queue, timeout=CANCEL_POLL_S)
        return None if None in items else items

    def _answer(self, items: list) -> None:
        pending: dict[Responder, list] = {}  # responder -> [groups, finished], in arrival order
        for item in items:
            if item[0] == "register":
                self._live.add(item[1])
                continue
            _, responder, new, finished, error, code, outcome = item
            self._live.add(responder)
            if error is not None:
                self._flush(pending.pop(responder, None), responder)
                responder.stop(error, code if code is not None else pb_utils.TritonError.UNAVAILABLE, outcome)
                continue
            entry = pending.setdefault(responder, [[], False])
            entry[0].append(new)
            entry[1] = entry[1] or finished
        for responder, entry in pending.items():
            self._flush(entry, responder)
        self._live = {r for r in self._live if not r.done}

    @staticmethod
    def _flush(entry, responder: Responder) -> None:
        if entry and entry[0]:
            responder.deliver(entry[0], entry[1])

    def _poll_cancelled(self) -> None:
        now = time.monotonic()
        for responder in list(self._live):
            if responder.done or now - responder.checked < CANCEL_POLL_S:
                continue
            responder.checked = now
            if not responder.cancelled and (take_cancelled(self.cancel_dir, responder.request.request_id())
                                            or responder.request.is_cancelled()):
                responder.cancelled = True
            if responder.cancelled:
                responder.stop("the request was cancelled", pb_utils.TritonError.CANCELLED, "cancelled")
        self._live = {r for r in self._live if not r.done}


def slot_request(model, request, sender, req: GenerateRequest, started: float) -> SlotRequest | None:
    """The request as a SlotRequest, or None when the slots cannot carry it exactly (InputError if bad)."""
    gen = model.gen
    tree = gen.default_tree if req.tree is None else gen.resolve_tree(req.tree)
    sampling = check_sampling(req.max_tokens, req.temperature, req.top_p, req.top_k, req.seed)
    if not batchable(gen.engine, tree, sampling):
        return None
    prompt = req.messages or (req.input_ids if req.input_ids is not None else req.text_input)
    ids = gen.encode(prompt, req.raw)
    responder = Responder(model, request, sender, req, started + req.timeout, len(ids))
    model.responses.register(responder)
    return SlotRequest(ids, req.max_tokens, tree, sampling, req.seed, responder, responder.fail,
                       cancelled=responder.is_cancelled)
