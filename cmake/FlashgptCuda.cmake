# CUDA is an optional language. AUTO enables it when a CUDA compiler is found; ON
# fails the configure if none is; OFF never looks. Default target: Hopper with the
# sm_90a features (wgmma, setmaxnreg), overridable with CMAKE_CUDA_ARCHITECTURES.
set(FLASHGPT_WITH_CUDA OFF)
if(NOT FLASHGPT_CUDA STREQUAL "OFF")
  include(CheckLanguage)
  check_language(CUDA)
  if(CMAKE_CUDA_COMPILER)
    if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES)
      set(CMAKE_CUDA_ARCHITECTURES 90a)
    endif()
    enable_language(CUDA)
    set(CMAKE_CUDA_STANDARD 20)
    set(CMAKE_CUDA_STANDARD_REQUIRED ON)
    # CMake 3.25 predates nvcc 13 and does not know its C++20 flag ("CUDA20 dialect not
    # supported"): tell it.
    if(NOT CMAKE_CUDA20_STANDARD_COMPILE_OPTION)
      set(CMAKE_CUDA20_STANDARD_COMPILE_OPTION "-std=c++20")
      set(CMAKE_CUDA20_EXTENSION_COMPILE_OPTION "-std=c++20")
    endif()
    find_package(CUDAToolkit REQUIRED)
    set(FLASHGPT_WITH_CUDA ON)
  elseif(FLASHGPT_CUDA STREQUAL "ON")
    message(FATAL_ERROR "FLASHGPT_CUDA=ON but no CUDA compiler was found (set CMAKE_CUDA_COMPILER or put nvcc on PATH)")
  endif()
endif()
