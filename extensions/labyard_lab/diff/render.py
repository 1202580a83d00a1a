"""Text renderings: a notebook diff as nbdiff prints it, and a notebook as text (git textconv).

The diff printer walks the diff with the base notebook, as nbdime's printer does, and prints each
change under a ``## <what> <path>:`` line; changed strings are shown as unified hunks built
from the diff's own line operations (no second diff of the text), binary data as its size and
hash. Nothing here imports nbdime or nbformat, so ``labyard diff`` starts fast.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time

from .engine import DiffOptions

IND = "  "
CONTEXT = 3
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_BASE64 = re.compile(r"^[A-Za-z0-9+/=\n]+$")
TEXT_MIMES = ("text/", "image/svg+xml", "application/javascript")


class Printer:
    def __init__(self, out, options: DiffOptions, color: bool):
        self.out, self.o, self.color = out, options, color

    def _c(self, code: str, text: str) -> str:
        return f"\x1b[{code}m{text}\x1b[0m" if self.color else text

    def line(self, text: str = "", kind: str = " ") -> None:
        code = {"-": "31", "+": "32", "#": "34", "@": "36"}.get(kind)
        self.out.write((self._c(code, text) if code else text) + "\n")

    # ---- values ------------------------------------------------------------------------------
    def value(self, v, prefix: str, kind: str, path: str) -> None:
        """Print a whole value (a cell, an output, anything) with every line marked ``kind``."""
        for text in value_lines(v, path, self.o):
            self.line(f"{kind}{prefix}{text}", kind)

    # ---- diffs -------------------------------------------------------------------------------
    def diff(self, base, diff: list, path: str) -> None:
        for e in diff:
            key, op = e["key"], e["op"]
            here = f"{path}/{key}"
            if op == "patch":
                sub = base[key]
                if isinstance(sub, str):
                    self.line(f"## modified {here}:", "#")
                    self.string(sub, e["diff"])
                else:
                    self.diff(sub, e["diff"], here)
            elif op == "addrange":
                self.line(f"## inserted before {here}:", "#")
                for k, v in enumerate(e["valuelist"]):
                    self.value(v, IND, "+", f"{path}/*")
            elif op == "removerange":
                n = e["length"]
                self.line(f"## deleted {here}{'' if n == 1 else f'-{key + n - 1}'}:", "#")
                for v in base[key:key + n]:
                    self.value(v, IND, "-", f"{path}/*")
            elif op == "add":
                self.line(f"## added {here}:", "#")
                self.value(e["value"], IND, "+", here)
            elif op == "remove":
                self.line(f"## deleted {here}:", "#")
                self.value(base[key], IND, "-", here)
            elif op == "replace":
                self.line(f"## replaced {here}:", "#")
                self.value(base[key], IND, "-", here)
                self.value(e["value"], IND, "+", here)
            if op != "patch" or isinstance(base[key], str):
                self.out.write("\n")

    def string(self, base: str, diff: list) -> None:
        """A changed string as unified hunks, from the diff's line operations."""
        lines = base.splitlines(True)
        rows: list[tuple[str, str]] = []  # (" "|"-"|"+", line)
        i = 0
        for e in diff:
            key = e["key"]
            rows += [(" ", s) for s in lines[i:key]]
            i = max(i, key)
            if e["op"] == "addrange":
                rows += [("+", s) for s in e["valuelist"]]
            elif e["op"] == "removerange":
                rows += [("-", s) for s in lines[key:key + e["length"]]]
                i = key + e["length"]
            elif e["op"] == "patch":
                rows += [("-", lines[key]), ("+", apply_chars(lines[key], e["diff"]))]
                i = key + 1
        rows += [(" ", s) for s in lines[i:]]
        rows = _removed_first(rows)
        if _binary(base):
            self.line(f"{IND}- {describe_data(base)}", "-")
            self.line(f"{IND}+ {describe_data(''.join(s for t, s in rows if t != '-'))}", "+")
            return
        for hunk in hunks(rows):
            for kind, text in hunk:
                if kind == "@":
                    self.line(text, "@")
                else:
                    self.line(f"{kind}{IND}{text.rstrip(chr(10))}", kind)


def _removed_first(rows: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """In each run of changed lines, the removed ones first (as unified diffs show them)."""
    out, run = [], []
    for row in [*rows, (" ", None)]:
        if row[0] == " ":
            out += [r for r in run if r[0] == "-"] + [r for r in run if r[0] == "+"]
            run = []
            if row[1] is not None:
                out.append(row)
        else:
            run.append(row)
    return out


def apply_chars(line: str, diff: list) -> str:
    out, take = [], 0
    for e in diff:
        out.append(line[take:e["key"]])
        take = max(take, e["key"])
        if e["op"] == "addrange":
            out.append(e["valuelist"])
        elif e["op"] == "removerange":
            take = e["key"] + e["length"]
    out.append(line[take:])
    return "".join(out)


def hunks(rows: list[tuple[str, str]]):
    """Rows grouped into unified-diff hunks with CONTEXT lines around changes."""
    changed = [k for k, (t, _) in enumerate(rows) if t != " "]
    if not changed:
        return
    groups, start, end = [], changed[0], changed[0]
    for k in changed[1:]:
        if k - end > 2 * CONTEXT:
            groups.append((start, end))
            start = k
        end = k
    groups.append((start, end))
    for start, end in groups:
        lo, hi = max(0, start - CONTEXT), min(len(rows), end + CONTEXT + 1)
        a0 = sum(1 for t, _ in rows[:lo] if t != "+") + 1
        b0 = sum(1 for t, _ in rows[:lo] if t != "-") + 1
        na = sum(1 for t, _ in rows[lo:hi] if t != "+")
        nb = sum(1 for t, _ in rows[lo:hi] if t != "-")
        yield [("@", f"@@ -{a0},{na} +{b0},{nb} @@"), *rows[lo:hi]]


def _binary(v: str) -> bool:
    return len(v) > 256 and "\n" not in v.strip() and bool(_BASE64.match(v[:4096]))


def describe_data(v) -> str:
    raw = v if isinstance(v, str) else json.dumps(v, sort_keys=True)
    return f"<{len(raw)} characters, sha256 {hashlib.sha256(raw.encode()).hexdigest()[:16]}>"


def value_lines(v, path: str, o: DiffOptions) -> list[str]:
    """Lines showing a value: cells and outputs by their parts (ignored parts left out)."""
    if path.endswith("/cells/*") or path == "/cells/*":
        return cell_lines(v, o)
    if path.endswith("/outputs/*"):
        return output_lines(v)
    return _plain(v)


def _plain(v, prefix: str = "") -> list[str]:
    if isinstance(v, str):
        if _binary(v):
            return [prefix + describe_data(v)]
        return [prefix + s for s in v.splitlines()] or [prefix + '""']
    if isinstance(v, dict):
        out = []
        for k, x in v.items():
            if isinstance(x, (dict, list)) or (isinstance(x, str) and "\n" in x):
                out.append(f"{prefix}{k}:")
                out += _plain(x, prefix + IND)
            else:
                out.append(f"{prefix}{k}: {_plain(x)[0] if isinstance(x, str) else json.dumps(x)}")
        return out
    if isinstance(v, list):
        if all(isinstance(x, str) and "\n" not in x for x in v):
            return [prefix + json.dumps(v)]
        out = []
        for k, x in enumerate(v):
            out.append(f"{prefix}item {k}:")
            out += _plain(x, prefix + IND)
        return out
    return [prefix + json.dumps(v)]


def cell_lines(cell: dict, o: DiffOptions) -> list[str]:
    out = [f"{cell.get('cell_type')} cell:"]
    if cell.get("id") and o.identifier:
        out.append(f"{IND}id: {cell['id']}")
    if cell.get("execution_count") is not None and o.details:
        out.append(f"{IND}execution_count: {cell['execution_count']}")
    if cell.get("metadata") and o.metadata:
        out.append(f"{IND}metadata: {json.dumps(cell['metadata'], sort_keys=True)}")
    if cell.get("source") and o.sources:
        out += [f"{IND}source:", *(IND * 2 + s for s in cell["source"].splitlines())]
    if cell.get("attachments") and o.attachments:
        out.append(f"{IND}attachments:")
        for name, bundle in sorted(cell["attachments"].items()):
            out.append(f"{IND * 2}{name}: {', '.join(f'{m} {describe_data(x)}' for m, x in sorted(bundle.items()))}")
    if cell.get("outputs") and o.outputs:
        out.append(f"{IND}outputs:")
        for k, output in enumerate(cell["outputs"]):
            out.append(f"{IND * 2}output {k}:")
            out += [IND * 3 + s for s in output_lines(output)]
    return out


def output_lines(out: dict) -> list[str]:
    lines = [f"output_type: {out.get('output_type')}"]
    for key in ("name", "execution_count", "ename", "evalue"):
        if out.get(key) is not None:
            lines.append(f"{key}: {out[key]}")
    if "text" in out:
        lines += ["text:", *(IND + s for s in str(out["text"]).splitlines())]
    if out.get("traceback"):
        lines += ["traceback:", *(IND + _ANSI.sub("", s) for t in out["traceback"] for s in str(t).splitlines())]
    for mime, value in sorted((out.get("data") or {}).items()):
        if mime.startswith(TEXT_MIMES) and isinstance(value, str) and not _binary(value):
            lines += [f"{mime}:", *(IND + s for s in value.splitlines())]
        else:
            lines.append(f"{mime}: {describe_data(value)}")
    return lines


def _stamp(path: str) -> str:
    try:
        return "  " + time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(os.stat(path).st_mtime))
    except OSError:
        return ""


def print_notebook_diff(out, base_name: str, remote_name: str, base: dict, diff: list, options: DiffOptions,
                        color: bool, files: tuple[str, str] | None = None) -> None:
    """nbdiff's layout: a header naming both notebooks, then every change."""
    if not diff:
        return
    p = Printer(out, options, color)
    fa, fb = files or (base_name, remote_name)
    p.line(f"nbdiff {base_name} {remote_name}")
    p.line(f"--- {base_name}{_stamp(fa)}", "-")
    p.line(f"+++ {remote_name}{_stamp(fb)}", "+")
    p.diff(base, diff, "")


def textconv(nb: dict) -> str:
    """A notebook as plain text for line diffs: sources whole, outputs as text, binary data as a hash."""
    lines = []
    for i, cell in enumerate(nb.get("cells", [])):
        head = f"## cell {i} [{cell.get('cell_type')}]"
        if cell.get("id"):
            head += f" id={cell['id']}"
        if cell.get("execution_count") is not None:
            head += f" In [{cell['execution_count']}]"
        lines += [head, *(cell.get("source") or "").splitlines()]
        if cell.get("metadata"):
            lines.append(f"# metadata: {json.dumps(cell['metadata'], sort_keys=True)}")
        for name, bundle in sorted((cell.get("attachments") or {}).items()):
            lines.append(f"# attachment {name}: {', '.join(f'{m} {describe_data(x)}' for m, x in sorted(bundle.items()))}")
        for k, out in enumerate(cell.get("outputs") or []):
            lines.append(f"# output {k}")
            lines += [IND + s for s in output_lines(out)]
        lines.append("")
    return "\n".join(lines) + "\n"
