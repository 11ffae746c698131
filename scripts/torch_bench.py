"""Times the ops of a `normdrop bench --json` report in PyTorch CUDA and prints one table:
normdrop's median, PyTorch's median, and PyTorch/normdrop (above 1: normdrop is faster).

PyTorch runs the same shapes with the same semantics: F.batch_norm (cuDNN), F.layer_norm,
F.rms_norm (eps None), F.group_norm (gcd(C, 32) groups), F.dropout / F.dropout2d with p = 0.1, backward through autograd (only the backward is timed),
and the unfused sequences where normdrop fuses (PyTorch has no fused norm+dropout). Timing:
CUDA events, median of --samples runs after --warmup runs.

With --dtype f16 the activations are float16 (LayerNorm's γ and β too, as F.layer_norm needs;
BatchNorm's parameters and statistics stay float32, as cuDNN takes them).

The table: each op's median, GB/s by normdrop's minimal-bytes formula and % of copy (from the
report), PyTorch's median and GB/s by the same bytes, and PyTorch/normdrop time (above 1:
normdrop is faster).

Usage: python3 scripts/torch_bench.py --ours normdrop.json [--dtype f32|f16] [--json torch.json]
"""

import argparse
import json
import math
import statistics

import torch
import torch.nn.functional as F

P = 0.1


def cuda_time(fn, warmup, samples):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(samples):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3)  # microseconds
    return statistics.median(times)


def make(op, shape, dtype):
    """The forward (a closure of x) and, for *_backward ops, the tensors to differentiate."""
    dev = torch.device("cuda")
    x = torch.randn(*shape, device=dev, dtype=dtype)
    if op.startswith(("batch_norm", "dropout2d", "group_norm")) and len(shape) >= 2:
        c = shape[1]
        w, b = torch.ones(c, device=dev), torch.zeros(c, device=dev)
        rm, rv = torch.zeros(c, device=dev), torch.ones(c, device=dev)
    if op.startswith(("rms_norm", "residual_dropout_rms_norm")):
        w = torch.ones(shape[-1], device=dev, dtype=dtype)
        res = torch.randn(*shape, device=dev, dtype=dtype)
    if op.startswith(("layer_norm", "residual")):
        width = shape[-1]
        w, b = torch.ones(width, device=dev, dtype=dtype), torch.zeros(width, device=dev, dtype=dtype)
        res = torch.randn(*shape, device=dev, dtype=dtype)
    training = not op.startswith("batch_norm_eval")

    def forward(x, w=None, b=None):
        if op.startswith(("batch_norm_train", "batch_norm_eval")):
            return F.batch_norm(x, rm, rv, w, b, training=training, momentum=0.1, eps=1e-5)
        if op.startswith("batch_norm_dropout"):
            return F.dropout(F.batch_norm(x, rm, rv, w, b, training=True, momentum=0.1, eps=1e-5), P)
        if op.startswith("layer_norm_dropout"):
            return F.dropout(F.layer_norm(x, (shape[-1],), w, b, 1e-5), P)
        if op.startswith("layer_norm"):
            return F.layer_norm(x, (shape[-1],), w, b, 1e-5)
        if op.startswith("group_norm"):
            # normdrop's bench normalizes GroupNorm rows in gcd(C, 32) groups.
            return F.group_norm(x, math.gcd(shape[1], 32), w, b, 1e-5)
        if op.startswith("rms_norm"):
            return F.rms_norm(x, (shape[-1],), w, None)
        if op.startswith("residual_dropout_rms_norm"):
            return F.rms_norm(res + F.dropout(x, P), (shape[-1],), w, None)
        if op.startswith("residual"):
            return F.layer_norm(res + F.dropout(x, P), (shape[-1],), w, b, 1e-5)
        if op.startswith("dropout2d"):
            return F.dropout2d(x, P)
        return F.dropout(x, P)

    if op.startswith(("rms_norm", "residual_dropout_rms_norm")):
        params = [w]
    elif op.startswith(("batch_norm", "layer_norm", "residual", "group_norm")):
        params = [w, b]
    else:
        params = []
    return x, params, forward


def time_op(op, shape, dtype, warmup, samples):
    x, params, forward = make(op, shape, dtype)
    if op.endswith("_forward"):
        with torch.no_grad():
            return cuda_time(lambda: forward(x, *params), warmup, samples)
    x.requires_grad_(True)
    for p in params:
        p.requires_grad_(True)
    y = forward(x, *params)
    dy = torch.randn_like(y)
    inputs = [x] + params
    return cuda_time(lambda: torch.autograd.grad(y, inputs, dy, retain_graph=True), warmup, samples)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ours", required=True, help="normdrop bench --json output")
    ap.add_argument("--json", help="write PyTorch's timings here")
    ap.add_argument("--dtype", choices=["f32", "f16"], default="f32", help="activation dtype")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--samples", type=int, default=50)
    args = ap.parse_args()

    dtype = {"f32": torch.float32, "f16": torch.float16}[args.dtype]
    ours = json.load(open(args.ours))
    print(f"normdrop on {ours['adapter']} ({ours['backend']}, {ours['clock']}, {ours.get('storage', args.dtype)}); "
          f"PyTorch {torch.__version__} on {torch.cuda.get_device_name()} (CUDA events), {args.dtype}")
    print(f"{'op':<38} {'shape':<16} {'ours µs':>9} {'ours GB/s':>9} {'% copy':>7} "
          f"{'torch µs':>9} {'torch GB/s':>10} {'torch/ours':>10}")
    rows = []
    for r in ours["rows"]:
        shape = r["shape"]
        torch_us = time_op(r["op"], shape, dtype, args.warmup, args.samples)
        ratio = torch_us / r["median_us"]
        # The report's GB/s is minimal bytes / median time: the same bytes over PyTorch's time.
        nbytes = r["gb_per_s"] * r["median_us"] * 1e3
        torch_gbs = nbytes / (torch_us * 1e3)
        rows.append({"op": r["op"], "shape": shape, "normdrop_us": r["median_us"], "normdrop_gb_per_s": r["gb_per_s"],
                     "pct_of_copy": r["pct_of_copy"], "torch_us": torch_us, "torch_gb_per_s": torch_gbs, "ratio": ratio})
        print(f"{r['op']:<38} {'x'.join(map(str, shape)):<16} {r['median_us']:>9.1f} {r['gb_per_s']:>9.1f} "
              f"{r['pct_of_copy']:>6.1f}% {torch_us:>9.1f} {torch_gbs:>10.1f} {ratio:>9.2f}x")
    if args.json:
        json.dump({"torch": torch.__version__, "device": torch.cuda.get_device_name(), "dtype": args.dtype,
                   "rows": rows}, open(args.json, "w"), indent=1)


if __name__ == "__main__":
    main()
