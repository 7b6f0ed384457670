// The Python module lipkern._C: loading it registers the ops (ops.cpp, cpu/, cuda/).
#include <Python.h>

#ifdef LIPKERN_WITH_CUDA
static const int kWithCuda = 1;
#else
static const int kWithCuda = 0;
#endif

static struct PyModuleDef lipkern_module = {PyModuleDef_HEAD_INIT, "_C",
                                            "lipkern compiled kernels", -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* m = PyModule_Create(&lipkern_module);
  if (m != nullptr) PyModule_AddIntConstant(m, "with_cuda", kWithCuda);
  return m;
}
