// The DLPack ABI (https://dmlc.github.io/dlpack/latest/c_api.html), declared here because the
// bindings only consume it: the structs below are the published, stable layout (v1.x keeps the
// unversioned DLManagedTensor for the "dltensor" capsule and adds DLManagedTensorVersioned for
// "dltensor_versioned").
#pragma once

#include <cstdint>

extern "C" {

enum ZgDLDeviceType : int32_t {
    kZgDLCPU = 1,
    kZgDLCUDA = 2,
    kZgDLCUDAHost = 3,
    kZgDLOpenCL = 4,
    kZgDLVulkan = 7,
    kZgDLMetal = 8,
    kZgDLVPI = 9,
    kZgDLROCM = 10,
    kZgDLROCMHost = 11,
    kZgDLExtDev = 12,
    kZgDLCUDAManaged = 13,
    kZgDLOneAPI = 14,
};

enum ZgDLDataTypeCode : uint8_t {
    kZgDLInt = 0,
    kZgDLUInt = 1,
    kZgDLFloat = 2,
    kZgDLOpaqueHandle = 3,
    kZgDLBfloat = 4,
    kZgDLComplex = 5,
    kZgDLBool = 6,
};

struct ZgDLDevice {
    int32_t device_type;
    int32_t device_id;
};

struct ZgDLDataType {
    uint8_t code;
    uint8_t bits;
    uint16_t lanes;
};

struct ZgDLTensor {
    void* data;
    ZgDLDevice device;
    int32_t ndim;
    ZgDLDataType dtype;
    int64_t* shape;
    int64_t* strides;
    uint64_t byte_offset;
};

struct ZgDLManagedTensor {
    ZgDLTensor dl_tensor;
    void* manager_ctx;
    void (*deleter)(ZgDLManagedTensor* self);
};

struct ZgDLPackVersion {
    uint32_t major;
    uint32_t minor;
};

struct ZgDLManagedTensorVersioned {
    ZgDLPackVersion version;
    void* manager_ctx;
    void (*deleter)(ZgDLManagedTensorVersioned* self);
    uint64_t flags;
    ZgDLTensor dl_tensor;
};

}  // extern "C"
