"""Profile partrain's per-chunk training computation and time it A/B against a git revision
and PyTorch, interleaved in ONE process (the host is shared and noisy: only ratios measured
side by side mean anything).

Commands (from the repository root; native BLAS kernels need the two overrides unset in that
command alone, forced-Haswell runs set OPENBLAS_CORETYPE=Haswell instead; the script prints
which OpenBLAS kernel ran):

    # per-layer (forward / backward) and per-operation profile of mnist_cnn, chunks 8-64
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE PYTHONPATH=. \\
        python benchmarks/profile_kernels.py layers --chunks 8 16 32 64
    # whole chunk step: this checkout vs a git revision vs torch (NCHW, channels_last)
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE PYTHONPATH=. \\
        python benchmarks/profile_kernels.py ab --baseline f3a23a2 --torch
    OPENBLAS_CORETYPE=Haswell PYTHONPATH=. \\
        python benchmarks/profile_kernels.py ab --baseline f3a23a2 --torch

Everything runs on one BLAS thread (threadpoolctl) and torch.set_num_threads(1), after
partrain.processes.keep_freed_memory() as in every computing process. Each configuration's
step is timed by the thread's CPU clock (what the computation costs; other processes on the
host steal wall time, not CPU time) and by the wall clock; figures are medians over rounds
in which all implementations alternate. A partrain step is `loss_and_grad_unchecked` on
one chunk (forward + backward), then Adam on the flat vector ("+adam"); a torch step is
forward + backward ("fwd+bwd") then torch.optim.Adam (default foreach, or fused for
channels_last, the tuned configuration).
"""

from __future__ import annotations

import argparse
import importlib
import io
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits

import partrain
from partrain import functional as F
from partrain import zoo
from partrain.processes import keep_freed_memory

REPO = Path(__file__).resolve().parent.parent
CONFIGS = {  # name -> (zoo model, chunk sizes timed by `ab`)
    "mnist_cnn": ("mnist_cnn", (16, 32)),
    "signs_cnn": ("signs_cnn", (16, 32)),
    "mlp": ("mlp", (32, 64)),
}


def blas_kernel() -> str:
    return ",".join(str(p.get("architecture")) for p in threadpool_info()
                    if p.get("user_api") == "blas")


def load_revision(rev: str):
    """The partrain package as of git revision `rev`, imported as `partrain_<rev>`."""
    name = f"partrain_{rev.replace('-', '_')}"
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "partrain"],
                             check=True, capture_output=True).stdout
    root = Path(tempfile.mkdtemp(prefix="partrain_rev_"))
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(root, filter="data")
    (root / "partrain").rename(root / name)
    sys.path.insert(0, str(root))
    return importlib.import_module(name)


def timed(fn, clock) -> float:
    t0 = clock()
    fn()
    return clock() - t0


def interleave(candidates: dict, rounds: int, per_round: int) -> dict:
    """{name: (median cpu s, median wall s, paired ratio)} of callables alternating per round.

    The paired ratio is the median over rounds of (first candidate's round median / this
    one's): the host's load drifts slowly, so rounds compare like with like. It comes as
    (median, lower quartile, upper quartile); > 1 means faster than the first candidate.
    """
    cpu = {k: [] for k in candidates}
    wall = {k: [] for k in candidates}
    per_round_cpu = {k: [] for k in candidates}
    names = list(candidates)
    for fn in candidates.values():  # warm-up: first-touch page faults, lazy imports
        for _ in range(3):
            fn()
    for r in range(rounds):
        order = names if r % 2 == 0 else names[::-1]
        for k in order:
            fn = candidates[k]
            times = []
            for _ in range(per_round):
                w0, c0 = time.perf_counter(), time.thread_time()
                fn()
                c1, w1 = time.thread_time(), time.perf_counter()
                times.append(c1 - c0)
                wall[k].append(w1 - w0)
            cpu[k] += times
            per_round_cpu[k].append(statistics.median(times))
    out = {}
    for k in names:
        ratios = sorted(a / b for a, b in zip(per_round_cpu[names[0]], per_round_cpu[k]))
        q = len(ratios) // 4
        out[k] = (statistics.median(cpu[k]), statistics.median(wall[k]),
                  (statistics.median(ratios), ratios[q], ratios[-1 - q]))
    return out


# ----------------------------------------------------------------------------- steps


def partrain_step(package, model_name: str, m: int, with_adam: bool, seed: int = 0):
    """One chunk's forward + backward (and Adam) with `package` (this checkout or a revision)."""
    model = package.zoo.get(model_name)
    rng = np.random.default_rng(seed)
    X = rng.random((m, *model.input_shape), dtype=np.float32)
    y = rng.integers(0, model.n_classes, m)
    ctx = package.layers.Context(training=True, key=(0, 0, 0, 0))
    grad = np.zeros_like(model.params)
    params = model.params.copy()
    opt = package.optim.Adam(1e-4)

    def step():
        model.loss_and_grad_unchecked(params, X, y, ctx, grad)
        if with_adam:
            np.multiply(grad, np.float32(1.0 / m), out=grad)
            opt.step(params, grad)

    return step


def torch_step(model_name: str, m: int, channels_last: bool, with_adam: bool):
    """PyTorch's step of the same network (partrain.torch_baselines.torch_network), one thread."""
    import torch

    from partrain.torch_baselines import torch_network

    torch.manual_seed(0)
    net = torch_network(model_name.replace("_", "-"))
    shape = zoo.get(model_name).input_shape
    x = torch.rand(m, *shape)
    if x.dim() == 4:
        x = x.permute(0, 3, 1, 2).contiguous()
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
            net = net.to(memory_format=torch.channels_last)
    y = torch.randint(0, zoo.get(model_name).n_classes, (m,))
    opt = torch.optim.Adam(net.parameters(), lr=1e-4, fused=channels_last)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn(net(x), y).backward()
        if with_adam:
            opt.step()

    return step


def run_ab(args) -> None:
    packages = {"new": partrain}
    if args.baseline:
        packages = {f"base {args.baseline}": load_revision(args.baseline), **packages}
    if args.torch:
        import torch
        torch.set_num_threads(1)
    print(f"BLAS kernel: {blas_kernel()}; torch threads 1; clock: thread CPU time (wall)")
    for config in args.models:
        model_name, chunks = CONFIGS[config]
        for m in args.chunks or chunks:
            for with_adam in (False, True):
                cands = {}
                for label, package in packages.items():
                    cands[label] = partrain_step(package, model_name, m, with_adam)
                if args.torch:
                    cands["torch NCHW"] = torch_step(model_name, m, False, with_adam)
                    if model_name != "mlp":
                        cands["torch channels_last"] = torch_step(model_name, m, True, with_adam)
                res = interleave(cands, args.rounds, args.per_round)
                what = "+adam" if with_adam else "fwd+bwd"
                print(f"{config} chunk {m} {what}:")
                first = next(iter(res))
                for label, (c, w, (r, lo, hi)) in res.items():
                    print(f"  {label:22s} {m / c:9.0f} ex/s cpu ({m / w:9.0f} wall)  "
                          f"{1e6 * c / m:7.2f} us/ex  x{r:5.3f} [{lo:5.3f}-{hi:5.3f}] "
                          f"vs {first}")
                sys.stdout.flush()


# ----------------------------------------------------------------------------- profile


def layer_profile(package, model_name: str, m: int, rounds: int, per_round: int) -> dict:
    """{'<layer> fwd' / '<layer> bwd' / 'loss+rest' / 'step': median cpu s per step}.

    Timed inside real steps: each layer's forward and backward is wrapped by a timer on the
    model instance (caches, memory and BLAS state as in training, unlike a layer timed alone
    on warm inputs). 'loss+rest' is the step minus its layers.
    """
    model = package.zoo.get(model_name)
    rng = np.random.default_rng(0)
    X = rng.random((m, *model.input_shape), dtype=np.float32)
    y = rng.integers(0, model.n_classes, m)
    ctx = package.layers.Context(training=True, key=(0,))
    grad = np.zeros_like(model.params)
    acc: dict = {}

    def timed_method(name, method):
        def wrapper(*args):
            t0 = time.thread_time()
            out = method(*args)
            acc[name] = acc.get(name, 0.0) + time.thread_time() - t0
            return out
        return wrapper

    for name, layer in zip(model.names, model.layers):
        layer.forward = timed_method(f"{name} fwd", layer.forward)
        layer.backward = timed_method(f"{name} bwd", layer.backward)
    samples: dict = {}
    for r in range(rounds + 1):
        for _ in range(per_round):
            acc.clear()
            t0 = time.thread_time()
            model.loss_and_grad_unchecked(model.params, X, y, ctx, grad)
            step = time.thread_time() - t0
            if r:  # round 0 warms up
                samples.setdefault("step", []).append(step)
                samples.setdefault("loss+rest", []).append(step - sum(acc.values()))
                for k, v in acc.items():
                    samples.setdefault(k, []).append(v)
    order = ["step"] + [f"{n} {d}" for d in ("fwd", "bwd") for n in
                        (model.names if d == "fwd" else model.names[::-1])] + ["loss+rest"]
    return {k: statistics.median(samples[k]) for k in order if k in samples}


def mnist_ops(m: int) -> dict:
    """The operations of mnist_cnn's chunk step in this checkout, as separate callables."""
    rng = np.random.default_rng(0)
    model = zoo.mnist_cnn()
    named = model.named_params()
    W1, b1, W2, b2 = (named[k] for k in ("conv1.W", "conv1.b", "conv2.W", "conv2.b"))
    Wd, bd = named["dense1.W"], named["dense1.b"]
    X = rng.random((m, 28, 28, 1), dtype=np.float32)
    A1 = F.relu(F.conv_forward(X, W1, b1, 1, 0))
    A2 = F.relu(F.conv_forward(A1, W2, b2, 1, 0))
    P = F.pool_forward(A2, 2, 2)
    flat = P.reshape(m, -1)
    dZ2 = rng.standard_normal(A2.shape, dtype=np.float32)
    dZ1 = rng.standard_normal(A1.shape, dtype=np.float32)
    dP = rng.standard_normal(P.shape, dtype=np.float32)
    dD = rng.standard_normal((m, 128), dtype=np.float32)
    t1, t2, t2i = F.tile_width(24, 5, 1, 8), F.tile_width(20, 5, 1, 8), F.tile_width(24, 5, 1, 8)
    return {
        "conv1 im2col": lambda: F.im2col(X, 5, 1, 0, t1),
        "conv1 fwd (all)": lambda: F.conv_forward(X, W1, b1, 1, 0),
        "conv1 row_cols": lambda: F.row_cols(X, 5, t1, 24, 0, 0),
        "conv1 wgrad (all)": lambda: F.conv_weight_grad_rows(dZ1, X, W1.shape, 0),
        "relu1 fwd": lambda: F.relu(dZ1),
        "relu1 bwd": lambda: F.relu_backward(dZ1, A1),
        "conv2 im2col": lambda: F.im2col(A1, 5, 1, 0, t2),
        "conv2 fwd (all)": lambda: F.conv_forward(A1, W2, b2, 1, 0),
        "conv2 row_cols": lambda: F.row_cols(A1, 5, t2, 20, 0, 0),
        "conv2 wgrad (all)": lambda: F.conv_weight_grad_rows(dZ2, A1, W2.shape, 0),
        "conv2 igrad row_cols": lambda: F.row_cols(dZ2, 5, t2i, 24, 0, 4),
        "conv2 igrad (all)": lambda: F.conv_input_grad(dZ2, W2, A1.shape, 1, 0),
        "relu2 fwd": lambda: F.relu(dZ2),
        "relu2 bwd": lambda: F.relu_backward(dZ2, A2),
        "pool fwd": lambda: F.pool_forward(A2, 2, 2),
        "pool bwd": lambda: F.pool_backward(dP, A2, 2, 2, "max", A=P),
        "dense1 fwd": lambda: F.dense_forward(flat, Wd, bd),
        "dense1 bwd": lambda: F.dense_backward(dD, flat, Wd),
        "loss": lambda: F.softmax_cross_entropy(dD[:, :10], np.zeros(m, dtype=np.int64),
                                                reduction="sum", check=False),
    }


def run_layers(args) -> None:
    print(f"BLAS kernel: {blas_kernel()}; clock: thread CPU time; us per example")
    packages = {"new": partrain}
    if args.baseline:
        packages = {f"base {args.baseline}": load_revision(args.baseline), **packages}
    for m in args.chunks or (8, 16, 32, 64):
        profiles = {label: layer_profile(pkg, args.model, m, args.rounds, args.per_round)
                    for label, pkg in packages.items()}
        keys = list(dict.fromkeys(k for prof in profiles.values() for k in prof))
        print(f"{args.model} chunk {m}: " + "  ".join(f"{label:>14s}" for label in profiles))
        for k in keys:
            cells = "  ".join(f"{1e6 * prof[k] / m:14.2f}" if k in prof else " " * 14
                              for prof in profiles.values())
            print(f"  {k:16s} {cells}")
        if args.model == "mnist_cnn":
            ops = interleave(mnist_ops(m), args.rounds, args.per_round)
            print(f"  operations of this checkout, chunk {m}:")
            for k, (c, _, _) in ops.items():
                print(f"    {k:18s} {1e6 * c / m:8.2f}")
        sys.stdout.flush()


def conv2_variants(m: int) -> dict:
    """mnist_cnn's second convolution (24x24x8 -> 20x20x8, 5x5) at chunk `m`: each shipped
    kernel beside the alternatives measured against it, after checking they agree."""
    rng = np.random.default_rng(0)
    A = rng.random((m, 24, 24, 8), dtype=np.float32)
    W = rng.standard_normal((5, 5, 8, 8)).astype(np.float32)
    b = rng.standard_normal(8).astype(np.float32)
    dZ = rng.standard_normal((m, 20, 20, 8)).astype(np.float32)
    f, n_out, tile = 5, 20, 4

    def side_by_side(bands):  # (f, K, N) -> (K, f * N): all kernel rows in one matmul
        return np.ascontiguousarray(bands.transpose(1, 0, 2).reshape(bands.shape[1], -1))

    forward_bands = side_by_side(F.row_bands(W, tile))

    def forward_rows():  # width-only im2col, one matmul, f row-shifted additions
        X = F.row_cols(A, f, tile, n_out, 0, 0)
        n_tiles = X.shape[2]
        Y = (X.reshape(-1, X.shape[3]) @ forward_bands).reshape(m, 24, n_tiles, f, tile * 8)
        Z = Y[:, 0:n_out, :, 0].copy()
        for di in range(1, f):
            Z += Y[:, di:di + n_out, :, di]
        F.add_bias(Z.reshape(m * n_out, -1), b)
        return Z.reshape(m, n_out, -1, 8)[:, :, :n_out]

    def weight_grad_long():  # one matmul per kernel row, summing over examples inside it
        X = F.row_cols(A, f, tile, n_out, 0, 0)
        K = X.shape[3]
        D = dZ.reshape(-1, tile * 8)
        d_band = np.stack([X[:, di:di + n_out].reshape(-1, K).T @ D for di in range(f)])
        d_band = d_band.reshape(f, tile + f - 1, 8, tile, 8)
        dW = d_band[:, 0:f, :, 0, :].copy()
        for j in range(1, tile):
            dW += d_band[:, j:j + f, :, j, :]
        return dW

    input_bands = side_by_side(F.row_bands(W[:, ::-1].transpose(0, 1, 3, 2), tile))

    def input_grad_one_matmul():
        X = F.row_cols(dZ, f, tile, 24, 0, f - 1)
        n_tiles = X.shape[2]
        Y = (X.reshape(-1, X.shape[3]) @ input_bands).reshape(m, n_out, n_tiles, f, tile * 8)
        dA = np.zeros((m, 24, n_tiles, tile * 8), np.float32)
        for di in range(f):
            dA[:, di:di + n_out] += Y[:, :, :, di]
        return dA.reshape(m, 24, -1, 8)[:, :, :24]

    groups = {
        "forward": {"shipped (tiled im2col)": lambda: F.conv_forward(A, W, b),
                    "row layout, one matmul": forward_rows},
        "weight grad": {"shipped (per example)": lambda: F.conv_weight_grad_rows(
                            dZ, A, W.shape, 0)[0],
                        "one matmul per kernel row": weight_grad_long},
        "input grad": {"shipped (f matmuls)": lambda: F.conv_input_grad(dZ, W, A.shape, 1, 0),
                       "one matmul, rows side by side": input_grad_one_matmul},
    }
    for group in groups.values():
        shipped, *others = group.values()
        for other in others:
            np.testing.assert_allclose(other(), shipped(), rtol=1e-4, atol=1e-3)
    groups["forward"]["FFT of the input alone (rfft2)"] = lambda: np.fft.rfft2(
        A.transpose(0, 3, 1, 2))
    return groups


def gemm_shapes(m: int) -> dict:
    """(rows, K, N) of the matmuls in the shipped conv2 kernels at chunk `m`, and a large
    square one for the BLAS's peak."""
    return {"conv2 forward (tiled im2col)": (100 * m, 320, 32),
            "conv2 input grad, per kernel row": (120 * m, 64, 32),
            "conv2 weight grad, per example and row": (64, 100, 32),
            "square 1024 (peak)": (1024, 1024, 1024)}


def run_variants(args) -> None:
    print(f"BLAS kernel: {blas_kernel()}; clock: thread CPU time; us per example; "
          "ratio = shipped time / variant time (median [quartiles] over rounds)")
    rng = np.random.default_rng(0)
    for m in args.chunks or (16, 32):
        print(f"mnist_cnn conv2, chunk {m}:")
        for name, candidates in conv2_variants(m).items():
            for label, (cpu, _, (ratio, lo, hi)) in interleave(
                    candidates, args.rounds, args.per_round).items():
                print(f"  {name:12s} {label:32s} {1e6 * cpu / m:8.2f}   x{ratio:.2f} "
                      f"[{lo:.2f}-{hi:.2f}]")
        shapes = gemm_shapes(m)
        operands = {k: (rng.random((r, K), dtype=np.float32), rng.random((K, N), np.float32))
                    for k, (r, K, N) in shapes.items()}
        timed = interleave({k: (lambda a=a, b=b: a @ b) for k, (a, b) in operands.items()},
                           args.rounds, args.per_round)
        for k, (cpu, _, _) in timed.items():
            rows, K, N = shapes[k]
            print(f"  matmul {k:40s} ({rows} x {K}) @ ({K} x {N}): "
                  f"{2 * rows * K * N / cpu / 1e9:6.1f} GFLOP/s")
        sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    ab = sub.add_parser("ab", help="whole chunk steps, interleaved")
    ab.add_argument("--baseline", help="git revision to compare against (e.g. f3a23a2)")
    ab.add_argument("--torch", action="store_true", help="time PyTorch too")
    ab.add_argument("--models", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ab.add_argument("--chunks", nargs="+", type=int)
    ab.add_argument("--rounds", type=int, default=30)
    ab.add_argument("--per-round", type=int, default=10)
    lay = sub.add_parser("layers", help="per-layer (in-step) and per-operation profile")
    lay.add_argument("--model", default="mnist_cnn", choices=list(CONFIGS))
    lay.add_argument("--baseline", help="git revision profiled beside this checkout")
    lay.add_argument("--chunks", nargs="+", type=int)
    lay.add_argument("--rounds", type=int, default=15)
    lay.add_argument("--per-round", type=int, default=5)
    var = sub.add_parser("variants", help="mnist_cnn conv2 kernels against the alternatives")
    var.add_argument("--chunks", nargs="+", type=int)
    var.add_argument("--rounds", type=int, default=15)
    var.add_argument("--per-round", type=int, default=10)
    args = parser.parse_args()
    keep_freed_memory()
    with threadpool_limits(1):
        {"ab": run_ab, "layers": run_layers, "variants": run_variants}[args.cmd](args)


if __name__ == "__main__":
    main()
