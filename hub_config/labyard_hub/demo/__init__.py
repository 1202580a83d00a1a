"""The demo directory and policy of ``labyard up --demo`` (also used by the tests)."""

from pathlib import Path

from ..projects import ProjectPolicy

PASSWORD = "labyard-demo"
SUFFIX = "dc=labyard,dc=test"
SERVICE_ACCOUNT = "hub"
ADMIN_GROUP = "admins"

USERS = [
    {"uid": "alice", "cn": "Alice Archer", "uid_number": 10001, "gid_number": 10000},
    {"uid": "bob", "cn": "Bob Baker", "uid_number": 10002, "gid_number": 10000},
    {"uid": "carol", "cn": "Carol Cooper", "uid_number": 10003, "gid_number": 10000},
    {"uid": "admin", "cn": "Platform Admin", "uid_number": 10099, "gid_number": 10000},
]
GROUPS = [
    {"name": "vision", "gid_number": 20001, "members": ["alice", "bob"], "description": "Computer vision"},
    {"name": "nlp", "gid_number": 20002, "members": ["alice", "carol"], "description": "Language models"},
    {"name": ADMIN_GROUP, "gid_number": 20000, "members": ["admin"], "description": "Labyard administrators"},
]
POLICY_FILE = Path(__file__).parent / "policy.yaml"


def users_with_password(password: str = PASSWORD) -> list[dict]:
    return [{**u, "password": password} for u in USERS]


def policy() -> ProjectPolicy:
    return ProjectPolicy.from_yaml(POLICY_FILE)
