"""The one access decision of Labyard: who may see, change and run what, in which project.

Every component decides here and nowhere else, so a notebook server, a scheduled run, a
namespace quota and an MLflow experiment can never disagree about who may use what:

* the spawners (in the hub) call :meth:`Access.authorize` before a server starts;
* the scheduler's backends call :meth:`Access.may_see`, :meth:`Access.may_change` and
  :meth:`Access.authorize` on every request, and again when a cron run fires;
* the MLflow gate calls :meth:`Access.may_see` / :meth:`Access.may_change` for the project of
  the experiment or run a request touches;
* the project controller asks :meth:`Access.gpu_resources` which GPU resources a project's
  quota must cover.

The rules:

* A project's **members** see its schedules, runs and experiments, and start servers and runs
  in it with the flavours the policy allows the project (and that this mode offers: local mode
  offers GPU flavours only when ``local.allow_gpu_flavors`` is set).
* Only the **owner** of a schedule or run changes, cancels or deletes it, and only while still a
  member of its project.
* **Admins** (hub admins, e.g. members of an LDAP admin group) see and change everything, but
  start servers and runs only in projects they are members of: a run executes with the
  project's gid, so it needs the membership, not a title.

Decisions are made on *current* membership: services read each user's identity from the hub
through :class:`HubIdentities` (the hub's groups are the projects, kept in step with LDAP by
the directory sync) with a short cache, never from a copy taken at login.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote

from .projects import Flavor, Identity, Project, ProjectPolicy

#: the policy of an installation without a policy file: one CPU flavour, no quotas
DEFAULT_POLICY = ProjectPolicy.model_validate({"flavors": {"default": {"display_name": "Default"}}})

#: seconds a service may act on an identity read from the hub (the removal delay it adds)
IDENTITY_MAX_AGE = 10.0


class AccessError(Exception):
    """A request the user may not make. ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class IdentityUnavailable(Exception):
    """The hub could not say who a user is (down, or refused the service's token)."""


def load_policy(path: str | Path | None) -> ProjectPolicy:
    """The installation's project policy: ``path``, or :data:`DEFAULT_POLICY` when none is set.

    Raises:
        PolicyError: the file is unreadable or invalid; the message names the file and the field.
    """
    return ProjectPolicy.from_yaml(path) if path else DEFAULT_POLICY


class Access:
    """The access rules over one project policy, in one mode.

    Args:
        policy: the installation's project policy (:func:`load_policy`).
        gpus: whether this mode offers flavours with GPUs (Kubernetes: yes; local mode: only
            when the admin allows it, as local processes get no GPU isolation).
    """

    def __init__(self, policy: ProjectPolicy, *, gpus: bool = True):
        self.policy = policy
        self.gpus = gpus

    @classmethod
    def from_settings(cls, settings: Any) -> Access:
        """The access rules of an installation (:class:`labyard_hub.settings.Settings`)."""
        gpus = settings.kubernetes is not None or settings.local.allow_gpu_flavors
        return cls(load_policy(settings.policy_file), gpus=gpus)

    # -- what a project may use ---------------------------------------------------------------
    def flavor(self, name: str) -> Flavor | None:
        """The policy's flavour ``name`` (None when the policy no longer has it)."""
        return self.policy.flavors.get(name)

    def flavors(self, project: str) -> list[Flavor]:
        """The flavours a server or run of ``project`` may use in this mode, in policy order."""
        return [f for f in self.policy.allowed_flavors(project) if self.gpus or f.gpus == 0]

    def gpu_resources(self, project: str) -> list[str]:
        """Every GPU resource name (``nvidia.com/gpu``, MIG slices...) the project's flavours use."""
        names = {f.gpu_resource for f in self.policy.allowed_flavors(project) if f.gpus}
        return sorted(names or {"nvidia.com/gpu"})

    # -- who -----------------------------------------------------------------------------------
    def member(self, identity: Identity, project: str) -> Project:
        """The project, if ``identity`` is a member of it; AccessError 403 otherwise."""
        proj = identity.project(project)
        if proj is None:
            raise AccessError(403, f"{identity.username} is not a member of project {project!r}")
        return proj

    def may_see(self, identity: Identity, project: str) -> None:
        """Members and admins see a project's schedules, runs and experiments (else 403)."""
        if not identity.admin:
            self.member(identity, project)

    def may_change(self, identity: Identity, owner: str, project: str) -> None:
        """The owner (still a member) or an admin may change, cancel or delete (else 403)."""
        if identity.admin:
            return
        self.member(identity, project)
        if identity.username != owner:
            raise AccessError(403, f"only {owner} (the owner) may change this")

    def visible_projects(self, identity: Identity) -> set[str] | None:
        """The projects whose things ``identity`` sees; None means all of them (admins)."""
        return None if identity.admin else set(identity.project_names)

    def authorize(self, identity: Identity, project: str, flavor: str | None = None) -> tuple[Project, Flavor]:
        """Decide whether ``identity`` may start a server or run in ``project`` with ``flavor``.

        Args:
            flavor: a flavour name; None takes the first flavour the project is offered.
        Returns:
            the project (with its gid) and the flavour.
        Raises:
            AccessError: 403 if the user is not a member of the project (checked first, so a
                non-member learns nothing about the project's flavours); 400 if the flavour is
                unknown, not allowed in the project, or not offered in this mode, or the project
                is offered no flavour at all.
        """
        proj = self.member(identity, project)
        offered = {f.name: f for f in self.flavors(project)}
        if flavor is None:
            if not offered:
                raise AccessError(400, f"no flavour is available to project {project!r}")
            return proj, next(iter(offered.values()))
        problem = self.flavor_problem(project, flavor)
        if problem:
            raise AccessError(400, problem)
        return proj, offered[flavor]

    def flavor_problem(self, project: str, flavor: str) -> str | None:
        """Why ``project`` may not use ``flavor`` in this mode (None: it may)."""
        offered = [f.name for f in self.flavors(project)]
        if flavor in offered:
            return None
        if flavor not in self.policy.flavors:
            why = "unknown flavor"
        elif flavor in {f.name for f in self.policy.allowed_flavors(project)}:
            why = "flavor not offered in this mode (GPU flavours need Kubernetes or local.allow_gpu_flavors)"
        else:
            why = "flavor not available to this project"
        return f"{why} {flavor!r} for project {project!r}; choose one of: {', '.join(offered) or 'none'}"

    def why_not(self, owner: Identity, project: str, flavor: str) -> str | None:
        """Why a run of ``owner``'s schedule in ``project`` with ``flavor`` may not start now.

        Asked again whenever a schedule acts on its own (a cron time, the scheduler's reconcile
        pass), with ``owner``'s current identity. Returns None if it may, else the reason shown
        with the paused schedule to its owner and the project.
        """
        if owner.project(project) is None:
            return f"{owner.username} is no longer a member of project {project!r}"
        problem = self.flavor_problem(project, flavor)
        return f"the schedule's flavour is gone: {problem}" if problem else None


def process_ids(identity: Identity, project: Project) -> tuple[int, int]:
    """The uid and gid every process of ``identity`` in ``project`` runs as (a server and its
    kernels, a scheduled run): the user's LDAP uidNumber and the project's gidNumber.

    Raises:
        AccessError: 403 when the user has no uidNumber, or the project no gidNumber, in the
            directory (or either is 0): there is nobody safe to run as.
    """
    if not identity.uid:
        raise AccessError(403, f"{identity.username} has no uidNumber in the directory: servers and runs execute as "
                               "the user's own LDAP uid here; ask an administrator to give the account one")
    if not project.gid:
        raise AccessError(403, f"project {project.name!r} has no gidNumber in the directory: servers and runs execute "
                               "with the project's LDAP gid here; ask an administrator to give the group one")
    return identity.uid, project.gid

# ---- current identities, from the hub ----------------------------------------------------------
class Identities(Protocol):
    """Where a service reads users' current identities (:class:`HubIdentities` in the services;
    :class:`StaticIdentities` where identities are given, e.g. tests)."""

    async def get(self, name: str, fresh: bool = False) -> Identity:
        """``name``'s identity; ``fresh=True`` skips any cache. Raises IdentityUnavailable."""
        ...

    async def projects(self) -> list[str]:
        """Every project there is (a scheduler backend searches their namespaces)."""
        ...


class StaticIdentities:
    """Identities given up front (tests swap it in for :class:`HubIdentities`), changeable.

    A user it does not know has no projects; :meth:`set` replaces one user's identity (a test
    "removes" a member this way where no hub runs).
    """

    def __init__(self, identities: dict[str, Identity] | list[Identity] | tuple[Identity, ...] = ()):
        items = identities.values() if isinstance(identities, dict) else identities
        self._by_name = {i.username: i for i in items}

    def set(self, identity: Identity) -> None:
        self._by_name[identity.username] = identity

    async def get(self, name: str, fresh: bool = False) -> Identity:
        return self._by_name.get(name) or Identity(username=name)

    async def projects(self) -> list[str]:
        return sorted({p for i in self._by_name.values() for p in i.project_names})


def identity_from_hub(user: dict[str, Any], groups: dict[str, dict[str, Any]] | None = None) -> Identity:
    """A user's current identity from the hub's REST models.

    Args:
        user: ``GET /hub/api/users/{name}`` as a service with ``read:users`` and
            ``admin:auth_state`` sees it: ``name``, ``admin``, ``groups`` and ``auth_state``
            (uid, gid and home as :class:`labyard_hub.ldap.LDAPAuthenticator` wrote them).
        groups: ``{name: properties}`` of the hub's groups (``GET /hub/api/groups``); the
            directory sync keeps a project's ``gid``, ``display_name`` and ``description`` there.
    Returns:
        the identity; its projects are the user's hub groups *now* (the sync removes members
        that left a project in LDAP), their gid from the group's properties, else from the
        auth_state of the last login.
    """
    state = user.get("auth_state") or {}
    at_login = {p.get("name"): p for p in state.get("projects") or () if isinstance(p, dict)}
    projects = []
    for name in sorted(user.get("groups") or ()):
        props = (groups or {}).get(name) or {}
        known = at_login.get(name, {})
        gid = props.get("gid", known.get("gid"))
        projects.append(Project(name=name, gid=int(gid) if gid is not None else None,
                                description=str(props.get("description", known.get("description", "")) or ""),
                                display_name=str(props.get("display_name", known.get("display_name", "")) or "")))
    return Identity(username=user["name"], uid=state.get("uid_number"), gid=state.get("gid_number"),
                    home=state.get("home"), projects=tuple(projects), admin=bool(user.get("admin")))


class HubIdentities:
    """Users' current identities, read from the hub's REST API and kept ``max_age`` seconds.

    The service's token needs the scopes ``read:users``, ``admin:auth_state`` and
    ``read:groups`` (plus ``list:groups``). A user the hub does not know has no projects.
    :meth:`get` is for tornado/asyncio services; :meth:`get_sync` for threaded WSGI apps (the
    MLflow gate); both share the cache.

    Raises (both):
        IdentityUnavailable: the hub did not answer within ``timeout`` or refused the token.
    """

    def __init__(self, api_url: str, token: str, max_age: float = IDENTITY_MAX_AGE, timeout: float = 10.0):
        self.api_url = api_url.rstrip("/") + "/"
        self.token = token
        self.max_age = max_age
        self.timeout = timeout
        self._users: dict[str, tuple[float, Identity]] = {}
        self._groups: tuple[float, dict[str, dict[str, Any]]] | None = None

    def _fresh(self, stamp: float) -> bool:
        return time.monotonic() - stamp < self.max_age

    def _cached(self, name: str, fresh: bool) -> Identity | None:
        hit = self._users.get(name)
        return hit[1] if hit and not fresh and self._fresh(hit[0]) else None

    def _read(self, path: str) -> tuple[int, Any]:
        """One blocking GET of the hub API: (status, JSON body or None)."""
        req = urllib.request.Request(self.api_url + path, headers={
            "Authorization": f"token {self.token}", "Accept": "application/jupyterhub-pagination+json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return resp.status, json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return 404, None
            raise IdentityUnavailable(f"the hub refused {path}: {e.code} {e.reason}") from e
        except (OSError, ValueError) as e:
            raise IdentityUnavailable(f"the hub did not answer {path}: {e}") from e

    def _load_groups(self, fresh: bool) -> dict[str, dict[str, Any]]:
        if self._groups is None or fresh or not self._fresh(self._groups[0]):
            groups: dict[str, dict[str, Any]] = {}
            offset = 0
            while True:  # the hub pages lists (at most api_page_max_limit, 200 by default, a page)
                _, page = self._read(f"groups?offset={offset}&limit=200")
                items = page.get("items", []) if isinstance(page, dict) else (page or [])
                groups.update((g["name"], g.get("properties") or {}) for g in items)
                nxt = (page.get("_pagination") or {}).get("next") if isinstance(page, dict) else None
                if not items or not nxt:
                    break
                offset = nxt["offset"]
            self._groups = (time.monotonic(), groups)
        return self._groups[1]

    def _load(self, name: str, fresh: bool) -> Identity:
        groups = self._load_groups(fresh)
        status, user = self._read(f"users/{quote(name, safe='')}")
        identity = Identity(username=name) if status == 404 else identity_from_hub(user, groups)
        self._users[name] = (time.monotonic(), identity)
        return identity

    def get_sync(self, name: str, fresh: bool = False) -> Identity:
        """``name``'s identity (blocking: call it from a worker thread, never an event loop)."""
        return self._cached(name, fresh) or self._load(name, fresh)

    async def get(self, name: str, fresh: bool = False) -> Identity:
        """``name``'s identity; ``fresh=True`` skips the cache (e.g. when a cron run fires)."""
        hit = self._cached(name, fresh)
        if hit is not None:
            return hit
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, self._load, name, fresh)

    async def projects(self) -> list[str]:
        """Every project: the hub's groups (the directory sync keeps one per LDAP project)."""
        loop = asyncio.get_running_loop()
        return sorted(await loop.run_in_executor(None, self._load_groups, False))
