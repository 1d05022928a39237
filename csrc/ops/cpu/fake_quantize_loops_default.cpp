// Compiled with the DEFAULT CPU capability's flags (see CMakeLists.txt).
#include "fake_quantize_loops_impl.h"
