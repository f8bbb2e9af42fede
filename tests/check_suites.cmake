# Fails when the test binary holds a doctest suite that tests/CMakeLists.txt does not run.
# -DEXE=<binary> -DSUITES=<suites run> -DLIST=<the variable that lists them, for the message>
cmake_minimum_required(VERSION 3.24)  # a -P script starts with no policies set: IN_LIST needs them
execute_process(COMMAND ${EXE} --list-test-suites --no-intro OUTPUT_VARIABLE out RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "listing suites failed: ${out}")
endif()
string(REGEX MATCHALL "\n[a-z_]+" found "\n${out}")
foreach(s IN LISTS found)
  string(STRIP "${s}" s)
  if(s AND NOT s IN_LIST SUITES)
    message(FATAL_ERROR "suite '${s}' is in the binary but not in ${LIST}")
  endif()
endforeach()
