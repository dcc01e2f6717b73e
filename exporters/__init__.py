"""ONNX and TFLite/LiteRT writers, installed as ``chita_edge.exporters``.

Exporters take a plain ``nn.Module`` plus an export config; they never import the pruning engine.
"""
