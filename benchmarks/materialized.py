"""G-effects the way plain torch computes them without this package, the baseline of the G-effect benchmarks: each
full gradient by autograd, then dot products parameter by parameter (no flattened or concatenated copy)."""
import torch


def materialized_geffects(model, objective, risks, groups):
    """{risk: {group: ∇objectiveᵀ∇risk over the group's parameters}} as floats. ``objective`` and each of ``risks``
    map the model to a scalar loss; ``groups`` maps each parameter name to its group. The objective's gradient and
    one risk's are alive at once."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    grad_a = torch.autograd.grad(objective(model), params)
    result = {}
    for risk, fn in risks.items():
        grad_b = torch.autograd.grad(fn(model), params)
        sums = {}
        for (name, _), a, b in zip(named, grad_a, grad_b):
            dot = torch.dot(a.reshape(-1), b.reshape(-1)).double()  # stays on the device: no sync per parameter
            sums[groups[name]] = sums.get(groups[name], 0) + dot
        del grad_b
        result[risk] = {group: float(value) for group, value in sums.items()}
    return result
