"""A shared async client for any OpenAI-compatible chat API (OpenAI, Azure, vLLM, llavamed serve),
used by self-instruct data generation and the LLM judge."""

from llavamed.llm.cache import ResponseCache, cache_key
from llavamed.llm.client import (
    ChatResult,
    ClientOptions,
    ClientStats,
    LLMClient,
    LLMError,
    estimate_tokens,
)

__all__ = [
    "ChatResult",
    "ClientOptions",
    "ClientStats",
    "LLMClient",
    "LLMError",
    "ResponseCache",
    "cache_key",
    "estimate_tokens",
]
