"""OCI image archives made from a few files, for the images the testbed makes itself.

No registry can be pulled from here, so the real node's pause and CoreDNS images, and small test
images (``busybox_image``), are written as OCI image-layout tarballs and imported into the
node's containerd (``testbed load-image``). One uncompressed layer, fixed timestamps and owners,
so the same inputs give the same image digest.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass, field

LAYER = "application/vnd.oci.image.layer.v1.tar"
MANIFEST = "application/vnd.oci.image.manifest.v1+json"
CONFIG = "application/vnd.oci.image.config.v1+json"


@dataclass
class Entry:
    """One path in the layer: a directory, a file (from ``source`` or ``data``) or a symlink."""

    path: str
    kind: str = "file"  # file | dir | symlink
    mode: int = 0o755
    source: str | None = None
    data: bytes | None = None
    target: str = ""


@dataclass
class Image:
    ref: str  # full reference, e.g. localhost/labyard-testbed/pause:3.10.2
    entries: list[Entry]
    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    env: list[str] = field(default_factory=lambda: ["PATH=/usr/local/bin:/usr/bin:/bin"])
    user: str = ""
    workdir: str = "/"


def _layer(entries: list[Entry]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for e in sorted(entries, key=lambda e: e.path):
            info = tarfile.TarInfo(e.path.lstrip("/"))
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "root", "root"
            info.mode = e.mode
            if e.kind == "dir":
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif e.kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, e.target
                tar.addfile(info)
            else:
                data = e.data if e.data is not None else open(e.source, "rb").read()  # noqa: SIM115
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _blob(tar: tarfile.TarFile, data: bytes) -> str:
    digest = hashlib.sha256(data).hexdigest()
    info = tarfile.TarInfo(f"blobs/sha256/{digest}")
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))
    return f"sha256:{digest}"


def write_archive(image: Image, path: str) -> str:
    """Write ``image`` as an OCI image-layout tarball at ``path``; return the manifest digest."""
    layer = _layer(image.entries)
    diff_id = "sha256:" + hashlib.sha256(layer).hexdigest()
    config = json.dumps({
        "architecture": "amd64", "os": "linux",
        "config": {"Entrypoint": image.entrypoint or None, "Cmd": image.cmd or None, "Env": image.env,
                   "User": image.user, "WorkingDir": image.workdir},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created_by": "labyard testbed (tests/k8s/labyard_testbed/oci.py)"}],
    }, sort_keys=True).encode()
    tmp = path + ".tmp"
    with tarfile.open(tmp, "w") as tar:
        layer_digest = _blob(tar, layer)
        config_digest = _blob(tar, config)
        manifest = json.dumps({
            "schemaVersion": 2, "mediaType": MANIFEST,
            "config": {"mediaType": CONFIG, "digest": config_digest, "size": len(config)},
            "layers": [{"mediaType": LAYER, "digest": layer_digest, "size": len(layer)}],
        }, sort_keys=True).encode()
        manifest_digest = _blob(tar, manifest)
        tag = image.ref.rsplit(":", 1)[1] if ":" in image.ref.rsplit("/", 1)[-1] else "latest"
        index = json.dumps({"schemaVersion": 2, "manifests": [{
            "mediaType": MANIFEST, "digest": manifest_digest, "size": len(manifest),
            "platform": {"architecture": "amd64", "os": "linux"},
            "annotations": {"io.containerd.image.name": image.ref, "org.opencontainers.image.ref.name": tag},
        }]}).encode()
        for name, data in (("oci-layout", b'{"imageLayoutVersion": "1.0.0"}'), ("index.json", index)):
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tar.addfile(info, io.BytesIO(data))
    os.replace(tmp, path)
    return manifest_digest


def static_binary_image(ref: str, binary: str, name: str, user: str = "", extra: list[Entry] | None = None) -> Image:
    """An image holding one static binary at ``/<name>`` as its entrypoint (pause, CoreDNS)."""
    return Image(ref=ref, entries=[Entry(f"/{name}", source=binary), Entry("/tmp", "dir", 0o1777),
                                   Entry("/etc", "dir"), *(extra or [])],
                 entrypoint=[f"/{name}"], user=user)


def _with_libraries(binary: str) -> list[Entry]:
    """A dynamically linked binary of this machine and the libraries ``ldd`` names for it."""
    import subprocess

    out = subprocess.run(["ldd", binary], check=True, capture_output=True, text=True).stdout
    libs = [w for line in out.splitlines() for w in line.split() if w.startswith("/")]
    dirs = {os.path.dirname(p) for p in [binary, *libs]}
    entries = [Entry(d, "dir") for d in sorted(dirs | {os.path.dirname(d) for d in dirs}) if d != "/"]
    return entries + [Entry(p, source=os.path.realpath(p)) for p in [binary, *libs]]


def busybox_image(ref: str, busybox: str = "/bin/busybox") -> Image:
    """A small image for tests: a static busybox and its applets (sh, id, stat, httpd, nc ...),
    and glibc's ``getent`` with libc, to resolve names as glibc programs do (a static busybox's
    own lookups cannot: static glibc has no NSS)."""
    import subprocess

    applets = subprocess.run([busybox, "--list"], check=True, capture_output=True, text=True).stdout.split()
    entries = [Entry("/bin", "dir"), Entry("/bin/busybox", source=busybox), Entry("/tmp", "dir", 0o1777),
               Entry("/etc", "dir"), Entry("/root", "dir", 0o700), Entry("/www", "dir"),
               Entry("/etc/passwd", data=b"root:x:0:0:root:/root:/bin/sh\n", mode=0o644),
               Entry("/etc/group", data=b"root:x:0:\n", mode=0o644),
               Entry("/etc/nsswitch.conf", data=b"hosts: files dns\n", mode=0o644)]
    entries += [Entry(f"/bin/{a}", "symlink", 0o777, target="busybox") for a in applets if a != "busybox"]
    seen = {e.path for e in entries}
    entries += [e for e in _with_libraries("/usr/bin/getent") if e.path not in seen]
    return Image(ref=ref, entries=entries, cmd=["sh"], env=["PATH=/bin:/usr/bin"])
