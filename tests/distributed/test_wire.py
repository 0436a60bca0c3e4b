"""What replicas send the front end (no Ray): deltas rebuild every cumulative output exactly, also
when a stop string cuts the text, and errors keep their kind and details."""

from __future__ import annotations

import pickle
import random

import pytest

from ponder.distributed.wire import OutputDecoder, OutputEncoder, WireError
from ponder.engine.streams import EngineDeadError, EngineUnavailable, RequestAborted, RequestFailed
from ponder.outputs import CompletionOutput, Logprob, RequestOutput, Usage


def _outputs(rng: random.Random, steps: int) -> list[RequestOutput]:
    """A request's cumulative outputs over `steps` steps: two completions that grow (text, tokens,
    logprobs), prompt logprobs that arrive in chunks, and at the end a text cut by a stop string."""
    texts, tokens, logprobs, prompt_lps = ["", ""], [[], []], [[], []], []
    outs = []
    for step in range(steps):
        for c in range(2):
            n = rng.randrange(0, 3)
            new = [rng.randrange(100) for _ in range(n)]
            tokens[c] = tokens[c] + new
            logprobs[c] = logprobs[c] + [Logprob(t, -rng.random(), {t: -0.1}) for t in new]
            texts[c] += "".join(rng.choice("abc ") for _ in range(n))
        if step < 3:
            prompt_lps = prompt_lps + [None if not prompt_lps else Logprob(step, -1.0, rank=1)]
        last = step == steps - 1
        if last:
            texts[0] = texts[0][:max(0, len(texts[0]) - 3)]          # a stop string cut the end
        outs.append(RequestOutput("r-0", "the prompt", [1, 2, 3], [
            CompletionOutput(c, texts[c], list(tokens[c]), "stop" if last else None, "xy" if last else None,
                             list(logprobs[c])) for c in range(2)], last, None,
            Usage(3, sum(map(len, tokens))), list(prompt_lps)))
    return outs


@pytest.mark.parametrize("seed", range(5))
def test_decoded_outputs_equal_the_engines_cumulative_outputs(seed):
    rng = random.Random(seed)
    encoder, decoder = OutputEncoder(), OutputDecoder()
    for out in _outputs(rng, 12):
        delta = pickle.loads(pickle.dumps(encoder.encode(out)))     # as it travels
        assert decoder.decode(delta) == out
    assert not encoder._sent and not decoder._outputs               # a finished request is forgotten


def test_a_delta_carries_only_what_is_new():
    encoder = OutputEncoder()
    outs = _outputs(random.Random(0), 12)
    encoder.encode(outs[0])
    later = encoder.encode(outs[1])
    assert later.prompt is None and later.prompt_token_ids is None
    assert all(len(c.token_ids.items) == len(outs[1].outputs[c.index].token_ids) -
               len(outs[0].outputs[c.index].token_ids) for c in later.completions)


@pytest.mark.parametrize("error", [EngineUnavailable("full", retry_after=1), RequestFailed("bad n", option="n"),
                                   RequestAborted("aborted by the client"), EngineDeadError("it failed"),
                                   ValueError("prompt is empty")])
def test_errors_keep_their_kind_and_details(error):
    back = pickle.loads(pickle.dumps(WireError.of(error))).exception()
    assert type(back) is type(error) and str(back) == str(error)
    assert getattr(back, "retry_after", None) == getattr(error, "retry_after", None)
    assert getattr(back, "option", None) == getattr(error, "option", None)


def test_an_unexpected_error_becomes_a_request_failure_naming_it():
    back = WireError.of(KeyError("x")).exception()
    assert isinstance(back, RequestFailed) and "KeyError" in str(back)
