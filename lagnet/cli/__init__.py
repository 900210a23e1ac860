"""The ``lagnet`` command: train, evaluate, export, embed, index and search without code.

User errors (bad arguments, missing files, bad data) print one line ``lagnet: error: ...`` on
stderr and exit with status 2; ``--debug`` shows the traceback instead. A training run stopped
by a non-finite loss exits with status 1; Ctrl-C exits with 130 and SIGTERM with 143, both
after removing the temporary file of a write in progress. Errors that do not come from
lagnet's own checks are bugs and keep their traceback. A reader that closes the output early
(``lagnet search --json | head``) ends the command quietly with status 141, as Unix tools
killed by ``SIGPIPE`` do.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

__all__ = ["build_parser", "main", "user_error"]

_PACKAGE_DIR = Path(__file__).resolve().parents[1]
_USER_ERRORS = (ValueError, TypeError, OSError, ImportError)


class _UsageError(Exception):
    """An argparse error, turned into one ``lagnet: error:`` line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # "lagnet: error: lagnet: ..." would say the name twice; a subcommand keeps its name
        prefix = "" if self.prog == "lagnet" else f"{self.prog}: "
        raise _UsageError(f"{prefix}{message} (see '{self.prog} --help')")


def _subparser(
    subparsers: argparse._SubParsersAction[_Parser],
    name: str,
    summary: str,
    examples: str,
) -> _Parser:
    parser: _Parser = subparsers.add_parser(
        name,
        help=summary,
        description=summary,
        epilog="examples:\n" + examples,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return parser


def build_parser() -> argparse.ArgumentParser:
    """The ``lagnet`` argument parser with its subcommands."""
    from lagnet import __version__
    from lagnet.cli import embed, evaluate, export, index, train

    parser = _Parser(
        prog="lagnet",
        description="LAG-Net person re-identification: train, evaluate, export, embed.",
        epilog="Add --debug anywhere to see the traceback of an error.",
    )
    parser.add_argument("--version", action="version", version=f"lagnet {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    subparsers.required = True
    commands: list[tuple[str, str, str, Callable[[argparse.ArgumentParser], None]]] = [
        ("train", "train (or resume) a run in a run folder", train.EXAMPLES, train.add_command),
        (
            "evaluate",
            "CMC / mAP / mINP of a run checkpoint on a dataset",
            evaluate.EXAMPLES,
            evaluate.add_command,
        ),
        (
            "export",
            "export a model to ONNX, or as a pretrained folder (safetensors)",
            export.EXAMPLES,
            export.add_command,
        ),
        (
            "embed",
            "embeddings of every image under a folder, saved as .npz",
            embed.EXAMPLES,
            embed.add_command,
        ),
        (
            "index",
            "a faiss gallery index of lagnet embed output (lagnet[faiss] extra)",
            index.INDEX_EXAMPLES,
            index.add_index_command,
        ),
        (
            "search",
            "the nearest gallery images of each query in an index",
            index.SEARCH_EXAMPLES,
            index.add_search_command,
        ),
    ]
    for name, summary, examples, add in commands:
        add(_subparser(subparsers, name, summary, examples))
    return parser


def _raised_by_lagnet(err: BaseException) -> bool:
    """True when the innermost frame of ``err`` is lagnet's own code (a check on user input)."""
    tb = err.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    try:
        Path(tb.tb_frame.f_code.co_filename).resolve().relative_to(_PACKAGE_DIR)
    except ValueError:
        return False
    return True


def user_error(err: BaseException) -> str | None:
    """The one-line message of a user error (bad arguments, files or data), or ``None``.

    User errors are ``ValueError``, ``TypeError``, ``OSError`` and ``ImportError`` (a missing
    optional extra) raised by lagnet's own checks; anything else is a bug.
    """
    if not isinstance(err, _USER_ERRORS) or not _raised_by_lagnet(err):
        return None
    if (getattr(err, "name", None) or "").startswith("lagnet"):  # lagnet itself is broken
        return None
    return _one_line(err)


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _fail(message: str) -> None:
    print(f"lagnet: error: {message}", file=sys.stderr, flush=True)


_BROKEN_PIPE_STATUS = 141
"""What a shell reports for a command killed by ``SIGPIPE`` (128 + 13)."""


def _closed_output() -> int:
    """The reader of stdout went away: point stdout at devnull (so that the interpreter's
    final flush of what is still buffered does not fail again) and end quietly."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # stdout without a file descriptor (e.g. captured)
        pass
    return _BROKEN_PIPE_STATUS


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``lagnet`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args_list
    args_list = [a for a in args_list if a != "--debug"]
    try:
        args = build_parser().parse_args(args_list)
    except _UsageError as err:
        _fail(_one_line(err))
        return 2
    except SystemExit as exit_:  # --help and --version
        return exit_.code if isinstance(exit_.code, int) else 0
    from lagnet._io import Terminated, terminate_on_sigterm
    from lagnet.cli.train import TrainingStopped

    try:
        with terminate_on_sigterm():  # like Ctrl-C: cleanup runs, temporary files are removed
            code: int = args.func(args)
            sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
    except BrokenPipeError:
        return _closed_output()
    except Terminated:
        _fail("terminated (SIGTERM); files being written were left as they were before")
        return Terminated.exit_code
    except TrainingStopped as err:
        if debug:
            traceback.print_exc()
        _fail(_one_line(err))
        return 1
    except KeyboardInterrupt:
        _fail("interrupted")
        return 130
    except _USER_ERRORS as err:
        message = user_error(err)
        if debug or message is None:
            raise
        _fail(message)
        return 2
    return code
