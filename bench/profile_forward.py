"""Per-kernel GPU time of a generated forward (torch.profiler), to see which branch binds.

Usage: python bench/profile_forward.py SPEC [T ...]
"""

import sys

import torch
from torch.profiler import ProfilerActivity, profile

import specgen
from specgen import reference
from specgen.testing import spec_of


def main():
    mod = specgen.load(sys.argv[1])
    spec = spec_of(mod)
    fn = getattr(mod, f"{spec.family}_forward")
    for T in [int(x) for x in sys.argv[2:]] or [65536]:
        gen = torch.Generator(device="cuda").manual_seed(T)
        inputs = reference.make_inputs(spec, 1, T, dtype=mod.DTYPE, device="cuda", generator=gen)
        fn(**inputs)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                fn(**inputs)
            torch.cuda.synchronize()
        print(f"== {spec.name} T={T} (3 calls)")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=40))
        del inputs
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
