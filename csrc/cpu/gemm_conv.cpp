// The CPU convolution as one matrix product (gemm_conv.h says when and why).
#include "cpu/gemm_conv.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "common/checks.h"

namespace fusedres {
namespace cpu {
namespace {

std::atomic<bool>& enabled_flag() {
  static std::atomic<bool> flag{[] {
    const char* env = std::getenv("FUSEDRES_CPU_GEMM_CONV");
    return env == nullptr || std::string(env) != "0";
  }()};
  return flag;
}

// Set at load from the CPU's flags (fusedres/_ext.py); true until then.
std::atomic<bool>& float32_amx_rule_flag() {
  static std::atomic<bool> flag{true};
  return flag;
}

// Set at load (fusedres/_ext.py) to whether this CPU's oneDNN runs bfloat16; true until then.
std::atomic<bool>& bfloat16_flag() {
  static std::atomic<bool> flag{true};
  return flag;
}

// oneDNN's matmul as registered for inductor's CPU linear (mkldnn::_linear_pointwise), where this
// torch has it and oneDNN is enabled. at::mm sends float32 to MKL's sgemm, which this library's
// GEMM shapes run at 0.75-0.91x oneDNN's speed on a 2-core AMD EPYC (Zen 4; forward, data and
// weight products of ResNet's layer3/layer4 units at batch 8, 112x112, exploratory medians of 25
// calls); bfloat16 at::mm already runs oneDNN's matmul.
const c10::OperatorHandle* onednn_linear() {
  static const c10::OperatorHandle* handle = []() -> const c10::OperatorHandle* {
    static const auto found =
        c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""});
    return found.has_value() ? &found.value() : nullptr;
  }();
  return at::globalContext().userEnabledMkldnn() ? handle : nullptr;
}

// a [M, K] @ b [K, N] (either may be a transposed view) as a dense [M, N].
// The product in a's and b's dtype: an enclosing CPU autocast would otherwise run at::mm (oneDNN
// disabled) in bfloat16 on the float32 operands of a widened convolution.
at::Tensor matrix_product(const at::Tensor& a, const at::Tensor& b) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const c10::OperatorHandle* linear = onednn_linear();
  if (a.scalar_type() != at::kFloat || linear == nullptr) return at::mm(a, b);
  // Y = X @ W^T, W [N, K]: b's transpose, a view oneDNN reads with its strides.
  torch::jit::Stack stack{a, b.t(), c10::IValue(), std::string("none"),
                          c10::List<std::optional<at::Scalar>>(), std::string("")};
  linear->callBoxed(&stack);
  return stack.back().toTensor();
}

// The convolution's sizes; x and dx are dense channels_last (NHWC) buffers. A row of cols holds
// one output position's kh*kw taps of C channels, in the order of the weight's memory, so that
// the weight is a [Cout, K] matrix without a copy: (tap, channel) for a channels_last weight,
// (channel, tap) for a contiguous one.
struct Shape {
  int64_t n, c, h, w;       // input
  int64_t kh, kw;           // kernel
  int64_t ho, wo;           // output
  int64_t sh, sw, ph, pw, dh, dw;
  bool channels_inner;      // the weight is channels_last: (tap, channel) column order
  int64_t k() const { return kh * kw * c; }  // one row of cols
  int64_t m() const { return n * ho * wo; }  // rows of cols and of z
  int64_t tap_stride() const { return channels_inner ? c : 1; }
  int64_t channel_stride() const { return channels_inner ? 1 : kh * kw; }
};

bool weight_is_channels_last(const at::Tensor& weight) {
  return !weight.is_contiguous() && weight.is_contiguous(c10::MemoryFormat::ChannelsLast);
}

Shape shape_of(const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride,
               at::IntArrayRef padding, at::IntArrayRef dilation) {
  Shape s{x.size(0), x.size(1), x.size(2), x.size(3), weight.size(2), weight.size(3), 0, 0,
          stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
          weight_is_channels_last(weight)};
  s.ho = (s.h + 2 * s.ph - s.dh * (s.kh - 1) - 1) / s.sh + 1;
  s.wo = (s.w + 2 * s.pw - s.dw * (s.kw - 1) - 1) / s.sw + 1;
  return s;
}

bool is_pointwise(const Shape& s) {
  return s.kh == 1 && s.kw == 1 && s.sh == 1 && s.sw == 1 && s.ph == 0 && s.pw == 0;
}

// The [M, C] matrix of an NHWC tensor, a view when it is dense in channels_last.
at::Tensor rows_of(const at::Tensor& t) {
  return t.permute({0, 2, 3, 1}).reshape({-1, t.size(1)});
}

// The weight as the [Cout, K] matrix in cols' column order: a view of a dense weight.
at::Tensor weight_matrix(const at::Tensor& weight, const Shape& s) {
  if (s.channels_inner) return weight.permute({0, 2, 3, 1}).reshape({weight.size(0), -1});
  return weight.reshape({weight.size(0), -1});
}

// cols[(n, ho, wo), tap (i, j), c] = x[n, ho*sh - ph + i*dh, wo*sw - pw + j*dw, c], 0 in the
// padding, at column tap*tap_stride + c*channel_stride.
template <typename T>
void im2col(const T* x, T* cols, const Shape& s) {
  const int64_t k = s.k(), tap_stride = s.tap_stride(), channel_stride = s.channel_stride();
  at::parallel_for(0, s.n * s.ho, 1, [&](int64_t begin, int64_t end) {
    for (int64_t nho = begin; nho < end; ++nho) {
      const int64_t n = nho / s.ho, ho = nho % s.ho;
      for (int64_t wo = 0; wo < s.wo; ++wo) {
        T* row = cols + (nho * s.wo + wo) * k;
        for (int64_t i = 0; i < s.kh; ++i) {
          const int64_t hi = ho * s.sh - s.ph + i * s.dh;
          for (int64_t j = 0; j < s.kw; ++j) {
            const int64_t wi = wo * s.sw - s.pw + j * s.dw;
            T* dst = row + (i * s.kw + j) * tap_stride;
            const bool padding = hi < 0 || hi >= s.h || wi < 0 || wi >= s.w;
            const T* src = padding ? nullptr : x + ((n * s.h + hi) * s.w + wi) * s.c;
            if (channel_stride == 1) {
              if (padding) {
                std::memset(static_cast<void*>(dst), 0, s.c * sizeof(T));  // 0 bits: +0 in every T
              } else {
                std::memcpy(dst, src, s.c * sizeof(T));
              }
            } else {
              for (int64_t c = 0; c < s.c; ++c) dst[c * channel_stride] = padding ? T(0) : src[c];
            }
          }
        }
      }
    }
  });
}

// dx[n, h, w, c] = sum of dcols[(n, ho, wo), (i, j, c)] over the taps that read (h, w). Each dx
// pixel gathers its taps (no two threads write one pixel) and sums them in the op-math type.
template <typename T>
void col2im(const T* dcols, T* dx, const Shape& s) {
  using acc_t = at::opmath_type<T>;
  const int64_t k = s.k(), tap_stride = s.tap_stride(), channel_stride = s.channel_stride();
  at::parallel_for(0, s.n * s.h, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(s.c);
    for (int64_t nh = begin; nh < end; ++nh) {
      const int64_t n = nh / s.h, h = nh % s.h;
      for (int64_t w = 0; w < s.w; ++w) {
        std::fill(acc.begin(), acc.end(), acc_t(0));
        for (int64_t i = 0; i < s.kh; ++i) {
          const int64_t th = h + s.ph - i * s.dh;  // ho * sh for the output row that reads h
          if (th < 0 || th % s.sh != 0 || th / s.sh >= s.ho) continue;
          const int64_t ho = th / s.sh;
          for (int64_t j = 0; j < s.kw; ++j) {
            const int64_t tw = w + s.pw - j * s.dw;
            if (tw < 0 || tw % s.sw != 0 || tw / s.sw >= s.wo) continue;
            const T* src = dcols + ((n * s.ho + ho) * s.wo + tw / s.sw) * k + (i * s.kw + j) * tap_stride;
            for (int64_t c = 0; c < s.c; ++c) acc[c] += static_cast<acc_t>(src[c * channel_stride]);
          }
        }
        T* dst = dx + (nh * s.w + w) * s.c;
        for (int64_t c = 0; c < s.c; ++c) dst[c] = static_cast<T>(acc[c]);
      }
    }
  });
}

// a [M, K] @ b [K, N] by at::mm, which reads operands with any row stride in place (MKL's sgemm
// for float32), in a's and b's dtype. A tap's weight block is such a view, and oneDNN's matmul
// runs its reference loops on it: a resnet18 training step did not finish in 15 minutes.
// Measured against oneDNN's matmul over dense copies of the blocks (the copies included) on a
// 2-core AMD EPYC (Zen 3), batch 4-8, 256-512 channels at 4x4-7x7, exploratory medians of 20
// calls: forward 0.74-0.9x its time, data gradient 0.4-0.75x.
at::Tensor strided_product(const at::Tensor& a, const at::Tensor& b) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  return at::mm(a, b);
}

// One kernel tap's share of a padded convolution: the output positions ho in [h_begin, h_end),
// wo in [w_begin, w_end) where tap (i, j) reads inside x; elsewhere it reads the zero padding.
struct TapRect {
  int64_t tap, i, j, h_begin, h_end, w_begin, w_end;
  int64_t height() const { return h_end - h_begin; }
  int64_t width() const { return w_end - w_begin; }
  bool covers(int64_t ho, int64_t wo) const {
    return ho >= h_begin && ho < h_end && wo >= w_begin && wo < w_end;
  }
  // The row of the tap's products (its covered positions, image by image) for (n, ho, wo).
  int64_t row(int64_t n, int64_t ho, int64_t wo) const {
    return (n * height() + ho - h_begin) * width() + wo - w_begin;
  }
};

// [begin, end) of the output positions along one dimension whose tap k reads inside [0, size):
// the input index is o * stride + offset.
std::pair<int64_t, int64_t> reading_positions(int64_t size, int64_t out, int64_t stride,
                                              int64_t padding, int64_t dilation, int64_t k) {
  const int64_t offset = k * dilation - padding;
  const int64_t begin = offset >= 0 ? 0 : (-offset + stride - 1) / stride;
  const int64_t last_input = size - 1 - offset;
  const int64_t end = last_input < 0 ? 0 : std::min(out, last_input / stride + 1);
  return {begin, std::max(begin, end)};
}

// The taps that read x for some output position, in the weight's tap order.
std::vector<TapRect> tap_rects(const Shape& s) {
  std::vector<TapRect> rects;
  for (int64_t i = 0; i < s.kh; ++i) {
    const auto [h_begin, h_end] = reading_positions(s.h, s.ho, s.sh, s.ph, s.dh, i);
    for (int64_t j = 0; j < s.kw; ++j) {
      const auto [w_begin, w_end] = reading_positions(s.w, s.wo, s.sw, s.pw, s.dw, j);
      if (h_begin < h_end && w_begin < w_end) {
        rects.push_back({i * s.kw + j, i, j, h_begin, h_end, w_begin, w_end});
      }
    }
  }
  return rects;
}

// Whether the convolution runs tap by tap (a GEMM per tap over the output positions where it
// reads x) rather than as one GEMM over im2col: at least a quarter of im2col's entries would be
// padding, float32 (bfloat16 products come back rounded, and a sum of nine would round nine
// times where one GEMM rounds once) with a channels_last weight (a tap's [Cout, C] block is
// then a view with unit column stride). A 3x3 with padding 1 on ResNet's layer4 at 112x112
// (4x4 maps) multiplies 31% zeros in one GEMM, on a one-pixel map (layer4 at 32x32) 89%. Tap
// by tap the products are a ninth as deep and summed once more. Measured on a 2-core AMD EPYC
// (Zen 3), exploratory medians of 20-40 calls: the forward of a 512-channel 3x3 at 4x4, batch
// 8, 4.4-4.7 ms before and 3.3 ms after, on a one-pixel map at batch 32 1.3-1.5 against
// 0.16-0.18 ms; each tap's weight gradient written into its block of dW (at::mm_out) 1.4x
// faster than the one GEMM over im2col. Whole training steps: docs/design.md section 4.
bool splits_by_tap(const Shape& s, at::ScalarType dtype) {
  if (dtype != at::kFloat || !s.channels_inner || is_pointwise(s)) return false;
  int64_t tap_positions = 0;
  for (const TapRect& r : tap_rects(s)) tap_positions += r.height() * r.width();
  return 4 * tap_positions <= 3 * s.kh * s.kw * s.ho * s.wo;
}

// rows[(n, a, b)] = src[n, h0 + a * h_step, w0 + b * w_step] for a < height, b < width, of an
// NHWC buffer [N, src_h, src_w, width_c]: a view where that is all of src.
at::Tensor gather_rows(const at::Tensor& src_rows, int64_t n, int64_t src_h, int64_t src_w,
                       int64_t height, int64_t width, int64_t h0, int64_t h_step, int64_t w0,
                       int64_t w_step) {
  if (height == src_h && width == src_w && h0 == 0 && w0 == 0 && h_step == 1 && w_step == 1) {
    return src_rows;
  }
  const int64_t c = src_rows.size(1);
  at::Tensor rows = at::empty({n * height * width, c}, src_rows.options());
  const at::Tensor dense = src_rows.contiguous();
  const float* src = dense.data_ptr<float>();
  float* dst = rows.data_ptr<float>();
  at::parallel_for(0, n * height, 1, [&](int64_t begin, int64_t end) {
    for (int64_t na = begin; na < end; ++na) {
      const int64_t image = na / height, a = na % height;
      const float* src_row = src + ((image * src_h + h0 + a * h_step) * src_w + w0) * c;
      float* dst_row = dst + na * width * c;
      for (int64_t b = 0; b < width; ++b) {
        std::memcpy(dst_row + b * c, src_row + b * w_step * c, c * sizeof(float));
      }
    }
  });
  return rows;
}

// The rows of x that tap r multiplies, one per output position it covers.
at::Tensor tap_input_rows(const at::Tensor& x_rows, const Shape& s, const TapRect& r) {
  return gather_rows(x_rows, s.n, s.h, s.w, r.height(), r.width(),
                     r.h_begin * s.sh - s.ph + r.i * s.dh, s.sh,
                     r.w_begin * s.sw - s.pw + r.j * s.dw, s.sw);
}

// Tap r's [Cout, C] block of the [Cout, K] weight matrix in (tap, channel) column order.
at::Tensor tap_weight(const at::Tensor& weight_rows, const Shape& s, const TapRect& r) {
  return weight_rows.narrow(1, r.tap * s.c, s.c);
}

// dst = src (the first tap to reach it) or dst += src, over n floats.
void copy_or_add(float* dst, const float* src, int64_t n, bool first) {
  if (first) {
    std::memcpy(dst, src, n * sizeof(float));
  } else {
    for (int64_t c = 0; c < n; ++c) dst[c] += src[c];
  }
}

// z [M, Cout] = sum over taps of the tap's rows of x @ its weight block^T, each tap's products
// added where it covers, in tap order.
at::Tensor tap_split_forward(const at::Tensor& x, const at::Tensor& weight, const Shape& s) {
  const std::vector<TapRect> rects = tap_rects(s);
  const at::Tensor x_rows = rows_of(x), weight_rows = weight_matrix(weight, s);
  std::vector<at::Tensor> products;
  for (const TapRect& r : rects) {
    products.push_back(
        strided_product(tap_input_rows(x_rows, s, r), tap_weight(weight_rows, s, r).t()));
  }
  const int64_t cout = weight.size(0);
  at::Tensor z = at::empty({s.m(), cout}, x.options());
  float* out = z.data_ptr<float>();
  at::parallel_for(0, s.n * s.ho, 1, [&](int64_t begin, int64_t end) {
    for (int64_t nho = begin; nho < end; ++nho) {
      const int64_t n = nho / s.ho, ho = nho % s.ho;
      for (int64_t wo = 0; wo < s.wo; ++wo) {
        float* dst = out + (nho * s.wo + wo) * cout;
        bool first = true;
        for (size_t t = 0; t < rects.size(); ++t) {
          const TapRect& r = rects[t];
          if (!r.covers(ho, wo)) continue;
          const float* src = products[t].data_ptr<float>() + r.row(n, ho, wo) * cout;
          copy_or_add(dst, src, cout, first);
          first = false;
        }
        if (first) std::fill(dst, dst + cout, 0.0f);  // every tap reads padding here
      }
    }
  });
  return z;
}

// (dx [N*H*W, C] or undefined, dweight [Cout, K] in (tap, channel) columns or undefined) tap by
// tap. Each tap's weight gradient is the rows of dz it covers^T @ the rows of x it reads,
// written into its block of columns (a tap that reads only padding has a zero block); its data
// gradient is those rows of dz @ its weight block, summed per input pixel over the taps that
// read it, in tap order.
std::pair<at::Tensor, at::Tensor> tap_split_backward(const at::Tensor& dz_rows,
                                                     const at::Tensor& x,
                                                     const at::Tensor& weight, const Shape& s,
                                                     bool need_dx, bool need_dweight) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const std::vector<TapRect> rects = tap_rects(s);
  const at::Tensor x_rows = rows_of(x), weight_rows = weight_matrix(weight, s);
  at::Tensor dweight_rows;
  if (need_dweight) {
    dweight_rows = static_cast<int64_t>(rects.size()) == s.kh * s.kw
                       ? at::empty({weight.size(0), s.k()}, x.options())
                       : at::zeros({weight.size(0), s.k()}, x.options());
  }
  std::vector<at::Tensor> products;
  for (const TapRect& r : rects) {
    const at::Tensor dz_tap = gather_rows(dz_rows, s.n, s.ho, s.wo, r.height(), r.width(),
                                          r.h_begin, 1, r.w_begin, 1);
    if (need_dweight) {
      at::Tensor block = dweight_rows.narrow(1, r.tap * s.c, s.c);
      at::mm_out(block, dz_tap.t(), tap_input_rows(x_rows, s, r));
    }
    if (need_dx) products.push_back(strided_product(dz_tap, tap_weight(weight_rows, s, r)));
  }
  if (!need_dx) return {at::Tensor(), dweight_rows};
  at::Tensor dx_rows = at::empty({s.n * s.h * s.w, s.c}, dz_rows.options());
  float* out = dx_rows.data_ptr<float>();
  at::parallel_for(0, s.n * s.h, 1, [&](int64_t begin, int64_t end) {
    for (int64_t nh = begin; nh < end; ++nh) {
      const int64_t n = nh / s.h, h = nh % s.h;
      for (int64_t w = 0; w < s.w; ++w) {
        float* dst = out + (nh * s.w + w) * s.c;
        bool first = true;
        for (size_t t = 0; t < rects.size(); ++t) {
          const TapRect& r = rects[t];
          const int64_t th = h + s.ph - r.i * s.dh, tw = w + s.pw - r.j * s.dw;
          if (th < 0 || tw < 0 || th % s.sh != 0 || tw % s.sw != 0) continue;
          const int64_t ho = th / s.sh, wo = tw / s.sw;
          if (!r.covers(ho, wo)) continue;
          const float* src = products[t].data_ptr<float>() + r.row(n, ho, wo) * s.c;
          copy_or_add(dst, src, s.c, first);
          first = false;
        }
        if (first) std::fill(dst, dst + s.c, 0.0f);  // no tap reads this pixel (stride > kernel)
      }
    }
  });
  return {dx_rows, dweight_rows};
}

at::Tensor columns(const at::Tensor& x, const Shape& s) {
  if (is_pointwise(s)) return rows_of(x);
  at::Tensor cols = at::empty({s.m(), s.k()}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "fusedres_im2col", [&] {
    im2col(x.data_ptr<scalar_t>(), cols.data_ptr<scalar_t>(), s);
  });
  return cols;
}

// [N, C, H, W] with channels_last strides over an NHWC buffer.
at::Tensor nchw_view(const at::Tensor& nhwc_rows, int64_t n, int64_t h, int64_t w) {
  return nhwc_rows.view({n, h, w, nhwc_rows.size(1)}).permute({0, 3, 1, 2});
}

}  // namespace

void set_gemm_conv_enabled(bool enabled) { enabled_flag().store(enabled); }

bool gemm_conv_enabled() { return enabled_flag().load(); }

void set_gemm_conv_float32_amx_rule(bool amx_rule) { float32_amx_rule_flag().store(amx_rule); }

bool gemm_conv_float32_amx_rule() { return float32_amx_rule_flag().load(); }

void set_gemm_conv_bfloat16(bool enabled) { bfloat16_flag().store(enabled); }

bool gemm_conv_bfloat16() { return bfloat16_flag().load(); }

bool gemm_conv_applies(const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride,
                       at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  if (!gemm_conv_enabled() || groups != 1 || !x.device().is_cpu()) return false;
  const auto dtype = x.scalar_type();
  if ((dtype != at::kFloat && dtype != at::kBFloat16) || weight.scalar_type() != dtype) return false;
  // Without oneDNN's bfloat16 (an AVX2 CPU: AMD EPYC Zen 3) at::mm runs bfloat16 in ATen's
  // generic loops: there resnet18's bfloat16 training step took 4.3-4.7 s on this path against
  // 2.9-3.0 s on ATen's convolution (eager's 2.9 s; single runs of 4 steps).
  if (dtype == at::kBFloat16 && !gemm_conv_bfloat16()) return false;
  const Shape s = shape_of(x, weight, stride, padding, dilation);
  // A dense one-pixel map (fusedres.backend.one_pixel_map) is channels_last memory too: the late
  // stages of small images (layer4 at 32x32) would otherwise reorder their weights every call.
  const bool one_pixel_map = s.h == 1 && s.w == 1 && s.ho == 1 && s.wo == 1 && x.is_contiguous();
  if (checks::unit_memory_format(x) != c10::MemoryFormat::ChannelsLast && !one_pixel_map) {
    return false;
  }
  if (dtype == at::kFloat && !gemm_conv_float32_amx_rule()) {
    // Measured on a 2-core AMD EPYC (Zen 4, no AMX), training units of ResNet-50 at batch 8,
    // 112x112: oneDNN's float32 convolution beat the GEMM in layers 1-2 (1x1s 0.85-0.98x) and on
    // layer3's 3x3 (0.82x); the GEMM won in layer4, where N*Ho*Wo <= Cout/4 (1.0-1.6x), and on
    // the unpadded 1x1s with at most half their larger channel count of rows (layer3's, 392
    // rows at 7x7: forward and backward together 1.12-1.30x with cold caches; the whole
    // float32 training step 1.022x [1.014, 1.027] as fast, 80 rounds alternating with the
    // build without it). With 1568 rows they lost or drew (1024 channels at 14x14: 0.89-1.03x
    // per convolution; layer2's 512 at 14x14 in the whole step: 1.002x [0.990, 1.009]). Its
    // bfloat16 follows the rule below (layers 3-4 1.2-2.5x, layers 1-2 0.92-1.08x).
    if (s.kh == 1 && s.kw == 1 && s.ph == 0 && s.pw == 0 &&
        2 * s.m() <= std::max(s.c, weight.size(0))) {
      return true;
    }
    return 4 * s.m() <= weight.size(0);
  }
  if (s.kh == 1 && s.kw == 1 && s.ph == 0 && s.pw == 0) return true;
  // Measured on a 2-core Xeon (AMX) in bfloat16 and float32: a 3x3 wins from N*Ho*Wo ~ 1.5*Cout
  // down (512 channels at 4x4 to 7x7: 2-4x) and loses from ~12*Cout up (128 at 14x14).
  return s.m() <= 2 * weight.size(0);
}

at::Tensor gemm_conv_forward(const at::Tensor& x, const at::Tensor& weight,
                             at::IntArrayRef stride, at::IntArrayRef padding,
                             at::IntArrayRef dilation) {
  const Shape s = shape_of(x, weight, stride, padding, dilation);
  const at::Tensor z = splits_by_tap(s, x.scalar_type())
                           ? tap_split_forward(x, weight, s)
                           : matrix_product(columns(x, s), weight_matrix(weight, s).t());
  return nchw_view(z, s.n, s.ho, s.wo);
}

at::Tensor im2col_rows(const at::Tensor& x, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                       at::IntArrayRef padding, at::IntArrayRef dilation) {
  TORCH_CHECK(x.dim() == 4 && x.device().is_cpu() &&
                  (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "im2col_rows: x must be a 4-D float32 or bfloat16 CPU tensor, got ", x.sizes(), " ",
              x.scalar_type(), " on ", x.device());
  TORCH_CHECK(x.is_contiguous(c10::MemoryFormat::ChannelsLast),
              "im2col_rows: x must be dense channels_last, got strides ", x.strides());
  TORCH_CHECK(kernel_size.size() == 2 && stride.size() == 2 && padding.size() == 2 &&
                  dilation.size() == 2,
              "im2col_rows: kernel_size, stride, padding and dilation must be pairs");
  Shape s{x.size(0), x.size(1), x.size(2), x.size(3), kernel_size[0], kernel_size[1], 0, 0,
          stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
          /*channels_inner=*/true};
  s.ho = (s.h + 2 * s.ph - s.dh * (s.kh - 1) - 1) / s.sh + 1;
  s.wo = (s.w + 2 * s.pw - s.dw * (s.kw - 1) - 1) / s.sw + 1;
  TORCH_CHECK(s.ho > 0 && s.wo > 0, "im2col_rows: empty output map for x of size ", x.sizes());
  return columns(x, s);
}

std::tuple<at::Tensor, at::Tensor> gemm_conv_backward(const at::Tensor& dz, const at::Tensor& x,
                                                      const at::Tensor& weight,
                                                      at::IntArrayRef stride,
                                                      at::IntArrayRef padding,
                                                      at::IntArrayRef dilation, bool need_dx,
                                                      bool need_dweight) {
  const Shape s = shape_of(x, weight, stride, padding, dilation);
  const at::Tensor dz_rows = rows_of(dz.contiguous(c10::MemoryFormat::ChannelsLast));
  at::Tensor dx, dweight_rows;
  const bool by_tap = splits_by_tap(s, x.scalar_type());
  if (by_tap) {
    std::tie(dx, dweight_rows) = tap_split_backward(dz_rows, x, weight, s, need_dx, need_dweight);
    if (need_dx) dx = nchw_view(dx, s.n, s.h, s.w);
  } else if (need_dweight) {
    dweight_rows = matrix_product(dz_rows.t(), columns(x, s));
  }
  // dW in the weight's layout (the unit ops return it so, csrc/unit_ops.cpp): the columns in
  // the weight's order give it without a copy.
  at::Tensor dweight;
  if (need_dweight) {
    dweight = s.channels_inner
                  ? dweight_rows.view({weight.size(0), s.kh, s.kw, s.c}).permute({0, 3, 1, 2})
                  : dweight_rows.view({weight.size(0), s.c, s.kh, s.kw});
  }
  if (!by_tap && need_dx) {
    const at::Tensor dcols = matrix_product(dz_rows, weight_matrix(weight, s));
    if (is_pointwise(s)) {
      dx = nchw_view(dcols, s.n, s.h, s.w);
    } else {
      dx = at::empty({s.n, s.c, s.h, s.w}, x.options().memory_format(c10::MemoryFormat::ChannelsLast));
      AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "fusedres_col2im", [&] {
        col2im(dcols.data_ptr<scalar_t>(), dx.data_ptr<scalar_t>(), s);
      });
    }
  }
  return {dx, dweight};
}

}  // namespace cpu
}  // namespace fusedres
