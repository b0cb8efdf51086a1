"""vLLM's ``POST /tokenize`` and ``POST /detokenize``: the request and response types and the serving logic. A
prompt is encoded as ``/v1/completions`` encodes it, messages as ``/v1/chat/completions`` builds their prompt."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from rp_ray.serve.protocol import APIError, ChatMessage, _none
from rp_ray.serve.serving import Serving


class TokenizeRequest(BaseModel):
    """vLLM's ``POST /tokenize``: a prompt (``add_special_tokens``: the BOS, as a text completion adds it) or chat
    messages (the prompt a chat completion builds, the card applied)."""

    model_config = ConfigDict(extra="ignore")
    model: str = Field(min_length=1, max_length=128)
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str = Field(min_length=1, max_length=128)
    tokens: list[Annotated[int, Field(ge=0)]]


class TokenizeResponse(BaseModel):
    """vLLM's ``/tokenize`` answer."""

    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = Field(None, exclude_if=_none)


class DetokenizeResponse(BaseModel):
    prompt: str


class TokenizeEndpoint(Serving):
    def tokenize(self, req: TokenizeRequest) -> TokenizeResponse:
        """vLLM's ``/tokenize``: a prompt as ``/v1/completions`` encodes it (the BOS unless ``add_special_tokens``
        is false), or messages as ``/v1/chat/completions`` builds their prompt."""
        _, character = self.resolve_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "give either prompt or messages", param="prompt")
        if req.messages is not None:
            self.limits.check_messages(req.messages)
            ids = self.chat_prompt(req.messages, character)[1]
        else:
            ids = self.encode_text(req.prompt, add_bos=req.add_special_tokens)
        strs = self.tok.convert_ids_to_tokens(ids) if req.return_token_strs else None
        return TokenizeResponse(count=len(ids), max_model_len=self.cfg.max_model_len, tokens=ids, token_strs=strs)

    def detokenize(self, req: DetokenizeRequest) -> DetokenizeResponse:
        self.resolve_model(req.model)
        self.check_ids(req.tokens, "tokens")
        return DetokenizeResponse(prompt=self.tok.decode(req.tokens))
