// float64 reference of the adapter and its error bounds (the model is described in reference.h).
#include "reference.h"

#include <cmath>
#include <stdexcept>

namespace ref {
namespace {

constexpr double kPi = 3.14159265358979323846;

double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }

// Lipschitz constants: max |act'| (gelu 1.129, gelu_tanh 1.13, quick_gelu 1.09, silu 1.1).
constexpr double kLipschitz[10] = {1.0, 1.13, 1.14, 1.1, 1.1, 1.0, 0.25, 1.0, 1.0, 1.0};

Mat map(const Mat& a, double (*f)(double)) {
  Mat out(a.rows, a.cols);
  for (size_t i = 0; i < a.v.size(); ++i) out.v[i] = f(a.v[i]);
  return out;
}
double absd(double x) { return std::fabs(x); }
Mat abs(const Mat& a) { return map(a, absd); }

// out = sum_i c_i * m_i (all the same shape)
Mat comb(std::initializer_list<std::pair<double, const Mat*>> terms) {
  const Mat& first = *terms.begin()->second;
  Mat out(first.rows, first.cols);
  for (const auto& [c, m] : terms)
    for (size_t i = 0; i < out.v.size(); ++i) out.v[i] += c * m->v[i];
  return out;
}
Mat hadamard(const Mat& a, const Mat& b) {
  Mat out(a.rows, a.cols);
  for (size_t i = 0; i < a.v.size(); ++i) out.v[i] = a.v[i] * b.v[i];
  return out;
}

// a (m x k) times b^T, b (n x k)
Mat mul_nt(const Mat& a, const Mat& b) {
  Mat out(a.rows, b.rows);
  for (int64_t i = 0; i < a.rows; ++i)
    for (int64_t j = 0; j < b.rows; ++j) {
      double s = 0.0;
      for (int64_t k = 0; k < a.cols; ++k) s += a(i, k) * b(j, k);
      out(i, j) = s;
    }
  return out;
}
// a (m x k) times b (k x n)
Mat mul_nn(const Mat& a, const Mat& b) {
  Mat out(a.rows, b.cols);
  for (int64_t i = 0; i < a.rows; ++i)
    for (int64_t k = 0; k < a.cols; ++k) {
      const double av = a(i, k);
      for (int64_t j = 0; j < b.cols; ++j) out(i, j) += av * b(k, j);
    }
  return out;
}
// a^T (a: k x m) times b (k x n)
Mat mul_tn(const Mat& a, const Mat& b) {
  Mat out(a.cols, b.cols);
  for (int64_t k = 0; k < a.rows; ++k)
    for (int64_t i = 0; i < a.cols; ++i) {
      const double av = a(k, i);
      for (int64_t j = 0; j < b.cols; ++j) out(i, j) += av * b(k, j);
    }
  return out;
}
Mat col_sums(const Mat& a) {  // (1, cols)
  Mat out(1, a.cols);
  for (int64_t i = 0; i < a.rows; ++i)
    for (int64_t j = 0; j < a.cols; ++j) out(0, j) += a(i, j);
  return out;
}
// a + broadcast row vector (or a itself when v is null)
Mat add_row(const Mat& a, const std::vector<double>* v) {
  Mat out = a;
  if (v != nullptr)
    for (int64_t i = 0; i < a.rows; ++i)
      for (int64_t j = 0; j < a.cols; ++j) out(i, j) += (*v)[(size_t)j];
  return out;
}
Mat scale_cols(const Mat& a, const std::vector<double>& s, bool absolute) {
  Mat out(a.rows, a.cols);
  for (int64_t i = 0; i < a.rows; ++i)
    for (int64_t j = 0; j < a.cols; ++j) out(i, j) = a(i, j) * (absolute ? std::fabs(s[(size_t)j]) : s[(size_t)j]);
  return out;
}
std::vector<double> abs_vec(const std::vector<double>* v) {
  std::vector<double> out;
  if (v != nullptr)
    for (double x : *v) out.push_back(std::fabs(x));
  return out;
}
Mat act_map(int id, const Mat& p, bool grad) {
  Mat out(p.rows, p.cols);
  for (size_t i = 0; i < p.v.size(); ++i) out.v[i] = grad ? act_grad(id, p.v[i]) : act(id, p.v[i]);
  return out;
}
// Error bound of act evaluated in fp32 on an exact argument.
Mat act_eval_error(const Mat& value, const Mat& arg) {
  Mat out(value.rows, value.cols);
  for (size_t i = 0; i < value.v.size(); ++i)
    out.v[i] = 8 * kU32 * (std::fabs(value.v[i]) + std::fabs(arg.v[i]) + 1e-30);
  return out;
}

}  // namespace

double act(int id, double x) {
  switch (id) {
    case 0: return x > 0 ? x : 0.0;                                    // relu
    case 1: return 0.5 * x * (1.0 + std::erf(x / std::sqrt(2.0)));     // gelu
    case 2: return 0.5 * x * (1.0 + std::tanh(std::sqrt(2.0 / kPi) * (x + 0.044715 * x * x * x)));  // gelu_tanh
    case 3: return x * sigmoid(1.702 * x);                              // quick_gelu
    case 4: return x * sigmoid(x);                                      // silu
    case 5: return std::tanh(x);
    case 6: return sigmoid(x);
    case 7: return x > 0 ? x : 0.01 * x;                                // leaky relu
    case 8: return x < 0 ? 0.0 : (x > 6 ? 6.0 : x);                     // relu6
    case 9: return x;                                                   // linear
  }
  throw std::invalid_argument("activation id");
}

double act_grad(int id, double x) {
  switch (id) {
    case 0: return x > 0 ? 1.0 : 0.0;
    case 1: return 0.5 * (1.0 + std::erf(x / std::sqrt(2.0))) + x * std::exp(-0.5 * x * x) / std::sqrt(2.0 * kPi);
    case 2: {
      const double c = std::sqrt(2.0 / kPi), th = std::tanh(c * (x + 0.044715 * x * x * x));
      return 0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * c * (1.0 + 3.0 * 0.044715 * x * x);
    }
    case 3: {
      const double s = sigmoid(1.702 * x);
      return s + 1.702 * x * s * (1.0 - s);
    }
    case 4: {
      const double s = sigmoid(x);
      return s * (1.0 + x * (1.0 - s));
    }
    case 5: return 1.0 - std::tanh(x) * std::tanh(x);
    case 6: return sigmoid(x) * (1.0 - sigmoid(x));
    case 7: return x > 0 ? 1.0 : 0.01;
    case 8: return (x > 0 && x < 6) ? 1.0 : 0.0;
    case 9: return 1.0;
  }
  throw std::invalid_argument("activation id");
}

FwdRef forward(const FwdIn& in, Precision prec) {
  const double u = prec.u_store, p = prec.u_product;
  const int64_t d = in.x->cols, r = in.wd->rows;
  const Mat ax = abs(*in.x), awd = abs(*in.wd), awu = abs(*in.wu);
  const std::vector<double> abd = abs_vec(in.bd), abu = abs_vec(in.bu);

  FwdRef out;
  const Mat P = add_row(mul_nt(*in.x, *in.wd), in.bd);
  const Mat MP = add_row(mul_nt(ax, awd), in.bd ? &abd : nullptr);
  const Mat aP = abs(P);
  out.pre.value = P;
  out.pre.bound = comb({{u, &aP}, {p + (d + 1) * kU32, &MP}});

  const Mat H = act_map(in.act, P, false), aH = abs(H);
  const Mat eH_act = act_eval_error(H, P);
  const Mat eH = comb({{kLipschitz[in.act], &out.pre.bound}, {u, &aH}, {1.0, &eH_act}});
  const Mat U = add_row(mul_nt(H, *in.wu), in.bu);
  const Mat MU = add_row(mul_nt(aH, awu), in.bu ? &abu : nullptr);
  const Mat eU_in = mul_nt(eH, awu);
  const Mat eU = comb({{1.0, &eU_in}, {p + (r + 1) * kU32, &MU}});

  const Mat& res = in.res ? *in.res : *in.x;
  const Mat sU = scale_cols(U, in.scale, false);
  out.y.value = comb({{1.0, &res}, {1.0, &sU}});
  const Mat ares = abs(res), aY = abs(out.y.value);
  const Mat sMU = scale_cols(MU, in.scale, true), seU = scale_cols(eU, in.scale, true);
  const Mat MY0 = comb({{1.0, &ares}, {1.0, &sMU}});
  out.y.bound = comb({{1.0, &seU}, {u, &aY}, {3 * kU32 + (in.r_chunks - 1) * u, &MY0}});
  return out;
}

BwdRef backward(const BwdIn& in, Precision prec) {
  const double u = prec.u_store, p = prec.u_product;
  const int64_t T = in.x->rows, d = in.x->cols, r = in.wd->rows;
  const Mat& P = *in.pre;
  const Mat aP = abs(P), adyv = abs(*in.dy), ax = abs(*in.x), awd = abs(*in.wd), awu = abs(*in.wu);
  const std::vector<double> abu = abs_vec(in.bu);
  BwdRef out;

  // dz = dy * s (rounded), dH = dz wu (rounded), dh = dH * act'(P) (rounded)
  const Mat dz = scale_cols(*in.dy, in.scale, false), adz = abs(dz);
  const Mat edz = comb({{u + kU32, &adz}});
  const Mat dH = mul_nn(dz, *in.wu), adH = abs(dH);
  const Mat MdH = mul_nn(adz, awu);
  const Mat edH = comb({{u + kU32 + p + d * kU32, &MdH}, {u, &adH}});
  const Mat g = act_map(in.act, P, true), ag = abs(g);
  const Mat dh = hadamard(dH, g), adh = abs(dh);
  const Mat eg = act_eval_error(g, P);
  const Mat edh_a = hadamard(edH, ag), edh_b = hadamard(adH, eg);
  const Mat edh = comb({{1.0, &edh_a}, {1.0, &edh_b}, {u, &adh}});

  // dx = dh wd (+ dy)
  const Mat dhwd = mul_nn(dh, *in.wd), Mdhwd = mul_nn(adh, awd);
  out.dx.value = in.residual_is_x ? comb({{1.0, &dhwd}, {1.0, in.dy}}) : dhwd;
  const Mat Mdx = in.residual_is_x ? comb({{1.0, &Mdhwd}, {1.0, &adyv}}) : Mdhwd;
  const Mat edx_in = mul_nn(edh, awd), adx = abs(out.dx.value);
  out.dx.bound = comb({{1.0, &edx_in}, {p + (r + 1) * kU32 + (in.r_chunks - 1) * u, &Mdx}, {u, &adx}});

  // dw_down = dh^T x, db_down = sum_t dh
  out.dw_down.value = mul_tn(dh, *in.x);
  const Mat e1 = mul_tn(edh, ax), M1 = mul_tn(adh, ax), a1 = abs(out.dw_down.value);
  out.dw_down.bound = comb({{1.0, &e1}, {p + T * kU32, &M1}, {u, &a1}});
  out.db_down.value = col_sums(dh);
  const Mat e2 = col_sums(edh), M2 = col_sums(adh), a2 = abs(out.db_down.value);
  out.db_down.bound = comb({{1.0, &e2}, {T * kU32, &M2}, {u, &a2}});

  // dw_up = dz^T act(P), db_up = sum_t dz (act(P) rounded in the weight-gradient kernel)
  const Mat Hb = act_map(in.act, P, false), aHb = abs(Hb);
  const Mat eHb_act = act_eval_error(Hb, P);
  const Mat eHb = comb({{u, &aHb}, {1.0, &eHb_act}});
  out.dw_up.value = mul_tn(dz, Hb);
  const Mat e3a = mul_tn(edz, aHb), e3b = mul_tn(adz, eHb), M3 = mul_tn(adz, aHb), a3 = abs(out.dw_up.value);
  out.dw_up.bound = comb({{1.0, &e3a}, {1.0, &e3b}, {p + T * kU32, &M3}, {u, &a3}});
  out.db_up.value = col_sums(dz);
  const Mat e4 = col_sums(edz), M4 = col_sums(adz), a4 = abs(out.db_up.value);
  out.db_up.bound = comb({{1.0, &e4}, {T * kU32, &M4}, {u, &a4}});

  // dscale_j = sum_t dy * (act(P) wu^T + bu), accumulated in fp32 from the rounded act(P)
  const Mat Uu = add_row(mul_nt(Hb, *in.wu), in.bu);
  const Mat MUu = add_row(mul_nt(aHb, awu), in.bu ? &abu : nullptr);
  const Mat eUu_in = mul_nt(eHb, awu);
  const Mat eUu = comb({{1.0, &eUu_in}, {p + (r + 1) * kU32, &MUu}});
  out.dscale.value = col_sums(hadamard(*in.dy, Uu));
  const Mat e5a = col_sums(hadamard(adyv, eUu)), M5 = col_sums(hadamard(adyv, MUu));
  out.dscale.bound = comb({{1.0, &e5a}, {(T + in.r_chunks) * kU32, &M5}});
  return out;
}

}  // namespace ref
