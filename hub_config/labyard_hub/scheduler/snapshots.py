"""Notebooks stored by content hash: a schedule always runs the notebook as it was scheduled."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any


class SnapshotStore:
    """``<root>/<sha256>.ipynb``, written atomically, never changed."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def put(self, content: bytes) -> str:
        """Store a notebook's bytes; return their sha256. Raises ValueError if not a notebook."""
        try:
            nb = json.loads(content)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
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
        return digest

    def put_json(self, nb: dict[str, Any]) -> str:
        return self.put(json.dumps(nb, indent=1, sort_keys=True, ensure_ascii=False).encode())

    def path(self, digest: str) -> Path:
        if len(digest) != 64 or not all(c in "0123456789abcdef" for c in digest):
            raise ValueError(f"not a sha256: {digest!r}")
        return self.root / f"{digest}.ipynb"

    def read(self, digest: str) -> bytes:
        return self.path(digest).read_bytes()
