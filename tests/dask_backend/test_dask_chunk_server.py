"""The chunk servers' own TCP port (issue 23 item 6): a local process that connects first
(garbage, a wrong secret, a huge length header) does not take a worker out of the run, and
both ends prove they know the server's secret before anything else is read.

Before: a server accepted ONE connection and closed its listener, so whoever connected first
took that worker out (with both workers taken the run failed); the engine proved nothing
back, so a fake server could answer it, and the engine unpickled its failure replies."""

import os
import socket
import threading

import numpy as np
import pytest

pytest.importorskip(
    "distributed", reason="backend='dask' needs dask[distributed] (pip install 'partrain[dask]')")

from partrain import Trainer  # noqa: E402
from partrain.dask_engine import (  # noqa: E402
    HANDSHAKE_S,
    HEADER,
    HELLO,
    MAC_BYTES,
    NONCE_BYTES,
    STEP,
    DaskEngine,
    authenticate_engine,
    authenticate_master,
)
from partrain.layers import Conv2D, Dense, Dropout, Flatten, MaxPool2D, ReLU  # noqa: E402
from partrain.model import Sequential  # noqa: E402

SECRET = bytes(range(16))


def cnn():
    return Sequential([Conv2D(4, 3, pad=1), ReLU(), MaxPool2D(2), Flatten(), Dropout(0.3),
                       Dense(10)], (8, 8, 1), seed=0)


def attacks(host: str, port: int) -> list[socket.socket]:
    """Connections a stranger opens to a chunk server before the engine, left open."""
    opened = []
    for payload in (os.urandom(40),  # garbage
                    HELLO + os.urandom(NONCE_BYTES) + os.urandom(MAC_BYTES),  # wrong secret
                    SECRET,  # the old protocol's first message, wrong secret
                    HEADER.pack(STEP, 1 << 62, 1 << 62)):  # a huge length header
        sock = socket.create_connection((host, port), timeout=5)
        sock.sendall(payload)
        opened.append(sock)
    return opened


def test_strangers_on_every_chunk_server_port_do_not_stop_a_run(monkeypatch):
    """3 epochs on a local cluster of 2 workers; before the engine connects to each server,
    4 hostile connections are made to its port and held open. Both workers still compute,
    and the parameters are those of n_jobs=1."""
    held = []
    open_socket = DaskEngine._open_socket

    def attacked_first(self, actor):
        host, port, _ = actor.endpoint().result(timeout=10)
        held.extend(attacks(host, port))
        return open_socket(self, actor)

    monkeypatch.setattr(DaskEngine, "_open_socket", attacked_first)
    rng = np.random.default_rng(1)
    X = rng.random((96, 8, 8, 1)).astype(np.float32)
    y = rng.integers(0, 10, 96)
    results = []
    for options in ({"backend": "dask", "n_jobs": 2}, {"n_jobs": 1}):
        model = cnn()
        with Trainer(model, batch_size=32, chunk_size=8, seed=3, progress=False,
                     **options) as trainer:
            trainer.fit(X, y, epochs=3)
            if options.get("backend") == "dask":
                assert trainer.engine.last_bytes["workers"] == 2
                assert trainer.engine.transport == "socket"
        results.append((model.params.copy(), trainer.history.history["loss"]))
    for sock in held:
        sock.close()
    assert len(held) == 8
    np.testing.assert_array_equal(results[0][0], results[1][0])
    assert results[0][1] == results[1][1]


def serve_once(handler) -> tuple[str, int]:
    """A one-connection server running `handler(conn)` in a thread; its (host, port)."""
    listener = socket.create_server(("127.0.0.1", 0))

    def run():
        with listener:
            conn, _ = listener.accept()
            with conn:
                handler(conn)

    threading.Thread(target=run, daemon=True).start()
    return listener.getsockname()[:2]


@pytest.mark.parametrize("reply", ["wrong-secret", "http", "silent"])
def test_engine_refuses_a_server_that_does_not_prove_the_secret(reply):
    """ConnectionError, and the engine never sends its own proof to such a server."""
    received = []

    def fake(conn):
        received.append(conn.recv(len(HELLO) + NONCE_BYTES, socket.MSG_WAITALL))
        if reply == "wrong-secret":
            conn.sendall(os.urandom(NONCE_BYTES + MAC_BYTES))
        elif reply == "http":
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000000\r\n\r\n")
        conn.settimeout(2)
        try:
            received.append(conn.recv(100))
        except TimeoutError:
            received.append(b"")

    sock = socket.create_connection(serve_once(fake))
    with sock, pytest.raises(ConnectionError):
        authenticate_master(sock, SECRET, timeout=1.0)
    sock.close()
    while len(received) < 2:
        threading.Event().wait(0.05)
    assert received[0].startswith(HELLO) and received[1] == b""


def test_engine_and_server_with_the_same_secret_authenticate_each_other():
    outcome = []
    address = serve_once(lambda conn: outcome.append(authenticate_engine(conn, SECRET)))
    with socket.create_connection(address) as sock:
        authenticate_master(sock, SECRET, timeout=5.0)
    while not outcome:
        threading.Event().wait(0.05)
    assert outcome == [True]


@pytest.mark.parametrize("payload", [b"", b"garbage" * 10, SECRET,
                                     HEADER.pack(STEP, 1 << 62, 1 << 62),
                                     HELLO + bytes(NONCE_BYTES) + bytes(MAC_BYTES)])
def test_server_refuses_peers_that_do_not_prove_the_secret(payload):
    """Within HANDSHAKE_S, without reading more than the handshake's fixed sizes."""
    outcome = []
    address = serve_once(lambda conn: outcome.append(authenticate_engine(conn, SECRET)))
    with socket.create_connection(address) as sock:
        sock.sendall(payload)
        sock.settimeout(HANDSHAKE_S + 5)
        try:
            while sock.recv(4096):  # the server's nonce and proof, if it got a HELLO
                pass
        except ConnectionResetError:  # closed with our unread bytes in its buffer
            pass
    while not outcome:
        threading.Event().wait(0.05)
    assert outcome == [False]


