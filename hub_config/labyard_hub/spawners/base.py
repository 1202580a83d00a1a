"""What every Labyard spawner shares: a server per project, checked against the project model."""

from __future__ import annotations

from pathlib import Path

from jinja2 import Environment, FileSystemLoader, select_autoescape
from jupyterhub.spawner import SpawnException
from traitlets import Instance, Unicode, default
from traitlets.config import Configurable

from ..access import Access, AccessError, load_policy
from ..projects import Flavor, Identity, Project, ProjectPolicy

_templates = Environment(
    loader=FileSystemLoader(Path(__file__).parent.parent / "templates"), autoescape=select_autoescape()
)


class ProjectSpawnerMixin(Configurable):
    """Mixed into a Spawner: the server's name is a project of the user.

    Before anything starts, the server name and the requested flavour
    (``user_options["flavor"]``) are checked with :meth:`labyard_hub.access.Access.authorize`
    on the hub: a project the user is not a member of gives 403, a flavour the project does not
    allow gives 400, whatever the browser sent.
    """

    policy_file = Unicode(
        "",
        help="""Project policy (YAML, see docs/admin/projects.md): flavours, quotas, images.
        Empty: every project gets one default flavour. Example::

            c.LocalProjectSpawner.policy_file = "/etc/labyard/policy.yaml"
        """,
    ).tag(config=True)

    policy = Instance(ProjectPolicy, help="The loaded project policy (set from policy_file).")

    @default("policy")
    def _policy_default(self) -> ProjectPolicy:
        return load_policy(self.policy_file)

    #: whether this spawner offers flavours with GPUs (see LocalProjectSpawner.allow_gpu_flavors)
    offers_gpus = True

    @property
    def access(self) -> Access:
        return Access(self.policy, gpus=self.offers_gpus)

    #: set by run_auth_state_hook before start
    identity: Identity | None = None
    project: Project | None = None
    flavor: Flavor | None = None

    @default("options_form")
    def _options_form_default(self):
        return ProjectSpawnerMixin.render_options_form

    @default("http_timeout")
    def _http_timeout_default(self) -> int:
        # JupyterLab with its extensions can take over 30 s to answer on a busy node
        return 120

    @default("apply_user_options")
    def _apply_user_options_default(self):
        # the only user option, "flavor", is checked and applied in authorize()
        return lambda spawner, user_options: None

    def offered_flavors(self, project: str) -> list[Flavor]:
        """Flavours to offer for a project, as :class:`labyard_hub.access.Access` decides."""
        return self.access.flavors(project)

    async def flavor_notes(self, project: str, flavors: list[Flavor]) -> dict[str, str]:
        """A note shown beside each flavour in the form (e.g. free GPUs); none by default."""
        return {}

    async def _identity(self) -> Identity:
        auth_state = await self.user.get_auth_state()
        return Identity.from_auth_state(self.user.name, auth_state, admin=self.user.admin)

    @staticmethod
    async def render_options_form(spawner: ProjectSpawnerMixin) -> str:
        """The spawn form: the project (fixed by the server name) and its flavours.

        No form (start at once) when the project offers a single flavour.
        """
        identity = await spawner._identity()
        project = identity.project(spawner.name)
        if project is None:
            return ""  # start() refuses it with a 403 that says why
        flavors = spawner.offered_flavors(project.name)
        if len(flavors) <= 1:
            return ""
        notes = await spawner.flavor_notes(project.name, flavors)
        return _templates.get_template("spawn_form.html").render(project=project, flavors=flavors, notes=notes)

    def options_from_form(self, formdata: dict[str, list[str]]) -> dict[str, str]:
        flavor = formdata.get("flavor", [""])[0]
        return {"flavor": flavor} if flavor else {}

    async def run_auth_state_hook(self, auth_state):
        self.identity = Identity.from_auth_state(self.user.name, auth_state, admin=self.user.admin)
        return await super().run_auth_state_hook(auth_state)

    def authorize(self) -> None:
        """Check the server name and flavour against the project model; raise SpawnException."""
        if not self.name:
            raise SpawnException(
                "Labyard servers belong to a project: start one from the home page (/hub/home).",
                reason="no_project",
                status_code=400,
            )
        identity = self.identity or Identity(username=self.user.name)
        flavor = (self.user_options or {}).get("flavor")
        if flavor is not None and not isinstance(flavor, str):
            raise SpawnException(f"flavor must be a string, not {flavor!r}", reason="flavor", status_code=400)
        try:
            self.project, self.flavor = self.access.authorize(identity, self.name, flavor)
        except AccessError as e:
            raise SpawnException(e.message, reason="project" if e.status == 403 else "flavor", status_code=e.status) from e

    def run_pre_spawn_hook(self):
        self.authorize()
        return super().run_pre_spawn_hook()

    def project_environment(self) -> dict[str, str]:
        """Environment every server of a project gets (``LABYARD_GPUS``: the flavour's GPUs, which
        turns MLflow system metrics on in its kernels)."""
        assert self.project and self.flavor
        return {"LABYARD_PROJECT": self.project.name, "LABYARD_PROJECT_DISPLAY_NAME": self.project.label,
                "LABYARD_FLAVOR": self.flavor.name, "LABYARD_GPUS": str(self.flavor.gpus)}

    def get_state(self):
        """Also record the flavour and its GPUs, for the GPU-aware idle culler and admins."""
        state = super().get_state()
        if self.flavor is not None:
            state.update(flavor=self.flavor.name, gpus=self.flavor.gpus)
        return state

    def load_state(self, state):
        super().load_state(state)
        name = state.get("flavor")
        if name and name in self.policy.flavors:
            self.flavor = self.policy.flavors[name]

    def clear_state(self):
        super().clear_state()
        self.flavor = None
