"""Flops of a call as torch's `FlopCounterMode` counts them: deterministic where timings are not (CPU only: a GPU's
Triton kernels are not aten ops)."""
import torch


def counted_flops(fn) -> float:
    """Flops of one call of ``fn``: the matmuls and the attention, with what the counter's registry lacks (in-place
    ``addmm_``, the head's accumulations; the CPU flash attention) added."""
    from torch.utils import flop_counter as fc
    aten = torch.ops.aten
    extra = {aten.addmm_: lambda out, a, b, *_, out_shape=None, **__: fc.mm_flop(a, b),
             aten._scaled_dot_product_flash_attention_for_cpu:
                 lambda q, k, v, *_, out_shape=None, **__: fc.sdpa_flop_count(q, k, v),
             aten._scaled_dot_product_flash_attention_for_cpu_backward:
                 lambda grad, q, k, v, *_, out_shape=None, **__: fc.sdpa_backward_flop_count(grad, q, k, v)}
    with fc.FlopCounterMode(display=False, custom_mapping=extra) as counter:
        fn()
    return float(counter.get_total_flops())
