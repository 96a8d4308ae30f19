"""Checkpoints from Python: one live run per checkpoint path (`partrain.runlock`), and
`Trainer.from_checkpoint` errors that say what is wrong (issue 11). The command line's side is
in test_cli_safety.py."""

import subprocess
import sys

import numpy as np
import pytest
from conftest import start_holder, subprocess_env

from partrain import Trainer, zoo
from partrain.data import load_dataset
from partrain.io import FileFormatError
from partrain.runlock import CheckpointClaim, CheckpointInUseError, claim_file


@pytest.fixture(scope="module")
def data():
    d = load_dataset("synthetic", shape=(8, 8, 1), n_train=64, n_test=32)
    return d.x_train, d.y_train


def make_trainer(checkpoint=None):
    return Trainer(zoo.digits_cnn(), batch_size=32, checkpoint=checkpoint, progress=False)


def test_a_claim_is_exclusive_and_released(tmp_path):
    path = tmp_path / "runs" / "ck.npz"
    with CheckpointClaim(path) as claim:
        assert claim.held and claim.covers(tmp_path / "runs" / ".." / "runs" / "ck.npz")
        assert claim_file(path).is_file()
        with pytest.raises(CheckpointInUseError, match="this process"):
            CheckpointClaim(str(path))
    assert not claim.held
    assert list(tmp_path.iterdir()) == []  # the folder the claim created goes too
    CheckpointClaim(path).release()  # free again


def test_fit_refuses_a_claimed_checkpoint_before_training(tmp_path, data):
    path = tmp_path / "ck.npz"
    trainer = make_trainer(path)
    before = trainer.model.params.copy()
    with CheckpointClaim(path), pytest.raises(CheckpointInUseError, match="ck.npz"):
        trainer.fit(*data, epochs=1)
    assert np.array_equal(trainer.model.params, before)
    assert trainer.epoch == 0 and not path.exists()
    trainer.fit(*data, epochs=1)  # released: fine now
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.npz"]  # no lock file left
    assert trainer.checkpoint_claim is None


def test_save_checkpoint_does_not_overwrite_a_claimed_path(tmp_path, data):
    trainer = make_trainer()
    with CheckpointClaim(tmp_path / "theirs.npz"), pytest.raises(CheckpointInUseError):
        trainer.save_checkpoint(tmp_path / "theirs.npz")
    assert not (tmp_path / "theirs.npz").exists()
    trainer.save_checkpoint(tmp_path / "mine.npz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.npz"]


def test_fit_uses_a_claim_handed_to_it(tmp_path, data):
    """The command line claims before loading data and hands the claim to the trainer."""
    path = tmp_path / "ck.npz"
    with CheckpointClaim(path) as claim:
        trainer = make_trainer(path)
        trainer.checkpoint_claim = claim
        trainer.fit(*data, epochs=1)
        assert claim.held  # still the caller's
    assert Trainer.from_checkpoint(path).epoch == 1


def test_a_trainer_in_another_process_is_refused(tmp_path):
    """Two processes, two Trainers, one path: the second gets CheckpointInUseError naming
    the first process."""
    holder = start_holder(tmp_path / "ck.npz", tmp_path)
    try:
        second = subprocess.run(
            [sys.executable, "-c", "import sys\n"
             "from partrain import Trainer, zoo\n"
             "from partrain.data import load_dataset\n"
             "d = load_dataset('synthetic', shape=(8, 8, 1))\n"
             "Trainer(zoo.digits_cnn(), checkpoint='ck.npz', progress=False).fit("
             "d.x_train[:32], d.y_train[:32])\n"],
            cwd=tmp_path, capture_output=True, text=True, timeout=120, env=subprocess_env())
    finally:
        holder.kill()
        holder.communicate()
    assert second.returncode == 1
    assert "CheckpointInUseError" in second.stderr and f"pid {holder.pid}" in second.stderr


# ----------------------------------------------------------------------------- from_checkpoint


@pytest.fixture
def checkpoint(tmp_path, data):
    trainer = make_trainer()
    trainer.fit(*data, epochs=1)
    return trainer.save_checkpoint(tmp_path / "ck.npz")


def test_an_unknown_keyword_is_a_type_error_naming_it(checkpoint):
    """Before: FileFormatError "'ck.npz' is not a complete partrain checkpoint (missing
    Trainer.__init__() got an unexpected keyword argument 'n_job')"."""
    with pytest.raises(TypeError, match="n_job") as info:
        Trainer.from_checkpoint(checkpoint, n_job=2)
    assert "n_jobs" in str(info.value)  # the valid names are listed
    assert not isinstance(info.value, FileFormatError)


def test_keyword_errors_come_before_file_errors(tmp_path, checkpoint):
    (tmp_path / "bad.npz").write_bytes(b"not a checkpoint")
    with pytest.raises(TypeError, match="n_job"):
        Trainer.from_checkpoint(tmp_path / "bad.npz", n_job=2)
    with pytest.raises(FileFormatError, match="bad.npz"):
        Trainer.from_checkpoint(tmp_path / "bad.npz", n_jobs=2)
    with pytest.raises(ValueError, match="model"):
        Trainer.from_checkpoint(checkpoint, model=zoo.digits_cnn())
    assert Trainer.from_checkpoint(checkpoint, n_jobs=1, progress=False).epoch == 1
