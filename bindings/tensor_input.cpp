#include "tensor_input.hpp"

#include <cstdint>
#include <cstring>
#include <sstream>
#include <string>

#include "dlpack_abi.h"

namespace zetaguard::bindings {
namespace {

class DLPackOwner final : public InputOwner {
public:
    explicit DLPackOwner(ZgDLManagedTensor* t) : legacy_(t) {}
    explicit DLPackOwner(ZgDLManagedTensorVersioned* t) : versioned_(t) {}
    ~DLPackOwner() override {
        // The capsule was renamed "used_..." when we took it, so its own destructor will not
        // free the tensor: this is the one place the producer's deleter runs.
        if (legacy_ && legacy_->deleter) legacy_->deleter(legacy_);
        if (versioned_ && versioned_->deleter) versioned_->deleter(versioned_);
    }

private:
    ZgDLManagedTensor* legacy_ = nullptr;
    ZgDLManagedTensorVersioned* versioned_ = nullptr;
};

class BufferOwner final : public InputOwner {
public:
    BufferOwner() { std::memset(&view, 0, sizeof view); }
    ~BufferOwner() override {
        if (view.obj) PyBuffer_Release(&view);
    }
    Py_buffer view;
};

[[noreturn]] void fail(PyObject* kind, const std::string& message) {
    PyErr_SetString(kind, message.c_str());
    throw py::error_already_set();
}

std::string label(const char* what, std::size_t index) {
    return std::string(what) + " " + std::to_string(index);
}

const char* device_name(int32_t type) {
    switch (type) {
        case kZgDLCUDA: return "cuda";
        case kZgDLCUDAManaged: return "cuda (managed)";
        case kZgDLROCM: return "rocm";
        case kZgDLMetal: return "mps/metal";
        case kZgDLOneAPI: return "xpu";
        case kZgDLVulkan: return "vulkan";
        case kZgDLOpenCL: return "opencl";
        default: return "a non-CPU device";
    }
}

std::string dl_dtype_name(const ZgDLDataType& t) {
    std::ostringstream s;
    switch (t.code) {
        case kZgDLInt: s << "int" << int(t.bits); break;
        case kZgDLUInt: s << "uint" << int(t.bits); break;
        case kZgDLFloat: s << "float" << int(t.bits); break;
        case kZgDLBfloat: s << "bfloat" << int(t.bits); break;
        case kZgDLComplex: s << "complex" << int(t.bits); break;
        case kZgDLBool: s << "bool"; break;
        default: s << "opaque type code " << int(t.code); break;
    }
    if (t.lanes != 1) s << "x" << t.lanes;
    return s.str();
}

// More dimensions than NumPy or torch allow: a corrupt capsule, not a tensor.
constexpr int32_t kMaxDims = 64;
// No process addresses more than this; a larger claimed extent is a corrupt capsule.
constexpr std::size_t kMaxBytes = std::size_t{1} << 56;

TensorView view_of(const ZgDLTensor& t, const std::string& who) {
    if (t.device.device_type != kZgDLCPU && t.device.device_type != kZgDLCUDAHost &&
        t.device.device_type != kZgDLROCMHost) {
        fail(PyExc_ValueError,
             who + " lives on " + device_name(t.device.device_type) + ":" +
                 std::to_string(t.device.device_id) +
                 "; the host engine reads CPU memory only. Pass torch tensors through "
                 "ZetaGuard.monitor(), which reduces CUDA tensors on the device, or move the "
                 "tensor with .cpu()");
    }
    TensorView v;
    const ZgDLDataType& d = t.dtype;
    if (d.lanes == 1 && d.code == kZgDLFloat && d.bits == 32) {
        v.dtype = DType::f32;
    } else if (d.lanes == 1 && d.code == kZgDLFloat && d.bits == 64) {
        v.dtype = DType::f64;
    } else if (d.lanes == 1 && d.code == kZgDLFloat && d.bits == 16) {
        v.dtype = DType::f16;
    } else if (d.lanes == 1 && d.code == kZgDLBfloat && d.bits == 16) {
        v.dtype = DType::bf16;
    } else {
        fail(PyExc_TypeError, who + " has dtype " + dl_dtype_name(d) +
                                  "; zetaguard monitors float32, float64, float16 and bfloat16 "
                                  "tensors. Leave integer, bool and complex tensors out, or cast "
                                  "with .float() (torch) or .astype(np.float32) (NumPy)");
    }
    // A producer that lies about shape or data cannot be caught, but one whose fields are
    // impossible can: refuse those before any arithmetic on them can overflow.
    if (t.ndim < 0 || t.ndim > kMaxDims)
        fail(PyExc_ValueError, who + " reports ndim " + std::to_string(t.ndim) +
                                   "; expected 0.." + std::to_string(kMaxDims));
    if (t.ndim > 0 && t.shape == nullptr)
        fail(PyExc_ValueError, who + " has no shape array; the producer's capsule is malformed");
    std::size_t numel = 1;
    bool empty = false;
    for (int32_t i = 0; i < t.ndim; ++i) {
        if (t.shape[i] < 0) fail(PyExc_ValueError, who + " reports a negative dimension");
        if (t.shape[i] == 0) empty = true;
    }
    if (empty) {
        numel = 0;
    } else {
        for (int32_t i = 0; i < t.ndim; ++i) {
            const auto d = static_cast<std::size_t>(t.shape[i]);
            if (numel > kMaxBytes / d)
                fail(PyExc_ValueError, who + " reports a shape whose size overflows memory");
            numel *= d;
        }
    }
    if (t.strides != nullptr && numel > 1) {
        int64_t expected = 1;
        for (int32_t i = t.ndim - 1; i >= 0; --i) {
            if (t.shape[i] != 1 && t.strides[i] != expected) {
                fail(PyExc_ValueError,
                     who + " is not contiguous in memory (a transposed or sliced view); pass "
                           ".contiguous() for a torch tensor or np.ascontiguousarray(x)");
            }
            expected *= t.shape[i];
        }
    }
    if (numel > 0 && t.data == nullptr) fail(PyExc_ValueError, who + " has a null data pointer");
    const std::size_t nbytes = numel * dtype_size(v.dtype);
    if (numel > kMaxBytes / dtype_size(v.dtype))
        fail(PyExc_ValueError, who + " reports a shape whose size overflows memory");
    // Integer arithmetic: a wrapping pointer sum would be undefined behaviour.
    const auto base = reinterpret_cast<std::uintptr_t>(t.data);
    if (t.byte_offset > kMaxBytes || base > UINTPTR_MAX - t.byte_offset ||
        base + t.byte_offset > UINTPTR_MAX - nbytes)
        fail(PyExc_ValueError, who + " reports a byte_offset past the end of memory");
    v.data = numel > 0 ? reinterpret_cast<const void*>(base + t.byte_offset) : nullptr;
    v.numel = numel;
    if (numel > 0 && reinterpret_cast<std::uintptr_t>(v.data) % dtype_size(v.dtype) != 0) {
        fail(PyExc_ValueError, who + " is not aligned to its element size; pass a copy");
    }
    return v;
}

// `buffer_format`: set when the object's buffer had an element type we do not read; then an
// export failure means the type is the problem, and the error says so.
py::object capsule_of(const py::handle& obj, const std::string& who,
                      const std::string& buffer_format = {}) {
    if (PyCapsule_CheckExact(obj.ptr())) return py::reinterpret_borrow<py::object>(obj);
    try {
        try {
            return obj.attr("__dlpack__")(py::arg("max_version") = py::make_tuple(1, 0));
        } catch (py::error_already_set& e) {
            if (!e.matches(PyExc_TypeError)) throw;
            return obj.attr("__dlpack__")();  // a producer older than DLPack 1.0
        }
    } catch (py::error_already_set& e) {
        // KeyboardInterrupt, SystemExit, GeneratorExit: the user (or the interpreter) is
        // stopping the process; never turn that into a ValueError about the tensor.
        if (!e.matches(PyExc_Exception)) throw;
        std::string hint;
        const std::string msg = py::str(e.value());  // the message alone, no traceback
        if (msg.find("require") != std::string::npos && msg.find("grad") != std::string::npos)
            hint = "; pass p.detach() (ZetaGuard.monitor() does this for torch parameters)";
        if (!buffer_format.empty()) {
            fail(PyExc_TypeError, who + " has dtype with buffer format '" + buffer_format +
                                      "' (" + msg + "); zetaguard monitors float32, float64, "
                                      "float16 and bfloat16 arrays. Cast with x.astype(np.float32)");
        }
        fail(PyExc_ValueError, who + " could not be exported through DLPack: " + msg + hint);
    }
}

bool take_dlpack(const py::handle& obj, const std::string& who, ParsedInputs& out,
                 const std::string& buffer_format = {}) {
    py::object cap = capsule_of(obj, who, buffer_format);
    PyObject* c = cap.ptr();
    if (PyCapsule_IsValid(c, "dltensor_versioned")) {
        auto* t = static_cast<ZgDLManagedTensorVersioned*>(
            PyCapsule_GetPointer(c, "dltensor_versioned"));
        if (t->version.major > 1) {
            fail(PyExc_ValueError, who + " uses DLPack " + std::to_string(t->version.major) +
                                       ".x; this zetaguard reads DLPack 1.x");
        }
        PyCapsule_SetName(c, "used_dltensor_versioned");
        out.owners.push_back(std::make_unique<DLPackOwner>(t));
        out.views.push_back(view_of(t->dl_tensor, who));
        return true;
    }
    if (PyCapsule_IsValid(c, "dltensor")) {
        auto* t = static_cast<ZgDLManagedTensor*>(PyCapsule_GetPointer(c, "dltensor"));
        PyCapsule_SetName(c, "used_dltensor");
        out.owners.push_back(std::make_unique<DLPackOwner>(t));
        out.views.push_back(view_of(t->dl_tensor, who));
        return true;
    }
    if (!PyCapsule_CheckExact(c)) {
        fail(PyExc_TypeError, who + "'s __dlpack__() returned a " +
                                  std::string(Py_TYPE(c)->tp_name) +
                                  ", not a DLPack capsule; the producer is broken");
    }
    const char* name = PyCapsule_GetName(c);
    PyErr_Clear();
    fail(PyExc_ValueError, who + " gave a capsule named '" + std::string(name ? name : "") +
                               "'; a DLPack capsule can be consumed only once, so pass the "
                               "tensor itself rather than a used capsule");
}

// Format codes of the buffer protocol (struct module syntax) for the types we read.
bool buffer_dtype(const Py_buffer& b, DType& dt) {
    const char* f = b.format ? b.format : "B";
    if (*f == '<' || *f == '=' || *f == '@') ++f;
    if (std::strcmp(f, "f") == 0 && b.itemsize == 4) { dt = DType::f32; return true; }
    if (std::strcmp(f, "d") == 0 && b.itemsize == 8) { dt = DType::f64; return true; }
    if (std::strcmp(f, "e") == 0 && b.itemsize == 2) { dt = DType::f16; return true; }
    return false;
}

bool take_buffer(const py::handle& obj, const std::string& who, ParsedInputs& out,
                 bool dlpack_fallback, std::string& unread_format) {
    auto owner = std::make_unique<BufferOwner>();
    if (PyObject_GetBuffer(obj.ptr(), &owner->view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) != 0) {
        PyErr_Clear();
        if (dlpack_fallback) return false;
        fail(PyExc_ValueError,
             who + " is not a C-contiguous buffer; pass np.ascontiguousarray(x)");
    }
    DType dt;
    if (!buffer_dtype(owner->view, dt)) {
        const std::string fmt = owner->view.format ? owner->view.format : "B";
        if (dlpack_fallback) {  // e.g. bfloat16 arrays: DLPack knows the type
            unread_format = fmt;
            return false;
        }
        fail(PyExc_TypeError, who + " is a " + std::string(Py_TYPE(obj.ptr())->tp_name) +
                                  " with buffer format '" + fmt + "'; zetaguard monitors float32, float64, float16 and bfloat16 "
                                  "arrays. Cast with x.astype(np.float32)");
    }
    TensorView v;
    v.dtype = dt;
    v.data = owner->view.buf;
    v.numel = static_cast<std::size_t>(owner->view.len / owner->view.itemsize);
    // The kernels load whole elements; a misaligned one is undefined behaviour in C++.
    if (v.numel > 0 && reinterpret_cast<std::uintptr_t>(v.data) % dtype_size(dt) != 0) {
        fail(PyExc_ValueError, who + " is not aligned to its element size (a view at an odd "
                                     "byte offset); pass a copy, e.g. np.array(x)");
    }
    out.views.push_back(v);
    out.owners.push_back(std::move(owner));
    return true;
}

}  // namespace

DType dtype_from_name(const std::string& name) {
    for (DType t : {DType::f32, DType::f64, DType::f16, DType::bf16}) {
        if (name == dtype_name(t)) return t;
    }
    fail(PyExc_TypeError, "unknown dtype '" + name +
                              "'; expected one of float32, float64, float16, bfloat16");
}

ParsedInputs parse_inputs(const py::sequence& items, const char* what) {
    ParsedInputs out;
    const std::size_t n = py::len(items);
    out.views.reserve(n);
    out.owners.reserve(n);
    for (std::size_t i = 0; i < n; ++i) {
        py::handle obj = items[i];
        const std::string who = label(what, i);
        const bool has_dlpack = py::hasattr(obj, "__dlpack__");
        std::string unread_format;
        if (PyObject_CheckBuffer(obj.ptr()) && take_buffer(obj, who, out, has_dlpack, unread_format))
            continue;
        if (has_dlpack || PyCapsule_CheckExact(obj.ptr())) {
            take_dlpack(obj, who, out, unread_format);
            continue;
        }
        fail(PyExc_TypeError,
             who + " is a " + std::string(Py_TYPE(obj.ptr())->tp_name) +
                 ", which offers neither DLPack nor the buffer protocol; pass NumPy arrays or "
                 "DLPack-capable tensors (torch, JAX, CuPy on CPU), or use ZetaGuard.monitor(), "
                 "which also reads torch modules, Keras models and tf.Variables");
    }
    return out;
}

// The dtype of a raw entry: adapters pass the interned names ("float32", ...), so a pointer
// comparison settles the common case before any string is built.
DType raw_dtype(PyObject* name) {
    static PyObject* interned[4] = {
        PyUnicode_InternFromString(dtype_name(DType::f32)),
        PyUnicode_InternFromString(dtype_name(DType::f64)),
        PyUnicode_InternFromString(dtype_name(DType::f16)),
        PyUnicode_InternFromString(dtype_name(DType::bf16))};
    static const DType kinds[4] = {DType::f32, DType::f64, DType::f16, DType::bf16};
    for (int k = 0; k < 4; ++k)
        if (name == interned[k]) return kinds[k];
    return dtype_from_name(py::handle(name).cast<std::string>());
}

ParsedInputs parse_raw(const py::sequence& items) {
    ParsedInputs out;
    // One step of a large model passes hundreds of entries: read them with the C API.
    py::object fast = py::reinterpret_steal<py::object>(
        PySequence_Fast(items.ptr(), "raw input must be a sequence of (address, numel, dtype)"));
    if (!fast) throw py::error_already_set();
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(fast.ptr());
    PyObject** entries = PySequence_Fast_ITEMS(fast.ptr());
    out.views.reserve(static_cast<std::size_t>(n));
    for (Py_ssize_t i = 0; i < n; ++i) {
        PyObject* t = entries[i];
        if (!PyTuple_Check(t) || PyTuple_GET_SIZE(t) != 3)
            fail(PyExc_ValueError, "raw input must be (address, numel, dtype)");
        TensorView v;
        const unsigned long long address = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(t, 0));
        const unsigned long long numel = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(t, 1));
        if (PyErr_Occurred()) throw py::error_already_set();
        v.data = reinterpret_cast<const void*>(static_cast<std::uintptr_t>(address));
        v.numel = static_cast<std::size_t>(numel);
        v.dtype = raw_dtype(PyTuple_GET_ITEM(t, 2));
        out.views.push_back(v);
    }
    return out;
}

}  // namespace zetaguard::bindings
