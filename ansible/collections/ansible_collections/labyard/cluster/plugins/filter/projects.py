"""projects.yml -> project policy handed to the platform (and checks on projects.yml).

projects.yml is the single source for LDAP project groups, project directories
and this policy; ``project_policy`` validates it once so that every consumer
sees the same, consistent data.

What a valid policy is (names, flavours, quotas, quantities) is not written
here: the policy is checked against ``schemas/project-policy.schema.json`` of
this collection, the JSON schema generated from the platform's own model
(``labyard policy-schema``; a test keeps the copy current). Project names obey
the same schema, so projects.yml accepts exactly the names the hub accepts.
This module adds only what the policy cannot know: unique gids and uids, and
members that exist. A project that leaves out flavors, quota, storage or image
inherits the policy's defaults (the key is left out of the policy too).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ansible.errors import AnsibleFilterError

SCHEMA_FILE = Path(__file__).resolve().parents[2] / "schemas" / "project-policy.schema.json"
POLICY_KEYS = ("flavors", "quota", "storage", "image")


def policy_schema():
    """The platform's project-policy JSON schema (shipped in this collection)."""
    return json.loads(SCHEMA_FILE.read_text())


def _name_rule():
    names = policy_schema()["properties"]["projects"]["propertyNames"]
    return re.compile(names["pattern"]), names["maxLength"]


def _schema_problems(policy):
    """Every way ``policy`` breaks the schema, as ``where: what`` lines."""
    try:
        import jsonschema
    except ImportError as e:
        raise AnsibleFilterError("labyard.cluster needs the Python package jsonschema on the "
                                 "Ansible controller (pip install jsonschema)") from e

    def deepest(error):
        # an anyOf (a value or null) fails as a whole; its closest branch says what is wrong
        while error.context:
            error = max(error.context, key=lambda e: len(e.absolute_path))
        return error

    validator = jsonschema.Draft202012Validator(policy_schema())
    problems = []
    for error in validator.iter_errors(policy):
        error = deepest(error)
        where = ".".join(str(p) for p in error.absolute_path) or "policy"
        problems.append(f"{where}: {error.message}")
    return sorted(problems)


def validate_projects(projects, people=None, flavors=None):
    """Raise AnsibleFilterError listing every problem in projects.yml; return projects."""
    problems = []
    known_people = {p["name"] for p in people or []} if people is not None else None
    seen_names, seen_gids = set(), {}
    name_re, name_max = _name_rule()
    for p in projects or []:
        name = p.get("name", "")
        if not isinstance(name, str) or not name_re.match(name) or len(name) > name_max:
            problems.append(f"project name {name!r} is not valid: a lower-case letter, then lower-case letters, "
                            f"digits and single '-', at most {name_max} characters (the platform's policy schema)")
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


def project_policy(projects, flavors, people=None, defaults=None):
    """The platform's project policy: ``{"flavors": {...}, "defaults": {...}, "projects": {name: {...}}}``,
    checked against the platform's policy schema (AnsibleFilterError listing every problem)."""
    validate_projects(projects, people, flavors)
    unknown = sorted(set((defaults or {}).get("flavors") or ()) - set(flavors or {}))
    if unknown:
        raise AnsibleFilterError(f"the project defaults name unknown flavors {unknown}")
    out = {"flavors": {k: dict(v) for k, v in (flavors or {}).items()}, "projects": {}}
    if defaults:
        out["defaults"] = dict(defaults)
    for p in projects or []:
        out["projects"][p["name"]] = {k: p[k] for k in POLICY_KEYS if k in p}
    problems = _schema_problems(out)
    if problems:
        raise AnsibleFilterError("projects.yml does not make a valid project policy:\n- " + "\n- ".join(problems))
    return out


class FilterModule:
    """labyard.cluster project filters."""

    def filters(self):
        return {"project_policy": project_policy, "validate_projects": validate_projects}
