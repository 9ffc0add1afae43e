"""The ``/metrics`` view of field data: drift per model and input channel, and the capture buffer.

A ``prometheus_client`` collector read at each scrape (``ApiMetrics.add_collector``), so nothing is
updated on the inference path. Gauges::

    edgepack_drift_level{model}                       -1 collecting, 0 ok, 1 warn, 2 alarm
    edgepack_drift_window_requests{model}             requests in the sliding window
    edgepack_drift_psi{model,tensor,channel}          PSI of each input channel (group)
    edgepack_drift_out_of_range{model,tensor,channel} share of values outside the reference range
    edgepack_drift_nonfinite{model,tensor,channel}    NaN/inf share beyond the reference's
    edgepack_drift_output_psi{model,tensor,channel}   PSI of each output channel (reported, never judged)
    edgepack_field_data_skipped{model}                requests skipped: the statistics queue was full
    edgepack_field_data_disabled{model}               1 when an error switched field data off
    edgepack_capture_records / _bytes / _dropped / _uploaded   the ring buffer
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from edgepack.agent.field_data import FieldData

log = logging.getLogger(__name__)

LEVEL_VALUE = {"collecting": -1, "ok": 0, "warn": 1, "alarm": 2}


class FieldDataCollector:
    def __init__(self, field_data: FieldData) -> None:
        self.field_data = field_data

    def describe(self) -> list[Metric]:
        return []  # no samples at registration time: collect() runs at each scrape only

    def collect(self) -> Iterator[Metric]:
        level = GaugeMetricFamily("edgepack_drift_level", "Drift of the live inputs: -1 collecting, 0 ok, "
                                  "1 warn, 2 alarm.", labels=["model"])  # fmt: skip
        window = GaugeMetricFamily("edgepack_drift_window_requests", "Requests in the drift window.",
                                   labels=["model"])  # fmt: skip
        labels = ["model", "tensor", "channel"]
        psi = GaugeMetricFamily("edgepack_drift_psi", "Population stability index per input channel.", labels=labels)
        oor = GaugeMetricFamily("edgepack_drift_out_of_range", "Share of live values outside the calibration "
                                "range, per input channel.", labels=labels)  # fmt: skip
        nonfinite = GaugeMetricFamily("edgepack_drift_nonfinite", "NaN/inf share beyond the calibration data's, "
                                      "per input channel.", labels=labels)  # fmt: skip
        output_psi = GaugeMetricFamily("edgepack_drift_output_psi", "Population stability index per output "
                                       "channel (reported, not judged).", labels=labels)  # fmt: skip
        skipped = CounterMetricFamily("edgepack_field_data_skipped", "Requests field data skipped (queue full).",
                                      labels=["model"])  # fmt: skip
        disabled = GaugeMetricFamily("edgepack_field_data_disabled", "1 when an error switched field data off.",
                                     labels=["model"])  # fmt: skip
        try:
            for name, observer in self.field_data.observers().items():
                skipped.add_metric([name], observer.skipped)
                disabled.add_metric([name], 1 if observer.disabled else 0)
                if observer.monitor is None or observer.disabled:
                    continue
                report = observer.monitor.report()
                level.add_metric([name], LEVEL_VALUE[report.level])
                window.add_metric([name], report.window)
                for c in report.channels:
                    key = [name, c.tensor, str(c.channel)]
                    psi.add_metric(key, c.psi)
                    oor.add_metric(key, c.out_of_range)
                    nonfinite.add_metric(key, c.nonfinite)
                for c in report.outputs:
                    output_psi.add_metric([name, c.tensor, str(c.channel)], c.psi)
        except Exception:  # a scrape must answer whatever field data does
            log.exception("field data metrics failed")
        yield from (level, window, psi, oor, nonfinite, output_psi, skipped, disabled)
        buffer = self.field_data.buffer
        if buffer is not None:
            status = buffer.status()
            yield GaugeMetricFamily("edgepack_capture_records", "Capture records held.", value=status["records"])
            yield GaugeMetricFamily("edgepack_capture_bytes", "Capture buffer bytes held.", value=status["bytes"])
            yield CounterMetricFamily("edgepack_capture_dropped", "Capture records dropped (buffer full).",
                                      value=status["dropped"])  # fmt: skip
            yield CounterMetricFamily("edgepack_capture_uploaded", "Capture records uploaded and acknowledged.",
                                      value=status["uploaded"])  # fmt: skip
