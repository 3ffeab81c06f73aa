"""GPU benchmark of the op: fused kernels vs the unfused CUDA path vs the PyTorch composition.

    python benchmarks/bench_gpu.py [--repeats 50] [--out DIR]

For each shape (the issue's headline B=256, H=2, T=200, d=64, bf16, lengths uniform in [1, T], plus
T in {50, 128, 512, 1024} and d in {32, 128}) it times, with CUDA events, after warm-up, with the L2
cache flushed before every run, the median of --repeats runs of
  - forward (no autograd) and forward + backward (autograd, out.backward(dout));
  - ``fused``: pka_ext.pka_attention; ``unfused``: the same with PKA_CUDA_UNFUSED=1;
    ``composition``: mixing by torch.matmul + F.scaled_dot_product_attention with the mask;
  - variants of ``fused``, to compare tuning choices in one run: the forward with its blocks fixed
    at 4 and at 8 warps (PKA_FWD_WARPS), forward and forward + backward with the 16-bit scores
    and probabilities through shared memory (WMMA, the forward's softmax in two passes) instead of
    on mma.sync registers (PKA_SMEM_SCORES=1), forward + backward with the backward block fixed at
    4 and at 8 warps (PKA_BWD_WARPS), forward and forward + backward with the blocks in batch order
    instead of longest sequence first (PKA_BLOCK_ORDER=0), and with the less used half of the block
    buffers (PKA_FUSED_WORKSPACE=split) or all of them (=1) in the global workspace instead of as
    many as fit in shared memory.
The HBM floor is the minimal traffic (forward: read q, k, v, write out and fp32 lse; backward: read
q, k, v, out, dout, lse, write dq, dk, dv, da_k, da_v; kernels counted once) divided by the
device-to-device copy bandwidth measured in the same run.
An implementation that fails at a shape and leaves the device usable (out of memory, a failed check)
is listed as failed, "-" in the tables, and the run goes on; the exit code is then 1.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from attention_impls import composition, make_inputs  # noqa: E402
from common import describe, machine_info, write_results  # noqa: E402

import pka_ext  # noqa: E402

HEADLINE = dict(B=256, H=2, T=200, d=64)
SHAPES = [HEADLINE] + [dict(HEADLINE, T=t) for t in (50, 128, 512, 1024)] + \
         [dict(HEADLINE, d=d) for d in (32, 128)]


class Timer:
    def __init__(self, repeats: int, warmup: int = 5):
        self.repeats, self.warmup = repeats, warmup
        self.flush_buf = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")  # > L2 (50-60 MB)

    def __call__(self, fn) -> float:
        """Median milliseconds of fn(), L2 flushed before each run."""
        for _ in range(self.warmup):
            fn()
        times = []
        for _ in range(self.repeats):
            self.flush_buf.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)


def copy_bandwidth(timer: Timer) -> float:
    """Bytes per second of a 1 GiB device-to-device copy (read + write counted)."""
    src = torch.empty(2**30, dtype=torch.int8, device="cuda")
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))
    return 2 * src.numel() / (ms * 1e-3)


def floor_bytes(B, H, T, d, elem) -> tuple[int, int]:
    n = B * H * T * d * elem
    lse = B * H * T * 4
    kernels = 2 * T * T * elem
    fwd = 3 * n + kernels + n + lse
    bwd = 5 * n + lse + kernels + 3 * n + kernels
    return fwd, fwd + bwd


def with_env(env: dict[str, str], fn):
    """fn run with the variables of env set (the entry points read them on every call)."""
    def run():
        old = {name: os.environ.get(name) for name in env}
        os.environ.update(env)
        try:
            return fn()
        finally:
            for name, value in old.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
    return run


def cuda_usable() -> bool:
    """Whether the device still runs work: false after a sticky error (an illegal address loses the
    context), true after one that leaves it intact (out of memory, a failed check in the op)."""
    try:
        torch.cuda.synchronize()
    except Exception:  # noqa: BLE001 (torch.AcceleratorError, or no device at all)
        return False
    return True


MAIN = ("fused", "unfused", "composition")
VARIANTS = ("fwd4", "fwd8", "smem_scores", "bwd4", "bwd8", "batch_order", "split", "workspace")


def bench_shape(shape, dtype, timer: Timer, bw: float, names) -> dict:
    """Times the implementations ``names`` (keys of ``impls`` below) at one shape."""
    B, H, T, d = shape["B"], shape["H"], shape["T"], shape["d"]
    q, k, v, a_k, a_v, lengths = make_inputs(B, H, T, d, dtype=dtype, device="cuda")
    dout = torch.randn_like(q)
    pka = lambda: pka_ext.pka_attention(q, k, v, a_k, a_v, lengths)  # noqa: E731
    # name -> (environment for the whole timed call, backward included; the forward; what to time)
    both, fwd_only, fwdbwd_only = ("fwd", "fwdbwd"), ("fwd",), ("fwdbwd",)
    impls = {"fused": ({}, pka, both), "unfused": ({"PKA_CUDA_UNFUSED": "1"}, pka, both),
             "composition": ({}, lambda: composition(q, k, v, a_k, a_v, lengths), both),
             "fwd4": ({"PKA_FWD_WARPS": "4"}, pka, fwd_only),
             "fwd8": ({"PKA_FWD_WARPS": "8"}, pka, fwd_only),
             "smem_scores": ({"PKA_SMEM_SCORES": "1"}, pka, both),
             "bwd4": ({"PKA_BWD_WARPS": "4"}, pka, fwdbwd_only),
             "bwd8": ({"PKA_BWD_WARPS": "8"}, pka, fwdbwd_only),
             "batch_order": ({"PKA_BLOCK_ORDER": "0"}, pka, both),
             "split": ({"PKA_FUSED_WORKSPACE": "split"}, pka, both),
             "workspace": ({"PKA_FUSED_WORKSPACE": "1"}, pka, both)}
    row = dict(shape, dtype=str(dtype).replace("torch.", ""))
    for name in names:
        env, fn, modes = impls[name]

        def fwd_bwd(fn=fn):
            out = fn()
            torch.autograd.backward(out, dout)
            for t in (q, k, v, a_k, a_v):
                t.grad = None

        try:
            if "fwd" in modes:
                with torch.no_grad():
                    row[f"fwd_ms_{name}"] = timer(with_env(env, fn))
            if "fwdbwd" in modes:
                row[f"fwdbwd_ms_{name}"] = timer(with_env(env, fwd_bwd))
        except Exception as err:
            # Out of memory or a failed check costs this implementation at this shape only; after a
            # sticky error nothing more can run (the rows written so far stay).
            if not cuda_usable():
                raise
            row[f"error_{name}"] = f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:200]}"
            print(f"{shape} {name}: {row[f'error_{name}']}", flush=True)
    fwd_b, total_b = floor_bytes(B, H, T, d, q.element_size())
    row["fwd_floor_ms"] = fwd_b / bw * 1e3
    row["fwdbwd_floor_ms"] = total_b / bw * 1e3
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu.py needs a CUDA device")
    torch.backends.cuda.matmul.allow_tf32 = False
    dtype = getattr(torch, args.dtype)
    timer = Timer(args.repeats)
    bw = copy_bandwidth(timer)
    print(f"copy bandwidth {bw / 1e9:.0f} GB/s", flush=True)
    info = machine_info()
    rows = []
    # The main table first at every shape, then the variants: a run cut off by a time limit, or
    # a variant that fails, keeps every row of the main table. Rewritten after every step.
    for shape in SHAPES:
        rows.append(bench_shape(shape, dtype, timer, bw, MAIN))
        r = rows[-1]
        print(f"{shape}: fwd fused {_ms(r, 'fwd_ms_fused')} ms, composition "
              f"{_ms(r, 'fwd_ms_composition')} ms; fwd+bwd fused {_ms(r, 'fwdbwd_ms_fused')}, "
              f"composition {_ms(r, 'fwdbwd_ms_composition')}", flush=True)
        md = report(rows, bw, info, args)
    for row, shape in zip(rows, SHAPES):
        row.update(bench_shape(shape, dtype, timer, bw, VARIANTS))
        print(f"{shape}: variants timed", flush=True)
        md = report(rows, bw, info, args)
    print(md)
    if any(key.startswith("error_") for r in rows for key in r):  # an exit code the summary shows
        raise SystemExit("bench_gpu.py: some timings failed (listed in the report)")


def _ms(r, key) -> str:
    return f"{r[key]:.3f}" if key in r else "-"


def _ratio(r, num, den) -> str:
    return f"{r[num] / r[den]:.2f}x" if num in r and den in r else "-"


def report(rows, bw, info, args) -> str:
    md = ["# GPU op benchmark", "",
          f"Machine: {describe(info)}. Command: `python benchmarks/bench_gpu.py --dtype {args.dtype}` "
          f"(CUDA events, L2 flushed before each run, median of {args.repeats} after warm-up; lengths "
          f"uniform in [1, T]). Copy bandwidth measured in the same run: {bw / 1e9:.0f} GB/s.", "",
          "| B | H | T | d | fwd fused ms | fwd unfused ms | fwd composition ms | fwd speed-up vs composition "
          "| fwd / HBM floor | fwd+bwd fused ms | fwd+bwd unfused ms | fwd+bwd composition ms "
          "| fwd+bwd speed-up | fwd+bwd / HBM floor |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(
            f"| {r['B']} | {r['H']} | {r['T']} | {r['d']} | {_ms(r, 'fwd_ms_fused')} | "
            f"{_ms(r, 'fwd_ms_unfused')} | {_ms(r, 'fwd_ms_composition')} | "
            f"{_ratio(r, 'fwd_ms_composition', 'fwd_ms_fused')} | {_ratio(r, 'fwd_ms_fused', 'fwd_floor_ms')} | "
            f"{_ms(r, 'fwdbwd_ms_fused')} | {_ms(r, 'fwdbwd_ms_unfused')} | {_ms(r, 'fwdbwd_ms_composition')} | "
            f"{_ratio(r, 'fwdbwd_ms_composition', 'fwdbwd_ms_fused')} | "
            f"{_ratio(r, 'fwdbwd_ms_fused', 'fwdbwd_floor_ms')} |")
    md += ["", "Variants of the fused kernels (ms; the table above uses the defaults: 4 warps per "
           "forward block unless one block would have its SM to itself, the 16-bit scores on "
           "mma.sync registers, 8 per backward block where they fit, blocks longest sequence "
           "first, as many block buffers in shared memory as fit):",
           "",
           "| T | d | fwd, 4 warps | fwd, 8 warps | fwd, scores through shared memory "
           "| fwd+bwd, scores through shared memory | fwd+bwd, backward 4 warps "
           "| fwd+bwd, backward 8 warps | fwd, batch order | fwd+bwd, batch order "
           "| fwd, split | fwd+bwd, split | fwd, all in workspace | fwd+bwd, all in workspace |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    columns = ("fwd_ms_fwd4", "fwd_ms_fwd8", "fwd_ms_smem_scores", "fwdbwd_ms_smem_scores",
               "fwdbwd_ms_bwd4", "fwdbwd_ms_bwd8", "fwd_ms_batch_order", "fwdbwd_ms_batch_order",
               "fwd_ms_split", "fwdbwd_ms_split", "fwd_ms_workspace", "fwdbwd_ms_workspace")
    tried = [r for r in rows if any(c in r for c in columns) or
             any(f"error_{name}" in r for name in VARIANTS)]
    md += [f"| {r['T']} | {r['d']} | " + " | ".join(_ms(r, c) for c in columns) + " |" for r in tried]
    failed = [f"T={r['T']}, d={r['d']}, {key[len('error_'):]}: {msg}"
              for r in rows for key, msg in r.items() if key.startswith("error_")]
    if failed:
        md += ["", "Failed (- in the tables):", "", *(f"- {line}" for line in failed)]
    if len(rows) < len(SHAPES) or len(tried) < len(SHAPES):
        md += ["", f"Partial: {len(rows)} of {len(SHAPES)} shapes in the main table, "
               f"{len(tried)} with their variants."]
    md += ["", "Targets (headline row): fwd >= 1.5x vs composition and <= 1.5x the HBM floor; "
           "fwd+bwd >= 1.8x vs composition and <= 1.5x the HBM floor."]
    write_results(f"gpu_op_{args.dtype}", {"machine": info, "copy_bandwidth_Bps": bw, "rows": rows},
                  "\n".join(md) + "\n", args.out)
    return "\n".join(md)

if __name__ == "__main__":
    main()
