"""How far a timed kernel is from what the hardware allows at its shape: the flag that keeps a slow, unoptimised
code path from being read as "this variant is slow".

A variant's forward at length T does `analysis.flops` FLOPs and moves `analysis.forward_bytes` bytes; the hardware
does at most P FLOP/s and B bytes/s, so no kernel can take less than max(FLOPs / P, bytes / B): its roofline time.
`fraction = roofline time / measured time` (1 = at the ceiling). A speed row below the sweep's
`speed.min_roofline` (default 0.2) is flagged: its time says more about the kernel than about the variant.

P and B are the ceilings measured in the same run when the speed record has them (`machine`: the dense bf16 matmul
peak and the device-to-device copy bandwidth of `specgen.perf.bench.machine_peaks`); otherwise the H100 SXM datasheet
values below are assumed, and the report says which were used.
"""

from __future__ import annotations

# NVIDIA H100 SXM5 datasheet: dense (no sparsity) BF16/FP16 tensor-core peak and HBM3 bandwidth.
ASSUMED_H100 = {"matmul_tflops": 989.0, "copy_gbps": 3350.0, "source": "assumed H100 SXM datasheet ceilings "
                "(989 TFLOP/s dense fp16/bf16, 3.35 TB/s HBM3)"}
DEFAULT_MIN_FRACTION = 0.2


def ceilings(speed_record: dict | None) -> dict:
    """The ceilings to judge a speed record by: those it measured (`machine`), else the assumed H100 values."""
    machine = (speed_record or {}).get("machine") or {}
    if isinstance(machine.get("matmul_tflops"), (int, float)) and isinstance(machine.get("copy_gbps"), (int, float)):
        return {"matmul_tflops": float(machine["matmul_tflops"]), "copy_gbps": float(machine["copy_gbps"]),
                "source": "measured in the same run"}
    return dict(ASSUMED_H100)


def roofline(flops: float, nbytes: float, forward_ms: float, peaks: dict,
             min_fraction: float = DEFAULT_MIN_FRACTION) -> dict:
    """{roofline_ms, fraction, bound ("compute" or "memory"), flagged} of one timed forward."""
    if not (isinstance(forward_ms, (int, float)) and forward_ms > 0):
        raise ValueError(f"forward_ms must be a positive time, got {forward_ms!r}")
    compute_ms = flops / (peaks["matmul_tflops"] * 1e12) * 1e3
    memory_ms = nbytes / (peaks["copy_gbps"] * 1e9) * 1e3
    floor = max(compute_ms, memory_ms)
    fraction = floor / forward_ms
    return {"roofline_ms": floor, "roofline_fraction": fraction,
            "bound": "compute" if compute_ms >= memory_ms else "memory", "flagged": fraction < min_fraction,
            "ceilings": peaks["source"]}


def of_spec(spec_dict: dict, T: int, forward_ms: float, speed_record: dict | None = None,
            min_fraction: float = DEFAULT_MIN_FRACTION) -> dict:
    """`roofline` with the variant's FLOPs and bytes at T from `specgen.compile.analysis`."""
    from ..compile.analysis import flops, forward_bytes
    from ..model.spec import spec_from_mapping

    spec = spec_from_mapping(spec_dict)
    return roofline(flops(spec, T), forward_bytes(spec, T), forward_ms, ceilings(speed_record), min_fraction)


__all__ = ["ASSUMED_H100", "DEFAULT_MIN_FRACTION", "ceilings", "of_spec", "roofline"]
