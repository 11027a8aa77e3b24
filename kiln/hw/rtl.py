"""SystemVerilog text for the integer layers (kiln.hw.ir): one module per layer and a top.

Every layer module has the same frame-level valid/ready interface: it accepts a whole input
frame (C*H*W codes, element i at bits [i*IB +: IB]) when idle, computes, then offers its output
frame until the next stage takes it; consecutive layers run concurrently on consecutive frames
(a dataflow pipeline). A dense layer (Linear, or Conv2d as a dense map per output position)
has PO x PI multipliers: each cycle it multiplies PI inputs by the PI weights of PO outputs
(one word of a weight ROM, read synchronously from a `$readmemh` file), so one output position
takes R = (N / PO) * (K / PI) cycles: R is the reuse factor (hls4ml's: each multiplier is used
R times per position). Its pipeline: issue (ROM read and input gather) -> multiply-accumulate
-> requantize (acc * m + b, shift rounding half to even, clamp) into the output frame.

Cycle counts (kiln.hw.design.predict_cycles, checked against simulation): a dense layer is busy
P*R + 3 cycles from the edge that accepts its frame to the edge after which its output is valid
(P*R issue cycles, 2 pipeline stages, 1 to see them drained); a pool layer 0 (it computes while
accepting). A handshake takes one edge, and a stage is idle one cycle between frames.
"""
from __future__ import annotations

import numpy as np

from kiln.hw.ir import Layer, signed_bits


def _clog2(n: int) -> int:
    return max(1, int(n - 1).bit_length())


def _hex(values: np.ndarray, bits: int) -> str:
    """Pack signed ints (first = least significant) into one hex string of len(values)*bits bits."""
    word = 0
    for i, v in enumerate(values.tolist()):
        word |= (int(v) & ((1 << bits) - 1)) << (i * bits)
    digits = max(1, (len(values) * bits + 3) // 4)
    return f"{word:0{digits}x}"


def _vconst(values: np.ndarray, bits: int) -> str:
    return f"{len(values) * bits}'h{_hex(values, bits)}"


def weight_rom(lay: Layer, po: int, pi: int) -> list[str]:
    """The ROM words (hex lines): word og*KC + kc holds W[og*PO + o][kc*PI + j] at lane o*PI + j."""
    w = lay.weight.reshape(lay.n, lay.k)
    wb = weight_bits(lay)
    g, kc = lay.n // po, lay.k // pi
    return [_hex(w[og * po:(og + 1) * po, c * pi:(c + 1) * pi].reshape(-1), wb) for og in range(g) for c in range(kc)]


def weight_bits(lay: Layer) -> int:
    return signed_bits(int(lay.weight.min()), int(lay.weight.max()))


def requant_bits(lay: Layer) -> int:
    """Width of acc * m + b: its exact range, the product alone included (Verilog evaluates it first)."""
    lo, hi = lay.acc_range()
    ends = [lo * lay.mult, hi * lay.mult, lo * lay.mult + lay.bias, hi * lay.mult + lay.bias]
    return signed_bits(int(min(e.min() for e in ends)), int(max(e.max() for e in ends))) + 1


def _ports(name: str, ni: int, ib: int, no: int, ob: int) -> str:
    return (f"module {name} (\n    input wire clk, input wire rst,\n"
            f"    input wire in_valid, output wire in_ready, input wire [{ni * ib - 1}:0] in_data,\n"
            f"    output wire out_valid, input wire out_ready, output wire [{no * ob - 1}:0] out_data\n);\n")


def _gather(lay: Layer, pi: int) -> tuple[str, str]:
    """(declarations, per-lane input expression `xg_j`) for the input word of lane j."""
    c, h, w = lay.in_shape
    kc_n = lay.k // pi
    if lay.kernel == (1, 1) and lay.in_shape[1:] == (1, 1):           # a Linear: input k directly
        decl = "".join(f"    wire signed [IB-1:0] xg_{j} = xbuf[kc * {pi} + {j}];\n" for j in range(pi))
        return decl, ""
    k = lay.kernel[0]
    ks = np.arange(lay.k).reshape(kc_n, pi)
    ci, ky, kx = ks // (k * k), (ks // k) % k, ks % k
    cb = signed_bits(0, c * h * w)
    yb = signed_bits(-lay.padding - 1, max(h, w) + k + lay.padding * 2 + 1)
    decl = []
    for j in range(pi):
        decl.append(f"    localparam [{kc_n * cb - 1}:0] COF_{j} = {_vconst(ci[:, j] * h * w, cb)};\n"
                    f"    localparam [{kc_n * yb - 1}:0] KY_{j} = {_vconst(ky[:, j], yb)};\n"
                    f"    localparam [{kc_n * yb - 1}:0] KX_{j} = {_vconst(kx[:, j], yb)};\n"
                    f"    wire signed [{yb}:0] ih_{j} = iy0 + $signed({{1'b0, KY_{j}[kc*{yb} +: {yb}]}});\n"
                    f"    wire signed [{yb}:0] iw_{j} = ix0 + $signed({{1'b0, KX_{j}[kc*{yb} +: {yb}]}});\n"
                    f"    wire inb_{j} = (ih_{j} >= 0) && (ih_{j} < {h}) && (iw_{j} >= 0) && (iw_{j} < {w});\n"
                    f"    wire [{cb + yb + 8}:0] ad_{j} = COF_{j}[kc*{cb} +: {cb}] + ih_{j} * {w} + iw_{j};\n"
                    f"    wire signed [IB-1:0] xg_{j} = inb_{j} ? xbuf[ad_{j}] : 0;\n")
    counters = (f"    reg signed [{yb}:0] iy0, ix0;   // top-left input row/column of the window (padding: < 0)\n")
    return "".join(decl), counters


def dense_module(name: str, lay: Layer, po: int, pi: int, rom_file: str) -> str:
    """One dense layer (see the module docstring)."""
    c, h, w = lay.in_shape
    ni, no, p = c * h * w, lay.n * lay.positions, lay.positions
    ib, ob, wb, ab = lay.in_bits, lay.out_bits, weight_bits(lay), lay.acc_bits
    g, kc_n = lay.n // po, lay.k // pi
    mb = signed_bits(int(lay.mult.min()), int(lay.mult.max()))
    bb = signed_bits(int(lay.bias.min()), int(lay.bias.max()))
    rb = requant_bits(lay)
    oh_n, ow_n = lay.out_shape[1], lay.out_shape[2]
    gather, counters = _gather(lay, pi)
    conv = bool(counters)
    s = [_ports(name, ni, ib, no, ob),
         f"    // {lay.meta.get('op')} {lay.name}: K={lay.k} N={lay.n} positions={p}; reuse R={g * kc_n} "
         f"(PO={po} x PI={pi} multipliers); acc range {lay.acc_range()} -> {ab} bits\n",
         f"    localparam IB = {ib}, OB = {ob}, WB = {wb}, AB = {ab}, MB = {mb}, BB = {bb}, RB = {rb};\n",
         f"    localparam NI = {ni}, NO = {no}, P = {p}, PO = {po}, PI = {pi}, G = {g}, KC = {kc_n};\n",
         f"    localparam [{lay.n * mb - 1}:0] MT = {_vconst(lay.mult, mb)};\n",
         f"    localparam [{lay.n * bb - 1}:0] BT = {_vconst(lay.bias, bb)};\n",
         "    reg signed [IB-1:0] xbuf [0:NI-1];\n    reg signed [OB-1:0] ybuf [0:NO-1];\n",
         "    reg [1:0] state;   // 0 idle, 1 issue, 2 drain, 3 output valid\n",
         f"    reg [{_clog2(kc_n + 1)}:0] kc; reg [{_clog2(g + 1)}:0] og; reg [{_clog2(p + 1)}:0] pos;\n",
         f"    reg [{_clog2(oh_n + 1)}:0] oy; reg [{_clog2(ow_n + 1)}:0] ox;\n" if conv else "",
         counters,
         f"    reg [{po * pi * wb - 1}:0] rom [0:{g * kc_n - 1}];\n    initial $readmemh(\"{rom_file}\", rom);\n",
         f"    reg [{po * pi * wb - 1}:0] wreg;\n    reg signed [IB-1:0] xreg [0:PI-1];\n",
         "    reg s1_v, s1_first, s1_last, s2_v;\n",
         f"    reg [{_clog2(g + 1)}:0] s1_og, s2_og; reg [{_clog2(p + 1)}:0] s1_pos, s2_pos;\n",
         "    reg signed [AB-1:0] acc [0:PO-1];\n",
         "    assign in_ready = (state == 0);\n    assign out_valid = (state == 3);\n",
         "    genvar gi;\n",
         "    generate for (gi = 0; gi < NO; gi = gi + 1) begin : pack\n"
         "        assign out_data[gi*OB +: OB] = ybuf[gi];\n    end endgenerate\n",
         gather]
    s.append(_requant_function(lay, rb, mb, bb, ab, ob))
    s.append("    integer i;\n    always @(posedge clk) begin\n"
             "        if (rst) begin\n            state <= 0; s1_v <= 0; s2_v <= 0;\n        end else begin\n"
             "            s1_v <= (state == 1);\n            s2_v <= s1_v && s1_last;\n"
             "            s2_og <= s1_og; s2_pos <= s1_pos;\n")
    s.append("            case (state)\n"
             "            0: if (in_valid) begin\n"
             "                for (i = 0; i < NI; i = i + 1) xbuf[i] <= in_data[i*IB +: IB];\n"
             "                kc <= 0; og <= 0; pos <= 0; state <= 1;\n")
    if conv:
        s.append(f"                oy <= 0; ox <= 0; iy0 <= -{lay.padding}; ix0 <= -{lay.padding};\n")
    s.append("            end\n            1: begin\n"
             "                wreg <= rom[og*KC + kc];\n")
    s.append("".join(f"                xreg[{j}] <= xg_{j};\n" for j in range(pi)))
    s.append("                s1_first <= (kc == 0); s1_last <= (kc == KC-1); s1_og <= og; s1_pos <= pos;\n"
             "                if (kc == KC-1) begin\n                    kc <= 0;\n"
             "                    if (og == G-1) begin\n                        og <= 0; pos <= pos + 1;\n")
    if conv:
        st = lay.stride
        s.append(f"                        if (ox == {ow_n - 1}) begin ox <= 0; ix0 <= -{lay.padding}; "
                 f"oy <= oy + 1; iy0 <= iy0 + {st}; end\n"
                 f"                        else begin ox <= ox + 1; ix0 <= ix0 + {st}; end\n")
    s.append("                        if (pos == P-1) state <= 2;\n"
             "                    end else og <= og + 1;\n"
             "                end else kc <= kc + 1;\n            end\n"
             "            2: if (!s1_v && !s2_v) state <= 3;\n"
             "            3: if (out_ready) state <= 0;\n            endcase\n")
    s.append("            if (s1_v) begin\n")
    # multiply-accumulate per output lane, over the PI inputs of this cycle (procedural: a
    # simulator evaluates it only here, not on every change of its operands)
    for o in range(po):
        terms = " + ".join(f"$signed(xreg[{j}]) * $signed(wreg[{(o * pi + j) * wb} +: WB])" for j in range(pi))
        s.append(f"                acc[{o}] <= (s1_first ? 0 : acc[{o}]) + {terms};\n")
    s.append("            end\n            if (s2_v) begin\n")
    s.append("".join(f"                ybuf[(s2_og*PO + {o})*P + s2_pos] <= rq(acc[{o}], MT[(s2_og*PO + {o})*MB +: MB], "
                     f"BT[(s2_og*PO + {o})*BB +: BB]);\n" for o in range(po)))
    s.append("            end\n        end\n    end\nendmodule\n")
    return "".join(s)


def _requant_function(lay: Layer, rb: int, mb: int, bb: int, ab: int, ob: int) -> str:
    """Verilog function rq(acc, m, b) = clamp(round_half_even((acc * m + b) / 2^shift), lo, hi)."""
    sh = lay.shift
    body = [f"    function signed [{ob - 1}:0] rq(input signed [{ab - 1}:0] a, input signed [{mb - 1}:0] m, "
            f"input signed [{bb - 1}:0] b);\n",
            f"        reg signed [{rb - 1}:0] v, f;\n        reg up;\n        begin\n",
            "            v = a * m + b;   // every operand signed and extended to RB bits: exact\n"]
    return "".join(body) + _round_clamp_end("v", "rq", sh, lay, ob)


def _round_clamp_end(src: str, fn: str, sh: int, lay: Layer, ob: int) -> str:
    """The end of a Verilog rounding function: fn = clamp(round_half_even(src / 2^sh), lo, hi)."""
    if sh:
        half = 1 << (sh - 1)
        text = (f"            f = {src} >>> {sh};\n"
                f"            up = ({src}[{sh - 1}:0] > {sh}'d{half}) || (({src}[{sh - 1}:0] == {sh}'d{half}) && f[0]);\n"
                f"            f = f + $signed({{1'b0, up}});\n")
    else:
        text = f"            f = {src};\n"
    return text + (f"            {fn} = (f < {lay.out_lo}) ? {lay.out_lo} : (f > {lay.out_hi}) ? {lay.out_hi} : "
                   f"f[{ob - 1}:0];\n        end\n    endfunction\n")


def _avg_function(lay: Layer, sb: int, ob: int) -> str:
    """Verilog function ap(a) = clamp(round_half_even(a / 2^shift), lo, hi) of an average
    pool's scaled window sum a = sum * m + b (SB + 25 bits)."""
    bits = sb + 25
    body = [f"    function signed [{ob - 1}:0] ap(input signed [{bits - 1}:0] a);\n",
            f"        reg signed [{bits - 1}:0] f;\n        reg up;\n        begin\n"]
    return "".join(body) + _round_clamp_end("a", "ap", lay.shift, lay, ob)


def pool_module(name: str, lay: Layer) -> str:
    """Max or average pooling on codes, computed from the input frame on the edge that accepts
    it. The window expressions sit inside the clocked block (not in continuous assignments on
    in_data): synthesis makes the same logic of them, and an event-driven simulator evaluates
    them once per frame instead of on every change of the upstream layer's output frame (a
    conv layer rewrites PO codes of it every cycle while it computes)."""
    c, h, w = lay.in_shape
    _, oh, ow = lay.out_shape
    ib, ob, k, st = lay.in_bits, lay.out_bits, lay.kernel[0], lay.stride
    s = [_ports(name, c * h * w, ib, c * oh * ow, ob),
         f"    // {lay.kind} {lay.name}: {k}x{k} stride {st} on {c}x{h}x{w} codes\n",
         f"    localparam IB = {ib}, OB = {ob};\n    reg [1:0] state;\n"
         f"    reg [{c * oh * ow * ob - 1}:0] ybuf;\n"
         "    assign in_ready = (state == 0);\n    assign out_valid = (state == 3);\n"
         "    assign out_data = ybuf;\n"]
    sb = ib + 2 * _clog2(k + 1)
    if lay.kind != "maxpool":
        s.append(_avg_function(lay, sb, ob))
    s.append("    always @(posedge clk) begin\n        if (rst) state <= 0;\n"
             "        else case (state)\n            0: if (in_valid) begin\n")
    for ci in range(c):
        for y in range(oh):
            for x in range(ow):
                o = (ci * oh + y) * ow + x
                idx = [(ci * h + y * st + dy) * w + x * st + dx for dy in range(k) for dx in range(k)]
                el = [f"$signed(in_data[{i * ib} +: {ib}])" for i in idx]
                if lay.kind == "maxpool":
                    expr = el[0]
                    for e in el[1:]:
                        expr = f"(({e}) > ({expr}) ? ({e}) : ({expr}))"
                else:
                    expr = f"ap(({' + '.join(el)}) * {int(lay.mult[0])} + {int(lay.bias[0])})"
                s.append(f"                ybuf[{o * ob} +: {ob}] <= {expr};\n")
    s.append("                state <= 3;\n            end\n            3: if (out_ready) state <= 0;\n"
             "            default: state <= 0;\n        endcase\n    end\nendmodule\n")
    return "".join(s)


def top_module(names: list[str], layers: list[Layer]) -> str:
    """The network: the layer modules chained by their handshakes."""
    first, last = layers[0], layers[-1]
    ni = int(np.prod(first.in_shape))
    no = int(np.prod(last.out_shape))
    s = [_ports("kiln_top", ni, first.in_bits, no, last.out_bits)]
    for i, lay in enumerate(layers):
        width = int(np.prod(lay.out_shape)) * lay.out_bits
        s.append(f"    wire v{i}, r{i}; wire [{width - 1}:0] d{i};\n")
    for i, (name, lay) in enumerate(zip(names, layers)):
        iv, ir, idata = ("in_valid", "in_ready", "in_data") if i == 0 else (f"v{i - 1}", f"r{i - 1}", f"d{i - 1}")
        ready = "out_ready" if i == len(layers) - 1 else f"r{i}"
        s.append(f"    {name} u{i} (.clk(clk), .rst(rst), .in_valid({iv}), .in_ready({ir}), .in_data({idata}),\n"
                 f"        .out_valid(v{i}), .out_ready({ready}), .out_data(d{i}));\n")
    n = len(layers) - 1
    s.append(f"    assign out_valid = v{n};\n    assign out_data = d{n};\nendmodule\n")
    return "".join(s)
