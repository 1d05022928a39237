#pragma once

/// Umbrella header of qat's C++ API.
#include <qat/estimator.h>
#include <qat/fake_quantize.h>
#include <qat/observers.h>
