"""The directory (OpenLDAP, Active Directory): every read of LDAP that Labyard makes.

:class:`Directory` finds users, checks their passwords, reads the project groups of one user
and lists every project with its members. The authenticator (:mod:`labyard_hub.ldap`) is a thin
layer on it; the controller service uses it directly.

How it talks to LDAP, so that many logins against a distant directory neither wait for each
other nor freeze the event loop:

- ldap3 connections with ldap3's asynchronous strategy: a request is sent and its answer comes
  back on a receiver thread of that connection, so many operations are in flight on one
  connection at once. The caller awaits a future on its own event loop, woken by the receiver
  thread; encoding requests and post-processing answers run in a small thread pool.
- Two pools sized from the load: service-account connections (each carrying up to
  ``operations_per_connection`` operations at once; another is opened when all are that busy)
  and bind connections (a bind checks one password, so one bind at a time per connection; a
  connection is rebound for the next login instead of being reopened).
- Servers come from ldap3's ``ServerPool`` (FIRST, active): the first reachable server in
  ``server_urls`` order; a server that fails to connect or to answer is exhausted (skipped) for
  ``server_retry_seconds``, and the operation is retried once on a fresh connection.
- Every operation is bounded: ``connect_timeout`` to open, ``receive_timeout`` for each answer.
- Listings use the simple paged results control (RFC 2696), so they work past Active
  Directory's 1,000-entry limit; referrals are not followed unless ``follow_referrals``.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import logging
import math
import secrets
import ssl
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import ldap3
from ldap3.core import exceptions as ldap_errors
from ldap3.operation.bind import bind_operation
from ldap3.strategy.asynchronous import AsyncStrategy
from ldap3.utils.conv import escape_filter_chars
from ldap3.utils.dn import escape_rdn, parse_dn
from traitlets import Bool, Enum, Float, Integer, List, Unicode, default, validate
from traitlets.config import LoggingConfigurable

from .projects import Identity, Project, project_slug, refuse_collisions

PAGED_RESULTS = "1.2.840.113556.1.4.319"
_SUCCESS, _SIZE_LIMIT, _REFERRAL, _NO_SUCH_OBJECT, _INVALID_CREDENTIALS = 0, 4, 10, 32, 49

# A whole cycle of ServerPool finding no active server must fail at once, not after ldap3's
# default 10 s pause: the caller decides what to do (a login fails fast with a clear message).
ldap3.set_config_parameter("POOLING_LOOP_TIMEOUT", 0)


class DirectoryError(Exception):
    """The directory could not answer (no server reachable, timeout, bad service credentials)."""


class _Broken(Exception):
    """A connection failed (closed, reset, no answer in time): retry on a fresh one."""


class _BadCredentials(Exception):
    pass


@dataclass
class Entry:
    """One directory entry: its DN and attributes (names in lower case, values always lists)."""

    dn: str
    attrs: dict[str, list[Any]] = field(default_factory=dict)

    def first(self, name: str) -> Any:
        values = self.attrs.get(name.lower()) or []
        return values[0] if values else None

    def values(self, name: str) -> list[Any]:
        return self.attrs.get(name.lower()) or []


@dataclass
class Memberships:
    """Every project with its members among the usernames asked about (for the group sync)."""

    projects: dict[str, Project]
    members: dict[str, set[str]]


def normalize_dn(dn: str) -> str:
    """A DN in a form to compare: attribute types and values in lower case, no stray spaces."""
    try:
        return ",".join(f"{attr.lower()}={value.lower()}" for attr, value, _ in parse_dn(dn, escape=True))
    except ldap_errors.LDAPInvalidDnError:
        return dn.lower()


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class _Strategy(AsyncStrategy):
    """ldap3's asynchronous strategy, plus: answers wake asyncio futures, and waits are bounded.

    The receiver thread of the connection calls :meth:`set_event_for_message` when an answer is
    complete; a future registered with :meth:`answered` is then resolved on its loop. When the
    connection closes, every pending future fails, so nobody waits for an answer that cannot come.
    """

    def __init__(self, connection, timeout: float):
        super().__init__(connection)
        self.timeout = timeout
        self._waiters: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future]] = {}

    def _open_socket(self, address, use_ssl=False, unix_socket=False):
        super()._open_socket(address, use_ssl, unix_socket)
        # connect (and an LDAPS handshake) was bounded by connect_timeout; from now on the
        # receiver thread blocks in recv() and every wait is bounded on the asyncio side
        self.connection.socket.settimeout(None)

    def get_response(self, message_id, timeout=None, get_request=False):
        # ldap3 waits RESPONSE_WAITING_TIMEOUT (20 s) by default (StartTLS, bind at open)
        return super().get_response(message_id, self.timeout if timeout is None else timeout, get_request)

    def set_event_for_message(self, message_id):
        super().set_event_for_message(message_id)
        with self.event_lock:
            waiter = self._waiters.pop(message_id, None)
        if waiter:
            _wake(*waiter)

    def close(self):
        try:
            super().close()
        finally:
            with self.event_lock:
                waiters, self._waiters = list(self._waiters.values()), {}
            for loop, future in waiters:
                _wake(loop, future, _Broken("connection closed"))

    def answered(self, message_id: int) -> asyncio.Future:
        """A future resolved when the answer to ``message_id`` is complete."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self.event_lock:
            event = self._events.get(message_id)
            if event is not None and event.is_set():
                future.set_result(None)
            elif not self.connection.listening:
                future.set_exception(_Broken("connection closed"))
            else:
                self._waiters[message_id] = (loop, future)
        return future

    def forget(self, message_id: int) -> None:
        """Drop what is kept for an operation whose caller gave up."""
        with self.event_lock:
            self._waiters.pop(message_id, None)
            self._events.pop(message_id, None)
        with self.async_lock:
            if self._responses is not None:
                self._responses.pop(message_id, None)
        if self._outstanding:
            self._outstanding.pop(message_id, None)


def _wake(loop: asyncio.AbstractEventLoop, future: asyncio.Future, error: Exception | None = None) -> None:
    def resolve():
        if not future.done():
            future.set_exception(error) if error else future.set_result(None)

    try:
        loop.call_soon_threadsafe(resolve)
    except RuntimeError:  # the loop is closed: nobody is waiting any more
        pass


class _Connection:
    """One pooled ldap3 connection and how busy it is."""

    def __init__(self, ldap: ldap3.Connection):
        self.ldap = ldap
        self.in_flight = 0
        self.exclusive = False
        self.last_used = time.monotonic()

    @property
    def strategy(self) -> _Strategy:
        return self.ldap.strategy

    @property
    def broken(self) -> bool:
        receiver = self.strategy.receiver
        return self.ldap.closed or not self.ldap.listening or receiver is None or not receiver.is_alive()


class _Pool:
    """Connections opened with one set of credentials, shared by concurrent operations.

    Args:
        per_connection: operations a connection carries at once (1 for bind connections).
        max_size: connections at most; callers wait for a free slot beyond that.
    """

    def __init__(self, directory: Directory, user: str | None, password: str | None, per_connection: int, max_size: int):
        self.directory = directory
        self.user, self.password = user, password
        self.per_connection = max(1, per_connection)
        self.max_size = max(1, max_size)
        self.connections: list[_Connection] = []
        self.opening = 0
        self._changed: asyncio.Event | None = None

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()

    async def acquire(self, exclusive: bool = False) -> _Connection:
        """A connection with room for one more operation (all of it, if ``exclusive``)."""
        while True:
            self._prune()
            usable = [c for c in self.connections if not c.exclusive and not c.broken]
            if exclusive:
                usable = [c for c in usable if c.in_flight == 0]
            room = [c for c in usable if c.in_flight < self.per_connection]
            best = min(room, key=lambda c: c.in_flight, default=None)
            if best is not None:
                best.in_flight += 1
                best.exclusive = exclusive
                return best
            # open another connection, unless one is being opened that will have room for us
            can_open = len(self.connections) + self.opening < self.max_size
            if can_open and (self.per_connection == 1 or self.opening == 0):
                self.opening += 1
                try:
                    conn = await self.directory._open(self.user, self.password)
                finally:
                    self.opening -= 1
                    self._notify()
                conn.in_flight, conn.exclusive = 1, exclusive
                self.connections.append(conn)
                return conn
            if self._changed is None:
                self._changed = asyncio.Event()
            self._changed.clear()
            await self._changed.wait()

    def release(self, conn: _Connection, broken: bool = False) -> None:
        conn.in_flight -= 1
        conn.exclusive = False
        conn.last_used = time.monotonic()
        if broken and conn in self.connections:
            self.connections.remove(conn)
            self.directory._close_later(conn)
        self._notify()

    def _prune(self) -> None:
        """Forget broken connections; close those idle for longer than connection_idle_seconds."""
        now = time.monotonic()
        for conn in list(self.connections):
            idle = conn.in_flight == 0 and now - conn.last_used > self.directory.connection_idle_seconds
            if conn.in_flight == 0 and (conn.broken or idle):
                self.connections.remove(conn)
                self.directory._close_later(conn)

    def close_all(self) -> list[_Connection]:
        conns, self.connections = self.connections, []
        return conns


class Directory(LoggingConfigurable):
    """An LDAP or Active Directory server (or several, for failover) and where users and projects are.

    Two ways to find a user's DN:

    - search-then-bind (recommended): set ``lookup_bind_dn`` / ``lookup_bind_password`` for a
      read-only service account, ``user_search_base`` and ``user_search_filter``.
    - direct bind: set ``bind_dn_templates``; without a service account, attributes and groups
      are read with the user's own connection, and nothing can be re-read later (no refresh, no
      group sync).

    Configure it as ``c.Directory.<name>`` in a JupyterHub config, or under ``ldap:`` in
    Labyard's settings file.
    """

    # -- servers and transport ------------------------------------------------------------------
    server_urls = List(
        Unicode(),
        minlen=1,
        help="""LDAP servers in order of preference: the first one that answers is used; one
        that fails is skipped for ``server_retry_seconds`` (ldap3 ServerPool, FIRST, active).
        Example::

            c.Directory.server_urls = ["ldaps://ldap1.example.org", "ldaps://ldap2.example.org"]
        """,
    ).tag(config=True)
    use_starttls = Bool(False, help="Upgrade ``ldap://`` connections with StartTLS.").tag(config=True)
    ca_file = Unicode("", help="CA bundle (PEM) to verify the servers' certificates; empty: the system store.").tag(config=True)
    tls_verify = Bool(True, help="Verify server certificates (LDAPS and StartTLS). Turn off only for tests.").tag(config=True)
    connect_timeout = Float(3.0, help="Seconds to open a connection to one server before trying the next.").tag(config=True)
    receive_timeout = Float(10.0, help="Seconds to wait for any one LDAP answer; a server that does not answer in time "
                                       "is skipped like one that is down.").tag(config=True)
    server_retry_seconds = Float(30.0, help="How long a server that failed is skipped (with several server_urls).").tag(config=True)
    follow_referrals = Bool(
        False,
        help="""Follow LDAP referrals (result code 10) to the servers they name, with the same
        credentials. Off by default: Active Directory refers searches to other domains' servers,
        which may be slow or unreachable from the hub; with it off, a referred search fails with
        a message naming the referral. Continuation references inside search results are never
        followed.""",
    ).tag(config=True)
    page_size = Integer(500, help="Entries per page of listings (simple paged results; Active Directory answers "
                                  "at most 1,000 per page).").tag(config=True)
    operations_per_connection = Integer(32, help="LDAP operations in flight at once on one service-account connection "
                                                 "before another connection is opened.").tag(config=True)
    max_service_connections = Integer(4, help="Service-account connections at most.").tag(config=True)
    max_bind_connections = Integer(
        32,
        help="""Connections that check passwords (a bind per login, one at a time per connection,
        reused by the next login): at most this many logins talk to LDAP at once.""",
    ).tag(config=True)
    connection_idle_seconds = Float(
        300, help="Pooled connections unused for this long are closed (servers drop idle connections too)."
    ).tag(config=True)

    # -- finding the user ----------------------------------------------------------------------
    lookup_bind_dn = Unicode("", help="DN of a read-only service account used to find users and groups.").tag(config=True)
    lookup_bind_password = Unicode("", help="Password of ``lookup_bind_dn``.").tag(config=True)
    user_search_base = Unicode("", help="Base DN under which users are searched, e.g. ``ou=people,dc=example,dc=org``.").tag(config=True)
    user_search_filter = Unicode(
        "(&(objectClass=posixAccount)(uid={username}))",
        help="""Filter to find a user; ``{username}`` is replaced by the escaped username (RFC 4515).
        Active Directory: ``(&(objectClass=user)(sAMAccountName={username}))``. Users without
        ``uidNumber`` need a filter that does not ask for ``posixAccount``.""",
    ).tag(config=True)
    bind_dn_templates = List(
        Unicode(),
        help="""Direct bind: DN templates tried in order, ``{username}`` replaced by the
        escaped username (RFC 4514). Used when no ``lookup_bind_dn`` is set. Example::

            c.Directory.bind_dn_templates = ["uid={username},ou=people,dc=example,dc=org"]
        """,
    ).tag(config=True)
    username_attribute = Unicode(
        "uid", help="Attribute holding the login name (Active Directory: ``sAMAccountName``); maps group members to hub users."
    ).tag(config=True)
    uid_number_attribute = Unicode(
        "uidNumber", help="User attribute with the numeric uid that servers and runs run as (Kubernetes, and local mode as root)."
    ).tag(config=True)
    gid_number_attribute = Unicode(
        "gidNumber", help="Attribute with the numeric gid, of users (primary group) and of project groups."
    ).tag(config=True)
    home_attribute = Unicode("homeDirectory", help="User attribute with the home directory (kept in auth_state).").tag(config=True)

    # -- projects ------------------------------------------------------------------------------
    project_search_base = Unicode("", help="Base DN of the groups that are projects, e.g. ``ou=projects,dc=example,dc=org``.").tag(config=True)
    project_search_filter = Unicode(
        "(objectClass=posixGroup)",
        help="Filter selecting project groups (only these are read at login, however many other groups a user is in).",
    ).tag(config=True)
    project_membership = Enum(
        ["memberUid", "member"],
        "memberUid",
        help="""How groups list members: ``memberUid`` (posixGroup, the username) or ``member``
        (groupOfNames / Active Directory, the user's DN).""",
    ).tag(config=True)
    nested_groups = Bool(
        False,
        help="""With ``project_membership = "member"``: a user in project group A that is a
        member of project group B is also in B (up to ``nested_groups_depth`` levels).""",
    ).tag(config=True)
    nested_groups_depth = Integer(5, help="How many levels of nested groups are followed.").tag(config=True)
    project_name_attribute = Unicode(
        "cn",
        help="""Group attribute whose value is the project's name. Any name works: one that is
        not a valid server name (capitals, spaces, ``_``, non-ASCII, over 30 characters) gets a stable
        slug for server, directory and namespace names (``Data Science`` ->
        ``data-science-f25168f3``) and keeps its own name for display.""",
    ).tag(config=True)
    project_description_attribute = Unicode("description", help="Group attribute shown as the project's description.").tag(config=True)
    admin_groups = List(
        Unicode(),
        help="Names of groups (found like projects; compared without case) whose members are hub admins. They are not projects themselves.",
    ).tag(config=True)

    @validate("server_urls")
    def _check_urls(self, proposal):
        for url in proposal.value:
            if not urlparse(url).hostname or not url.startswith(("ldap://", "ldaps://")) or urlparse(url).path not in ("", "/"):
                raise ValueError(f"LDAP server URL {url!r} must look like ldap://host[:port] or ldaps://host[:port]")
        return proposal.value

    @default("log")
    def _log_default(self):
        if isinstance(self.parent, LoggingConfigurable):
            return self.parent.log
        return logging.getLogger("labyard.directory")

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._cpu = ThreadPoolExecutor(4, thread_name_prefix="ldap")
        self._io = ThreadPoolExecutor(self.max_service_connections + self.max_bind_connections, thread_name_prefix="ldap-open")
        self._server_pool = self._make_server_pool()
        self._service = _Pool(self, self.lookup_bind_dn or None, self.lookup_bind_password or None,
                              self.operations_per_connection, self.max_service_connections)
        self._binds = _Pool(self, None, None, 1, self.max_bind_connections)
        # unknown users are bound as this DN, which exists nowhere: they cost what a wrong password costs
        self._absent_dn = f"cn=labyard-absent-{secrets.token_hex(8)},{self.user_search_base or 'dc=invalid'}"
        for url in self.server_urls:
            parsed = urlparse(url)
            if parsed.scheme == "ldap" and not self.use_starttls and not _is_loopback(parsed.hostname or ""):
                self.log.warning("LDAP server %s is reached without TLS: passwords cross the network in clear. "
                                 "Use ldaps:// or set use_starttls.", url)

    # -- connections ---------------------------------------------------------------------------
    def _make_server_pool(self) -> ldap3.ServerPool:
        if self.tls_verify:
            tls = ldap3.Tls(validate=ssl.CERT_REQUIRED, ca_certs_file=self.ca_file or None)
        else:
            tls = ldap3.Tls(validate=ssl.CERT_NONE)
        servers = [
            ldap3.Server(url, use_ssl=url.startswith("ldaps://"), tls=tls, connect_timeout=self.connect_timeout,
                         get_info=ldap3.NONE)
            for url in self.server_urls
        ]
        # with one server, never exhaust it: it is tried again at once when it comes back
        exhaust = self.server_retry_seconds if len(servers) > 1 else False
        return ldap3.ServerPool(servers, ldap3.FIRST, active=1, exhaust=exhaust)

    def _mark_failed(self, server: ldap3.Server | None) -> None:
        """Make the server pool skip ``server`` for server_retry_seconds (it did not answer)."""
        state = self._server_pool._pool_state
        if state is None or len(self.server_urls) < 2:
            return
        for s in state.server_states:
            if s.server is server:
                s.available = False
                s.last_checked_time = datetime.datetime.now()

    def _server_stopped_answering(self, server: ldap3.Server) -> None:
        """A server did not answer in time: skip it, and move everything off it at once.

        Its other pooled connections are closed, so operations waiting on them fail now and are
        retried on the next server, instead of each waiting for its own timeout. (With a single
        server there is nowhere to move to: nothing is closed.)
        """
        if len(self.server_urls) < 2:
            return
        self._mark_failed(server)
        for pool in (self._service, self._binds):
            for conn in [c for c in pool.connections if c.ldap.server is server]:
                pool.connections.remove(conn)
                self._close_later(conn)

    def _open_blocking(self, user: str | None, password: str | None) -> ldap3.Connection:
        """Open (and bind, with credentials) a connection to the first server that works. In a thread.

        Raises:
            _BadCredentials: the server refused the credentials.
            DirectoryError: no server could be reached.
        """
        errors = []
        for _ in self.server_urls:
            conn = ldap3.Connection(
                self._server_pool, user=user, password=password, client_strategy=ldap3.ASYNC,
                raise_exceptions=False, auto_referrals=self.follow_referrals, read_only=True, receive_timeout=None,
            )
            strategy = _Strategy(conn, self.receive_timeout)
            conn.strategy = strategy
            conn.send, conn.open, conn.get_response = strategy.send, strategy.open, strategy.get_response
            conn.post_send_single_response, conn.post_send_search = strategy.post_send_single_response, strategy.post_send_search
            server = None
            try:
                conn.open(read_server_info=False)
                server = conn.server
                if self.use_starttls and not server.ssl and not conn.start_tls(read_server_info=False):
                    raise ldap_errors.LDAPStartTLSError(f"StartTLS failed: {conn.last_error or 'no answer'}")
                if user and not conn.bind():
                    code, text = conn.result.get("result"), conn.result.get("description")
                    if code == _INVALID_CREDENTIALS:
                        raise _BadCredentials(text)
                    raise ldap_errors.LDAPCommunicationError(f"bind failed: {text} {conn.result.get('message', '')}".strip())
                return conn
            except ldap_errors.LDAPServerPoolExhaustedError:
                self._discard(conn)
                # every server failed lately: look at all of them again next time
                self._server_pool._pool_state.refresh()
                errors.append(f"none of {', '.join(self.server_urls)} accepted a connection within {self.connect_timeout:g}s")
                break
            except _BadCredentials:
                self._discard(conn)
                raise
            except (ldap_errors.LDAPExceptionError, ssl.SSLError, OSError) as e:
                self._discard(conn)
                name = server.name if server else "server pool"
                errors.append(f"{name}: {e}")
                self.log.warning("LDAP server %s failed: %s", name, e)
                self._mark_failed(server)
        raise DirectoryError("no LDAP server reachable" + (": " + "; ".join(errors) if errors else ""))

    def _discard(self, conn: ldap3.Connection) -> None:
        try:
            conn.unbind()
        except Exception:
            pass
        self._server_pool.pool_states.pop(conn, None)

    async def _open(self, user: str | None, password: str | None) -> _Connection:
        loop = asyncio.get_running_loop()
        budget = (self.connect_timeout + 2 * self.receive_timeout) * len(self.server_urls) + 1
        try:
            ldap = await asyncio.wait_for(loop.run_in_executor(self._io, self._open_blocking, user, password), budget)
        except asyncio.TimeoutError as e:
            raise DirectoryError(f"LDAP did not answer within {budget:.0f}s") from e
        except _BadCredentials as e:
            raise DirectoryError(f"service account {user} could not bind: {e}") from e
        return _Connection(ldap)

    def _close_later(self, conn: _Connection) -> None:
        try:
            self._io.submit(self._discard, conn.ldap)
        except RuntimeError:  # executor shut down
            pass

    async def _exchange(self, conn: _Connection, send: Callable[[ldap3.Connection], int]) -> tuple[list, dict]:
        """Send one request on ``conn`` and await its complete answer (response entries, result)."""
        loop = asyncio.get_running_loop()
        try:
            message_id = await loop.run_in_executor(self._cpu, send, conn.ldap)
        except (ldap_errors.LDAPCommunicationError, ldap_errors.LDAPSocketOpenError, OSError) as e:
            raise _Broken(str(e)) from e
        try:
            await asyncio.wait_for(conn.strategy.answered(message_id), self.receive_timeout)
        except asyncio.TimeoutError as e:
            conn.strategy.forget(message_id)
            raise _Broken(f"no answer within {self.receive_timeout:g}s") from e
        except BaseException:
            conn.strategy.forget(message_id)
            raise
        try:
            return await loop.run_in_executor(self._cpu, conn.ldap.get_response, message_id)
        except (ldap_errors.LDAPCommunicationError, ldap_errors.LDAPResponseTimeoutError, OSError) as e:
            raise _Broken(str(e)) from e

    async def _request(self, pool: _Pool, send: Callable[[ldap3.Connection], int], what: str,
                       exclusive: bool = False) -> tuple[list, dict]:
        """One operation on a pooled connection; once more on a fresh one if the connection broke."""
        for attempt in (1, 2):
            conn = await pool.acquire(exclusive)
            broken = False
            try:
                return await self._exchange(conn, send)
            except _Broken as e:
                broken = True
                if "no answer" in str(e):
                    self._server_stopped_answering(conn.ldap.server)
                self.log.warning("LDAP %s on %s failed (%s)%s", what, conn.ldap.server.name, e,
                                 "; retrying on a new connection" if attempt == 1 else "")
                if attempt == 2:
                    raise DirectoryError(f"LDAP {what} failed: {e}") from e
            finally:
                pool.release(conn, broken)
        raise AssertionError("unreachable")

    # -- searches --------------------------------------------------------------------------------
    async def _search(self, base: str, flt: str, attrs: list[str], scope=ldap3.SUBTREE, paged: bool = False,
                      conn: _Connection | None = None) -> list[Entry]:
        """Search with the service account (or on ``conn``, a bind connection bound as the user).

        ``paged``: a listing, read page by page on one connection that carries nothing else
        (servers keep one paged search per connection). Otherwise one request; if the server
        says its size limit is exceeded, the search is repeated paged.
        """
        entries: list[Entry] = []
        cookie = None
        time_limit = math.ceil(self.receive_timeout)
        held = None
        if paged and conn is None:
            held = await self._service.acquire(exclusive=True)
        try:
            while True:
                def send(c: ldap3.Connection, cookie=cookie) -> int:
                    return c.search(base, flt, search_scope=scope, attributes=attrs, time_limit=time_limit,
                                    paged_size=self.page_size if paged else None, paged_cookie=cookie)

                if held or conn:
                    try:
                        response, result = await self._exchange(held or conn, send)
                    except _Broken as e:
                        if held:
                            self._service.release(held, broken=True)
                            held = None
                        raise DirectoryError(f"LDAP search under {base!r} failed: {e}") from e
                else:
                    response, result = await self._request(self._service, send, f"search under {base!r}")
                code = result.get("result")
                if code == _SIZE_LIMIT and not paged:
                    return await self._search(base, flt, attrs, scope, paged=True, conn=conn)
                if code == _REFERRAL:
                    raise DirectoryError(f"LDAP search under {base!r} was referred to {result.get('referrals')}; "
                                         "set follow_referrals to follow it")
                if code == _NO_SUCH_OBJECT and not paged:
                    self.log.warning("LDAP search base %r does not exist", base)
                    return []
                if code != _SUCCESS:
                    raise DirectoryError(f"LDAP search under {base!r} failed: {result.get('description')} "
                                         f"{result.get('message') or ''}".strip())
                entries += [
                    Entry(e["dn"], {k.lower(): (v if isinstance(v, list) else [v]) for k, v in e["attributes"].items()})
                    for e in response if e.get("type") == "searchResEntry"
                ]
                cookie = (result.get("controls") or {}).get(PAGED_RESULTS, {}).get("value", {}).get("cookie")
                if not paged or not cookie:
                    return entries
        finally:
            if held:
                self._service.release(held)

    def _user_attrs(self) -> list[str]:
        return [self.username_attribute, self.uid_number_attribute, self.gid_number_attribute, self.home_attribute]

    def _group_attrs(self, members: bool = False) -> list[str]:
        attrs = [self.project_name_attribute, self.gid_number_attribute, self.project_description_attribute]
        return attrs + [self.project_membership] if members else attrs

    def _user_filter(self, username: str) -> str:
        return self.user_search_filter.format(username=escape_filter_chars(username))

    async def find_user(self, username: str) -> Entry | None:
        """The user's entry (service account), or None if there is none or more than one."""
        entries = await self._search(self.user_search_base, self._user_filter(username), self._user_attrs())
        if len(entries) > 1:
            self.log.error("LDAP: %d entries match user %r; refusing an ambiguous login", len(entries), username)
            return None
        return entries[0] if entries else None

    # -- passwords -----------------------------------------------------------------------------
    async def _bind(self, conn: _Connection, dn: str, password: str) -> bool:
        def send(c: ldap3.Connection) -> int:
            request = bind_operation(c.version, ldap3.SIMPLE, dn, password, auto_encode=c.auto_encode)
            with c.connection_lock:
                return c.post_send_single_response(c.send("bindRequest", request, None))

        _, result = await self._exchange(conn, send)
        code = result.get("result")
        if code == _SUCCESS:
            return True
        if code not in (_INVALID_CREDENTIALS, _NO_SUCH_OBJECT):
            self.log.warning("LDAP bind as %r: %s %s", dn, result.get("description"), result.get("message") or "")
        return False

    async def _with_bind(self, dn: str, password: str, then=None):
        """Bind a pooled bind connection as ``dn``; on success return ``then(conn)`` (or True)."""
        for attempt in (1, 2):
            conn = await self._binds.acquire()
            broken = False
            try:
                if not await self._bind(conn, dn, password):
                    return None
                return await then(conn) if then else True
            except _Broken as e:
                broken = True
                if "no answer" in str(e):
                    self._server_stopped_answering(conn.ldap.server)
                if attempt == 2:
                    raise DirectoryError(f"LDAP bind failed: {e}") from e
                self.log.warning("LDAP bind on %s failed (%s); retrying on a new connection", conn.ldap.server.name, e)
            finally:
                self._binds.release(conn, broken)
        raise AssertionError("unreachable")

    async def login(self, username: str, password: str) -> Identity | None:
        """Check ``username``'s password and read their identity; None if refused.

        A name that does not exist costs the same round trips as a wrong password (a bind as
        a DN that exists nowhere), so timing does not tell which names exist.

        Raises:
            DirectoryError: LDAP could not answer.
        """
        if self.lookup_bind_dn:
            entry = await self.find_user(username)
            ok = await self._with_bind(entry.dn if entry else self._absent_dn, password)
            if not ok or entry is None:
                self.log.warning("LDAP login %r: %s", username, "bind failed (wrong password)" if entry else "user not found")
                return None
            return await self.identity(username, entry)

        async def read_own(conn: _Connection) -> Identity:
            own = await self._search(dn, "(objectClass=*)", self._user_attrs(), scope=ldap3.BASE, conn=conn)
            return await self.identity(username, own[0] if own else Entry(dn), conn)

        for template in self.bind_dn_templates:
            dn = template.format(username=escape_rdn(username))
            identity = await self._with_bind(dn, password, read_own)
            if identity is not None:
                return identity
        self.log.warning("LDAP login %r: bind failed (wrong password or no such DN)", username)
        return None

    # -- groups and projects ---------------------------------------------------------------------
    def _is_admin_group(self, group: Entry) -> bool:
        name = str(group.first(self.project_name_attribute) or "")
        return name.casefold() in {g.casefold() for g in self.admin_groups}

    def _project(self, group: Entry) -> Project | None:
        """The project a group stands for (None for admin groups and groups without a name)."""
        name = str(group.first(self.project_name_attribute) or "").strip()
        if not name or self._is_admin_group(group):
            return None
        gid = group.first(self.gid_number_attribute)
        try:
            gid = int(gid) if gid is not None else None
        except ValueError:
            self.log.warning("LDAP group %r: %s %r is not a number; the project has no gid", group.dn, self.gid_number_attribute, gid)
            gid = None
        slug = project_slug(name)
        return Project(name=slug, gid=gid, description=str(group.first(self.project_description_attribute) or ""),
                       display_name="" if slug == name else name)

    async def _user_groups(self, username: str, dn: str, conn: _Connection | None = None) -> list[Entry]:
        """The project (and admin) groups the user is in, nested ones included if configured."""
        attrs = self._group_attrs()
        value = escape_filter_chars(username if self.project_membership == "memberUid" else dn)
        found: dict[str, Entry] = {}
        frontier = [value]
        for _ in range(self.nested_groups_depth if self.nested_groups and self.project_membership == "member" else 1):
            members = "".join(f"({self.project_membership}={v})" for v in frontier)
            flt = f"(&{self.project_search_filter}(|{members}))"
            new = [g for g in await self._search(self.project_search_base, flt, attrs, conn=conn) if g.dn not in found]
            if not new:
                break
            found.update((g.dn, g) for g in new)
            frontier = [escape_filter_chars(g.dn) for g in new]
        return list(found.values())

    async def _without_collisions(self, groups: list[Entry], conn: _Connection | None = None) -> list[Project]:
        """The user's projects, minus those whose slug another project group shares (both refused)."""
        mine = [(g.dn, p) for g in groups if (p := self._project(g)) is not None]
        if not mine:
            return []
        # groups with the same name, or named like one of these groups' slugs
        names = "".join(f"({self.project_name_attribute}={escape_filter_chars(v)})" for _, p in mine for v in {p.label, p.name})
        flt = f"(&{self.project_search_filter}(|{names}))"
        namesakes = await self._search(self.project_search_base, flt, [self.project_name_attribute], conn=conn)
        own = {dn for dn, _ in mine}
        others = [(g.dn, p) for g in namesakes if g.dn not in own and (p := self._project(g)) is not None]
        kept = refuse_collisions(mine + others, self.log)
        return sorted((p for dn, p in mine if dn in kept), key=lambda p: p.name)

    async def identity(self, username: str, entry: Entry, conn: _Connection | None = None) -> Identity:
        """The user's identity from their entry: numbers, home, project groups, admin."""
        groups = await self._user_groups(username, entry.dn, conn)
        projects = await self._without_collisions(groups, conn)

        def number(attr: str) -> int | None:
            value = entry.first(attr)
            try:
                return int(value) if value is not None else None
            except ValueError:
                return None

        return Identity(
            username=username,
            uid=number(self.uid_number_attribute),
            gid=number(self.gid_number_attribute),
            home=entry.first(self.home_attribute),
            projects=tuple(projects),
            admin=any(self._is_admin_group(g) for g in groups),
        )

    async def lookup(self, username: str) -> Identity | None:
        """Re-read a user with the service account (None: no such user any more)."""
        entry = await self.find_user(username)
        return None if entry is None else await self.identity(username, entry)

    def _need_service_account(self, what: str) -> None:
        if not self.lookup_bind_dn:
            raise DirectoryError(f"{what} needs a service account (lookup_bind_dn)")

    async def _project_groups(self, members: bool = False) -> tuple[list[Entry], dict[str, Project]]:
        """Every group under the project base (read page by page) and the projects among them by DN."""
        groups = await self._search(self.project_search_base, self.project_search_filter, self._group_attrs(members), paged=True)
        return groups, refuse_collisions([(g.dn, p) for g in groups if (p := self._project(g)) is not None], self.log)

    async def list_projects(self) -> list[Project]:
        """Every project in the directory, read page by page (the project controller).

        Raises:
            DirectoryError: LDAP unreachable, or no service account configured.
        """
        self._need_service_account("listing projects")
        _, projects = await self._project_groups()
        return sorted(projects.values(), key=lambda p: p.name)

    async def _user_dns(self, usernames: Iterable[str], chunk: int = 50) -> dict[str, str]:
        """Normalised DN -> username for the given users, found in a few bulk searches."""
        wanted = sorted(set(usernames))
        attr = [self.username_attribute]

        async def one(names: list[str]) -> list[Entry]:
            flt = "(|" + "".join(self._user_filter(n) for n in names) + ")"
            return await self._search(self.user_search_base, flt, attr)

        chunks = [wanted[i:i + chunk] for i in range(0, len(wanted), chunk)]
        results = await asyncio.gather(*(one(c) for c in chunks))
        found: dict[str, str] = {}
        names = set(wanted)
        for entry in (e for r in results for e in r):
            for value in entry.values(self.username_attribute):
                if str(value).lower() in names:
                    found[normalize_dn(entry.dn)] = str(value).lower()
        return found

    async def memberships(self, usernames: Iterable[str]) -> Memberships:
        """Every project with its members among ``usernames``, in a few bulk reads.

        All project groups with their members are read page by page; member DNs are mapped to
        usernames with bulk searches for those users (``member``), or taken as they are
        (``memberUid``); nested groups are resolved in memory, as at login.

        Raises:
            DirectoryError: LDAP unreachable, a listing failed, or no service account configured.
        """
        self._need_service_account("reading memberships")
        usernames = {u.lower() for u in usernames}
        groups, projects = await self._project_groups(members=True)
        attr = self.project_membership
        if attr == "memberUid":
            members = {p.name: {str(v).lower() for v in g.values(attr)} & usernames for g in groups if (p := projects.get(g.dn))}
            return Memberships({p.name: p for p in projects.values()}, members)
        dns = await self._user_dns(usernames)
        # nesting goes through every group found, as at login (admin and refused groups too)
        direct: dict[str, set[str]] = {}
        children: dict[str, set[str]] = {}
        known = {normalize_dn(g.dn) for g in groups}
        for g in groups:
            values = [normalize_dn(str(v)) for v in g.values(attr)]
            direct[normalize_dn(g.dn)] = {dns[v] for v in values if v in dns}
            children[normalize_dn(g.dn)] = {v for v in values if v in known}
        # a user is in group B if B lists them, or lists (up to depth levels down) a group listing them
        depth = self.nested_groups_depth if self.nested_groups else 1
        members = {}
        for dn, project in projects.items():
            seen = frontier = {normalize_dn(dn)}
            users = set(direct[normalize_dn(dn)])
            for _ in range(depth - 1):
                frontier = {c for f in frontier for c in children[f]} - seen
                if not frontier:
                    break
                seen = seen | frontier
                users |= {u for f in frontier for u in direct[f]}
            members[project.name] = users
        return Memberships({p.name: p for p in projects.values()}, members)

    async def close(self) -> None:
        """Close every pooled connection."""
        loop = asyncio.get_running_loop()
        conns = self._service.close_all() + self._binds.close_all()
        await asyncio.gather(*(loop.run_in_executor(self._io, self._discard, c.ldap) for c in conns))
