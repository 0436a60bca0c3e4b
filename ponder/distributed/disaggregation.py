"""Prefill/decode disaggregation over any transport: one prefill engine and one decode engine
driven as one engine (add_request / step / abort_request / has_unfinished_requests).

A request runs on the prefill engine as prefill-only: its prompt is computed there and its first
token sampled there, streamed to the caller as the prefill engine's output (time to first token is
the prefill engine's). Unless that token ended it, the prefill engine holds its KV; the coordinator
exports it (the prefill engine's blocks are freed), moves the `Handoff` through `transport`, and
adds it to the decode engine, which continues from the first token. Outputs are those of one
engine (engine/handoff.py says why).

The engines are objects with the engine API (ponder.engine.engine.LLMEngine) in this process; the
Ray layer makes the same calls inside its replica actors, with the object store as the transport
(`through_object_store` serializes as it does: numpy buffers out of band, read-only on arrival).
This module imports no Ray.

Fault injection: `fault(stage, request_id)`, if given, is called at each stage of a hand-off —
"held" (the prefill engine holds the KV), "exported" (its blocks are freed; the hand-off is in
transit) and "admitted" (the decode engine holds it, before its first decode step). A test makes
a client disconnect happen mid-hand-off by calling `abort_request(request_id)` from it.
"""

from __future__ import annotations

import dataclasses
import itertools
import pickle
from typing import Callable

from ponder.engine.handoff import HANDOFF, Handoff, HandoffError
from ponder.outputs import RequestOutput
from ponder.sampling_params import SamplingParams

PREFILL, TRANSIT, DECODE = "prefill", "transit", "decode"   # where a request is


def handed_off(output: RequestOutput) -> bool:
    """True for the prefill engine's output of a request whose KV it holds for export."""
    return output.finished and any(c.finish_reason == HANDOFF for c in output.outputs)


def as_continuing(output: RequestOutput) -> RequestOutput:
    """A handed-off request's output as the caller sees it: its first token, not finished."""
    outputs = [dataclasses.replace(c, finish_reason=None) if c.finish_reason == HANDOFF else c
               for c in output.outputs]
    return dataclasses.replace(output, outputs=outputs, finished=False)


def through_object_store(handoff: Handoff) -> Handoff:
    """`handoff` after the trip Ray's object store gives it: pickled (protocol 5) with the KV
    array's buffer out of band, the buffer copied once, and the array read-only on arrival."""
    buffers: list[pickle.PickleBuffer] = []
    data = pickle.dumps(handoff, protocol=5, buffer_callback=buffers.append)
    return pickle.loads(data, buffers=[bytes(b.raw()) for b in buffers])


class Disaggregated:
    """A prefill engine and a decode engine behind one engine API."""

    def __init__(self, prefill, decode, transport: Callable[[Handoff], Handoff] = through_object_store,
                 fault: Callable[[str, str], None] | None = None):
        self.prefill, self.decode = prefill, decode
        self.transport, self.fault = transport, fault
        self.where: dict[str, str] = {}        # request id -> PREFILL, TRANSIT or DECODE
        self.handoffs = 0                      # hand-offs admitted by the decode engine
        self.handoff_bytes = 0                 # KV bytes they moved
        self._ids = itertools.count()

    def add_request(self, prompt, params: SamplingParams | None = None, request_id: str | None = None,
                    prompt_token_ids: list[int] | None = None) -> str:
        """Queue a request on the prefill engine; raises ValueError as LLMEngine.add_request does."""
        request_id = request_id if request_id is not None else f"pd-{next(self._ids)}"
        if request_id in self.where:
            raise ValueError(f"request id {request_id!r} is already in use")
        self.prefill.add_request(prompt, params, request_id, prompt_token_ids, prefill_only=True)
        self.where[request_id] = PREFILL
        return request_id

    def abort_request(self, request_id: str) -> bool:
        """Abort wherever the request is; a hand-off in transit is dropped when it lands."""
        stage = self.where.pop(request_id, None)
        if stage == PREFILL:
            self.prefill.abort_request(request_id)     # running, or held for export
        elif stage == DECODE:
            self.decode.abort_request(request_id)
        return stage is not None

    def has_unfinished_requests(self) -> bool:
        return bool(self.where)

    def step(self) -> list[RequestOutput]:
        """One step of each engine; hand-offs the prefill step produced move before the decode step."""
        outputs = []
        for out in self.prefill.step():
            if handed_off(out) and out.request_id in self.where:
                outputs.append(self._hand_off(out))
            else:
                outputs.append(self._settle(out))
        outputs.extend(self._settle(out) for out in self.decode.step())
        return outputs

    def _hand_off(self, out: RequestOutput) -> RequestOutput:
        """Export, move and admit one request's hand-off; the output to stream for it."""
        rid = out.request_id
        self._stage("held", rid)
        if rid not in self.where:              # aborted while held: the prefill engine freed it
            return _ended(out, "abort")
        handoff = self.prefill.export_handoff(rid)
        self.where[rid] = TRANSIT
        self._stage("exported", rid)
        if rid not in self.where:              # aborted in transit: nothing holds blocks for it
            return _ended(out, "abort")
        try:
            self.decode.add_handoff(self.transport(handoff), rid)
        except HandoffError as e:
            del self.where[rid]
            return _ended(out, "error", str(e))
        self.where[rid] = DECODE
        self.handoffs += 1
        self.handoff_bytes += handoff.nbytes
        self._stage("admitted", rid)
        return as_continuing(out) if rid in self.where else _ended(out, "abort")

    def _stage(self, stage: str, request_id: str) -> None:
        if self.fault is not None:
            self.fault(stage, request_id)

    def _settle(self, out: RequestOutput) -> RequestOutput:
        if out.finished:
            self.where.pop(out.request_id, None)
        return out

    def stats(self) -> dict:
        return {"handoffs": self.handoffs, "handoff_bytes": self.handoff_bytes,
                "prefill": self.prefill.stats(), "decode": self.decode.stats()}


def _ended(out: RequestOutput, reason: str, error: str | None = None) -> RequestOutput:
    """A handed-off request's output, ended before the decode engine continued it."""
    outputs = [dataclasses.replace(c, finish_reason=reason) if c.finish_reason == HANDOFF else c
               for c in out.outputs]
    return dataclasses.replace(out, outputs=outputs, error=error)
