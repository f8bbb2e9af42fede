# The command-line rows of the invalid-input table (ctest examples.cli_errors, labels cpu and
# reliability): shadowkv-decode (EXE) with a bad command line must exit with status 2 and print
# a message naming the flag; a model folder whose files are malformed must exit with status 1
# and name the file; `--help` and a valid run after all of them must exit 0.
# -DEXE=<shadowkv-decode> -DWORK=<a scratch folder>

# Runs EXE with ARGN; fails unless it exits with `status` and its output contains `needle`.
function(expect_exit status needle)
  execute_process(COMMAND ${EXE} ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT rc EQUAL status)
    message(FATAL_ERROR "shadowkv-decode ${ARGN}: exit status ${rc}, expected ${status}\n${out}${err}")
  endif()
  string(FIND "${out}${err}" "${needle}" at)
  if(at EQUAL -1)
    message(FATAL_ERROR "shadowkv-decode ${ARGN}: the output does not name ${needle}:\n${out}${err}")
  endif()
  math(EXPR n "${CASES} + 1")
  set(CASES ${n} PARENT_SCOPE)
endfunction()

# A bad command line: status 2, the flag named.
macro(expect_usage_error flag)
  expect_exit(2 ${flag} ${ARGN})
endmacro()

set(CASES 0)
# Scratch: folders for the malformed-model rows (and a folder where a file is expected).
file(REMOVE_RECURSE ${WORK})
file(MAKE_DIRECTORY ${WORK}/empty ${WORK}/bad-config ${WORK}/no-weights ${WORK}/bad-weights)
set(config [[{"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
  "num_attention_heads": 1, "num_hidden_layers": 1, "vocab_size": 258, "bos_token_id": 256,
  "eos_token_id": 257, "shadowkv_tokenizer": "bytes"}]])

expect_usage_error(--policy --policy sparse)
expect_usage_error(--device --device tpu)
if(CUDA_BUILD)
  # Built with CUDA: `--device cuda` runs where a GPU is, and is a usage error naming the flag
  # where none is.
  execute_process(COMMAND ${EXE} --device cuda --policy dense --prompt-ids 1,2,3 --max-new-tokens 2
                  RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  string(FIND "${out}${err}" "--device" at)
  if(NOT (rc EQUAL 0 OR (rc EQUAL 2 AND NOT at EQUAL -1)))
    message(FATAL_ERROR "shadowkv-decode --device cuda: exit status ${rc}\n${out}${err}")
  endif()
else()
  expect_usage_error(--device --device cuda)
endif()
expect_usage_error(--max-new-tokens --max-new-tokens -3)
expect_usage_error(--max-new-tokens --max-new-tokens many)
expect_usage_error(--max-new-tokens --max-new-tokens 2000000)
expect_usage_error(--chunk-size --chunk-size 0)
expect_usage_error(--chunk-size --chunk-size -8)
expect_usage_error(--chunk-size --chunk-size 5000)
expect_usage_error(--rank --rank many)
expect_usage_error(--rank --rank 0)
expect_usage_error(--rank --rank -4)
expect_usage_error(--rank --rank 100000)
expect_usage_error(--budget --budget 12 --chunk-size 8)
expect_usage_error(--budget --budget 0)
expect_usage_error(--budget --budget 99999999999)
expect_usage_error(--budget --budget 1e3)
expect_usage_error(--outliers --outliers -1)
expect_usage_error(--outliers --outliers x)
expect_usage_error(--local-chunks --local-chunks -1)
expect_usage_error(--local-chunks --local-chunks 2000000)
expect_usage_error(--prefill-chunk --prefill-chunk 0)
expect_usage_error(--prefill-chunk --prefill-chunk -16)
expect_usage_error(--temperature --temperature -1)
expect_usage_error(--temperature --temperature 101)
expect_usage_error(--temperature --temperature nan)
expect_usage_error(--top-p --top-p 0)
expect_usage_error(--top-p --top-p 1.5)
expect_usage_error(--top-p --top-p nan)
expect_usage_error(--seed --seed -1)
expect_usage_error(--seed --seed abc)
expect_usage_error(--prompt-ids --prompt-ids 1,x,3)
expect_usage_error(--prompt-ids --prompt-ids 1,99999)
expect_usage_error(--prompt-ids --prompt-ids -1)
expect_usage_error(--prompt-ids --prompt-ids ,,)
expect_usage_error(--prompt-file --prompt-file /nonexistent/prompt.txt)
expect_usage_error(--prompt-file --prompt-file ${WORK})
expect_usage_error(--prompt --prompt hi --prompt-ids 1,2)
expect_usage_error(--prompt-file --prompt-file ${CMAKE_CURRENT_LIST_FILE} --prompt-ids 1,2)
expect_usage_error(--policy --policy shadowkv --prompt hi)
expect_usage_error(--policy --policy oracle --prompt-ids 1,2,3)
expect_usage_error(--policy --policy shadowkv --local-chunks 1000)
expect_usage_error(--policy --policy shadowkv --outliers 1000)
expect_usage_error(--model --model /nonexistent/model)
expect_usage_error(--model --model ${CMAKE_CURRENT_LIST_FILE})
expect_usage_error(--frobnicate --frobnicate)

# Malformed model folders: status 1, the file named.
file(WRITE ${WORK}/bad-config/config.json "{\"hidden_size\": ")
file(WRITE ${WORK}/no-weights/config.json "${config}")
file(WRITE ${WORK}/bad-weights/config.json "${config}")
file(WRITE ${WORK}/bad-weights/model.safetensors "not a checkpoint")
expect_exit(1 config.json --model ${WORK}/empty)
expect_exit(1 "invalid JSON" --model ${WORK}/bad-config)
expect_exit(1 model.safetensors --model ${WORK}/no-weights)
expect_exit(1 "header length" --model ${WORK}/bad-weights)

# The default retrieval prompt of the trained model (models/retrieval-6l).
expect_usage_error(--task --task nope)
expect_usage_error(--context --context 100)
expect_usage_error(--context --context 5)

execute_process(COMMAND ${EXE} --help RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
if(NOT rc EQUAL 0 OR NOT out MATCHES "--prompt-ids")
  message(FATAL_ERROR "shadowkv-decode --help: exit status ${rc}\n${out}${err}")
endif()
# And a valid run still works (the tiny default model; sampling, so every option is used).
expect_exit(0 "generated:" --policy dense --prompt-ids 256,72,105 --max-new-tokens 3 --temperature 0.8
            --top-p 0.9 --seed 5)
message(STATUS "shadowkv-decode: ${CASES} command lines checked")
