`timescale 1ns/1ps
// kiln: an output-stationary systolic array of R x C signed MACs for one GEMM,
// out (M x N) = a (M x K) @ b (K x N). Emitted by kiln.hw.systolic_rtl; its cycle count is
// kiln.hw.systolic's (SCALE-Sim's compute model): ceil(M/R) * ceil(N/C) folds of R + C + K - 2.
//
// Per fold: row i of the tile of a enters the left edge delayed by i cycles, column j of the
// tile of b enters the top edge delayed by j; each PE multiplies what passes it and keeps the
// sum. A `last` flag travels with a: when a PE takes its last product (cycle K - 1 + i + j of
// the fold) it hands its sum to out and clears itself for the next fold.
module kiln_systolic_os #(
    parameter integer R = 4, C = 4, M = 8, N = 8, K = 8, W = 8, ACC = 32
) (
    input  wire clk,
    input  wire rst,
    input  wire start,
    output reg  busy,
    output reg  done
);
    localparam integer FR = (M + R - 1) / R;       // folds over out's rows (array rows)
    localparam integer FC = (N + C - 1) / C;       // folds over out's columns (array columns)
    localparam integer FOLD = R + C + K - 2;       // cycles per fold

    reg signed [W-1:0]   a_mem [0:M*K-1];          // row-major M x K
    reg signed [W-1:0]   b_mem [0:K*N-1];          // row-major K x N
    reg signed [ACC-1:0] o_mem [0:M*N-1];          // row-major M x N

    integer fr, fc, cyc;

    wire [R*(C+1)*W-1:0] a_link;
    wire [R*(C+1)-1:0]   l_link;                   // the `last` flag, beside a
    wire [(R+1)*C*W-1:0] b_link;
    wire [R*C*ACC-1:0]   res;                      // each PE's finished sum
    wire [R*C-1:0]       fin;                      // ... valid this cycle
    reg  [R*W-1:0]       a_edge;
    reg  [R-1:0]         l_edge;
    reg  [C*W-1:0]       b_edge;

    integer ei, ej, ek, em, en;
    always @* begin
        for (ei = 0; ei < R; ei = ei + 1) begin    // row i takes a[fr*R + i][k] at cycle k + i
            ek = cyc - ei;
            em = fr * R + ei;
            a_edge[ei*W +: W] = (busy && ek >= 0 && ek < K && em < M) ? a_mem[em*K + ek] : {W{1'b0}};
            l_edge[ei] = busy && ek == K - 1;
        end
        for (ej = 0; ej < C; ej = ej + 1) begin    // column j takes b[k][fc*C + j] at cycle k + j
            ek = cyc - ej;
            en = fc * C + ej;
            b_edge[ej*W +: W] = (busy && ek >= 0 && ek < K && en < N) ? b_mem[ek*N + en] : {W{1'b0}};
        end
    end

    genvar i, j;
    generate
        for (j = 0; j < C; j = j + 1) begin : top
            assign b_link[j*W +: W] = b_edge[j*W +: W];
        end
        for (i = 0; i < R; i = i + 1) begin : row
            assign a_link[i*(C+1)*W +: W] = a_edge[i*W +: W];
            assign l_link[i*(C+1)] = l_edge[i];
            for (j = 0; j < C; j = j + 1) begin : col
                reg signed [W-1:0]   a_q, b_q;
                reg                  l_q;
                reg signed [ACC-1:0] acc;
                wire signed [W-1:0]   a_in = a_link[(i*(C+1)+j)*W +: W];
                wire                  l_in = l_link[i*(C+1)+j];
                wire signed [W-1:0]   b_in = b_link[(i*C+j)*W +: W];
                wire signed [ACC-1:0] sum = acc + a_in * b_in;
                always @(posedge clk) begin
                    if (rst) begin
                        a_q <= 0; b_q <= 0; l_q <= 0; acc <= 0;
                    end else begin
                        a_q <= a_in; b_q <= b_in; l_q <= l_in;
                        acc <= l_in ? {ACC{1'b0}} : sum;
                    end
                end
                assign a_link[(i*(C+1)+j+1)*W +: W] = a_q;
                assign l_link[i*(C+1)+j+1] = l_q;
                assign b_link[((i+1)*C+j)*W +: W] = b_q;
                assign res[(i*C+j)*ACC +: ACC] = sum;
                assign fin[i*C+j] = l_in;
            end
        end
    endgenerate

    integer oi, oj, om, on;
    always @(posedge clk) begin
        for (oi = 0; oi < R; oi = oi + 1)
            for (oj = 0; oj < C; oj = oj + 1) begin
                om = fr * R + oi;
                on = fc * C + oj;
                if (fin[oi*C+oj] && om < M && on < N) o_mem[om*N + on] <= res[(oi*C+oj)*ACC +: ACC];
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
