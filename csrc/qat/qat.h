#pragma once

/// Umbrella header of qat's C++ API.
#include <qat/config.h>
#include <qat/estimator.h>
#include <qat/export.h>
#include <qat/fake_quantize.h>
#include <qat/lowered.h>
#include <qat/lowering.h>
#include <qat/nn.h>
#include <qat/observers.h>
#include <qat/op_roles.h>
#include <qat/prepare.h>
