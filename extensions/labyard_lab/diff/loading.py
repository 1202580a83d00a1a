"""Reading a notebook for the engine: bytes in, a checked nbformat-4 dict out, or a clear error.

What nbformat's reader does, faster: ``json.loads``, multi-line strings joined, transient keys
dropped (``orig_nbformat``, ``signature``, cell ``trusted``), notebooks older than version 4
converted. What the engine relies on is checked and refused with :class:`NotebookError` (HTTP
400, or 413 for size): an empty file, not JSON, JSON that is not a notebook, a notebook whose
cells or outputs have the wrong shape. Other deviations from the nbformat schema (an unknown
key, a missing cell id) do not stop a diff, as JupyterLab opens such notebooks too; missing and
repeated cell ids are reported as warnings. The full schema is not checked: jsonschema costs
seconds to import and to run on a large notebook, for nothing the diff needs.
"""

from __future__ import annotations

import json

MAX_WARNINGS = 5


class NotebookError(ValueError):
    """A notebook that cannot be diffed; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def load_notebook(data: bytes | str, name: str = "notebook", max_bytes: int | None = None,
                  validate: bool = True) -> tuple[dict, list[str]]:
    """Parse and check one notebook; return it and the schema warnings (at most a few).

    Raises:
        NotebookError: the data cannot be diffed as a notebook (status 400), or is larger than
            ``max_bytes`` (status 413). The message names ``name`` and says what is wrong.
    """
    size = len(data)
    if max_bytes is not None and size > max_bytes:
        raise NotebookError(f"{name} is {_mb(size)}, over the limit of {_mb(max_bytes)} for a diff", 413)
    if not (data.strip() if isinstance(data, str) else data.strip()):
        raise NotebookError(f"{name} is empty ({size} bytes), not a notebook")
    try:
        nb = json.loads(data)
    except UnicodeDecodeError as e:
        raise NotebookError(f"{name} is not text (UTF-8 JSON): {e}") from e
    except json.JSONDecodeError as e:
        raise NotebookError(f"{name} is not JSON: {e.msg} at line {e.lineno}, column {e.colno}") from e
    except RecursionError as e:
        raise NotebookError(f"{name} is JSON nested too deeply to be a notebook") from e
    if not isinstance(nb, dict):
        raise NotebookError(f"{name} is JSON but not a notebook: a {type(nb).__name__}, not an object")
    major = nb.get("nbformat")
    if "cells" not in nb and "worksheets" not in nb or not isinstance(major, int) or isinstance(major, bool):
        missing = [k for k in ("nbformat", "cells") if k not in nb]
        what = f"no {' and no '.join(map(repr, missing))}" if missing else f"'nbformat' is {major!r}, not a version number"
        raise NotebookError(f"{name} is JSON but not a notebook: {what}")
    if major > 4:
        raise NotebookError(f"{name} is nbformat {major}; this platform reads nbformat 4 and older")
    if major < 4:
        nb = _upgrade(nb, name)
    _check(nb, name)
    _normalise(nb)
    return nb, (_warnings(nb, name) if validate else [])


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n} bytes"


def _upgrade(nb: dict, name: str) -> dict:
    import nbformat

    try:
        node = nbformat.versions[nb["nbformat"]].to_notebook_json(nb, minor=nb.get("nbformat_minor", 0))
        return json.loads(json.dumps(nbformat.convert(node, 4)))
    except Exception as e:  # noqa: BLE001 - nbformat raises many kinds for broken old notebooks
        raise NotebookError(f"{name} is nbformat {nb['nbformat']} and cannot be converted to version 4: {e}") from e


def _check(nb: dict, name: str) -> None:
    """The shape the engine needs; NotebookError naming the first place that breaks it."""
    cells = nb.get("cells")
    if not isinstance(cells, list):
        raise NotebookError(f"{name} is not a valid notebook: 'cells' is {_kind(cells)}, not a list")
    if "metadata" in nb and not isinstance(nb["metadata"], dict):
        raise NotebookError(f"{name} is not a valid notebook: 'metadata' is {_kind(nb['metadata'])}, not an object")
    for i, cell in enumerate(cells):
        where = f"{name} is not a valid notebook: cell {i}"
        if not isinstance(cell, dict):
            raise NotebookError(f"{where} is {_kind(cell)}, not an object")
        if not isinstance(cell.get("cell_type"), str):
            raise NotebookError(f"{where} has no cell_type")
        if not _is_text(cell.get("source", "")):
            raise NotebookError(f"{where}: 'source' is {_kind(cell.get('source'))}, not text")
        outputs = cell.get("outputs", [])
        if not isinstance(outputs, list):
            raise NotebookError(f"{where}: 'outputs' is {_kind(outputs)}, not a list")
        for k, out in enumerate(outputs):
            if not isinstance(out, dict) or not isinstance(out.get("output_type"), str):
                raise NotebookError(f"{where}: output {k} is not an output (an object with an output_type)")
            if "data" in out and not isinstance(out["data"], dict):
                raise NotebookError(f"{where}: output {k}: 'data' is {_kind(out['data'])}, not an object")
        if "attachments" in cell and not isinstance(cell["attachments"], dict):
            raise NotebookError(f"{where}: 'attachments' is {_kind(cell['attachments'])}, not an object")


def _kind(v) -> str:
    return "missing" if v is None else f"a {type(v).__name__}"


def _is_text(v) -> bool:
    return isinstance(v, str) or (isinstance(v, list) and all(isinstance(s, str) for s in v))


def _join(v):
    return "".join(v) if isinstance(v, list) and all(isinstance(s, str) for s in v) else v


def _join_bundle(bundle) -> None:
    if isinstance(bundle, dict):
        for mime, value in bundle.items():
            if not (mime == "application/json" or mime.startswith("application/") and mime.endswith("+json")):
                bundle[mime] = _join(value)


def _normalise(nb: dict) -> None:
    """What nbformat's reader does to a v4 notebook: join split strings, drop transient keys."""
    meta = nb.get("metadata")
    if isinstance(meta, dict):
        for key in ("orig_nbformat", "orig_nbformat_minor", "signature"):
            meta.pop(key, None)
    for cell in nb["cells"]:
        if "source" in cell:
            cell["source"] = _join(cell["source"])
        if isinstance(cell.get("metadata"), dict):
            cell["metadata"].pop("trusted", None)
        for attachment in (cell.get("attachments") or {}).values():
            _join_bundle(attachment)
        if cell["cell_type"] == "code":
            for out in cell.get("outputs", []):
                if out["output_type"] in ("execute_result", "display_data"):
                    _join_bundle(out.get("data"))
                elif "text" in out:
                    out["text"] = _join(out["text"])


def _warnings(nb: dict, name: str) -> list[str]:
    """What nbformat 4.5 requires and the diff can do without: cell ids, unique ones."""
    if (nb.get("nbformat"), nb.get("nbformat_minor", 0)) < (4, 5):
        return []
    warnings, seen = [], set()
    for i, cell in enumerate(nb["cells"]):
        cid = cell.get("id")
        if not isinstance(cid, str):
            warnings.append(f"{name}: cell {i} has no id (nbformat 4.5 requires one); it is aligned by its content")
        elif cid in seen:
            warnings.append(f"{name}: cell {i} repeats the id {cid!r}")
        seen.add(cid)
        if len(warnings) >= MAX_WARNINGS:
            break
    return warnings
