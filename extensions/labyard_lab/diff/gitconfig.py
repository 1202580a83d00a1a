"""Notebook-aware git for everything a Labyard server starts: terminals, kernels, jupyterlab-git.

At load, the server extension writes a git config and an attributes file and points
``GIT_CONFIG_SYSTEM`` at the config; child processes inherit it, so ``git diff``, ``git log -p``
and ``git merge`` on ``*.ipynb`` in a terminal of the server need no step from the user:

- ``diff.jupyternotebook.command``: ``labyard diff`` as git's external diff driver (``git diff``,
  ``git show``, ``git log -p --ext-diff``);
- ``diff.jupyternotebook.textconv``: the notebook as text (sources, outputs, binary data as a
  hash), which git diffs line by line where the external driver is not used (``git log -p``,
  ``git blame``, ``git diff --no-ext-diff``);
- ``merge.jupyternotebook.driver``: nbdime's merge driver;
- ``difftool.nbdime`` / ``mergetool.nbdime``: nbdime's web tools.

The file first includes the system config it replaces (``/etc/gitconfig``, or an earlier
``GIT_CONFIG_SYSTEM``), and it is the *system* level: a user's ``~/.gitconfig`` still overrides
any of it. ``core.attributesFile`` is set there too, so a user who keeps their own global
attributes file must add ``*.ipynb diff=jupyternotebook merge=jupyternotebook`` to it.

An image writes the same drivers into its own system files once, at build time
(``python -m labyard_lab.diff.gitconfig --system /etc``: ``/etc/gitconfig`` and
``/etc/gitattributes``, which git reads without any setting), so that every git in the
container, a ``kubectl exec`` shell too, is notebook-aware; the image then sets
``LabyardDiff.git_drivers = False``.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

DRIVER = "jupyternotebook"
ATTRIBUTES = f"*.ipynb diff={DRIVER} merge={DRIVER}\n"


def config_text(python: str, attributes: Path | None, include: str | None) -> str:
    py = shlex.quote(python)
    lines = []
    if include:
        lines += ["[include]", f"\tpath = {include}"]
    lines += [
        f'[diff "{DRIVER}"]',
        f"\tcommand = {py} -m labyard_lab.diff.cli --git-driver",
        f"\ttextconv = {py} -m labyard_lab.diff.cli --textconv",
        f'[merge "{DRIVER}"]',
        "\tname = jupyter notebook merge driver (nbdime)",
        f"\tdriver = {py} -m nbdime.vcs.git.mergedriver merge %O %A %B %L %P",
        '[difftool "nbdime"]',
        f'\tcmd = {py} -m nbdime.vcs.git.difftool diff "$LOCAL" "$REMOTE" "$BASE"',
        '[mergetool "nbdime"]',
        f'\tcmd = {py} -m nbdime.vcs.git.mergetool merge "$BASE" "$LOCAL" "$REMOTE" "$MERGED"',
    ]
    if attributes:
        lines += ["[core]", f"\tattributesFile = {attributes}"]
    return "\n".join(lines) + "\n"


def _write(path: Path, text: str) -> None:
    if path.exists() and path.read_text() == text:
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def install(log, directory: Path | None = None, environ=os.environ) -> Path | None:
    """Write the files and set ``GIT_CONFIG_SYSTEM`` in ``environ``; return the config's path."""
    if environ.get("GIT_CONFIG_NOSYSTEM"):
        log.warning("labyard: GIT_CONFIG_NOSYSTEM is set: notebook diff/merge drivers for git are not installed")
        return None
    if directory is None:
        from jupyter_core.paths import jupyter_runtime_dir

        directory = Path(jupyter_runtime_dir()) / "labyard-git"
    config = directory / "gitconfig"
    if environ.get("GIT_CONFIG_SYSTEM") == str(config):
        return config
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        attributes = directory / "attributes"
        _write(attributes, ATTRIBUTES)
        previous = environ.get("GIT_CONFIG_SYSTEM") or "/etc/gitconfig"
        _write(config, config_text(sys.executable, attributes, previous))
    except OSError as e:
        log.warning("labyard: cannot write the git config for notebook diffs in %s: %s", directory, e)
        return None
    environ["GIT_CONFIG_SYSTEM"] = str(config)
    log.info("labyard: git diff/merge drivers for notebooks enabled (GIT_CONFIG_SYSTEM=%s)", config)
    return config


def write_system(etc: Path) -> None:
    """Write ``etc/gitconfig`` (replacing it) and ``etc/gitattributes``: git's system files."""
    _write(etc / "gitattributes", ATTRIBUTES)
    _write(etc / "gitconfig", config_text(sys.executable, None, None))


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m labyard_lab.diff.gitconfig",
                                     description="Write git's system config and attributes with the notebook drivers.")
    parser.add_argument("--system", type=Path, required=True, metavar="ETC", help="directory of git's system files, e.g. /etc")
    write_system(parser.parse_args().system)
