#!/usr/bin/env python3
"""The independent reading of `make bench-gpu`: GPU INDEX's total-energy
counter (NVML, millijoules since the driver loaded), one line on stdout for
each line on stdin, so that the script reads it in well under a
millisecond, with no process started inside a query's window.

It calls libnvidia-ml.so.1 through ctypes: no Python package is needed, and
it shares nothing with mtor's own NVML binding (go-nvml) but the driver.
(nvidia-smi 580 no longer offers total_energy_consumption as a query field.)
The first line it prints is "ready" or "error: ...", before any request.

usage: nvml_energy.py [INDEX]
"""
import ctypes
import sys


def main():
    index = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
    except OSError as e:
        print(f"error: no NVML library: {e}", flush=True)
        return 1
    nvml.nvmlErrorString.restype = ctypes.c_char_p

    def check(ret, what):
        if ret != 0:
            raise RuntimeError(f"{what}: {nvml.nvmlErrorString(ret).decode()} ({ret})")

    handle = ctypes.c_void_p()
    mj = ctypes.c_ulonglong()
    try:
        check(nvml.nvmlInit_v2(), "nvmlInit")
        check(nvml.nvmlDeviceGetHandleByIndex_v2(ctypes.c_uint(index), ctypes.byref(handle)), f"GPU {index}")
        # The counter exists from Volta on; an older GPU fails here.
        check(nvml.nvmlDeviceGetTotalEnergyConsumption(handle, ctypes.byref(mj)), "total energy")
    except RuntimeError as e:
        print(f"error: {e}", flush=True)
        return 1
    print("ready", flush=True)
    for _ in sys.stdin:
        ret = nvml.nvmlDeviceGetTotalEnergyConsumption(handle, ctypes.byref(mj))
        print(mj.value if ret == 0 else f"error: total energy: {nvml.nvmlErrorString(ret).decode()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
