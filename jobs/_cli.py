"""Small argparse helpers the jobs share: numeric ranges as `type=` (argparse then names the flag and the value in
`prog: error: argument --flag: ...`, exit 2) and up-front checks of input and output paths."""
from __future__ import annotations

import argparse
import math
import os


def at_least(lo: int):
    """type=: an integer >= lo."""
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {lo}, got {s!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {v}")
        return v
    return parse


def real_in(lo: float, hi: float = math.inf, *, lo_open: bool = False):
    """type=: a float in [lo, hi] ((lo, hi] with lo_open); NaN never passes."""
    what = (f"> {lo:g}" if lo_open else f">= {lo:g}") if hi == math.inf else \
        f"in {'(' if lo_open else '['}{lo:g}, {hi:g}]"

    def parse(s: str) -> float:
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number {what}, got {s!r}") from None
        if not ((lo < v if lo_open else lo <= v) and v <= hi):
            raise argparse.ArgumentTypeError(f"must be {what}, got {s}")
        return v
    return parse


fraction = real_in(0.0, 1.0, lo_open=True)    # (0, 1]: a share of something that cannot be empty


def int_list(lo: int):
    """type=: a comma list of integers >= lo (at least one)."""
    one = at_least(lo)

    def parse(s: str) -> list[int]:
        items = [x.strip() for x in s.split(",")]
        if not items or any(not x for x in items):
            raise argparse.ArgumentTypeError(f"expected a comma list of integers >= {lo}, got {s!r}")
        return [one(x) for x in items]
    return parse


def one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def check_out_file(parser: argparse.ArgumentParser, path: str, flag: str, *, parent_must_exist: bool = False) -> None:
    """Fail now, not after the run, when `path` cannot be written as a file: it is a directory, or its folder is
    not one (or, with parent_must_exist, does not exist; otherwise a missing folder is created by the job later)."""
    if os.path.isdir(path):
        parser.error(f"{flag} {path}: is a directory; give a file path")
    parent = os.path.dirname(os.path.abspath(path))
    if parent_must_exist and not os.path.isdir(parent):
        parser.error(f"{flag} {path}: folder {parent} does not exist")
    while not os.path.exists(parent):      # the nearest existing ancestor must be a writable folder
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        parser.error(f"{flag} {path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK):
        parser.error(f"{flag} {path}: folder {parent} is not writable")


def check_in_file(parser: argparse.ArgumentParser, path: str, flag: str) -> None:
    if not os.path.exists(path):
        parser.error(f"{flag} {path}: no such file")
    if not os.path.isfile(path):
        parser.error(f"{flag} {path}: not a file")


def load_trace_or_error(parser: argparse.ArgumentParser, path: str, flag: str = "--trace", loader=None, **kw):
    """The trace at `path` (policies.traces.load, or `loader`); a missing or malformed file is a one-line parser
    error naming the flag and the file, not a traceback."""
    from policies.traces import load
    check_in_file(parser, path, flag)
    try:
        return (loader or load)(path, **kw)
    except (OSError, ValueError) as e:   # TraceFormatError is a ValueError; its message starts with the path
        msg = one_line(e)
        parser.error(f"{flag}: {msg}" if msg.startswith(str(path)) else f"{flag} {path}: {msg}")
