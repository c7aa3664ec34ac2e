"""The ``cpu`` and ``cuda`` backends: the C++ unit ops of fusedres._C, ``torch.ops.fusedres.*``.

Both call the same torch.library ops (csrc/fusedres.cpp); the dispatcher picks the CPU
implementation (csrc/cpu kernels, oneDNN convolutions) or the CUDA one (csrc/cuda kernels, cuDNN
convolutions in channels_last, y back in the caller's layout) from the tensors' device. A unit's
phase is one op call: convolution, BatchNorm and the running-statistics update run in C++, and
autograd is registered on the op in C++.

Inference (no gradient wanted) folds BatchNorm into the convolution (fusedres.ops.fold) and
runs one fused convolution: oneDNN's convolution with bias, binary-add and ReLU post-ops on the
CPU (``torch.ops.mkldnn._convolution_pointwise``, the kernels inductor's CPU freezing path uses),
cuDNN's convolution + bias (+ add) + ReLU on CUDA (``torch.cudnn_convolution_relu`` /
``cudnn_convolution_add_relu``, what torch.fx's inference fusion uses). On the CPU, small output
maps (layer4) run as oneDNN's prepacked linear over the input's im2col rows instead, with the
same post-ops (docs/design.md section 4).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from fusedres import _ext
from fusedres.backend import (Backend, BlockOps, ConvParams, conv_output_hw, in_memory_format_of,
                              memory_format_of, one_pixel_map, register_backend)
from fusedres.ops import fold, unit_schema


class ExtensionBackend(Backend):
    def __init__(self, name: str, device_type: str):
        self.name = name
        self.device_types = (device_type,)
        self._block_ops: Optional[BlockOps] = None

    def availability(self):
        if not _ext.extension_loaded():
            return False, _ext.EXTENSION_ERROR
        if not hasattr(torch.ops.fusedres, "unit_train"):
            return False, "fusedres._C predates the unit ops; rebuild it"
        if self.device_types == ("cuda",):
            if not _ext.cuda_kernels_built():
                return False, "fusedres._C was built without the CUDA kernels"
            if not torch.cuda.is_available():
                return False, "CUDA kernels are built but torch sees no CUDA device"
        return True, "fusedres._C loaded"

    def unit_train(self, x, weight, gamma, beta, residual, running_mean, running_var,
                   num_batches_tracked, conv: ConvParams, relu, momentum, eps):
        return torch.ops.fusedres.unit_train.default(
            x, weight, gamma, beta, residual, running_mean, running_var, num_batches_tracked,
            conv.stride, conv.padding, conv.dilation, conv.groups, relu, momentum, eps)[0]

    def unit_eval(self, x, weight, gamma, beta, residual, running_mean, running_var,
                  conv: ConvParams, relu, eps):
        return torch.ops.fusedres.unit_eval.default(
            x, weight, gamma, beta, residual, running_mean, running_var, conv.stride,
            conv.padding, conv.dilation, conv.groups, relu, eps)

    def block_ops(self) -> BlockOps:
        # Made once: each block's forward and backward asks, and the lookups cost microseconds.
        if self._block_ops is None:
            ops = torch.ops.fusedres
            self._block_ops = BlockOps(ops.unit_train.default, ops.unit_backward.default,
                                       ops.bn_act_fwd.default, _convolution,
                                       block_backward=ops.block_backward.default)
        return self._block_ops


def _convolution(x, weight, stride, padding, dilation, groups):
    """The unit ops' convolution (csrc/unit_ops.cpp): the cpu backend's GEMM path where it
    applies (csrc/cpu/gemm_conv.h), else ATen's, in channels_last on CUDA."""
    stride, padding, dilation = list(stride), list(padding), list(dilation)
    if _ext._C.cpu_gemm_conv_applies(x, weight, stride, padding, dilation, groups):
        return _ext._C.cpu_gemm_conv_forward(x, weight, stride, padding, dilation)
    return torch.ops.aten.convolution.default(
        unit_schema.ATEN_LAYOUT.conv_input(x), weight, None, stride, padding, dilation, False,
        [0, 0], groups)


class CpuBackend(ExtensionBackend):
    """The ``cpu`` backend; inference through oneDNN's fused convolution where it takes the dtype."""

    def __init__(self):
        super().__init__("cpu", "cpu")

    @staticmethod
    def _onednn_takes(dtype: torch.dtype) -> bool:
        # The runners call torch.ops.mkldnn directly, past ATen's check of the user's switch
        # (torch.backends.mkldnn.flags(enabled=False)): read it here, when a plan is built.
        if not torch.backends.mkldnn.enabled:
            return False
        if dtype == torch.float32:
            return torch.backends.mkldnn.is_available()
        if dtype == torch.bfloat16:
            return torch.ops.mkldnn._is_mkldnn_bf16_supported()
        if dtype == torch.float16:
            return torch.ops.mkldnn._is_mkldnn_fp16_supported()
        return False

    def unit_infer(self, conv_module, x, weight, gamma, beta, residual, running_mean,
                   running_var, conv: ConvParams, relu, eps):
        return self.infer_runner(conv_module, x, weight, gamma, beta, residual, running_mean,
                                 running_var, conv, relu, eps)(x, residual, False)

    def infer_runner(self, conv_module, x, weight, gamma, beta, residual, running_mean,
                     running_var, conv: ConvParams, relu, eps):
        if _convolves_in_float32(x.dtype) and self._onednn_takes(torch.float32):
            return self._float32_runner(conv_module, x, weight, gamma, beta, residual,
                                        running_mean, running_var, conv, relu, eps)
        # A one-pixel map is channels_last memory too: without it, the late stages of small
        # images (32x32) fell back to the unfolded op, the residual add not taken.
        channels_last = (memory_format_of(x) == torch.channels_last
                         or one_pixel_map(x, weight, conv))
        if (not self._onednn_takes(x.dtype)
                or (residual is not None and not (channels_last and conv.groups == 1))
                or not fold.folds_finite(conv_module, weight, gamma, beta, running_mean,
                                          running_var, eps)):
            # ATen hands oneDNN the residual add only for ungrouped channels_last convolutions;
            # otherwise it falls back to a convolution and a separate add_relu pass (which
            # rejects bfloat16), where the unfolded convolution with one fused BN + add + ReLU
            # pass is as good. A unit whose fold is not finite (a diverged checkpoint) takes it
            # too: its pass keeps NaN through the ReLU as eager does, oneDNN's post-op does not.
            return lambda x, residual, residual_is_dead: super(CpuBackend, self).unit_infer(
                conv_module, x, weight, gamma, beta, residual, running_mean, running_var, conv,
                relu, eps)
        stride, padding, dilation, groups = fold.geometry_lists(conv)
        dtype, shape = x.dtype, list(x.shape)
        if channels_last and _convolves_as_matmul(x, weight, conv):
            return _matmul_runner(conv_module, x, weight, gamma, beta, running_mean, running_var,
                                  conv, relu, eps)
        if channels_last and _convolves_by_winograd(x, weight, conv):
            return _winograd_runner(conv_module, x, weight, gamma, beta, running_mean,
                                    running_var, dilation, relu, eps)

        def prepare(w, b):
            # channels_last convolutions take the weights prepacked in oneDNN's blocked layout,
            # so no call reorders them again (eager reorders every weight on every call). oneDNN
            # chooses the layout for this input size, and a convolution given weights prepacked
            # for another size runs, but may reorder them on every call: hence the size in the
            # cache key.
            if channels_last:
                w = torch.ops.mkldnn._reorder_convolution_weight(w, padding, stride, dilation,
                                                                 groups, shape)
            return fold.FoldedConv(w, b.to(dtype))

        # The runner lives in a plan whose key holds every folded tensor's version
        # (fusedres.ops.unit.unit_state_key), so the fold made here stays valid for its life.
        flavor = ("onednn-prepacked", tuple(shape)) if channels_last else "onednn"
        f = fold.fold_conv_bn(conv_module, weight, gamma, beta, running_mean, running_var, eps,
                              dtype, flavor, prepare)
        pointwise = torch.ops.mkldnn._convolution_pointwise
        if residual is None:
            unary = "relu" if relu else "none"

            def run(x, residual, residual_is_dead):
                return pointwise.default(x, f.weight, f.bias, padding, stride, dilation, groups,
                                         unary, [], "")
            return run
        unary = "relu" if relu else None
        sum_into = torch.ops.mkldnn._convolution_pointwise_.binary
        one_pixel_output = conv_output_hw(x.shape[2:], weight.shape[2:], conv.stride,
                                          conv.padding, conv.dilation) == (1, 1)

        def run_add(x, residual, residual_is_dead):
            residual = residual.contiguous(memory_format=torch.channels_last)
            if one_pixel_output and not residual_is_dead:
                # torch 2.11's out-of-place form refuses a one-pixel residual beside prepacked
                # weights ("could not create a memory"); its sum post-op takes it. The copy is
                # N * Cout values.
                residual, residual_is_dead = residual.clone(), True
            if residual_is_dead:
                # oneDNN's sum post-op: y accumulates into the residual's memory.
                return sum_into(residual, x, f.weight, f.bias, padding, stride, dilation, groups,
                                "add", 1.0, unary, [], "")
            return pointwise.binary(x, residual, f.weight, f.bias, padding, stride, dilation,
                                    groups, "add", None, unary, [], "")
        return run_add

    def _float32_runner(self, conv_module, x, weight, gamma, beta, residual, running_mean,
                        running_var, conv: ConvParams, relu, eps):
        """A bfloat16 or float16 unit where this CPU's oneDNN has no kernels for the dtype
        (csrc/cpu/conv_precision.h): the float32 runner of the same unit (folded, prepacked, its
        matrix product or Winograd path) on x and the residual widened, y rounded once back."""
        dtype = x.dtype

        def widened(t):
            return None if t is None else torch.empty_like(t, dtype=torch.float32)

        inner = self.infer_runner(conv_module, widened(x), weight, gamma, beta, widened(residual),
                                  running_mean, running_var, conv, relu, eps)

        def run(x, residual, residual_is_dead):
            # The widened residual is a copy of the caller's: the float32 runner may sum into it.
            return inner(x.float(), None if residual is None else residual.float(),
                         residual is not None).to(dtype)
        return run


def _convolves_in_float32(dtype: torch.dtype) -> bool:
    """Whether the cpu backend convolves ``dtype`` in float32 (csrc/cpu/conv_precision.h; set at
    load where this CPU's oneDNN runs no bfloat16 or float16)."""
    return (dtype in (torch.bfloat16, torch.float16)
            and _ext._C.cpu_conv_in_float32(dtype == torch.bfloat16))


# Output maps of at most this many pixels convolve faster as one matrix product over the input's
# columns (oneDNN's prepacked linear, with bias, ReLU or the residual add fused) than as oneDNN's
# prepacked convolution: 1.35-1.9x per convolution at batch 8 on a 2-core Xeon (AMX), bfloat16
# and float32 (ResNet's layer4 at 112x112: 4x4 maps, 512-2048 channels), about even at batch 1,
# in exploratory medians of 35 alternating calls that chose the rule (the README has the
# whole-model runs). An unpadded stride-1 1x1 needs no im2col (its columns are x) and wins up to
# 7x7; a 3x3 at 7x7 loses the gain to its im2col.
_MATMUL_MAX_PIXELS = 16
_MATMUL_MAX_PIXELS_POINTWISE = 49


# Whether the matrix product also takes the units whose columns repeat input pixels (a 3x3 at
# 4x4 reads most pixels nine times over). Where the CPU has AMX (the Xeon above) it wins there
# too. On a 2-core AMD EPYC (Zen 4: AVX512, no AMX) oneDNN's linear lost to its convolution on
# those, 0.75-0.93x per convolution (3x3s at 2x2 and 4x4, float32 and bfloat16), and won only
# where each input pixel lands in the columns once: 1x1s 1.03-2.1x, a 3x3 on a one-pixel map
# (its centre tap) 1.8x, a stride-2 3x3 into one pixel 2.0x (exploratory medians of 25-30
# alternating calls). Whole float32 models there against torch.compile in the same rounds: resnet18
# at 112x112 0.986x with this rule, 0.951x with the AMX one, 1.000x with no matrix products;
# resnet50 at 32x32 1.123x, 1.163x, 0.983x (README). Read when a plan is built.
_MATMUL_REPEATING_COLUMNS = _ext.CPU_HAS_AMX


# Whether maps of more than one pixel take the matrix product at all. On a 2-core AMD EPYC
# without AVX512 (Zen 3: AVX2 and FMA) oneDNN's linear lost to its convolution on every such map,
# 1x1s included: 0.87-1.02x per unit at batch 1 and 8 (resnet50's layer3 and layer4 1x1s at 2x2,
# 4x4 and 7x7, 4 to 392 rows), and on one-pixel maps with fewer than four rows (0.92-1.06x at
# batch 1 and 2); it won on one-pixel maps from four rows on (1.03-1.18x at batch 4, 1.07-1.39x
# at batch 8: layer4's 1x1s, and the centre tap of its 3x3s, at 32x32). Exploratory medians of
# 150 alternating calls of a fused unit in eval (docs/design.md section 4 has the whole models).
# So without AVX512 only one-pixel outputs of at least _MATMUL_MIN_ONE_PIXEL_ROWS rows take it.
# Read when a plan is built.
_MATMUL_MULTI_PIXEL_MAPS = _ext.CPU_HAS_AVX512
_MATMUL_MIN_ONE_PIXEL_ROWS = 4


def _convolves_as_matmul(x: torch.Tensor, weight: torch.Tensor, conv: ConvParams) -> bool:
    """Whether the cpu backend's inference convolves channels_last x [N, C, H, W] with weight
    [Cout, C/groups, kh, kw] as a matrix product (``_MATMUL_MAX_PIXELS``,
    ``_MATMUL_REPEATING_COLUMNS`` and ``_MATMUL_MULTI_PIXEL_MAPS``). Off with the training path's
    GEMM switch (``fusedres._ext._C.set_cpu_gemm_conv``), read when a plan is built."""
    if (conv.groups != 1 or x.dtype not in (torch.float32, torch.bfloat16)
            or not _ext._C.cpu_gemm_conv()):
        return False
    out_hw = conv_output_hw(x.shape[2:], weight.shape[2:], conv.stride, conv.padding,
                            conv.dilation)
    if not _MATMUL_MULTI_PIXEL_MAPS and (tuple(out_hw) != (1, 1)
                                         or x.shape[0] < _MATMUL_MIN_ONE_PIXEL_ROWS):
        return False
    pointwise = (tuple(weight.shape[2:]) == (1, 1) and tuple(conv.stride) == (1, 1)
                 and tuple(conv.padding) == (0, 0))
    if out_hw[0] * out_hw[1] > (_MATMUL_MAX_PIXELS_POINTWISE if pointwise
                                else _MATMUL_MAX_PIXELS):
        return False
    # Along each dimension one tap reading the input, or one output position: im2col copies
    # each input pixel at most once.
    return _MATMUL_REPEATING_COLUMNS or all(
        out == 1 or len(_taps_reading_input(x.shape[2 + d], weight.shape[2 + d], conv.stride[d],
                                            conv.padding[d], conv.dilation[d], out)[0]) == 1
        for d, out in enumerate(out_hw))


def _taps_reading_input(size: int, kernel: int, stride: int, padding: int, dilation: int,
                        out: int) -> tuple[range, int]:
    """The kernel taps along one dimension that read an input pixel for some output position,
    and the padding that keeps each output position's taps in place once the others are dropped.

    Taps that only ever read the zero padding contribute nothing: on a one-pixel map a 3x3 with
    padding 1 is its centre 1x1 (9x fewer columns). All taps when dropping any would move the
    output size or need a negative padding, or where no tap reads the input.
    """
    reading = [i for i in range(kernel) if any(0 <= o * stride - padding + i * dilation < size
                                               for o in range(out))]
    if not reading:  # every output position reads only padding: keep the geometry as it is
        return range(kernel), padding
    first, last = reading[0], reading[-1]
    cropped_padding = padding - first * dilation
    cropped_out = (size + 2 * cropped_padding - dilation * (last - first) - 1) // stride + 1
    if cropped_padding < 0 or cropped_out != out:
        return range(kernel), padding
    return range(first, last + 1), cropped_padding


def _matmul_runner(conv_module, x, weight, gamma, beta, running_mean, running_var,
                   conv: ConvParams, relu: bool, eps: float):
    """The inference runner that convolves as ``act(cols @ W^T + t (+ residual))``.

    cols [N*Ho*Wo, kh*kw*C] is x's im2col in (tap, channel) order (``_C.cpu_im2col_rows``, a
    view for an unpadded stride-1 1x1) over the taps that read the input for x's map size, W the
    folded weight as a [Cout, kh*kw*C] matrix of the same taps in the same order, prepacked once
    per parameter version for oneDNN's linear; the output rows are y's channels_last memory.
    """
    stride, padding, dilation, _ = fold.geometry_lists(conv)
    out_hw = conv_output_hw(x.shape[2:], weight.shape[2:], stride, padding, dilation)
    rows = x.shape[0] * math.prod(out_hw)
    taps, padding = zip(*(_taps_reading_input(x.shape[2 + d], weight.shape[2 + d], stride[d],
                                              padding[d], dilation[d], out_hw[d])
                          for d in range(2)))
    kernel_size, padding = [len(t) for t in taps], list(padding)

    def prepare(w, b):
        w = w[:, :, taps[0].start:taps[0].stop, taps[1].start:taps[1].stop]
        matrix = w.permute(0, 2, 3, 1).reshape(w.shape[0], -1)
        return fold.FoldedConv(torch.ops.mkldnn._reorder_linear_weight(matrix, rows), b.to(w.dtype))

    # The cache key names the taps kept (another map size may keep others) and the row count
    # oneDNN chose the layout for (as the convolution's, above).
    f = fold.fold_conv_bn(conv_module, weight, gamma, beta, running_mean, running_var, eps,
                          x.dtype, ("onednn-linear", taps, rows), prepare)
    linear = torch.ops.mkldnn._linear_pointwise
    unary = "relu" if relu else "none"

    # A plan's key fixes x's shape, and the taps kept leave the output size as it is.
    ho, wo = out_hw

    def run(x, residual, residual_is_dead):
        cols = _ext._C.cpu_im2col_rows(x.contiguous(memory_format=torch.channels_last),
                                       kernel_size, stride, padding, dilation)
        if residual is None:
            y = linear.default(cols, f.weight, f.bias, unary, [], "")
        else:
            # oneDNN's linear takes the add as a post-op but no ReLU after it.
            residual_rows = residual.contiguous(memory_format=torch.channels_last).permute(
                0, 2, 3, 1).reshape(cols.shape[0], -1)
            y = linear.binary(cols, residual_rows, f.weight, f.bias, "add")
            if relu:
                y = y.relu_()
        return y.view(x.shape[0], ho, wo, -1).permute(0, 3, 1, 2)
    return run


def _convolves_by_winograd(x: torch.Tensor, weight: torch.Tensor, conv: ConvParams) -> bool:
    """Whether the cpu backend's inference convolves channels_last x with weight as Winograd's
    F(2x2, 3x3): float32 3x3s with stride 1 and padding equal to the dilation (dilated ones where
    they still save multiplies), 64 channels or more, the transforms within the cache, the switch
    on (csrc/cpu/winograd_conv.h has the rule and its measurements). Read when a plan is
    built."""
    return _ext._C.cpu_winograd_applies(x, weight, *fold.geometry_lists(conv))


def _winograd_runner(conv_module, x, weight, gamma, beta, running_mean, running_var,
                     dilation: list, relu: bool, eps: float):
    """The inference runner of Winograd's F(2x2, 3x3) (csrc/cpu/winograd_conv.h): per chunk of
    images whose transform stays within ``CPU_WINOGRAD_CHUNK_BYTES`` (so it stays in the cache
    between the steps), input transform, the 16 products as one prepacked 16-group 1x1 oneDNN
    convolution, output transform with bias, residual and ReLU into that chunk of y (the
    residual's own memory where the caller says it is dead). The folded weight is transformed
    and prepacked once per parameter version. ``dilation`` [2]: the 3x3's (its padding too)."""
    n, cin, h, w = x.shape
    cout = weight.shape[0]
    image_bytes = _ext._C.cpu_winograd_image_bytes(h, w, max(cin, cout), dilation)
    most = max(1, min(n, _ext._C.CPU_WINOGRAD_CHUNK_BYTES // image_bytes))
    chunks = -(-n // most)
    chunk = -(-n // chunks)  # images per chunk, as even as the batch allows
    tiles = chunk * _ext._C.cpu_winograd_image_tiles(h, w, dilation)

    def prepare(folded_weight, bias):
        # oneDNN's blocked layout is chosen for a chunk's tile count, as the convolution's above
        # for its input size (the larger part of what prepacking for another size cost:
        # docs/design.md section 4, "Plans per input size").
        u = torch.ops.mkldnn._reorder_convolution_weight(
            _ext._C.cpu_winograd_weight(folded_weight), [0, 0], [1, 1], [1, 1], 16,
            [1, 16 * cin, tiles, 1])
        return fold.FoldedConv(u, bias.to(folded_weight.dtype))

    f = fold.fold_conv_bn(conv_module, weight, gamma, beta, running_mean, running_var, eps,
                          x.dtype, ("winograd-f2x3", tiles), prepare)
    products = torch.ops.mkldnn._convolution_pointwise

    def run(x, residual, residual_is_dead):
        if (residual is not None and residual_is_dead
                and residual.is_contiguous(memory_format=torch.channels_last)):
            # Each output transform reads a residual element before it writes y's there, and
            # no chunk reads another's: y can take the dead residual's memory.
            y = residual
        else:
            y = torch.empty((n, cout, h, w), dtype=x.dtype, memory_format=torch.channels_last)
        for start in range(0, n, chunk):
            part = slice(start, start + chunk)
            v = _ext._C.cpu_winograd_input(x[part], dilation)
            part_tiles = v.shape[2]
            if part_tiles < tiles:
                # The products' weights are laid out for a whole chunk's tile count, and oneDNN
                # runs another count with them only by reordering them on every call (resnet18's
                # layer4 at batch 8, 144x144, in chunks of 7 images and 1 before they were evened
                # out: 180 ms for the last image's 9 tiles, 5 ms for the other seven's 63). So
                # the batch's last, smaller chunk is padded to it; the zero rows' products are
                # computed and left unread.
                padded = torch.empty((1, v.shape[1], tiles, 1), dtype=v.dtype,
                                     memory_format=torch.channels_last)
                padded[:, :, :part_tiles] = v
                padded[:, :, part_tiles:] = 0
                v = padded
            m = products.default(v, f.weight, None, [0, 0], [1, 1], [1, 1], 16, "none", [], "")
            _ext._C.cpu_winograd_output(m[:, :, :part_tiles], f.bias,
                                        None if residual is None else residual[part], relu,
                                        y[part], dilation)
        return y
    return run


class CudaBackend(ExtensionBackend):
    """The ``cuda`` backend; inference through cuDNN's fused convolution + bias (+ add) + ReLU."""

    def __init__(self):
        super().__init__("cuda", "cuda")

    def unit_infer(self, conv_module, x, weight, gamma, beta, residual, running_mean,
                   running_var, conv: ConvParams, relu, eps):
        if not _cudnn_fuses(x.dtype, relu):
            return super().unit_infer(conv_module, x, weight, gamma, beta, residual,
                                      running_mean, running_var, conv, relu, eps)
        return self._cudnn_runner(conv_module, x, weight, gamma, beta, running_mean,
                                  running_var, conv, eps)(x, residual, False)

    def infer_runner(self, conv_module, x, weight, gamma, beta, residual, running_mean,
                     running_var, conv: ConvParams, relu, eps):
        if not _cudnn_fuses(x.dtype, relu):
            return super().infer_runner(conv_module, x, weight, gamma, beta, residual,
                                        running_mean, running_var, conv, relu, eps)
        return self._cudnn_runner(conv_module, x, weight, gamma, beta, running_mean,
                                  running_var, conv, eps)

    @staticmethod
    def _cudnn_runner(conv_module, x, weight, gamma, beta, running_mean, running_var,
                      conv: ConvParams, eps):
        # Folded and laid out once per plan, as the other backends' runners are: a call is the
        # one cuDNN call (and x's layout change, if any), where unit_infer on every call had
        # looked the fold up; the H200 run showed this backend's eval of layer3 and layer4
        # blocks nearly host-bound (docs/design.md section 4, on the plans).
        folded = fold.fold_conv_bn(
            conv_module, weight, gamma, beta, running_mean, running_var, eps, x.dtype, "cudnn",
            lambda w, b: fold.FoldedConv(w.contiguous(memory_format=torch.channels_last),
                                         b.to(x.dtype)))
        stride, padding, dilation, groups = fold.geometry_lists(conv)
        weight, bias = folded.weight, folded.bias

        def run(x, residual, residual_is_dead):
            # cuDNN's fused entry points allocate y: a dead residual's memory is not reused.
            x_cl = x.contiguous(memory_format=torch.channels_last)
            if residual is None:
                y = torch.cudnn_convolution_relu(x_cl, weight, bias, stride, padding, dilation,
                                                 groups)
            else:
                y = torch.cudnn_convolution_add_relu(
                    x_cl, weight, residual.contiguous(memory_format=torch.channels_last), 1.0,
                    bias, stride, padding, dilation, groups)
            return in_memory_format_of(y, x)
        return run


def _cudnn_fuses(dtype: torch.dtype, relu: bool) -> bool:
    """Whether cuDNN's fused convolution + bias (+ add) + ReLU runs a unit's inference: its
    entry points always end in ReLU and take no float64."""
    return relu and dtype != torch.float64


register_backend(CpuBackend())
register_backend(CudaBackend())
