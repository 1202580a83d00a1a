"""What a run must carry to be run again, and how a re-run is judged (stdlib only: the kernel
side, the papermill wrapper, the Runs panel's server side and the scheduler all use it).

* :func:`missing`: what a run's ``labyard.*`` tags lack for a reproduction (``[]``: nothing);
  the run's ``labyard.reproducible`` tag is ``yes`` or ``no: <what is missing>``.
* :func:`compare_inputs`: the recorded input fingerprints (``inputs.json``) against the files
  present now: which changed and which vanished.
* :func:`verdict`: a reproduction's metrics against the original's: ``reproduced``, ``differs``
  (which metrics, by how much) or ``failed``.
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path

from .provenance import file_digest

#: the tags a reproduction needs, in every mode, and what their absence is called
REQUIRED = {
    "labyard.notebook_sha256": "no notebook snapshot",
    "labyard.parameters": "no parameters",
    "labyard.flavor": "no flavour",
    "labyard.requirements": "no pip freeze",
}

#: the environment a reproduction pins: the image digest on Kubernetes, the environment's lock locally
ENVIRONMENT = {"kubernetes": ("labyard.image_digest", "no image digest"),
               "local": ("labyard.env.lock_sha256", "no environment lock")}


def missing(tags: dict[str, str]) -> list[str]:
    """What ``tags`` (a run's) lack for the run to be reproduced, in words; empty when nothing.

    The notebook snapshot is there when ``labyard.notebook_sha256`` is (the snapshot artifact is
    written with it); git state is recorded when the notebook is in a repository and is not
    required (the snapshot is the code); input fingerprints are required only when the run read
    files (``labyard.inputs.count`` > 0 without ``labyard.inputs_sha256`` is missing).
    """
    out = []
    for key, what in REQUIRED.items():
        if not tags.get(key) or tags.get(key) == "none":
            out.append(what)
    mode = tags.get("labyard.mode", "local")
    key, what = ENVIRONMENT.get(mode, ENVIRONMENT["local"])
    if not tags.get(key):
        out.append(what)
    if tags.get("labyard.inputs.count", "0") not in ("", "0") and not tags.get("labyard.inputs_sha256"):
        out.append("no input fingerprints")
    return out


def reproducible_tag(tags: dict[str, str]) -> str:
    gaps = missing(tags)
    return "yes" if not gaps else "no: " + ", ".join(gaps)


def _requirements(freeze: str) -> set[str]:
    """The lines of a pip freeze, stripped and lower-cased (the order and case pip gives do not count)."""
    return {line.strip().lower() for line in freeze.splitlines() if line.strip()}


def freeze_lock(freeze: str) -> str:
    """The environment's lock: sha256 of its ``pip freeze`` (one ``name==version`` a line)."""
    return hashlib.sha256("\n".join(sorted(_requirements(freeze))).encode()).hexdigest()


def freeze_difference(recorded: str, current: str) -> list[str]:
    """``name==version`` lines added (``+``) or gone (``-``) between two pip freezes."""
    a, b = _requirements(recorded), _requirements(current)
    return [f"-{x}" for x in sorted(a - b)] + [f"+{x}" for x in sorted(b - a)]


def compare_inputs(files: list[dict], root: Path) -> dict[str, list[str]]:
    """The recorded input files (``inputs.json``'s ``files``) against ``root`` now.

    Returns ``{"changed": [...], "vanished": [...], "unknown": [...]}`` (paths relative to
    ``root``): ``unknown`` are files whose recorded fingerprint says they changed while the
    original run read them (``"changed": true``), so nothing can be compared.
    """
    out: dict[str, list[str]] = {"changed": [], "vanished": [], "unknown": []}
    base = root.resolve()
    for entry in files:
        rel = entry.get("path", "")
        path = (base / rel).resolve()
        if not rel or base not in path.parents:
            continue
        if entry.get("missing") or entry.get("changed"):
            out["unknown"].append(rel)
            continue
        if not os.path.isfile(path):
            out["vanished"].append(rel)
            continue
        try:
            now = file_digest(path, path.stat().st_size)
        except OSError:
            out["vanished"].append(rel)
            continue
        key = next(iter(now))
        if entry.get(key) != now[key] or entry.get("size", path.stat().st_size) != path.stat().st_size:
            out["changed"].append(rel)
    return out


def verdict(original: dict[str, float], new: dict[str, float], tolerance: float = 0.0,
            failed: bool = False) -> tuple[str, str]:
    """(``reproduced`` | ``differs`` | ``failed``, the detail in words).

    Metrics are compared by their latest values; ``tolerance`` is relative (0: exact), i.e.
    ``|new - old| <= tolerance * max(|old|, |new|)``. A metric present in one run only differs.
    """
    if failed:
        return "failed", "the reproduction did not finish"
    diffs = []
    for key in sorted(set(original) | set(new)):
        if key.startswith("system/"):
            continue  # machine load, not a result
        a, b = original.get(key), new.get(key)
        if a is None or b is None:
            diffs.append(f"{key}: {'missing' if b is None else 'new'} ({a if b is None else b})")
            continue
        if a == b or (math.isnan(a) and math.isnan(b)):
            continue
        if abs(b - a) <= tolerance * max(abs(a), abs(b)):
            continue
        rel = abs(b - a) / max(abs(a), abs(b)) if max(abs(a), abs(b)) else math.inf
        diffs.append(f"{key}: {a:.6g} -> {b:.6g} ({b - a:+.3g}, {rel:.2%})")
    if diffs:
        return "differs", "; ".join(diffs)
    return "reproduced", f"{len([k for k in original if not k.startswith('system/')])} metrics identical" + (
        "" if tolerance == 0 else f" within {tolerance:g}")
