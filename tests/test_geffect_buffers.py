"""The head pass's buffer pool (`geffect.buffers`): buffers lent apart within a measurement, lent again after
it, only CPU buffers within the limit kept; and a profiler reusing them gives every later measurement the
values a fresh profiler gives, also where a sample's buffer held another measurement's gradient."""
import torch

from geffect_kernels.geffect import GEffectProfiler
from geffect_kernels.geffect.buffers import BufferPool

from geffect_models import batch, force, tiny_model


def test_pool_lends_apart_and_again():
    pool = BufferPool(limit_bytes=1000)
    a, b = pool.empty((10, 10), torch.float32, "cpu"), pool.empty((5, 20), torch.float32, "cpu")
    assert a.data_ptr() != b.data_ptr() and b.shape == (5, 20)  # both lent within one measurement
    pool.reclaim()
    smaller = pool.empty((3, 30), torch.float32, "cpu")  # a view of a free buffer large enough
    assert smaller.shape == (3, 30) and smaller.data_ptr() in {a.data_ptr(), b.data_ptr()}
    other = pool.empty((10, 10), torch.float32, "cpu")
    assert {smaller.data_ptr(), other.data_ptr()} == {a.data_ptr(), b.data_ptr()}
    past_limit = pool.empty((60,), torch.float32, "cpu")  # 800 + 240 bytes would pass the 1000 kept at most
    pool.reclaim()
    assert pool.kept_bytes == 800
    assert past_limit.data_ptr() not in {pool.empty((100,), torch.float32, "cpu").data_ptr() for _ in range(2)}
    pool.reclaim()
    larger = pool.empty((150,), torch.float32, "cpu")  # none large enough: the free ones are dropped
    pool.reclaim()
    assert pool.kept_bytes == 600 and larger.data_ptr() == pool.empty((150,), torch.float32, "cpu").data_ptr()
    pool.reclaim()
    pool.empty((150,), torch.float32, "cpu")
    nine = pool.empty((3, 3), torch.float32, "cpu")
    pool.reclaim()
    assert pool.empty((9,), torch.float32, "cpu").data_ptr() == nine.data_ptr()  # the best fit, second of two
    pool.empty((4,), torch.float64, "meta")  # a device's allocator reuses its own blocks: not kept
    pool.reclaim()
    assert pool.kept_bytes == 636


def test_reused_buffers_give_a_fresh_profilers_values(monkeypatch):
    """The second measurement's forget batch has a sample without any label: its per-sample head gradient is
    the buffer that held the first measurement's gradient of that sample, and must read as zero."""
    force(monkeypatch, "projection")
    model = tiny_model("llama")
    forget, retain = batch(seed=61), batch(batch_size=2, seed=62, pad_first=False)
    emptied = batch(seed=63)
    emptied["labels"][1] = -100
    profiler = GEffectProfiler(model)
    first = profiler.measure_unlearning("ga", forget, retain, per_instance=True)
    kept = {t.data_ptr() for t in profiler._buffers._free}
    assert kept and profiler._buffers.kept_bytes > 0
    second = profiler.measure_unlearning("ga", emptied, retain, per_instance=True)  # fewer rows: views
    assert {t.data_ptr() for t in profiler._buffers._free} == kept
    for measured, batch_ in ((first, forget), (second, emptied)):
        fresh = GEffectProfiler(model).measure_unlearning("ga", batch_, retain, per_instance=True)
        assert measured.by_group == fresh.by_group and measured.per_instance == fresh.per_instance
    assert second.per_instance["forget"][1] == 0.0 and second.per_instance["retain"][1] == 0.0
