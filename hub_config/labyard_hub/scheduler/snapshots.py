"""Notebooks stored by content hash: a schedule always runs the notebook as it was scheduled.

``<root>/<sha256>.ipynb`` holds a notebook, written atomically and never changed. Who uploaded
it is kept as ``<root>/owners/<user>/<sha256>`` (an empty file whose mtime is the last upload),
so that snapshots no schedule uses (``POST inspect`` stores one each time the Schedule dialog
opens) can be deleted after a while and counted per user.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any


class SnapshotStore:
    """Snapshots by sha256, with their uploaders; every method blocks (call it from a thread)."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def put(self, content: bytes, owner: str | None = None) -> str:
        """Store a notebook's bytes for ``owner``; return their sha256. Raises ValueError if not a notebook."""
        try:
            nb = json.loads(content)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise ValueError(f"not a notebook (invalid JSON): {e}") from e
        if not isinstance(nb, dict) or "cells" not in nb or "nbformat" not in nb:
            raise ValueError("not a notebook (no cells/nbformat)")
        digest = hashlib.sha256(content).hexdigest()
        path = self.path(digest)
        if not path.exists():
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_bytes(content)
            os.replace(tmp, path)
        if owner is not None:
            mark = self._owner_dir(owner) / digest
            mark.parent.mkdir(parents=True, exist_ok=True)
            mark.touch()
            os.utime(mark)
        return digest

    def put_json(self, nb: dict[str, Any], owner: str | None = None) -> str:
        return self.put(json.dumps(nb, indent=1, sort_keys=True, ensure_ascii=False).encode(), owner)

    def path(self, digest: str) -> Path:
        if len(digest) != 64 or not all(c in "0123456789abcdef" for c in digest):
            raise ValueError(f"not a sha256: {digest!r}")
        return self.root / f"{digest}.ipynb"

    def read(self, digest: str) -> bytes:
        return self.path(digest).read_bytes()

    def exists(self, digest: str) -> bool:
        return self.path(digest).exists()

    # ---- clean-up ----------------------------------------------------------------------------
    def _owner_dir(self, owner: str) -> Path:
        # user names are hub names (no "/"); hash anything that could not be a file name
        safe = owner if owner and owner.isprintable() and "/" not in owner and owner not in (".", "..") \
            else "x-" + hashlib.sha256(owner.encode()).hexdigest()[:16]
        return self.root / "owners" / safe

    def _marks(self) -> list[Path]:
        owners = self.root / "owners"
        return [m for d in owners.iterdir() if d.is_dir() for m in d.iterdir()] if owners.is_dir() else []

    def limit_owner(self, owner: str, keep: int, referenced: set[str], newest: str | None = None) -> list[str]:
        """Drop ``owner``'s oldest unused uploads beyond ``keep`` (never ``newest``); returns their digests."""
        d = self._owner_dir(owner)
        if not d.is_dir():
            return []
        unused = sorted((m for m in d.iterdir() if m.name not in referenced and m.name != newest),
                        key=lambda m: m.stat().st_mtime, reverse=True)
        dropped = unused[max(0, keep - (1 if newest else 0)):]
        for m in dropped:
            m.unlink(missing_ok=True)
        self._delete_unowned({m.name for m in dropped}, referenced)
        return [m.name for m in dropped]

    def clean(self, referenced: set[str], ttl: float) -> list[str]:
        """Delete every snapshot that no schedule uses and nobody uploaded in the last ``ttl``
        seconds; returns their digests."""
        cutoff = time.time() - ttl
        candidates = set()
        for m in self._marks():
            if m.name not in referenced and m.stat().st_mtime < cutoff:
                m.unlink(missing_ok=True)
                candidates.add(m.name)
        if self.root.is_dir():
            candidates |= {p.stem for p in self.root.glob("*.ipynb") if p.stat().st_mtime < cutoff}
        return self._delete_unowned(candidates, referenced)

    def _delete_unowned(self, digests: set[str], referenced: set[str]) -> list[str]:
        owned = {m.name for m in self._marks()}
        deleted = []
        for digest in sorted(digests - referenced - owned):
            try:
                self.path(digest).unlink()
                deleted.append(digest)
            except (FileNotFoundError, ValueError):
                pass
        return deleted
