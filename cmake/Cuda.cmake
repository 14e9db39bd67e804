# Detects the CUDA toolkit and NCCL. TANDEM_CUDA / TANDEM_NCCL: ON (required),
# OFF, or AUTO (on when found). Sets TANDEM_HAVE_CUDA and TANDEM_HAVE_NCCL.
# The CPU build never needs either; with no GPU at run time the binaries fall
# back to the CPU backend and the TCP/shm transports.
set(TANDEM_HAVE_CUDA OFF)
set(TANDEM_HAVE_NCCL OFF)

if(NOT TANDEM_CUDA STREQUAL "OFF")
  include(CheckLanguage)
  check_language(CUDA)
  if(CMAKE_CUDA_COMPILER)
    if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES)
      # A100, H100/H200, B200 (sm_100 needs CUDA 12.8 or later). The version
      # is read from nvcc: CMake knows it only after enable_language.
      execute_process(COMMAND ${CMAKE_CUDA_COMPILER} --version OUTPUT_VARIABLE _tandem_nvcc
                      ERROR_QUIET)
      string(REGEX MATCH "release ([0-9]+\\.[0-9]+)" _tandem_rel "${_tandem_nvcc}")
      if(CMAKE_MATCH_1 VERSION_GREATER_EQUAL 12.8)
        set(CMAKE_CUDA_ARCHITECTURES 80 90 100)
      else()
        set(CMAKE_CUDA_ARCHITECTURES 80 90)
      endif()
    endif()
    enable_language(CUDA)
    find_package(CUDAToolkit)
    if(CUDAToolkit_FOUND)
      set(TANDEM_HAVE_CUDA ON)
    endif()
  endif()
  if(TANDEM_CUDA STREQUAL "ON" AND NOT TANDEM_HAVE_CUDA)
    message(FATAL_ERROR "TANDEM_CUDA=ON but no CUDA toolkit was found")
  endif()
endif()

if(TANDEM_HAVE_CUDA AND NOT TANDEM_NCCL STREQUAL "OFF")
  find_library(NCCL_LIB nccl HINTS ${CUDAToolkit_LIBRARY_DIR})
  find_path(NCCL_INCLUDE nccl.h HINTS ${CUDAToolkit_INCLUDE_DIRS})
  if(NCCL_LIB AND NCCL_INCLUDE)
    set(TANDEM_HAVE_NCCL ON)
  endif()
endif()
if(TANDEM_NCCL STREQUAL "ON" AND NOT TANDEM_HAVE_NCCL)
  message(FATAL_ERROR "TANDEM_NCCL=ON but NCCL (or CUDA) was not found")
endif()
