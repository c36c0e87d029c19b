// The raw-pointer C++ API of the LSTM, GRU and Elman RNN kernels (csrc/rnn.cu), in the style of
// kiln/api.h: plain C++, device pointers and the stream as integers; bad arguments throw
// std::invalid_argument, CUDA failures std::runtime_error.
//
// Gate order and layout are torch's: LSTM [i | f | g | o], GRU [r | z | n] along the gate
// dimension of gx and w_hh (gates * H, H). The state (h, c, gx and every output) is
// float32, contiguous; w_hh (and the GRU's b_hh) has the storage dtype `dtype` (0 float32,
// 1 float16, 2 bfloat16). All math is float32 (the recurrent dot products are float32 FFMA
// on the weights converted to float32, for every dtype). B == 0 or H == 0: nothing is done.
#pragma once

#include <cstdint>

namespace kiln {

// One LSTM step. gx (B, 4H) = x W_ih^T + b_ih + b_hh, h, c (B, H), w_hh (4H, H) ->
// h_next, c_next (B, H) and gates (B, 4H), the activated [i | f | g | o]:
// pre = gx + h w_hh^T, c_next = f c + i g, h_next = o tanh(c_next).
void lstm_step_forward(std::uintptr_t gx, std::uintptr_t h, std::uintptr_t c, std::uintptr_t w_hh,
                       std::uintptr_t h_next, std::uintptr_t c_next, std::uintptr_t gates, std::int64_t B,
                       std::int64_t H, int dtype, std::uintptr_t stream);

// Gradients of one LSTM step: with tc = tanh(c_next) and dc_tot = dc_next + dh_next o (1 - tc^2),
// dpre (B, 4H) = [dc_tot g i (1 - i) | dc_tot c f (1 - f) | dc_tot i (1 - g^2) | dh_next tc o (1 - o)],
// dh (B, H) = dpre w_hh, dc (B, H) = dc_tot f. Outputs must not overlap the inputs.
void lstm_step_backward(std::uintptr_t dh_next, std::uintptr_t dc_next, std::uintptr_t gates, std::uintptr_t c,
                        std::uintptr_t c_next, std::uintptr_t w_hh, std::uintptr_t dpre, std::uintptr_t dh,
                        std::uintptr_t dc, std::int64_t B, std::int64_t H, int dtype, std::uintptr_t stream);

// One GRU step. gx (B, 3H) = x W_ih^T + b_ih, h (B, H), w_hh (3H, H), b_hh (3H) of dtype or 0:
// gh = h w_hh^T + b_hh, r = sigmoid(gx_r + gh_r), z = sigmoid(gx_z + gh_z),
// n = tanh(gx_n + r gh_n), h_next = (1 - z) n + z h; saved (B, 4H) = [r | z | n | gh_n].
void gru_step_forward(std::uintptr_t gx, std::uintptr_t h, std::uintptr_t w_hh, std::uintptr_t b_hh,
                      std::uintptr_t h_next, std::uintptr_t saved, std::int64_t B, std::int64_t H, int dtype,
                      std::uintptr_t stream);

// Gradients of one GRU step: dn = dh_next (1 - z)(1 - n^2), dz = dh_next (h - n) z (1 - z),
// dr = dn gh_n r (1 - r); dgx (B, 3H) = [dr | dz | dn], dgh (B, 3H) = [dr | dz | dn r],
// dh (B, H) = dh_next z + dgh w_hh. Outputs must not overlap the inputs.
void gru_step_backward(std::uintptr_t dh_next, std::uintptr_t saved, std::uintptr_t h, std::uintptr_t w_hh,
                       std::uintptr_t dgx, std::uintptr_t dgh, std::uintptr_t dh, std::int64_t B, std::int64_t H,
                       int dtype, std::uintptr_t stream);

// One Elman RNN step. gx (B, H) = x W_ih^T + b_ih + b_hh, h (B, H), w_hh (H, H) -> h_next (B, H)
// = act(gx + h w_hh^T), act relu when `relu`, else tanh.
void rnn_step_forward(std::uintptr_t gx, std::uintptr_t h, std::uintptr_t w_hh, std::uintptr_t h_next,
                      std::int64_t B, std::int64_t H, bool relu, int dtype, std::uintptr_t stream);

// Gradients of one Elman step: dpre (B, H) = dh_next act'(pre), act' read from h_next
// (tanh: 1 - h_next^2, relu: h_next > 0), dh (B, H) = dpre w_hh. Outputs must not overlap
// the inputs.
void rnn_step_backward(std::uintptr_t dh_next, std::uintptr_t h_next, std::uintptr_t w_hh, std::uintptr_t dpre,
                       std::uintptr_t dh, std::int64_t B, std::int64_t H, bool relu, int dtype,
                       std::uintptr_t stream);

// Whether the persistent whole-sequence kernels, forward and backward, can run (gates: 4
// LSTM, 3 GRU) for batch B, hidden size H and weight dtype on the current device: one wave
// of blocks, each holding its slice of w_hh (forward: its gate rows, backward: its columns
// of every gate row; the same bytes) in shared memory, all co-resident (cooperative launch).
bool rnn_sequence_fits(int gates, std::int64_t B, std::int64_t H, int dtype);

// The whole LSTM forward over T steps in one persistent (cooperative) launch, when
// rnn_sequence_fits(4, B, H, dtype); returns false, doing nothing, when it does not fit.
// gx (T, B, 4H), h0, c0 (B, H) -> h_all, c_all (T, B, H), gates (T, B, 4H): step t as
// lstm_step_forward on (gx[t], h_all[t-1], c_all[t-1]) (h0, c0 at t = 0). T == 0, B == 0
// or H == 0: nothing to do, returns true.
bool lstm_sequence_forward(std::uintptr_t gx, std::uintptr_t h0, std::uintptr_t c0, std::uintptr_t w_hh,
                           std::uintptr_t h_all, std::uintptr_t c_all, std::uintptr_t gates, std::int64_t T,
                           std::int64_t B, std::int64_t H, int dtype, std::uintptr_t stream);

// The whole GRU forward, as lstm_sequence_forward: gx (T, B, 3H), h0 (B, H), b_hh (3H) or 0
// -> h_all (T, B, H), saved (T, B, 4H); false (nothing done) unless rnn_sequence_fits(3, ...).
bool gru_sequence_forward(std::uintptr_t gx, std::uintptr_t h0, std::uintptr_t w_hh, std::uintptr_t b_hh,
                          std::uintptr_t h_all, std::uintptr_t saved, std::int64_t T, std::int64_t B,
                          std::int64_t H, int dtype, std::uintptr_t stream);

// The whole LSTM backward over T steps in one persistent (cooperative) launch, when
// rnn_sequence_fits(4, B, H, dtype); returns false, doing nothing, when it does not fit.
// dh_all, dc_all (T, B, H) the gradients arriving at h_t, c_t from outside the recurrence,
// gates (T, B, 4H), c0 (B, H), c_all (T, B, H) from the forward -> dpre_all (T, B, 4H), dh0,
// dc0 (B, H): step t (T-1 down to 0) as lstm_step_backward on dh_next = dh_all[t] + dh,
// dc_next = dc_all[t] + dc (dh, dc of step t + 1; zero at t = T-1), c = c_all[t-1] (c0 at
// t = 0), c_next = c_all[t]; dh0, dc0 those of step 0. T == 0, B == 0 or H == 0: nothing
// is done (dh0, dc0 are not written), returns true.
bool lstm_sequence_backward(std::uintptr_t dh_all, std::uintptr_t dc_all, std::uintptr_t gates, std::uintptr_t c0,
                            std::uintptr_t c_all, std::uintptr_t w_hh, std::uintptr_t dpre_all, std::uintptr_t dh0,
                            std::uintptr_t dc0, std::int64_t T, std::int64_t B, std::int64_t H, int dtype,
                            std::uintptr_t stream);

// The whole GRU backward, as lstm_sequence_backward: dh_all (T, B, H), saved (T, B, 4H),
// h0 (B, H), h_all (T, B, H) -> dgx_all, dgh_all (T, B, 3H), dh0 (B, H): step t as
// gru_step_backward on dh_next = dh_all[t] + dh, h = h_all[t-1] (h0 at t = 0); false
// (nothing done) unless rnn_sequence_fits(3, ...).
bool gru_sequence_backward(std::uintptr_t dh_all, std::uintptr_t saved, std::uintptr_t h0, std::uintptr_t h_all,
                           std::uintptr_t w_hh, std::uintptr_t dgx_all, std::uintptr_t dgh_all, std::uintptr_t dh0,
                           std::int64_t T, std::int64_t B, std::int64_t H, int dtype, std::uintptr_t stream);

}  // namespace kiln
