"""The group sync: the hub's groups follow the directory's projects, for every hub user.

One pass reads every project group with its members from the :class:`Directory` in a few bulk
reads and makes the hub agree, through its REST API with the controller service's token:

- one hub group per project, named by the project's slug, whose properties are
  ``{"gid": <gidNumber or null>, "display_name": <the group's name>, "description": <...>}``;
- its users are the hub users who are members in the directory, whether they are logged in or
  not (users the hub has never seen are added when they first log in);
- a hub group that is no longer a project is emptied and deleted;
- a running server of a user who is no longer a member of its project is stopped.

The scheduler, the MLflow gate and the spawners read memberships from these groups, so a
removal in LDAP reaches all of them within one interval. See docs/admin/projects.md.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlencode

from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest

from ..directory import Directory

log = logging.getLogger("labyard.controller")

PAGINATION = "application/jupyterhub-pagination+json"


class HubError(Exception):
    """The hub's REST API refused or did not answer."""


class HubClient:
    """The JupyterHub REST API calls the group sync makes, with a service token.

    Args:
        api_url: the hub's API, e.g. ``http://127.0.0.1:8081/hub/api`` ($JUPYTERHUB_API_URL).
        token: the service's token ($JUPYTERHUB_API_TOKEN).
    """

    def __init__(self, api_url: str, token: str, timeout: float = 10):
        self.api_url = api_url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self.http = AsyncHTTPClient()

    async def call(self, method: str, path: str, body: Any = None, accept: str = "application/json",
                   timeout: float | None = None) -> Any:
        request = HTTPRequest(
            f"{self.api_url}/{path}", method=method,
            headers={"Authorization": f"token {self.token}", "Accept": accept, "Content-Type": "application/json"},
            body=None if body is None else json.dumps(body), allow_nonstandard_methods=True,
            request_timeout=timeout or self.timeout, connect_timeout=self.timeout,
        )
        try:
            response = await self.http.fetch(request)
        except HTTPClientError as e:
            detail = e.response.body.decode(errors="replace")[:300] if e.response is not None and e.response.body else ""
            raise HubError(f"{method} {path}: {e.code} {detail}".strip()) from e
        except OSError as e:
            raise HubError(f"{method} {path}: {e}") from e
        return json.loads(response.body) if response.body else None

    async def list(self, path: str, limit: int = 200) -> list[dict]:
        """Every item of a paginated list (``users``, ``groups``)."""
        items: list[dict] = []
        offset = 0
        while True:
            page = await self.call("GET", f"{path}?{urlencode({'offset': offset, 'limit': limit})}", accept=PAGINATION)
            items += page["items"]
            following = page["_pagination"].get("next")
            if not following:
                return items
            offset = following["offset"]

    async def users(self) -> list[dict]:
        return await self.list("users")

    async def groups(self) -> list[dict]:
        return await self.list("groups")

    async def create_group(self, name: str) -> None:
        await self.call("POST", f"groups/{quote(name)}", {})

    async def delete_group(self, name: str) -> None:
        await self.call("DELETE", f"groups/{quote(name)}")

    async def set_properties(self, name: str, properties: dict[str, Any]) -> None:
        await self.call("PUT", f"groups/{quote(name)}/properties", properties)

    async def add_users(self, name: str, users: list[str]) -> None:
        await self.call("POST", f"groups/{quote(name)}/users", {"users": users})

    async def remove_users(self, name: str, users: list[str]) -> None:
        await self.call("DELETE", f"groups/{quote(name)}/users", {"users": users})

    async def stop_server(self, user: str, server: str) -> None:
        # the hub answers when the server has stopped, or after its slow_stop_timeout (202)
        await self.call("DELETE", f"users/{quote(user)}/servers/{quote(server)}", timeout=120)


@dataclass
class SyncReport:
    """What one pass changed."""

    created: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    added: dict[str, list[str]] = field(default_factory=dict)
    removed: dict[str, list[str]] = field(default_factory=dict)
    stopped: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v}


class GroupSync:
    """Makes the hub's groups, group properties and memberships those of the directory.

    Args:
        directory: where projects and members are read (needs a service account).
        hub: the hub's REST API.
    """

    def __init__(self, directory: Directory, hub: HubClient):
        self.directory = directory
        self.hub = hub

    async def _apply(self, report: SyncReport, what: str, call) -> bool:
        try:
            await call
            return True
        except HubError as e:
            log.error("group sync: %s failed: %s", what, e)
            report.failed.append(what)
            return False

    async def run_once(self) -> SyncReport:
        """One pass. Raises DirectoryError (nothing is changed) or HubError (reading the hub failed)."""
        users = {u["name"]: u for u in await self.hub.users()}
        # read the directory before changing anything: if it cannot answer, the hub stays as it is
        found = await self.directory.memberships(users)
        groups = {g["name"]: g for g in await self.hub.groups()}
        report = SyncReport()
        for slug, project in sorted(found.projects.items()):
            want = found.members.get(slug, set()) & set(users)
            group = groups.get(slug)
            if group is None:
                if not await self._apply(report, f"create group {slug}", self.hub.create_group(slug)):
                    continue
                log.info("group sync: created group %s (%s)", slug, project.label)
                report.created.append(slug)
                group = {"users": [], "properties": {}}
            properties = project.group_properties()
            if group.get("properties") != properties:
                if await self._apply(report, f"properties of {slug}", self.hub.set_properties(slug, properties)):
                    report.updated.append(slug)
            have = set(group.get("users") or [])
            if add := sorted(want - have):
                if await self._apply(report, f"add {add} to {slug}", self.hub.add_users(slug, add)):
                    log.info("group sync: %s joined %s", ", ".join(add), slug)
                    report.added[slug] = add
            if remove := sorted(have - want):
                if await self._apply(report, f"remove {remove} from {slug}", self.hub.remove_users(slug, remove)):
                    log.info("group sync: %s left %s", ", ".join(remove), slug)
                    report.removed[slug] = remove
        for name in sorted(set(groups) - set(found.projects)):
            if members := sorted(groups[name].get("users") or []):
                await self._apply(report, f"remove {members} from {name}", self.hub.remove_users(name, members))
            if await self._apply(report, f"delete group {name}", self.hub.delete_group(name)):
                log.info("group sync: deleted group %s: it is not a project in the directory", name)
                report.deleted.append(name)
        await self._stop_foreign_servers(users, found.members, report)
        return report

    async def _stop_foreign_servers(self, users: dict[str, dict], members: dict[str, set[str]], report: SyncReport) -> None:
        """Stop (at once, side by side) every running server whose user is no longer a member of its project."""
        projects_of: dict[str, set[str]] = {}
        for slug, names in members.items():
            for name in names:
                projects_of.setdefault(name, set()).add(slug)
        foreign = [
            (name, server)
            for name, user in sorted(users.items())
            for server, model in sorted((user.get("servers") or {}).items())
            if server and server not in projects_of.get(name, set()) and (model or {}).get("pending") != "stop"
        ]
        slots = asyncio.Semaphore(8)

        async def stop(name: str, server: str) -> None:
            async with slots:
                log.warning("group sync: %s is no longer a member of project %s: stopping their server %s", name, server, server)
                if await self._apply(report, f"stop {name}/{server}", self.hub.stop_server(name, server)):
                    report.stopped.append(f"{name}/{server}")

        async with asyncio.TaskGroup() as tg:
            for name, server in foreign:
                tg.create_task(stop(name, server))
