// `import wsss_fast._C` loads this library; its TORCH_LIBRARY blocks register the ops as
// torch.ops.wsss_fast_C.* (no pybind: the ops are reached through the dispatcher).
#include <Python.h>

static struct PyModuleDef wsss_fast_C_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&wsss_fast_C_module); }
