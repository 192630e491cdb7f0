"""The ``svp`` command line. Each subcommand lives with the code it drives and
registers itself through a ``register(subparsers)`` function in its module."""
from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
from typing import Optional

from .errors import SVPError, first_line, out_of_memory
from .io import DISK_ERRNOS, error_line, quiet_stdout, shortened

# module that provides register(subparsers); order is the order in --help
COMMAND_MODULES = [
    "svp.engine.cli",
    "svp.data.cli",
    "svp.engine.export",
    "svp.peft.cli",
    "svp.viz.cli",
    "svp.pretrain.train",
    "svp.demo",
    "svp.doctor",
    "svp.serve.cli",
]

# what to lower when a command runs out of memory, in its own options, by the command's full name
# ("data grid"); "": nothing but more memory. Every command has its entry (tests/test_data_formats.py):
# the others were given train's advice, options they do not take (retest 80, retest 82)
OOM_ADVICE = {
    "train": "a smaller batch (--batch-size, train.eval_batch_size), fewer DataLoader workers (--num-workers)",
    "eval": "a smaller --batch-size",
    "predict": "a smaller --batch-size",
    "sweep": "a smaller batch (train.batch_size, train.eval_batch_size), fewer DataLoader workers "
             "(data.num_workers), fewer runs at a time (--jobs)",
    "data list": "",
    "data check": "fewer reader threads (--workers)",
    "data grid": "fewer images (--n)",
    "export": "",   # (the backbone is built whole, on the CPU)
    "convert-official-svp": "",   # (the checkpoint is read whole)
    "visualize": "fewer --adapter folders, --layers or --quantities",
    "pretrain": "fewer images (--num-classes, --per-class, --heldout-per-class: all are made in memory), a "
                "smaller --batch-size",
    "demo": "a smaller --batch-size, fewer runs at a time (--jobs)",
    "doctor": "",
    "serve": "fewer adapter folders under --adapters, a smaller --max-batch",
}


class _Parser(argparse.ArgumentParser):
    """argparse, but a failed write of its help or usage is raised: argparse drops it, and
    `svp --help > /dev/full` lost the text with exit 0. (Subcommands' parsers are of this class
    too: add_subparsers makes them of the parser's own.)"""

    def _print_message(self, message, file=None):
        if message:
            (file or sys.stderr).write(message)

    def error(self, message):
        # argparse quotes the value it refused whole ("invalid int value: '999...'", 5,000 digits)
        super().error(shortened(message))


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="svp", description="Selective Visual Prompting for Vision Mamba, and its baselines.")
    from ._version import __version__
    parser.add_argument("--version", action="version", version=f"svp {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod in COMMAND_MODULES:
        importlib.import_module(mod).register(sub)
    return parser


def _innermost(parser: argparse.ArgumentParser, args) -> argparse.ArgumentParser:
    """The (sub)command's own parser: its usage is the one to show for its arguments."""
    while True:
        actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        chosen = getattr(args, actions[0].dest, None) if actions else None
        if chosen not in (actions[0].choices if actions else {}):
            return parser
        parser = actions[0].choices[chosen]


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:   # said by the command's parser: `svp data check X --split a b` showed `svp`'s usage
            _innermost(parser, args).error(f"unrecognized arguments: {' '.join(extra)}")
    except BrokenPipeError:   # `svp train --help | head`
        quiet_stdout()
        return 0
    except OSError as e:   # --help to a full disk (_Parser)
        if e.errno not in DISK_ERRNOS:
            raise
        return _disk_error(None, e)
    if not getattr(args, "func", None):   # no command: a usage error, its help on stderr (review 55)
        parser.print_help(sys.stderr)
        return 2
    # the command's full name in its messages: `svp data check: error: ...`, as its usage errors
    # say, where its own errors said `svp data:` (review 78)
    command = _innermost(parser, args).prog.split(" ", 1)[-1]
    from . import runtime
    runtime.end_command_imports()   # the command's own handlers from here (svp.runtime)
    try:
        world, rank = runtime.launch()[:2]
    except SVPError as e:
        error_line(command, e)
        return e.exit_code
    if args.command != "train" and world > 1:
        # each process ran the whole command: `svp eval` printed every result once per process
        # (--json: two documents, no longer JSON), `svp sweep` refused its own other rank's lock
        print(f"svp {command}{f' (rank {rank})' if rank else ''}: error: runs in one process, "
              f"and WORLD_SIZE={world} is set: under torchrun (or another launcher) each process would run "
              f"all of it. Run it without torchrun, or with WORLD_SIZE unset (of svp's commands, only "
              f"`svp train` runs distributed)", file=sys.stderr)
        return 2
    try:
        rc = args.func(args)
    except SVPError as e:
        # A user's mistake: one line that names the file/key/value, no traceback. Under torchrun
        # every process prints its own (a check that fails on one fails on all): the others say
        # which rank they are
        # (error_line: a message names files and names read from files, escape sequences and all,
        # and quotes values as given, 5,000 digits and all)
        error_line(f"{command}{f' (rank {rank})' if rank else ''}", e)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"svp {command}: interrupted", file=sys.stderr)
        return 130
    except (MemoryError, RuntimeError) as e:
        if not out_of_memory(e):
            raise
        # (a traceback through torch's allocator; a run's train.log keeps it)
        why = first_line(e)
        lower = getattr(e, "advice", None) or OOM_ADVICE.get(command, OOM_ADVICE["train"])
        print(f"svp {command}: error: out of memory ({why}): {f'{lower}, or ' if lower else ''}more memory "
              f"(a limit: ulimit -v?)", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `svp data list | head`: the reader has what it wanted
        quiet_stdout()
        return 0
    except OSError as e:
        if e.errno not in DISK_ERRNOS:
            raise
        return _disk_error(command, e)
    # (a pipe closed early fails here, at exit, if not above)
    return _finish_stdout(command) or int(rc or 0)


def _finish_stdout(command: Optional[str], text: str = "") -> int:
    """Write ``text`` and flush stdout: a reader gone (a closed pipe) is exit 0, a full or failing
    disk one line and exit 2 (:func:`_disk_error`)."""
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        quiet_stdout()
    except OSError as e:
        if e.errno not in DISK_ERRNOS:
            raise
        return _disk_error(command, e)
    return 0


def version_only() -> int:
    """``svp --version`` alone, as argparse's action prints it, from ``import svp`` before torch is
    imported (svp/__init__.py); a closed or full output as any command's."""
    from ._version import __version__
    if sys.stdout is None:   # (stdout closed: `svp --version >&-`, as argparse's action takes it: retest 90)
        return 0
    return _finish_stdout(None, f"svp {__version__}\n")


def _disk_error(command: Optional[str], e: OSError) -> int:
    """A full or failing disk where a command has no words of its own for it (its output
    redirected to a full disk, a cache it writes): one line, not a traceback. The commands that
    write run folders, tables or figures say more (which file, how to go on) before this."""
    name = e.filename if isinstance(e.filename, str) else None
    what = f"cannot write {name}" if name else "a write failed"
    try:
        print(f"svp{' ' + command if command else ''}: error: {what} ({e.strerror or e})", file=sys.stderr)
    except OSError:   # stderr on the full disk too: the exit status says it
        pass
    try:
        sys.stdout.flush()
    except OSError:  # stdout itself is on the full disk: what it still buffers would fail again at exit
        quiet_stdout()
    return 2


def _bytes_or_escape(e: UnicodeError):
    """surrogateescape's bytes back for a name Python could not decode, else backslashreplace's
    escape (an encode error handler may answer bytes)."""
    if not isinstance(e, UnicodeEncodeError):
        raise e
    out = bytearray()
    for ch in e.object[e.start:e.end]:
        out += bytes([ord(ch) - 0xDC00]) if 0xDC80 <= ord(ch) <= 0xDCFF else ch.encode("ascii", "backslashreplace")
    return bytes(out), e.end


def _closed_streams_to_devnull() -> None:
    """`svp ... >&-` starts Python with sys.stdout None (2>&-: sys.stderr): a finished run then
    ended in an AttributeError at its last flush (exit 1), and a usage error could not be
    printed. What such a stream would get is dropped, as the shell asked."""
    for name in ("stdout", "stderr"):
        if getattr(sys, name) is None:
            setattr(sys, name, open(os.devnull, "w", encoding="utf-8"))


def _lenient_output() -> None:
    """A character the output's encoding lacks is written as an escape, not an error: Windows
    writes redirected output in its ANSI code page, where `svp predict` stopped with a
    UnicodeEncodeError at the first image named outside it (the rest of the answers lost). An
    ASCII stream of a C locale without UTF-8 mode has surrogateescape, which fails on 'é' all
    the same (`svp predict`, `svp sweep`'s table): it keeps the bytes of undecodable names."""
    import codecs
    codecs.register_error("svp.bytes_or_escape", _bytes_or_escape)
    for stream in (sys.stdout, sys.stderr):
        errors = getattr(stream, "errors", None)
        if errors in ("strict", "surrogateescape") and hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace" if errors == "strict" else "svp.bytes_or_escape")
        elif errors == "backslashreplace" and stream is sys.stderr and hasattr(stream, "reconfigure"):
            # stderr's own default: an undecodable path's bytes came out as \udcc3\udcb6, in the
            # resume command an error gives to paste; its bytes now, as stdout writes them
            stream.reconfigure(errors="svp.bytes_or_escape")


def run() -> None:
    """The ``svp`` console script and ``python -m svp``: one command in a process of its own.
    What is imported by now (torch, timm, svp) is frozen out of the cyclic collector for the
    rest of the process (svp.runtime.freeze_imports: ~1.5 s off ``svp predict`` with one image);
    ``main`` itself, which tests and scripts call in their own process, freezes nothing."""
    from . import runtime

    runtime.freeze_imports()
    _closed_streams_to_devnull()
    _lenient_output()
    try:
        rc = main()
    except KeyboardInterrupt:   # (a command that lets it out)
        print("svp: interrupted", file=sys.stderr)
        rc = 130
    # the command has finished and said how: a Ctrl-C now (a second press while `svp serve` shut
    # down) killed the process by SIGINT as the interpreter exited, losing its exit status. Ignored,
    # not handled: the interpreter's finalization (0.2-0.3 s after svp serve) puts a Python handler
    # back to the default action, which kills; SIGTERM and SIGKILL still end a hung exit
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(rc)


if __name__ == "__main__":
    run()
