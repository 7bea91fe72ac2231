"""The single ``llavamed`` entry point. Subcommands live in :mod:`llavamed.commands`; this file only
wires them into argparse so that ``--help`` is fast (heavy imports happen inside each ``run``)."""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import os
import sys

from llavamed import __version__
from llavamed.commands import UsageError
from llavamed.errors import LlavamedError

# (group, module) pairs. A group is a two-word command such as ``data ingest``; None means a
# top-level command. Each module defines ``register(subparsers)`` which adds its parser and sets
# ``func``. Order here is the order in ``--help``.
COMMANDS: list[tuple[str | None, str]] = [
    (None, "llavamed.commands.quickstart"),
    (None, "llavamed.commands.synth"),
    (None, "llavamed.commands.train"),
    ("model", "llavamed.commands.model_init"),
    ("convert", "llavamed.commands.convert"),
    ("data", "llavamed.commands.data_ingest"),
    ("data", "llavamed.commands.data_domains"),
    ("data", "llavamed.commands.data_align"),
    ("data", "llavamed.commands.data_instruct"),
    ("eval", "llavamed.commands.eval_vqa"),
    ("eval", "llavamed.commands.eval_answer"),
    ("eval", "llavamed.commands.eval_judge"),
    (None, "llavamed.commands.serve"),
    (None, "llavamed.commands.chat"),
    (None, "llavamed.commands.web"),
]


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default in ``--help``, except where there is none to show (None, or the
    False of a flag), so the help does not end lines in "(default: None)", or where the help text
    already states it (no "(default fp32 ...) (default: fp32)")."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        if "default" in (action.help or "").lower():
            return action.help
        return super()._get_help_string(action)


GROUP_HELP = {
    "data": "build datasets: PMC ingestion, domain labels, alignment and instruction data",
    "model": "compose LLaVA checkpoints",
    "convert": "convert foreign checkpoints into the transformers-native llava format",
    "eval": "evaluate models: VQA benchmarks and the LLM-judge visual chat score",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llavamed",
        description="LLaVA-Med, reproducible: data, training, evaluation and serving of "
        "biomedical vision-language assistants.",
    )
    parser.add_argument("--version", action="version", version=f"llavamed {__version__}")
    top = parser.add_subparsers(dest="command", metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction] = {}
    for group, module_name in COMMANDS:
        if group is None:
            target = top
        else:
            if group not in groups:
                gp = top.add_parser(group, help=GROUP_HELP.get(group, ""))
                groups[group] = gp.add_subparsers(dest=f"{group}_command", metavar="SUBCOMMAND")
                gp.set_defaults(func=lambda _a, gp=gp: (gp.print_help(sys.stderr), 2)[1])
            target = groups[group]
        importlib.import_module(module_name).register(target)
    return parser


# OS errors about a path that say what the user must change (not bugs of ours): one line each.
_USER_FIXABLE_ERRNOS = frozenset(
    {errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENAMETOOLONG, errno.ELOOP, errno.EACCES}
)


def _path_error(exc: OSError) -> int:
    where = f"{exc.filename}: " if exc.filename else ""
    print(f"llavamed: error: {where}{exc.strerror or exc}", file=sys.stderr)
    return 1


class _StdoutFreeLogger(logging.Logger):
    """A logger whose stdout handlers write to stderr instead."""

    def addHandler(self, hdlr: logging.Handler) -> None:  # noqa: N802 (logging's name)
        if isinstance(hdlr, logging.StreamHandler) and hdlr.stream is sys.stdout:
            hdlr.setStream(sys.stderr)
        super().addHandler(hdlr)


def _keep_library_logs_off_stdout() -> None:
    """DeepSpeed (imported by transformers' model loading whenever it is installed) logs through
    its own handler on stdout, e.g. "[WARNING] ... Setting accelerator to CPU", which landed in
    the output of `llavamed model init > out`. Its logger is made here first, so its handler
    writes to stderr with every other log line."""
    if "DeepSpeed" in logging.Logger.manager.loggerDict:
        return
    default = logging.getLoggerClass()
    logging.setLoggerClass(_StdoutFreeLogger)
    try:
        logging.getLogger("DeepSpeed")
    finally:
        logging.setLoggerClass(default)


def _close_progress_bars() -> None:
    """Ends the progress bars a Ctrl-C left open (a bar not in a ``with`` block is closed only
    when it is garbage-collected, after the message below), so the message is a line of its own
    and no bar is redrawn after it."""
    tqdm_module = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm_module, "tqdm", None), "_instances", ())):
        bar.close()


def _chosen_parser(parser: argparse.ArgumentParser, args: argparse.Namespace):
    """The parser of the (sub)command ``args`` was parsed for (``llavamed data ingest``'s for
    ``data ingest ...``), so a usage error shows that command's usage line, not the top one's."""
    while True:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                chosen = action.choices.get(getattr(args, action.dest, None) or "")
                if chosen is not None:
                    parser = chosen
                    break
        else:
            return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # argparse ends a positional list at the first option, so `train CFG --print-config
        # key=value` leaves key=value over; commands that take overrides take them anywhere.
        if hasattr(args, "overrides") and not any(e.startswith("-") or "=" not in e for e in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            _chosen_parser(parser, args).error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "func", None):
        # No command given: a usage error (exit 2), so the help goes to stderr with it and
        # `llavamed > file` does not leave the help in the file.
        parser.print_help(sys.stderr)
        return 2
    if getattr(args, "no_progress", False):
        # Our own bars follow ``progress``; transformers' weight loading and GGUF conversion
        # draw plain tqdm bars, which tqdm itself turns off through this variable.
        os.environ["TQDM_DISABLE"] = "1"
    _keep_library_logs_off_stdout()
    try:
        rc = args.func(args)
    except UsageError as exc:
        # Flags that cannot go together, found by the command: shown as argparse shows a bad
        # flag (this command's usage line, exit 2), not as a failed run.
        _chosen_parser(parser, args).error(str(exc))
    except LlavamedError as exc:
        print(f"llavamed: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        _close_progress_bars()
        how = getattr(args, "on_interrupt", "interrupted; re-run the same command to resume")
        print(f"llavamed: {how}", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`llavamed ... | head`): stop quietly, as other CLI tools do.
        # Before the OSError clause, since a broken pipe is an OSError (EPIPE) and was re-raised
        # there as a traceback. stdout's descriptor now points at /dev/null, so the flush at
        # exit of what is still buffered cannot fail again (the Python docs' recipe).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    except (FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError) as exc:
        # A path of the wrong kind (an --out that is a file, a folder given for a file): the
        # user's to fix, so one line naming the path, not a traceback.
        return _path_error(exc)
    except OSError as exc:
        if exc.errno not in _USER_FIXABLE_ERRNOS:
            raise
        # A read-only mount, a full disk or quota, a name too long: also the user's to fix.
        return _path_error(exc)
    return int(rc or 0)


if __name__ == "__main__":
    raise SystemExit(main())
