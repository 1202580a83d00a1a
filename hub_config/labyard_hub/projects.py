"""The one identity and project model of Labyard.

Who a user is (:class:`Identity`: uid, gid, home, the projects they belong to) comes from LDAP
through :class:`labyard_hub.ldap.LDAPAuthenticator` and is stored in the hub's auth_state.
What a project may use (:class:`ProjectPolicy`: compute flavours, quotas, image, storage) is
admin configuration. Who may do what with them is decided in one place, :mod:`labyard_hub.access`.
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path
from typing import Annotated, Any

import yaml
from jupyterhub.slugs import is_valid_safe_slug, safe_slug
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

#: A project name (its slug) is a JupyterHub server name (JupyterHub 6 accepts only "safe
#: slugs": a lower-case letter, then letters, digits and single hyphens, at most 30 characters),
#: a directory name and, prefixed with ``labyard-``, a Kubernetes namespace (a DNS-1123 label).
PROJECT_NAME_RE = re.compile(r"^(?=.{1,30}$)[a-z][a-z0-9]*(-[a-z0-9]+)*$")
#: the longest project name (the hub, the scheduler and Ansible's projects.yml all allow this)
PROJECT_NAME_MAX = 30
#: PROJECT_NAME_RE without its length, for pydantic and JSON schemas (which take no look-ahead)
PROJECT_NAME_PATTERN = r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$"

ProjectName = Annotated[str, Field(pattern=PROJECT_NAME_PATTERN, max_length=PROJECT_NAME_MAX,
                                   description="a project name: a lower-case letter, then lower-case letters, "
                                               "digits and single '-', at most 30 characters")]


def ascii_fold(text: str) -> str:
    """Lower-case ASCII letters and digits of ``text``, every other run of characters one ``-``."""
    folded = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode().lower()
    return re.sub(r"[^a-z0-9]+", "-", folded).strip("-")


def project_slug(name: str) -> str:
    """The project name (slug) of a directory group called ``name``: stable, valid, collision-free.

    JupyterHub's own ``safe_slug``: a name that is already a valid project name is its own slug
    (``vision``, ``ml-team``); any other (capitals, spaces, ``_``, non-ASCII, over 30
    characters) becomes its ASCII fold, ``-`` and 8 hex digits of the SHA-256 of the name:
    ``"Data Science"`` -> ``data-science-f25168f3``, ``"机器学习"`` -> ``x-e0ab0981``. Two different
    names get the same slug only if a digest collides or a group is named exactly like another
    group's slug; :func:`refuse_collisions` refuses such groups.
    """
    return safe_slug(name, is_valid=is_valid_safe_slug)
Quantity = Annotated[str, Field(pattern=r"^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti)?$")]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Project(_Model):
    """A project: an LDAP group. ``name`` is its slug (server, directory and namespace names);
    ``display_name`` is the group's own name, shown to people."""

    name: str
    gid: int | None = Field(None, description="gidNumber of the group (None for groupOfNames without one)")
    description: str = ""
    display_name: str = Field("", description="the group's name in the directory (empty: the same as name)")

    @property
    def label(self) -> str:
        return self.display_name or self.name

    def group_properties(self) -> dict[str, Any]:
        """The JupyterHub group properties that carry this project to every service."""
        return {"gid": self.gid, "display_name": self.label, "description": self.description}


def refuse_collisions(projects: list[tuple[str, Project]], log) -> dict[str, Project]:
    """Projects by group DN, without any two groups that share a slug (both refused, logged).

    Args:
        projects: (DN, project) of every group that is a project.
    """
    by_slug: dict[str, list[tuple[str, Project]]] = {}
    for dn, project in projects:
        by_slug.setdefault(project.name, []).append((dn, project))
    kept = {}
    for slug, groups in by_slug.items():
        if len(groups) > 1:
            log.error("LDAP groups %s all map to project name %r: none of them is a project until all but one are renamed",
                      "; ".join(repr(dn) for dn, _ in groups), slug)
            continue
        kept[groups[0][0]] = groups[0][1]
    return kept


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
    projects: dict[str, ProjectSettings] = Field({}, description="per project, by its project name or its group's name in the directory")

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
        # projects may be named by their project name (the slug shown to users, its own slug)
        # or by their group's name in the directory ("Data Science"): both mean the same project
        slugs: dict[str, ProjectSettings] = {}
        for name, settings in projects.items():
            slug = project_slug(name)
            if slug in slugs:
                raise ValueError(f"project {name!r} is listed twice (as its group name and as its project name {slug!r})")
            slugs[slug] = settings
        return slugs

    @classmethod
    def from_yaml(cls, path: str | Path) -> ProjectPolicy:
        """Load a policy file.

        Raises:
            PolicyError: the file is unreadable, not YAML or not a valid policy; the message
                names the file and each wrong field (``flavors.gpu-1.gpus: ...``).
        """
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            raise PolicyError(f"project policy {path}: {e}") from e
        try:
            return cls.model_validate({} if data is None else data)
        except ValidationError as e:
            raise PolicyError(f"project policy {path}: {validation_message(e)}") from e

    @classmethod
    def json_schema(cls) -> dict[str, Any]:
        """The policy file's JSON schema (Ansible validates projects.yml against it; committed as
        ``ansible/collections/ansible_collections/labyard/cluster/schemas/project-policy.schema.json``, kept current by a test)."""
        schema = cls.model_json_schema()
        # the hub also takes a directory group's own name as a key ("Data Science"); the groups
        # Ansible creates are named by their project names, so the schema asks for those
        schema["properties"]["projects"]["propertyNames"] = {"pattern": PROJECT_NAME_PATTERN, "maxLength": PROJECT_NAME_MAX}
        schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
        schema["title"] = "Labyard project policy"
        return schema

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
    """An invalid project policy file (the message names the file and the field)."""


def validation_message(e: ValidationError) -> str:
    """A pydantic error as one line per problem: ``where.in.the.data: what is wrong``."""
    parts = []
    for err in e.errors():
        where = ".".join(str(x) for x in err.get("loc", ()))
        msg = err.get("msg", "invalid").removeprefix("Value error, ")
        parts.append(f"{where}: {msg}" if where else msg)
    return "; ".join(parts)
