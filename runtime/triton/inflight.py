"""The Triton model's side of in-flight batching (runtime/batching.py): requests in, slot requests out.

With `batch_slots` > 0 in the model's parameters, execute() no longer serves its requests one after
the other: each is checked (a bad one is answered at once), turned into a SlotRequest whose emit
callback is a Responder, and handed to the BatchEngine's thread; execute() returns at once, so
Triton hands the model the next requests while earlier ones are still decoding (decoupled mode
lets any thread send a request's responses). A request the slots cannot carry exactly
(runtime/batching.py `batchable`) runs alone between batches, on the sequential path.

The Responder answers as the sequential path does: one response per step when streaming (text
deltas held back while a multi-byte character is incomplete), one whole response otherwise; it
stops its slot when the client cancelled or the request's deadline ran out.
"""
from __future__ import annotations

import time
import traceback

import triton_python_backend_utils as pb_utils

from treespec.runtime.api import check_request as check_sampling
from treespec.runtime.batching import SlotRequest, batchable
from treespec.runtime.triton.schema import DEADLINE_MESSAGE, GenerateRequest
from treespec.runtime.trees.config import show_value

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class Responder:
    """emit(new_ids, finished) for one request's slot: sends its responses, counts its metrics."""

    def __init__(self, model, request, sender, req: GenerateRequest, deadline: float, prompt_tokens: int):
        self.model, self.request, self.sender, self.req = model, request, sender, req
        self.deadline, self.prompt_tokens = deadline, prompt_tokens
        self.ids: list[int] = []
        self.text = ""
        self.steps = 0

    def _stop(self, message: str, code, outcome: str) -> bool:
        self.sender.send(self.model.error_response(message, code), flags=FINAL)
        self.model.m_requests[outcome].increment(1)
        return False

    def fail(self, exc: Exception) -> None:
        """The engine failed this request (a bug or a backend failure): reported, the engine serves on."""
        pb_utils.Logger.log_error(f"treespec: batched request failed: {traceback.format_exception(exc)}")
        self._stop(f"internal error: {type(exc).__name__}: {show_value(str(exc))}", pb_utils.TritonError.INTERNAL,
                   "failed")

    def __call__(self, new: list[int], finished: bool) -> bool:
        if self.request.is_cancelled():
            return self._stop("the request was cancelled", pb_utils.TritonError.CANCELLED, "cancelled")
        if time.monotonic() > self.deadline and not finished:
            return self._stop(f"{DEADLINE_MESSAGE}: the request's timeout of {self.req.timeout:g} s ran out after "
                              f"{len(self.ids) + len(new)} tokens", pb_utils.TritonError.UNAVAILABLE, "cancelled")
        if self.steps:  # the first emit is the prefill's token; the rest are verification steps
            self.model.count_step(len(new))
        self.steps += 1
        self.ids += new
        self.model.m_tokens.increment(len(new))
        full = self.model.gen.tokenizer.decode(self.ids, skip_special_tokens=True)
        if self.req.stream:
            delta = ""
            if not (full.endswith("\ufffd") and not finished):
                delta, self.text = full[len(self.text):], full
            self.sender.send(self.model.response(delta, new, len(new), 1, self.prompt_tokens),
                             flags=FINAL if finished else 0)
        elif finished:
            self.sender.send(self.model.response(full, self.ids, len(self.ids), self.steps - 1, self.prompt_tokens),
                             flags=FINAL)
        if finished:
            self.model.m_requests["success"].increment(1)
            self.model.update_mean()
        return True


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
    return SlotRequest(ids, req.max_tokens, tree, sampling, req.seed, responder, responder.fail)
