"""A managed cache through the registry: its chain pushed as an OCI image (one layer per
generation), and an image pulled by containerd into this snapshotter becoming a cache's base.

No transport of our own. A push writes the layers, config and manifest into containerd's content
store (namespace addlower-caches), records the image there, and has containerd's client push it
(`ctr images push`: containerd's resolver, the node's registry hosts dir with its TLS, mirrors
and auth headers; blobs the registry has are not sent again). A pull is `ctr images pull
--snapshotter <us>`: containerd fetches what it lacks and unpacks each layer into a committed
snapshot of ours, which the image record keeps from its garbage collector. Those snapshots' dirs
are the cache's base generations (caches/<name>/<n> is a link to snapshots/<id>/fs, both under
the 0700 root): no host path, and nothing outside the daemon can change them; the store refuses
their Remove while a chain or a container uses them (containerd's collector tries again later).

ctr rather than containerd's Transfer API: the Transfer service is complete only on 2.x, ctr is
on every node with the containerd it talks to, and it goes by the same hosts dir.

I/O at the edges: the store, the content store and the Images API over gRPC, ctr.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from addlower.core import cacheimage
from addlower.core.cacheimage import NAMESPACE, Descriptor, ImageError
from addlower.core.caches import CachePolicy
from addlower.core.config import PLUGIN_NAME
from addlower.core.errors import FailedPrecondition, NotFound, Unavailable
from addlower.core.logformat import fields

from .caches import Caches, Tree, measure
from .content import NAMESPACE_HEADER, UNCOMPRESSED_LABEL, Blob, BlobWriter, ContentStore
from .differ import LAYER_TAR, Layers, write_layer
from .store import Layer, MetaStore

log = logging.getLogger(__name__)

CTR_TIMEOUT = 3600  # a push or pull of a large cache over a slow link
GC_CONFIG = "containerd.io/gc.ref.content.config"
GC_LAYER = "containerd.io/gc.ref.content.l.{}"


class CacheImages:
    """Pushes and pulls of the caches under `root` (their generations in `caches` and `store`),
    through the containerd at `address` and its `ctr`, by `registry_config` (a hosts dir)."""

    def __init__(
        self, root: str, store: MetaStore, caches: Caches, address: str, registry_config: str, ctr: str = "ctr"
    ):
        self.root = root
        self.store = store
        self.caches = caches
        self.address = address
        self.registry_config = registry_config
        self.ctr = ctr
        self.content = ContentStore(address)

    # --- push ------------------------------------------------------------------------------

    def push(self, name: str, ref: str, policy: CachePolicy) -> str:
        """Push cache `name`'s default chain to `ref`; what was pushed, for the operator."""
        with self.store.read() as reader:
            chain = reader.cache_chain(name)
            known = reader.cache_layers(name)
        if not chain:
            raise FailedPrecondition(f"cache {name!r} has no generations to push")
        started = time.monotonic()
        made_with = hashlib.sha256("\0".join(policy.exclude).encode()).hexdigest()
        layers: list[Layer] = []
        written = 0
        for n, gen in enumerate(chain):
            had = known.get(gen)
            snapshot = had.snapshot_id if had is not None else None
            reusable = had is not None and (snapshot is not None or had.made_with == made_with)
            if had is not None and reusable and self.content.exists(had.layer.digest, NAMESPACE):
                layers.append(had.layer)
                continue
            layer = self._write_layer(name, chain[: n + 1], policy.exclude)
            with self.store.transaction() as tx:
                tx.set_layer(name, gen, layer, snapshot, None if snapshot is not None else made_with)
            written += 1
            layers.append(layer)
        manifest = self._record_image(name, ref, layers)
        written_s = time.monotonic() - started
        self._ctr("images", "push", *self._hosts(), ref)
        log.info(
            "pushed a cache",
            extra=fields(
                cache=name,
                image=ref,
                manifest=manifest.digest,
                layers=len(layers),
                written=written,
                write_s=round(written_s, 3),
                push_s=round(time.monotonic() - started - written_s, 3),
            ),
        )
        return (
            f"cache {name}: pushed {len(layers)} layers (generations {', '.join(map(str, chain))}; "
            f"{written} written now) to {ref} as {manifest.digest}"
        )

    def _write_layer(self, name: str, chain: Sequence[int], exclude: Sequence[str]) -> Layer:
        """The top of `chain` as a layer over the rest, into containerd's content store."""
        upper, *lowers = self.caches.dirs(name, chain)  # newest first
        layers = Layers(os.fsencode(upper), tuple(map(os.fsencode, lowers)))

        def produce(out: BlobWriter) -> Blob:
            written = write_layer(layers, out, LAYER_TAR, exclude=cacheimage.Exclusions(exclude))
            return Blob(written.digest, written.size, {UNCOMPRESSED_LABEL: written.diff_id})

        blob = self.content.write(produce, NAMESPACE, None)
        return Layer(LAYER_TAR, blob.digest, blob.size, blob.labels[UNCOMPRESSED_LABEL])

    def _record_image(self, name: str, ref: str, layers: Sequence[Layer]) -> Descriptor:
        """The config and manifest into the content store, and image `ref` pointing at them."""
        arch = cacheimage.oci_architecture(platform.machine())
        config = cacheimage.config_document([layer.diff_id for layer in layers], arch, name)
        config_desc = cacheimage.descriptor_of(cacheimage.CONFIG, config)
        descs = [Descriptor(layer.media_type, layer.digest, layer.size) for layer in layers]
        manifest = cacheimage.manifest_document(config_desc, descs, name)
        manifest_desc = cacheimage.descriptor_of(cacheimage.MANIFEST, manifest)
        gc_refs = {GC_CONFIG: config_desc.digest, **{GC_LAYER.format(n): d.digest for n, d in enumerate(descs)}}
        for blob, desc, labels in ((config, config_desc, {}), (manifest, manifest_desc, gc_refs)):
            self.content.put(blob, desc.digest, labels, NAMESPACE, None)
        self._set_image(ref, manifest_desc, name)
        return manifest_desc

    def _set_image(self, ref: str, target: Descriptor, name: str) -> None:
        import grpc

        from addlower.api import descriptor_pb2, images_pb2

        image = images_pb2.Image(
            name=ref,
            labels={cacheimage.CACHE_LABEL: name},
            target=descriptor_pb2.Descriptor(media_type=target.media_type, digest=target.digest, size=target.size),
        )
        images, metadata = self._images()
        try:
            images.Create(images_pb2.CreateImageRequest(image=image), timeout=60, metadata=metadata)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.ALREADY_EXISTS:
                raise FailedPrecondition(f"recording image {ref} in containerd: {exc.details()}") from None
            images.Update(images_pb2.UpdateImageRequest(image=image), timeout=60, metadata=metadata)

    # --- pull ------------------------------------------------------------------------------

    def pull(self, name: str, ref: str) -> tuple[list[int], str]:
        """Have containerd pull `ref` into this snapshotter and make its layers cache `name`'s
        chain, for containers created from now on; (the chain, the manifest's digest). An image
        that is the chain's base already changes nothing; a new one replaces the whole chain
        (generations promoted here on the old base do not carry over: the image is the fleet's
        state). The chain stays as it was if anything fails."""
        started = time.monotonic()
        self._ctr("images", "pull", "--snapshotter", PLUGIN_NAME, *self._hosts(), ref)
        pulled_s = time.monotonic() - started
        target = self._image_target(ref)
        try:
            manifest = cacheimage.parse_manifest(self.content.read(target, NAMESPACE, cacheimage.MAX_MANIFEST_BYTES))
            diff_ids = cacheimage.parse_diff_ids(
                self.content.read(manifest.config.digest, NAMESPACE, cacheimage.MAX_CONFIG_BYTES), len(manifest.layers)
            )
        except ImageError as exc:
            raise FailedPrecondition(f"image {ref}: {exc}") from None
        snapshots = self._unpacked(ref, cacheimage.chain_ids(diff_ids))
        with self.store.read() as reader:
            chain, known, log_rows = reader.cache_chain(name), reader.cache_layers(name), reader.cache_log(name)
        if [known[gen].snapshot_id if gen in known else None for gen in chain[: len(snapshots)]] == snapshots:
            return chain, target  # this image is the chain's base already (what was promoted since stays on it)
        # A layer's snapshot holds the same over the same layers below (its chain id says so):
        # what an earlier pull measured of it stands.
        measured = {
            known[g.gen].snapshot_id: Tree(g.bytes, g.added, g.changed, g.deleted) for g in log_rows if g.gen in known
        }
        dirs = [f"{self.root}/snapshots/{sid}/fs" for sid in snapshots]
        trees = [
            measured.get(sid) or measure(top, list(reversed(dirs[:n])))
            for n, (sid, top) in enumerate(zip(snapshots, dirs, strict=True))
        ]
        with self.store.transaction() as tx:
            gens = []
            for n, (sid, layer, diff_id) in enumerate(zip(snapshots, manifest.layers, diff_ids, strict=True)):
                gen = tx.next_generation(name)
                os.makedirs(os.path.dirname(self.caches.generation(name, gen)), mode=0o700, exist_ok=True)
                os.symlink(dirs[n], self.caches.generation(name, gen))
                tx.add_generation(name, gen, f"image {ref}@{target} layer {n + 1}", trees[n])
                tx.set_layer(name, gen, Layer(layer.media_type, layer.digest, layer.size, diff_id), sid)
                gens.append(gen)
            tx.set_chain(name, gens)
        log.info(
            "pulled a cache's image",
            extra=fields(
                cache=name,
                image=ref,
                manifest=target,
                layers=len(gens),
                pull_s=round(pulled_s, 3),
                measure_s=round(time.monotonic() - started - pulled_s, 3),
            ),
        )
        return gens, target

    def _image_target(self, ref: str) -> str:
        import grpc

        from addlower.api import images_pb2

        images, metadata = self._images()
        try:
            image = images.Get(images_pb2.GetImageRequest(name=ref), timeout=60, metadata=metadata).image
        except grpc.RpcError as exc:
            raise FailedPrecondition(f"image {ref} is not in containerd after its pull: {exc.details()}") from None
        if image.target.media_type not in (cacheimage.MANIFEST, cacheimage.DOCKER_MANIFEST):
            raise FailedPrecondition(
                f"image {ref} is a {image.target.media_type}, not one image manifest (what `cache push` writes)"
            )
        return image.target.digest

    def _unpacked(self, ref: str, chain: Sequence[str]) -> list[int]:
        """Our snapshot ids of the image's layers, bottom first, each the next one's parent."""
        found: list[int] = []
        with self.store.read() as reader:
            for n, chain_id in enumerate(chain):
                row = reader.committed_named(NAMESPACE, chain_id)
                if row is None:
                    raise FailedPrecondition(
                        f"image {ref}: layer {n + 1} is not unpacked into {PLUGIN_NAME} (chain id {chain_id})"
                    )
                sid, parent = row
                if parent != (found[-1] if found else None):
                    raise FailedPrecondition(f"image {ref}: layer {n + 1}'s snapshot is not on the one below it")
                found.append(sid)
        return found

    # --- containerd ------------------------------------------------------------------------

    def _images(self) -> tuple[Any, list[tuple[str, str]]]:
        from addlower.api import images_pb2_grpc

        return images_pb2_grpc.ImagesStub(self.content.channel()), [(NAMESPACE_HEADER, NAMESPACE)]

    def _hosts(self) -> list[str]:
        return ["--hosts-dir", self.registry_config] if Path(self.registry_config).is_dir() else []

    def _ctr(self, *args: str) -> None:
        command = [self.ctr, "--address", self.address, "--namespace", NAMESPACE, *args]
        try:
            done = subprocess.run(
                command, capture_output=True, text=True, timeout=CTR_TIMEOUT, stdin=subprocess.DEVNULL
            )
        except FileNotFoundError:
            raise NotFound(f"{self.ctr} is not installed: caches push and pull with containerd's ctr") from None
        except subprocess.TimeoutExpired:
            raise Unavailable(f"ctr {' '.join(args[:2])} did not finish in {CTR_TIMEOUT} s") from None
        if done.returncode != 0:
            said = (done.stderr.strip().splitlines() or ["no message"])[-1]
            raise FailedPrecondition(f"ctr {' '.join(args[:2])} {args[-1]} failed: {said}")
