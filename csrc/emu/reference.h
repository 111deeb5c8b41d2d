// Independent float64 reference of the bottleneck adapter (written from the maths, not from the
// kernels), with a first-order bound of the error a correct kernel may make in each output element.
//
//   forward:   P = x wd^T + bd,  H = act(P),  U = H wu^T + bu,  y = res + s * U     (s per column)
//   backward:  dz = dy * s,  dH = dz wu,  dh = dH * act'(P),  dx = dh wd (+ dy when res = x),
//              dw_down = dh^T x,  db_down = sum_t dh,  dw_up = dz^T H,  db_up = sum_t dz,
//              dscale_j = sum_t dy[t,j] * U[t,j]        (the backward takes P as an input)
//
// Error model (per element, first order; `bound` = the sum below, the test allows kTolFactor x it):
// every value the kernels store in the element type is rounded (relative error u: 2^-8 bf16,
// 2^-11 f16, 2^-24 fp32); a dot product of n terms accumulated in fp32 errs by at most n * 2^-24
// times the sum of |terms|; with TF32 operands each product errs by 2 * 2^-11 of |product|; an
// activation evaluated in fp32 errs by 8 * 2^-24 * (|value| + |argument|); an error e in an input of
// act (or act') propagates as L * e, L = act's Lipschitz constant. The bounds are written for the
// rounding points listed in csrc/kernels/adapter_fwd.cuh and adapter_bwd.cuh (pre, h, dz, dH, dh
// and every output are rounded to the element type; r chunks add one rounding of y / dx each).
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace ref {

constexpr double kTolFactor = 2.0;  // slack over the first-order bound (second-order terms)

struct Mat {  // row-major float64
  int64_t rows = 0, cols = 0;
  std::vector<double> v;
  Mat() = default;
  Mat(int64_t r, int64_t c) : rows(r), cols(c), v((size_t)(r * c), 0.0) {}
  double& operator()(int64_t i, int64_t j) { return v[(size_t)(i * cols + j)]; }
  double operator()(int64_t i, int64_t j) const { return v[(size_t)(i * cols + j)]; }
};

struct Bounded {  // reference values and per-element error bounds, same shape
  Mat value, bound;
};

struct Precision {
  double u_store;    // unit roundoff of the element type
  double u_product;  // extra relative error of one product: 2 * 2^-11 for TF32 operands, else 0
};
constexpr double kU32 = 1.0 / (1 << 24);  // fp32 unit roundoff (accumulators, epilogues)

double act(int id, double x);
double act_grad(int id, double x);  // PyTorch's conventions at the kinks (relu'(0) = 0, ...)

struct FwdIn {
  const Mat *x, *wd, *wu;       // (T, d), (r, d), (d, r)
  const Mat* res;               // (T, d) or nullptr: residual = x
  const std::vector<double>* bd;  // (r) or nullptr
  const std::vector<double>* bu;  // (d) or nullptr
  std::vector<double> scale;      // (d): the scale of every column
  int act;
  int r_chunks;                   // launches over r chunks (extra roundings of y)
};
struct FwdRef {
  Bounded y, pre;
};
FwdRef forward(const FwdIn& in, Precision prec);

struct BwdIn {
  const Mat *dy, *x, *pre, *wd, *wu;  // (T, d), (T, d), (T, r), (r, d), (d, r)
  const std::vector<double>* bu;      // (d) or nullptr
  std::vector<double> scale;          // (d)
  bool residual_is_x;
  int act;
  int r_chunks;                       // token-kernel launches over r chunks
};
struct BwdRef {
  Bounded dx, dw_down, db_down, dw_up, db_up, dscale;  // biases and dscale as (1, n)
};
BwdRef backward(const BwdIn& in, Precision prec);

}  // namespace ref
