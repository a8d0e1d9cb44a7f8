// phi_gamma row re-weighting (DESIGN §3.2): out = (sum a) * a^g / sum a^g per row, on relu(a).
// Launchers compute the three row statistics (mass, max, powered sum) with their own reductions
// and call these bodies per element. Powers are taken of a / max (in [0, 1]) so large values or
// large gamma cannot overflow.
#pragma once

#include <math.h>

#include "common/macros.h"

namespace wsss_fast {

WSSS_HD float reweight_clamp(float a) { return a > 0.f ? a : 0.f; }

// a^gamma scaled by the row max: (relu(a) / max)^gamma; 0 for a zero row.
WSSS_HD float reweight_scaled_power(float a, float inv_max, float gamma) {
  const float x = reweight_clamp(a) * inv_max;
  return x > 0.f ? powf(x, gamma) : 0.f;
}

struct ReweightRow {
  float mass;     // sum of relu(a)
  float inv_max;  // 1 / max relu(a), 0 for a zero row
  float scale;    // mass / sum (a/max)^gamma, 0 for a zero row
};

WSSS_HD float reweight_inv_max(float row_max) { return row_max > 0.f ? 1.f / row_max : 0.f; }

WSSS_HD ReweightRow reweight_row(float mass, float row_max, float scaled_power_sum) {
  ReweightRow row;
  row.mass = mass;
  row.inv_max = reweight_inv_max(row_max);
  row.scale = scaled_power_sum > 0.f ? mass / scaled_power_sum : 0.f;
  return row;
}

// The output element from its scaled power: phi(a), optionally times relu(patchcam), optionally
// square-rooted.
WSSS_HD float reweight_finish(float scaled_power, const ReweightRow& row, bool has_patchcam,
                              float patchcam, bool take_sqrt) {
  float out = row.scale * scaled_power;
  if (has_patchcam) out *= reweight_clamp(patchcam);
  return take_sqrt ? sqrtf(out) : out;
}

// The output element: phi(a), optionally times relu(patchcam), optionally square-rooted.
WSSS_HD float reweight_output(float a, const ReweightRow& row, float gamma, bool has_patchcam,
                              float patchcam, bool take_sqrt) {
  return reweight_finish(reweight_scaled_power(a, row.inv_max, gamma), row, has_patchcam,
                         patchcam, take_sqrt);
}

}  // namespace wsss_fast
