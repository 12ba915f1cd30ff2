#include <torch/extension.h>
#include <cmath>
using at::Tensor;

// The engine's ResNet SGD step (tauopt._step.TrainStep with models.TauResNet, no l1 and no
// horizon penalty) written as one C++ function: gather, forward, cross-entropy, backward, update.
// The matrix products are the same ATen calls; the per-layer elementwise work runs as fused
// loops. Not part of tauopt: benchmarks/compiled_step.py measures what removing Python and the
// per-op dispatch would save. The caller preallocates every buffer (float32, contiguous, CPU).
double resnet_step(const Tensor& X, const Tensor& Y, const Tensor& idx,
                   std::vector<Tensor> W, std::vector<Tensor> Wt, std::vector<Tensor> B,
                   Tensor Wout, Tensor tau, double lr,
                   Tensor xb, Tensor yb, Tensor acts, Tensor states, Tensor gd, Tensor gz,
                   Tensor gW0, Tensor gWh, Tensor gB, Tensor logits, Tensor gWout, Tensor gtau) {
  at::index_select_out(xb, X, 0, idx);
  at::index_select_out(yb, Y, 0, idx);
  const int64_t L = W.size(), N = xb.size(0), H = W[0].size(0), C = Wout.size(0);
  float* t = tau.data_ptr<float>();
  const int64_t NH = N * H;
  Tensor inp = xb;
  for (int64_t l = 0; l < L; ++l) {
    Tensor a = acts[l];
    at::mm_out(a, inp, Wt[l]);
    float* ap = a.data_ptr<float>();
    const float* bp = B[l].data_ptr<float>();
    float* sp = states[l].data_ptr<float>();
    const float tl = t[l];
    if (l == 0) {
      for (int64_t n = 0; n < N; ++n)
        for (int64_t h = 0; h < H; ++h) {
          float v = ap[n * H + h] + bp[h]; v = v > 0.f ? v : 0.f;
          ap[n * H + h] = v; sp[n * H + h] = tl * v;
        }
    } else {
      const float* prev = states[l - 1].data_ptr<float>();
      for (int64_t n = 0; n < N; ++n)
        for (int64_t h = 0; h < H; ++h) {
          float v = ap[n * H + h] + bp[h]; v = v > 0.f ? v : 0.f;
          ap[n * H + h] = v; sp[n * H + h] = prev[n * H + h] + tl * v;
        }
    }
    inp = states[l];
  }
  at::mm_out(logits, inp, Wout.t());
  // d(mean cross-entropy)/d logits = (softmax - onehot) / N, in place; and the loss
  float* lp = logits.data_ptr<float>();
  const int64_t* yp = yb.data_ptr<int64_t>();
  double loss = 0;
  for (int64_t n = 0; n < N; ++n) {
    float* row = lp + n * C;
    float m = row[0];
    for (int64_t c = 1; c < C; ++c) m = std::max(m, row[c]);
    float s = 0;
    for (int64_t c = 0; c < C; ++c) { row[c] = std::exp(row[c] - m); s += row[c]; }
    loss += std::log(s) - std::log(row[yp[n]]);
    const float inv = 1.f / (s * N);
    for (int64_t c = 0; c < C; ++c) row[c] *= inv;
    row[yp[n]] -= 1.f / N;
  }
  loss /= N;
  { Tensor o = gd[L - 1]; at::mm_out(o, logits, Wout); }
  at::mm_out(gWout, logits.t(), inp);
  float* gtp = gtau.data_ptr<float>();
  for (int64_t l = L - 1; l >= 0; --l) {
    const float* g = gd[l].data_ptr<float>();
    const float* a = acts[l].data_ptr<float>();
    float* z = gz[l].data_ptr<float>();
    const float tl = t[l];
    float acc = 0;
    for (int64_t i = 0; i < NH; ++i) {
      acc += g[i] * a[i];
      z[i] = a[i] > 0.f ? g[i] * tl : 0.f;
    }
    gtp[l] = acc;
    if (l > 0) { Tensor o = gd[l - 1]; at::addmm_out(o, gd[l], gz[l], W[l]); }
  }
  at::mm_out(gW0, gz[0].t(), xb);
  if (L > 1) at::bmm_out(gWh, gz.slice(0, 1).transpose(1, 2), states.slice(0, 0, L - 1));
  at::sum_out(gB, gz, {1});
  // plain SGD, p -= lr * grad
  auto sgd = [&](Tensor p, const Tensor& g) {
    float* pp = p.data_ptr<float>(); const float* gp = g.data_ptr<float>();
    const int64_t n = p.numel(); const float a = -lr;
    for (int64_t i = 0; i < n; ++i) pp[i] += a * gp[i];
  };
  sgd(W[0], gW0);
  for (int64_t l = 1; l < L; ++l) sgd(W[l], gWh[l - 1]);
  for (int64_t l = 0; l < L; ++l) sgd(B[l], gB[l]);
  sgd(Wout, gWout);
  sgd(tau, gtau);
  return loss;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("resnet_step", &resnet_step); }
