"""The one identity and project model of Labyard.

Who a user is (:class:`Identity`: uid, gid, home, the projects they belong to) comes from LDAP
through :class:`labyard_hub.ldap.LDAPAuthenticator` and is stored in the hub's auth_state.
What a project may use (:class:`ProjectPolicy`: compute flavours, quotas, image, storage) is
admin configuration. The local spawner, the Kubernetes spawner, the scheduler service and the
project controller all decide through :func:`authorize`, so a notebook server, a scheduled run
and a namespace quota can never disagree about who may use what.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

#: A project name must be usable as a JupyterHub server name, a directory name and, prefixed
#: with ``labyard-``, a Kubernetes namespace (DNS-1123 label, at most 63 characters).
PROJECT_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$")

Quantity = Annotated[str, Field(pattern=r"^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti)?$")]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Project(_Model):
    """A project: an LDAP group the user belongs to."""

    name: str
    gid: int | None = Field(None, description="gidNumber of the group (None for groupOfNames without one)")
    description: str = ""


class Identity(_Model):
    """A user as the platform sees them: LDAP numbers and project memberships."""

    username: str
    uid: int | None = None
    gid: int | None = None
    home: str | None = None
    projects: tuple[Project, ...] = ()
    admin: bool = False

    @classmethod
    def from_auth_state(cls, username: str, auth_state: dict[str, Any] | None, admin: bool = False) -> Identity:
        """Build an identity from the auth_state written by :class:`LDAPAuthenticator`."""
        state = auth_state or {}
        return cls(
            username=username,
            uid=state.get("uid_number"),
            gid=state.get("gid_number"),
            home=state.get("home"),
            projects=tuple(Project(**p) for p in state.get("projects", ())),
            admin=admin,
        )

    def to_auth_state(self) -> dict[str, Any]:
        return {
            "uid_number": self.uid,
            "gid_number": self.gid,
            "home": self.home,
            "projects": [p.model_dump() for p in self.projects],
        }

    @property
    def project_names(self) -> list[str]:
        return [p.name for p in self.projects]

    def project(self, name: str) -> Project | None:
        return next((p for p in self.projects if p.name == name), None)


class Toleration(_Model):
    key: str
    operator: str = "Equal"
    value: str | None = None
    effect: str | None = None


class Flavor(_Model):
    """A named compute shape a server or a scheduled run can ask for."""

    name: str = ""
    display_name: str = ""
    description: str = ""
    cpu: float = Field(1, gt=0, description="CPU cores requested and limited")
    memory: Quantity = "2Gi"
    gpus: int = Field(0, ge=0, description="number of GPUs (the gpu_resource) requested and limited")
    gpu_resource: str = "nvidia.com/gpu"
    gpu_product: str | None = Field(None, description="value of the nvidia.com/gpu.product node label to select")
    node_selector: dict[str, str] = {}
    tolerations: tuple[Toleration, ...] = ()

    @property
    def label(self) -> str:
        return self.display_name or self.name


class Quota(_Model):
    """What all of a project's servers and runs together may request (None: unlimited)."""

    gpus: int | None = Field(None, ge=0)
    cpu: float | None = Field(None, gt=0)
    memory: Quantity | None = None


class ProjectSettings(_Model):
    """Admin policy for one project; fields left out inherit from the policy's ``defaults``."""

    flavors: tuple[str, ...] | None = Field(None, description="allowed flavour names (None: every flavour)")
    quota: Quota | None = None
    image: str | None = None
    storage: Quantity | None = Field(None, description="size of the project's shared volume")


class ProjectPolicy(_Model):
    """The admin's project policy: flavours, and per-project limits on top of LDAP groups."""

    flavors: dict[str, Flavor] = {}
    defaults: ProjectSettings = ProjectSettings()
    projects: dict[str, ProjectSettings] = {}

    @model_validator(mode="before")
    @classmethod
    def _name_flavors(cls, data: Any) -> Any:
        # a flavour is named by its key, so that a Flavor carries its own name
        if isinstance(data, dict) and isinstance(data.get("flavors"), dict):
            flavors = {}
            for key, flavor in data["flavors"].items():
                flavor = dict(flavor or {})
                if flavor.setdefault("name", key) != key:
                    raise ValueError(f"flavor {key!r} has a different name {flavor['name']!r}")
                flavors[key] = flavor
            data = {**data, "flavors": flavors}
        return data

    @model_validator(mode="after")
    def _known_flavors(self) -> ProjectPolicy:
        for where, settings in [("defaults", self.defaults), *self.projects.items()]:
            unknown = set(settings.flavors or ()) - set(self.flavors)
            if unknown:
                raise ValueError(f"{where}: unknown flavors {sorted(unknown)}")
        return self

    @field_validator("projects")
    @classmethod
    def _project_names(cls, projects: dict[str, ProjectSettings]) -> dict[str, ProjectSettings]:
        for name in projects:
            if not PROJECT_NAME_RE.match(name):
                raise ValueError(f"project name {name!r} is not a valid project name ({PROJECT_NAME_RE.pattern})")
        return projects

    @classmethod
    def from_yaml(cls, path: str | Path) -> ProjectPolicy:
        """Load a policy file; raises ``PolicyError`` naming the file and the problem."""
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
            return cls.model_validate(data)
        except (OSError, yaml.YAMLError, ValidationError) as e:
            raise PolicyError(f"project policy {path}: {e}") from e

    def settings(self, project: str) -> ProjectSettings:
        """The effective settings of a project: its own, falling back field by field to defaults."""
        own = self.projects.get(project, ProjectSettings())
        merged = self.defaults.model_dump()
        merged.update({k: v for k, v in own.model_dump().items() if v is not None})
        return ProjectSettings.model_validate(merged)

    def allowed_flavors(self, project: str) -> list[Flavor]:
        names = self.settings(project).flavors
        return [f for n, f in self.flavors.items() if names is None or n in names]


class PolicyError(Exception):
    pass


class AccessError(Exception):
    """A request the user may not make. ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def authorize(
    identity: Identity, policy: ProjectPolicy, project: str, flavor: str | None = None, available: list[Flavor] | None = None
) -> tuple[Project, Flavor | None]:
    """Decide whether ``identity`` may use ``flavor`` in ``project``.

    Args:
        available: narrow the project's flavours further to these (e.g. no GPUs in local mode).

    Returns:
        the project and the flavour (None when no flavour was asked for).
    Raises:
        AccessError: 403 if the user is not a member of the project; 400 if the flavour is
            unknown or not allowed in the project.
    """
    proj = identity.project(project)
    if proj is None:
        raise AccessError(403, f"{identity.username} is not a member of project {project!r}")
    if flavor is None:
        return proj, None
    allowed = {f.name: f for f in policy.allowed_flavors(project)}
    if available is not None:
        allowed = {n: f for n, f in allowed.items() if n in {a.name for a in available}}
    if flavor not in allowed:
        known = "unknown flavor" if flavor not in policy.flavors else "flavor not available to this project"
        raise AccessError(400, f"{known} {flavor!r} for project {project!r}; choose one of: {', '.join(allowed) or 'none'}")
    return proj, allowed[flavor]
