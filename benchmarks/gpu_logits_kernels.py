"""The GPU suite's ``logits`` part: the logits-input token-loss kernels (csrc `cuda`, `triton`) and the Gram kernel.

1. Correctness: weighted loss and gradient from logits, bf16/fp16/fp32, against `reference` in float64 on the
   same rounded logits (odd V, ignored positions, softcap), for every backend that runs here.
2. Speed at N=8192, V=128256, bf16 (DESIGN §6): forward+backward with the gradient written in place. Every
   timed call starts from a fresh copy of the logits (the kernels overwrite them), so the copy is timed alone
   and subtracted. The fewest bytes such a kernel can move: read the logits once and write the gradient once
   (2·N·V·2 bytes); its bandwidth is compared with a device-to-device copy measured in the same run, and its
   time with naive torch and Liger's in-place cross-entropy (when liger-kernel is importable).
3. Gram inner product: the csrc kernel and the Triton tensor-core kernel against float64, timed with two matmuls
   and an elementwise product for scale, and the one `fastest_gram` keeps.

Run as ``python benchmarks/gpu_suite.py logits --csv FILE [--smoke]``.
"""
import torch

import geffect_kernels as gk

N, V = 8192, 128256


def _backends(dev):
    from geffect_kernels.backends.registry import available_backends
    if dev.type != "cuda":
        return ["triton"]  # smoke: the interpreter, no extension build
    return [b for b in ("cpp_cuda", "triton") if b in available_backends(dev)]


def check_correctness(rec, backends, dev, dtypes):
    g = torch.Generator(device=dev).manual_seed(0)
    n, v = (301, 5003) if dev.type == "cuda" else (31, 503)
    for backend in backends:
        for dtype in dtypes:
            ids = dict(case="logits wga softcap", provider=backend, objective="wga", dtype=str(dtype)[6:],
                       shape=f"N={n},V={v}")
            with rec.case(**ids):
                logits = (torch.randn(n, v, device=dev, generator=g) * 4).to(dtype)
                labels = torch.randint(0, v, (n,), device=dev, generator=g)
                labels[::7] = -100
                z64 = logits.double().requires_grad_()
                ref = gk.unlearning_loss_from_logits("wga", z64, labels, softcap=30.0, backend="oracle")
                ref.backward()
                z = logits.clone().requires_grad_()
                loss = gk.unlearning_loss_from_logits("wga", z, labels, softcap=30.0, backend=backend)
                loss.backward()
                loss_err = abs(loss.item() - ref.item()) / abs(ref.item())
                grad_err = ((z.grad.double() - z64.grad).norm() / z64.grad.norm()).item()
                tol = 5e-3 if dtype == torch.bfloat16 else 3e-3
                ok = loss_err <= 1e-3 and grad_err <= tol
                rec.row(**ids, status="ok" if ok else "FAIL", loss_rel_err=loss_err, dh_rel_err=grad_err,
                        tolerance=f"1e-3/{tol:g}", note="dh column: d logits")


def time_ms(fn):
    import triton.testing
    return triton.testing.do_bench(fn, warmup=10, rep=100, quantiles=[0.5, 0.2, 0.8])


def speed(rec, backends):
    shape = f"N={N},V={V},bf16 logits"
    torch.manual_seed(0)
    logits = torch.randn(N, V, device="cuda", dtype=torch.bfloat16)
    labels = torch.randint(0, V, (N,), device="cuda")
    work = torch.empty_like(logits)
    nbytes = 2 * logits.numel() * logits.element_size()  # one read + one write
    copy_ms = time_ms(lambda: work.copy_(logits))[0]
    rec.row(case="logits", provider="d2d copy", objective="-", dtype="bf16", shape=shape, status="ok",
            ms_median=copy_ms, note=f"{nbytes / copy_ms / 1e9:.2f} TB/s")

    def in_place(backend):
        def run():
            work.copy_(logits)
            z = work.detach().requires_grad_()  # a fresh leaf on work's storage: the gradient goes there
            gk.unlearning_loss_from_logits("ga", z, labels, backend=backend, inplace=True).backward()
        return run

    def naive():
        z = logits.detach().requires_grad_()
        torch.nn.functional.cross_entropy(z.float(), labels).backward()

    candidates = {f"{b} in place": in_place(b) for b in backends}
    candidates["naive torch"] = naive
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss
        liger = LigerCrossEntropyLoss()

        def liger_ce():
            work.copy_(logits)
            z = work.detach().requires_grad_()
            liger(z, labels).backward()
        candidates["liger cross-entropy"] = liger_ce
    except ImportError as exc:
        rec.row(case="logits", provider="liger cross-entropy", shape=shape, status="skipped", note=str(exc)[:200])
    for name, fn in candidates.items():
        ids = dict(case="logits", provider=name, objective="ga", dtype="bf16", shape=shape)
        with rec.case(**ids):
            med, p20, p80 = time_ms(fn)
            kernel_ms = med - copy_ms if name != "naive torch" else med
            rec.row(**ids, status="ok", ms_median=med, ms_p20=p20, ms_p80=p80,
                    note=f"kernel {kernel_ms:.3f} ms = {nbytes / kernel_ms / 1e9:.2f} TB/s, "
                         f"{copy_ms / kernel_ms:.2f} of copy bandwidth")


def gram(rec, dev, rows=2048):
    """The Gram form Σ (G_a G_bᵀ) ∘ (X_a X_bᵀ): every implementation (csrc on CUDA cores, Triton on tensor cores)
    against float64 and timed, two matmuls + product for scale, and which one `fastest_gram` keeps."""
    from geffect_kernels.backends.cpp.ghost import fastest_gram, gram_implementations
    torch.manual_seed(0)
    dtype = torch.bfloat16
    shape = f"{rows}x4096 per side, bf16"
    ga, xa, gb, xb = (torch.randn(rows, 4096, device=dev).to(dtype) for _ in range(4))
    expected = ((ga.double() @ gb.double().T) * (xa.double() @ xb.double().T)).sum().item()
    for name, fn in gram_implementations(dev, dtype).items():
        ids = dict(case="gram", provider=name, objective="-", dtype="bf16", shape=shape)
        with rec.case(**ids):
            err = abs(fn(ga, xa, gb, xb).item() - expected) / abs(expected)
            ms = time_ms(lambda: fn(ga, xa, gb, xb))
            rec.row(**ids, status="ok" if err <= 5e-3 else "FAIL", loss_rel_err=err, ms_median=ms[0], ms_p20=ms[1],
                    ms_p80=ms[2])
    ms = time_ms(lambda: ((ga @ gb.T).float() * (xa @ xb.T).float()).sum())
    rec.row(case="gram", provider="two matmuls + product", objective="-", dtype="bf16", shape=shape, status="ok",
            ms_median=ms[0], ms_p20=ms[1], ms_p80=ms[2])
    with rec.case(case="gram", provider="fastest_gram", objective="-", shape=shape):
        rec.row(case="gram", provider="fastest_gram", objective="-", shape=shape, status="ok",
                note=f"chose {fastest_gram(ga, xa, gb, xb)[0]}")


def run(rec, dev, smoke=False):
    backends = _backends(dev)
    if smoke:
        check_correctness(rec, backends, dev, (torch.float32,))
        return
    check_correctness(rec, backends, dev, (torch.bfloat16, torch.float16, torch.float32))
    speed(rec, backends)
    gram(rec, dev)
