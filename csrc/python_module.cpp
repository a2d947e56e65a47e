// The Python module bwrf_ext._C: importing it registers the ops; build_info() says what was built.
#include <torch/extension.h>

#ifndef BWRF_EXT_CUDA_ARCHS
#define BWRF_EXT_CUDA_ARCHS ""
#endif

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
  info["cpu_kernels"] = true;
#ifdef BWRF_EXT_WITH_CUDA
  info["cuda_kernels"] = true;
#else
  info["cuda_kernels"] = false;
#endif
  pybind11::list archs;
  std::string all = BWRF_EXT_CUDA_ARCHS;
  size_t start = 0;
  while (start < all.size()) {
    size_t end = all.find_first_of(" ;", start);
    if (end == std::string::npos) end = all.size();
    if (end > start) archs.append(all.substr(start, end - start));
    start = end + 1;
  }
  info["cuda_archs"] = archs;
  info["built_with_torch"] = TORCH_VERSION;
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("build_info", &build_info, "What this build of bwrf_ext._C contains.");
}
