// 2-D convolutions (dense and grouped/depthwise) on CPU through oneDNN, as
// XLA FFI handlers: forward, input gradient and kernel gradient, and a
// forward with a per-channel bias and optional SiLU applied as the output is
// written (an eval-mode BatchNorm folded into kernel and bias; one pass over
// the activations instead of two).
//
// Layouts are the model's own, NHWC activations and HWIO kernels (grouped:
// [kh, kw, in/groups, out], XLA's feature_group_count convention), so the
// custom call takes and returns XLA's buffers as they are. Activations stay
// in plain NHWC, as PyTorch's channels_last does with oneDNN; only the
// kernel, which is small, is reordered into the layout the primitive asks for.
//
// Built on first use by effnetv2_jax/kernels/onednn.py against the oneDNN
// (>= 3.0) headers and jaxlib's FFI headers.

#include <cstdint>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

#if DNNL_VERSION_MAJOR < 3
#error "effnetv2_jax needs oneDNN >= 3.0 (the v3 primitive descriptor API)"
#endif

namespace ffi = xla::ffi;

// OpenMP's, resolved through libdnnl's own libgomp: declared here rather
// than through omp.h so that no compiler flag can bind another runtime.
extern "C" {
void omp_set_num_threads(int num_threads);
int omp_get_max_threads(void);
}

namespace {

using dnnl::memory;
using Tag = dnnl::memory::format_tag;
using F32 = ffi::Buffer<ffi::F32, 4>;
using F32Result = ffi::ResultBuffer<ffi::F32, 4>;
using F32Vector = ffi::Buffer<ffi::F32, 1>;

enum class Pass : char {
  kForward = 'f',
  kInputGrad = 'd',
  kKernelGrad = 'w',
  kForwardBias = 'b',      // + bias
  kForwardBiasSilu = 's',  // + bias, then SiLU
};

// One convolution's shape. Plain integers, so its bytes are its cache key.
struct Geometry {
  int64_t batch, in_h, in_w, in_c;
  int64_t kernel_h, kernel_w, out_c;
  int64_t out_h, out_w;
  int64_t stride_h, stride_w;
  int64_t pad_top, pad_left, pad_bottom, pad_right;
  int64_t groups;

  // Multiply-adds of the convolution (each pass does as many).
  int64_t Macs() const {
    return batch * out_h * out_w * kernel_h * kernel_w * (in_c / groups) *
           out_c;
  }

  std::string Key(Pass pass) const {
    std::string key(reinterpret_cast<const char*>(this), sizeof(*this));
    key.push_back(static_cast<char>(pass));
    return key;
  }
};

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

memory::desc Activations(int64_t n, int64_t c, int64_t h, int64_t w) {
  return memory::desc({n, c, h, w}, memory::data_type::f32, Tag::nhwc);
}
memory::desc Input(const Geometry& g) {
  return Activations(g.batch, g.in_c, g.in_h, g.in_w);
}
memory::desc Output(const Geometry& g) {
  return Activations(g.batch, g.out_c, g.out_h, g.out_w);
}
// The kernel as XLA holds it (tag = hwio / hwigo), or in whatever layout the
// primitive prefers (tag = any).
memory::desc Kernel(const Geometry& g, bool as_stored) {
  if (g.groups == 1) {
    return memory::desc({g.out_c, g.in_c, g.kernel_h, g.kernel_w},
                        memory::data_type::f32,
                        as_stored ? Tag::hwio : Tag::any);
  }
  return memory::desc({g.groups, g.out_c / g.groups, g.in_c / g.groups,
                       g.kernel_h, g.kernel_w},
                      memory::data_type::f32,
                      as_stored ? Tag::hwigo : Tag::any);
}

memory::desc Bias(const Geometry& g) {
  return memory::desc({g.out_c}, memory::data_type::f32, Tag::x);
}

struct Plan {
  dnnl::primitive primitive;
  memory::desc kernel;  // the layout `primitive` reads or writes
  bool reorder_kernel = false;
  dnnl::reorder kernel_in;   // stored -> primitive (forward, input gradient)
  dnnl::reorder kernel_out;  // primitive -> stored (kernel gradient)
  size_t scratchpad_bytes = 0;
};

// `kernel`: the kernel layout the primitive reads or writes.
template <typename Primitive, typename PrimitiveDesc>
void Use(const PrimitiveDesc& pd, const memory::desc& kernel, Plan* plan) {
  plan->primitive = Primitive(pd);
  plan->kernel = kernel;
  plan->scratchpad_bytes = pd.scratchpad_desc().get_size();
}

std::unique_ptr<Plan> MakePlan(const Geometry& g, Pass pass) {
  dnnl::primitive_attr attr;
  // Each call brings its own scratchpad: XLA may run two instances of the
  // same convolution at once, and a primitive-owned one would be shared.
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  const memory::dims strides = {g.stride_h, g.stride_w};
  const memory::dims pad_before = {g.pad_top, g.pad_left};
  const memory::dims pad_after = {g.pad_bottom, g.pad_right};
  // The backward passes need the forward descriptor as a hint.
  dnnl::convolution_forward::primitive_desc forward(
      Engine(), dnnl::prop_kind::forward_training,
      dnnl::algorithm::convolution_direct, Input(g), Kernel(g, false),
      Output(g), strides, pad_before, pad_after, attr);
  auto plan = std::make_unique<Plan>();
  if (pass == Pass::kForward) {
    Use<dnnl::convolution_forward>(forward, forward.weights_desc(),
                                   plan.get());
  } else if (pass == Pass::kForwardBias || pass == Pass::kForwardBiasSilu) {
    dnnl::primitive_attr fused_attr = attr;
    if (pass == Pass::kForwardBiasSilu) {
      dnnl::post_ops post_ops;
      post_ops.append_eltwise(dnnl::algorithm::eltwise_swish, 1.f, 0.f);
      fused_attr.set_post_ops(post_ops);
    }
    dnnl::convolution_forward::primitive_desc pd(
        Engine(), dnnl::prop_kind::forward_inference,
        dnnl::algorithm::convolution_direct, Input(g), Kernel(g, false),
        Bias(g), Output(g), strides, pad_before, pad_after, fused_attr);
    Use<dnnl::convolution_forward>(pd, pd.weights_desc(), plan.get());
  } else if (pass == Pass::kInputGrad) {
    dnnl::convolution_backward_data::primitive_desc pd(
        Engine(), dnnl::algorithm::convolution_direct, Input(g),
        Kernel(g, false), Output(g), strides, pad_before, pad_after, forward,
        attr);
    Use<dnnl::convolution_backward_data>(pd, pd.weights_desc(), plan.get());
  } else {
    dnnl::convolution_backward_weights::primitive_desc pd(
        Engine(), dnnl::algorithm::convolution_direct, Input(g),
        Kernel(g, false), Output(g), strides, pad_before, pad_after, forward,
        attr);
    Use<dnnl::convolution_backward_weights>(pd, pd.diff_weights_desc(),
                                            plan.get());
  }
  const memory::desc stored = Kernel(g, true);
  plan->reorder_kernel = plan->kernel != stored;
  if (plan->reorder_kernel) {
    if (pass == Pass::kKernelGrad) {
      plan->kernel_out = dnnl::reorder(dnnl::reorder::primitive_desc(
          Engine(), plan->kernel, Engine(), stored));
    } else {
      plan->kernel_in = dnnl::reorder(dnnl::reorder::primitive_desc(
          Engine(), stored, Engine(), plan->kernel));
    }
  }
  return plan;
}

// Creating a primitive JIT-compiles its kernels: once per shape and pass.
const Plan& CachedPlan(const Geometry& g, Pass pass) {
  static std::mutex mutex;
  static auto* plans = new std::unordered_map<std::string, std::unique_ptr<Plan>>;
  const std::string key = g.Key(pass);
  std::lock_guard<std::mutex> lock(mutex);
  auto it = plans->find(key);
  if (it == plans->end()) it = plans->emplace(key, MakePlan(g, pass)).first;
  return *it->second;
}

ffi::Error Invalid(const std::string& what) {
  return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                    "effnetv2_jax oneDNN convolution: " + what);
}

// input [N, H, W, C], kernel [KH, KW, C / groups, O], output [N, OH, OW, O].
ffi::Error MakeGeometry(ffi::Span<const int64_t> in, ffi::Span<const int64_t> k,
                        ffi::Span<const int64_t> out, int64_t stride_h,
                        int64_t stride_w, int64_t pad_top, int64_t pad_left,
                        int64_t pad_bottom, int64_t pad_right, int64_t groups,
                        Geometry* g) {
  *g = Geometry{in[0], in[1], in[2], in[3], k[0], k[1], k[3], out[1], out[2],
                stride_h, stride_w, pad_top, pad_left, pad_bottom, pad_right,
                groups};
  if (groups < 1 || g->in_c % groups != 0 || g->out_c % groups != 0 ||
      k[2] * groups != g->in_c) {
    return Invalid("kernel input channels x groups must equal the input's "
                   "channels, and both channel counts must divide by groups");
  }
  if (out[0] != in[0] || stride_h < 1 || stride_w < 1 ||
      (g->in_h + pad_top + pad_bottom - g->kernel_h) / stride_h + 1 != g->out_h ||
      (g->in_w + pad_left + pad_right - g->kernel_w) / stride_w + 1 != g->out_w) {
    return Invalid("output shape does not follow from input, kernel, "
                   "strides and padding");
  }
  return ffi::Error::Success();
}

size_t RoundUp(size_t bytes) { return (bytes + 63) / 64 * 64; }

// Working memory for one call (the reordered kernel, oneDNN's scratchpad),
// per XLA thread, grown to its largest call and kept. Allocating it per call
// split the heap around XLA's step buffer (1.8 GB for S at 224 px), which
// then came back from the kernel page by page: one train step in ~25 took
// 3-4 s instead of 1, with 370,000 page faults.
uint8_t* ThreadWorkspace(size_t bytes) {
  thread_local std::unique_ptr<uint8_t[]> buffer;
  thread_local size_t capacity = 0;
  if (bytes > capacity) {
    buffer.reset(new uint8_t[bytes + 64]);
    capacity = bytes;
  }
  const auto address = reinterpret_cast<uintptr_t>(buffer.get());
  return reinterpret_cast<uint8_t*>(RoundUp(address));
}

// oneDNN's OpenMP threads are not XLA's: XLA may run other operations on its
// own threads meanwhile, and a team that cannot get every core waits at its
// barriers, which costs a small call many times its work. Below this much
// work one thread does it without a team.
int64_t SerialMacs() {
  static const int64_t value = [] {
    const char* env = std::getenv("EFFNETV2_ONEDNN_SERIAL_MACS");
    return env ? std::atoll(env) : int64_t{16} << 20;
  }();
  return value;
}

int Threads(const Geometry& g) {
  static const int all = omp_get_max_threads();
  return g.Macs() < SerialMacs() ? 1 : all;
}

// `input`, `kernel` and `output` are the operands of the forward
// convolution; each pass reads two of them and writes the third. `bias`
// only for the fused forward passes.
ffi::Error Execute(const Geometry& g, Pass pass, void* input, void* kernel,
                   void* output, void* bias = nullptr) {
  try {
    // Per call, as XLA calls from any of its threads and this is a thread's
    // setting; before the plan too, whose primitive is partitioned for the
    // thread count it is created with.
    omp_set_num_threads(Threads(g));
    const Plan& plan = CachedPlan(g, pass);
    dnnl::stream stream(Engine());
    const size_t kernel_bytes =
        plan.reorder_kernel ? RoundUp(plan.kernel.get_size()) : 0;
    uint8_t* workspace =
        ThreadWorkspace(kernel_bytes + RoundUp(plan.scratchpad_bytes));
    memory stored_kernel(Kernel(g, true), Engine(), kernel);
    memory plan_kernel = stored_kernel;
    if (plan.reorder_kernel) {
      plan_kernel = memory(plan.kernel, Engine(), workspace);
      if (pass != Pass::kKernelGrad) {
        plan.kernel_in.execute(stream, stored_kernel, plan_kernel);
      }
    }
    memory scratchpad(
        memory::desc({static_cast<int64_t>(plan.scratchpad_bytes)},
                     memory::data_type::u8, Tag::x),
        Engine(), workspace + kernel_bytes);
    memory in(Input(g), Engine(), input);
    memory out(Output(g), Engine(), output);
    if (pass == Pass::kForward) {
      plan.primitive.execute(stream, {{DNNL_ARG_SRC, in},
                                      {DNNL_ARG_WEIGHTS, plan_kernel},
                                      {DNNL_ARG_DST, out},
                                      {DNNL_ARG_SCRATCHPAD, scratchpad}});
    } else if (pass == Pass::kForwardBias || pass == Pass::kForwardBiasSilu) {
      memory bias_memory(Bias(g), Engine(), bias);
      plan.primitive.execute(stream, {{DNNL_ARG_SRC, in},
                                      {DNNL_ARG_WEIGHTS, plan_kernel},
                                      {DNNL_ARG_BIAS, bias_memory},
                                      {DNNL_ARG_DST, out},
                                      {DNNL_ARG_SCRATCHPAD, scratchpad}});
    } else if (pass == Pass::kInputGrad) {
      plan.primitive.execute(stream, {{DNNL_ARG_DIFF_SRC, in},
                                      {DNNL_ARG_WEIGHTS, plan_kernel},
                                      {DNNL_ARG_DIFF_DST, out},
                                      {DNNL_ARG_SCRATCHPAD, scratchpad}});
    } else {
      plan.primitive.execute(stream, {{DNNL_ARG_SRC, in},
                                      {DNNL_ARG_DIFF_WEIGHTS, plan_kernel},
                                      {DNNL_ARG_DIFF_DST, out},
                                      {DNNL_ARG_SCRATCHPAD, scratchpad}});
      if (plan.reorder_kernel) {
        plan.kernel_out.execute(stream, plan_kernel, stored_kernel);
      }
    }
    stream.wait();
  } catch (const dnnl::error& e) {
    return ffi::Error(ffi::ErrorCode::kInternal,
                      std::string("effnetv2_jax oneDNN convolution: ") + e.what());
  }
  return ffi::Error::Success();
}

ffi::Error Forward(F32 x, F32 kernel, F32Result y, int64_t stride_h,
                   int64_t stride_w, int64_t pad_top, int64_t pad_left,
                   int64_t pad_bottom, int64_t pad_right, int64_t groups) {
  Geometry g;
  ffi::Error error = MakeGeometry(x.dimensions(), kernel.dimensions(),
                                  y->dimensions(), stride_h, stride_w, pad_top,
                                  pad_left, pad_bottom, pad_right, groups, &g);
  if (error.failure()) return error;
  return Execute(g, Pass::kForward, x.typed_data(), kernel.typed_data(),
                 y->typed_data());
}

ffi::Error ForwardBias(F32 x, F32 kernel, F32Vector bias,
                       F32Result y, int64_t stride_h, int64_t stride_w,
                       int64_t pad_top, int64_t pad_left, int64_t pad_bottom,
                       int64_t pad_right, int64_t groups, int64_t silu) {
  Geometry g;
  ffi::Error error = MakeGeometry(x.dimensions(), kernel.dimensions(),
                                  y->dimensions(), stride_h, stride_w, pad_top,
                                  pad_left, pad_bottom, pad_right, groups, &g);
  if (error.failure()) return error;
  if (bias.dimensions()[0] != g.out_c) {
    return Invalid("bias length must equal the output channels");
  }
  return Execute(g, silu ? Pass::kForwardBiasSilu : Pass::kForwardBias,
                 x.typed_data(), kernel.typed_data(), y->typed_data(),
                 bias.typed_data());
}

ffi::Error InputGrad(F32 dy, F32 kernel, F32Result dx, int64_t stride_h,
                     int64_t stride_w, int64_t pad_top, int64_t pad_left,
                     int64_t pad_bottom, int64_t pad_right, int64_t groups) {
  Geometry g;
  ffi::Error error = MakeGeometry(dx->dimensions(), kernel.dimensions(),
                                  dy.dimensions(), stride_h, stride_w, pad_top,
                                  pad_left, pad_bottom, pad_right, groups, &g);
  if (error.failure()) return error;
  return Execute(g, Pass::kInputGrad, dx->typed_data(), kernel.typed_data(),
                 dy.typed_data());
}

ffi::Error KernelGrad(F32 x, F32 dy, F32Result dkernel, int64_t stride_h,
                      int64_t stride_w, int64_t pad_top, int64_t pad_left,
                      int64_t pad_bottom, int64_t pad_right, int64_t groups) {
  Geometry g;
  ffi::Error error = MakeGeometry(x.dimensions(), dkernel->dimensions(),
                                  dy.dimensions(), stride_h, stride_w, pad_top,
                                  pad_left, pad_bottom, pad_right, groups, &g);
  if (error.failure()) return error;
  return Execute(g, Pass::kKernelGrad, x.typed_data(), dkernel->typed_data(),
                 dy.typed_data());
}

}  // namespace

#define EFFNETV2_CONV_ATTRIBUTES                                    \
      .Attr<int64_t>("stride_h")                                    \
      .Attr<int64_t>("stride_w")                                    \
      .Attr<int64_t>("pad_top")                                     \
      .Attr<int64_t>("pad_left")                                    \
      .Attr<int64_t>("pad_bottom")                                  \
      .Attr<int64_t>("pad_right")                                   \
      .Attr<int64_t>("groups")

#define EFFNETV2_CONV_BINDING \
  ffi::Ffi::Bind().Arg<F32>().Arg<F32>().Ret<F32>() EFFNETV2_CONV_ATTRIBUTES

XLA_FFI_DEFINE_HANDLER_SYMBOL(Effnetv2ConvForward, Forward,
                              EFFNETV2_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(Effnetv2ConvForwardBias, ForwardBias,
                              ffi::Ffi::Bind()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<F32Vector>()
                                  .Ret<F32>() EFFNETV2_CONV_ATTRIBUTES
                                  .Attr<int64_t>("silu"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(Effnetv2ConvInputGrad, InputGrad,
                              EFFNETV2_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(Effnetv2ConvKernelGrad, KernelGrad,
                              EFFNETV2_CONV_BINDING);
