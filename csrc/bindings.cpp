// Python bindings: phi3edge._sampling. Every input is checked here (types, dtypes, shapes) or in
// the kernel (ranges) and fails with ValueError (std::invalid_argument) or TypeError; nothing
// aborts. The kernel runs with the GIL released.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <limits>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "sampler.hpp"

namespace py = pybind11;

namespace {

using phi3edge::BiasEntry;
using phi3edge::RowState;
using phi3edge::SamplingParams;

// operator.index(value) as int64; ValueError naming `what` when it does not fit.
std::int64_t to_int64(const py::handle& value, const std::string& what) {
    const auto index = py::reinterpret_steal<py::object>(PyNumber_Index(value.ptr()));
    if (!index) {
        throw py::error_already_set();
    }
    int overflow = 0;
    const long long result = PyLong_AsLongLongAndOverflow(index.ptr(), &overflow);
    if (overflow != 0) {
        throw std::invalid_argument(what + " must fit in a signed 64-bit integer, got " +
                                    py::repr(value).cast<std::string>());
    }
    return result;
}

std::uint64_t seed_from(const py::object& seed) {
    if (seed.is_none()) {
        std::random_device device;
        return (static_cast<std::uint64_t>(device()) << 32U) ^ device();
    }
    return static_cast<std::uint64_t>(to_int64(seed, "seed"));
}

std::vector<BiasEntry> bias_from(const py::object& logit_bias) {
    std::vector<BiasEntry> entries;
    if (logit_bias.is_none()) {
        return entries;
    }
    if (!py::isinstance<py::dict>(logit_bias)) {
        throw py::type_error("logit_bias must be a dict[int, float] or None");
    }
    for (const auto item : logit_bias.cast<py::dict>()) {
        const double value = PyFloat_AsDouble(item.second.ptr());
        if (value == -1.0 && PyErr_Occurred() != nullptr) {
            throw py::error_already_set();
        }
        entries.push_back(BiasEntry{to_int64(item.first, "logit_bias id"), value});
    }
    return entries;
}

py::dict bias_to_dict(const SamplingParams& params) {
    py::dict result;
    for (const BiasEntry& entry : params.logit_bias()) {
        result[py::int_(entry.id)] = py::float_(entry.value);
    }
    return result;
}

py::str params_repr(const SamplingParams& p) {
    return py::str(
               "SamplingParams(temperature={!r}, top_p={!r}, top_k={!r}, presence_penalty={!r}, "
               "frequency_penalty={!r}, logit_bias={!r}, top_logprobs={!r}, logprobs={!r})")
        .format(p.temperature(), p.top_p(), p.top_k(), p.presence_penalty(), p.frequency_penalty(),
                bias_to_dict(p), p.top_logprobs(), p.logprobs());
}

std::string type_name(const py::handle& object) {
    return py::str(py::type::of(object).attr("__name__")).cast<std::string>();
}

std::string shape_of(const py::array& array) {
    return py::repr(py::tuple(array.attr("shape"))).cast<std::string>();
}

// Checks dtype float32 and shape [B, V] or [B, 1, V]; returns a C-contiguous float32 array
// (the input itself when it already is one: no copy).
auto logits_from(const py::object& object) {
    if (!py::isinstance<py::array>(object)) {
        throw py::type_error("logits must be a numpy float32 array, got " + type_name(object));
    }
    const auto logits = py::reinterpret_borrow<py::array>(object);
    if (!py::isinstance<py::array_t<float>>(logits)) {
        throw std::invalid_argument("logits must be a float32 array, got dtype " +
                                    py::str(logits.dtype()).cast<std::string>());
    }
    const bool shape_ok = (logits.ndim() == 2 || (logits.ndim() == 3 && logits.shape(1) == 1)) &&
                          logits.shape(0) >= 1 && logits.shape(logits.ndim() - 1) >= 1;
    if (!shape_ok) {
        throw std::invalid_argument(
            "logits must have shape [B, V] or [B, 1, V] with B, V >= 1, "
            "got shape " +
            shape_of(logits));
    }
    return py::array_t<float, py::array::c_style | py::array::forcecast>::ensure(logits);
}

template <typename T>
std::vector<T*> items_of(const py::sequence& items, const char* name, const char* expected,
                         std::vector<py::object>& keep_alive) {
    std::vector<T*> result;
    for (std::size_t i = 0; i < items.size(); ++i) {
        py::object item = items[i];
        if (!py::isinstance<T>(item)) {
            throw py::type_error(std::string(name) + "[" + std::to_string(i) + "] must be a " +
                                 expected + ", got " + type_name(item));
        }
        result.push_back(&item.cast<T&>());
        keep_alive.push_back(std::move(item));
    }
    return result;
}

struct StepOutput {
    py::array_t<std::int32_t> tokens;
    py::array_t<float> logprobs;
    py::array_t<std::int32_t> top_ids;
    py::array_t<float> top_logprobs;
};

// The engine turns every reported row into these tuples; built here, a step with top_logprobs 20
// skips two list conversions and a Python loop over the slots.
py::tuple alternatives(const StepOutput& step, py::ssize_t row) {
    const py::ssize_t rows = step.top_ids.shape(0);
    if (row < 0 || row >= rows) {
        throw py::index_error("row " + std::to_string(row) + " is out of range for " +
                              std::to_string(rows) + " rows");
    }
    const py::ssize_t slots = step.top_ids.shape(1);
    const std::int32_t* ids = step.top_ids.data() + row * slots;
    const float* logprobs = step.top_logprobs.data() + row * slots;
    py::ssize_t used = 0;
    while (used < slots && ids[used] >= 0) {  // a row's used slots come first
        ++used;
    }
    py::tuple out(used);
    for (py::ssize_t i = 0; i < used; ++i) {
        out[i] = py::make_tuple(ids[i], static_cast<double>(logprobs[i]));
    }
    return out;
}

// Checks dtype int32 or uint32 and shape [rows, ceil(vocab / 32)]; returns a C-contiguous view
// of the words as uint32 (no copy when the input already is one).
py::array allowed_from(const py::object& object, py::ssize_t rows, py::ssize_t vocab) {
    if (!py::isinstance<py::array>(object)) {
        throw py::type_error("allowed must be a numpy int32 or uint32 array or None, got " +
                             type_name(object));
    }
    const auto allowed = py::reinterpret_borrow<py::array>(object);
    const bool is_int32 = py::isinstance<py::array_t<std::int32_t>>(allowed);
    if (!is_int32 && !py::isinstance<py::array_t<std::uint32_t>>(allowed)) {
        throw std::invalid_argument("allowed must be an int32 or uint32 array, got dtype " +
                                    py::str(allowed.dtype()).cast<std::string>());
    }
    const py::ssize_t words = (vocab + 31) / 32;
    if (allowed.ndim() != 2 || allowed.shape(0) != rows || allowed.shape(1) != words) {
        throw std::invalid_argument("allowed must have shape (" + std::to_string(rows) + ", " +
                                    std::to_string(words) + ") for logits of " +
                                    std::to_string(rows) + " rows and vocab size " +
                                    std::to_string(vocab) + ", got shape " + shape_of(allowed));
    }
    if (is_int32) {
        return py::array_t<std::int32_t, py::array::c_style | py::array::forcecast>::ensure(
            allowed);
    }
    return py::array_t<std::uint32_t, py::array::c_style | py::array::forcecast>::ensure(allowed);
}

StepOutput sample(const py::object& logits_in, const py::sequence& params_in,
                  const py::sequence& states_in, const py::object& allowed_in) {
    const auto logits = logits_from(logits_in);
    const py::ssize_t rows = logits.shape(0);
    const py::ssize_t vocab = logits.shape(logits.ndim() - 1);
    py::array allowed;  // kept alive until the kernel returns
    if (!allowed_in.is_none()) {
        allowed = allowed_from(allowed_in, rows, vocab);
    }
    std::vector<py::object> keep_alive;  // the caller's lists may change while the GIL is free
    const auto params = items_of<SamplingParams>(params_in, "params", "SamplingParams", keep_alive);
    const auto states = items_of<RowState>(states_in, "states", "RowState", keep_alive);
    int top_slots = 0;
    for (const SamplingParams* p : params) {
        top_slots = std::max(top_slots, p->top_logprobs());
    }
    StepOutput out{py::array_t<std::int32_t>(rows), py::array_t<float>(rows),
                   py::array_t<std::int32_t>({rows, static_cast<py::ssize_t>(top_slots)}),
                   py::array_t<float>({rows, static_cast<py::ssize_t>(top_slots)})};
    const phi3edge::BatchView view{logits.data(),
                                   rows,
                                   vocab,
                                   top_slots,
                                   out.tokens.mutable_data(),
                                   out.logprobs.mutable_data(),
                                   out.top_ids.mutable_data(),
                                   out.top_logprobs.mutable_data(),
                                   allowed_in.is_none()
                                       ? nullptr
                                       // int32 and uint32 words alias (signed/unsigned variants)
                                       : static_cast<const std::uint32_t*>(allowed.data()),
                                   allowed_in.is_none() ? 0 : allowed.shape(1)};
    const std::vector<const SamplingParams*> const_params(params.begin(), params.end());
    {
        py::gil_scoped_release release;
        phi3edge::sample_batch(view, const_params, states);
    }
    return out;
}

py::array_t<float> force_logits(const py::object& object, std::int64_t vocab_size) {
    if (!py::isinstance<py::array>(object)) {
        throw py::type_error("tokens must be a numpy int32 or int64 array, got " +
                             type_name(object));
    }
    const auto tokens_in = py::reinterpret_borrow<py::array>(object);
    if (!py::isinstance<py::array_t<std::int32_t>>(tokens_in) &&
        !py::isinstance<py::array_t<std::int64_t>>(tokens_in)) {
        throw std::invalid_argument("tokens must be an int32 or int64 array, got dtype " +
                                    py::str(tokens_in.dtype()).cast<std::string>());
    }
    if (tokens_in.ndim() != 1) {
        throw std::invalid_argument("tokens must have shape [B], got shape " + shape_of(tokens_in));
    }
    if (vocab_size < 1 || vocab_size > std::numeric_limits<std::int32_t>::max()) {
        throw std::invalid_argument("vocab_size must be in [1, 2**31 - 1], got " +
                                    std::to_string(vocab_size));
    }
    const auto tokens =
        py::array_t<std::int64_t, py::array::c_style | py::array::forcecast>::ensure(tokens_in);
    const std::vector<std::int64_t> ids(tokens.data(), tokens.data() + tokens.size());
    py::array_t<float> out(
        {static_cast<py::ssize_t>(ids.size()), static_cast<py::ssize_t>(vocab_size)});
    float* data = out.mutable_data();
    {
        py::gil_scoped_release release;
        phi3edge::fill_forced_logits(ids, vocab_size, data);
    }
    return out;
}

}  // namespace

PYBIND11_MODULE(_sampling, m) {
    m.doc() = "phi3edge's C++ sampling kernel (private; see phi3edge/_sampling.pyi).";
    m.attr("__version__") = PHI3EDGE_VERSION;

    py::class_<SamplingParams>(m, "SamplingParams", py::is_final())
        .def(py::init([](double temperature, double top_p, std::int64_t top_k,
                         double presence_penalty, double frequency_penalty,
                         const py::object& logit_bias, int top_logprobs, bool logprobs) {
                 return SamplingParams(temperature, top_p, top_k, presence_penalty,
                                       frequency_penalty, bias_from(logit_bias), top_logprobs,
                                       logprobs);
             }),
             py::kw_only(), py::arg("temperature") = 1.0, py::arg("top_p") = 1.0,
             py::arg("top_k") = 0, py::arg("presence_penalty") = 0.0,
             py::arg("frequency_penalty") = 0.0, py::arg("logit_bias") = py::none(),
             py::arg("top_logprobs") = 0, py::arg("logprobs") = true)
        .def_property_readonly("temperature", &SamplingParams::temperature)
        .def_property_readonly("top_p", &SamplingParams::top_p)
        .def_property_readonly("top_k", &SamplingParams::top_k)
        .def_property_readonly("presence_penalty", &SamplingParams::presence_penalty)
        .def_property_readonly("frequency_penalty", &SamplingParams::frequency_penalty)
        .def_property_readonly("logit_bias", &bias_to_dict)
        .def_property_readonly("top_logprobs", &SamplingParams::top_logprobs)
        .def_property_readonly("logprobs", &SamplingParams::logprobs)
        .def("__repr__", &params_repr);

    py::class_<RowState>(m, "RowState", py::is_final())
        .def(py::init([](std::int64_t vocab_size, const py::object& seed, std::int64_t row_index) {
                 return RowState(vocab_size, seed_from(seed), row_index);
             }),
             py::arg("vocab_size"), py::arg("seed") = py::none(), py::arg("row_index") = 0)
        .def("accept", &RowState::accept, py::arg("token"))
        .def("count", &RowState::count, py::arg("token"))
        .def("reset", &RowState::reset)
        .def_property_readonly("vocab_size", &RowState::vocab_size);

    py::class_<StepOutput>(m, "StepOutput", py::is_final())
        .def_readonly("tokens", &StepOutput::tokens)
        .def_readonly("logprobs", &StepOutput::logprobs)
        .def_readonly("top_ids", &StepOutput::top_ids)
        .def_readonly("top_logprobs", &StepOutput::top_logprobs)
        .def("alternatives", &alternatives, py::arg("row"),
             "Row row's reported alternatives as ((id, logprob), ...), unused slots left out.");

    m.def("sample", &sample, py::arg("logits"), py::arg("params"), py::arg("states"),
          py::arg("allowed") = py::none(),
          "One sampling step for every row of logits [B, V] (or [B, 1, V]), optionally "
          "constrained by an allowed-token bitmask [B, ceil(V / 32)].");
    m.def("force_logits", &force_logits, py::arg("tokens"), py::arg("vocab_size"),
          "Logits [B, vocab_size] that make a greedy step choose tokens[b] in row b.");
}
