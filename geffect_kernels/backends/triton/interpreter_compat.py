"""Work around triton 3.6's interpreter on NumPy ≥ 2.4 (triton-lang/triton#9171, fixed upstream by #9172).

The interpreter holds scalars as 1-element arrays and converts them with ``int(array)``, which NumPy
2.4 refuses; every loop with a run-time bound then fails. The patch converts through the array's one
element instead. It is applied only when interpreting and only where the bug shows.
"""
import numpy as np


def _numpy_rejects_1d_int() -> bool:
    try:
        int(np.array([1]))
    except TypeError:
        return True
    return False


def apply() -> None:
    if not _numpy_rejects_1d_int():
        return
    import triton.runtime.interpreter as interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "_geffect_fixed", False):
        return

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patch_lang_tensor._geffect_fixed = True
    interpreter._patch_lang_tensor = patch_lang_tensor
