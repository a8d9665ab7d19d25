"""The ops' argument checks for the fake (meta) implementations in _ops.py: the rules and messages
of csrc/checks.cpp, so that a call torch.compile, torch.export or a meta tensor traces fails with the
error the kernel would give, instead of returning a tensor of a shape the kernel would never make.

A meta tensor among CPU or CUDA tensors sends the call here too (the Meta key wins the dispatch): the
device checks then turn it into an error rather than uninitialised output on x's device.

Only what the kernels check before reading any data lives here; the value checks (every target a
class index) need the data and stay in the kernels, as does the step ops' test that no two tensors
share memory (fake tensors have none). Sizes may be symbolic (torch.SymInt): every test goes through
torch._check, which guards on it or, where it cannot decide it yet, asserts it in the traced graph.
"""

import torch

# c10's names for the dtypes, as the C++ messages print them.
_C10_NAMES = {
    torch.float32: "Float", torch.float64: "Double", torch.bfloat16: "BFloat16", torch.float16: "Half",
    torch.int64: "Long", torch.int32: "Int", torch.int16: "Short", torch.int8: "Char", torch.uint8: "Byte",
    torch.bool: "Bool", torch.complex64: "ComplexFloat", torch.complex128: "ComplexDouble",
}
_FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
# The layer ops' dtypes per device type, named as the kernels name them.
_ALLOWED = {
    "cpu": "float32, float64, bfloat16 or float16 on the CPU",
    "cuda": "float32, float64, float16 or bfloat16 on CUDA",
}


def _allowed(x):
    return _ALLOWED.get(x.device.type, "float32, float64, bfloat16 or float16")


def _dtype(t):
    return _C10_NAMES.get(t.dtype, str(t.dtype).removeprefix("torch."))


def _shape(t):
    return "[" + ", ".join(str(d) for d in t.shape) + "]"


def _num(v):
    return f"{v:g}"  # as C++ streams print a double (6 significant digits)


def _check(ok, op, message):
    torch._check(ok, lambda: f"{op}: {message}")


def _same_device(op, name, t, x):
    _check(t.device == x.device, op, f"{name} is on {t.device} but x is on {x.device}")


def linear_args(op, x, w, b):
    """check_linear_args: x (M, K), w (N, K), b (N,) or None; one float dtype, one device."""
    _check(x.dim() == 2, op, f"x must be 2-D (batch, in_features), got shape {_shape(x)}")
    _check(w.dim() == 2, op, f"w must be 2-D (out_features, in_features), got shape {_shape(w)}")
    _check(x.dtype in _FLOATS, op, f"x must be {_allowed(x)}, got {_dtype(x)}")
    _check(w.dtype == x.dtype, op, f"w has dtype {_dtype(w)} but x has dtype {_dtype(x)}; they must match")
    _same_device(op, "w", w, x)
    _check(x.shape[1] == w.shape[1], op,
           f"x has {x.shape[1]} features but w expects {w.shape[1]} (w has shape {_shape(w)})")
    if b is not None:
        _check(b.dim() == 1 and b.shape[0] == w.shape[0], op, f"b must have shape ({w.shape[0]},), got {_shape(b)}")
        _check(b.dtype == x.dtype, op, f"b has dtype {_dtype(b)} but x has dtype {_dtype(x)}; they must match")
        _same_device(op, "b", b, x)


def grad_args(op, gy, x, w):
    """check_grad_args: the above without b, and gy (M, N) like x."""
    linear_args(op, x, w, None)
    _check(gy.dim() == 2 and gy.shape[0] == x.shape[0] and gy.shape[1] == w.shape[0], op,
           f"gy must have shape ({x.shape[0]}, {w.shape[0]}), got {_shape(gy)}")
    _check(gy.dtype == x.dtype, op, f"gy has dtype {_dtype(gy)} but x has dtype {_dtype(x)}; they must match")
    _same_device(op, "gy", gy, x)


def mask(op, m, x, w):
    """check_mask: uint8 (M, ceil(N / 8)) on x's device."""
    _check(m.dtype == torch.uint8, op, f"mask must be uint8, got {_dtype(m)}")
    nbytes = (w.shape[0] + 7) // 8
    _check(m.dim() == 2 and m.shape[0] == x.shape[0] and m.shape[1] == nbytes, op,
           f"mask must have shape ({x.shape[0]}, {nbytes}), got {_shape(m)}")
    _same_device(op, "mask", m, x)


def mlp_forward_args(op, x, weights, biases):
    """check_mlp_forward_args: x (..., in_features), weights chaining from it, biases none or one each."""
    _check(x.dim() >= 1, op, "x must have at least 1 dimension (..., in_features), got a 0-d tensor")
    _check(x.dtype in _FLOATS, op, f"x must be {_allowed(x)}, got {_dtype(x)}")
    _check(len(weights) > 0, op, "weights must not be empty")
    _check(len(biases) in (0, len(weights)), op,
           f"biases must be empty or one per layer ({len(weights)}), got {len(biases)}")
    fan_in = x.shape[-1]
    for i, w in enumerate(weights):
        where = " (x's last dimension)" if i == 0 else " (the width of the layer before)"
        _check(w.dim() == 2 and w.shape[1] == fan_in, op,
               f"weights[{i}] must have shape (*, {fan_in}){where}, got {_shape(w)}")
        _check(w.dtype == x.dtype and w.device == x.device, op,
               f"weights[{i}] is {_dtype(w)} on {w.device} but x is {_dtype(x)} on {x.device}")
        if biases:
            b = biases[i]
            _check(b.dim() == 1 and b.shape[0] == w.shape[0], op,
                   f"biases[{i}] must have shape ({w.shape[0]},), got {_shape(b)}")
            _check(b.dtype == x.dtype and b.device == x.device, op,
                   f"biases[{i}] is {_dtype(b)} on {b.device} but x is {_dtype(x)} on {x.device}")
        fan_in = w.shape[0]


def _like(op, what, i, t, x, shape):
    shape = tuple(shape)
    _check(tuple(t.shape) == shape and t.dtype == x.dtype and t.device == x.device and t.is_contiguous(), op,
           f"{what}[{i}] must be a contiguous {_dtype(x)} tensor of shape [{', '.join(map(str, shape))}] on "
           f"{x.device}, got {_dtype(t)} {_shape(t)} on {t.device}")


def step_args(op, x, target, weights, biases, wbufs, bbufs, momentum, lr_scale):
    """check_step_args: every argument of the SGD step ops (float32 or float64)."""
    _check(len(weights) > 0, op, "weights must not be empty")
    _check(x.dim() == 2, op, f"x must be 2-D (batch, in_features), got shape {_shape(x)}")
    _check(x.shape[0] > 0, op, "x must hold at least one sample")
    _check(x.dtype in (torch.float32, torch.float64), op, f"x must be float32 or float64, got {_dtype(x)}")
    _check(target.dim() == 1 and target.shape[0] == x.shape[0], op,
           f"target must have shape ({x.shape[0]},), got {_shape(target)}")
    _check(target.dtype == torch.int64, op, f"target must be int64 class indices, got {_dtype(target)}")
    _same_device(op, "target", target, x)
    _check(len(biases) in (0, len(weights)), op,
           f"biases must be empty or one per layer ({len(weights)}), got {len(biases)}")
    with_momentum = momentum != 0.0
    _check(not with_momentum or len(wbufs) == len(weights), op,
           "weight_bufs must hold one momentum buffer per weight when momentum != 0")
    _check(not with_momentum or len(bbufs) == len(biases), op,
           "bias_bufs must hold one momentum buffer per bias when momentum != 0")
    fan_in = x.shape[1]
    for i, w in enumerate(weights):
        _check(w.dim() == 2 and w.shape[1] == fan_in, op, f"weights[{i}] must have shape (*, {fan_in}), got {_shape(w)}")
        _check(w.shape[0] > 0, op, f"weights[{i}] must have at least one output feature")
        _check(w.dtype == x.dtype and w.device == x.device, op,
               f"weights[{i}] must match x's dtype and device ({_dtype(x)} on {x.device}), got {_dtype(w)} on "
               f"{w.device}")
        _check(w.is_contiguous(), op, f"weights[{i}] must be contiguous (it is updated in place)")
        if biases:
            _like(op, "biases", i, biases[i], x, (w.shape[0],))
        if with_momentum:
            _like(op, "weight_bufs", i, wbufs[i], x, w.shape)
        if with_momentum and biases:
            _like(op, "bias_bufs", i, bbufs[i], x, (w.shape[0],))
        fan_in = w.shape[0]
    if lr_scale is not None:
        _check(lr_scale.numel() == 1 and lr_scale.dtype == x.dtype and lr_scale.device == x.device, op,
               f"lr_scale must be a one-element {_dtype(x)} tensor on {x.device}, got {_dtype(lr_scale)} of shape "
               f"{_shape(lr_scale)} on {lr_scale.device}")


def adam_args(op, x, target, weights, biases, exp_avgs, exp_avg_sqs, steps, beta1, beta2, eps, lr_scale):
    """check_adam_args: the above without momentum buffers, plus Adam's state per parameter."""
    step_args(op, x, target, weights, biases, [], [], 0.0, lr_scale)
    _check(0 <= beta1 < 1 and 0 <= beta2 < 1, op, f"betas must lie in [0, 1), got ({_num(beta1)}, {_num(beta2)})")
    _check(eps >= 0, op, f"eps must be >= 0, got {_num(eps)}")
    params = list(weights) + list(biases)
    n = len(params)
    _check(len(exp_avgs) == n and len(exp_avg_sqs) == n and len(steps) == n, op,
           f"exp_avgs, exp_avg_sqs and steps must hold one tensor per parameter ({n}: the weights, then the "
           f"biases), got {len(exp_avgs)}, {len(exp_avg_sqs)} and {len(steps)}")
    for i, p in enumerate(params):
        _like(op, "exp_avgs", i, exp_avgs[i], x, p.shape)
        _like(op, "exp_avg_sqs", i, exp_avg_sqs[i], x, p.shape)
        s = steps[i]
        _check(s.numel() == 1 and s.dtype in (torch.float32, torch.float64) and s.device == steps[0].device
               and (s.device.type == "cpu" or s.device == x.device), op,
               f"steps[{i}] must be a one-element float32 or float64 tensor, all on the CPU or all on {x.device} "
               f"(torch.optim.Adam's state['step']), got {_dtype(s)} of shape {_shape(s)} on {s.device}")
        _check(not s.is_inference() or torch.is_inference_mode_enabled(), op,
               f"steps[{i}] is an inference tensor (made under torch.inference_mode()): it can only be updated in "
               f"place inside inference mode")


def bf16_step(op, x, bf16):
    """check_bf16: bf16 arithmetic is for float32 parameters."""
    _check(not bf16 or x.dtype == torch.float32, op, f"bf16=True needs float32 x and parameters, got {_dtype(x)}")


def batches(op, x, batch_size, lrs):
    """check_batches: batch_size >= 1 and one learning rate per batch of x; returns the step count."""
    _check(batch_size >= 1, op, f"batch_size must be >= 1, got {batch_size}")
    count = -(-x.shape[0] // batch_size)
    _check(len(lrs) == count, op,
           f"lrs must hold one learning rate per step ({count} batches of {batch_size} in {x.shape[0]} samples), "
           f"got {len(lrs)}")
    return count
