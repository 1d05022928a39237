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

qat_require_package(Torch "libtorch-dev python3-torch")
qat_require_package(fmt "libfmt-dev")
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
