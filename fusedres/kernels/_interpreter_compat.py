"""Makes Triton 3.6's CPU interpreter work with numpy 2.4 (TRITON_INTERPRET=1 only).

numpy 2.4 raises on ``int()`` of a one-element array that is not 0-d. Triton 3.6's interpreter
turns a runtime scalar into a Python int exactly that way when a kernel uses it as a loop bound
(``for r in range(0, ROWS_PER_PROG, BLOCK_M)``), so every such kernel fails under the interpreter
(triton-lang/triton#9171; triton 3.7 takes the element out first). :func:`apply` makes 3.6 do the
same and leaves any other version alone: it acts only where the old conversion is in the source.
"""

from __future__ import annotations

import inspect

_OLD_CONVERSION = '"__index__", lambda self: int(self.handle.data))'


def apply() -> bool:
    """Patches the interpreter if it has the numpy-2.4-incompatible conversion; True if it did."""
    from triton.runtime import interpreter

    patch_tensor = getattr(interpreter, "_patch_lang_tensor", None)
    if patch_tensor is None or getattr(patch_tensor, "fusedres_numpy24_fix", False):
        return False
    try:
        source = inspect.getsource(patch_tensor)
    except (OSError, TypeError):
        return False
    if _OLD_CONVERSION not in source:
        return False

    def patch_tensor_numpy24(tensor, scope):
        patch_tensor(tensor, scope)
        # The scope restores attributes in reverse order, so setting one twice undoes cleanly.
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    patch_tensor_numpy24.fusedres_numpy24_fix = True
    interpreter._patch_lang_tensor = patch_tensor_numpy24
    return True
