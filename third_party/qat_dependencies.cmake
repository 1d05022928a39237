# Finds qat's dependencies among the system's packages. Each missing one stops the
# configure step with the Debian package that provides it, so a fresh machine can be
# fixed with one apt-get line (scripts/setup_deps.sh installs them all).

macro(qat_require_package name debian_package)
  find_package(${name} ${ARGN} QUIET)
  if(NOT ${name}_FOUND)
    message(FATAL_ERROR
      "qat: ${name} was not found. Install it with `apt-get install ${debian_package}` "
      "(scripts/setup_deps.sh installs every dependency).")
  endif()
endmacro()

# The interpreter decides which torch we build against: Debian's /usr/bin/python3 sees
# libtorch 1.13; a venv or another machine may see a pip-installed torch 2.x.
if(NOT QAT_PYTHON_EXECUTABLE)
  if(EXISTS /usr/bin/python3)
    set(QAT_PYTHON_EXECUTABLE /usr/bin/python3)
  else()
    find_program(QAT_PYTHON_EXECUTABLE python3 REQUIRED)
  endif()
endif()
set(Python_EXECUTABLE "${QAT_PYTHON_EXECUTABLE}" CACHE FILEPATH "Python that sees torch" FORCE)

execute_process(
  COMMAND "${QAT_PYTHON_EXECUTABLE}" -c "import torch; print(torch.utils.cmake_prefix_path)"
  OUTPUT_VARIABLE _qat_torch_prefix OUTPUT_STRIP_TRAILING_WHITESPACE
  RESULT_VARIABLE _qat_torch_rc ERROR_QUIET)
if(_qat_torch_rc EQUAL 0 AND _qat_torch_prefix)
  list(APPEND CMAKE_PREFIX_PATH "${_qat_torch_prefix}")
endif()
# A pip-installed pybind11 (as next to a pip torch) keeps its CMake files in the package.
execute_process(
  COMMAND "${QAT_PYTHON_EXECUTABLE}" -c "import pybind11; print(pybind11.get_cmake_dir())"
  OUTPUT_VARIABLE _qat_pybind11_dir OUTPUT_STRIP_TRAILING_WHITESPACE
  RESULT_VARIABLE _qat_pybind11_rc ERROR_QUIET)
if(_qat_pybind11_rc EQUAL 0 AND _qat_pybind11_dir)
  list(APPEND CMAKE_PREFIX_PATH "${_qat_pybind11_dir}")
endif()

# A CUDA LibTorch picks the GPU architectures of the kernels from TORCH_CUDA_ARCH_LIST
# (it ignores CMAKE_CUDA_ARCHITECTURES); unset, it compiles for this machine's GPUs, or
# without one for about ten architectures. On a machine without a GPU (a build machine,
# CI) qat asks for sm_80 code plus its PTX, which newer GPUs compile when they load it.
if(NOT DEFINED TORCH_CUDA_ARCH_LIST AND NOT DEFINED ENV{TORCH_CUDA_ARCH_LIST})
  execute_process(COMMAND nvidia-smi -L RESULT_VARIABLE _qat_no_gpu OUTPUT_QUIET ERROR_QUIET)
  if(NOT _qat_no_gpu EQUAL 0)
    set(TORCH_CUDA_ARCH_LIST "8.0+PTX")
  endif()
endif()
# TorchConfig looks for c10 in the system's library folders before torch's own: with a pip
# torch on a machine that also has Debian's LibTorch, it would link Debian's libc10.
if(_qat_torch_prefix AND EXISTS "${_qat_torch_prefix}/../../lib")
  find_library(c10_LIBRARY c10 PATHS "${_qat_torch_prefix}/../../lib" NO_DEFAULT_PATH)
endif()
qat_require_package(Torch "libtorch-dev python3-torch")

# A pip torch built with CUDA keeps the CUDA libraries in nvidia/*/lib wheels beside it,
# which libtorch_cuda names without a path: `import torch` preloads them, but a C++ program
# must find them itself, and before a local CUDA toolkit's (whose older NCCL lacks symbols
# that libtorch_cuda uses). CMakeLists.txt puts these folders first in the run paths.
set(QAT_TORCH_CUDA_RUNTIME_DIRS "")
if(_qat_torch_prefix)
  get_filename_component(_qat_site_packages "${_qat_torch_prefix}/../../.." ABSOLUTE)
  file(GLOB QAT_TORCH_CUDA_RUNTIME_DIRS LIST_DIRECTORIES true "${_qat_site_packages}/nvidia/*/lib")
endif()
# fmt, header-only, as the interface target qat_fmt. PyTorch's pip wheels ship fmt's
# headers in torch/include, which comes before the system's include folder on every
# compile line: a system fmt of another version could not be used beside them (its
# headers would be shadowed, its compiled library mismatched). So torch's bundled fmt is
# used where the torch found has one, the system's (libfmt-dev) otherwise. Debian's
# LibTorch lives in the system's include folder itself: its fmt is the system's.
add_library(qat_fmt INTERFACE)
set(QAT_TORCH_FMT_INCLUDE_DIR "")
foreach(dir ${TORCH_INCLUDE_DIRS})
  if(EXISTS "${dir}/fmt/format.h" AND NOT dir IN_LIST CMAKE_CXX_IMPLICIT_INCLUDE_DIRECTORIES)
    set(QAT_TORCH_FMT_INCLUDE_DIR "${dir}")
    break()
  endif()
endforeach()
if(QAT_TORCH_FMT_INCLUDE_DIR)
  target_include_directories(qat_fmt SYSTEM INTERFACE "${QAT_TORCH_FMT_INCLUDE_DIR}")
  target_compile_definitions(qat_fmt INTERFACE FMT_HEADER_ONLY=1)
  message(STATUS "qat: fmt from torch's headers (${QAT_TORCH_FMT_INCLUDE_DIR})")
else()
  qat_require_package(fmt "libfmt-dev")
  target_link_libraries(qat_fmt INTERFACE fmt::fmt-header-only)
  message(STATUS "qat: fmt ${fmt_VERSION} from the system")
endif()
# at::parallel_for is an inline `#pragma omp parallel` when ATen's backend is OpenMP (as
# in Debian's and the pip builds): without -fopenmp our kernels would run on one thread.
find_package(OpenMP REQUIRED COMPONENTS CXX)
if(QAT_BUILD_PYTHON)
  set(PYBIND11_FINDPYTHON ON)
  # Torch's CMake files may already have found Python without its development part,
  # and pybind11 then lacks python_add_library: ask for the module part first.
  find_package(Python COMPONENTS Interpreter Development.Module REQUIRED)
  qat_require_package(pybind11 "pybind11-dev python3-dev")
  # torch's pybind11 casters for at::Tensor live in libtorch_python.
  find_library(QAT_TORCH_PYTHON_LIBRARY torch_python
    PATHS "${TORCH_INSTALL_PREFIX}/lib" "${_qat_torch_prefix}/../../lib"
    NO_DEFAULT_PATH)
  if(NOT QAT_TORCH_PYTHON_LIBRARY)
    find_library(QAT_TORCH_PYTHON_LIBRARY torch_python)
  endif()
  if(NOT QAT_TORCH_PYTHON_LIBRARY)
    message(FATAL_ERROR "qat: libtorch_python was not found. Install it with `apt-get install python3-torch`.")
  endif()
endif()
if(QAT_BUILD_TESTS)
  qat_require_package(Catch2 "catch2")
endif()

# CUDA kernels are built when the LibTorch found was built with CUDA, unless turned off
# (a CUDA build of torch without nvcc at hand, say).
option(QAT_ENABLE_CUDA "Build the CUDA kernels when torch was built with CUDA" ON)
set(QAT_WITH_CUDA OFF)
if(QAT_ENABLE_CUDA AND (TARGET torch_cuda OR TORCH_CUDA_LIBRARIES))
  set(QAT_WITH_CUDA ON)
endif()
