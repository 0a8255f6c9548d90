"""A seed-format pipeline for a vibration sensor on a pump, written the 2019 way.

No offload imports, module globals for the sensor, and the argument conventions of the Task
Interface: tuples unpacked into arguments, a single value, a bare False filter, end of stream.
"""

import numpy as np

WINDOWS = 40
_sensor = {"next": 0}


def read_window():
    n = _sensor["next"]
    if n >= WINDOWS:
        return False, None
    _sensor["next"] = n + 1
    t = np.arange(256) / 256.0
    rng = np.random.default_rng(n)
    signal = np.sin(2 * np.pi * (5 + n % 7) * t) * (1 + (n % 5 == 0) * 3) + rng.normal(0, 0.1, 256)
    return True, (n, signal.astype(np.float32))


def spectrum(n, signal):
    return True, (n, np.abs(np.fft.rfft(signal)))


def peak(n, magnitudes):
    k = int(np.argmax(magnitudes[1:]) + 1)
    return True, {"window": n, "peak_bin": k, "energy": magnitudes[k], "spectrum": magnitudes}


def alarm_only(summary):
    if summary["energy"] < 200.0:
        return False  # bare False: not interesting, drop it
    return True, summary


def record(summary):
    severity = "high" if summary["energy"] > 400 else "medium"
    return True, (summary["window"], summary["peak_bin"], summary["energy"], severity)


tasks = [read_window, spectrum, peak, alarm_only, record]


def set_source(spec):
    """Restart the sensor (the tests replay it once per split)."""
    _sensor["next"] = 0
