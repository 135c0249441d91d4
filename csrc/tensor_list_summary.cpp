// One C++ pass over the tensors handed to the Python API, for its argument
// checks (sap_kernels/_inputs.py). In Python the same facts cost 0.4 us per
// tensor (each `t.device` builds a torch.device object, each attribute read
// goes through the interpreter): 9 ms for 20,000 tensors, more than the
// kernel spends on 20M weights. Here it is a pointer test and three field
// reads per tensor.
#include <torch/csrc/autograd/python_variable.h>
#include <torch/extension.h>

#include <algorithm>
#include <vector>

namespace sap_kernels {
namespace {

namespace py = pybind11;

template <class T>
void add_distinct(std::vector<T>& seen, const T& value) {
  // a model has one or two devices, dtypes and types: a linear search wins
  if (std::find(seen.begin(), seen.end(), value) == seen.end()) seen.push_back(value);
}

// (index of the first item that is not a torch.Tensor (nor None, with
// none_ok) or -1, the distinct Python types, whether any tensor requires grad,
// the distinct devices, the distinct dtypes, whether every tensor is
// contiguous). The facts stop at that item: the caller raises there.
py::tuple summarize_tensors(const py::sequence& items, bool none_ok) {
  py::object fast =
      py::reinterpret_steal<py::object>(PySequence_Fast(items.ptr(), "expected a sequence"));
  if (!fast) throw py::error_already_set();
  const Py_ssize_t size = PySequence_Fast_GET_SIZE(fast.ptr());
  PyObject** objects = PySequence_Fast_ITEMS(fast.ptr());
  std::vector<PyTypeObject*> types;
  std::vector<at::Device> devices;
  std::vector<at::ScalarType> dtypes;
  bool requires_grad = false, contiguous = true;
  Py_ssize_t first_bad = -1;
  for (Py_ssize_t i = 0; i < size; ++i) {
    PyObject* object = objects[i];
    if (none_ok && object == Py_None) {
      add_distinct(types, Py_TYPE(object));
      continue;
    }
    if (!THPVariable_Check(object)) {
      first_bad = i;
      break;
    }
    add_distinct(types, Py_TYPE(object));
    const at::Tensor& tensor = THPVariable_Unpack(object);
    requires_grad = requires_grad || tensor.requires_grad();
    contiguous = contiguous && tensor.is_contiguous();
    add_distinct(devices, tensor.device());
    add_distinct(dtypes, tensor.scalar_type());
  }
  py::list type_list, device_list, dtype_list;
  for (PyTypeObject* type : types) type_list.append(py::handle(reinterpret_cast<PyObject*>(type)));
  for (const at::Device& device : devices) device_list.append(py::cast(device));
  for (at::ScalarType dtype : dtypes) dtype_list.append(py::cast(dtype));
  return py::make_tuple(first_bad, type_list, requires_grad, device_list, dtype_list, contiguous);
}

}  // namespace

void define_tensor_list_summary(py::module_& module) {
  module.def("summarize_tensors", &summarize_tensors, py::arg("tensors"),
             py::arg("none_ok") = false,
             "(first non-tensor index or -1, distinct types, any requires_grad, distinct "
             "devices, distinct dtypes, all contiguous) of a sequence of tensors (and Nones "
             "if none_ok), in one C++ pass");
}

}  // namespace sap_kernels
