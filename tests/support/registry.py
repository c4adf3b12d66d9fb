"""A real OCI registry (Debian's `docker-registry`, distribution v2) on loopback, and a pusher for
OCI layout tarballs, so end-to-end tests can have containerd's CRI pull images the way kubelet does
instead of importing them with `ctr`. No auth, no TLS: containerd must treat the host as plain HTTP.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

BINARY = "docker-registry"
# Manifest media types a registry serves back when asked for a tag.
MANIFEST_ACCEPT = ", ".join(
    (
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    )
)
# Bypass any http_proxy in the environment: the registry is on loopback.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass
class Registry:
    """`docker-registry serve` on 127.0.0.1 with a free port; config, storage and log under `work_dir`."""

    work_dir: Path
    access_log: bool = False  # each request in the log (what tests count uploads and fetches by)
    port: int = field(default=0, init=False)
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.work_dir / "registry.log"

    def start(self, timeout: float = 30) -> Registry:
        """Start it and wait until GET /v2/ answers 200."""
        binary = shutil.which(BINARY)
        if binary is None:
            raise RuntimeError(f"{BINARY} not found: run scripts/setup.sh")
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.port = _free_port()
        config = self.work_dir / "registry.yml"
        config.write_text(json.dumps(self._config(), indent=2))  # JSON is YAML
        # The registry lets REGISTRY_* variables override its config file; keep ours authoritative.
        env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [binary, "serve", str(config)], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{BINARY} exited {self.proc.returncode}:\n{self.log()[-3000:]}")
            if self._ready():
                return self
            time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"{BINARY} did not answer on http://{self.host}/v2/:\n{self.log()[-3000:]}")

    def _config(self) -> dict:
        return {
            "version": 0.1,
            "log": {"level": "info", "accesslog": {"disabled": not self.access_log}},
            "storage": {"filesystem": {"rootdirectory": str(self.work_dir / "storage")}},
            "http": {"addr": self.host},
        }

    def _ready(self) -> bool:
        try:
            with _OPENER.open(f"http://{self.host}/v2/", timeout=1) as resp:
                return resp.status == 200
        except OSError:  # refused while starting, or an HTTP error
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def requests(self) -> list[tuple[str, str]]:
        """(method, path) of every request so far, from the access log."""
        return re.findall(r'"(GET|HEAD|PUT|POST|PATCH|DELETE) (\S+) HTTP/', self.log())

    def blobs(self) -> dict[str, bytes]:
        """Every blob the registry stores, by digest."""
        found = {}
        for data in (self.work_dir / "storage").glob("docker/registry/v2/blobs/sha256/*/*/data"):
            found[f"sha256:{data.parent.name}"] = data.read_bytes()
        return found

    def stop(self, timeout: float = 10) -> None:
        """SIGTERM, then SIGKILL if it does not exit in time."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> Registry:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def push_oci_layout(registry_host: str, layout_tar: Path, repository: str, tag: str) -> str:
    """Push the one image manifest of an OCI layout tarball, its config and layers, as
    `repository:tag`; returns the reference `<host>/<repository>:<tag>`."""
    with tarfile.open(layout_tar) as tar:

        def read(name: str) -> bytes:
            member = tar.extractfile(_member(tar, name))
            if member is None:
                raise ValueError(f"{layout_tar}: {name} is not a regular file")
            return member.read()

        def blob(digest: str) -> bytes:
            return read("blobs/" + digest.replace(":", "/", 1))

        manifests = json.loads(read("index.json"))["manifests"]
        if len(manifests) != 1:
            raise ValueError(f"{layout_tar}: expected one manifest in index.json, found {len(manifests)}")
        desc = manifests[0]
        manifest = blob(desc["digest"])
        parsed = json.loads(manifest)
        for child in [parsed["config"], *parsed["layers"]]:
            _push_blob(registry_host, repository, child["digest"], blob(child["digest"]))
    base = f"http://{registry_host}/v2/{repository}"
    with _request("PUT", f"{base}/manifests/{tag}", manifest, {"Content-Type": desc["mediaType"]}) as resp:
        pushed = resp.headers.get("Docker-Content-Digest")
    if pushed != desc["digest"]:
        raise RuntimeError(f"registry stored manifest {pushed}, layout says {desc['digest']}")
    return f"{registry_host}/{repository}:{tag}"


def _push_blob(registry_host: str, repository: str, digest: str, data: bytes) -> None:
    """Monolithic upload (POST, then PUT ?digest=), unless HEAD says the blob is already there."""
    base = f"http://{registry_host}/v2/{repository}/blobs/"
    try:
        with _request("HEAD", base + digest):
            return
    except RegistryError as e:
        if e.code != 404:
            raise
    with _request("POST", base + "uploads/", b"") as resp:
        # Location may be relative or absolute and usually carries a query (the upload state).
        upload = urllib.parse.urlsplit(urllib.parse.urljoin(resp.url, resp.headers["Location"]))
    query = "&".join(q for q in (upload.query, urllib.parse.urlencode({"digest": digest})) if q)
    with _request("PUT", upload._replace(query=query).geturl(), data, {"Content-Type": "application/octet-stream"}):
        pass


class RegistryError(RuntimeError):
    """A non-2xx answer, with the registry's JSON error body in the message."""

    def __init__(self, method: str, url: str, code: int, body: str) -> None:
        super().__init__(f"{method} {url}: HTTP {code} {body}")
        self.code = code


def _request(
    method: str, url: str, data: bytes | None = None, headers: dict[str, str] | None = None
) -> http.client.HTTPResponse:
    """urlopen without proxies; raises RegistryError on any non-2xx answer."""
    try:
        return _OPENER.open(urllib.request.Request(url, data=data, headers=headers or {}, method=method), timeout=30)
    except urllib.error.HTTPError as e:
        raise RegistryError(method, url, e.code, e.read().decode(errors="replace").strip()) from None


def _member(tar: tarfile.TarFile, name: str) -> tarfile.TarInfo:
    """A layout member by path, whether or not the tarball spells it with a leading './'."""
    for candidate in (name, f"./{name}"):
        try:
            return tar.getmember(candidate)
        except KeyError:
            pass
    raise KeyError(f"{tar.name!s}: no {name}")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
