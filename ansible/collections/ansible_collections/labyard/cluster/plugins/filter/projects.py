"""projects.yml -> project policy handed to the platform (and checks on projects.yml).

projects.yml is the single source for LDAP project groups, project directories
and this policy; ``project_policy`` validates it once so that every consumer
sees the same, consistent data.
"""

from __future__ import annotations

import re

from ansible.errors import AnsibleFilterError

DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
# the platform makes namespace "labyard-<project>" (63 characters at most)
MAX_PROJECT_NAME = 63 - len("labyard-")
POLICY_KEYS = ("flavors", "quota", "storage", "image")


def validate_projects(projects, people=None, flavors=None):
    """Raise AnsibleFilterError listing every problem in projects.yml; return projects."""
    problems = []
    known_people = {p["name"] for p in people or []} if people is not None else None
    seen_names, seen_gids = set(), {}
    for p in projects or []:
        name = p.get("name", "")
        if not DNS_LABEL.match(name) or len(name) > MAX_PROJECT_NAME:
            problems.append(f"project name {name!r} must be a DNS label of at most {MAX_PROJECT_NAME} characters")
        if name in seen_names:
            problems.append(f"project {name!r} is listed twice")
        seen_names.add(name)
        gid = p.get("gid")
        if not isinstance(gid, int) or gid < 1000:
            problems.append(f"project {name!r}: gid must be an integer >= 1000, got {gid!r}")
        elif gid in seen_gids:
            problems.append(f"project {name!r}: gid {gid} already used by {seen_gids[gid]!r}")
        else:
            seen_gids[gid] = name
        if known_people is not None:
            for m in p.get("members") or []:
                if m not in known_people:
                    problems.append(f"project {name!r}: member {m!r} is not in labyard_people")
        if flavors is not None:
            for f in p.get("flavors") or []:
                if f not in flavors:
                    problems.append(f"project {name!r}: unknown flavor {f!r}")
    if people is not None:
        uids = {}
        for person in people:
            uid = person.get("uid")
            if uid in uids:
                problems.append(f"uid {uid} used by both {uids[uid]!r} and {person.get('name')!r}")
            uids[uid] = person.get("name")
    if problems:
        raise AnsibleFilterError("projects.yml is inconsistent:\n- " + "\n- ".join(problems))
    return projects


def project_policy(projects, flavors, people=None):
    """The platform's project policy: ``{"flavors": {...}, "projects": {name: {...}}}``."""
    validate_projects(projects, people, flavors)
    out = {"flavors": {k: dict(v) for k, v in (flavors or {}).items()}, "projects": {}}
    for p in projects or []:
        entry = {k: p[k] for k in POLICY_KEYS if k in p}
        entry.setdefault("flavors", [])
        out["projects"][p["name"]] = entry
    return out


class FilterModule:
    """labyard.cluster project filters."""

    def filters(self):
        return {"project_policy": project_policy, "validate_projects": validate_projects}
