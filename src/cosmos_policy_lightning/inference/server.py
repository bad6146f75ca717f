"""``cosmos-policy serve``: a websocket policy server that speaks openpi's protocol (``docs/deploy.md``).

A robot's control loop sends an observation and gets an action chunk back, over one websocket per
client, with openpi's wire format (msgpack, numpy arrays as ``openpi_client.msgpack_numpy`` encodes
them; see ``cosmos_policy_lightning.client``), so robot code written for ``openpi-client``'s
``WebsocketClientPolicy`` works unchanged:

1. on connect the server sends the metadata message (:meth:`PolicyService.metadata
   <cosmos_policy_lightning.inference.service.PolicyService.metadata>`);
2. each binary message is one request; its reply is one binary message with ``actions``,
   ``server_timing`` (``infer_ms``, ``queue_ms``, ``batch_size``, ``prev_total_ms``) and our extras
   (``value``, ``future_proprio``, ``seed``, optional ``future_images``);
3. a bad request gets a one-line **text** frame naming the field, and the connection stays open
   (openpi's reference server closes it); openpi clients raise on a text frame.

How work flows: connection handlers (asyncio) decode and check requests and put them in one queue; a
single batcher takes the first waiting request plus whatever else arrives within ``batch_window_ms``
(at most ``max_batch_size``) and runs them as one forward pass on one worker thread, so the event
loop keeps receiving while the model runs and simultaneous clients share passes. The batcher waits
only while some connected client has no request in flight (each client has at most one), so a lone
client never waits; without the window, clients in step split into alternating part-batches. One
worker thread on purpose: the Wan VAE keeps its causal cache on the module, so one policy must not
run on two threads at once. Optional API key:
checked during the HTTP handshake (``Authorization: Api-Key <key>``), so a refused client never
reaches the model. ``GET /healthz`` answers ``200 OK`` without a key. SIGTERM / SIGINT stop accepting,
let the running batch finish, close the connections (1001 going away) and exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import http
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from websockets.asyncio.server import ServerConnection, serve as ws_serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request as HttpRequest, Response as HttpResponse

from ..client import API_KEY_ENV, packb
from ..errors import CosmosPolicyError
from .options import PolicyOptions, build_policy, takes_policy_options
from .service import BadRequest, PolicyService, Request

logger = logging.getLogger("cosmos_policy_lightning.serve")

#: Largest message accepted (bytes): a few full-HD frames; anything bigger is refused by websockets.
MAX_MESSAGE_BYTES = 64 * 2**20


@dataclass
class _Pending:
    request: Request
    received: float
    future: asyncio.Future = field(repr=False)
    peer: str = ""


class PolicyServer:
    """The websocket server around a :class:`~cosmos_policy_lightning.inference.service.PolicyService`.

    Args:
        service: validates requests and runs the policy.
        host: interface to bind; ``127.0.0.1`` (default) accepts only this computer. Use the robot
            network's interface (or ``0.0.0.0``) to serve a robot elsewhere, with an API key.
        port: TCP port; 0 picks a free one (see :attr:`port` once started).
        api_key: required ``Authorization: Api-Key <key>`` header value; None: no key needed.
        max_batch_size: most requests per forward pass (1: no batching; planning always runs 1).
        batch_window_ms: after the first request of a batch arrives, wait up to this long for more
            while other connected clients have no request in flight (0: take only those already waiting).

    Raises:
        CosmosPolicyError: bad sizes.
    """

    def __init__(self, service: PolicyService, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
                 max_batch_size: int = 8, batch_window_ms: float = 5.0):
        if max_batch_size < 1 or batch_window_ms < 0:
            raise CosmosPolicyError(f"serve: need max_batch_size >= 1 and batch_window_ms >= 0, got "
                                    f"{max_batch_size}, {batch_window_ms}")
        self.service = service
        self.host, self.port = host, port
        self.api_key = api_key or None
        self.max_batch_size = max_batch_size if service.batchable else 1
        self.batch_window_s = batch_window_ms / 1000.0
        self.metadata = service.metadata()
        self.metadata["batching"] = {"max_batch_size": self.max_batch_size, "batch_window_ms": batch_window_ms}
        self._metadata_bytes = packb(self.metadata)
        self.stats = {"connections": 0, "refused": 0, "requests": 0, "bad_requests": 0, "batches": 0, "errors": 0}
        """Counters since start (read by tests and logs)."""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None

    # ------------------------------------------------------------------ handshake
    def _process_request(self, connection: ServerConnection, request: HttpRequest) -> HttpResponse | None:
        """Health check and API key, before the websocket exists (nothing reaches the model)."""
        if request.path.split("?", 1)[0] == "/healthz":
            return connection.respond(http.HTTPStatus.OK, "OK\n")
        if self.api_key is None:
            return None
        header = request.headers.get("Authorization", "")
        scheme, _, key = header.partition(" ")
        if not header:
            self.stats["refused"] += 1
            logger.warning("refused %s: no API key (expected header 'Authorization: Api-Key ...')",
                           _peer(connection))
            return _respond(connection, http.HTTPStatus.UNAUTHORIZED,
                            "missing API key: send the header 'Authorization: Api-Key <key>'\n")
        if scheme != "Api-Key" or not hmac.compare_digest(key.strip().encode(), self.api_key.encode()):
            self.stats["refused"] += 1
            logger.warning("refused %s: wrong API key", _peer(connection))
            return _respond(connection, http.HTTPStatus.FORBIDDEN, "wrong API key\n")
        return None

    # ------------------------------------------------------------------ connections
    async def _handler(self, ws: ServerConnection) -> None:
        peer = _peer(ws)
        self.stats["connections"] += 1
        self._open += 1
        logger.info("client %s connected", peer)
        prev_total_ms: float | None = None
        try:
            await ws.send(self._metadata_bytes)
            async for message in ws:
                received = time.perf_counter()
                self.stats["requests"] += 1
                try:
                    request = self.service.parse(message)
                except BadRequest as err:
                    self.stats["bad_requests"] += 1
                    logger.warning("client %s: %s", peer, err)
                    await ws.send(str(err))  # a text frame: openpi clients raise on it
                    continue
                if self._closing:
                    await ws.send("server shutting down: request not run")
                    continue
                pending = _Pending(request, received, asyncio.get_running_loop().create_future(), peer)
                self._inflight += 1
                try:
                    self._queue.put_nowait(pending)
                    try:
                        reply = await pending.future
                    except Exception as err:  # the model failed on this batch: report, keep serving
                        await ws.send(f"internal error: {' '.join(f'{type(err).__name__}: {err}'.split())}")
                        continue
                    if prev_total_ms is not None:
                        reply["server_timing"]["prev_total_ms"] = prev_total_ms
                    await ws.send(packb(reply))
                finally:
                    self._inflight -= 1
                prev_total_ms = (time.perf_counter() - received) * 1000
        except ConnectionClosed:
            pass
        finally:
            self._open -= 1
            logger.info("client %s disconnected", peer)

    # ------------------------------------------------------------------ batching
    async def _batcher(self, executor: ThreadPoolExecutor) -> None:
        loop = asyncio.get_running_loop()
        while True:
            first = await self._queue.get()
            if first is None:  # shutdown
                return
            batch = [first]
            deadline = loop.time() + self.batch_window_s
            while len(batch) < self.max_batch_size:
                if not self._queue.empty():
                    item = self._queue.get_nowait()
                else:
                    remaining = deadline - loop.time()
                    if remaining <= 0 or self._open <= self._inflight:  # no idle client could add one
                        break
                    try:
                        item = await asyncio.wait_for(self._queue.get(), timeout=remaining)
                    except asyncio.TimeoutError:
                        break
                if item is None:
                    self._queue.put_nowait(None)  # finish this batch, then stop
                    break
                batch.append(item)
            start = time.perf_counter()
            try:
                replies = await loop.run_in_executor(executor, self.service.run, [p.request for p in batch])
            except Exception as err:
                self.stats["errors"] += 1
                logger.exception("inference failed on a batch of %d", len(batch))
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(err)
                continue
            end = time.perf_counter()
            self.stats["batches"] += 1
            infer_ms = (end - start) * 1000
            for p, reply in zip(batch, replies):
                queue_ms = (start - p.received) * 1000
                reply["server_timing"] = {"infer_ms": infer_ms, "queue_ms": queue_ms, "batch_size": len(batch)}
                logger.info("client %s: seed %d, batch %d, queue %.1f ms, infer %.1f ms, total %.1f ms", p.peer,
                            p.request.seed, len(batch), queue_ms, infer_ms, (end - p.received) * 1000)
                if not p.future.done():
                    p.future.set_result(reply)

    # ------------------------------------------------------------------ running
    async def serve(self, ready: threading.Event | None = None, handle_signals: bool = False) -> None:
        """Serve until :meth:`stop` (or SIGTERM / SIGINT with ``handle_signals``); then finish the running
        batch, close every connection and return."""
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._queue: asyncio.Queue[_Pending | None] = asyncio.Queue()
        self._closing = False
        self._inflight = 0  # requests queued or running whose reply is not sent yet
        self._open = 0  # open connections
        if handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._loop.add_signal_handler(sig, self._on_signal, sig)
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cosmos-policy-infer")
        batcher = asyncio.create_task(self._batcher(executor))
        try:
            async with ws_serve(self._handler, self.host, self.port, process_request=self._process_request,
                                compression=None, max_size=MAX_MESSAGE_BYTES) as server:
                sock = next(iter(server.sockets))
                self.port = sock.getsockname()[1]
                logger.info("listening on %s (embodiment %s, chunk %d x %d, batch <= %d%s)", self.url,
                            self.metadata["embodiment"], self.metadata["chunk_size"], self.metadata["action_dim"],
                            self.max_batch_size, ", API key required" if self.api_key else "")
                if ready is not None:
                    ready.set()
                await self._stop.wait()
                logger.info("shutting down: finishing %d queued or running requests", self._inflight)
                self._closing = True  # handlers refuse new requests from here on
                self._queue.put_nowait(None)
                await batcher  # every queued request runs
                for _ in range(1000):  # up to 10 s for the handlers to send those replies
                    if self._inflight == 0:
                        break
                    await asyncio.sleep(0.01)
                server.close()  # stop accepting, close connections (1001 going away), wait for handlers
                await server.wait_closed()
        finally:
            if not batcher.done():
                batcher.cancel()
            executor.shutdown(wait=True)
            if handle_signals:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    self._loop.remove_signal_handler(sig)
        logger.info("stopped after %d requests (%d bad) in %d batches on %d connections", self.stats["requests"],
                    self.stats["bad_requests"], self.stats["batches"], self.stats["connections"])

    def _on_signal(self, sig: int) -> None:
        logger.info("received %s", signal.Signals(sig).name)
        self._stop.set()

    @property
    def url(self) -> str:
        """``ws://host:port`` of the bound server."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"ws://{host}:{self.port}"

    def stop(self) -> None:
        """Ask a running :meth:`serve` to stop (thread-safe)."""
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)

    @contextlib.contextmanager
    def running_in_thread(self, timeout: float = 30.0) -> Iterator[str]:
        """Run :meth:`serve` on a background thread with its own event loop (tests, benchmarks,
        notebooks); yields :attr:`url` once listening, stops and joins on exit.

        Raises:
            CosmosPolicyError: not listening within ``timeout`` seconds (e.g. the port is taken).
        """
        ready = threading.Event()
        failure: list[BaseException] = []

        def main() -> None:
            try:
                asyncio.run(self.serve(ready))
            except BaseException as err:  # reported to the caller below
                failure.append(err)
                ready.set()

        thread = threading.Thread(target=main, name="cosmos-policy-serve", daemon=True)
        thread.start()
        if not ready.wait(timeout) or failure:
            self.stop()
            thread.join(timeout)
            cause = f"{type(failure[0]).__name__}: {failure[0]}" if failure else f"not listening after {timeout} s"
            raise CosmosPolicyError(f"serve: cannot start on {self.host}:{self.port} ({cause})")
        try:
            yield self.url
        finally:
            self.stop()
            thread.join(timeout)


def _peer(connection: ServerConnection) -> str:
    addr = connection.remote_address
    return f"{addr[0]}:{addr[1]}" if addr else "?"


def _respond(connection: ServerConnection, status: http.HTTPStatus, text: str) -> HttpResponse:
    response = connection.respond(status, text)
    if status == http.HTTPStatus.UNAUTHORIZED:
        response.headers["WWW-Authenticate"] = "Api-Key"
    return response


@takes_policy_options
def serve(
    checkpoint: Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    seed: int | None = None,
    max_batch_size: int = 8,
    batch_window_ms: float = 5.0,
    return_images: bool = False,
    instruction: str | None = None,
    any_image_size: bool = False,
    options: PolicyOptions,
) -> None:
    """Serve a checkpoint to robots over a websocket, in openpi's protocol (``docs/deploy.md``).

    Runs until SIGTERM or Ctrl-C, then finishes the running requests and exits. Each request's
    latency (queue, inference, total) is logged.

    Args:
        checkpoint: ``.ckpt`` of ``cosmos-policy fit`` (the policy).
        host: interface to bind. Default 127.0.0.1 (this computer only); the robot network's address
            or 0.0.0.0 to serve other computers (then set an API key).
        port: TCP port (0: any free port, printed at start).
        api_key: clients must send ``Authorization: Api-Key <key>``; default: the
            ``COSMOS_POLICY_API_KEY`` environment variable (no key if unset). Prefer the variable:
            command lines are visible to other users.
        seed: requests without a ``seed`` get ``seed + n`` (n-th request); default: random seeds.
            Every reply reports its seed.
        max_batch_size: most simultaneous requests run as one forward pass (1: no batching).
        batch_window_ms: how long the first request of a batch may wait for other clients' requests
            (only while another connected client has none in flight; 0: never wait).
        return_images: decode and return the predicted future frames by default (a request's
            ``return_images`` overrides; direct policy only).
        instruction: instruction for requests that carry none.
        any_image_size: accept frames of any size and resize them here (default: frames must have
            the model's image size, which saves bandwidth).
        options: device, sampling and planning options (:class:`~.options.PolicyOptions`, one place for
            ``serve`` and ``evaluate``).

    Raises:
        CosmosPolicyError: bad arguments, unreadable checkpoint, or the port cannot be bound.
    """
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logger.setLevel(logging.INFO)
    logging.getLogger("websockets").setLevel(logging.WARNING)  # our own lines say the same, per request
    key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
    if host not in ("127.0.0.1", "localhost", "::1") and not key:
        logger.warning("serving on %s without an API key: anyone on that network can drive the policy", host)
    built = build_policy(checkpoint, options)
    policy = built.policy
    service = PolicyService(policy, built.planner, num_steps=options.num_steps, decoding=options.decoding, seed=seed,
                            return_images=return_images, default_instruction=instruction,
                            any_image_size=any_image_size, checkpoint=str(checkpoint),
                            planning_checkpoint=None if options.planning_checkpoint is None
                            else str(options.planning_checkpoint))
    if service.text_conditioned:  # load the text encoder now, not on the first robot request
        policy.text.get(instruction or "")
    server = PolicyServer(service, host=host, port=port, api_key=key, max_batch_size=max_batch_size,
                          batch_window_ms=batch_window_ms)
    try:
        asyncio.run(server.serve(handle_signals=True))
    except OSError as err:  # address in use, permission denied, unknown host
        raise CosmosPolicyError(f"serve: cannot listen on {host}:{port} ({err.strerror or err})") from None


__all__ = ["PolicyServer", "serve", "MAX_MESSAGE_BYTES"]
