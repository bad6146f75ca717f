"""``cosmos-policy serve`` for real: a websocket server on 127.0.0.1 with a tiny trained checkpoint (MiniLM
text), queried by the package's client and by the real ``openpi-client`` package. Replies must equal the
in-process ``CosmosPolicy`` with the same seed; bad requests are answered and the connection stays usable;
API keys are checked before any inference; simultaneous clients share forward passes; the CLI server
stops cleanly on SIGTERM. Every server here binds 127.0.0.1 and stops at the end of its test."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import msgpack
import numpy as np
import pytest
import websockets.sync.client

from cosmos_policy_lightning.client import (API_KEY_ENV, PolicyClient, PolicyServerError, RecedingHorizonPolicy, packb,
                                            unpackb)
from cosmos_policy_lightning.embodiment import Embodiment
from cosmos_policy_lightning.inference.policy import CosmosPolicy
from cosmos_policy_lightning.inference.server import PolicyServer
from cosmos_policy_lightning.inference.service import PolicyService
from cosmos_policy_lightning.text import build_text_encoder

from ..fixtures.checkpoint_factory import make_checkpoint

pytestmark = pytest.mark.timeout(120)  # every server test stops by itself

K, A, P, STEPS = 4, 2, 3, 2


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("server"), text_encoder=build_text_encoder("minilm"))


@pytest.fixture(scope="module")
def reference(ckpt):
    """The in-process policy the server's replies are compared with (loaded separately)."""
    return CosmosPolicy.from_checkpoint(ckpt)


@pytest.fixture(scope="module")
def served(ckpt):
    """The policy behind the servers of this module."""
    return CosmosPolicy.from_checkpoint(ckpt)


@pytest.fixture(scope="module")
def server(served):
    srv = PolicyServer(PolicyService(served, num_steps=STEPS, seed=100), port=0, max_batch_size=4)
    with srv.running_in_thread():
        yield srv


def observation(seed=0, instruction="push the block"):
    rng = np.random.default_rng(seed)
    return {"images": {"wrist": rng.integers(0, 256, (32, 32, 3), dtype=np.uint8),
                       "front": rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)},
            "proprio": rng.uniform(-2, 3, P), "instruction": instruction}


def in_process(policy, obs, seed, **kw):
    return policy(obs, num_steps=STEPS, seed=seed, decode_images=kw.pop("decode_images", False), **kw)


def test_metadata_on_connect_and_health_check(server):
    with PolicyClient(server.url) as client:
        meta = client.metadata
    assert meta["embodiment"] == "toy" and meta["chunk_size"] == K and meta["action_dim"] == A
    assert meta["proprio_dim"] == P and meta["image_size"] == [32, 32]
    assert [c["name"] for c in meta["cameras"]] == ["wrist", "front"]
    assert meta["instruction"]["conditioned"] and meta["instruction"]["required"]
    assert meta["instruction"]["text_encoder"].startswith("minilm")
    assert meta["sampling"]["num_steps"] == STEPS and meta["batching"]["max_batch_size"] == 4
    assert Embodiment.from_dict(meta["embodiment_config"]).to_dict() == server.service.embodiment.to_dict()
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz", timeout=10) as resp:
        assert resp.status == 200 and resp.read() == b"OK\n"


def test_package_client_gets_the_in_process_actions(server, reference):
    with PolicyClient(server.url) as client:
        for i, seed in enumerate((3, 4, 2**40)):
            obs = observation(i)
            reply = client.infer({**obs, "seed": seed})
            expected = in_process(reference, obs, seed)
            assert reply["actions"].shape == (K, A) and reply["actions"].dtype == np.float32
            np.testing.assert_array_equal(reply["actions"], expected.actions)
            np.testing.assert_array_equal(reply["future_proprio"], expected.future_proprio)
            assert reply["value"] == float(expected.value) and reply["seed"] == seed
            timing = reply["server_timing"]
            assert timing["infer_ms"] > 0 and timing["batch_size"] == 1 and ("prev_total_ms" in timing) == (i > 0)
        # no seed: the server assigns one and reports it, so the reply can be reproduced
        reply = client.infer(observation(5))
        np.testing.assert_array_equal(reply["actions"], in_process(reference, observation(5), reply["seed"]).actions)
        # decoded future frames on request, equal to the in-process ones
        reply = client.infer({**observation(6), "seed": 9, "return_images": True})
        expected = in_process(reference, observation(6), 9, decode_images=True)
        assert set(reply["future_images"]) == {"wrist", "front"}
        np.testing.assert_array_equal(reply["future_images"]["front"], expected.future_images["front"])
        assert "future_images" not in client.infer({**observation(6), "seed": 9})


OPENPI_MISSING = "openpi-client is installed apart: pip install --no-deps openpi-client==0.1.2 (README)"
OPENPI_WARNING = r"ignore:connect\(\) must be used as a context manager:DeprecationWarning"  # in openpi-client


@pytest.mark.filterwarnings(OPENPI_WARNING)
def test_openpi_client_gets_the_in_process_actions(server, reference):
    pytest.importorskip("openpi_client", reason=OPENPI_MISSING)
    from openpi_client import msgpack_numpy
    from openpi_client.websocket_client_policy import WebsocketClientPolicy

    policy = WebsocketClientPolicy(host=server.url)
    try:
        meta = policy.get_server_metadata()
        assert meta["chunk_size"] == K and meta["embodiment"] == "toy"
        obs = {**observation(7), "seed": 21}
        reply = policy.infer(obs)
        np.testing.assert_array_equal(reply["actions"], in_process(reference, observation(7), 21).actions)
        # openpi's own decoder reads our replies; its "prompt" key works as the instruction
        assert reply["server_timing"]["batch_size"] == 1
        obs = {**observation(7), "seed": 21}
        obs["prompt"] = obs.pop("instruction")
        np.testing.assert_array_equal(policy.infer(obs)["actions"], reply["actions"])
        # a bad request raises in the openpi client, and the connection stays usable
        with pytest.raises(RuntimeError, match=r"bad request: proprio: expected shape \(3,\)"):
            policy.infer({**obs, "proprio": np.zeros(5)})
        np.testing.assert_array_equal(policy.infer(obs)["actions"], reply["actions"])
        assert msgpack_numpy.unpackb(packb({"a": np.arange(3)}))["a"].tolist() == [0, 1, 2]
    finally:
        policy._ws.close()


def _bad(kind: str) -> tuple[bytes | str, str]:
    """A bad message of each kind and the start of its error reply."""
    obs = {**observation(8), "seed": 1}
    if kind == "missing camera":
        del obs["images"]["front"]
        return packb(obs), "bad request: images.front: camera missing"
    if kind == "wrong image size":
        obs["images"]["wrist"] = np.zeros((48, 64, 3), np.uint8)
        return packb(obs), "bad request: images.wrist: expected shape (32, 32, 3)"
    if kind == "float image":
        obs["images"]["wrist"] = np.zeros((32, 32, 3), np.float32)
        return packb(obs), "bad request: images.wrist: expected dtype uint8"
    if kind == "wrong proprio length":
        obs["proprio"] = np.zeros(5)
        return packb(obs), "bad request: proprio: expected shape (3,)"
    if kind == "NaN proprio":
        obs["proprio"] = np.array([0.0, np.nan, 1.0])
        return packb(obs), "bad request: proprio: contains NaN or inf at index 1"
    if kind == "missing instruction":
        del obs["instruction"]
        return packb(obs), "bad request: instruction: missing"
    if kind == "bad seed":
        obs["seed"] = "seven"
        return packb(obs), "bad request: seed:"
    if kind == "not msgpack":
        return b"\xc1\xc1 not msgpack", "bad request: message: not msgpack"
    if kind == "object array":  # refused by the decoder: no pickle, no pointers from the wire
        arr = {b"__ndarray__": True, b"data": b"\0" * 8, b"dtype": "|O", b"shape": [1]}
        return msgpack.packb({**obs, "images": {"wrist": arr}}, default=lambda o: o.tolist()), \
            "bad request: message: not msgpack-numpy data"
    if kind == "text frame":
        return "hello", "bad request: message: expected a binary msgpack frame"
    raise AssertionError(kind)


BAD_KINDS = ["missing camera", "wrong image size", "float image", "wrong proprio length", "NaN proprio",
             "missing instruction", "bad seed", "not msgpack", "object array", "text frame"]


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_request_gets_an_error_and_the_connection_stays_usable(server, reference, kind):
    message, expected = _bad(kind)
    good = {**observation(9), "seed": 5}
    with websockets.sync.client.connect(server.url, compression=None) as ws:
        unpackb(ws.recv(timeout=10))  # metadata
        ws.send(message)
        reply = ws.recv(timeout=30)
        assert isinstance(reply, str), "errors travel as text frames (openpi clients raise on them)"
        assert reply.startswith(expected) and "\n" not in reply, reply
        ws.send(packb(good))
        reply = ws.recv(timeout=30)
        assert isinstance(reply, bytes)
        np.testing.assert_array_equal(unpackb(reply)["actions"], in_process(reference, observation(9), 5).actions)


def test_package_client_raises_the_error_and_goes_on(server):
    with PolicyClient(server.url) as client:
        with pytest.raises(PolicyServerError, match="images.wrist: expected shape"):
            client.infer({**observation(1), "images": {"wrist": np.zeros((8, 8, 3), np.uint8),
                                                       "front": np.zeros((32, 32, 3), np.uint8)}})
        assert client.infer(observation(1))["actions"].shape == (K, A)


def test_planning_server_replies_with_the_in_process_plan(served, reference):
    from cosmos_policy_lightning.inference.planning import Planner

    kw = dict(num_proposals=2, num_futures=2, num_values=2, policy_steps=1, world_model_steps=2, value_steps=1)
    srv = PolicyServer(PolicyService(served, Planner(served, **kw)), port=0, max_batch_size=4)
    assert srv.max_batch_size == 1  # a plan is already a batch of N x F x V samples
    with srv.running_in_thread(), PolicyClient(srv.url) as client:
        assert client.metadata["planning"]["num_proposals"] == 2
        reply = client.infer({**observation(4), "seed": 11})
        with pytest.raises(PolicyServerError, match="return_images: this server plans"):
            client.infer({**observation(4), "return_images": True})
    plan = Planner(reference, **kw).plan(observation(4), seed=11)
    np.testing.assert_array_equal(reply["actions"], plan.actions)
    assert reply["planning"]["best_index"] == plan.best_index and reply["value"] == plan.value
    np.testing.assert_array_equal(reply["planning"]["scores"], plan.scores.astype(np.float32))
    assert reply["future_proprio"].shape == (P,)


def test_two_concurrent_clients_share_one_forward_pass(served, reference):
    # The first request waits up to 5 s for a second; the batch is full at 2 and runs at once.
    srv = PolicyServer(PolicyService(served, num_steps=STEPS), port=0, max_batch_size=2, batch_window_ms=5000)
    batch_sizes: list[int] = []
    hook = served.module.dit.register_forward_pre_hook(lambda mod, args: batch_sizes.append(args[0].shape[0]))
    replies: dict[int, dict] = {}
    barrier = threading.Barrier(2, timeout=30)

    def robot(i: int) -> None:
        with PolicyClient(srv.url) as client:
            barrier.wait()
            replies[i] = client.infer({**observation(10 + i), "seed": 50 + i})

    try:
        with srv.running_in_thread():
            threads = [threading.Thread(target=robot, args=(i,)) for i in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
    finally:
        hook.remove()
    assert sorted(replies) == [0, 1]
    assert batch_sizes == [2] * STEPS, "both requests went through the network together"
    assert srv.stats["batches"] == 1
    for i, reply in replies.items():
        assert reply["server_timing"]["batch_size"] == 2
        # each request keeps its own noise stream: the in-process result of that observation and seed
        np.testing.assert_allclose(reply["actions"], in_process(reference, observation(10 + i), 50 + i).actions,
                                   rtol=1e-5, atol=1e-5)


def test_many_requests_from_concurrent_clients_are_all_answered(server, reference):
    replies: dict[tuple[int, int], dict] = {}
    errors: list[BaseException] = []

    def robot(i: int) -> None:
        try:
            with PolicyClient(server.url) as client:
                for j in range(3):
                    replies[i, j] = client.infer({**observation(20 + i), "seed": 7 * i + j})
        except BaseException as err:  # reported in the main thread
            errors.append(err)

    threads = [threading.Thread(target=robot, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert not errors, errors
    assert len(replies) == 9
    for (i, j), reply in replies.items():
        expected = in_process(reference, observation(20 + i), 7 * i + j).actions
        np.testing.assert_allclose(reply["actions"], expected, rtol=1e-5, atol=1e-5,
                                   err_msg=str((i, j, reply["server_timing"])))


def test_api_key_is_checked_before_any_inference(served, monkeypatch):
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    srv = PolicyServer(PolicyService(served, num_steps=1), port=0, api_key="s3cret")
    calls: list[int] = []
    hook = served.module.dit.register_forward_pre_hook(lambda mod, args: calls.append(1))
    try:
        with srv.running_in_thread():
            with pytest.raises(PolicyServerError, match="HTTP 401"):
                PolicyClient(srv.url)
            with pytest.raises(PolicyServerError, match="HTTP 403"):
                PolicyClient(srv.url, api_key="guess")
            assert calls == [] and srv.stats["refused"] == 2 and srv.stats["connections"] == 0
            with urllib.request.urlopen(f"http://127.0.0.1:{srv.port}/healthz", timeout=10) as resp:
                assert resp.status == 200  # health checks need no key
            with PolicyClient(srv.url, api_key="s3cret") as client:
                assert client.infer(observation(1))["actions"].shape == (K, A)
            monkeypatch.setenv(API_KEY_ENV, "s3cret")
            with PolicyClient(srv.url) as client:  # the key from the environment
                assert client.infer(observation(1))["actions"].shape == (K, A)
    finally:
        hook.remove()
    assert srv.stats["connections"] == 2 and len(calls) == 2


@pytest.mark.filterwarnings(OPENPI_WARNING)
def test_openpi_client_sends_the_api_key_the_server_checks(served):
    pytest.importorskip("openpi_client", reason=OPENPI_MISSING)
    from openpi_client.websocket_client_policy import WebsocketClientPolicy
    from websockets.exceptions import InvalidStatus

    srv = PolicyServer(PolicyService(served, num_steps=1), port=0, api_key="s3cret")
    with srv.running_in_thread():
        for wrong in (None, "guess"):
            with pytest.raises(InvalidStatus, match="401" if wrong is None else "403"):
                WebsocketClientPolicy(host=srv.url, api_key=wrong)
        assert srv.stats["requests"] == 0 and srv.stats["refused"] == 2
        openpi = WebsocketClientPolicy(host=srv.url, api_key="s3cret")
        try:
            assert openpi.infer(observation(1))["actions"].shape == (K, A)
        finally:
            openpi._ws.close()


class RecordingClient(PolicyClient):
    """A real client that remembers which observation (by its first proprio value) each request carried."""

    def __init__(self, url):
        super().__init__(url)
        self.sent: list[float] = []

    def infer(self, observation):
        self.sent.append(float(observation["proprio"][0]))
        return super().infer(observation)


def test_receding_horizon_executes_part_of_each_chunk_then_asks_again(server):
    def obs(t):
        return {**observation(0), "proprio": np.array([float(t), 0.0, 0.0])}

    with RecordingClient(server.url) as client:
        policy = RecedingHorizonPolicy(client, execute_steps=2)
        actions, chunks = [], []
        for t in range(5):
            actions.append(policy.act(obs(t)))
            chunks.append(policy.last_reply["actions"])
        assert client.sent == [0.0, 2.0, 4.0] and policy.calls == 3
        for t in range(5):
            np.testing.assert_array_equal(actions[t], chunks[t][t % 2])

        # prefetch one tick ahead: the request leaves one tick before the chunk runs out, and the new
        # chunk starts at its action 1 (action 0 belonged to the tick that has passed meanwhile)
        client.sent.clear()
        policy = RecedingHorizonPolicy(client, execute_steps=3, prefetch_steps=1)
        actions, chunks = [], []
        for t in range(7):
            actions.append(policy.act(obs(t)))
            chunks.append(policy.last_reply["actions"])
        policy.close()
        assert client.sent == [0.0, 2.0, 4.0, 6.0]
        expected_index = [0, 1, 2, 1, 2, 1, 2]
        for t in range(7):
            np.testing.assert_array_equal(actions[t], chunks[t][expected_index[t]])
        assert not np.array_equal(chunks[2], chunks[3])
        with pytest.raises(ValueError, match="prefetch_steps"):
            RecedingHorizonPolicy(client, execute_steps=2, prefetch_steps=2)


def _read_lines(stream, out: queue.Queue) -> None:
    for line in iter(stream.readline, ""):
        out.put(line)
    out.put(None)


def test_cli_server_answers_and_stops_cleanly_on_sigterm(ckpt, reference, tmp_path):
    env = {**os.environ, API_KEY_ENV: "from-env", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "cosmos_policy_lightning.cli", "serve", str(ckpt), "--port", "0",
                             "--num_steps", str(STEPS)], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            text=True, env=env)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_read_lines, args=(proc.stderr, lines), daemon=True).start()
    log: list[str] = []

    def wait_for(pattern: str, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                break
            log.append(line)
            if m := re.search(pattern, line):
                return m
        raise AssertionError(f"no {pattern!r} in the server's log:\n{''.join(log)}")

    try:
        url = wait_for(r"listening on (ws://127\.0\.0\.1:\d+)", 90).group(1)
        with urllib.request.urlopen(url.replace("ws://", "http://") + "/healthz", timeout=10) as resp:
            assert resp.status == 200
        with pytest.raises(PolicyServerError, match="HTTP 401"):
            PolicyClient(url, api_key="")
        with PolicyClient(url, api_key="from-env") as client:
            reply = client.infer({**observation(3), "seed": 8})
            np.testing.assert_array_equal(reply["actions"], in_process(reference, observation(3), 8).actions)
            wait_for(r"seed 8, batch 1, queue [\d.]+ ms, infer [\d.]+ ms, total [\d.]+ ms", 10)  # latency log
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0
        wait_for(r"stopped after 1 requests \(0 bad\)", 5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_serve_takes_the_checkpoint_as_an_option_or_positionally(tmp_path, capsys):
    from cosmos_policy_lightning.cli import main

    ckpt = str(tmp_path / "policy.ckpt")
    for args in (["--checkpoint", ckpt], [f"--checkpoint={ckpt}"], [ckpt]):
        with pytest.raises(SystemExit) as info:
            main(["serve", *args, "--port", "0", "--print_config"])
        assert info.value.code == 0
        out = capsys.readouterr().out
        assert f"checkpoint: {ckpt}" in out and "port: 0" in out
