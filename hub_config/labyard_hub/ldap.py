"""LDAP authentication and project lookup for JupyterHub, on ldap3.

Every ldap3 call runs in a thread pool with connect and receive timeouts, so a slow or dead
directory gives a fast, logged failure and never freezes the hub's event loop.
"""

from __future__ import annotations

import asyncio
import math
import queue
import re
import ssl
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import ldap3
from jupyterhub.auth import Authenticator
from ldap3.core import exceptions as ldap_errors
from ldap3.utils.conv import escape_filter_chars
from ldap3.utils.dn import escape_rdn
from traitlets import Bool, Enum, Float, Integer, List, Unicode, default, validate

from .projects import PROJECT_NAME_RE, Identity, Project


class DirectoryError(Exception):
    """The directory could not answer (no server reachable, timeout, bad service credentials)."""


@dataclass
class _Entry:
    dn: str
    attrs: dict[str, list[Any]]

    def first(self, name: str) -> Any:
        values = self.attrs.get(name) or []
        return values[0] if values else None


class LDAPAuthenticator(Authenticator):
    """Log users in against LDAP; their LDAP groups are their projects.

    Two ways to find the user's DN:

    - search-then-bind (recommended): set ``lookup_bind_dn`` / ``lookup_bind_password`` for a
      read-only service account, ``user_search_base`` and ``user_search_filter``.
    - direct bind: set ``bind_dn_templates``; without a service account, attributes and groups
      are read with the user's own connection and ``refresh_user`` cannot re-read them.
    """

    # -- servers and transport ------------------------------------------------------------------
    server_urls = List(
        Unicode(),
        minlen=1,
        help="""LDAP servers, tried in order (failover): a server that fails is skipped for
        ``server_retry_seconds``. Example::

            c.LDAPAuthenticator.server_urls = ["ldaps://ldap1.example.org", "ldaps://ldap2.example.org"]
        """,
    ).tag(config=True)
    use_starttls = Bool(False, help="Upgrade ``ldap://`` connections with StartTLS.").tag(config=True)
    ca_file = Unicode("", help="CA bundle (PEM) to verify the servers' certificates; empty: the system store.").tag(config=True)
    tls_verify = Bool(True, help="Verify server certificates (LDAPS and StartTLS). Turn off only for tests.").tag(config=True)
    connect_timeout = Float(3.0, help="Seconds to open a connection to one server before trying the next.").tag(config=True)
    receive_timeout = Float(10.0, help="Seconds to wait for any one LDAP answer.").tag(config=True)
    server_retry_seconds = Float(30.0, help="How long a server that failed is tried last.").tag(config=True)
    executor_threads = Integer(
        16, help="Threads for LDAP calls (the number of logins that talk to LDAP at the same time)."
    ).tag(config=True)

    lookup_pool_size = Integer(
        4, help="Service-account connections kept open and reused for lookups (each serves one lookup at a time)."
    ).tag(config=True)

    # -- finding the user ----------------------------------------------------------------------
    lookup_bind_dn = Unicode("", help="DN of a read-only service account used to find users and groups.").tag(config=True)
    lookup_bind_password = Unicode("", help="Password of ``lookup_bind_dn``.").tag(config=True)
    user_search_base = Unicode("", help="Base DN under which users are searched, e.g. ``ou=people,dc=example,dc=org``.").tag(config=True)
    user_search_filter = Unicode(
        "(&(objectClass=posixAccount)(uid={username}))",
        help="Filter to find a user; ``{username}`` is replaced by the escaped username (RFC 4515).",
    ).tag(config=True)
    bind_dn_templates = List(
        Unicode(),
        help="""Direct bind: DN templates tried in order, ``{username}`` replaced by the
        escaped username (RFC 4514). Used when no ``lookup_bind_dn`` is set. Example::

            c.LDAPAuthenticator.bind_dn_templates = ["uid={username},ou=people,dc=example,dc=org"]
        """,
    ).tag(config=True)
    username_attribute = Unicode("uid", help="Attribute holding the login name.").tag(config=True)
    uid_number_attribute = Unicode(
        "uidNumber", help="User attribute with the numeric uid that servers and runs run as (Kubernetes mode)."
    ).tag(config=True)
    gid_number_attribute = Unicode(
        "gidNumber", help="Attribute with the numeric gid, of users (primary group) and of project groups."
    ).tag(config=True)
    home_attribute = Unicode("homeDirectory", help="User attribute with the home directory (kept in auth_state).").tag(config=True)
    username_pattern = Unicode(
        r"^[a-z_][a-z0-9_.-]{0,31}$",
        help="Usernames (after normalising to lower case) must match this, or login is refused before LDAP is asked.",
    ).tag(config=True)
    max_password_length = Integer(1024, help="Longer passwords are refused before LDAP is asked.").tag(config=True)

    # -- projects ------------------------------------------------------------------------------
    project_search_base = Unicode("", help="Base DN of the groups that are projects, e.g. ``ou=projects,dc=example,dc=org``.").tag(config=True)
    project_search_filter = Unicode("(objectClass=posixGroup)", help="Filter selecting project groups.").tag(config=True)
    project_membership = Enum(
        ["memberUid", "member"],
        "memberUid",
        help="""How groups list members: ``memberUid`` (posixGroup, the username) or ``member``
        (groupOfNames / Active Directory, the user's DN).""",
    ).tag(config=True)
    nested_groups = Bool(
        False,
        help="""With ``project_membership = "member"``: a user in group A that is a member of
        group B is also in B (resolved level by level, up to ``nested_groups_depth``).""",
    ).tag(config=True)
    nested_groups_depth = Integer(5, help="How many levels of nested groups are followed.").tag(config=True)
    project_name_attribute = Unicode(
        "cn", help="Group attribute whose value is the project name (must be a DNS label: a-z, 0-9, -)."
    ).tag(config=True)
    project_description_attribute = Unicode("description", help="Group attribute shown as the project's description.").tag(config=True)
    admin_groups = List(
        Unicode(),
        help="Names of groups (found like projects) whose members are hub admins. They are not projects themselves.",
    ).tag(config=True)

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

    @validate("server_urls")
    def _check_urls(self, proposal):
        for url in proposal.value:
            if not re.match(r"^ldaps?://[^/]+/?$", url):
                raise ValueError(f"LDAP server URL {url!r} must look like ldap://host[:port] or ldaps://host[:port]")
        return proposal.value

    # -- plumbing ------------------------------------------------------------------------------
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._executor = ThreadPoolExecutor(self.executor_threads, thread_name_prefix="ldap")
        self._lookup_pool: queue.LifoQueue[ldap3.Connection] = queue.LifoQueue()
        self._lookup_slots = threading.BoundedSemaphore(self.lookup_pool_size)
        self._failed_at: dict[str, float] = {}

    def _servers(self) -> list[ldap3.Server]:
        """Servers in the order to try: those that did not fail recently first."""
        tls = None
        if self.tls_verify:
            tls = ldap3.Tls(validate=ssl.CERT_REQUIRED, ca_certs_file=self.ca_file or None)
        else:
            tls = ldap3.Tls(validate=ssl.CERT_NONE)
        now = time.monotonic()
        urls = sorted(self.server_urls, key=lambda u: now - self._failed_at.get(u, -1e9) < self.server_retry_seconds)
        return [
            ldap3.Server(url, use_ssl=url.startswith("ldaps://"), tls=tls, connect_timeout=self.connect_timeout, get_info=ldap3.NONE)
            for url in urls
        ]

    def _connect(self, user: str | None, password: str | None) -> ldap3.Connection:
        """Open and bind a connection, failing over across servers. Runs in a worker thread.

        Raises:
            ldap_errors.LDAPBindError: the server refused the credentials (no failover).
            DirectoryError: no server could be reached.
        """
        errors = []
        for server in self._servers():
            conn = ldap3.Connection(
                server,
                user=user,
                password=password,
                receive_timeout=math.ceil(self.receive_timeout),  # ldap3 packs it as an int
                raise_exceptions=True,
                auto_referrals=False,
                read_only=True,
            )
            try:
                conn.open()
                if self.use_starttls and not server.ssl:
                    conn.start_tls()
                conn.bind()
                return conn
            except ldap_errors.LDAPInvalidCredentialsResult as e:
                conn.unbind()
                raise ldap_errors.LDAPBindError(str(e)) from e
            except (ldap_errors.LDAPCommunicationError, ldap_errors.LDAPSocketOpenError, ldap_errors.LDAPStartTLSError,
                    ldap_errors.LDAPSocketReceiveError, ldap_errors.LDAPSessionTerminatedByServerError, ssl.SSLError, OSError) as e:
                self._failed_at[server.name] = time.monotonic()
                errors.append(f"{server.name}: {e}")
                self.log.warning("LDAP server %s failed: %s", server.name, e)
                try:
                    conn.unbind()
                except Exception:
                    pass
        raise DirectoryError("no LDAP server reachable: " + "; ".join(errors))

    def _search(self, conn: ldap3.Connection, base: str, flt: str, attrs: list[str], scope=ldap3.SUBTREE) -> list[_Entry]:
        conn.search(base, flt, search_scope=scope, attributes=attrs, time_limit=math.ceil(self.receive_timeout))
        return [
            _Entry(e["dn"], {k: (v if isinstance(v, list) else [v]) for k, v in e["attributes"].items()})
            for e in conn.response
            if e.get("type") == "searchResEntry"
        ]

    def _with_lookup(self, fn):
        """Run ``fn(conn)`` on a pooled service-account connection, reconnecting once if it broke.

        Connections are kept and reused (at most ``lookup_pool_size`` of them); ldap3's
        synchronous connections are not thread-safe, so each is used by one thread at a time.
        """
        with self._lookup_slots:
            try:
                conn = self._lookup_pool.get_nowait()
            except queue.Empty:
                conn = None
            for attempt in (1, 2):
                if conn is None:
                    try:
                        conn = self._connect(self.lookup_bind_dn, self.lookup_bind_password)
                    except ldap_errors.LDAPBindError as e:
                        raise DirectoryError(f"service account {self.lookup_bind_dn} could not bind: {e}") from e
                try:
                    result = fn(conn)
                    self._lookup_pool.put(conn)
                    return result
                except (ldap_errors.LDAPCommunicationError, ldap_errors.LDAPSessionTerminatedByServerError,
                        ldap_errors.LDAPSocketReceiveError, ldap_errors.LDAPSocketOpenError, OSError) as e:
                    self.log.warning("LDAP service connection broke (%s); reconnecting", e)
                    try:
                        conn.unbind()
                    except Exception:
                        pass
                    conn = None
                    if attempt == 2:
                        raise DirectoryError(f"LDAP lookup failed: {e}") from e
                except BaseException:
                    self._lookup_pool.put(conn)
                    raise

    async def _run(self, fn, *args):
        """Run a blocking directory call in the pool, with an overall deadline."""
        budget = self.connect_timeout * max(1, len(self.server_urls)) * 2 + self.receive_timeout * 3
        loop = asyncio.get_running_loop()
        try:
            return await asyncio.wait_for(loop.run_in_executor(self._executor, fn, *args), budget)
        except asyncio.TimeoutError as e:
            raise DirectoryError(f"LDAP did not answer within {budget:.0f}s") from e

    # -- directory reads (worker threads) ------------------------------------------------------
    def _user_attrs(self) -> list[str]:
        return [self.username_attribute, self.uid_number_attribute, self.gid_number_attribute, self.home_attribute]

    def _find_user(self, conn: ldap3.Connection, username: str) -> _Entry | None:
        flt = self.user_search_filter.format(username=escape_filter_chars(username))
        entries = self._search(conn, self.user_search_base, flt, self._user_attrs())
        if len(entries) > 1:
            self.log.error("LDAP: %d entries match user %r; refusing an ambiguous login", len(entries), username)
            return None
        return entries[0] if entries else None

    def _read_groups(self, conn: ldap3.Connection, username: str, dn: str) -> list[_Entry]:
        attrs = self._group_attrs()
        if self.project_membership == "memberUid":
            value = escape_filter_chars(username)
        else:
            value = escape_filter_chars(dn)
        found: dict[str, _Entry] = {}
        frontier = [value]
        for _ in range(self.nested_groups_depth if self.nested_groups else 1):
            members = "".join(f"({self.project_membership}={v})" for v in frontier)
            flt = f"(&{self.project_search_filter}(|{members}))"
            new = [g for g in self._search(conn, self.project_search_base, flt, attrs) if g.dn not in found]
            if not new:
                break
            found.update((g.dn, g) for g in new)
            frontier = [escape_filter_chars(g.dn) for g in new]
        return list(found.values())

    def _group_attrs(self) -> list[str]:
        return [self.project_name_attribute, self.gid_number_attribute, self.project_description_attribute]

    def _project(self, group: _Entry) -> Project | None:
        """The project a group stands for; None for admin groups and names that cannot be projects."""
        name = str(group.first(self.project_name_attribute) or "")
        if name in self.admin_groups:
            return None
        if not PROJECT_NAME_RE.match(name):
            self.log.warning("LDAP group %r is not a valid project name; ignored", name)
            return None
        gid = group.first(self.gid_number_attribute)
        return Project(name=name, gid=int(gid) if gid is not None else None,
                       description=str(group.first(self.project_description_attribute) or ""))

    def _identity(self, conn: ldap3.Connection, username: str, entry: _Entry) -> Identity:
        groups = self._read_groups(conn, username, entry.dn)
        admin = any(str(g.first(self.project_name_attribute)) in self.admin_groups for g in groups)
        projects = [p for p in map(self._project, groups) if p is not None]
        uid, gid = entry.first(self.uid_number_attribute), entry.first(self.gid_number_attribute)
        return Identity(
            username=username,
            uid=int(uid) if uid is not None else None,
            gid=int(gid) if gid is not None else None,
            home=entry.first(self.home_attribute),
            projects=tuple(sorted(projects, key=lambda p: p.name)),
            admin=admin,
        )

    def _login(self, username: str, password: str) -> Identity | None:
        """Find and bind the user, then read their identity. Runs in a worker thread."""
        if self.lookup_bind_dn:
            entry = self._with_lookup(lambda c: self._find_user(c, username))
            if entry is None:
                self.log.warning("LDAP login %r: user not found", username)
                return None
            candidates = [entry.dn]
        else:
            candidates = [t.format(username=escape_rdn(username)) for t in self.bind_dn_templates]
        for dn in candidates:
            try:
                conn = self._connect(dn, password)
            except ldap_errors.LDAPBindError:
                continue
            try:
                if self.lookup_bind_dn:
                    return self._with_lookup(lambda c: self._identity(c, username, entry))
                # read the user's own entry (users may not be allowed to search the people tree)
                own = self._search(conn, dn, "(objectClass=*)", self._user_attrs(), scope=ldap3.BASE)
                return self._identity(conn, username, own[0] if own else _Entry(dn, {}))
            finally:
                conn.unbind()
        self.log.warning("LDAP login %r: bind failed (wrong password or no such DN)", username)
        return None

    def _lookup(self, username: str) -> Identity | None:
        """Re-read a user with the service account. Runs in a worker thread."""
        entry = self._with_lookup(lambda c: self._find_user(c, username))
        if entry is None:
            return None
        return self._with_lookup(lambda c: self._identity(c, username, entry))

    def _all_projects(self) -> list[Project]:
        groups = self._with_lookup(lambda c: self._search(c, self.project_search_base, self.project_search_filter, self._group_attrs()))
        return sorted((p for p in map(self._project, groups) if p is not None), key=lambda p: p.name)

    async def list_projects(self) -> list[Project]:
        """Every project in the directory (needs the service account). For the project controller.

        Raises:
            DirectoryError: LDAP unreachable, or no service account configured.
        """
        if not self.lookup_bind_dn:
            raise DirectoryError("listing projects needs a service account (lookup_bind_dn)")
        return await self._run(self._all_projects)

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
        if self.admin_groups:
            model["admin"] = identity.admin
        return model

    async def authenticate(self, handler, data: dict[str, Any]) -> dict[str, Any] | None:
        username = self.normalize_username(str(data.get("username", "")))
        password = str(data.get("password", ""))
        if not self._valid_credentials(username, password):
            return None
        try:
            identity = await self._run(self._login, username, password)
        except DirectoryError as e:
            self.log.error("LDAP login %r failed: directory unavailable: %s", username, e)
            return None
        except ldap_errors.LDAPException as e:
            self.log.error("LDAP login %r failed: %s: %s", username, type(e).__name__, e)
            return None
        except Exception:
            self.log.exception("LDAP login %r failed unexpectedly", username)
            return None
        if identity is None:
            return None
        self.log.info("LDAP login %r: projects %s%s", username, identity.project_names, " (admin)" if identity.admin else "")
        return self._auth_model(identity)

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
        if not self.lookup_bind_dn:
            return True
        try:
            identity = await self._run(self._lookup, user.name)
        except (DirectoryError, ldap_errors.LDAPException) as e:
            self.log.warning("LDAP refresh of %r skipped: %s", user.name, e)
            return True
        if identity is None:
            self.log.warning("LDAP refresh: %r no longer exists; they must log in again", user.name)
            return False
        return self._auth_model(identity)
