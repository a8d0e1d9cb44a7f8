"""Peak resident memory of a benchmark child process (Linux /proc)."""


def status_kib(field: str) -> int:
    """A ``/proc/self/status`` field in KiB (``VmRSS``: now, ``VmHWM``: peak)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> int:
    """Set the peak (VmHWM) to the current RSS; return that RSS in KiB."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return status_kib("VmRSS")


def peak_growth_mib(baseline_kib: int) -> float:
    return (status_kib("VmHWM") - baseline_kib) / 1024
