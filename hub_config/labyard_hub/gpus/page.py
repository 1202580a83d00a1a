"""The admin page of ``labyard-gpus``: one HTML document from a snapshot (pure, escaped)."""

from __future__ import annotations

from datetime import datetime
from html import escape

from .cluster import Snapshot


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h} h {m:02d} min" if h else (f"{m} min {s:02d} s" if m else f"{s} s")


def _table(headers: list[str], rows: list[list[str]], table_id: str, empty: str) -> str:
    if not rows:
        return f'<p class="empty" id="{table_id}">{escape(empty)}</p>'
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _counts(values: dict[str, int] | None) -> str:
    if values is None:
        return "no quota"
    return escape(", ".join(f"{v} × {k}" for k, v in sorted(values.items())) or "0")


def render(snapshot: Snapshot | None, error: str | None, prefix: str, now: datetime) -> str:
    """The page: nodes, allocations, projects, waiting pods and utilisation, or the reason there are none."""
    parts = [f"<h1>GPUs</h1>"]
    if error or snapshot is None:
        parts.append(f'<p class="error" id="gpus-error">{escape(error or "the cluster has not been read yet")}</p>')
    else:
        s = snapshot
        parts.append(f'<p>As of {escape(s.as_of.isoformat(timespec="seconds"))}. '
                     f'<a href="{escape(prefix)}api/allocations">JSON</a> · GPU-hours per project '
                     f'<a href="{escape(prefix)}api/usage?by=project&amp;period=month&amp;format=csv">CSV</a>, per user '
                     f'<a href="{escape(prefix)}api/usage?by=user&amp;period=month&amp;format=csv">CSV</a></p>')
        if not s.utilisation.configured:
            parts.append(f'<p class="note" id="utilisation-not-configured">{escape(s.utilisation.message or "")}</p>')
        elif s.utilisation.error:
            parts.append(f'<p class="error" id="utilisation-error">{escape(s.utilisation.error)}</p>')
        if s.hub_error:
            parts.append(f'<p class="error">{escape(s.hub_error)}</p>')
        parts.append("<h2>Nodes</h2>")
        parts.append(_table(["node", "product", "GPUs", "allocated"], [
            [escape(n.name), escape(n.product or "?"), _counts(n.resources), _counts(n.allocated)
             + (" (cordoned)" if n.unschedulable else "")] for n in s.nodes], "gpu-nodes", "No node has GPUs."))
        parts.append("<h2>Allocated GPUs</h2>")
        rows = []
        for a in s.allocations:
            what = (f"server {escape(a.server or '')}" if a.kind == "server" else
                    f"run {escape(a.run or '')} of schedule {escape(a.schedule or '')}" if a.kind == "run" else "other pod")
            util = "–"
            if a.utilisation:
                util = "; ".join(f"{m.get('utilisation', 0):g} %, {m.get('memory_used_mib') or 0:g} MiB used"
                                 for m in a.utilisation)
            flag = ' <strong class="idle-gpu">idle GPU</strong>' if a.idle_gpu else ""
            rows.append([escape(a.project or "–"), escape(a.user or "–"), what, escape(f"{a.namespace}/{a.pod}"),
                         escape(a.node), _counts(a.resources), escape(a.since.isoformat(timespec="seconds")),
                         _duration((now - a.since).total_seconds()),
                         _duration(a.idle_seconds) if a.kind == "server" else "–", escape(util) + flag])
        parts.append(_table(["project", "user", "held by", "pod", "node", "GPUs", "since", "for", "server idle",
                             "utilisation"], rows, "gpu-allocations", "No GPU is allocated."))
        parts.append("<h2>Projects</h2>")
        parts.append(_table(["project", "quota", "in use", "waiting"], [
            [escape(p.project), _counts(p.quota), str(p.in_use),
             "<br>".join(escape(f"{w.user or '?'} ({w.pod}): {w.reason}") for w in p.waiting) or "–"]
            for p in s.projects], "gpu-projects", "No project."))
        others = [w for w in s.waiting if not w.project]
        if others:
            parts.append("<h2>Other pods waiting for GPUs</h2>")
            parts.append(_table(["pod", "GPUs", "reason"], [[escape(f"{w.namespace}/{w.pod}"), _counts(w.resources),
                                                              escape(w.reason)] for w in others], "gpu-waiting", ""))
    style = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
             "padding:.3em .6em;text-align:left}.error{color:#a00}.note{background:#eef;padding:.5em}.idle-gpu{color:#a60}")
    return (f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>Labyard GPUs</title><style>{style}</style>'
            f"</head><body>{''.join(parts)}</body></html>")


_SHARE_STYLE = "body{margin:0;font:13px/1.6 sans-serif;color:#333;background:transparent;white-space:nowrap}"


def share(data: dict) -> str:
    """The home page's line for one project: GPUs in use of the quota, the user's GPU-hours this month."""
    quota = "no quota" if data["gpu_quota"] is None else str(data["gpu_quota"])
    waiting = f" · {data['waiting']} waiting" if data["waiting"] else ""
    text = f"{data['in_use']} in use of {quota}{waiting} · you: {data['gpu_hours_this_month']:.1f} GPU-hours this month"
    return (f'<!DOCTYPE html><html><head><meta charset="utf-8"><style>{_SHARE_STYLE}</style></head><body>'
            f'<span id="share" data-in-use="{data["in_use"]}" data-gpu-quota="{escape(quota)}" '
            f'data-gpu-hours="{data["gpu_hours_this_month"]}">{escape(text)}</span></body></html>')


def share_error(message: str) -> str:
    return (f'<!DOCTYPE html><html><head><meta charset="utf-8"><style>{_SHARE_STYLE}</style></head><body>'
            f'<span id="share-error" title="{escape(message)}">unavailable</span></body></html>')
