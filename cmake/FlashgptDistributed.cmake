# Data-parallel training. MPI (OpenMPI from Debian) is the CPU backend: AUTO uses it where
# found. NCCL is the GPU backend: with CUDA, where nccl.h and libnccl are found (beside the
# CUDA toolkit, or under NCCL_ROOT, e.g. a pip wheel's site-packages/nvidia/nccl).
set(FLASHGPT_MPI AUTO CACHE STRING "MPI backend for data-parallel training: AUTO, ON or OFF")
set_property(CACHE FLASHGPT_MPI PROPERTY STRINGS AUTO ON OFF)
set(FLASHGPT_WITH_MPI OFF)
if(NOT FLASHGPT_MPI STREQUAL "OFF")
  if(FLASHGPT_MPI STREQUAL "ON")
    find_package(MPI REQUIRED COMPONENTS CXX)
  else()
    find_package(MPI COMPONENTS CXX)
  endif()
  if(MPI_CXX_FOUND)
    set(FLASHGPT_WITH_MPI ON)
  endif()
endif()
set(FLASHGPT_NCCL AUTO CACHE STRING "NCCL backend for data-parallel training (CUDA builds): AUTO, ON or OFF")
set_property(CACHE FLASHGPT_NCCL PROPERTY STRINGS AUTO ON OFF)
set(FLASHGPT_WITH_NCCL OFF)
if(FLASHGPT_WITH_CUDA AND NOT FLASHGPT_NCCL STREQUAL "OFF")
  # NCCL_ROOT first, then the CUDA toolkit's folders (where NVIDIA's installers put NCCL).
  find_path(NCCL_INCLUDE_DIR nccl.h HINTS ${NCCL_ROOT} ENV NCCL_ROOT ${CUDAToolkit_INCLUDE_DIRS}
    PATH_SUFFIXES include)
  get_filename_component(flashgpt_cuda_root "${CUDAToolkit_LIBRARY_DIR}" DIRECTORY)
  find_library(NCCL_LIBRARY NAMES nccl libnccl.so.2 HINTS ${NCCL_ROOT} ENV NCCL_ROOT ${CUDAToolkit_LIBRARY_DIR}
    ${flashgpt_cuda_root}/lib PATH_SUFFIXES lib lib64)
  if(NCCL_INCLUDE_DIR AND NCCL_LIBRARY)
    set(FLASHGPT_WITH_NCCL ON)
  endif()
endif()
if(FLASHGPT_NCCL STREQUAL "ON" AND NOT FLASHGPT_WITH_NCCL)
  message(FATAL_ERROR "FLASHGPT_NCCL=ON but no CUDA build or no nccl.h / libnccl (set NCCL_ROOT)")
endif()
