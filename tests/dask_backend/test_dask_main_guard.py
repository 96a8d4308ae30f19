"""backend="dask" from a plain script with no `if __name__ == "__main__":` guard (issue 22):
the local cluster's workers are spawned without re-running the script, so it trains, prints
no traceback and leaves no worker behind."""

import os
import subprocess
import sys
import textwrap

import pytest
from faulty_layers import wait_gone

pytest.importorskip(
    "distributed", reason="backend='dask' needs dask[distributed] (pip install 'partrain[dask]')")

SCRIPT = textwrap.dedent("""\
    import numpy as np
    from partrain import Trainer, zoo

    model = zoo.mlp((16, 8, 3), input_shape=(4, 4, 1))
    rng = np.random.default_rng(0)
    X = rng.random((64, 4, 4, 1), dtype=np.float32)
    y = rng.integers(0, 3, 64)
    trainer = Trainer(model, n_jobs=2, backend="dask", batch_size=32, chunk_size=16,
                      progress=False)
    trainer.fit(X, y, epochs=2)
    print("workers", *trainer.engine.worker_pids(), flush=True)
    trainer.close()
    print("trained", flush=True)
""")


@pytest.mark.parametrize("how", ["path", "module"])
def test_unguarded_script_trains_with_a_local_cluster(tmp_path, how):
    """`python script.py` and `python -m script`: exit 0, both workers computed, no
    traceback, the workers gone afterwards. (Before: "Nanny failed to start" tracebacks.)"""
    (tmp_path / "plain_script.py").write_text(SCRIPT)
    command = ["plain_script.py"] if how == "path" else ["-m", "plain_script"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, *command], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and "bootstrapping" not in done.stderr
    lines = done.stdout.splitlines()
    assert lines[-1] == "trained"
    pids = [int(pid) for pid in lines[-2].split()[1:]]
    assert len(pids) == 2
    assert wait_gone(pids) == []
