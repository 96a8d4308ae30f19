"""`partrain train` says what runs: the header names the backend (serial, loky, dask; a Dask
scheduler given by address with its workers' count), --help states every default, the
model's default file name says what it holds, and the history holds plain numbers."""

import json

import numpy as np
import pytest
from conftest import assert_ok, run_partrain

import partrain
from partrain import Trainer, cli, zoo

TINY = ["--dataset", "synthetic", "--epochs", "1"]  # digits-cnn on 1,024 synthetic images


def header(stderr: str) -> str:
    (line,) = [line for line in stderr.splitlines() if line.startswith("Training ")]
    return line


@pytest.mark.parametrize("options, says", [
    ([], "on the serial backend (1 process), batch 32"),
    (["--n-jobs", "2", "--chunk-size", "16"], "on the loky backend (2 processes), batch 32"),
    (["--n-jobs", "3", "--chunk-size", "16"], "on the loky backend (2 processes, of n_jobs=3)"),
])
def test_header_names_the_local_backend(options, says, tmp_path):
    proc = run_partrain("train", *TINY, *options, cwd=tmp_path)
    assert_ok(proc)
    assert says in header(proc.stderr), proc.stderr
    assert "n_jobs=1" not in proc.stderr


def test_header_names_a_dask_scheduler_and_its_workers(tmp_path, monkeypatch, capsys):
    """--scheduler ADDRESS with the default --n-jobs 1: the header says dask, the address
    and the cluster's 2 workers (it said n_jobs=1)."""
    distributed = pytest.importorskip("distributed", reason="the dask backend needs dask")
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                       host="127.0.0.1", dashboard_address=None)
    try:
        monkeypatch.chdir(tmp_path)
        status = cli.main(["train", *TINY, "--backend", "dask", "--scheduler",
                           cluster.scheduler_address, "--save", "m.npz"])
        err = capsys.readouterr().err
        assert status == 0, err
        line = header(err)
        assert f"on the dask backend (scheduler {cluster.scheduler_address}, 2 workers)" in line
        assert "n_jobs" not in line
    finally:
        cluster.close()


def test_header_names_a_local_dask_cluster(tmp_path):
    pytest.importorskip("distributed", reason="the dask backend needs dask")
    proc = run_partrain("train", *TINY, "--backend", "dask", "--n-jobs", "2", "--chunk-size",
                        "16", cwd=tmp_path)
    assert_ok(proc)
    assert "on the dask backend (a local cluster of 2 worker processes)" in header(proc.stderr)


def test_train_help_states_every_default():
    (train,) = [action.choices["train"] for action in cli.make_parser()._actions
                if getattr(action, "choices", None) and "train" in action.choices]
    undocumented = [action.option_strings[0] for action in train._actions
                    if action.option_strings != ["-h", "--help"]
                    and "default" not in (action.help or "")]
    assert not undocumented, undocumented


def test_default_model_file_says_what_it_holds(tmp_path):
    """No --save: `<model>-<dataset>.npz` (digits-cnn-synthetic.npz), said on stdout."""
    proc = run_partrain("train", *TINY, "--quiet", "--history", "h.json", cwd=tmp_path)
    assert_ok(proc)
    assert "model saved to digits-cnn-synthetic.npz" in proc.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits-cnn-synthetic.npz", "h.json"]
    assert partrain.load(tmp_path / "digits-cnn-synthetic.npz").metadata["model"] == "digits-cnn"
    assert cli.default_save_name("mlp", "npz:/data/fashion.npz") == "mlp-fashion.npz"


def test_history_values_are_plain_python_numbers():
    """With workers, examples_per_s and the timings were numpy.float64."""
    X = np.random.default_rng(0).random((64, 8, 8, 1)).astype("float32")
    y = np.arange(64) % 10
    with Trainer(zoo.digits_cnn(), batch_size=32, chunk_size=16, n_jobs=2, progress=False,
                 lr_schedule=lambda epoch: np.float32(1e-3)) as trainer:
        history = trainer.fit(X, y, epochs=2, validation_split=0.25).history
    kinds = {key: {type(v) for v in values} for key, values in history.items() if values}
    assert all(types <= {float, int} for types in kinds.values()), kinds
    assert json.loads(json.dumps(history)) == history
