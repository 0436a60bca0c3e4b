"""The offline facade: LLM(model).generate(prompts) / .chat(messages) / .stats()."""

from __future__ import annotations

from typing import Iterator, Sequence as Seq

from tqdm.auto import tqdm

from ponder.config import EngineConfig
from ponder.engine.engine import LLMEngine
from ponder.engine.programs import RequestsProgram, iterate_programs
from ponder.outputs import CompletionOutput, RequestOutput
from ponder.sampling_params import SamplingParams

Prompt = str | list[int]


class LLM:
    """An engine for offline use. `model=None` runs the packaged default (SmolLM2-135M-Instruct)."""

    def __init__(self, model: str | None = None, **engine_options):
        self.engine = LLMEngine(EngineConfig.from_options(model, **engine_options))
        self.tokenizer = self.engine.tokenizer

    @classmethod
    def from_engine(cls, engine: LLMEngine) -> "LLM":
        llm = cls.__new__(cls)
        llm.engine, llm.tokenizer = engine, engine.tokenizer
        return llm

    def default_sampling_params(self) -> SamplingParams:
        """What generate / chat / stream use when given no SamplingParams: the engine's
        sampling_defaults (the model's recommended sampling by default), as vLLM's LLM does."""
        return SamplingParams.with_defaults(self.engine.sampling_defaults)

    def generate(self, prompts: Prompt | Seq[Prompt],
                 sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 use_tqdm: bool | None = None) -> list[RequestOutput]:
        """Generate for each prompt; outputs come back in input order.

        A prompt that cannot be served (empty, longer than the context) gets an output with
        `.error` set and finish_reason "error"; the other prompts still complete.
        """
        prompts = _as_prompt_list(prompts)
        params = _as_params_list(sampling_params or self.default_sampling_params(), len(prompts))
        results: dict[str, RequestOutput] = {}
        order, requests = [], []
        for prompt, p in zip(prompts, params):
            try:
                request = self.engine.add_request(prompt, p)
                requests.append(request)
                order.append(request.request_id)
            except ValueError as e:
                rid = f"failed-{len(order)}"
                order.append(rid)
                results[rid] = _error_output(rid, prompt, p, str(e))
        pending = len(prompts) - len(results)
        show = use_tqdm if use_tqdm is not None else pending >= 16
        bar = tqdm(total=pending, desc="generate", unit="req", disable=not show)
        program = RequestsProgram(self.engine, requests)
        try:                       # interrupted: the loop aborts the requests, freeing their blocks
            for _ in iterate_programs(self.engine, [program]):
                bar.update(sum(r.finished for r in requests) - bar.n)
        finally:
            bar.close()
        results.update((out.request_id, out) for out in program.result.outputs)
        return [results[rid] for rid in order]

    def stream(self, prompt: Prompt, sampling_params: SamplingParams | None = None) -> Iterator[str]:
        """Yield the text of one completion as it is generated (n must be 1)."""
        params = sampling_params or self.default_sampling_params()
        if params.n != 1:
            raise ValueError("stream() generates one completion; n must be 1")
        request = self.engine.add_request(prompt, params)
        sent = 0
        for _ in iterate_programs(self.engine, [RequestsProgram(self.engine, [request])]):
            text = request.seqs[0].text
            if len(text) > sent:
                yield text[sent:]
                sent = len(text)

    def chat_prompt(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of a conversation rendered with the model's chat template."""
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
             use_tqdm: bool | None = None, add_generation_prompt: bool = True) -> list[RequestOutput]:
        """Generate replies to one conversation (a list of messages) or a list of conversations."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.chat_prompt(conv, add_generation_prompt) for conv in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)

    def think(self, prompt, strategy: str = "self-consistency", **options):
        """Answer with inference-time compute: branches forked inside the engine share the prompt's
        KV, are stepped, scored, pruned and resampled without re-prefilling.

        `prompt`: a question (a user message when the model has a chat template), a list of chat
        messages, or token ids — or a list of those, run as one batch (returns a list).
        `strategy`: greedy, parallel, self-consistency, best-of-n, deepconf, beam-search,
        particle-filtering. Options: the strategy's own (n, scorer, width, vote, ...) and sampling
        (temperature=0.8, top_p, top_k, min_p, max_tokens=512, seed); `chat=False` skips the template.
        Returns a ThinkResult: `.answer` (the chosen text), `.final_answer`, `.candidates`, `.usage`.
        """
        from ponder.think.run import think

        batch = isinstance(prompt, (list, tuple)) and bool(prompt) and not all(
            isinstance(x, (dict, int)) for x in prompt)
        results = think(self.engine, list(prompt) if batch else [prompt], strategy, **options)
        return results if batch else results[0]

    def stats(self) -> dict:
        return self.engine.stats()


def _as_prompt_list(prompts) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]
    return prompts


def _as_params_list(params, count: int) -> list[SamplingParams]:
    if isinstance(params, SamplingParams):
        return [params] * count
    params = list(params)
    if len(params) != count:
        raise ValueError(f"got {len(params)} sampling params for {count} prompts")
    return params


def _error_output(rid: str, prompt, params: SamplingParams, message: str) -> RequestOutput:
    outs = [CompletionOutput(i, "", [], finish_reason="error") for i in range(params.n)]
    return RequestOutput(rid, prompt if isinstance(prompt, str) else None,
                         prompt if isinstance(prompt, list) else [], outs, finished=True, error=message)
