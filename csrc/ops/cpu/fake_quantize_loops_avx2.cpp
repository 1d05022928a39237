// Compiled with the AVX2 CPU capability's flags (see CMakeLists.txt).
#include "fake_quantize_loops_impl.h"
