"""Real slapd instances for tests, seeded with the demo users and projects."""

from __future__ import annotations

import base64
from pathlib import Path

import ldap3
from ldap3.utils.dn import escape_rdn

from labyard_hub import demo
from labyard_hub.slapd import Slapd, TLSFiles, directory_ldif, ssha

SERVICE_PASSWORD = "service-secret"


def start_directory(directory: Path, style: str = "posixGroup", tls: TLSFiles | None = None, extra_users: int = 0,
                    listen: tuple[str, ...] = ()) -> Slapd:
    """A running slapd with alice, bob, carol, admin (password ``labyard-demo``) and the demo groups.

    groupOfNames directories also get ``ml-all``, a group whose only member is the group
    ``vision`` (for nested-group tests), and ``Bad Name``, a group that is not a valid project name.
    ``extra_users``: that many more users, ``user001``..., members of ``vision`` (benchmarks).
    """
    users = demo.users_with_password()
    extra = [{"uid": f"user{i:03d}", "uid_number": 11000 + i, "gid_number": 10000, "password": demo.PASSWORD}
             for i in range(1, extra_users + 1)]
    groups = [dict(g, members=g["members"] + [u["uid"] for u in extra]) if g["name"] == "vision" else g for g in demo.GROUPS]
    if style == "groupOfNames":
        groups += [
            {"name": "ml-all", "members": ["vision"], "description": "everyone in ML (nested)"},
            {"name": "Bad Name", "members": ["alice"]},
        ]
    slapd = Slapd(directory, suffix=demo.SUFFIX, reader_dn=f"cn=hub,ou=services,{demo.SUFFIX}", tls=tls,
                  listen=listen)
    slapd.write_config()
    slapd.load(directory_ldif(demo.SUFFIX, users + extra, groups, style=style, service=("hub", SERVICE_PASSWORD)))
    slapd.start()
    return slapd


def authenticator_config(slapd: Slapd, style: str = "posixGroup") -> dict:
    """LDAPAuthenticator settings for a directory made by :func:`start_directory`."""
    config = {
        "server_urls": [slapd.url],
        "lookup_bind_dn": slapd.reader_dn,
        "lookup_bind_password": SERVICE_PASSWORD,
        "user_search_base": f"ou=people,{demo.SUFFIX}",
        "project_search_base": f"ou=projects,{demo.SUFFIX}",
        "admin_groups": [demo.ADMIN_GROUP],
        "connect_timeout": 1.0,
        "receive_timeout": 2.0,
    }
    if style == "groupOfNames":
        config.update(project_search_filter="(objectClass=groupOfNames)", project_membership="member")
    return config


def admin_connection(slapd: Slapd) -> ldap3.Connection:
    """A rootdn connection to change the directory during a test."""
    return ldap3.Connection(slapd.url, slapd.root_dn, slapd.root_password, auto_bind=True, raise_exceptions=True)


# -- an Active-Directory-shaped directory ------------------------------------------------------

AD_PEOPLE = f"ou=people,{demo.SUFFIX}"
AD_PROJECTS = f"ou=projects,{demo.SUFFIX}"
LONG_NAME = "Computational Linguistics and Natural Language Processing Research Grp"
BULK_GROUPS = 1100
OTHER_GROUPS = 300


def _attr(name: str, value: str) -> str:
    """One LDIF line, base64 where LDIF needs it (non-ASCII, leading space, colon or '<')."""
    if not value.isascii() or value[:1] in (" ", ":", "<") or value.endswith(" "):
        return f"{name}:: {base64.b64encode(value.encode()).decode()}\n"
    return f"{name}: {value}\n"


def _user(uid: str, number: int | None, cn: str) -> str:
    entry = _attr("dn", f"uid={uid},{AD_PEOPLE}") + "objectClass: inetOrgPerson\n"
    if number is not None:
        entry += f"objectClass: posixAccount\nuidNumber: {number}\ngidNumber: 10000\nhomeDirectory: /home/{uid}\n"
    return entry + _attr("uid", uid) + _attr("cn", cn) + _attr("sn", cn) + f"userPassword: {ssha(demo.PASSWORD)}\n"


def _group(cn: str, parent: str, members: list[str], description: str = "", gid: int | None = None) -> str:
    entry = _attr("dn", f"cn={escape_rdn(cn)},{parent}") + "objectClass: groupOfNames\n"
    if gid is not None:
        entry += f"objectClass: extensibleObject\ngidNumber: {gid}\n"
    entry += _attr("cn", cn) + (_attr("description", description) if description else "")
    return entry + "".join(_attr("member", m) for m in members)


def user_dn(uid: str) -> str:
    return f"uid={uid},{AD_PEOPLE}"


def group_dn(cn: str, parent: str = AD_PROJECTS) -> str:
    return f"cn={escape_rdn(cn)},{parent}"


def ad_directory_ldif(referral: str | None = None) -> str:
    """A directory shaped like Active Directory's, under the demo suffix:

    - users with uidNumber (alice, bob, carol, erin, frank, admin) and dave without any;
    - groupOfNames projects under ``ou=projects`` named with case, spaces, underscores,
      non-ASCII and 70 characters, one nested in another, one with a gidNumber;
    - two groups called ``Robotics`` (in ``ou=projects`` and ``ou=lab,ou=projects``);
    - 1,100 more project groups under ``ou=bulk,ou=projects`` (past AD's 1,000 per search);
    - 300 groups that are not projects (``ou=groups``), all with erin as a member;
    - ``ou=partner,ou=projects``: a referral to ``referral`` (an LDAP URL), if given.
    """
    s = demo.SUFFIX
    out = [f"dn: {s}\nobjectClass: top\nobjectClass: dcObject\nobjectClass: organization\no: Labyard\ndc: labyard\n"]
    for ou in ("people", "projects", "groups", "services"):
        out.append(f"dn: ou={ou},{s}\nobjectClass: organizationalUnit\nou: {ou}\n")
    for ou in ("lab", "bulk"):
        out.append(f"dn: ou={ou},{AD_PROJECTS}\nobjectClass: organizationalUnit\nou: {ou}\n")
    out.append(f"dn: cn=hub,ou=services,{s}\nobjectClass: applicationProcess\nobjectClass: simpleSecurityObject\n"
               f"cn: hub\nuserPassword: {ssha(SERVICE_PASSWORD)}\n")
    people = [("alice", 10001, "Alice Archer"), ("bob", 10002, "Bob Baker"), ("carol", 10003, "Carol Cooper"),
              ("dave", None, "Dave Dunn"), ("erin", 10005, "Erin Ernst"), ("frank", 10006, "Frank Fox"),
              ("admin", 10099, "Platform Admin")]
    out += [_user(*p) for p in people]
    out += [
        _group("Data Science", AD_PROJECTS, [user_dn("alice"), user_dn("bob")], "Data science team", gid=30001),
        _group("ML_Research", AD_PROJECTS, [group_dn("Data Science"), user_dn("carol")], "Machine learning research"),
        _group("Équipe Vision", AD_PROJECTS, [user_dn("carol"), user_dn("dave")], "Vision par ordinateur", gid=30003),
        _group(LONG_NAME, AD_PROJECTS, [user_dn("erin")], "Seventy characters long", gid=30004),
        _group("vision", AD_PROJECTS, [user_dn("alice"), user_dn("frank")], "Computer vision", gid=20001),
        _group("Robotics", AD_PROJECTS, [user_dn("frank")], "Robots, first of two", gid=30006),
        _group("Robotics", f"ou=lab,{AD_PROJECTS}", [user_dn("frank")], "Robots, second of two", gid=30007),
        _group("Labyard Admins", AD_PROJECTS, [user_dn("admin")], "Platform administrators"),
    ]
    out += [_group(f"Team {i:04d}", f"ou=bulk,{AD_PROJECTS}", [user_dn("nobody")]) for i in range(BULK_GROUPS)]
    out += [_group(f"Distribution {i:03d}", f"ou=groups,{s}", [user_dn("erin")]) for i in range(OTHER_GROUPS)]
    if referral:
        out.append(f"dn: ou=partner,{AD_PROJECTS}\nobjectClass: referral\nobjectClass: extensibleObject\n"
                   f"ou: partner\nref: {referral}\n")
    return "\n".join(out)


def start_ad_directory(directory: Path, referral: str | None = None, size_limit: int = 1000) -> Slapd:
    """A running slapd with :func:`ad_directory_ldif`, answering at most ``size_limit`` entries per search."""
    slapd = Slapd(directory, suffix=demo.SUFFIX, reader_dn=f"cn=hub,ou=services,{demo.SUFFIX}", size_limit=size_limit,
                  debug="stats")
    slapd.write_config()
    slapd.load(ad_directory_ldif(referral))
    slapd.start()
    return slapd


def ad_config(slapd: Slapd) -> dict:
    """Directory settings for :func:`start_ad_directory`: groupOfNames, nested, users found without posixAccount."""
    return {
        **authenticator_config(slapd, "groupOfNames"),
        "user_search_filter": "(&(objectClass=inetOrgPerson)(uid={username}))",
        "nested_groups": True,
        "admin_groups": ["labyard admins"],
    }


def entries_read(slapd: Slapd, since: int) -> list[int]:
    """Entry counts of the searches slapd answered since byte ``since`` of its log (``debug="stats"``)."""
    with open(slapd.directory / "slapd.log", "rb") as f:
        f.seek(since)
        text = f.read().decode(errors="replace")
    return [int(line.rsplit("nentries=", 1)[1].split()[0]) for line in text.splitlines() if "SEARCH RESULT" in line and "nentries=" in line]


def log_size(slapd: Slapd) -> int:
    return (slapd.directory / "slapd.log").stat().st_size
