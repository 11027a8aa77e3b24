"""Quantization: number formats, module wrappers, PTQ, QAT, GPTQ, SmoothQuant and a real int8 path."""
