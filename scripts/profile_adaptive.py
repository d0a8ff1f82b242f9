"""Where the time of a block-sparse call goes (GPU): wall time of 30 calls against exact, the host-side
time alone, and torch.profiler's top operators. Shapes of one SmolLM2 layer at 8K tokens."""
import time

import torch
from torch.profiler import ProfilerActivity, profile

import hf_ahfa

T, H, HKV, D = 8192, 9, 3, 64
torch.manual_seed(0)
q = torch.randn(1, T, H, D, device="cuda", dtype=torch.bfloat16) * 2
k, v = (torch.randn(1, T, HKV, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
policy = hf_ahfa.AdaptivePolicy(mode="adaptive")
calls = {"adaptive": lambda: hf_ahfa.attention(q, k, v, causal=True, policy=policy),
         "exact": lambda: hf_ahfa.attention(q, k, v, causal=True)}
for name, fn in calls.items():
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(30):
        fn()
    host = time.perf_counter() - t
    torch.cuda.synchronize()
    print(f"{name}: 30 calls {1e3 * (time.perf_counter() - t):.1f} ms, host side {1e3 * host:.1f} ms")
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    for _ in range(10):
        calls["adaptive"]()
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25))
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12))
