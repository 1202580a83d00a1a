"""Notebook diffs: a fast engine in nbdime's format, its API in the server extension, the CLI.

- :mod:`.engine`: ``diff_notebooks(base, remote, options)``, nbdime's diff format;
- :mod:`.loading`: bytes to a checked notebook, or a clear error;
- :mod:`.align`, :mod:`.compare`: how items are matched (docs/dev/diff.md).
"""

from .engine import DiffOptions, diff_notebooks
from .loading import NotebookError, load_notebook

__all__ = ["DiffOptions", "NotebookError", "diff_notebooks", "load_notebook"]
