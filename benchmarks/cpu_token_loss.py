"""CPU: the chunked `torch` backend against the naive log_softmax(hidden @ W.T) formulation.

Forward+backward of the token loss (GA: mean log-likelihood) at N=4096, H=512, V=32000, float32 (``--dtype
bfloat16``: the inputs rounded to bfloat16, which the chunked backend multiplies into float32 logits). Each
variant runs in its own fresh process (so one variant's allocator state cannot flatter another), the
processes alternate, and every ratio comes from this one run. Peak memory is the process's peak resident
set above what it held once the inputs existed (VmHWM after a reset through /proc/self/clear_refs).

    python benchmarks/cpu_token_loss.py [--rounds 2] [--iters 3] [--dtype bfloat16 --out FILE]

Writes benchmarks/results/cpu_token_loss.csv (rows stamped by provenance.stamp()) and prints the ratio table.
"""
import argparse
import csv
import json
import pathlib
import statistics
import subprocess
import sys
import time

import provenance

N, H, V = 4096, 512, 32000
SHORT = {"float32": "fp32", "bfloat16": "bf16"}


def inputs(seed=0, n=N, dtype="float32"):
    import torch
    g = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, dtype)
    hidden = torch.randn(n, H, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=g) / H ** 0.5).to(dtype).requires_grad_()
    labels = torch.randint(0, V, (n,), generator=g)
    labels[::7] = -100
    return hidden, weight, labels


def step(variant, hidden, weight, labels):
    """One forward+backward; gradients land in .grad."""
    import torch
    import geffect_kernels as gk
    if variant == "naive":
        logp = torch.log_softmax(hidden @ weight.T, dim=-1)
        valid = labels != -100
        loss = logp.gather(1, labels.clamp_min(0).unsqueeze(1)).squeeze(1)[valid].mean()
    elif variant == "chunked-fused":  # token-level objective: gradients formed in the forward pass
        loss = gk.unlearning_loss("ga", hidden, weight, labels, backend="torch")
    elif variant == "chunked-generic":  # token_logprobs + autograd: logits recomputed in backward
        lp = gk.token_logprobs(hidden, weight, labels, backend="torch")
        loss = lp.sum() / (labels != -100).sum()
    else:
        raise ValueError(variant)
    loss.backward()
    return loss


def _rss_kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])
    raise RuntimeError(field)


def worker(variant, iters, dtype):
    import torch
    torch.set_num_threads(2)
    step(variant, *inputs(n=64, dtype=dtype))  # load the BLAS and kernels first: their pages are not the variant's
    hidden, weight, labels = inputs(dtype=dtype)
    hidden.grad, weight.grad = torch.zeros_like(hidden), torch.zeros_like(weight)  # count .grad as inputs
    base = _rss_kib("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak to the current RSS
    times = []
    for i in range(iters + 1):  # the first is a warm-up
        start = time.perf_counter()
        step(variant, hidden, weight, labels)
        if i:
            times.append(1e3 * (time.perf_counter() - start))
    peak = (_rss_kib("VmHWM") - base) / 1024
    print(json.dumps({"variant": variant, "times_ms": times, "peak_mib": peak}))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--variants", default="naive,chunked-fused,chunked-generic")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results" / "cpu_token_loss.csv"))
    args = parser.parse_args()
    variants = args.variants.split(",")
    runs = {v: {"times_ms": [], "peak_mib": []} for v in variants}
    for _ in range(args.rounds):
        for v in variants:
            out = subprocess.run([sys.executable, __file__, "--worker", v, str(args.iters), args.dtype], check=True,
                                 capture_output=True, text=True).stdout
            res = json.loads(out.strip().splitlines()[-1])
            runs[v]["times_ms"] += res["times_ms"]
            runs[v]["peak_mib"].append(res["peak_mib"])
    stamp = provenance.stamp()
    naive_ms = statistics.median(runs["naive"]["times_ms"])
    naive_mib = max(runs["naive"]["peak_mib"])
    rows = []
    for v in variants:
        t = sorted(runs[v]["times_ms"])
        q = statistics.quantiles(t, n=5) if len(t) > 1 else [t[0]] * 4
        rows.append({"kernel": "token_loss_fwd_bwd", "provider": v, "objective": "ga",
                     "shape": f"N{N}_H{H}_V{V}_{SHORT[args.dtype]}",
                     "ms_median": round(statistics.median(t), 1), "ms_p20": round(q[0], 1), "ms_p80": round(q[3], 1),
                     "peak_mib": round(max(runs[v]["peak_mib"]), 1),
                     "time_vs_naive": round(statistics.median(t) / naive_ms, 3),
                     "memory_vs_naive": round(max(runs[v]["peak_mib"]) / naive_mib, 3),
                     **stamp})
    path = pathlib.Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"{'variant':<16} {'ms':>8} {'peak MiB':>9} {'time/naive':>10} {'mem/naive':>9}")
    for r in rows:
        print(f"{r['provider']:<16} {r['ms_median']:>8} {r['peak_mib']:>9} {r['time_vs_naive']:>10} "
              f"{r['memory_vs_naive']:>9}")
    print(f"-> {path}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    else:
        main()
