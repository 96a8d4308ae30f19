"""The failures the engine v2 rewrite made impossible, each reproduced as it was reported:
signals at random moments, views of the model after close(), absurd n_jobs, idle workers,
errors that changed type with n_jobs, custom layers workers cannot import."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import ROOT, assert_ok, run_partrain
from faulty_layers import descendants

from partrain import ParallelismWarning, Trainer, zoo
from partrain.engine import SerialEngine


def run_script(tmp_path, source: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run `source` as a script in its own interpreter (a segfault must not take pytest down)."""
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(source))
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=timeout, cwd=tmp_path)


def test_random_sigints_never_hang_lose_the_checkpoint_or_leak(tmp_path):
    """20 SIGINTs at random moments of real 2-process runs (benchmarks/stress_signals.py):
    no hang, exit 130 (or death by SIGINT if it landed while the interpreter was exiting, or
    0 if the run had ended), a readable checkpoint after every interrupt, no shared memory and
    no worker left behind."""
    report = tmp_path / "stress.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "stress_signals.py"), "--runs", "20",
         "--epochs", "2", "--timeout", "15", "--window-fraction", "0.6",
         "--json", str(report)],
        capture_output=True, text=True, timeout=540)
    assert report.exists(), proc.stderr[-3000:]
    summary = json.loads(report.read_text())["summary"]
    assert summary["interrupted"] >= 10, summary  # most signals land during training
    for count in ("hangs", "bad_exits", "missing_checkpoints", "leftover_shm", "orphans"):
        assert summary[count] == 0, (count, summary, proc.stderr[-3000:])
    assert proc.returncode == 0


def test_views_of_the_model_stay_valid_after_the_pool_closes(tmp_path):
    """A view taken inside `with Trainer(n_jobs=2)` is read after the block: once a
    segmentation fault, now the trained values, still a view of model.params."""
    proc = run_script(tmp_path, """
        import numpy as np
        from partrain import Trainer, zoo
        model = zoo.digits_cnn(seed=0)
        X = np.random.default_rng(0).random((64, 8, 8, 1)).astype("float32")
        y = np.arange(64) % 10
        params = model.params
        with Trainer(model, n_jobs=2, batch_size=32, chunk_size=16, progress=False) as t:
            t.fit(X, y, epochs=1)
            W = model.named_params()["conv1.W"]
            assert len(t.engine.worker_pids()) == 1
        assert model.params is params and np.shares_memory(W, model.params)
        print(float(W.mean()), float(model.named_params()["conv1.W"].mean()))
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got, expected = map(float, proc.stdout.split())
    assert got == expected


def test_n_jobs_far_above_the_chunks_starts_only_processes_with_work(tmp_path):
    """n_jobs=1000 on batch 32 in chunks of 16: a warning, 2 processes (1 worker), and the
    same parameters as n_jobs=1. Once it started 999 processes and never finished."""
    model = zoo.digits_cnn(seed=1)
    X = np.random.default_rng(1).random((96, 8, 8, 1)).astype("float32")
    y = np.arange(96) % 10
    expected = model.copy()
    with Trainer(expected, n_jobs=1, batch_size=32, chunk_size=16, progress=False) as t:
        t.fit(X, y, epochs=2)
    with pytest.warns(ParallelismWarning, match="n_jobs=1000 but 2 chunks per step: running "
                                                "in 2 processes"):
        trainer = Trainer(model, n_jobs=1000, batch_size=32, chunk_size=16, progress=False)
    with trainer:
        trainer.fit(X, y, epochs=2)
        assert trainer.plan.processes == 2
        assert len(trainer.engine.worker_pids()) == 1
        assert len(descendants(os.getpid()) - {os.getpid()}) <= 3  # 1 worker (+ loky helpers)
    np.testing.assert_array_equal(model.params, expected.params)


def test_cli_n_jobs_1000_finishes_and_says_what_runs(tmp_path):
    """`partrain train --n-jobs 1000` (digits, one chunk per step) runs in one process and
    says so; it once did not finish a 0.2 s epoch in 120 s."""
    pytest.importorskip("sklearn", reason="the digits dataset needs scikit-learn")
    proc = run_partrain("train", "--n-jobs", "1000", "--chunk-size", "32", "--epochs", "1",
                        "--quiet", cwd=tmp_path, timeout=60)
    assert_ok(proc)
    assert "note: n_jobs=1000 but 1 chunk per step: running in one process; use --chunk-size 16 "\
           "to split" in proc.stderr


def test_a_one_chunk_step_never_starts_an_idle_worker(tmp_path):
    """n_jobs=2 with one chunk per step (the README's quick start, digits batch 32, as it was
    chunked): no pool at all, a warning naming the chunk size that would split the batch and
    the batch that would keep 2 processes busy; the header says it too."""
    pytest.importorskip("sklearn", reason="the digits dataset needs scikit-learn")
    with pytest.warns(ParallelismWarning, match=r"use chunk_size=16 to split \(batch_size=64 "
                                                "would keep 2 processes busy"):
        trainer = Trainer(zoo.digits_cnn(), n_jobs=2, batch_size=32, chunk_size=32,
                          progress=False)
    assert trainer.plan.processes == 1 and isinstance(trainer.engine, SerialEngine)
    proc = run_partrain("train", "--n-jobs", "2", "--chunk-size", "32", "--epochs", "1",
                        cwd=tmp_path, timeout=60)
    assert_ok(proc)
    assert "note: n_jobs=2 but 1 chunk per step: running in one process; use --chunk-size 16 to "\
           "split" in proc.stderr
    assert "ParallelismWarning" not in proc.stderr  # said once, in plain words


def test_a_layer_class_defined_in_the_script_is_refused_before_any_worker_starts(tmp_path):
    """A custom layer in a script's __main__: with n_jobs=2 a ValueError saying to move it into
    an importable module, raised before any process starts; with n_jobs=1 it trains."""
    proc = run_script(tmp_path, """
        import os, numpy as np
        from partrain import Sequential, Trainer
        from partrain.layers import Dense, Layer, register_layer

        @register_layer
        class Identity(Layer):
            def forward(self, p, x, ctx, index):
                return x, None

        def model():
            return Sequential([Identity(), Dense(10)], (8,), seed=0)

        X = np.random.default_rng(0).random((32, 8)).astype("float32")
        y = np.arange(32) % 10
        Trainer(model(), n_jobs=1, batch_size=16, chunk_size=8, progress=False).fit(X, y)
        try:
            Trainer(model(), n_jobs=2, batch_size=16, chunk_size=8, progress=False).fit(X, y)
        except ValueError as exc:
            print(exc)
        children = 0
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/stat") as f:
                    children += f.read().rsplit(")", 1)[1].split()[1] == str(os.getpid())
            except OSError:
                pass
        print(children)
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    message, children = proc.stdout.splitlines()
    assert "Identity" in message and "__main__" in message
    assert "Move the class into a module" in message
    assert children == "0"  # no worker was ever started
