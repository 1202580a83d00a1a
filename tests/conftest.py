"""Fixtures that start real components: slapd directories and (tests/stack.py) a whole Labyard."""

from __future__ import annotations

import shutil

import pytest

from labyard_hub.slapd import make_tls

from .support.directory import start_directory


def _need(program: str) -> None:
    if not shutil.which(program) and not shutil.which(program, path="/usr/sbin"):
        pytest.fail(f"{program} is missing: run `make setup` (it installs it with apt when run as root)")


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory):
    _need("openssl")
    return make_tls(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="session")
def ldap_posix(tmp_path_factory):
    """slapd with posixGroup/memberUid projects."""
    _need("slapd")
    slapd = start_directory(tmp_path_factory.mktemp("slapd-posix"))
    yield slapd
    slapd.stop()


@pytest.fixture(scope="session")
def ldap_groupofnames(tmp_path_factory):
    """slapd with groupOfNames/member projects, one of them nested."""
    _need("slapd")
    slapd = start_directory(tmp_path_factory.mktemp("slapd-gon"), style="groupOfNames")
    yield slapd
    slapd.stop()


@pytest.fixture(scope="session")
def ldap_tls(tmp_path_factory, tls_files):
    """slapd serving LDAPS and StartTLS with a certificate from a test CA."""
    _need("slapd")
    slapd = start_directory(tmp_path_factory.mktemp("slapd-tls"), tls=tls_files)
    yield slapd
    slapd.stop()
