// Checks of the emulator's own building blocks (element conversions, cvt.rna.tf32.f32, launch
// limits) and of the kernels' warp-MMA ops on a single tile, each against an independent formula.
#pragma once

#include <string>
#include <vector>

struct CheckResult {
  std::string name;
  bool ok;
  std::string detail;  // the first mismatch, or a summary
};

std::vector<CheckResult> run_selftests(int device);
