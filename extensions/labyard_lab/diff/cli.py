"""``labyard diff``: the engine on the command line, and git's diff driver for notebooks.

    labyard diff [options] BASE REMOTE     text like nbdiff, or --json for the nbdime-format diff
    labyard diff --textconv NOTEBOOK       a notebook as plain text (git's textconv, for git log -p)
    labyard diff --git-driver PATH OLD OLD-HEX OLD-MODE NEW NEW-HEX NEW-MODE [...]
                                           what git passes to diff.<driver>.command

Exit status: 0 when the diff was computed (1 with --exit-code when the notebooks differ), 2 when a
notebook cannot be read (the message says why).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from .engine import DiffOptions, diff_notebooks
from .loading import NotebookError, load_notebook
from .render import print_notebook_diff, textconv

DEV_NULL = "/dev/null"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("base", nargs="?", help="the base notebook (or git's arguments with --git-driver)")
    p.add_argument("remote", nargs="?", help="the changed notebook")
    p.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true", help="print the diff in nbdime's JSON format")
    p.add_argument("-O", "--ignore-outputs", action="store_true", help="leave outputs out")
    p.add_argument("-M", "--ignore-metadata", action="store_true", help="leave notebook, cell and output metadata out")
    p.add_argument("-I", "--ignore-id", action="store_true", help="leave cell id changes out")
    p.add_argument("-A", "--ignore-attachments", action="store_true", help="leave attachments out")
    p.add_argument("-D", "--ignore-details", action="store_true", help="leave execution counts out")
    p.add_argument("-s", "--sources-only", action="store_true", help="only sources (all of the above)")
    p.add_argument("--color", dest="color", action="store_true", default=None, help="colour the text output")
    p.add_argument("--no-color", dest="color", action="store_false", help="no colour (default when not a terminal)")
    p.add_argument("--exit-code", action="store_true", help="exit with 1 when the notebooks differ")
    p.add_argument("--textconv", action="store_true", help="print BASE as plain text (git textconv)")
    p.add_argument("--git-driver", action="store_true", help="be git's external diff driver (7 or 9 arguments)")


def options_from(args) -> DiffOptions:
    if args.sources_only:
        return DiffOptions.sources_only()
    return DiffOptions(outputs=not args.ignore_outputs, metadata=not args.ignore_metadata, identifier=not args.ignore_id,
                       attachments=not args.ignore_attachments, details=not args.ignore_details)


def read(path: str, allow_missing: bool = False) -> dict:
    """A notebook from a file ('-': stdin); /dev/null (git: added or deleted) is an empty notebook."""
    if allow_missing and path == DEV_NULL:
        return {"nbformat": 4, "nbformat_minor": 5, "metadata": {}, "cells": []}
    try:
        data = sys.stdin.buffer.read() if path == "-" else open(path, "rb").read()
    except OSError as e:
        raise NotebookError(f"{path}: {e.strerror}") from e
    if allow_missing and not data.strip():
        return {"nbformat": 4, "nbformat_minor": 5, "metadata": {}, "cells": []}
    return load_notebook(data, path, validate=False)[0]


def run(args) -> int:
    options = options_from(args)
    color = args.color if args.color is not None else (
        sys.stdout.isatty() or os.environ.get("GIT_PAGER_IN_USE") == "true") and not os.environ.get("NO_COLOR")
    try:
        if args.textconv:
            if not args.base:
                raise NotebookError("--textconv needs a notebook")
            sys.stdout.write(textconv(read(args.base, allow_missing=True)))
            return 0
        if args.git_driver:
            # path old-file old-hex old-mode new-file new-hex new-mode [rename-to metadata]
            argv = [a for a in (args.base, args.remote, *args.rest) if a is not None]
            if len(argv) not in (7, 9):
                raise NotebookError(f"--git-driver expects git's 7 or 9 arguments, got {len(argv)}")
            path, old, new = argv[0], argv[1], argv[4]
            base, remote = read(old, allow_missing=True), read(new, allow_missing=True)
            names = (f"a/{path}", f"b/{argv[7] if len(argv) == 9 else path}")
            files = (old, new)
        else:
            if not args.base or not args.remote:
                raise NotebookError("give two notebooks: labyard diff BASE REMOTE")
            base, remote = read(args.base), read(args.remote)
            names = files = (args.base, args.remote)
        diff = diff_notebooks(base, remote, options)
    except NotebookError as e:
        print(f"labyard diff: {e}", file=sys.stderr)
        return 2
    if args.json:
        json.dump(diff, sys.stdout, indent=1, ensure_ascii=False)
        sys.stdout.write("\n")
    else:
        print_notebook_diff(sys.stdout, names[0], names[1], base, diff, options, color, files)
    return 1 if args.exit_code and diff else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="labyard diff", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:  # `labyard diff a b | head`
        sys.exit(0)
