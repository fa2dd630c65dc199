// Per-element math of the fragile-coordinate compaction (per-request certificates, DESIGN section 4),
// written once for CPU and CUDA.
#pragma once

#include "unlearn/macros.h"

namespace unlearn {

// A coordinate is fragile at a step when its certified radius is below the threshold M*C/b (plus a
// rounding margin): removing up to M samples could flip its code, so its exact value is recorded.
// Written as !(r >= t) so that a NaN radius is fragile too: never silently certified.
UE_HOST_DEVICE bool is_fragile(float radius, float threshold) { return !(radius >= threshold); }

}  // namespace unlearn
