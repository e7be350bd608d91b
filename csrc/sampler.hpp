// phi3edge sampling kernel: one step for every row of a batch, each row with its own parameters.
//
// Pipeline per row, in this order (DESIGN.md, "Sampling semantics"):
//   1. logit_bias          l[id] += bias[id]
//   2. penalties           l[j]  -= c[j] * frequency_penalty + (c[j] > 0) * presence_penalty,
//                          only over the ids this row generated (c = RowState counts)
//   2b. allowed mask       l[j]  = -inf where the row's constraint bitmask clears bit j
//                          (structured output); steps 3-7 then see only the allowed tokens
//   3. reported logprobs   log_softmax(l) at temperature 1: the chosen token's logprob (NaN when
//                          the row asks for none: neither logprobs nor top_logprobs) and the
//                          top_logprobs best alternatives (logprob desc, then id asc)
//   4. temperature         0 -> argmax (ties -> lowest id), steps 5-7 skipped; else l / temperature
//   5. top_k               keep the k best (ties -> lower id); 0 = off
//   6. top_p               keep the smallest best-first prefix whose probability reaches top_p
//   7. sample              one uniform draw from the row's RNG over the renormalised kept set
// Neutral parameters are no-ops. The caller's logits are never written. All rows are computed
// before any RowState is touched, so a failing call leaves every state as it was; afterwards each
// row's RNG advances by exactly one draw and accept(token) counts the chosen token.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "rng.hpp"

namespace phi3edge {

constexpr int kMaxTopLogprobs = 20;

struct BiasEntry {
    std::int64_t id;
    double value;
};

// Immutable per-request parameters. The constructor validates every range and throws
// std::invalid_argument naming the offending parameter.
class SamplingParams {
public:
    SamplingParams(double temperature, double top_p, std::int64_t top_k, double presence_penalty,
                   double frequency_penalty, std::vector<BiasEntry> logit_bias, int top_logprobs,
                   bool logprobs = true);

    double temperature() const { return temperature_; }
    double top_p() const { return top_p_; }
    std::int64_t top_k() const { return top_k_; }
    double presence_penalty() const { return presence_penalty_; }
    double frequency_penalty() const { return frequency_penalty_; }
    const std::vector<BiasEntry>& logit_bias() const { return logit_bias_; }  // sorted by id
    int top_logprobs() const { return top_logprobs_; }
    bool logprobs() const { return logprobs_; }  // report the chosen token's logprob
    // Whether step 3's normaliser is needed: without it a greedy row skips an exp pass.
    bool reports_logprobs() const { return logprobs_ || top_logprobs_ > 0; }

private:
    double temperature_;
    double top_p_;
    std::int64_t top_k_;
    double presence_penalty_;
    double frequency_penalty_;
    std::vector<BiasEntry> logit_bias_;
    int top_logprobs_;
    bool logprobs_;
};

struct Workspace;  // scratch buffers for the rows of a call (sampler.cpp)

// Per-choice state: counts of generated tokens (updated in O(1), never recounted) and the RNG.
// It also holds scratch buffers, allocated the first time the state leads a batch (is states[0])
// and reused by every later call it leads, so that a step allocates nothing and all rows of a call
// share one cache-warm workspace. A state must not be used by two calls at the same time.
class RowState {
public:
    RowState(std::int64_t vocab_size, std::uint64_t seed, std::int64_t row_index);
    RowState(RowState&&) noexcept;
    RowState& operator=(RowState&&) noexcept;
    RowState(const RowState&) = delete;
    RowState& operator=(const RowState&) = delete;
    ~RowState();

    void accept(std::int64_t token);
    std::uint32_t count(std::int64_t token) const;
    void reset();

    std::int64_t vocab_size() const { return static_cast<std::int64_t>(counts_.size()); }
    const std::vector<std::uint32_t>& counts() const { return counts_; }
    const std::vector<std::int32_t>& generated_ids() const { return generated_ids_; }  // distinct

    double peek_uniform() const;  // the next draw, without consuming it
    void consume_uniform() { rng_.next(); }
    Workspace& workspace();

private:
    void check_token(std::int64_t token) const;

    std::vector<std::uint32_t> counts_;
    std::vector<std::int32_t> generated_ids_;
    Xoshiro256ss initial_rng_;
    Xoshiro256ss rng_;
    std::unique_ptr<Workspace> workspace_;
};

// Raw views of one call's arrays (the binding owns them and checks their shapes).
struct BatchView {
    const float* logits;  // [rows, vocab], C order
    std::int64_t rows;
    std::int64_t vocab;
    int top_slots;          // K = max top_logprobs over the rows
    std::int32_t* tokens;   // [rows]
    float* logprobs;        // [rows]
    std::int32_t* top_ids;  // [rows, K]
    float* top_logprobs;    // [rows, K]
    // Optional [rows, allowed_words] bitmask, bit j of word j / 32 set = token j allowed (the
    // layout of llguidance's token bitmask); null = every token allowed in every row.
    const std::uint32_t* allowed = nullptr;
    std::int64_t allowed_words = 0;
};

// Runs steps 1-7 for every row, then commits the choices to the states. Throws
// std::invalid_argument (and leaves every state untouched) on non-finite logits, a vocabulary
// mismatch, a bias id outside the vocabulary or a mask that allows no token of a row. Masked
// tokens are never chosen nor reported among the top alternatives. Does not touch Python: safe without the GIL.
void sample_batch(const BatchView& batch, const std::vector<const SamplingParams*>& params,
                  const std::vector<RowState*>& states);

// out[r, :] = lowest finite float, except out[r, tokens[r]] = 0. Throws std::invalid_argument on an
// id outside [0, vocab) before writing anything.
void fill_forced_logits(const std::vector<std::int64_t>& tokens, std::int64_t vocab, float* out);

}  // namespace phi3edge
