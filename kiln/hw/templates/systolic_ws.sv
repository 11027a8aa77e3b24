`timescale 1ns/1ps
// kiln: a weight-stationary systolic array of R x C signed MACs for one GEMM,
// out (M x N) = a (M x K) @ b (K x N). Emitted by kiln.hw.systolic_rtl; its cycle count is
// kiln.hw.systolic's (SCALE-Sim's compute model): ceil(K/R) * ceil(N/C) folds of 2R + C + M - 2.
//
// Per fold: R cycles shift a K-slice x N-slice tile of b down the columns (the tile's last row
// goes in first), then a streams in from the left edge, row i delayed by i cycles (the skew),
// moving one PE right per cycle; partial sums move one PE down per cycle, and the bottom row's
// sums are added into out as they leave (row t of out, column j, at cycle 2R - 1 + t + j of
// the fold). Partially filled folds are padded with zeros and take as long as full ones.
// Input-stationary runs on this same array with the operands' roles swapped (see systolic_rtl).
module kiln_systolic_ws #(
    parameter integer R = 4, C = 4, M = 8, N = 8, K = 8, W = 8, ACC = 32
) (
    input  wire clk,
    input  wire rst,
    input  wire start,
    output reg  busy,
    output reg  done
);
    localparam integer FR = (K + R - 1) / R;       // folds over the reduction (array rows)
    localparam integer FC = (N + C - 1) / C;       // folds over the outputs (array columns)
    localparam integer FOLD = 2 * R + C + M - 2;   // cycles per fold

    reg signed [W-1:0]   a_mem [0:M*K-1];          // streamed operand, row-major M x K
    reg signed [W-1:0]   b_mem [0:K*N-1];          // stationary operand, row-major K x N
    reg signed [ACC-1:0] o_mem [0:M*N-1];          // result, row-major M x N

    integer fr, fc, cyc;                           // fold indices and the cycle within the fold
    wire loading = busy && cyc < R;

    // links between PEs, packed: a flows right, weights and partial sums flow down
    wire [R*(C+1)*W-1:0]   a_link;
    wire [(R+1)*C*W-1:0]   w_link;
    wire [(R+1)*C*ACC-1:0] p_link;
    reg  [R*W-1:0]         a_edge;
    reg  [C*W-1:0]         w_edge;

    integer ei, ej, et, ek, en;
    always @* begin
        for (ei = 0; ei < R; ei = ei + 1) begin    // row i takes a[t][fr*R + i] at stream cycle t + i
            et = cyc - R - ei;
            ek = fr * R + ei;
            a_edge[ei*W +: W] = (busy && et >= 0 && et < M && ek < K) ? a_mem[et*K + ek] : {W{1'b0}};
        end
        for (ej = 0; ej < C; ej = ej + 1) begin    // load cycle c takes tile row R - 1 - c
            ek = fr * R + (R - 1 - cyc);
            en = fc * C + ej;
            w_edge[ej*W +: W] = (loading && ek < K && en < N) ? b_mem[ek*N + en] : {W{1'b0}};
        end
    end

    genvar i, j;
    generate
        for (j = 0; j < C; j = j + 1) begin : top
            assign w_link[j*W +: W] = w_edge[j*W +: W];
            assign p_link[j*ACC +: ACC] = {ACC{1'b0}};
        end
        for (i = 0; i < R; i = i + 1) begin : row
            assign a_link[i*(C+1)*W +: W] = a_edge[i*W +: W];
            for (j = 0; j < C; j = j + 1) begin : col
                reg signed [W-1:0]   w_q, a_q;
                reg signed [ACC-1:0] p_q;
                wire signed [W-1:0]   a_in = a_link[(i*(C+1)+j)*W +: W];
                wire signed [W-1:0]   w_in = w_link[(i*C+j)*W +: W];
                wire signed [ACC-1:0] p_in = p_link[(i*C+j)*ACC +: ACC];
                wire signed [ACC-1:0] p_out = p_in + a_in * w_q;
                always @(posedge clk) begin
                    if (rst) begin
                        w_q <= 0; a_q <= 0; p_q <= 0;
                    end else begin
                        if (loading) w_q <= w_in;
                        a_q <= a_in;
                        p_q <= p_out;
                    end
                end
                assign a_link[(i*(C+1)+j+1)*W +: W] = a_q;
                assign w_link[((i+1)*C+j)*W +: W] = w_q;
                // the bottom row's sum goes straight into out (registered there)
                assign p_link[((i+1)*C+j)*ACC +: ACC] = (i == R - 1) ? p_out : p_q;
            end
        end
    endgenerate

    integer oj, ot, on;
    always @(posedge clk) begin
        if (busy) begin
            for (oj = 0; oj < C; oj = oj + 1) begin
                ot = cyc - (2 * R - 1) - oj;
                on = fc * C + oj;
                if (ot >= 0 && ot < M && on < N)
                    o_mem[ot*N + on] <= (fr == 0 ? {ACC{1'b0}} : o_mem[ot*N + on]) + p_link[(R*C+oj)*ACC +: ACC];
            end
        end
    end

    always @(posedge clk) begin
        if (rst) begin
            busy <= 0; done <= 0; cyc <= 0; fr <= 0; fc <= 0;
        end else if (start && !busy) begin
            busy <= 1; done <= 0; cyc <= 0; fr <= 0; fc <= 0;
        end else if (busy) begin
            if (cyc == FOLD - 1) begin
                cyc <= 0;
                if (fr == FR - 1) begin
                    fr <= 0;
                    if (fc == FC - 1) begin busy <= 0; done <= 1; end
                    else fc <= fc + 1;
                end else fr <= fr + 1;
            end else cyc <= cyc + 1;
        end
    end
endmodule
