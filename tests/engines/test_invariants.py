"""Issue 23, item 8: two properties guarded from more than one angle.

(a) A checkpoint is written only while its path is claimed (partrain.runlock), by the claim of
    the run that writes it: checked DURING each write (the writer is wrapped) from this
    process (a second CheckpointClaim must be refused), from another process (likewise), and
    by identity (the claim held is the one the fit started with), for the writes of a fit,
    of an interrupted fit, of `save_checkpoint` outside a fit and of the command line.
    Releasing the claim before the write, or re-claiming around it, passed every test before.
(b) The default chunk size depends on the model and the batch size, never on n_jobs: the
    trainer's chunk size and plan, the parameters trained (bit for bit), and the bench's rows
    are compared across n_jobs 1, 2 and 3 without fixing chunk_size. Before, a default that
    depended on n_jobs was caught by one CLI test only.
"""

import signal
import subprocess
import sys
import warnings

import numpy as np
import pytest
from conftest import subprocess_env

from partrain import Callback, Trainer, TrainingInterrupted, cli, zoo
from partrain import trainer as trainer_module
from partrain.chunks import chunks_per_step, default_chunk_size
from partrain.parallel import plan_processes
from partrain.runlock import CheckpointClaim, CheckpointInUseError

# ----------------------------------------------------------------------------- (a) the claim

PROBE = """
import sys
from partrain.runlock import CheckpointClaim, CheckpointInUseError
print("ready", flush=True)
for line in sys.stdin:
    try:
        CheckpointClaim(line.strip()).release()
        print("free", flush=True)
    except CheckpointInUseError:
        print("claimed", flush=True)
"""


@pytest.fixture(scope="module")
def other_process():
    """Ask another process whether a path is claimed: `other_process(path)` -> "claimed" or
    "free" (it tries to claim the path itself)."""
    proc = subprocess.Popen([sys.executable, "-c", PROBE], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=subprocess_env())
    assert proc.stdout.readline().strip() == "ready"

    def ask(path) -> str:
        proc.stdin.write(f"{path}\n")
        proc.stdin.flush()
        return proc.stdout.readline().strip()
    yield ask
    proc.stdin.close()
    proc.wait(timeout=30)


def claimed_here(path) -> str:
    """Whether a second claim on `path`, in this process, is refused."""
    try:
        CheckpointClaim(path).release()
    except CheckpointInUseError:
        return "claimed"
    return "free"


class Watch:
    """Wraps the trainer's writer: at each checkpoint write, before writing, records what
    this process and another one see, and which claim the trainer holds (None: none held)."""

    def __init__(self, monkeypatch, other_process, trainer=None):
        self.trainer, self.seen, self.claims = trainer, [], []
        real = trainer_module.write_npz

        def write_npz(path, kind, meta, arrays):
            if kind == "checkpoint":
                self.seen.append((claimed_here(path), other_process(path)))
                claim = getattr(self.trainer, "checkpoint_claim", None)
                self.claims.append(claim if claim is not None and claim.held else None)
            return real(path, kind, meta, arrays)
        monkeypatch.setattr(trainer_module, "write_npz", write_npz)


class RecordClaim(Callback):
    """Remembers the claim a fit holds when it begins."""

    def on_train_begin(self, trainer):
        self.claim = trainer.checkpoint_claim


def data(n=96, seed=0):
    rng = np.random.default_rng(seed)
    return rng.random((n, 8, 8, 1), dtype=np.float32), rng.integers(0, 10, n)


@pytest.mark.parametrize("n_jobs", [1, 2])
def test_every_checkpoint_write_of_a_fit_is_under_its_claim(n_jobs, tmp_path, monkeypatch,
                                                            other_process):
    path = tmp_path / "ck.npz"
    trainer = Trainer(zoo.digits_cnn(), n_jobs=n_jobs, batch_size=32, chunk_size=16,
                      checkpoint=path, progress=False)
    watch, begin = Watch(monkeypatch, other_process, trainer), RecordClaim()
    with trainer:
        trainer.fit(*data(), epochs=2, callbacks=[begin])
    assert len(watch.seen) == 3  # after each epoch, and at the end of the fit
    assert watch.seen == [("claimed", "claimed")] * 3
    assert begin.claim is not None and all(c is begin.claim for c in watch.claims)
    assert other_process(path) == "free" and claimed_here(path) == "free"  # released after


def test_an_interrupted_fit_writes_its_checkpoint_under_its_claim(tmp_path, monkeypatch,
                                                                  other_process):
    class Interrupt(Callback):
        def on_batch_end(self, trainer, step, logs):
            if step == 1:
                raise TrainingInterrupted(signal.SIGINT)

    path = tmp_path / "ck.npz"
    trainer = Trainer(zoo.digits_cnn(), batch_size=16, checkpoint=path, progress=False)
    watch, begin = Watch(monkeypatch, other_process, trainer), RecordClaim()
    with pytest.raises(KeyboardInterrupt):
        trainer.fit(*data(), epochs=1, callbacks=[begin, Interrupt()])
    assert watch.seen == [("claimed", "claimed")]
    assert watch.claims == [begin.claim] and begin.claim is not None
    assert Trainer.from_checkpoint(path).step_in_epoch == 2
    assert other_process(path) == "free"


def test_save_checkpoint_outside_fit_claims_the_path_while_writing(tmp_path, monkeypatch,
                                                                   other_process):
    path = tmp_path / "ck.npz"
    trainer = Trainer(zoo.digits_cnn(), batch_size=32, progress=False)
    watch = Watch(monkeypatch, other_process)
    trainer.save_checkpoint(path)
    assert watch.seen == [("claimed", "claimed")]
    assert other_process(path) == "free" and claimed_here(path) == "free"
    with CheckpointClaim(path), pytest.raises(CheckpointInUseError):  # and refused if taken
        trainer.save_checkpoint(path)


def test_the_command_line_writes_its_checkpoint_under_its_claim(tmp_path, monkeypatch,
                                                                other_process):
    watch = Watch(monkeypatch, other_process)
    assert cli.main(["train", "--dataset", "synthetic", "--quiet", "--epochs", "2",
                     "--checkpoint", str(tmp_path / "ck.npz"),
                     "--save", str(tmp_path / "m.npz")]) == 0
    assert watch.seen == [("claimed", "claimed")] * 3
    assert other_process(tmp_path / "ck.npz") == "free"


# ----------------------------------------------------------------------------- (b) the chunks

MODELS = {"digits_cnn": zoo.digits_cnn, "mlp": zoo.mlp, "mnist_cnn": zoo.mnist_cnn,
          "signs_cnn": zoo.signs_cnn}
N_JOBS = (1, 2, 3)


def trainer_for(model, n_jobs: int, batch_size: int, **kwargs) -> Trainer:
    with warnings.catch_warnings():  # (n_jobs above the chunks or the cores: clamped)
        warnings.simplefilter("ignore")
        return Trainer(model, n_jobs=n_jobs, batch_size=batch_size, progress=False, **kwargs)


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("batch_size", [1, 7, 32, 64, 192, 256, 1000])
def test_the_trainers_default_chunks_are_the_same_for_every_n_jobs(name, batch_size):
    model = MODELS[name]()
    expected = default_chunk_size(model, batch_size)  # (a function of model and batch only)
    plans = {}
    for n_jobs in N_JOBS:
        trainer = trainer_for(model, n_jobs, batch_size)
        plans[n_jobs] = (trainer.chunk_size, trainer.plan.chunks)
    assert set(plans.values()) == {(expected, chunks_per_step(batch_size, expected))}, plans


def test_the_process_plan_never_changes_the_chunks():
    for batch_size in (1, 32, 100, 256):
        chunk = default_chunk_size(zoo.digits_cnn(), batch_size)
        plans = [plan_processes(n_jobs, batch_size, chunk) for n_jobs in (*N_JOBS, 8)]
        assert {plan.chunks for plan in plans} == {chunks_per_step(batch_size, chunk)}
        assert all(plan.processes <= plan.chunks for plan in plans)


def test_default_chunks_give_bit_identical_params_for_1_2_3_jobs():
    """digits_cnn, batch 192: 3 default chunks of 64, so n_jobs 3 runs 3 processes."""
    X, y = data(384)
    params, chunk_sizes = {}, {}
    for n_jobs in N_JOBS:
        with trainer_for(zoo.digits_cnn(), n_jobs, 192) as trainer:
            assert trainer.plan.processes == n_jobs
            trainer.fit(X, y, epochs=2)
        params[n_jobs], chunk_sizes[n_jobs] = trainer.model.params, trainer.chunk_size
    assert set(chunk_sizes.values()) == {64}
    assert np.array_equal(params[1], params[2]) and np.array_equal(params[1], params[3])


def test_the_benchs_default_chunks_are_the_same_for_every_n_jobs():
    from partrain.bench import run_bench

    report = run_bench(["digits-cnn"], [192], list(N_JOBS), repeats=1, duration=0.05,
                       warmup=0.0, progress=False)
    rows = [r for r in report["rows"] if r["engine"] in ("partrain", "partrain-loky",
                                                         "ceiling")]
    assert len(rows) == 2 * len(N_JOBS)
    assert {r["chunk_size"] for r in rows} == {default_chunk_size(zoo.digits_cnn(), 192)}
    assert {r["processes"] for r in rows if r["engine"] != "ceiling"} == set(N_JOBS)
