"""vLLM's POST /tokenize and /detokenize: text or chat messages to the served model's token ids and
back, with the server's own tokenizer and chat template, so a client can count a prompt (or see what
the template makes of its messages) before sending it, without a tokenizer of its own.
"""

from __future__ import annotations

from typing import Annotated, Union

from pydantic import BaseModel, Discriminator, Field, RootModel, Tag

from ponder.model.tokenizer import Tokenizer
from ponder.server.body import StrictBody
from ponder.server.protocol import ChatMessages, EngineLimits, chat_prompt, check_token_ids


class _TokenizeFields(StrictBody):
    model: str | None = None
    return_token_strs: bool = Field(False, description="also answer each token's string, as `token_strs`")


class TokenizeCompletionRequest(_TokenizeFields):
    """POST /tokenize of a plain prompt."""

    prompt: str
    add_special_tokens: bool = True


class TokenizeChatRequest(_TokenizeFields):
    """POST /tokenize of chat messages, rendered with the model's chat template as chat completions
    render them (the template's own special tokens included, so none are added by default)."""

    messages: ChatMessages
    add_generation_prompt: bool = True
    add_special_tokens: bool = False


def _form(body) -> str:
    # the tags are the classes' names: errors.from_validation_error drops them from error locations
    return "TokenizeChatRequest" if isinstance(body, dict) and "messages" in body else "TokenizeCompletionRequest"


class TokenizeRequest(RootModel[Annotated[Union[Annotated[TokenizeCompletionRequest, Tag("TokenizeCompletionRequest")],
                                                Annotated[TokenizeChatRequest, Tag("TokenizeChatRequest")]],
                                          Discriminator(_form)]]):
    """POST /tokenize: a prompt, or chat messages (the body has "messages")."""

    @property
    def model(self) -> str | None:
        return self.root.model


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = Field(None, description="with return_token_strs")


class DetokenizeRequest(StrictBody):
    """POST /detokenize."""

    model: str | None = None
    tokens: list[int] = Field(description="token ids of the served model's vocabulary")


class DetokenizeResponse(BaseModel):
    prompt: str


def tokenize(body: TokenizeRequest, tokenizer: Tokenizer, limits: EngineLimits) -> dict:
    """The /tokenize answer: the ids the engine would get for this prompt or these messages."""
    request = body.root
    if isinstance(request, TokenizeChatRequest):
        text = chat_prompt(request.messages, tokenizer, request.add_generation_prompt)
    else:
        text = request.prompt
    ids = tokenizer.encode(text, add_special_tokens=request.add_special_tokens)
    answer = {"count": len(ids), "max_model_len": limits.max_model_len, "tokens": ids}
    if request.return_token_strs:
        answer["token_strs"] = [tokenizer.id_to_token(i) or "" for i in ids]
    return answer


def detokenize(body: DetokenizeRequest, tokenizer: Tokenizer, limits: EngineLimits) -> dict:
    """The /detokenize answer: the text of the ids, special tokens included (so a /tokenize of chat
    messages comes back as the rendered template). An id outside the vocabulary is a 400 naming `tokens`."""
    check_token_ids(body.tokens, "tokens", limits.vocab_size)
    return {"prompt": tokenizer.decode(body.tokens, skip_special_tokens=False)}
