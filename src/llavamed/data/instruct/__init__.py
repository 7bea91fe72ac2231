"""Self-instruct: multi-turn visual conversations written by a text-only LLM from figure captions
(and optionally inline mentions), cleaned into LLaVA conversation JSON."""

from llavamed.data.instruct.clean import CleanResult, clean_turns, parse_turns, to_llava_sample
from llavamed.data.instruct.prompts import (
    InstructPrompts,
    build_context,
    build_messages,
    load_prompts,
)
from llavamed.data.instruct.runner import InstructOptions, run_instruct
from llavamed.data.instruct.select import round_robin

__all__ = [
    "CleanResult",
    "InstructOptions",
    "InstructPrompts",
    "build_context",
    "build_messages",
    "clean_turns",
    "load_prompts",
    "parse_turns",
    "round_robin",
    "run_instruct",
    "to_llava_sample",
]
