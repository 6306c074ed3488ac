import time, torch
from tests.sampler.test_batching import *  # noqa
from tests.sampler.test_batching import parts, one_thread  # noqa: F401

def test_speed(parts):
    c = parts.compartments[0]
    x = torch.randn(4, 1, 8, 8); t = torch.full((4,), 500)
    with torch.no_grad():
        for _ in range(3): c(x, t, None)
        t0 = time.perf_counter()
        for _ in range(20): c(x, t, None)
    print("forward ms", (time.perf_counter() - t0) / 20 * 1e3, torch.get_num_threads(), torch.is_grad_enabled(), torch.get_default_dtype())
    print("param dtypes", {p.dtype for p in c.parameters()}, "min abs nonzero", min(float(p.abs()[p != 0].min()) for p in c.parameters() if (p != 0).any()))
    import torch.backends.mkldnn
    print("flush denormal", torch.set_flush_denormal(True))
    with torch.no_grad():
        t0 = time.perf_counter()
        for _ in range(20): c(x, t, None)
    print("forward ms after flush_denormal", (time.perf_counter() - t0) / 20 * 1e3)
