"""A shared async client for any OpenAI-compatible chat API (OpenAI, Azure, vLLM, llavamed serve),
used by self-instruct data generation and the LLM judge.

Public API: :mod:`llavamed.llm.client` (``LLMClient``, ``ClientOptions``, ``ChatResult``,
``LLMError``, ``estimate_tokens``), :mod:`llavamed.llm.cache` (``ResponseCache``, ``cache_key``),
:mod:`llavamed.llm.args` (argparse helpers). Nothing is imported here so ``--help`` stays fast.
"""
