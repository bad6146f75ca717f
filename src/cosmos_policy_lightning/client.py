"""Robot-side client of ``cosmos-policy serve`` (and of any server speaking openpi's websocket protocol).

This module depends on numpy, ``websockets`` and ``msgpack`` only, so it runs on a robot computer
without torch; copy this one file there if the package is not installed (``docs/deploy.md``).

Wire format (openpi's, so ``openpi-client`` and this client are interchangeable):

* one websocket per client; on connect the server sends one binary **metadata** message;
* each request is one binary message, an observation dict; each reply is one binary message, a dict
  with ``actions`` and ``server_timing``; an error reply is a **text** frame (one line) and the
  connection stays usable;
* messages are msgpack; numpy arrays travel as maps ``{b"__ndarray__": True, b"data": raw bytes,
  b"dtype": dtype.str, b"shape": shape}`` and numpy scalars as ``{b"__npgeneric__": True, b"data":
  value, b"dtype": dtype.str}`` -- the encoding of ``openpi_client.msgpack_numpy``;
* an API key travels in the handshake header ``Authorization: Api-Key <key>``.

Usage::

    from cosmos_policy_lightning.client import PolicyClient, RecedingHorizonPolicy

    client = PolicyClient("ws://gpu-box:8000", api_key=os.environ.get("COSMOS_POLICY_API_KEY"))
    reply = client.infer({"images": {"wrist": wrist, "corner": corner}, "proprio": q, "instruction": "open"})
    reply["actions"]            # (K, A) float32, robot units

    policy = RecedingHorizonPolicy(client)        # execute execute_steps of each chunk, then ask again
    action = policy.act(observation)              # one action per control tick
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import threading
import time
from collections.abc import Mapping
from typing import Any

import msgpack
import numpy as np
import websockets.sync.client
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

try:  # inside the package: errors print as one line through the CLI
    from .errors import CosmosPolicyError as _ErrorBase
except ImportError:  # this file copied alone onto a robot computer
    _ErrorBase = ValueError  # type: ignore[assignment,misc]

#: Environment variable holding the API key (read by ``cosmos-policy serve`` and by :class:`PolicyClient`).
API_KEY_ENV = "COSMOS_POLICY_API_KEY"

#: numpy dtype kinds that may cross the wire: bool, signed / unsigned integers, floats. Object, void
#: and complex arrays are refused both ways (an object array cannot be rebuilt from bytes safely).
WIRE_DTYPE_KINDS = "biuf"


class PolicyServerError(_ErrorBase):
    """The server refused a request (its one-line text reply), refused the connection (wrong API
    key), or cannot be reached."""


# --------------------------------------------------------------------------- wire format
def _encode_numpy(obj: Any) -> Any:
    if isinstance(obj, (np.ndarray, np.generic)):
        if obj.dtype.kind not in WIRE_DTYPE_KINDS:
            raise TypeError(f"arrays of dtype {obj.dtype} cannot be sent; use bool, integer or float arrays")
        if isinstance(obj, np.ndarray):
            return {b"__ndarray__": True, b"data": np.ascontiguousarray(obj).tobytes(), b"dtype": obj.dtype.str,
                    b"shape": obj.shape}
        return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": obj.dtype.str}
    return obj


def _decode_numpy(obj: dict) -> Any:
    if b"__ndarray__" in obj:
        dtype = np.dtype(obj[b"dtype"])
        if dtype.kind not in WIRE_DTYPE_KINDS:
            raise ValueError(f"refusing an array of dtype {dtype.str!r} (allowed kinds: {WIRE_DTYPE_KINDS})")
        return np.ndarray(buffer=obj[b"data"], dtype=dtype, shape=tuple(obj[b"shape"]))
    if b"__npgeneric__" in obj:
        dtype = np.dtype(obj[b"dtype"])
        if dtype.kind not in WIRE_DTYPE_KINDS:
            raise ValueError(f"refusing a scalar of dtype {dtype.str!r} (allowed kinds: {WIRE_DTYPE_KINDS})")
        return dtype.type(obj[b"data"])
    return obj


def packb(obj: Any) -> bytes:
    """msgpack bytes of ``obj`` with numpy arrays / scalars in openpi's encoding (module docstring).

    Raises:
        TypeError: an object, void or complex array, or a type msgpack cannot encode.
    """
    return msgpack.packb(obj, default=_encode_numpy)


def unpackb(data: bytes) -> Any:
    """Inverse of :func:`packb`. Arrays come back read-only, sharing the message's buffer.

    Raises:
        ValueError / msgpack errors: not msgpack, or an array of a refused dtype or inconsistent size.
    """
    return msgpack.unpackb(data, object_hook=_decode_numpy)


# --------------------------------------------------------------------------- the client
class PolicyClient:
    """One websocket connection to a policy server; :meth:`infer` is one round trip.

    Args:
        url: ``ws://host:port`` (``wss://`` for TLS, e.g. behind a reverse proxy).
        api_key: sent as ``Authorization: Api-Key <key>``; default: the ``COSMOS_POLICY_API_KEY``
            environment variable, if set.
        timeout: seconds to wait for the connection and for each reply (None: forever). A 2B model with
            planning can take seconds per chunk; keep this above the server's worst latency.
        wait_for_server: keep retrying a refused connection for up to this many seconds (e.g. while
            the server still loads its checkpoint).

    Raises:
        PolicyServerError: unreachable server, refused API key (HTTP 401 / 403), or bad URL.
    """

    def __init__(self, url: str = "ws://127.0.0.1:8000", api_key: str | None = None, timeout: float | None = 60.0,
                 wait_for_server: float = 0.0):
        self.url = url
        self.timeout = timeout
        key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
        headers = {"Authorization": f"Api-Key {key}"} if key else None
        deadline = time.monotonic() + wait_for_server
        while True:
            try:
                conn = websockets.sync.client.connect(url, additional_headers=headers, compression=None,
                                                      max_size=None, open_timeout=timeout)
                break
            except InvalidStatus as err:
                status = err.response.status_code
                body = err.response.body.decode(errors="replace").strip() if err.response.body else ""
                raise PolicyServerError(f"{url}: the server refused the connection (HTTP {status}"
                                        f"{': ' + body if body else ''})") from None
            except InvalidURI as err:
                raise PolicyServerError(f"{url}: not a websocket URL ({err})") from None
            except (OSError, InvalidHandshake, TimeoutError) as err:
                if time.monotonic() < deadline:
                    time.sleep(0.2)
                    continue
                raise PolicyServerError(f"{url}: cannot connect ({type(err).__name__}: {err}); is "
                                        f"`cosmos-policy serve` running there?") from None
        # Entered as a context manager: websockets >= 17.1 deprecates holding a bare connect().
        self._stack = contextlib.ExitStack()
        self._ws = self._stack.enter_context(conn)
        self._lock = threading.Lock()
        first = self._recv()
        if isinstance(first, str):
            raise PolicyServerError(f"{url}: the server sent an error instead of its metadata: {first}")
        self.metadata: dict[str, Any] = unpackb(first)
        """The server's metadata message (embodiment, cameras and image size, dims, chunk size, ...)."""

    def _recv(self) -> bytes | str:
        try:
            return self._ws.recv(timeout=self.timeout)
        except TimeoutError:
            raise PolicyServerError(f"{self.url}: no reply within {self.timeout} s") from None
        except ConnectionClosed as err:
            raise PolicyServerError(f"{self.url}: connection closed ({err})") from None

    def infer(self, observation: Mapping[str, Any]) -> dict[str, Any]:
        """Send one observation, wait for its reply.

        Args:
            observation: ``{"images": {camera: (H, W, 3) uint8}, "proprio": (P,) float, "instruction":
                str}`` (sizes in :attr:`metadata`); optional ``"seed"`` (int, reproducible sampling) and
                ``"return_images"`` (bool, ask for the decoded future frames).

        Returns:
            the reply: ``actions`` ``(K, A)`` float32 in robot units, ``value`` (float in [0, 1]),
            ``future_proprio`` ``(P,)``, ``seed`` (the seed used), ``server_timing`` (ms) and, when asked,
            ``future_images`` ``{camera: (H, W, 3) uint8}``.

        Raises:
            PolicyServerError: the server's one-line error (the connection stays usable), a timeout or
                a closed connection.
        """
        with self._lock:  # one request in flight per connection: replies come back in order
            try:
                self._ws.send(packb(dict(observation)))
            except ConnectionClosed as err:
                raise PolicyServerError(f"{self.url}: connection closed ({err})") from None
            reply = self._recv()
        if isinstance(reply, str):
            raise PolicyServerError(f"{self.url}: {reply}")
        return unpackb(reply)

    def close(self) -> None:
        """Close the connection (idempotent)."""
        self._stack.close()

    def __enter__(self) -> "PolicyClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------- receding horizon
class RecedingHorizonPolicy:
    """One action per control tick from action chunks: execute ``execute_steps`` actions of a chunk,
    then ask for a new chunk from the current observation (the closed loop of the paper's deployment).

    With ``prefetch_steps = d > 0`` the next chunk is requested ``d`` ticks before the current one runs
    out, in a background thread, from the observation of that tick, while the robot keeps executing
    (as LeRobot's asynchronous inference does, without blending chunks). Its first ``d`` actions
    belong to ticks that have passed by the time it is used, so execution starts at its action ``d``.
    Choose ``d`` >= the round-trip latency in ticks (latency x control rate) so that the robot never
    waits; every chunk after the first then executes ``execute_steps - d`` actions.

    Args:
        client: a :class:`PolicyClient` (or anything with ``infer`` and ``metadata``).
        execute_steps: actions executed per chunk; default: the server's ``execute_steps``.
        prefetch_steps: d above (0: synchronous, the robot waits for each chunk).
        extra: keys merged into every request (e.g. ``{"instruction": "open the drawer"}``).

    Raises:
        ValueError: ``execute_steps`` outside [1, chunk size] or ``prefetch_steps`` outside
            [0, execute_steps).
    """

    def __init__(self, client: Any, execute_steps: int | None = None, prefetch_steps: int = 0,
                 extra: Mapping[str, Any] | None = None):
        meta = client.metadata
        self.client = client
        self.chunk_size = int(meta.get("chunk_size", 0)) or None
        self.execute_steps = int(execute_steps or meta["execute_steps"])
        if not 1 <= self.execute_steps <= (self.chunk_size or self.execute_steps):
            raise ValueError(f"execute_steps must be in [1, {self.chunk_size}], got {self.execute_steps}")
        if not 0 <= prefetch_steps < self.execute_steps:
            raise ValueError(f"prefetch_steps must be in [0, {self.execute_steps}), got {prefetch_steps}")
        self.prefetch_steps = int(prefetch_steps)
        self.extra = dict(extra or {})
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1) if prefetch_steps else None
        self.reset()

    def reset(self) -> None:
        """Forget the current chunk (call at the start of an episode); a pending prefetch is dropped."""
        pending = getattr(self, "_pending", None)
        if pending is not None:
            pending.exception()  # let the connection finish its round trip; its outcome no longer matters
        self._pending: concurrent.futures.Future | None = None
        self._pending_tick = 0
        self._chunk: np.ndarray | None = None
        self._index = 0
        self._tick = 0
        self.calls = 0
        """Requests sent so far."""
        self.last_reply: dict[str, Any] | None = None
        """The reply the current chunk came from (value, future proprio, timing)."""

    def _request(self, observation: Mapping[str, Any]) -> dict[str, Any]:
        self.calls += 1
        return self.client.infer({**observation, **self.extra})

    def _use(self, reply: dict[str, Any], start: int) -> None:
        self.last_reply = reply
        self._chunk = np.asarray(reply["actions"])
        self._index = start

    def act(self, observation: Mapping[str, Any]) -> np.ndarray:
        """The action to execute now, ``(A,)`` in robot units.

        Args:
            observation: the current observation (see :meth:`PolicyClient.infer`).

        Raises:
            PolicyServerError: from the request.
        """
        d = self.prefetch_steps
        if self._chunk is None or self._index >= self.execute_steps:
            if self._pending is not None:
                reply, self._pending = self._pending.result(), None
                # Its observation is (tick now - tick sent) ticks old: those actions' moments are past.
                self._use(reply, self._tick - self._pending_tick)
            else:
                self._use(self._request(observation), 0)
        if d and self._pending is None and self._index >= self.execute_steps - d:
            self._pending = self._pool.submit(self._request, dict(observation))
            self._pending_tick = self._tick
        action = self._chunk[self._index]
        self._index += 1
        self._tick += 1
        return action

    def close(self) -> None:
        """Wait for a pending request and stop the prefetch thread (the client stays open)."""
        if self._pending is not None:
            self._pending.result()
            self._pending = None
        if self._pool is not None:
            self._pool.shutdown(wait=True)


__all__ = ["PolicyClient", "RecedingHorizonPolicy", "PolicyServerError", "packb", "unpackb", "API_KEY_ENV"]
