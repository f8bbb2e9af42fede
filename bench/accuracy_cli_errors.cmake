# ctest bench.accuracy_cli_errors (label accuracy): `accuracy` (EXE) with a bad command line must
# exit with status 2 and print a message naming the flag, before any case runs.
# -DEXE=<accuracy> -DMODEL=<the trained model folder>

function(expect_usage_error flag)
  execute_process(COMMAND ${EXE} --model ${MODEL} --device cpu ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out
                  ERROR_VARIABLE err TIMEOUT 120)
  if(NOT rc EQUAL 2)
    message(FATAL_ERROR "accuracy ${ARGN}: exit status ${rc}, expected 2\n${out}${err}")
  endif()
  string(FIND "${out}${err}" "${flag}" at)
  if(at EQUAL -1)
    message(FATAL_ERROR "accuracy ${ARGN}: the output does not name ${flag}:\n${out}${err}")
  endif()
endfunction()

expect_usage_error(--device --device tpu)
expect_usage_error(--tasks --tasks passkey,nosuchtask)
expect_usage_error(--lengths --lengths 100)
expect_usage_error(--lengths --lengths 32)
expect_usage_error(--cases --cases 0)
expect_usage_error(--budgets --budgets 0)
expect_usage_error(--rank --rank 100000)
expect_usage_error(--rank-sweep --rank-sweep 0)
expect_usage_error(--rank-sweep --rank-sweep 16,100000)
expect_usage_error(--sweep-length --lengths 2048 --sweep-length 4096)
expect_usage_error(--chunk-size --chunk-size 0)
# A model folder that does not exist (outside the function, which passes the trained model).
execute_process(COMMAND ${EXE} --model ${MODEL}/no-such-folder --device cpu RESULT_VARIABLE rc OUTPUT_VARIABLE out
                ERROR_VARIABLE err TIMEOUT 120)
string(FIND "${out}${err}" "--model" at)
if(NOT rc EQUAL 2 OR at EQUAL -1)
  message(FATAL_ERROR "accuracy --model <missing folder>: exit status ${rc}, expected 2 naming --model\n${out}${err}")
endif()
