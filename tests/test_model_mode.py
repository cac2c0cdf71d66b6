"""eval_mode: eval mode inside the block, each module's own mode after it, also after an error."""
import pytest
import torch

from geffect_kernels.model_mode import eval_mode


def mixed_model():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Dropout(0.5), torch.nn.Sequential(torch.nn.Dropout()))
    model.train()
    model[2].eval()  # a part kept in eval mode inside a training model
    return model


def modes(model):
    return [m.training for m in model.modules()]


def test_eval_inside_and_each_modules_mode_after():
    model = mixed_model()
    before = modes(model)
    assert before == [True, True, True, False, False]
    with eval_mode(model) as inside:
        assert inside is model and not any(modes(model))
        x = torch.randn(4, 3)
        assert torch.equal(model(x), model(x))  # no dropout
    assert modes(model) == before


def test_modes_come_back_after_an_error():
    model = mixed_model()
    before = modes(model)
    with pytest.raises(RuntimeError, match="boom"):
        with eval_mode(model):
            raise RuntimeError("boom")
    assert modes(model) == before
