"""The command-line surface: every command's --help explains each option, and builds without
the heavy libraries (so --help is instant)."""

from __future__ import annotations

import argparse
import subprocess
import sys

from llavamed.cli import build_parser


def _all_parsers(parser: argparse.ArgumentParser, name: str = "llavamed"):
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _all_parsers(sub, f"{name} {sub_name}")


def test_every_option_has_help_and_no_empty_default_notes():
    parsers = dict(_all_parsers(build_parser()))
    assert {"llavamed quickstart", "llavamed data ingest", "llavamed eval vqa"} <= set(parsers)
    for name, parser in parsers.items():
        text = parser.format_help()
        # A default of None or False says nothing; printing it only adds noise.
        assert "(default: None)" not in text and "(default: False)" not in text, name
        for action in parser._actions:
            if action.option_strings and action.help != argparse.SUPPRESS:
                assert action.help, f"{name} {action.option_strings[0]} has no help"
    # Real defaults still show where the formatter adds them.
    assert "(default: quickstart_out)" in parsers["llavamed quickstart"].format_help()


def test_help_does_not_import_the_heavy_libraries():
    code = (
        "import sys; from llavamed.cli import build_parser; build_parser().format_help(); "
        "print(sorted(m for m in ('torch', 'transformers', 'gradio', 'fastapi', 'matplotlib') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
