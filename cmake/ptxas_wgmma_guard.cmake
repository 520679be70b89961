# Compiler launcher for the CUDA attention sources (src/attention/CMakeLists.txt):
#   cmake -P ptxas_wgmma_guard.cmake -- [launcher...] nvcc <args> -Xptxas=-v
# Runs the compile, passes its output on without ptxas's per-kernel resource report, and fails
# the compile when ptxas says it serialized wgmma instructions ("(C7511) Potential Performance
# Loss: wgmma.mma_async instructions are serialized ..."): that warning is an "info" line that
# ptxas prints only with -v and never as an error, and a kernel it applies to silently loses
# the asynchronous tensor-core pipeline the Hopper kernels are built on.
set(command)
set(after_separator FALSE)
math(EXPR last "${CMAKE_ARGC} - 1")
foreach(i RANGE 0 ${last})
  if(after_separator)
    list(APPEND command "${CMAKE_ARGV${i}}")
  elseif(CMAKE_ARGV${i} STREQUAL "--")
    set(after_separator TRUE)
  endif()
endforeach()
if(NOT command)
  message(FATAL_ERROR "ptxas_wgmma_guard: no compile command after '--'")
endif()
execute_process(COMMAND ${command} OUTPUT_VARIABLE out ERROR_VARIABLE err RESULT_VARIABLE rc)
set(text "${out}${err}")
# Keep everything but the resource report (-v): "ptxas info : Used N registers", "Compiling
# entry function", "Function properties", stack-frame lines, compile times.
string(REGEX REPLACE "ptxas info    : (Used|Compiling entry|Function properties|Compile time|[0-9]+ bytes gmem)[^\n]*\n" "" text "${text}")
string(REGEX REPLACE "    [0-9]+ bytes stack frame[^\n]*\n" "" text "${text}")
if(NOT text STREQUAL "")
  execute_process(COMMAND ${CMAKE_COMMAND} -E echo_append "${text}")
endif()
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "compile failed (exit ${rc})")
endif()
if(text MATCHES "wgmma[^\n]*serialized")
  message(FATAL_ERROR "ptxas serialized wgmma instructions (see the C7511 line above): the kernel would run its "
                      "tensor-core GEMMs one at a time. Fix the kernel (registers an in-flight wgmma owns must not be "
                      "touched before its wait; no spills around the pipeline) rather than this check.")
endif()
