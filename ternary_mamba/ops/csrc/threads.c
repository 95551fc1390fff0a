// The kernels' OpenMP thread count.  The library links the system's OpenMP runtime, not the copy torch ships, so
// torch.set_num_threads does not reach it: ops/build.py sets it here, to torch's count, when the library loads
// and whenever `--threads` (ops.build.set_threads) changes it.
#include <stdint.h>
#include "vec16.h"

void tm_set_threads(int64_t n) {
    if (n > 0) omp_set_num_threads((int)n);
}

int64_t tm_get_threads(void) { return omp_get_max_threads(); }
