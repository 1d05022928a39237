// qat._C: the Python view of what is not a tensor operator (the estimator registry,
// library facts). The operators themselves are reached through torch.ops.qat, which
// loading this module registers, since it links the qat library.

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/csrc/DynamicTypes.h>
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

// qat.QuantSpec's fields (dataclasses.asdict) <-> qat::QuantSpec, whose setters validate
// each as Python's do: a rule of the C++ front end applies to a Python spec through these.
py::dict spec_fields(const qat::QuantSpec& spec) {
  py::dict fields;
  fields["bits"] = spec.bits();
  fields["symmetric"] = spec.symmetric();
  fields["signed"] = spec.signed_range();
  fields["per_channel"] = spec.per_channel();
  fields["axis"] = spec.axis();
  fields["narrow_range"] = spec.narrow_range();
  fields["observer"] = spec.observer();
  fields["estimator"] = spec.estimator();
  fields["averaging_constant"] = spec.averaging_constant();
  fields["percentile"] = spec.percentile();
  fields["bins"] = spec.bins();
  return fields;
}

qat::QuantSpec spec_from_fields(const py::dict& fields) {
  // A field without a C++ counterpart would be lost on the way back.
  const auto known = spec_fields(qat::QuantSpec());
  for (const auto& item : fields) {
    if (!known.contains(item.first)) {
      throw py::value_error(
          "qat._C: QuantSpec field '" + item.first.cast<std::string>() +
          "' has no C++ counterpart");
    }
  }
  qat::QuantSpec spec;
  spec.bits(fields["bits"].cast<int64_t>())
      .symmetric(fields["symmetric"].cast<bool>())
      .signed_range(fields["signed"].cast<c10::optional<bool>>())
      .per_channel(fields["per_channel"].cast<bool>())
      .axis(fields["axis"].cast<int64_t>())
      .narrow_range(fields["narrow_range"].cast<bool>())
      .observer(fields["observer"].cast<std::string>())
      .estimator(fields["estimator"].cast<std::string>())
      .averaging_constant(fields["averaging_constant"].cast<double>())
      .percentile(fields["percentile"].cast<double>())
      .bins(fields["bins"].cast<int64_t>());
  return spec;
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
      "fixed_qparams_spec",
      [](const py::dict& activation) {
        return spec_fields(qat::fixed_qparams_spec(spec_from_fields(activation)));
      },
      py::arg("activation"),
      "qat::fixed_qparams_spec of an activation spec, given and returned as qat.QuantSpec's "
      "fields.");
  m.def(
      "takes_relu",
      [](const py::dict& activation) { return qat::takes_relu(spec_from_fields(activation)); },
      py::arg("activation"),
      "qat::takes_relu of an activation spec given as qat.QuantSpec's fields.");
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

  py::class_<qat::LoweredOp>(
      m, "LoweredOp",
      "One integer op in the lowered form both front ends' converts produce and every "
      "emitter reads (csrc/qat/lowered.h).")
      .def(
          py::init([](std::string name, std::string kind, double scale, int64_t zero_point,
                      bool relu, c10::optional<at::Tensor> weight, c10::optional<at::Tensor> bias,
                      int64_t weight_bits, int64_t weight_quant_min, std::vector<int64_t> stride,
                      std::vector<int64_t> padding, std::vector<int64_t> dilation, int64_t groups,
                      std::vector<int64_t> output_padding) {
            return qat::LoweredOp{
                std::move(name),
                std::move(kind),
                scale,
                zero_point,
                relu,
                weight.value_or(at::Tensor()),
                bias.value_or(at::Tensor()),
                weight_bits,
                weight_quant_min,
                std::move(stride),
                std::move(padding),
                std::move(dilation),
                groups,
                std::move(output_padding)};
          }),
          py::arg("name"), py::arg("kind"), py::arg("scale") = 1.0, py::arg("zero_point") = 0,
          py::arg("relu") = false, py::arg("weight") = py::none(), py::arg("bias") = py::none(),
          py::arg("weight_bits") = 8, py::arg("weight_quant_min") = -128,
          py::arg("stride") = std::vector<int64_t>{}, py::arg("padding") = std::vector<int64_t>{},
          py::arg("dilation") = std::vector<int64_t>{}, py::arg("groups") = 1,
          py::arg("output_padding") = std::vector<int64_t>{})
      .def_readonly("name", &qat::LoweredOp::name)
      .def_readonly("kind", &qat::LoweredOp::kind)
      .def_readonly("scale", &qat::LoweredOp::scale)
      .def_readonly("zero_point", &qat::LoweredOp::zero_point)
      .def_readonly("relu", &qat::LoweredOp::relu)
      .def_readonly("weight", &qat::LoweredOp::weight)
      .def_readonly("bias", &qat::LoweredOp::bias)
      .def_readonly("weight_bits", &qat::LoweredOp::weight_bits)
      .def_readonly("weight_quant_min", &qat::LoweredOp::weight_quant_min)
      .def_readonly("stride", &qat::LoweredOp::stride)
      .def_readonly("padding", &qat::LoweredOp::padding)
      .def_readonly("dilation", &qat::LoweredOp::dilation)
      .def_readonly("groups", &qat::LoweredOp::groups)
      .def_readonly("output_padding", &qat::LoweredOp::output_padding)
      .def("__repr__", [](const qat::LoweredOp& op) {
        return "LoweredOp(" + op.kind + " '" + op.name + "', scale=" + std::to_string(op.scale) +
               ", zero_point=" + std::to_string(op.zero_point) + ")";
      });
  m.def(
      "_metadata_json",
      [](const std::vector<qat::LoweredOp>& ops, const std::string& config_json,
         const std::string& engine, const std::string& torch_version,
         const std::vector<at::Tensor>& example_inputs) {
        // std::invalid_argument (an input dtype the metadata cannot name) is a ValueError.
        return qat::metadata_json(ops, config_json, engine, torch_version, example_inputs);
      },
      py::arg("ops"), py::arg("config_json"), py::arg("engine"), py::arg("torch_version"),
      py::arg("example_inputs"),
      "The metadata JSON of a .pt / .ptl file (qat::metadata_json, the writer of both front "
      "ends).");

  m.def(
      "_compact_archive", [](const std::string& path) { qat::detail::compact_archive(path); },
      py::arg("path"),
      "Deflates the records of a written TorchScript archive that are not tensor storages "
      "and drops its code's debug records (qat::detail::compact_archive, both front ends' "
      "exports).");

  m.def(
      "_activation_dtype",
      [](int64_t quant_min, int64_t quant_max) -> py::object {
        const auto dtype = qat::activation_dtype(quant_min, quant_max);
        if (!dtype.has_value()) {
          return py::none();
        }
        return py::reinterpret_borrow<py::object>(
            reinterpret_cast<PyObject*>(torch::getTHPDtype(*dtype)));
      },
      py::arg("quant_min"), py::arg("quant_max"),
      "The quantized dtype of activations in [quant_min, quant_max], or None "
      "(qat::activation_dtype, both front ends' convert).");

  m.def("_cpu_capability", [] { return qat::cpu::capability_name(qat::cpu::capability()); });
  m.def("_best_cpu_capability", [] {
    return qat::cpu::capability_name(qat::cpu::best_supported_capability());
  });
  m.def(
      "_set_cpu_capability",
      [](const std::string& name) { qat::cpu::set_capability(parse_capability(name)); },
      py::arg("name"));
}
