"""Real slapd instances for tests, seeded with the demo users and projects."""

from __future__ import annotations

from pathlib import Path

import ldap3

from labyard_hub import demo
from labyard_hub.slapd import Slapd, TLSFiles, directory_ldif

SERVICE_PASSWORD = "service-secret"


def start_directory(directory: Path, style: str = "posixGroup", tls: TLSFiles | None = None) -> Slapd:
    """A running slapd with alice, bob, carol, admin (password ``labyard-demo``) and the demo groups.

    groupOfNames directories also get ``ml-all``, a group whose only member is the group
    ``vision`` (for nested-group tests), and ``Bad Name``, a group that is not a valid project name.
    """
    groups = list(demo.GROUPS)
    if style == "groupOfNames":
        groups += [
            {"name": "ml-all", "members": ["vision"], "description": "everyone in ML (nested)"},
            {"name": "Bad Name", "members": ["alice"]},
        ]
    slapd = Slapd(directory, suffix=demo.SUFFIX, reader_dn=f"cn=hub,ou=services,{demo.SUFFIX}", tls=tls)
    slapd.write_config()
    slapd.load(directory_ldif(demo.SUFFIX, demo.users_with_password(), groups, style=style, service=("hub", SERVICE_PASSWORD)))
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
