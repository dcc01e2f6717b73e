"""ONNX and TFLite/LiteRT writers, installed as ``chita_edge.exporters``.

Exporters take a plain ``nn.Module`` plus an ``ExportConfig``; they never import the pruning engine.

    from chita_edge.exporters import ExportConfig, export_model, inspect_file, load_session
    report = export_model(model, ExportConfig(format="tflite", layout="sparse"), example_input=x[:1],
                          out="m.tflite", parity_inputs=x)
    inspect_file("m.tflite")["verdict"]
    load_session("m.tflite").run(x)

Modules: ``export`` (the verb), ``layouts`` (measured per-layer rules, numpy only), ``onnx_format`` (the only
module importing onnx/onnxruntime), ``tflite_format`` (the only one importing the LiteRT stack, lazily),
``tflite_quantize`` (fp16 / int8 quantisation, the stack taken from ``tflite_format``), ``runtime`` (sessions
for both formats), ``lint`` (``inspect``).
"""

from chita_edge.exporters.export import (
    FORMATS,
    LAYOUTS,
    QUANTIZE,
    ExportConfig,
    ExportReport,
    Parity,
    export_model,
)
from chita_edge.exporters.lint import inspect_file
from chita_edge.exporters.runtime import detect_format, file_requirements, load_session, run

__all__ = [
    "FORMATS",
    "LAYOUTS",
    "QUANTIZE",
    "ExportConfig",
    "ExportReport",
    "Parity",
    "detect_format",
    "export_model",
    "file_requirements",
    "inspect_file",
    "load_session",
    "run",
]
