"""How containers' tasks end, from containerd's events: a subscription to /tasks/exit at
containerd's address, for caches that promote a job's writes only when it succeeded.

One thread reads the stream and hands each init process's exit (namespace, container id, exit
status) to a callback; when the stream breaks (containerd restarted, not up yet) it subscribes
again after a pause that grows to RETRY_MAX. Exits that happen while it is not subscribed are
not seen: a job whose exit was not seen is no success. Must not know about the store or caches.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

EXIT_TOPIC = "/tasks/exit"
RETRY_FIRST = 0.2  # seconds before subscribing again after the stream broke
RETRY_MAX = 5.0

OnExit = Callable[[str, str, int], None]  # (containerd namespace, container id, exit status)


class TaskExits:
    """Subscribes to task exits at `address` (a unix socket) once started, until stopped."""

    def __init__(self, address: str, on_exit: OnExit):
        self.address = address
        self.on_exit = on_exit
        self._stop = threading.Event()
        self._call: Any = None
        self._thread: threading.Thread | None = None
        self.subscribed = threading.Event()  # set while a subscription is open

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="task-exits", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        call = self._call
        if call is not None:
            call.cancel()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        import grpc  # only daemons with caches that promote on success need a gRPC client

        from addlower.api import events_pb2, events_pb2_grpc

        pause, said = RETRY_FIRST, False
        while not self._stop.is_set():
            try:
                with grpc.insecure_channel(f"unix://{self.address}") as channel:
                    stub = events_pb2_grpc.EventsStub(channel)
                    self._call = stub.Subscribe(events_pb2.SubscribeRequest(filters=[f'topic=="{EXIT_TOPIC}"']))
                    self._call.initial_metadata()  # the subscription is open from here
                    self.subscribed.set()
                    if said:
                        log.info("following containerd's task exits again at %s", self.address)
                    pause, said = RETRY_FIRST, False
                    for envelope in self._call:
                        self._deliver(envelope, events_pb2.TaskExit)
            except grpc.RpcError as exc:
                if self._stop.is_set():
                    return
                if not said:  # once per outage
                    log.warning(
                        "cannot follow containerd's task exits at %s (%s): jobs that end meanwhile are not "
                        "seen to succeed; retrying",
                        self.address,
                        exc.code().name,
                    )
                    said = True
            finally:
                self.subscribed.clear()
                self._call = None
            self._stop.wait(pause)
            pause = min(pause * 2, RETRY_MAX)

    def _deliver(self, envelope: Any, message: Any) -> None:
        exit = message.FromString(envelope.event.value)
        if exit.id and exit.id != exit.container_id:  # an exec's process, not the container's
            return
        try:
            self.on_exit(envelope.namespace, exit.container_id, exit.exit_status)
        except Exception:
            log.exception("handling the exit of container %s/%s failed", envelope.namespace, exit.container_id)
