"""Log users in against LDAP: JupyterHub's authenticator, a thin layer on :class:`Directory`.

The directory work (finding the user, checking the password, reading project groups) is in
:mod:`labyard_hub.directory`, asynchronous and bounded by timeouts, so a slow or dead directory
never freezes the hub. This module adds what belongs to logging in: the checks made before LDAP
is asked, the slowdown of password guessing, and JupyterHub's auth model.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from jupyterhub import orm
from jupyterhub.auth import Authenticator
from jupyterhub.handlers.login import LoginHandler as _HubLoginHandler
from tornado import web
from traitlets import Float, Instance, Integer, Unicode, default
from traitlets.config import Config

from .directory import Directory, DirectoryError
from .projects import Identity

__all__ = ["DirectoryError", "LDAPAuthenticator", "Throttle", "ldap_config"]


def ldap_config(options: dict[str, Any]) -> Config:
    """Labyard's flat ``ldap:`` settings as traitlets config, each option given to the class that has it.

    Raises:
        ValueError: an option neither :class:`Directory` nor :class:`LDAPAuthenticator` has.
    """
    config = Config()
    directory, authenticator = Directory.class_trait_names(config=True), LDAPAuthenticator.class_trait_names(config=True)
    for name, value in options.items():
        if name in directory:
            config.Directory[name] = value
        elif name in authenticator:
            config.LDAPAuthenticator[name] = value
        else:
            raise ValueError(f"unknown LDAP option {name!r} (see docs/admin/reference.md: Directory and LDAPAuthenticator)")
    return config


class Locked(Exception):
    """Too many failed logins for this key; ``seconds`` until it may try again."""

    def __init__(self, seconds: float):
        super().__init__(f"locked for {seconds:.0f} s")
        self.seconds = seconds


@dataclass
class _Failures:
    count: int = 0
    locked_until: float = 0.0
    last: float = 0.0
    in_flight: int = 0


class Throttle:
    """Failed logins per key (a user name, a client address), locked out for longer and longer.

    After ``limit`` failures the key is locked for ``lock_seconds``, doubled with every further
    failure up to ``max_lock_seconds``; failures are forgotten ``forget_seconds`` after the last
    one. Attempts refused while locked do not count (hammering a locked name does not lock it
    for longer). With ``gate``, attempts checked at the same time count too: no more than the
    failures left before the lock are in flight at once, later ones wait for an answer (so
    guesses sent all at once are not all checked), and a success lets the waiting ones through.
    """

    def __init__(self, limit: int, lock_seconds: float, max_lock_seconds: float, forget_seconds: float,
                 gate: bool = False, clock=time.monotonic, max_keys: int = 100_000):
        self.limit, self.lock_seconds, self.max_lock_seconds = limit, lock_seconds, max_lock_seconds
        self.forget_seconds, self.gate, self.clock, self.max_keys = forget_seconds, gate, clock, max_keys
        self._state: OrderedDict[str, _Failures] = OrderedDict()
        self._changed: asyncio.Event | None = None

    def _get(self, key: str) -> _Failures:
        now = self.clock()
        while self._state:
            oldest = next(iter(self._state.values()))
            if oldest.in_flight or (len(self._state) <= self.max_keys and now - oldest.last <= self.forget_seconds):
                break
            self._state.popitem(last=False)
        state = self._state.get(key)
        if state is None or (not state.in_flight and now - state.last > self.forget_seconds):
            state = self._state[key] = _Failures(last=now)
        return state

    def locked_for(self, key: str) -> float:
        """Seconds until ``key`` may try again (0: now)."""
        if self.limit <= 0:
            return 0.0
        return max(0.0, self._get(key).locked_until - self.clock())

    async def admit(self, key: str) -> None:
        """Wait until an attempt for ``key`` may be checked; raise :class:`Locked` if it may not."""
        if self.limit <= 0:
            return
        while True:
            state = self._get(key)
            if (wait := state.locked_until - self.clock()) > 0:
                raise Locked(wait)
            # after a lock has run out, one attempt at a time (its failure locks again, for longer)
            if not self.gate or state.in_flight < max(1, self.limit - state.count):
                state.in_flight += 1
                return
            if self._changed is None:
                self._changed = asyncio.Event()
            await self._changed.wait()

    def finish(self, key: str, ok: bool, forget: bool = False) -> float:
        """Record the outcome of an admitted attempt; the lock it started, in seconds (0: none).

        ``forget``: a success also forgets earlier failures (a user name, not an address).
        """
        if self.limit <= 0:
            return 0.0
        state = self._get(key)
        state.in_flight = max(0, state.in_flight - 1)
        seconds = 0.0
        if ok and forget:
            state.count, state.locked_until = 0, 0.0
        elif not ok:
            now = self.clock()
            state.count += 1
            state.last = now
            self._state.move_to_end(key)
            if state.count >= self.limit:
                seconds = min(self.lock_seconds * 2 ** (state.count - self.limit), self.max_lock_seconds)
                state.locked_until = now + seconds
        if self._changed is not None:
            self._changed.set()
            self._changed = None
        return seconds


#: what the login form says while the directory cannot be asked (the password was not checked)
DIRECTORY_DOWN = ("The directory (LDAP) does not answer just now, so nobody can log in: please try again in a "
                  "minute. Your password was not checked.")


class LoginHandler(_HubLoginHandler):
    """JupyterHub's login form, which says so (503) when the directory cannot be asked instead of
    "Invalid username or password": a login refused because LDAP is down is not a wrong password."""

    def find_user(self, name: str):
        """JupyterHub's ``find_user`` in one query. ``orm.User.find`` runs six (the user, then its
        roles, groups, spawners and shares, reloaded every time, ~2 ms on the event loop per
        login); the user's id by name and then the session's own copy of the user gives the same
        object. At a burst of logins this is a third of the hub's work per login."""
        user_id = self.db.query(orm.User.id).filter(orm.User.name == name).scalar()
        return None if user_id is None else self._user_from_orm(self.db.get(orm.User, user_id))

    def _render(self, login_error=None, username=None, **kwargs):
        if getattr(self, "labyard_directory_down", False) and self.request.method == "POST":
            self.set_status(503)
            login_error = DIRECTORY_DOWN
        return super()._render(login_error=login_error, username=username, **kwargs)


class LDAPAuthenticator(Authenticator):
    """Log users in against LDAP or Active Directory; their LDAP groups are their projects.

    Where the directory is and how it is read: :class:`labyard_hub.directory.Directory`
    (``c.Directory.*``). Failed logins slow down password guessing: after
    ``failed_login_limit`` failures for one user name (or ``failed_login_address_limit`` from
    one client address) further logins for it are refused for ``failed_login_lock_seconds``,
    doubling with each further failure; the refusal says so (HTTP 429) and is logged.
    """

    directory = Instance(Directory, help="The directory users are found in (configured as c.Directory).")

    username_pattern = Unicode(
        r"^[a-z_][a-z0-9_.-]{0,31}$",
        help="Usernames (after normalising to lower case) must match this, or login is refused before LDAP is asked.",
    ).tag(config=True)
    max_password_length = Integer(1024, help="Longer passwords are refused before LDAP is asked.").tag(config=True)

    failed_login_limit = Integer(
        5,
        help="""Failed logins for one user name before that name is locked (whether or not the
        name exists, so locking tells nothing). 0 turns the per-name lock off.""",
    ).tag(config=True)
    failed_login_address_limit = Integer(
        50,
        help="""Failed logins from one client address (the proxy's ``X-Forwarded-For``) before
        that address is locked; higher than the per-name limit, as many people may share one
        address. 0 turns the per-address lock off.""",
    ).tag(config=True)
    failed_login_lock_seconds = Float(30, help="First lock after too many failed logins; each further failure doubles it.").tag(config=True)
    failed_login_max_lock_seconds = Float(900, help="Longest lock.").tag(config=True)
    failed_login_forget_seconds = Float(900, help="Failures are forgotten this long after the last one (a successful "
                                                  "login forgets a name's failures at once).").tag(config=True)

    @default("directory")
    def _directory_default(self) -> Directory:
        # options that moved from LDAPAuthenticator to Directory keep working
        moved = {k: v for k, v in self.config.get("LDAPAuthenticator", {}).items() if k in Directory.class_trait_names(config=True)}
        if moved:
            self.log.warning("c.LDAPAuthenticator.%s moved to c.Directory; please rename", ", ".join(sorted(moved)))
        return Directory(parent=self, **moved)

    @default("manage_groups")
    def _manage_groups_default(self) -> bool:
        return True

    @default("enable_auth_state")
    def _auth_state_default(self) -> bool:
        return True

    @default("refresh_pre_spawn")
    def _refresh_pre_spawn_default(self) -> bool:
        # membership is checked against LDAP as it is now, not as it was at login
        return True

    @default("auth_refresh_age")
    def _refresh_age_default(self) -> int:
        return 300

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        throttle = (self.failed_login_lock_seconds, self.failed_login_max_lock_seconds, self.failed_login_forget_seconds)
        self._names = Throttle(self.failed_login_limit, *throttle, gate=True)
        self._addresses = Throttle(self.failed_login_address_limit, *throttle)
        self.directory  # noqa: B018 (create it now: it checks its settings and warns about clear-text servers)

    async def list_projects(self):
        """Every project in the directory (see :meth:`Directory.list_projects`)."""
        return await self.directory.list_projects()

    # -- JupyterHub interface ------------------------------------------------------------------
    def normalize_username(self, username: str) -> str:
        return super().normalize_username(username.strip().lower())

    def _valid_credentials(self, username: str, password: str) -> bool:
        if not re.match(self.username_pattern, username):
            self.log.warning("LDAP login refused: username %r does not match %s", username[:80], self.username_pattern)
            return False
        if not password:
            self.log.warning("LDAP login %r refused: empty password", username)
            return False
        if len(password) > self.max_password_length or "\x00" in password:
            self.log.warning("LDAP login %r refused: password too long or with a NUL character", username)
            return False
        return True

    def _auth_model(self, identity: Identity) -> dict[str, Any]:
        model: dict[str, Any] = {
            "name": identity.username,
            "auth_state": identity.to_auth_state(),
            "groups": identity.project_names,
        }
        if self.directory.admin_groups:
            model["admin"] = identity.admin
        return model

    async def _admit(self, username: str, address: str | None) -> list[tuple[str, Throttle, str]]:
        """Admit a login attempt past the per-name and per-address locks, or refuse it with 429."""
        admitted = []
        for kind, throttle, key in (("address", self._addresses, address), ("name", self._names, username)):
            if key is None:
                continue
            try:
                await throttle.admit(key)
            except Locked as e:
                for _, other, other_key in admitted:
                    other.finish(other_key, ok=True)
                self.log.info("LDAP login %r from %s refused: too many failed logins for this %s (%.0f s left)",
                              username, address, kind, e.seconds)
                raise web.HTTPError(429, f"Too many failed logins: try again in {math.ceil(e.seconds)} seconds.") from None
            admitted.append((kind, throttle, key))
        return admitted

    async def authenticate(self, handler, data: dict[str, Any]) -> dict[str, Any] | None:
        username = self.normalize_username(str(data.get("username", "")))
        password = str(data.get("password", ""))
        address = handler.request.remote_ip if handler is not None and getattr(handler, "request", None) else None
        if not self._valid_credentials(username, password):
            if address is not None and self._addresses.locked_for(address) == 0:
                self._addresses.finish(address, ok=False)
            return None
        admitted = await self._admit(username, address)
        identity, refused = None, True
        try:
            identity = await self.directory.login(username, password)
        except DirectoryError as e:
            # a directory that cannot answer says nothing about the password: not a failed login
            refused = False
            self.log.error("LDAP login %r failed: directory unavailable: %s", username, e)
            if handler is not None:
                handler.labyard_directory_down = True  # LoginHandler tells the user
        except Exception:
            refused = False
            self.log.exception("LDAP login %r failed unexpectedly", username)
        finally:
            for kind, throttle, key in admitted:
                if seconds := throttle.finish(key, ok=identity is not None or not refused, forget=identity is not None and kind == "name"):
                    self.log.warning("LDAP login %r from %s: too many failed logins for this %s; locked for %.0f s",
                                     username, address, kind, seconds)
        if identity is None:
            return None
        self.log.info("LDAP login %r: projects %s%s", username, identity.project_names, " (admin)" if identity.admin else "")
        return self._auth_model(identity)

    def get_handlers(self, app):
        return [("/login", LoginHandler)]

    def check_allowed(self, username: str, authentication: dict[str, Any] | None = None) -> bool:
        """Members of at least one project (or admins) may log in, besides anyone the base class allows."""
        if authentication and (authentication.get("groups") or authentication.get("admin")):
            return True
        return super().check_allowed(username, authentication)

    async def refresh_user(self, user, handler=None):
        """Re-read projects and numbers from LDAP, so group changes apply without a new login.

        Returns False (log in again) when the user is gone from LDAP; True (keep) when LDAP is
        unreachable or there is no service account to read with.
        """
        if not self.directory.lookup_bind_dn:
            return True
        try:
            identity = await self.directory.lookup(user.name)
        except DirectoryError as e:
            self.log.warning("LDAP refresh of %r skipped: %s", user.name, e)
            return True
        if identity is None:
            self.log.warning("LDAP refresh: %r no longer exists; they must log in again", user.name)
            return False
        return self._auth_model(identity)
