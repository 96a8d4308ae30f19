"""Tests of the engines (``partrain.chunks``, ``loky_engine``, ``parallel``): chunk plans,
ordered reduction, process plans, engines and shared memory."""

import inspect
import itertools
import os
import signal
import time

import numpy as np
import pytest
from conftest import make_data
from faulty_layers import blas_report, shm_segments, wait_gone
from joblib import cpu_count

from partrain import loky_engine, zoo
from partrain.chunks import (
    default_chunk_size,
    efficient_chunk,
    plan_chunks,
    reduce_tree,
    split_evenly,
    tree_pairs,
    tree_roots,
)
from partrain.engine import SerialEngine
from partrain.loky_engine import LokyEngine
from partrain.parallel import plan_processes, resolve_n_jobs

STEP_KEY = (0, 1, 0, 3)


# ----------------------------------------------------------------------------- helpers


def serial_gradient(model, X, y, batch_idx, chunk_size, step_key=STEP_KEY):
    """(summed gradient, totals) of `batch_idx` by a SerialEngine on a copy of `model`."""
    engine = SerialEngine(model.copy(), chunk_size, batch_size=len(batch_idx))
    engine.bind(X, y)
    out = np.empty_like(model.params)
    totals = engine.gradient(batch_idx, step_key, out)
    return out, totals, engine.model.buffers


# ----------------------------------------------------------------------------- configuration


@pytest.mark.parametrize("n, size", [(0, 4), (1, 4), (8, 4), (10, 4), (10, 1), (3, 10),
                                     (230, 8)])
def test_plan_chunks_tiles_the_batch_in_fixed_sizes(n, size):
    """Chunks are contiguous, cover [0, n) once, all of `size` except a shorter last one."""
    chunks = plan_chunks(n, size)
    assert len(chunks) == -(-n // size)
    assert [start for start, _ in chunks] == list(range(0, n, size))
    assert all(stop == min(start + size, n) for start, stop in chunks)
    assert sum(stop - start for start, stop in chunks) == n


@pytest.mark.parametrize("n_items, n_groups", [(10, 3), (3, 5), (7, 7), (8, 2), (5, 1), (1, 4)])
def test_split_evenly_is_contiguous_and_balanced(n_items, n_groups):
    """Groups keep the order, cover every item, and their sizes differ by at most one."""
    items = list(range(n_items))
    groups = split_evenly(items, n_groups)
    assert len(groups) == min(n_groups, n_items)
    assert [x for g in groups for x in g] == items
    sizes = [len(g) for g in groups]
    assert min(sizes) >= 1
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("n_jobs, expected", [
    (1, 1), (3, 3), (np.int64(2), 2), (-1, cpu_count()), (-2, max(1, cpu_count() - 1)),
    (-10_000, 1),
])
def test_resolve_n_jobs_follows_joblib(n_jobs, expected):
    """Positive counts pass through; -1 means all cores, -2 all but one, never below 1."""
    resolved = resolve_n_jobs(n_jobs)
    assert resolved == expected
    assert type(resolved) is int


@pytest.mark.parametrize("n_jobs", [0, True, False, 1.5, 2.0, "2", None])
def test_resolve_n_jobs_rejects_non_integers_and_zero(n_jobs):
    """0, bools, floats, strings and None are refused with a message naming n_jobs."""
    with pytest.raises(ValueError, match="n_jobs"):
        resolve_n_jobs(n_jobs)


def test_default_chunk_size_cannot_depend_on_n_jobs():
    """The signature has no n_jobs (nor any other worker-count argument)."""
    assert list(inspect.signature(default_chunk_size).parameters) == ["model", "batch_size"]


@pytest.mark.parametrize("make_model", [zoo.digits_cnn, zoo.mnist_cnn,
                                        lambda: zoo.mlp(dims=(64, 32, 10), dropout=0.3)],
                         ids=["digits_cnn", "mnist_cnn", "mlp"])
@pytest.mark.parametrize("batch_size", [1, 2, 3, 7, 64, 1000, 100_000])
def test_default_chunk_size_stays_within_the_batch(make_model, batch_size):
    """1 <= chunk <= batch_size for cheap and expensive models, tiny and huge batches."""
    chunk = default_chunk_size(make_model(), batch_size)
    assert isinstance(chunk, int)
    assert 1 <= chunk <= batch_size


def test_default_chunk_size_splits_expensive_batches():
    """An expensive model's batch is cut into several chunks (else n_jobs would be useless)."""
    assert default_chunk_size(zoo.mnist_cnn(), 256) < 256


@pytest.mark.parametrize("make_model", [zoo.mnist_cnn, zoo.signs_cnn, zoo.mlp, zoo.digits_cnn],
                         ids=["mnist_cnn", "signs_cnn", "mlp", "digits_cnn"])
def test_the_number_of_chunks_grows_with_the_batch(make_model):
    """Chunks stay at the network's efficient size, so batch 4x larger = 4x more chunks
    (not capped at 4 as before): more processes can share a large batch."""
    model = make_model()
    chunk = efficient_chunk(model)
    for batch in (chunk * 4, chunk * 16, chunk * 64):
        assert default_chunk_size(model, batch) == chunk
    assert default_chunk_size(model, chunk * 16 + 3) >= chunk  # never below the efficient size


def test_efficient_chunk_of_an_unknown_model_comes_from_its_flops():
    """A network not in the zoo: enough examples for MIN_CHUNK_FLOPS, and at least 16."""
    from partrain.chunks import MIN_CHUNK_EXAMPLES, MIN_CHUNK_FLOPS

    tiny, big = zoo.mlp(dims=(8, 4, 3)), zoo.mlp(dims=(4096, 2048, 10))
    assert efficient_chunk(tiny) == -(-int(MIN_CHUNK_FLOPS) // tiny.flops_per_example())
    assert efficient_chunk(big) == MIN_CHUNK_EXAMPLES


@pytest.mark.parametrize("n_jobs, batch_size, chunk_size, processes", [
    (1000, 32, 16, 2), (2, 32, 32, 1), (3, 40, 10, 3), (1, 64, 16, 1), (8, 7, 2, 4),
    (2, 33, 16, 2),
])
def test_plan_never_starts_more_processes_than_a_step_has_chunks(n_jobs, batch_size,
                                                                   chunk_size, processes):
    """processes = min(n_jobs, ceil(batch / chunk)): n_jobs=1000 cannot start 999 workers."""
    plan = plan_processes(n_jobs, batch_size, chunk_size)
    assert (plan.processes, plan.chunks) == (processes, -(-batch_size // chunk_size))


def test_plan_notes_say_what_runs_and_how_to_split(monkeypatch):
    """On 2 cores: a one-chunk batch names the chunk size that would split it; n_jobs above
    the cores that the chunks allow warns about the cores; a usable n_jobs says nothing."""
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert plan_processes(2, 32, 32).notes("--chunk-size {}", "--batch-size {}") == [
        "n_jobs=2 but 1 chunk per step: running in one process; use --chunk-size 16 to split "
        "(--batch-size 64 would keep 2 processes busy at this chunk size)"]
    assert plan_processes(1000, 32, 16).notes() == [
        "n_jobs=1000 but 2 chunks per step: running in 2 processes"]
    (cores,) = plan_processes(4, 64, 16).notes()
    assert "n_jobs=4 is more than the 2 cores" in cores
    assert plan_processes(2, 64, 16).notes() == []
    assert plan_processes(1, 64, 64).notes() == []


# ----------------------------------------------------------------------------- reduction


def naive_tree_sum(slots, n):
    """The pairwise tree written as a recursion over aligned power-of-two blocks."""
    def node(first, width):
        if width == 1:
            return slots[first].copy()
        half = width // 2
        if first + half >= n:  # no right child: the node is its left child
            return node(first, half)
        return (node(first, half) + node(first + half, half)).astype(slots.dtype)

    width = 1
    while width < n:
        width *= 2
    return node(0, width)


def random_slots(n, seed):
    rng = np.random.default_rng(seed)
    values = rng.normal(size=(n + 2, 257)) * 10.0 ** rng.integers(-8, 8, size=(n + 2, 257))
    return values.astype(np.float32)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 13, 16])
def test_reduce_tree_is_the_pairwise_float32_sum(n):
    """slots[0] ends as the pairwise tree sum of slots[:n], bit for bit; slots beyond n and
    the order of a plain left-to-right sum play no part."""
    slots = random_slots(n, n)
    expected = naive_tree_sum(slots, n)
    tail = slots[n:].copy()
    reduce_tree(slots, n)
    np.testing.assert_array_equal(slots[0], expected)
    np.testing.assert_array_equal(slots[n:], tail)
    if n >= 4:  # the tree is not the chain ((s0 + s1) + s2) + s3 ...
        chain = random_slots(n, n)[0].copy()
        for k in range(1, n):
            chain += random_slots(n, n)[k]
        assert not np.array_equal(chain, expected)


@pytest.mark.parametrize("n", [2, 5, 8, 16, 23])
def test_reduce_tree_gives_the_same_bits_whoever_makes_which_additions(n):
    """Cut the chunks into random contiguous ranges, let each 'process' add up inside its
    range first, then finish with done=ranges: always the single-process result."""
    expected = random_slots(n, 7)
    reduce_tree(expected, n)
    rng = np.random.default_rng(n)
    for _ in range(5):
        cuts = sorted(rng.choice(np.arange(1, n), size=rng.integers(0, n - 1), replace=False))
        ranges = list(zip([0, *cuts], [*cuts, n]))
        slots = random_slots(n, 7)
        for inside in ranges[::-1]:  # any order: the ranges do not overlap
            reduce_tree(slots, n, inside=inside)
        reduce_tree(slots, n, done=ranges)
        np.testing.assert_array_equal(slots[0], expected[0])


def contiguous_splits(n, rng):
    """Contiguous splits of chunks [0, n) into ranges: every one while there are few (n <= 12,
    2**(n - 1) splits), else 300 random ones; always the even splits the engines make."""
    if n <= 12:
        splits = [list(cuts) for k in range(n) for cuts in itertools.combinations(range(1, n), k)]
    else:
        splits = [sorted(rng.choice(np.arange(1, n), size=rng.integers(0, n), replace=False))
                  for _ in range(300)]
    ranges = [list(zip([0, *cuts], [*cuts, n])) for cuts in splits]
    for n_groups in range(1, n + 1):
        sizes = [len(g) for g in split_evenly(list(range(n)), n_groups)]
        bounds = np.cumsum([0, *sizes]).tolist()
        ranges.append(list(zip(bounds[:-1], bounds[1:])))
    return ranges


@pytest.mark.parametrize("n", range(1, 18))
def test_sending_only_the_roots_of_each_range_gives_the_same_bits(n):
    """Each 'process' reduces a local array of its own range's chunks (`offset`), and sends
    only the rows `tree_roots` names; the master puts them in their slots, every other slot
    NaN, and finishes with done=ranges: always the single-process sum, bit for bit (a NaN
    read would show)."""
    data = random_slots(n, 11 * n)
    expected = data.copy()
    reduce_tree(expected, n)
    sent = {}  # (a, b) -> (roots, their rows): a range's reduction does not depend on the split
    for ranges in contiguous_splits(n, np.random.default_rng(n)):
        master = np.full_like(data, np.nan)
        for a, b in ranges:
            if (a, b) not in sent:
                local = data[a:b].copy()
                reduce_tree(local, n, inside=(a, b), offset=a)
                roots = tree_roots(n, (a, b))
                assert roots[0] == a and list(roots) == sorted(set(roots))
                assert all(a <= r < b for r in roots)
                sent[a, b] = roots, local[[r - a for r in roots]]
            roots, rows = sent[a, b]
            master[list(roots)] = rows
        reduce_tree(master, n, done=ranges)
        assert np.array_equal(master[0], expected[0]), ranges


@pytest.mark.parametrize("n", range(1, 18))
def test_a_range_that_is_one_tree_node_has_one_root(n):
    """[a, min(a + w, n)) with w a power of two and a a multiple of w: one root, a. Any other
    range has more than one (a is joined with later chunks only by a node that covers it)."""
    nodes = set()
    width = 1
    while width < 2 * n:
        for a in range(0, n, width):
            nodes.add((a, min(a + width, n)))
            assert tree_roots(n, (a, min(a + width, n))) == (a,)
        width *= 2
    for a in range(n):
        for b in range(a + 1, n + 1):
            if (a, b) not in nodes:
                assert len(tree_roots(n, (a, b))) > 1, (a, b)
    assert tree_roots(8, (1, 7)) == (1, 2, 4, 6)


@pytest.mark.parametrize("inside", [(0, 0), (-1, 2), (3, 9), (5, 4)])
def test_tree_roots_refuses_ranges_outside_the_chunks(inside):
    with pytest.raises(ValueError, match="range of chunks"):
        tree_roots(8, inside)


def test_the_master_joins_one_partial_per_process_when_chunks_split_evenly():
    """16 chunks on 2, 4 or 8 processes: the master's own additions are processes - 1."""
    for processes in (2, 4, 8):
        ranges = [(r * 16 // processes, (r + 1) * 16 // processes) for r in range(processes)]
        outside = [p for p in tree_pairs(16)
                   if not any(a <= p[0] and p[2] <= b for a, b in ranges)]
        assert len(outside) == processes - 1


# ----------------------------------------------------------------------------- engines


@pytest.fixture(scope="module")
def cnn64():
    """A float64 digits CNN, 90 examples and a shuffled batch of 40 of them."""
    model = zoo.digits_cnn(seed=3, dtype="float64")
    X, y = make_data(model, 90, seed=1)
    batch_idx = np.random.default_rng(2).permutation(90)[:40]
    return model, X, y, batch_idx


@pytest.fixture(scope="module")
def loky_cnn(cnn64):
    """A LokyEngine with 2 workers over a copy of the CNN, chunk 7 (6 chunks, last ragged)."""
    model, X, y, _ = cnn64
    engine = LokyEngine(model.copy(), chunk_size=7, n_processes=2, batch_size=40)
    engine.bind(X, y)
    yield engine
    engine.close(kill=True)


def test_pool_gradient_equals_whole_batch_gradient(cnn64, loky_cnn):
    """Pool result / batch size == loss_and_grad(batch) / batch size (float64, rtol 1e-10)."""
    model, X, y, batch_idx = cnn64
    out = np.full_like(model.params, np.nan)
    totals = loky_cnn.gradient(batch_idx, STEP_KEY, out)
    whole = model.loss_and_grad(model.params, X[batch_idx], y[batch_idx])
    m = len(batch_idx)
    np.testing.assert_allclose(out / m, whole.grad / m, rtol=1e-10, atol=1e-14)
    assert totals.n_examples == m
    assert totals.n_correct == whole.n_correct
    assert totals.loss == pytest.approx(whole.loss, rel=1e-12)
    assert len(loky_cnn.worker_pids()) == 1  # n_jobs=2: the master and one worker


@pytest.mark.parametrize("n_examples", [40, 33, 7, 1])
def test_pool_gradient_equals_serial_bit_for_bit(cnn64, loky_cnn, n_examples):
    """Full, ragged, single-chunk and single-example batches: identical to SerialEngine."""
    model, X, y, batch_idx = cnn64
    idx = batch_idx[:n_examples]
    out = np.empty_like(model.params)
    totals = loky_cnn.gradient(idx, STEP_KEY, out)
    expected, expected_totals, _ = serial_gradient(model, X, y, idx, chunk_size=7)
    np.testing.assert_array_equal(out, expected)
    assert totals == expected_totals


def test_scaled_gradient_is_the_sum_times_the_scale_bit_for_bit(cnn64, loky_cnn):
    """gradient(..., scale=s) writes exactly fl(sum * s), whichever engine adds the chunks."""
    model, X, y, batch_idx = cnn64
    total, _, _ = serial_gradient(model, X, y, batch_idx, chunk_size=7)
    scale = 1.0 / len(batch_idx)
    out = np.empty_like(model.params)
    loky_cnn.gradient(batch_idx, STEP_KEY, out, scale=scale)
    np.testing.assert_array_equal(out, total * scale)
    serial = SerialEngine(model.copy(), 7, batch_size=len(batch_idx))
    serial.bind(X, y)
    serial.gradient(batch_idx, STEP_KEY, out, scale=3.0)
    np.testing.assert_array_equal(out, total * 3.0)


def test_pool_sees_params_assigned_by_the_user(cnn64, loky_cnn):
    """Replacing engine.model.params by a new array is what the next gradient uses."""
    model, X, y, batch_idx = cnn64
    original = loky_cnn.model.params.copy()
    try:
        loky_cnn.model.params = original * 0.5
        out = np.empty_like(original)
        loky_cnn.gradient(batch_idx, STEP_KEY, out)
        halved = model.copy()
        halved.params[...] = original * 0.5
        expected, _, _ = serial_gradient(halved, X, y, batch_idx, chunk_size=7)
        np.testing.assert_array_equal(out, expected)
    finally:
        loky_cnn.model.params[...] = original


def test_pool_uses_newly_bound_data(cnn64):
    """Binding other data of the same shape makes the workers use them on the next step."""
    model, X, y, batch_idx = cnn64
    engine = LokyEngine(model.copy(), chunk_size=20, n_processes=2, batch_size=40)
    X2, y2 = X * 2.0, y[::-1].copy()
    out = np.empty_like(model.params)
    try:
        engine.bind(X, y)
        engine.gradient(batch_idx, STEP_KEY, out)
        engine.bind(X2, y2)
        engine.gradient(batch_idx, STEP_KEY, out)
    finally:
        engine.close(kill=True)
    expected, _, _ = serial_gradient(model, X2, y2, batch_idx, chunk_size=20)
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("dropout, batchnorm", [(0.3, False), (0.0, True)],
                         ids=["dropout", "batchnorm"])
def test_pool_gradient_with_dropout_and_batchnorm_equals_serial(dropout, batchnorm):
    """Random masks and batch statistics are identical too (float32 MLP)."""
    model = zoo.mlp(dims=(64, 32, 10), dropout=dropout, batchnorm=batchnorm, seed=1)
    X, y = make_data(model, 50, seed=4)
    idx = np.random.default_rng(0).permutation(50)[:45]
    engine = LokyEngine(model.copy(), chunk_size=8, n_processes=2, batch_size=45)
    try:
        engine.bind(X, y)
        out = np.empty_like(model.params)
        totals = engine.gradient(idx, STEP_KEY, out)
    finally:
        engine.close(kill=True)
    reference = SerialEngine(model.copy(), 8, batch_size=45)
    reference.bind(X, y)
    expected = np.empty_like(model.params)
    expected_totals = reference.gradient(idx, STEP_KEY, expected)
    np.testing.assert_array_equal(out, expected)
    assert totals[:3] == expected_totals[:3]
    if batchnorm:
        # the chunk-weighted mean of the chunks' statistics, identical on both engines
        np.testing.assert_array_equal(totals.stats, expected_totals.stats)
        assert not np.array_equal(totals.stats, model.buffers)
    else:
        assert totals.stats is None and expected_totals.stats is None


@pytest.mark.parametrize("blas_threads", [1, 2])
def test_workers_run_with_the_requested_blas_threads(blas_threads):
    """Each worker's BLAS environment variables and BLAS pools are set to `blas_threads`."""
    model = zoo.mlp(dims=(64, 32, 10))
    X, y = make_data(model, 16)
    engine = LokyEngine(model, chunk_size=4, n_processes=2, batch_size=16,
                        blas_threads=blas_threads)
    try:
        engine.bind(X, y)
        engine.gradient(np.arange(16), STEP_KEY, np.empty_like(model.params))
        engine.stop_serving()  # frees the worker for one more task in the same process
        reports = [engine._pool.submit(blas_report).result() for _ in range(4)]
    finally:
        engine.close(kill=True)
    expected = str(blas_threads)
    for report in reports:
        assert report["pid"] != os.getpid()
        assert report["env"] == {var: expected for var in report["env"]}
        assert report["threads"], "no BLAS library found in the worker"
        assert set(report["threads"].values()) == {blas_threads}


# ----------------------------------------------------------------------------- shared memory


def test_close_unlinks_shared_memory_and_never_touches_the_model_arrays():
    """The engine copies params into its own segment: model.params, model.buffers and views
    of them are the same private arrays before, during and after the engine's life."""
    model = zoo.mlp(dims=(64, 32, 10), batchnorm=True)
    X, y = make_data(model, 32)
    params, buffers = model.params, model.buffers
    view = model.named_params()["dense1.W"]
    before = shm_segments(os.getpid())  # ours only: other processes may use partrain too
    engine = LokyEngine(model, chunk_size=8, n_processes=2, batch_size=32)
    engine.bind(X, y)
    engine.gradient(np.arange(32), STEP_KEY, np.empty_like(model.params))
    assert shm_segments(os.getpid()) - before, "the engine should use shared memory"
    assert model.params is params and model.buffers is buffers
    assert params.flags.owndata and buffers.flags.owndata
    pids = engine.worker_pids()
    assert len(pids) == 1
    engine.close()
    engine.close()  # idempotent
    assert shm_segments(os.getpid()) - before == set()
    assert wait_gone(pids) == []
    assert model.params is params and model.buffers is buffers
    view[...] += 1.0  # still a live view of the model's own memory
    np.testing.assert_array_equal(model.named_params()["dense1.W"], view)


def test_the_workers_see_each_step_s_parameters():
    """An in-place update between steps (the optimizer's) reaches the workers: the engine
    copies the parameters at every step, so no worker computes with stale values."""
    model = zoo.mlp(dims=(64, 32, 10), seed=2)
    X, y = make_data(model, 32)
    engine = LokyEngine(model, chunk_size=8, n_processes=2, batch_size=32)
    out = np.empty_like(model.params)
    try:
        engine.bind(X, y)
        engine.gradient(np.arange(32), STEP_KEY, out)
        model.params[...] *= 0.5
        engine.gradient(np.arange(32), STEP_KEY, out)
    finally:
        engine.close(kill=True)
    expected, _, _ = serial_gradient(model, X, y, np.arange(32), chunk_size=8)
    np.testing.assert_array_equal(out, expected)


def test_interrupt_during_a_step_still_stops_every_worker(monkeypatch):
    """Ctrl-C while the master computes its share and a worker computes another:
    close(kill=True) must still stop every worker (a survivor makes the interpreter wait for
    it at exit)."""
    model = zoo.mlp(dims=(64, 32, 10))
    X, y = make_data(model, 40)
    engine = LokyEngine(model, chunk_size=10, n_processes=2, batch_size=40)
    out = np.empty_like(model.params)
    engine.bind(X, y)
    engine.gradient(np.arange(40), STEP_KEY, out)
    pids = engine.worker_pids()

    def interrupted(*args):
        time.sleep(0.05)  # the worker is busy with its group by now
        raise KeyboardInterrupt

    monkeypatch.setattr(loky_engine, "compute_group", interrupted)  # the master's copy only
    try:
        with pytest.raises(KeyboardInterrupt):
            engine.gradient(np.arange(40), (*STEP_KEY, 1), out)
        engine.close(kill=True)
        survivors = wait_gone(pids, timeout=3)
    finally:
        for pid in wait_gone(pids, timeout=0):  # never leave a worker for the exit handler
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert survivors == [], "workers survived close(kill=True)"


EXIT_WITHOUT_CLOSE = """
import os, numpy as np
from partrain import zoo
from partrain.parallel import LokyEngine
model = zoo.mlp(dims=(64, 32, 10))
X = np.random.default_rng(0).random((40, 64)).astype(model.dtype)
engine = LokyEngine(model, chunk_size=10, n_processes=3, batch_size=40)
engine.bind(X, np.zeros(40, dtype=np.int64))
engine.gradient(np.arange(40), (0, 0), np.empty_like(model.params))
print(*engine.worker_pids(), flush=True)
raise SystemExit("the user's script ends with the workers still serving")
"""


@pytest.mark.parametrize("closed", [False, True], ids=["open", "closed"])
def test_exit_stops_the_workers_and_frees_shared_memory(tmp_path, closed):
    """A script ending with an engine still referenced, open (its workers serving) or closed:
    a clean exit within seconds, no worker and no segment of that process left."""
    import subprocess
    import sys

    script = tmp_path / "exit_without_close.py"
    script.write_text(EXIT_WITHOUT_CLOSE.replace("raise SystemExit", "engine.close()\nraise "
                                                 "SystemExit") if closed else EXIT_WITHOUT_CLOSE)
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()  # its workers follow it (they watch their parent)
        proc.communicate()
        pytest.fail("the interpreter waited for the workers")
    assert proc.returncode == 1, stderr  # SystemExit("...") exits with status 1
    assert "still serving" in stderr
    pids = [int(pid) for pid in stdout.split()]
    assert len(pids) == 2
    assert wait_gone(pids) == []
    assert shm_segments(proc.pid) == set()


def test_workers_idle_past_the_limit_are_served_again_with_the_same_results():
    """A pause longer than IDLE_EXIT_SECONDS ends the workers' serve tasks (an idle pool costs
    no CPU, an exiting interpreter never waits for it); the next step serves them again and
    its gradient equals the serial engine's, bit for bit."""
    from partrain.loky_engine import IDLE_EXIT_SECONDS

    model = zoo.mlp(dims=(64, 32, 10))
    X, y = make_data(model, 40)
    engine = LokyEngine(model, chunk_size=10, n_processes=2, batch_size=40)
    try:
        engine.bind(X, y)
        first, second = np.empty_like(model.params), np.empty_like(model.params)
        engine.gradient(np.arange(40), STEP_KEY, first)
        pids = engine.worker_pids()
        time.sleep(IDLE_EXIT_SECONDS + 1.0)
        engine.gradient(np.arange(40), STEP_KEY, second)
        assert engine.worker_pids() == pids  # the same processes, serving again
    finally:
        engine.close()
    expected = serial_gradient(model, X, y, np.arange(40), 10)[0]
    np.testing.assert_array_equal(first, expected)
    np.testing.assert_array_equal(second, expected)
