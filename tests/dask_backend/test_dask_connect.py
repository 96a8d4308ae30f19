"""A wrong `--scheduler`: whatever answers at the address (nothing, a silent
server, an "HTTP/1.1" reply, garbage), connecting ends within the connect timeout in one line
with exit status 2, Ctrl-C and SIGTERM work while connecting, and tls:// is refused before
connecting. Throwaway servers run in threads of the test process.

Before: a silent server hung the CLI for good, ignoring SIGINT and SIGTERM; an "HTTP/1.1"
reply made Dask allocate exabytes (MemoryError traceback); tls:// ended in a traceback."""

import signal
import socket
import struct
import subprocess
import sys
import threading

import pytest
from conftest import assert_usage_error, run_partrain, subprocess_env

pytest.importorskip(
    "distributed", reason="backend='dask' needs dask[distributed] (pip install 'partrain[dask]')")

from partrain.dask_engine import DaskEngine  # noqa: E402
from partrain.layers import Dense  # noqa: E402
from partrain.model import Sequential  # noqa: E402

TINY = ["--dataset", "synthetic", "--epochs", 1]
REPLIES = {  # what the server sends as soon as a client connects (None: nothing, ever)
    "silent": None,
    "http": b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    "garbage": struct.pack("<Q", 5) + b"hello",
}
CLIENTS: dict[str, list] = {}  # server address -> the connections it accepted


@pytest.fixture
def server(request):
    """A local TCP server sending REPLIES[request.param] to every client; yields its address."""
    reply = REPLIES[request.param]
    listener = socket.create_server(("127.0.0.1", 0))
    held, stop = [], threading.Event()

    def serve():
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            held.append(conn)  # kept open: a silent server never answers nor hangs up
            if reply is not None:
                conn.sendall(reply)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    address = f"tcp://127.0.0.1:{listener.getsockname()[1]}"
    CLIENTS[address] = held
    yield address
    stop.set()
    thread.join()
    listener.close()
    for conn in held:
        conn.close()


@pytest.mark.parametrize("server, words", [
    ("silent", ["no Dask handshake within 10 s"]),
    ("http", ["not a Dask scheduler", "HTTP/1.1"]),
    ("garbage", ["not a Dask scheduler"]),
], indirect=["server"])
def test_wrong_scheduler_is_one_line_and_exit_2(tmp_path, server, words):
    proc = run_partrain("train", *TINY, "--quiet", "--backend", "dask", "--scheduler", server,
                        cwd=tmp_path, timeout=60)
    assert_usage_error(proc, server, *words)


@pytest.mark.parametrize("server", ["silent"], indirect=True)
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_while_connecting_stops_the_run(tmp_path, server, signum):
    """The signal lands while the CLI waits for the silent server's handshake: the run ends
    as interrupted (128 + signal), not as a connect failure nor a hang."""
    proc = subprocess.Popen([sys.executable, "-m", "partrain", "train", *map(str, TINY),
                             "--backend", "dask", "--scheduler", server], cwd=tmp_path,
                            env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(600):  # until the CLI is connected and waiting for the handshake
            if CLIENTS[server] or proc.poll() is not None:
                break
            threading.Event().wait(0.05)
        threading.Event().wait(0.5)
        proc.send_signal(signum)
        _, rest = proc.communicate(timeout=30)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 128 + signum, rest
    assert "Traceback" not in rest


def test_tls_address_is_refused_before_connecting(tmp_path):
    proc = run_partrain("train", *TINY, "--quiet", "--backend", "dask", "--scheduler",
                        "tls://127.0.0.1:1", cwd=tmp_path, timeout=60)
    assert_usage_error(proc, "--scheduler", "tls://127.0.0.1:1", "tcp://")
    model = Sequential([Dense(3)], (4,), seed=0)
    with pytest.raises(ValueError, match="must be tcp://HOST:PORT, got 'tls://"):
        DaskEngine(model, 8, 1, 32, scheduler="tls://127.0.0.1:1")


@pytest.mark.parametrize("server", ["silent"], indirect=True)
def test_engine_connect_timeout_bounds_a_silent_server(server):
    """The library path: ConnectionError naming the address after `connect_timeout`; an
    interrupt requested meanwhile is raised instead, from the waiting loop."""
    model = Sequential([Dense(3)], (4,), seed=0)
    with pytest.raises(ConnectionError, match="no Dask handshake within 0.5 s"):
        DaskEngine(model, 8, 1, 32, scheduler=server, connect_timeout=0.5)

    def interrupt():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        DaskEngine(model, 8, 1, 32, scheduler=server, check_interrupt=interrupt)
