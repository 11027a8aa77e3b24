"""Custom hardware: RTL emission for quantized networks, simulation, synthesis, FPGA and systolic-array cost models."""
