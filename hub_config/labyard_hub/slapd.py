"""An unprivileged OpenLDAP ``slapd`` with its config and data in one directory.

Used by ``labyard up --demo`` and by the tests: write a ``slapd.conf``, load LDIF with
``slapadd`` while the server is stopped, then run ``slapd`` on a loopback port.
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

SCHEMAS = ("core", "cosine", "nis", "inetorgperson")
SLAPD = os.environ.get("LABYARD_SLAPD", shutil.which("slapd") or "/usr/sbin/slapd")
SLAPADD = os.environ.get("LABYARD_SLAPADD", shutil.which("slapadd") or "/usr/sbin/slapadd")


def ssha(password: str) -> str:
    """An RFC 2307 ``{SSHA}`` hash of a password, as slapd stores it."""
    salt = secrets.token_bytes(8)
    return "{SSHA}" + base64.b64encode(hashlib.sha1(password.encode() + salt).digest() + salt).decode()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for_port(host: str, port: int, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {host}:{port}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s")


@dataclass
class TLSFiles:
    ca: Path
    cert: Path
    key: Path


def make_tls(directory: Path, hostname: str = "localhost") -> TLSFiles:
    """A self-signed CA and a server certificate for ``hostname`` and 127.0.0.1 (openssl CLI)."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca, key, csr, cert = (directory / n for n in ("ca.key", "ca.pem", "server.key", "server.csr", "server.pem"))
    ext = directory / "server.ext"
    ext.write_text(f"subjectAltName=DNS:{hostname},IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    run = lambda *a: subprocess.run(a, check=True, capture_output=True)  # noqa: E731
    run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "30", "-subj", "/CN=Labyard test CA",
        "-keyout", str(ca_key), "-out", str(ca))
    run("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={hostname}", "-keyout", str(key), "-out", str(csr))
    run("openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial",
        "-days", "30", "-extfile", str(ext), "-out", str(cert))
    for p in (ca_key, key):
        p.chmod(0o600)
    return TLSFiles(ca, cert, key)


@dataclass
class Slapd:
    """One slapd instance living in ``directory``.

    Args:
        directory: holds ``slapd.conf``, the database and the pid file.
        suffix: the base DN of the database.
        root_password: password of ``cn=admin,<suffix>`` (the rootdn: full write access).
        reader_dn: an entry allowed to read every entry (the hub's service account); logged-in
            users read their own entry and the groups under ``ou=projects``; nobody reads
            ``userPassword``.
        tls: serve ``ldaps://`` on ``ldaps_port`` and StartTLS on ``port`` with these files.
        size_limit: answer at most this many entries per search (per page when paged, any
            number of pages), as Active Directory does with 1,000.
        debug: slapd's ``-d`` level; ``stats`` writes every operation and its entry count to
            ``slapd.log``.
        listen: more addresses to serve plain LDAP on at ``port`` (besides 127.0.0.1).
    """

    directory: Path
    suffix: str = "dc=labyard,dc=test"
    root_password: str = field(default_factory=lambda: secrets.token_urlsafe(16))
    reader_dn: str | None = None
    port: int = field(default_factory=free_port)
    tls: TLSFiles | None = None
    ldaps_port: int | None = None
    size_limit: int | None = None
    debug: str = "0"
    listen: tuple[str, ...] = ()
    proc: subprocess.Popen | None = None

    @property
    def root_dn(self) -> str:
        return f"cn=admin,{self.suffix}"

    @property
    def url(self) -> str:
        return f"ldap://127.0.0.1:{self.port}"

    @property
    def ldaps_url(self) -> str:
        assert self.ldaps_port
        return f"ldaps://localhost:{self.ldaps_port}"

    @property
    def conf(self) -> Path:
        return self.directory / "slapd.conf"

    def write_config(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / "data").mkdir(exist_ok=True)
        lines = [f"include /etc/ldap/schema/{s}.schema" for s in SCHEMAS]
        lines += [
            f"pidfile {self.directory / 'slapd.pid'}",
            f"argsfile {self.directory / 'slapd.args'}",
            "modulepath /usr/lib/ldap",
            "moduleload back_mdb",
            "loglevel stats",
        ]
        if self.tls:
            lines += [
                f"TLSCACertificateFile {self.tls.ca}",
                f"TLSCertificateFile {self.tls.cert}",
                f"TLSCertificateKeyFile {self.tls.key}",
            ]
        reader = f'by dn.exact="{self.reader_dn}" read ' if self.reader_dn else ""
        lines += [
            "database mdb",
            "maxsize 104857600",
            f'suffix "{self.suffix}"',
            f'rootdn "{self.root_dn}"',
            f"rootpw {ssha(self.root_password)}",
            f"directory {self.directory / 'data'}",
            "index objectClass,uid,cn,memberUid,member eq",
            *([f"limits users size.soft={self.size_limit} size.hard={self.size_limit} size.prtotal=unlimited"]
              if self.size_limit else []),
            "access to attrs=userPassword by anonymous auth by self write by * none",
            f'access to dn.subtree="ou=projects,{self.suffix}" {reader}by users read by * none',
            f"access to * {reader}by self read by * none",
        ]
        self.conf.write_text("\n".join(lines) + "\n")

    def load(self, ldif: str) -> None:
        """Add entries with slapadd (the server must be stopped)."""
        if not self.conf.exists():
            self.write_config()
        subprocess.run([SLAPADD, "-f", str(self.conf), "-q"], input=ldif.encode(), check=True, capture_output=True)

    def command(self) -> list[str]:
        urls = " ".join([self.url] + [f"ldap://{host}:{self.port}" for host in self.listen])
        if self.tls:
            self.ldaps_port = self.ldaps_port or free_port()
            urls += f" ldaps://127.0.0.1:{self.ldaps_port}"
        return [SLAPD, "-d", self.debug, "-h", urls, "-f", str(self.conf)]

    def start(self, timeout: float = 10) -> None:
        if not self.conf.exists():
            self.write_config()
        log = open(self.directory / "slapd.log", "ab")
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=log, start_new_session=True)
        wait_for_port("127.0.0.1", self.port, timeout, self.proc)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


def directory_ldif(
    suffix: str,
    users: list[dict],
    groups: list[dict],
    style: str = "posixGroup",
    service: tuple[str, str] | None = None,
) -> str:
    """LDIF for a small directory: ``ou=people``, ``ou=projects`` and optional ``ou=services``.

    Args:
        users: dicts with ``uid``, ``uid_number``, ``gid_number``, ``password`` and optionally ``cn``.
        groups: dicts with ``name``, ``gid_number`` (posixGroup), ``members`` (usernames or
            group names, for nested groupOfNames) and optional ``description``.
        style: ``posixGroup`` (memberUid) or ``groupOfNames`` (member = DN).
        service: (cn, password) of a read-only service account under ``ou=services``.
    """
    dc = suffix.split(",")[0].split("=")[1]
    out = [f"dn: {suffix}\nobjectClass: top\nobjectClass: dcObject\nobjectClass: organization\no: Labyard\ndc: {dc}\n"]
    for ou in ("people", "projects", "services"):
        out.append(f"dn: ou={ou},{suffix}\nobjectClass: organizationalUnit\nou: {ou}\n")
    if service:
        out.append(
            f"dn: cn={service[0]},ou=services,{suffix}\nobjectClass: applicationProcess\nobjectClass: simpleSecurityObject\n"
            f"cn: {service[0]}\nuserPassword: {ssha(service[1])}\n"
        )
    for u in users:
        out.append(
            f"dn: uid={u['uid']},ou=people,{suffix}\nobjectClass: inetOrgPerson\nobjectClass: posixAccount\n"
            f"uid: {u['uid']}\ncn: {u.get('cn', u['uid'])}\nsn: {u.get('cn', u['uid'])}\n"
            f"uidNumber: {u['uid_number']}\ngidNumber: {u['gid_number']}\n"
            f"homeDirectory: /home/{u['uid']}\nloginShell: /bin/bash\nuserPassword: {ssha(u['password'])}\n"
        )
    user_names = {u["uid"] for u in users}
    for g in groups:
        entry = f"dn: cn={g['name']},ou=projects,{suffix}\ncn: {g['name']}\n"
        if g.get("description"):
            entry += f"description: {g['description']}\n"
        if style == "posixGroup":
            entry += f"objectClass: posixGroup\ngidNumber: {g['gid_number']}\n"
            entry += "".join(f"memberUid: {m}\n" for m in g["members"])
        else:
            entry += "objectClass: groupOfNames\n"
            for m in g["members"]:
                ou = "people" if m in user_names else "projects"
                entry += f"member: {'uid' if ou == 'people' else 'cn'}={m},ou={ou},{suffix}\n"
        out.append(entry)
    return "\n".join(out)
