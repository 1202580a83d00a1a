"""The servers' contents manager: jupyter_server's, with writes that fail cleanly.

jupyter_server writes a file "atomically" by copying the old one aside and putting it back when
the write fails. A *new* file has no copy to put back: when its write fails (the disk is full),
jupyter_server's attempt to restore the missing copy raises ENOENT for a hidden ``.~name`` file,
which is what the user is told instead of "No space left on device", and the empty or partial
new file stays. And a failure while flushing (after the write) leaves the old file truncated with
its copy beside it. Here the real error is raised, a partial new file is removed and an old one
is put back (issue 18, the full-disk drill).
"""

from __future__ import annotations

import os
from contextlib import contextmanager, suppress

from jupyter_server.services.contents.fileio import path_to_intermediate
from jupyter_server.services.contents.largefilemanager import AsyncLargeFileManager


class FileManager(AsyncLargeFileManager):
    @contextmanager
    def atomic_writing(self, os_path, *args, **kwargs):
        if not self.use_atomic_writing or os.path.islink(os_path):
            with super().atomic_writing(os_path, *args, **kwargs) as f:
                yield f
            return
        existed = os.path.isfile(os_path)
        backup = path_to_intermediate(os_path)
        entered = written = False
        try:
            with super().atomic_writing(os_path, *args, **kwargs) as f:
                entered = True
                yield f
                written = True
        except Exception as e:
            error = e
            if not entered:  # copying the old file aside failed: it is untouched, the partial copy goes
                if existed:
                    with suppress(OSError):
                        os.remove(backup)
            elif not existed:
                if not written and isinstance(e, FileNotFoundError) and e.__context__ is not None:
                    error = e.__context__  # what went wrong, not the missing copy
                with suppress(OSError):
                    os.remove(os_path)  # no partial new file
            elif written and os.path.isfile(backup):
                os.replace(backup, os_path)  # flushing failed: the old file back
            if error is e:
                raise
            raise error from None
