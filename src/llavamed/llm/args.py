"""Command-line options for the LLM endpoint, shared by every command that calls one.
Kept free of heavy imports so that ``llavamed --help`` stays fast."""

from __future__ import annotations

import argparse
import os

# -- CLI glue shared by the commands that call an LLM -----------------------------------------


def add_client_arguments(parser: argparse.ArgumentParser, default_concurrency: int = 8) -> None:
    # Ranges are argparse types (a bad value is a usage error, exit 2, before any request);
    # ClientOptions checks them again for library callers.
    from llavamed.commands import finite_float, non_negative_int, positive_int

    g = parser.add_argument_group("LLM endpoint (any OpenAI-compatible chat API)")
    g.add_argument(
        "--base-url",
        required=True,
        help="API root incl. /v1, e.g. https://api.openai.com/v1, http://127.0.0.1:8000/v1 "
        "(llavamed serve --model embedded or another text-only model folder; vLLM), or an Azure deployment URL with --api-version",
    )
    g.add_argument("--model", required=True, help="model (or Azure deployment) name")
    g.add_argument(
        "--api-key-env",
        default="OPENAI_API_KEY",
        metavar="VAR",
        help="environment variable holding the API key (default OPENAI_API_KEY; unset is fine "
        "for local servers)",
    )
    g.add_argument("--api-version", help="Azure OpenAI api-version (switches to api-key header)")
    g.add_argument(
        "--concurrency",
        type=positive_int,
        default=default_concurrency,
        metavar="N",
        help=f"requests in flight at once (default {default_concurrency})",
    )
    g.add_argument(
        "--rpm",
        type=finite_float(0, above=True),
        metavar="N",
        help="client-side requests/minute limit (> 0; default: none)",
    )
    g.add_argument(
        "--tpm",
        type=finite_float(0, above=True),
        metavar="N",
        help="client-side tokens/minute limit (> 0; default: none)",
    )
    g.add_argument(
        "--timeout",
        type=finite_float(0, above=True),
        default=120.0,
        metavar="S",
        help="wall-clock seconds per request attempt (default 120)",
    )
    g.add_argument(
        "--max-retries",
        type=non_negative_int,
        default=6,
        metavar="N",
        help="retries per request on 429, 5xx, timeouts and malformed replies, with "
        "exponential backoff honouring Retry-After (default 6)",
    )
    g.add_argument(
        "--cache",
        metavar="PATH",
        help="SQLite response cache (default: next to the output file); 'none' disables it",
    )
    g.add_argument("--stream", action="store_true", help="use streaming responses")
    g.add_argument(
        "--price-in",
        type=finite_float(0),
        metavar="USD",
        help="USD per 1M prompt tokens (overrides table)",
    )
    g.add_argument(
        "--price-out",
        type=finite_float(0),
        metavar="USD",
        help="USD per 1M completion tokens (overrides table)",
    )


def add_sampling_arguments(
    parser: argparse.ArgumentParser,
    *,
    temperature: float,
    temperature_help: str,
    max_tokens_help: str,
) -> None:
    """--temperature and --max-tokens of the commands that call an LLM (data instruct, eval
    judge), in the ranges every server takes (llavamed.llm.client.check_sampling checks them
    again for library callers)."""
    from llavamed.commands import finite_float, positive_int

    parser.add_argument(
        "--temperature", type=finite_float(0), default=temperature, help=temperature_help
    )
    parser.add_argument(
        "--max-tokens", type=positive_int, default=1024, metavar="N", help=max_tokens_help
    )


def client_options_from_args(args: argparse.Namespace, default_cache: str | None):
    from llavamed.llm.client import ClientOptions

    cache = args.cache if args.cache is not None else default_cache
    if cache is not None and not cache.strip():
        # An empty path (an unset shell variable: --cache "$CACHE") turned the cache off
        # without a word, and a re-run paid for every request again.
        from llavamed.errors import LlavamedError

        raise LlavamedError("--cache: empty path; give a file, or 'none' to run without a cache")
    if cache is not None and cache.lower() == "none":
        cache = None
    return ClientOptions(
        base_url=args.base_url,
        model=args.model,
        # A key pasted with a trailing space or newline (an .env file, `echo` into a variable)
        # could not be sent in a header and stopped the job; no API key holds whitespace.
        api_key=(os.environ.get(args.api_key_env) or "").strip() or None,
        api_version=args.api_version,
        concurrency=args.concurrency,
        rpm=args.rpm,
        tpm=args.tpm,
        timeout=args.timeout,
        max_retries=args.max_retries,
        cache_path=cache,
        price_in=args.price_in,
        price_out=args.price_out,
        stream=args.stream,
    )


def named_counts(counts: dict[str, int], examples: dict[str, list[str]]) -> str:
    """``2 missing_caption (PMC1_F1, PMC2_F3), 1 ...``: counts per reason, naming the first
    records of each, for the lines that tell a user what a job skipped or dropped."""
    parts = []
    for reason, n in sorted(counts.items()):
        first = examples.get(reason) or []
        more = ", ..." if n > len(first) else ""
        parts.append(f"{n} {reason}" + (f" ({', '.join(first)}{more})" if first else ""))
    return ", ".join(parts)


def refuse_overwriting_inputs(
    inputs: dict[str, str | os.PathLike], outputs: dict[str, str | os.PathLike | None]
) -> None:
    """Stop before a job's output (its result, log, report or cache) would replace one of its
    inputs or another output: ``--out figures.jsonl`` replaced the figures with the
    conversations made from them, and a judge log given the answers file cut its last record.
    Keys are the flags' names. An output that is a folder is refused here too: the job paid for
    every request and only then failed to write its output or report there."""
    from llavamed.errors import LlavamedError
    from llavamed.utils.io import require_writable

    for oname, out in outputs.items():
        if out is None:
            continue
        if os.path.isdir(out):
            raise LlavamedError(f"{out}: {oname} is a folder; give a file path")
        # A file where a folder of the path should be ("figures.jsonl/report.json"), a folder
        # that cannot be made (/proc/x) or written: the job ran and paid, then failed at its end
        # ("figures.jsonl: File exists", or a FileNotFoundError traceback).
        require_writable(out, oname)

    def same(a: str | os.PathLike, b: str | os.PathLike) -> bool:
        try:
            return os.path.samefile(a, b)
        except OSError:  # one does not exist yet
            return os.path.abspath(a) == os.path.abspath(b)

    for oname, out in outputs.items():
        for iname, src in inputs.items():
            if out is not None and same(out, src):
                raise LlavamedError(f"{out}: {oname} would overwrite {iname}; give another path")
    # Two outputs on one path: the report written last replaced the conversations (instruct) or
    # the judgement log (judge) it summed up.
    named = [(n, o) for n, o in outputs.items() if o is not None]
    for i, (aname, a) in enumerate(named):
        for bname, b in named[i + 1 :]:
            if same(a, b):
                raise LlavamedError(
                    f"{a}: {aname} and {bname} are the same file; give another path"
                )
