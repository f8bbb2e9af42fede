// The second .cu file of the two-file slot-table check (see slot_table_k4096.cuh): no test
// cases, only its own copy of the launch, called from test_slot_table.cu.

#include "slot_table_k4096.cuh"

namespace skv_gpu_test {

const void* slot_table_kernel_in_second_tu() { return slot_table_kernel_here(); }

int slot_table_limit_in_second_tu() { return slot_table_limit_here(); }

std::vector<std::int32_t> slot_table_k4096_in_second_tu(cudaStream_t stream) { return slot_table_k4096_here(stream); }

}  // namespace skv_gpu_test
