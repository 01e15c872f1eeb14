"""Time and peak memory of a repeated step, for the benchmarks (each run in its own process).

CPU: peak extra memory is the resident-set high-water mark over the timed region minus the resident set at
its start. Writing "5" to /proc/self/clear_refs resets VmHWM to the current VmRSS (checked, since not every
kernel supports it); `malloc_trim` first returns freed heap pages, so the baseline is live memory. CUDA:
`max_memory_allocated` over the same region minus `memory_allocated` at its start.
"""
import ctypes
import gc
import statistics
import time

import torch


def resident_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure(step, device, iters: int, before_reset=None) -> dict:
    """Median step time and peak memory over `iters` steps after one warm-up step (compilation included).
    `before_reset()` runs between the warm-up and the reset (e.g. to drop the warm-up's gradients, so the
    timed region's peak includes the gradients it produces)."""
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    start = time.perf_counter()
    first = step()
    first_loss = float(first) if isinstance(first, torch.Tensor) and first.numel() == 1 else None
    sync()
    warmup_s = time.perf_counter() - start
    if before_reset is not None:
        before_reset()
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    else:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # VmHWM := VmRSS
        baseline = resident_kb("VmRSS") * 1024
        if resident_kb("VmHWM") * 1024 > baseline + 2 ** 20:
            raise RuntimeError("writing 5 to /proc/self/clear_refs did not reset VmHWM on this kernel")
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if cuda else resident_kb("VmHWM") * 1024
    return {"time_ms": 1000 * statistics.median(times), "peak_mb": peak / 2 ** 20,
            "peak_extra_mb": (peak - baseline) / 2 ** 20, "first_loss": first_loss, "warmup_s": warmup_s}
