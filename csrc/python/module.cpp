// qat._C: the Python view of what is not a tensor operator (the estimator registry,
// library facts). The operators themselves are reached through torch.ops.qat, which
// loading this module registers, since it links the qat library.

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/python.h>

#include <qat/qat.h>

#include <algorithm>
#include <vector>

#include "../ops/cpu/fake_quantize_loops.h"

namespace py = pybind11;

namespace {

// An estimator written in Python: a callable that takes the fake-quantize arguments and
// returns the output tensor, typically through a torch.autograd.Function.
class PythonEstimator final : public qat::Estimator {
 public:
  PythonEstimator(std::string name, py::function fn) : name_(std::move(name)), fn_(std::move(fn)) {}

  ~PythonEstimator() override {
    // The last reference may be dropped by a thread that does not hold the GIL.
    py::gil_scoped_acquire gil;
    fn_ = py::function();
  }

  at::Tensor apply(
      const at::Tensor& input, const at::Tensor& scale, const at::Tensor& zero_point,
      const qat::EstimatorArgs& args) const override {
    // An estimator that calls fake_quantize with its own name would recurse until
    // Python's limit, each level wrapping the error below it (megabytes of message).
    TORCH_CHECK(
        !running_here(), "qat: estimator '", name_, "' calls fake_quantize with estimator='", name_,
        "' itself, which would recurse without end; call another estimator inside it");
    const RunningGuard running(this);
    py::gil_scoped_acquire gil;
    py::object result;
    try {
      result =
          fn_(input, scale, zero_point, args.quant_min, args.quant_max,
              args.axis.has_value() ? py::object(py::int_(*args.axis)) : py::object(py::none()),
              args.grad_scale.has_value() ? py::object(py::float_(*args.grad_scale))
                                          : py::object(py::none()),
              args.ewgs_delta);
    } catch (py::error_already_set& e) {
      // The exception's type and message, not what() with its Python stack: the message
      // is read where the op was called, whose own traceback shows the stack.
      const std::string type = py::str(e.type().attr("__name__"));
      const std::string message = py::str(e.value());
      TORCH_CHECK(false, "qat: estimator '", name_, "' raised ", type, ": ", message);
    }
    TORCH_CHECK(
        THPVariable_Check(result.ptr()), "qat: estimator '", name_, "' must return a Tensor, got ",
        std::string(py::str(py::type::handle_of(result))));
    return result.cast<at::Tensor>();
  }

 private:
  // The Python estimators running on this thread (innermost last): another thread may run
  // the same estimator at the same time, and that is no recursion.
  static std::vector<const PythonEstimator*>& running() {
    thread_local std::vector<const PythonEstimator*> estimators;
    return estimators;
  }
  bool running_here() const {
    const auto& now = running();
    return std::find(now.begin(), now.end(), this) != now.end();
  }
  struct RunningGuard {
    explicit RunningGuard(const PythonEstimator* estimator) { running().push_back(estimator); }
    ~RunningGuard() { running().pop_back(); }
  };

  std::string name_;
  py::function fn_;
};

py::dict info_dict(const qat::EstimatorInfo& info) {
  py::dict d;
  d["name"] = info.name;
  d["description"] = info.description;
  d["learns_scale"] = info.learns_scale;
  d["learns_zero_point"] = info.learns_zero_point;
  return d;
}

qat::cpu::Capability parse_capability(const std::string& name) {
  if (name == "default") {
    return qat::cpu::Capability::kDefault;
  }
  if (name == "avx2") {
    return qat::cpu::Capability::kAvx2;
  }
  throw py::value_error("capability must be 'default' or 'avx2', got '" + name + "'");
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "qat's compiled core: estimator registry and library facts";
  m.attr("__version__") = qat::version();

  m.def(
      "estimator_names", [] { return qat::EstimatorRegistry::global().names(); },
      "Names of the registered estimators, sorted.");
  m.def(
      "estimator_info",
      [](const std::string& name) {
        return info_dict(qat::EstimatorRegistry::global().info(name));
      },
      py::arg("name"), "Name, description and learned parameters of an estimator.");
  m.def(
      "register_estimator",
      [](const std::string& name, py::function fn, const std::string& description,
         bool learns_scale, bool learns_zero_point, bool replace) {
        qat::EstimatorRegistry::global().add(
            qat::EstimatorInfo{name, description, learns_scale, learns_zero_point},
            std::make_shared<PythonEstimator>(name, std::move(fn)), replace);
      },
      py::arg("name"), py::arg("fn"), py::arg("description"), py::arg("learns_scale"),
      py::arg("learns_zero_point"), py::arg("replace"));
  m.def(
      "unregister_estimator",
      [](const std::string& name) { return qat::EstimatorRegistry::global().remove(name); },
      py::arg("name"));

  m.def(
      "_op_roles",
      [] {
        py::dict table;
        for (const auto& info : qat::op_roles()) {
          table[py::str(info.name)] =
              py::make_tuple(qat::role_name(info.role), info.integer_kernel, info.lo, info.hi);
        }
        return table;
      },
      "The op-role table (csrc/qat/op_roles.h): name -> (role, integer_kernel, lo, hi).");

  m.def("_cpu_capability", [] { return qat::cpu::capability_name(qat::cpu::capability()); });
  m.def("_best_cpu_capability", [] {
    return qat::cpu::capability_name(qat::cpu::best_supported_capability());
  });
  m.def(
      "_set_cpu_capability",
      [](const std::string& name) { qat::cpu::set_capability(parse_capability(name)); },
      py::arg("name"));
}
