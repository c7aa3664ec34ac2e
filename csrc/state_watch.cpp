#include "state_watch.h"

// torch's pybind11 casters, not <torch/csrc/autograd/python_variable.h>: that header (the
// autograd internals behind THPVariable_Unpack) took this file's compile from 9 to 28 CPU s.
#include <torch/csrc/utils/pybind.h>

#include <vector>

namespace fusedres {
namespace {

namespace py = pybind11;

// A watched dict, its entries, and its owner where it is the owner's `__dict__` (which could be
// replaced wholesale, or the owner's class; a module's containers only through the __dict__'s
// entries).
struct DictSnapshot {
  py::object owner;  // None: the dict is watched for its entries only
  PyTypeObject* owner_type;
  py::dict dict;
  std::vector<py::object> keys, values;  // strong references: no id is reused while watched
};

struct TensorSnapshot {
  py::object object;
  PyTypeObject* type;
  int64_t version;
  // A weak reference keeps the StorageImpl object (not its memory) allocated, so no later
  // storage can take its address: a swap under `.data` is seen even where the new storage's
  // memory lands where the old one's was.
  c10::weak_intrusive_ptr<c10::StorageImpl> storage;
  const void* data;
  std::vector<int64_t> sizes, strides;
  at::ScalarType dtype;
  at::Device device;
};

bool same_entries(const DictSnapshot& s) {
  if (!s.owner.is_none()) {
    if (Py_TYPE(s.owner.ptr()) != s.owner_type) return false;
    PyObject* current = PyObject_GenericGetDict(s.owner.ptr(), nullptr);
    if (current == nullptr) {
      PyErr_Clear();
      return false;
    }
    const bool same_dict = current == s.dict.ptr();
    Py_DECREF(current);
    if (!same_dict) return false;
  }
  if (PyDict_Size(s.dict.ptr()) != static_cast<Py_ssize_t>(s.keys.size())) return false;
  Py_ssize_t pos = 0;
  PyObject *key, *value;
  for (size_t i = 0; PyDict_Next(s.dict.ptr(), &pos, &key, &value); ++i) {
    if (key != s.keys[i].ptr() || value != s.values[i].ptr()) return false;
  }
  return true;
}

c10::weak_intrusive_ptr<c10::StorageImpl> storage_of(const at::Tensor& t) {
  return t.has_storage() ? t.storage().getWeakStorageImpl()
                         : c10::weak_intrusive_ptr<c10::StorageImpl>(
                               c10::intrusive_ptr<c10::StorageImpl>());
}

// The start of t's memory, or null where it has none to show (no storage, or access refused).
const void* data_of(const at::Tensor& t) {
  if (!t.has_storage()) return nullptr;
  try {
    return t.unsafeGetTensorImpl()->data();
  } catch (const c10::Error&) {
    return nullptr;
  }
}

// The tensor a Python object holds, or an undefined one where it holds none (the caster's load,
// exported by libtorch_python, checks the type and takes a reference).
at::Tensor unpack(const py::handle& object) {
  py::detail::make_caster<at::Tensor> caster;
  return caster.load(object, false) ? py::detail::cast_op<at::Tensor>(std::move(caster))
                                    : at::Tensor();
}

bool same_tensor(const TensorSnapshot& s) {
  if (Py_TYPE(s.object.ptr()) != s.type) return false;
  const at::Tensor t = unpack(s.object);
  if (!t.defined() || t.is_inference()) return false;  // inference: no version to compare
  const c10::StorageImpl* storage = t.has_storage() ? t.storage().unsafeGetStorageImpl() : nullptr;
  return t._version() == s.version && storage == s.storage._unsafe_get_target() &&
         data_of(t) == s.data &&
         t.sizes() == at::IntArrayRef(s.sizes) && t.strides() == at::IntArrayRef(s.strides) &&
         t.scalar_type() == s.dtype && t.device() == s.device;
}

class StateWatch {
 public:
  // owned_dicts: [(owner, dict)], the dict being owner.__dict__; dicts: more dicts (a module's
  // containers); tensors: the tensors whose contents and metadata the plan depends on.
  StateWatch(const py::list& owned_dicts, const py::list& dicts, const py::list& tensors) {
    for (const auto& item : owned_dicts) {
      auto pair = item.cast<py::tuple>();
      add_dict(pair[0], pair[1].cast<py::dict>());
    }
    for (const auto& item : dicts) add_dict(py::none(), item.cast<py::dict>());
    for (const auto& item : tensors) {
      py::object object = py::reinterpret_borrow<py::object>(item);
      const at::Tensor t = unpack(object);
      TORCH_CHECK(t.defined(), "StateWatch: tensors must hold tensors only");
      TORCH_CHECK(!t.is_inference(), "StateWatch: an inference tensor has no version to watch");
      tensors_.push_back(TensorSnapshot{object, Py_TYPE(object.ptr()), t._version(),
                                        storage_of(t), data_of(t), t.sizes().vec(),
                                        t.strides().vec(), t.scalar_type(), t.device()});
    }
  }

  bool unchanged() const {
    for (const auto& s : dicts_) {
      if (!same_entries(s)) return false;
    }
    for (const auto& s : tensors_) {
      if (!same_tensor(s)) return false;
    }
    return true;
  }

 private:
  void add_dict(py::object owner, py::dict dict) {
    PyTypeObject* owner_type = Py_TYPE(owner.ptr());
    DictSnapshot s{std::move(owner), owner_type, dict, {}, {}};
    for (const auto& [key, value] : dict) {
      s.keys.push_back(py::reinterpret_borrow<py::object>(key));
      s.values.push_back(py::reinterpret_borrow<py::object>(value));
    }
    dicts_.push_back(std::move(s));
  }

  std::vector<DictSnapshot> dicts_;
  std::vector<TensorSnapshot> tensors_;
};

}  // namespace

void register_state_watch(pybind11::module& m) {
  py::class_<StateWatch>(m, "StateWatch",
                         "Identity snapshot of dicts and tensors (csrc/state_watch.h).")
      .def(py::init<const py::list&, const py::list&, const py::list&>(),
           py::arg("owned_dicts"), py::arg("dicts"), py::arg("tensors"))
      .def("unchanged", &StateWatch::unchanged,
           "Whether every watched dict holds the same entries (by identity, in order) and every "
           "watched tensor the same type, version, storage, shape, strides, dtype and device.");
}

}  // namespace fusedres
