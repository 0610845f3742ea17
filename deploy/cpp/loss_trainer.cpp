// loss_trainer: the C++ side of loss-service, as a C++ trainer would use it.
//
// Loads an exported TorchScript loss (<loss>.pt, written by `python -m loss_service.export` or by
// torch.jit.save(torch.jit.script(losses.build(name, ...)))), loads inputs written by
// deploy/cpp/write_inputs.py, sets hyperparameters from C++ (module.setattr), runs forward and
// backward, and prints one JSON line per run:
//
//   {"loss": ..., "loss_shape": [...], "loss_dtype": "...", "grad_sum": ..., "grad_abs_sum": ...,
//    "grad_weighted_sum": ..., "grad_shape": [...], "set": {...}}
//
// "loss" is the value of a scalar reduction, or the sum of the unreduced values for
// reduction="none"; the gradient is d(sum of the output)/d(predictions).
//
// Usage:
//   loss_trainer <loss.pt> <inputs.pt> [--set name=value ...] [--reduction R]
//   loss_trainer --jobs <file>   (one run per line, its arguments separated by tabs)
#include <torch/csrc/jit/runtime/jit_exception.h>
#include <torch/script.h>

#include <cmath>
#include <cstdint>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <limits>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace {

const char* const kUsage =
    "usage: loss_trainer <loss.pt> <inputs.pt> [--set name=value ...] [--reduction R]\n"
    "       loss_trainer --jobs <file>\n"
    "\n"
    "  <loss.pt>     a TorchScript loss saved by `python -m loss_service.export` (artifacts/<loss>.pt)\n"
    "  <inputs.pt>   inputs written by deploy/cpp/write_inputs.py: tensors 'predictions',\n"
    "                'targets', optional 'weights', and any named tensors for --set\n"
    "  --set name=value   set a hyperparameter of the loss; the value is parsed by the\n"
    "                attribute's current type: float, int, bool (true/false/1/0), string;\n"
    "                for a tensor attribute (class_weight, ...) the value names a tensor in\n"
    "                <inputs.pt>, and an empty value unsets it (empty tensor)\n"
    "  --reduction R      shorthand for --set reduction=R\n"
    "  --jobs <file>      run many (loss, inputs, settings) in one process: one run per\n"
    "                line, its arguments separated by tab characters; one JSON line per run,\n"
    "                {\"error\": ...} for a failed run, exit status 1 if any run failed\n";

// Wrong command line: exit status 2 (a failed run is 1).
struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct Setting {
  std::string name;
  std::string value;
};

struct Job {
  std::string loss_path;
  std::string inputs_path;
  std::vector<Setting> settings;
};

Job parse_job(const std::vector<std::string>& args) {
  Job job;
  std::vector<std::string> positional;
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& arg = args[i];
    if (arg == "--set" || arg == "--reduction") {
      if (i + 1 >= args.size()) {
        throw UsageError(arg + " needs a value");
      }
      const std::string& value = args[++i];
      if (arg == "--reduction") {
        job.settings.push_back({"reduction", value});
        continue;
      }
      const size_t eq = value.find('=');
      if (eq == std::string::npos || eq == 0) {
        throw UsageError("--set expects name=value, got '" + value + "'");
      }
      job.settings.push_back({value.substr(0, eq), value.substr(eq + 1)});
    } else if (arg.rfind("--", 0) == 0) {
      throw UsageError("unknown option '" + arg + "'");
    } else {
      positional.push_back(arg);
    }
  }
  if (positional.size() != 2) {
    throw UsageError("expected <loss.pt> and <inputs.pt>, got " + std::to_string(positional.size()) +
                     " positional argument(s)");
  }
  job.loss_path = positional[0];
  job.inputs_path = positional[1];
  return job;
}

// ---------------------------------------------------------------------------------------------
// JSON output

std::string json_string(const std::string& text) {
  std::ostringstream out;
  out << '"';
  for (const unsigned char c : text) {
    switch (c) {
      case '"': out << "\\\""; break;
      case '\\': out << "\\\\"; break;
      case '\n': out << "\\n"; break;
      case '\r': out << "\\r"; break;
      case '\t': out << "\\t"; break;
      default:
        if (c < 0x20) {
          out << "\\u" << std::hex << std::setw(4) << std::setfill('0') << static_cast<int>(c) << std::dec;
        } else {
          out << c;
        }
    }
  }
  out << '"';
  return out.str();
}

// 17 significant digits round-trip a double exactly. Non-finite values use the NaN/Infinity
// literals that Python's json module reads (strict JSON has none).
std::string json_number(double value) {
  if (std::isnan(value)) return "NaN";
  if (std::isinf(value)) return value > 0 ? "Infinity" : "-Infinity";
  std::ostringstream out;
  out << std::setprecision(std::numeric_limits<double>::max_digits10) << value;
  std::string text = out.str();
  // Keep a float looking like one ("3.0", not "3"), as Python's json.dumps writes it.
  if (text.find_first_of(".e") == std::string::npos) text += ".0";
  return text;
}

std::string json_shape(c10::IntArrayRef sizes) {
  std::ostringstream out;
  out << '[';
  for (size_t i = 0; i < sizes.size(); ++i) {
    out << (i ? ", " : "") << sizes[i];
  }
  out << ']';
  return out.str();
}

// The dtype as Python spells it (torch.float64 -> "float64").
std::string dtype_name(c10::ScalarType type) {
  switch (type) {
    case torch::kFloat64: return "float64";
    case torch::kFloat32: return "float32";
    case torch::kFloat16: return "float16";
    case torch::kBFloat16: return "bfloat16";
    default: return c10::toString(type);
  }
}

// ---------------------------------------------------------------------------------------------
// Hyperparameters

// The attributes --set can change: typed scalars, strings and tensors (buffers), not submodules
// and not the nn.Module "training" flag.
// The declared type of an attribute (not its value's: an Optional[int] set to None is still an int
// setting); `optional` says whether it may also be None.
c10::TypePtr declared_type(const torch::jit::Module& module, const std::string& name, bool* optional) {
  const c10::TypePtr type = module.type()->getAttribute(name);
  const auto inner = type->cast<c10::OptionalType>();
  *optional = inner != nullptr;
  return inner ? inner->getElementType() : type;
}

bool settable(const std::string& name, const c10::TypePtr& type) {
  const c10::TypeKind kind = type->kind();
  return name != "training" &&
         (kind == c10::TypeKind::FloatType || kind == c10::TypeKind::IntType || kind == c10::TypeKind::BoolType ||
          kind == c10::TypeKind::StringType || kind == c10::TypeKind::TensorType);
}

std::string settable_names(const torch::jit::Module& module) {
  std::string names;
  for (const auto& attribute : module.named_attributes(/*recurse=*/false)) {
    bool optional = false;
    if (settable(attribute.name, declared_type(module, attribute.name, &optional))) {
      names += (names.empty() ? "" : ", ") + attribute.name + " (" +
               module.type()->getAttribute(attribute.name)->str() + ")";
    }
  }
  return names.empty() ? "(none)" : names;
}

double parse_double(const std::string& name, const std::string& text) {
  size_t used = 0;
  double value = 0.0;
  try {
    value = std::stod(text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (text.empty() || used != text.size() || !std::isfinite(value)) {
    throw std::runtime_error("--set " + name + ": expected a finite float, got '" + text + "'");
  }
  return value;
}

int64_t parse_int(const std::string& name, const std::string& text) {
  size_t used = 0;
  long long value = 0;
  try {
    value = std::stoll(text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (text.empty() || used != text.size()) {
    throw std::runtime_error("--set " + name + ": expected an integer, got '" + text + "'");
  }
  return value;
}

bool parse_bool(const std::string& name, const std::string& text) {
  if (text == "true" || text == "1") return true;
  if (text == "false" || text == "0") return false;
  throw std::runtime_error("--set " + name + ": expected true, false, 1 or 0, got '" + text + "'");
}

// Sets one hyperparameter, parsing the text by the attribute's current type, and returns the
// JSON form of what was set. The scripted loss reads its attributes at call time, so the new
// value applies to the next forward.
std::string apply_setting(torch::jit::Module& loss, const torch::jit::Module& inputs, const Setting& setting) {
  const std::string& name = setting.name;
  if (!loss.hasattr(name)) {
    throw std::runtime_error("--set " + name + ": the loss has no such attribute; settable attributes: " +
                             settable_names(loss));
  }
  bool optional = false;
  const c10::TypePtr type = declared_type(loss, name, &optional);
  if (!settable(name, type)) {
    throw std::runtime_error("--set " + name + ": attribute of type " + loss.type()->getAttribute(name)->str() +
                             " cannot be set; settable attributes: " + settable_names(loss));
  }
  const c10::TypeKind kind = type->kind();
  if (optional && setting.value.empty() && kind != c10::TypeKind::TensorType) {
    loss.setattr(name, c10::IValue());  // e.g. ignore_index=None: nothing ignored
    return "null";
  }
  if (kind == c10::TypeKind::FloatType) {
    const double value = parse_double(name, setting.value);
    loss.setattr(name, value);
    return json_number(value);
  }
  if (kind == c10::TypeKind::IntType) {
    const int64_t value = parse_int(name, setting.value);
    loss.setattr(name, value);
    return std::to_string(value);
  }
  if (kind == c10::TypeKind::BoolType) {
    const bool value = parse_bool(name, setting.value);
    loss.setattr(name, value);
    return value ? "true" : "false";
  }
  if (kind == c10::TypeKind::StringType) {
    loss.setattr(name, setting.value);
    return json_string(setting.value);
  }
  // A tensor: an empty value unsets it (the losses read an empty buffer as "not set").
  if (setting.value.empty()) {
    loss.setattr(name, torch::empty({0}, loss.attr(name).toTensor().options()));
    return "null";
  }
  if (!inputs.hasattr(setting.value) || !inputs.attr(setting.value).isTensor()) {
    throw std::runtime_error("--set " + name + "=" + setting.value + ": the inputs file has no tensor named '" +
                             setting.value + "' (write it with write_inputs(..., tensors={'" +
                             setting.value + "': ...}))");
  }
  const torch::Tensor value = inputs.attr(setting.value).toTensor();
  loss.setattr(name, value);
  return "{\"tensor\": " + json_string(setting.value) + ", \"shape\": " + json_shape(value.sizes()) + "}";
}

// ---------------------------------------------------------------------------------------------
// One run

torch::Tensor input_tensor(const torch::jit::Module& inputs, const std::string& name, const std::string& path) {
  if (!inputs.hasattr(name) || !inputs.attr(name).isTensor()) {
    throw std::runtime_error(path + ": no tensor named '" + name + "' (write the file with deploy/cpp/write_inputs.py)");
  }
  return inputs.attr(name).toTensor();
}

torch::jit::Module load(const std::string& path, const char* what) {
  try {
    return torch::jit::load(path);
  } catch (const c10::Error& error) {
    throw std::runtime_error(std::string("cannot load the ") + what + " '" + path + "': " + error.what_without_backtrace());
  }
}

std::string run(const Job& job) {
  torch::jit::Module inputs = load(job.inputs_path, "inputs file");
  torch::jit::Module loss = load(job.loss_path, "TorchScript loss");
  loss.eval();

  std::string set_json;
  for (const Setting& setting : job.settings) {
    const std::string value = apply_setting(loss, inputs, setting);
    set_json += (set_json.empty() ? "" : ", ") + json_string(setting.name) + ": " + value;
  }

  // A fresh leaf, so the gradient is the loss's alone.
  torch::Tensor predictions = input_tensor(inputs, "predictions", job.inputs_path).detach().clone().requires_grad_(true);
  torch::Tensor targets = input_tensor(inputs, "targets", job.inputs_path);
  c10::IValue weights;  // None
  if (inputs.hasattr("weights")) {
    weights = input_tensor(inputs, "weights", job.inputs_path);
  }

  torch::Tensor output = loss.forward({predictions, targets, weights}).toTensor();
  // reduction="none" returns the unreduced values: back-propagate their sum.
  torch::Tensor total = output.sum();
  if (total.requires_grad()) {
    total.backward();
  }
  torch::Tensor grad = predictions.grad();
  if (!grad.defined()) {
    grad = torch::zeros_like(predictions);
  }
  // Checksums in float64 so a float32 gradient is not summed with float32 rounding. The sum of a
  // softmax loss's gradient is ~0 and the absolute sum ignores where each value is, so a third,
  // position-weighted sum (weights 1..7 repeating over the row-major elements) pins the layout.
  const torch::Tensor grad64 = grad.to(torch::kFloat64).contiguous().reshape({-1});
  const torch::Tensor position_weights =
      torch::remainder(torch::arange(grad64.numel(), grad64.options()), 7.0) + 1.0;

  std::ostringstream line;
  line << "{\"loss\": " << json_number(total.to(torch::kFloat64).item<double>())
       << ", \"loss_shape\": " << json_shape(output.sizes())
       << ", \"loss_dtype\": " << json_string(dtype_name(output.scalar_type()))
       << ", \"grad_sum\": " << json_number(grad64.sum().item<double>())
       << ", \"grad_abs_sum\": " << json_number(grad64.abs().sum().item<double>())
       << ", \"grad_weighted_sum\": " << json_number((grad64 * position_weights).sum().item<double>())
       << ", \"grad_shape\": " << json_shape(grad.sizes())
       << ", \"set\": {" << set_json << "}}";
  return line.str();
}

// Without the backtraces: a c10::Error carries a C++ one, and an exception raised by the scripted
// loss (its ValueError for a bad input or hyperparameter) a TorchScript traceback that ends with
// the line "builtins.ValueError: <message>".
std::string error_message(const std::exception& error) {
  if (const auto* torch_error = dynamic_cast<const c10::Error*>(&error)) {
    return torch_error->what_without_backtrace();
  }
  std::string message = error.what();
  if (dynamic_cast<const torch::jit::JITException*>(&error) != nullptr) {
    while (!message.empty() && (message.back() == '\n' || message.back() == ' ')) message.pop_back();
    const size_t last_line = message.rfind('\n');
    if (last_line != std::string::npos) message = message.substr(last_line + 1);
  }
  return message;
}

std::vector<std::string> split_tabs(const std::string& line) {
  std::vector<std::string> fields;
  size_t start = 0;
  while (true) {
    const size_t tab = line.find('\t', start);
    fields.push_back(line.substr(start, tab == std::string::npos ? std::string::npos : tab - start));
    if (tab == std::string::npos) break;
    start = tab + 1;
  }
  return fields;
}

int run_jobs(const std::string& path) {
  std::ifstream file(path);
  if (!file) {
    throw UsageError("cannot open jobs file '" + path + "'");
  }
  int status = 0;
  std::string line;
  size_t line_number = 0;
  while (std::getline(file, line)) {
    ++line_number;
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.empty() || line[0] == '#') continue;
    try {
      std::cout << run(parse_job(split_tabs(line))) << std::endl;
    } catch (const std::exception& error) {
      std::cout << "{\"error\": " << json_string(path + ":" + std::to_string(line_number) + ": " + error_message(error))
                << "}" << std::endl;
      status = 1;
    }
  }
  return status;
}

}  // namespace

int main(int argc, char** argv) {
  const std::vector<std::string> args(argv + 1, argv + argc);
  try {
    if (args.empty() || args[0] == "-h" || args[0] == "--help") {
      std::cout << kUsage;
      return args.empty() ? 2 : 0;
    }
    if (args[0] == "--jobs") {
      if (args.size() != 2) {
        throw UsageError("--jobs takes exactly one file and no other arguments");
      }
      return run_jobs(args[1]);
    }
    std::cout << run(parse_job(args)) << std::endl;
    return 0;
  } catch (const UsageError& error) {
    std::cerr << "loss_trainer: " << error.what() << "\n\n" << kUsage;
    return 2;
  } catch (const std::exception& error) {
    std::cerr << "loss_trainer: error: " << error_message(error) << std::endl;
    return 1;
  }
}
