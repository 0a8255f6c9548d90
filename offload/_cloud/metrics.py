"""Prometheus metrics of the server, served over HTTP on ``--metrics-port``.

Two hooks, neither inside the service code: ``ServerMetrics.observe`` listens to the executor
(``RemoteExecutor.add_listener``) and sees every answer it gives; ``StreamMetrics`` (a gRPC
server interceptor) sees the ``ExecuteRemaining`` and ``ExecuteBatches`` streams and the
messages crossing them, however the service is registered.
Each server has its own registry: several servers in one process (tests) never clash.

Metrics (``device`` is capped at ``max_devices`` label values; later devices count as "other",
so that a fleet of thousands of devices cannot blow up Prometheus' memory):

    offload_items_total{device,status}       answers given: completed / filtered / failed
    offload_task_seconds{task,name}          histogram of server wall time per task
    offload_item_cpu_seconds                 histogram of server CPU seconds per item
    offload_active_streams                   device streams open now
    offload_received_bytes_total             TaskState (and TaskBatch) bytes received
    offload_sent_bytes_total                 ItemResult (and ResultBatch) bytes sent
    offload_unauthenticated_total            calls refused for a missing or wrong token
    offload_state_errors_total{kind}         state store calls failed: unreachable / slow / refused
    offload_state_up                         1 while the state store is reachable, else 0
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any
from wsgiref.simple_server import WSGIServer

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from .._pipeline import Pipeline
from .._wire import BATCH_METHOD, METHOD, status_name
from ..exceptions import ConfigError
from ..v1 import offload_pb2 as pb
from .state import Store

OTHER_DEVICES = "other"
_STREAMS = (METHOD, BATCH_METHOD)
# Ball-tracking tasks take 0.1-20 ms on a server core; the default buckets start at 5 ms.
TASK_BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0)


class ServerMetrics:
    """The server's metrics in their own registry, and the HTTP endpoint that serves them."""

    def __init__(self, pipeline: Pipeline, max_devices: int = 100) -> None:
        if max_devices < 0:
            raise ValueError(f"max_devices {max_devices}: must be 0 or more")
        self.registry = CollectorRegistry()
        self.max_devices = max_devices
        self._devices: set[str] = set()
        self._devices_lock = threading.Lock()
        self._task_names = [pipeline.task_name(i) for i in range(len(pipeline))]
        r = self.registry
        self.items = Counter(
            "offload_items", "Items answered by device and status", ["device", "status"], registry=r
        )
        self.task_seconds = Histogram(
            "offload_task_seconds",
            "Server wall time of one task on one item",
            ["task", "name"],
            buckets=TASK_BUCKETS,
            registry=r,
        )
        self.item_cpu_seconds = Histogram(
            "offload_item_cpu_seconds",
            "Server CPU seconds spent on one item (the cloud cost of an item)",
            buckets=TASK_BUCKETS,
            registry=r,
        )
        self.active_streams = Gauge("offload_active_streams", "Device streams open now", registry=r)
        self.received_bytes = Counter(
            "offload_received_bytes", "TaskState bytes received", registry=r
        )
        self.sent_bytes = Counter("offload_sent_bytes", "ItemResult bytes sent", registry=r)
        self.unauthenticated = Counter(
            "offload_unauthenticated", "Calls refused for a missing or wrong token", registry=r
        )
        self.state_errors = Counter(
            "offload_state_errors", "State store calls that failed, by kind", ["kind"], registry=r
        )
        self.state_up = Gauge("offload_state_up", "1 while the state store answers", registry=r)
        self.state_up.set(1)
        self._task_series: dict[int, Any] = {}  # task: its histogram
        self._item_series: dict[tuple[str, int], Any] = {}  # (device, status): its counter
        self._http: WSGIServer | None = None
        self._http_thread: threading.Thread | None = None

    def device_label(self, device_id: str) -> str:
        """The device's own label while fewer than ``max_devices`` are known, else "other"."""
        with self._devices_lock:
            if device_id in self._devices:
                return device_id
            if len(self._devices) < self.max_devices and device_id != OTHER_DEVICES:
                self._devices.add(device_id)
                return device_id
        return OTHER_DEVICES

    def observe(self, state: pb.TaskState, result: pb.ItemResult) -> None:
        """Count one answer given to a device (an executor's listener).

        On every answer's path: the labelled series are looked up once each and kept (a
        ``labels()`` call costs a lock and a key built from strings), so an answer costs a few
        dictionary hits whatever the number of devices.
        """
        key = (state.device_id, result.status)
        counter = self._item_series.get(key)
        if counter is None:
            label = self.device_label(state.device_id)
            counter = self.items.labels(label, status_name(result.status))
            if label != OTHER_DEVICES:  # bounded: max_devices devices times the statuses
                self._item_series[key] = counter
        counter.inc()
        if result.duplicate:
            return  # a replayed answer: its work was counted when it was done
        for t in result.task_times:
            series = self._task_series.get(t.task)
            if series is None:  # at most one per task of the pipeline (and "?")
                name = self._task_names[t.task] if t.task < len(self._task_names) else "?"
                series = self._task_series[t.task] = self.task_seconds.labels(str(t.task), name)
            series.observe(t.seconds)
        self.item_cpu_seconds.observe(result.server_cpu_seconds)

    def watch_store(self, store: Store) -> None:
        """Count the state store's failures and follow its reachability."""
        store.add_error_listener(lambda kind: self.state_errors.labels(kind).inc())
        store.add_health_listener(lambda up: self.state_up.set(int(up)))

    def start_http(self, host: str, port: int) -> int:
        """Serve /metrics on ``host:port`` (0 picks a free port); returns the bound port."""
        try:
            self._http, self._http_thread = start_http_server(port, host, registry=self.registry)
        except OSError as exc:
            raise ConfigError(
                f"--metrics-port {port}: cannot serve metrics on {host} ({exc.strerror}): "
                "is the port in use? Choose another --metrics-port"
            ) from None
        return int(self._http.server_port)

    def stop_http(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
        if self._http_thread is not None:
            self._http_thread.join(5)
            self._http_thread = None


def _size(message: Any) -> int:
    """Wire size of a message, whether the handler gets it parsed or as raw bytes."""
    return len(message) if isinstance(message, bytes) else int(message.ByteSize())


class StreamMetrics(grpc.ServerInterceptor):  # type: ignore[misc]
    """Counts open ``ExecuteRemaining`` streams and the bytes of the messages on them."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self.metrics = metrics

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(details)
        if handler is None or details.method not in _STREAMS or handler.stream_stream is None:
            return handler
        inner = handler.stream_stream
        metrics = self.metrics

        def received(requests: Iterator[Any]) -> Iterator[Any]:
            for request in requests:
                metrics.received_bytes.inc(_size(request))
                yield request

        def metered(requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
            metrics.active_streams.inc()
            try:
                for answer in inner(received(requests), context):
                    metrics.sent_bytes.inc(_size(answer))
                    yield answer
            finally:
                metrics.active_streams.dec()

        return grpc.stream_stream_rpc_method_handler(
            metered,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
