"""Fixtures for end-to-end tests: a real containerd driving our daemon through `ctr`.

Every test runs once per containerd line (the `binaries` fixture: the installed containerd and
those scripts/containerd-versions.sh unpacked; test ids name the version), and every test that
takes `target` twice more: against containerd's built-in `overlayfs` (the reference our
snapshotter must match) and against our daemon as the proxy plugin. Tests see the system as a user
does (`ctr` output, directories on disk), never the daemon's internals.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pluggy
import pytest

from addlower.core.config import PLUGIN_NAME
from addlower.core.lowers import DEFAULT_ALLOWED_ROOTS
from addlower.dev import ociimage
from addlower.dev.devcontainerd import BIN_DIR_ENV, Binaries, CriSettings, PrivateContainerd, unpacked_lines
from tests.support.cri.client import CriClient
from tests.support.daemon import Daemon, allowing

BUILTIN = "overlayfs"
MAX_NAMESPACE = 76  # containerd's identifier limit
REQUIRED_BINARIES = ("containerd", "ctr", "runc")


def containerd_lines(config: pytest.Config) -> list[Binaries]:
    """The containerd lines to test against (see tests/conftest.py's --containerd-bin-dir)."""
    dirs = config.getoption("--containerd-bin-dir") or (
        [os.environ[BIN_DIR_ENV]] if os.environ.get(BIN_DIR_ENV) else ["system", *map(str, unpacked_lines())]
    )
    return [Binaries() if d == "system" else Binaries(Path(d)) for d in dirs]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "binaries" in metafunc.fixturenames:
        lines = containerd_lines(metafunc.config)
        since = metafunc.definition.get_closest_marker("containerd_from")
        if since is not None:  # a feature older lines do not have (their refusal is tested elsewhere)
            lines = [b for b in lines if b.version[:2] >= since.args[0]]
        metafunc.parametrize("binaries", lines, ids=[b.label for b in lines], scope="session", indirect=True)


@pytest.fixture(scope="session")
def binaries(request: pytest.FixtureRequest) -> Binaries:
    """One containerd line (parametrized by pytest_generate_tests)."""
    return request.param


@dataclass(frozen=True)
class SnapshotRow:
    """One line of `ctr snapshots ls`."""

    key: str
    parent: str
    kind: str


@dataclass
class Target:
    """A snapshotter as a user reaches it: by name through a containerd, with snapshot dirs on disk."""

    containerd: PrivateContainerd
    snapshotter: str
    snapshots_dir: Path
    daemon: Daemon | None = None

    def ctr(self, *args: str, namespace: str) -> subprocess.CompletedProcess[str]:
        return self.containerd.ctr(*args, namespace=namespace)

    def snapshots_ctr(self, *args: str, namespace: str) -> subprocess.CompletedProcess[str]:
        """`ctr snapshots --snapshotter <ours or the built-in> *args`."""
        return self.ctr("snapshots", "--snapshotter", self.snapshotter, *args, namespace=namespace)

    def run(
        self, image: str, container_id: str, *command: str, namespace: str, rm: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """`ctr run` on this snapshotter; raises CtrError if it failed."""
        return self.containerd.run(
            image, container_id, *command, namespace=namespace, rm=rm, snapshotter=self.snapshotter
        )

    def import_image(self, image: ociimage.OciImage, namespace: str) -> None:
        self.containerd.import_image(image.path, namespace, self.snapshotter)

    def snapshots(self, namespace: str) -> dict[str, SnapshotRow]:
        """`ctr snapshots ls`, keyed by snapshot key; the PARENT column is blank for base layers."""
        out = self.snapshots_ctr("ls", namespace=namespace).stdout
        rows = {}
        for line in out.splitlines()[1:]:
            fields = line.split()
            key, parent, kind = fields if len(fields) == 3 else (fields[0], "", fields[1])
            rows[key] = SnapshotRow(key, parent, kind)
        return rows

    def upperdir(self, key: str, namespace: str) -> Path:
        """The upper dir named by the mount `ctr snapshots mounts` prints for an active snapshot."""
        out = self.snapshots_ctr("mounts", "/mnt", key, namespace=namespace).stdout
        match = re.search(r"upperdir=([^,\s]+)", out)
        assert match, f"no upperdir in mounts of {key}: {out!r}"
        return Path(match.group(1))

    def snapshot_dirs(self) -> list[str]:
        return sorted(os.listdir(self.snapshots_dir)) if self.snapshots_dir.exists() else []

    def logs(self) -> dict[str, str]:
        logs = {"containerd log": self.containerd.log_tail(200)}
        if self.daemon:
            logs["daemon log"] = "\n".join(self.daemon.log().splitlines()[-200:])
        return logs


@pytest.fixture(scope="session", autouse=True)
def _requirements() -> None:
    """A missing tool is a failure, not a skip: scripts/setup.sh installs all of them."""
    missing = [b for b in REQUIRED_BINARIES if shutil.which(b) is None]
    if not ociimage.BUSYBOX.exists():
        missing.append(f"{ociimage.BUSYBOX} (busybox-static)")
    if os.geteuid() != 0:
        pytest.fail("end-to-end tests need root")
    if missing:
        pytest.fail(f"missing {', '.join(missing)}: run scripts/setup.sh")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item) -> Generator[None, pluggy.Result[pytest.TestReport], None]:
    """On failure, attach the tails of containerd's and the daemon's logs to the report."""
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for value in getattr(item, "funcargs", {}).values():
            if isinstance(value, Target):
                for title, text in value.logs().items():
                    report.sections.append((f"{title} ({value.snapshotter})", text))


def private_containerd(workdir: Path, daemon_root: Path, binaries: Binaries, differ: bool = True) -> PrivateContainerd:
    """A containerd of the `binaries` line that knows the daemon at `daemon_root` as a proxy snapshotter
    and, with `differ` (the daemon runs), as its first differ.

    Start the daemon first: containerd dials proxies at start-up and, if the socket is not there
    yet, fails calls until its reconnect backoff (up to 3 s) retries.
    """
    return PrivateContainerd(
        workdir, proxy_plugins={PLUGIN_NAME: Daemon(root=daemon_root).socket}, binaries=binaries, differ=differ
    )


def make_target(containerd: PrivateContainerd, daemon: Daemon | None) -> Target:
    """Our daemon's snapshotter through `containerd`, or the built-in overlayfs when `daemon` is None."""
    if daemon is None:
        return Target(containerd, BUILTIN, containerd.root / "io.containerd.snapshotter.v1.overlayfs" / "snapshots")
    return Target(containerd, PLUGIN_NAME, daemon.root / "snapshots", daemon)


@contextmanager
def running_target(
    workdir: Path, binaries: Binaries, builtin: bool, daemon_args: Sequence[str] = ()
) -> Iterator[Target]:
    """A containerd of its own and, unless `builtin`, a daemon of its own with `daemon_args`."""
    daemon_root = workdir / "snapshotter"
    with ExitStack() as stack:
        daemon = None
        if not builtin:
            daemon = Daemon(root=daemon_root, args=list(daemon_args)).start()
            stack.callback(daemon.stop)
        yield make_target(
            stack.enter_context(private_containerd(workdir / "containerd", daemon_root, binaries, differ=not builtin)),
            daemon,
        )


@pytest.fixture(scope="session")
def e2e_dir(tmp_path_factory: pytest.TempPathFactory, binaries: Binaries) -> Path:
    """The session's work dir for one containerd line."""
    return tmp_path_factory.mktemp(f"e2e-{binaries.label}")


@pytest.fixture(scope="session")
def images_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("images")


@pytest.fixture(scope="session")
def busybox_image(images_dir: Path) -> ociimage.OciImage:
    return ociimage.build_busybox_image(images_dir / "busybox.tar")


@pytest.fixture(scope="session")
def host_root(tmp_path_factory: pytest.TempPathFactory, binaries: Binaries) -> Path:
    """Where tests keep host dirs for extra lowers: allowed to the session's daemon."""
    return tmp_path_factory.mktemp(f"host-{binaries.label}")


@pytest.fixture
def host_dir(host_root: Path, namespace: str) -> Path:
    """A host dir of the test's own under host_root (not made yet)."""
    return host_root / namespace


@pytest.fixture(scope="session")
def daemon(e2e_dir: Path, host_root: Path) -> Iterator[Daemon]:
    """Our daemon for the whole session, with default flags; its config allows host_root beside
    the default roots."""
    args = allowing(e2e_dir / "snapshotter.toml", *DEFAULT_ALLOWED_ROOTS, host_root)
    daemon = Daemon(root=e2e_dir / "snapshotter", args=args).start()
    yield daemon
    daemon.stop()


@pytest.fixture(scope="session")
def containerd(e2e_dir: Path, daemon: Daemon, binaries: Binaries) -> Iterator[PrivateContainerd]:
    """The session's containerd; serves both the built-in overlayfs and our daemon (started first)."""
    with private_containerd(e2e_dir / "containerd", daemon.root, binaries) as containerd:
        yield containerd


@pytest.fixture(scope="session", params=[BUILTIN, "ours"])
def target(request: pytest.FixtureRequest, daemon: Daemon, containerd: PrivateContainerd) -> Target:
    """The session containerd with one snapshotter selected: the built-in reference, then ours."""
    return make_target(containerd, None if request.param == BUILTIN else daemon)


@pytest.fixture
def namespace(request: pytest.FixtureRequest) -> str:
    """A containerd namespace of the test's own, so tests sharing a containerd do not meet."""
    name = re.sub(r"[^A-Za-z0-9]+", "-", request.node.name).strip("-")
    if len(name) > MAX_NAMESPACE:  # containerd's identifiers are short: keep a readable head, and a hash
        name = f"{name[: MAX_NAMESPACE - 9].rstrip('-')}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"
    return name


@pytest.fixture(
    params=[
        pytest.param((True, ()), id=BUILTIN),
        pytest.param((False, ()), id="ours"),
        pytest.param((False, ("--async-remove=false",)), id="ours-sync-remove"),
    ]
)
def fresh_target(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, binaries: Binaries
) -> Iterator[Target]:
    """A target nobody else uses, for tests that check what is left on disk afterwards."""
    builtin, daemon_args = request.param
    with running_target(tmp_path_factory.mktemp("fresh"), binaries, builtin, daemon_args) as target:
        yield target


# CRI (Kubernetes runtime.v1): pods and containers on a containerd with its CRI plugin on.

CRI_NAMESPACE = "k8s.io"


@dataclass(frozen=True)
class CriOptions:
    """A CRI node's set-up: CRI's snapshotter (the built-in or ours), our daemon's extra flags, and
    the runtime's `pod_annotations` patterns (pod annotations copied into containers' specs)."""

    builtin: bool
    daemon_args: Sequence[str] = ()
    pod_annotations: Sequence[str] = ()
    runtime_snapshotters: Mapping[str, str] = field(default_factory=dict)  # RuntimeClass handler -> snapshotter


@contextmanager
def running_cri_target(workdir: Path, binaries: Binaries, options: CriOptions) -> Iterator[Target]:
    """Our daemon (always, debug log), then a containerd of its own with CRI on, whose snapshotter is
    the built-in overlayfs (`options.builtin`) or our daemon; the Target is the snapshotter CRI uses."""
    daemon = Daemon(root=workdir / "snapshotter", args=["--log-level", "debug", *options.daemon_args])
    cri = CriSettings(
        snapshotter=BUILTIN if options.builtin else PLUGIN_NAME,
        pod_annotations=options.pod_annotations,
        runtime_snapshotters=options.runtime_snapshotters,
    )
    with ExitStack() as stack:
        daemon.start()
        stack.callback(daemon.stop)
        containerd = PrivateContainerd(
            workdir / "containerd", proxy_plugins={PLUGIN_NAME: daemon.socket}, cri=cri, binaries=binaries
        )
        yield make_target(stack.enter_context(containerd), None if options.builtin else daemon)


def eventually(condition: Callable[[], bool], timeout: float, interval: float = 0.2) -> bool:
    """Poll `condition` until it holds or `timeout` seconds pass; whether it held."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


@pytest.fixture(scope="session")
def pause_image(images_dir: Path) -> ociimage.OciImage:
    """The sandbox image the CRI containerds are configured with (CriSettings.sandbox_image)."""
    return ociimage.build_pause_image(images_dir / "pause.tar")


@pytest.fixture(
    params=[pytest.param(CriOptions(builtin=True), id=BUILTIN), pytest.param(CriOptions(builtin=False), id="ours")]
)
def cri_target(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    pause_image: ociimage.OciImage,
    binaries: Binaries,
) -> Iterator[Target]:
    """A CRI node of the test's own (see running_cri_target) with the pause image imported into
    `k8s.io`. Other set-ups: `@pytest.mark.parametrize("cri_target", [CriOptions(...)], indirect=True)`."""
    with running_cri_target(tmp_path_factory.mktemp("cri"), binaries, request.param) as target:
        target.import_image(pause_image, CRI_NAMESPACE)
        yield target


@pytest.fixture
def cri(cri_target: Target, tmp_path: Path) -> Iterator[CriClient]:
    """A CRI client for `cri_target`'s containerd; pod logs go under the test's tmp_path."""
    client = CriClient(cri_target.containerd.address, log_root=tmp_path / "pod-logs")
    yield client
    client.close()
