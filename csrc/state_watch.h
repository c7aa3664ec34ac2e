// StateWatch: a cheap "has anything changed?" for the Python objects an inference plan was made
// from (docs/design.md section 4, "Inference plans").
//
// A plan's key (fusedres/ops/unit.py: unit_state_key) reads every unit's module attributes and
// tensors in Python: about a hundred objects per ResNet call, 0.3-0.6 ms with the caches as the
// convolutions leave them, which is what the fused eval lost to torch.compile. A watch records,
// once the key has matched, the identity of every entry of the watched dicts (a module's
// __dict__, _parameters, _buffers, _modules, hook dicts) and every watched tensor's type,
// version, storage, shape, strides, dtype and device; `unchanged()` compares them in C++. It is
// conservative: any rebinding (even of an attribute to an equal value), a dict entry added,
// removed or reordered, or a tensor changed in place or swapped under `.data` counts as a
// change, and the caller falls back to the key.
#pragma once

#include <pybind11/pybind11.h>

namespace fusedres {

void register_state_watch(pybind11::module& m);

}  // namespace fusedres
