"""Fixtures that start real components: slapd directories and (tests/stack.py) a whole Labyard."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from labyard_hub.slapd import make_tls

from .support.directory import start_ad_directory, start_directory


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
def ldap_ad(tmp_path_factory, ldap_groupofnames):
    """slapd shaped like Active Directory (tests/support/directory.py: ad_directory_ldif), answering
    at most 1,000 entries per search, with a referral to ``ldap_groupofnames``'s projects."""
    _need("slapd")
    referral = f"{ldap_groupofnames.url}/ou=projects,dc=labyard,dc=test"
    slapd = start_ad_directory(tmp_path_factory.mktemp("slapd-ad"), referral=referral)
    yield slapd
    slapd.stop()


@pytest.fixture(scope="session")
def ldap_tls(tmp_path_factory, tls_files):
    """slapd serving LDAPS and StartTLS with a certificate from a test CA."""
    _need("slapd")
    slapd = start_directory(tmp_path_factory.mktemp("slapd-tls"), tls=tls_files)
    yield slapd
    slapd.stop()


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="module")
def browser():
    """Debian's Chromium driven by Playwright (never a downloaded browser).

    Module scope: Playwright's sync API keeps an event loop running in this thread while it is
    open, which would stop the asyncio tests of later modules from running.
    """
    if not Path(CHROMIUM).exists():
        pytest.fail("Chromium is missing: run `make test` as root (it installs Debian's chromium) or apt-get install chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run"],
        )
        yield b
        b.close()
