// phi3edge sampling kernel. The pipeline and its order are described in sampler.hpp.
//
// Speed comes from touching the vocabulary as few times as possible (V = 32064 for Phi-3):
//   1-2  copy the row while taking its column maxima and checking finiteness (one pass), then
//        apply bias and penalties as sparse edits (refreshing the edited columns' maxima)
//   3-4  one exp pass at temperature 1 (the logprob normaliser, skipped when the row reports no
//        logprobs) and one at the temperature (the sampling weights), with a branch-free exp2
//        that vectorises
//   3-6  candidates: the tokens above a threshold, chosen from a histogram of the column maxima
//        (or, for flat rows, of the whole row) so that they surely hold the top_logprobs, top_k
//        and top_p sets; only the columns whose maximum reaches the threshold are visited
//   3-6  on the candidates: partial_sort_copy for the reported alternatives (the candidates keep
//        their order, which the draw walks), nth_element for top_k,
//        a weight histogram plus one sorted bin for the top_p boundary; when top_p's nucleus
//        spans much of a flat row, its boundary is searched over the whole row instead
//        (row_nucleus) and the candidates are only the reported alternatives
//   7    an inverse-CDF walk over the kept candidates in gather order (or over the whole row in
//        blocks, in id order)
// The row is seen as groups of 16 x 16 floats; a column is one lane of one group (16 elements with
// stride 16), so column maxima come from purely vertical, vectorised max operations. Hot loops run
// over 16 float lanes so that compilers vectorise them for any ISA with identical results; on
// x86-64 Linux GCC also builds AVX2 and AVX-512 clones (neither enables FMA, so every clone gives
// bit-identical results).
#include "sampler.hpp"

#include <algorithm>
#include <array>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

#if defined(__GNUC__) && !defined(__clang__)
// Keeps GCC from fully unrolling a 16-lane loop before the vectoriser sees it.
#define PHI3EDGE_LANE_LOOP _Pragma("GCC unroll 1")
#if defined(__x86_64__) && defined(__linux__)
#define PHI3EDGE_MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#endif
#endif
#ifndef PHI3EDGE_LANE_LOOP
#define PHI3EDGE_LANE_LOOP
#endif
#ifndef PHI3EDGE_MULTIVERSION
#define PHI3EDGE_MULTIVERSION
#endif

namespace phi3edge {

constexpr std::int64_t kLanes = 16;               // float accumulators per loop (vector width)
constexpr std::int64_t kGroup = kLanes * kLanes;  // a group: 16 rows of 16 lanes

// A candidate token. key orders by logit descending, then id ascending (see rank_key).
struct Candidate {
    std::uint64_t key;
    float logit;
    float weight;  // exp((logit - max) / temperature); 0 when greedy
};

// Scratch buffers for the rows of a call, owned by the call's first RowState and reused.
struct Workspace {
    explicit Workspace(std::int64_t vocab)
        : logits(static_cast<std::size_t>(vocab)),
          weights(static_cast<std::size_t>(vocab)),
          column_max(static_cast<std::size_t>((vocab + kGroup - 1) / kGroup * kLanes)),
          column_weight(column_max.size()),
          column_count(column_max.size()),
          group_mass(static_cast<std::size_t>((vocab + kGroup - 1) / kGroup)),
          ids(static_cast<std::size_t>(vocab)) {}

    std::vector<float> logits;      // the processed row (steps 1-2)
    std::vector<float> weights;     // exp((logit - max) / temperature)
    std::vector<float> column_max;  // max of each column of the processed row
    std::vector<float> column_weight;
    std::vector<std::int32_t> column_count;  // row_nucleus: boundary tokens per column
    std::vector<double> group_mass;
    std::vector<std::int32_t> ids;  // gathered candidate ids
    std::vector<Candidate> candidates;  // in gather order (a fixed order of the ids)
    std::vector<Candidate> best;        // the best-ranked candidates, sorted (steps 3 and 4)
    std::vector<Candidate> boundary;    // the candidates in top_p_nucleus's boundary bin
};

// ---------------------------------------------------------------------------------------------
// SamplingParams and RowState
// ---------------------------------------------------------------------------------------------

namespace {

// Throws std::invalid_argument(message()) unless ok; the message is only built on failure.
template <typename Message>
void require(bool ok, const Message& message) {
    if (!ok) {
        throw std::invalid_argument(message());
    }
}

std::string num(double value) {
    std::ostringstream text;
    text << value;
    return text.str();
}

std::vector<BiasEntry> sorted_bias(std::vector<BiasEntry> bias) {
    for (const BiasEntry& entry : bias) {
        require(entry.id >= 0,
                [&] { return "logit_bias ids must be >= 0, got " + std::to_string(entry.id); });
        require(std::isfinite(entry.value) && entry.value >= -100.0 && entry.value <= 100.0, [&] {
            return "logit_bias values must be finite and in [-100, 100], got " + num(entry.value) +
                   " for id " + std::to_string(entry.id);
        });
    }
    std::sort(bias.begin(), bias.end(),
              [](const BiasEntry& a, const BiasEntry& b) { return a.id < b.id; });
    return bias;
}

double checked_penalty(double value, const char* name) {
    require(std::isfinite(value) && value >= -2.0 && value <= 2.0, [&] {
        return std::string(name) + " must be finite and in [-2, 2], got " + num(value);
    });
    return value;
}

std::int64_t checked_vocab(std::int64_t vocab_size) {
    require(vocab_size >= 1 && vocab_size <= std::numeric_limits<std::int32_t>::max(), [&] {
        return "vocab_size must be in [1, 2**31 - 1], got " + std::to_string(vocab_size);
    });
    return vocab_size;
}

std::uint64_t checked_row_index(std::int64_t row_index) {
    require(row_index >= 0,
            [&] { return "row_index must be >= 0, got " + std::to_string(row_index); });
    return static_cast<std::uint64_t>(row_index);
}

}  // namespace

SamplingParams::SamplingParams(double temperature, double top_p, std::int64_t top_k,
                               double presence_penalty, double frequency_penalty,
                               std::vector<BiasEntry> logit_bias, int top_logprobs,
                               bool logprobs)
    : temperature_(temperature),
      top_p_(top_p),
      top_k_(top_k),
      presence_penalty_(checked_penalty(presence_penalty, "presence_penalty")),
      frequency_penalty_(checked_penalty(frequency_penalty, "frequency_penalty")),
      logit_bias_(sorted_bias(std::move(logit_bias))),
      top_logprobs_(top_logprobs),
      logprobs_(logprobs) {
    require(std::isfinite(temperature) && temperature >= 0.0 && temperature <= 2.0,
            [&] { return "temperature must be finite and in [0, 2], got " + num(temperature); });
    require(top_p > 0.0 && top_p <= 1.0,
            [&] { return "top_p must be in (0, 1], got " + num(top_p); });
    require(top_k >= 0,
            [&] { return "top_k must be >= 0 (0 disables it), got " + std::to_string(top_k); });
    require(top_logprobs >= 0 && top_logprobs <= kMaxTopLogprobs,
            [&] { return "top_logprobs must be in [0, 20], got " + std::to_string(top_logprobs); });
}

RowState::RowState(std::int64_t vocab_size, std::uint64_t seed, std::int64_t row_index)
    : counts_(static_cast<std::size_t>(checked_vocab(vocab_size)), 0U),
      initial_rng_(seed, checked_row_index(row_index)),
      rng_(initial_rng_) {}

RowState::RowState(RowState&&) noexcept = default;
RowState& RowState::operator=(RowState&&) noexcept = default;
RowState::~RowState() = default;

Workspace& RowState::workspace() {
    if (!workspace_) {
        workspace_ = std::make_unique<Workspace>(vocab_size());
    }
    return *workspace_;
}

void RowState::check_token(std::int64_t token) const {
    require(token >= 0 && token < vocab_size(), [&] {
        return "token " + std::to_string(token) + " is out of range for vocab_size " +
               std::to_string(vocab_size());
    });
}

void RowState::accept(std::int64_t token) {
    check_token(token);
    std::uint32_t& count = counts_[static_cast<std::size_t>(token)];
    if (count == 0) {
        generated_ids_.push_back(static_cast<std::int32_t>(token));
    }
    if (count < std::numeric_limits<std::uint32_t>::max()) {
        ++count;
    }
}

std::uint32_t RowState::count(std::int64_t token) const {
    check_token(token);
    return counts_[static_cast<std::size_t>(token)];
}

void RowState::reset() {
    for (const std::int32_t id : generated_ids_) {
        counts_[static_cast<std::size_t>(id)] = 0;
    }
    generated_ids_.clear();
    rng_ = initial_rng_;
}

double RowState::peek_uniform() const {
    Xoshiro256ss copy = rng_;
    return copy.uniform();
}

// ---------------------------------------------------------------------------------------------
// Vectorisable passes over one row
// ---------------------------------------------------------------------------------------------

namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

// 2^t for t <= 0, branch-free so that loops calling it vectorise: t = n + f with f in
// [-0.5, 0.5], 2^f from a degree-5 polynomial fitted for relative error (< 2e-7), 2^n from the
// exponent bits. Exactly 1 at t = 0 and exactly 0 below -126 (where expf would underflow).
inline float exp2_nonpositive(float t) {
    constexpr float kMin = -126.0F;
    constexpr float kRound = 12582912.0F;  // 1.5 * 2^23: (x + kRound) - kRound rounds x
    const float clamped = std::max(t, kMin);
    const float n = (clamped + kRound) - kRound;
    const float f = clamped - n;
    float p = 1.326472731307149e-3F;
    p = p * f + 9.671512991189957e-3F;
    p = p * f + 5.550733581185341e-2F;
    p = p * f + 2.4022242426872253e-1F;
    p = p * f + 6.931470036506653e-1F;
    p = p * f + 1.0F;
    const std::int32_t bits = (static_cast<std::int32_t>(n) + 127) * (1 << 23);
    float power = 0.0F;
    std::memcpy(&power, &bits, sizeof power);
    const float result = p * power;
    return t >= kMin ? result : 0.0F;
}

// The elements of column c of a row of n floats: first, first + 16, ... (up to 16, below n).
struct Column {
    std::int64_t first;
    std::int64_t end;
};

inline Column column_of(std::int64_t c, std::int64_t n) {
    const std::int64_t first = (c / kLanes) * kGroup + c % kLanes;
    return Column{first, std::min(n, first + kGroup)};
}

// Writes every column's maximum of x (-inf for empty columns) and, with kCopy, copies x to out;
// returns whether every value is finite. One pass; x * 0 is 0 for finite x and NaN for NaN and
// +-inf.
template <bool kCopy>
PHI3EDGE_MULTIVERSION bool scan_columns(const float* __restrict x, std::int64_t n,
                                        float* __restrict out, float* __restrict column_max) {
    float poison[kLanes] = {};
    const std::int64_t groups = n / kGroup;
    for (std::int64_t g = 0; g < groups; ++g) {
        const float* src = x + g * kGroup;
        float lane[kLanes];
        for (std::int64_t j = 0; j < kLanes; ++j) {
            lane[j] = -kInf;
        }
        for (std::int64_t r = 0; r < kGroup; r += kLanes) {
            PHI3EDGE_LANE_LOOP
            for (std::int64_t j = 0; j < kLanes; ++j) {
                const float v = src[r + j];
                if constexpr (kCopy) {
                    out[g * kGroup + r + j] = v;
                }
                lane[j] = std::max(lane[j], v);
                poison[j] += v * 0.0F;
            }
        }
        for (std::int64_t j = 0; j < kLanes; ++j) {
            column_max[g * kLanes + j] = lane[j];
        }
    }
    float finite = 0.0F;
    if (groups * kGroup < n) {
        std::fill(column_max + groups * kLanes, column_max + (groups + 1) * kLanes, -kInf);
        for (std::int64_t i = groups * kGroup; i < n; ++i) {
            float& m = column_max[groups * kLanes + i % kLanes];
            if constexpr (kCopy) {
                out[i] = x[i];
            }
            m = std::max(m, x[i]);
            finite += x[i] * 0.0F;
        }
    }
    for (const float p : poison) {
        finite += p;
    }
    return finite == 0.0F;
}

bool copy_with_column_max(const float* x, std::int64_t n, float* out, float* column_max) {
    return scan_columns<true>(x, n, out, column_max);
}

inline std::int64_t popcount32(std::uint32_t v) {
    std::int64_t count = 0;
    for (; v != 0; v &= v - 1) {
        ++count;
    }
    return count;
}

// Step 2b on the copied row: x[j] = -inf where bit j of allowed is clear, then the column maxima
// again. Returns how many of the n tokens are allowed (bits at or beyond n are ignored).
std::int64_t apply_allowed(const std::uint32_t* allowed, std::int64_t n, float* x,
                           float* column_max) {
    const std::int64_t words = (n + 31) / 32;
    std::int64_t count = 0;
    bool masked = false;
    for (std::int64_t w = 0; w < words; ++w) {
        const std::int64_t base = w * 32;
        const std::int64_t width = std::min<std::int64_t>(32, n - base);
        const std::uint32_t in_range = width == 32 ? ~0U : (1U << width) - 1U;
        const std::uint32_t bits = allowed[w] & in_range;
        count += popcount32(bits);
        if (bits == in_range) {
            continue;
        }
        masked = true;
        for (std::int64_t j = 0; j < width; ++j) {
            if (((bits >> j) & 1U) == 0U) {
                x[base + j] = -kInf;
            }
        }
    }
    if (masked) {
        scan_columns<false>(x, n, nullptr, column_max);
    }
    return count;
}

// The largest (kLargest) or smallest value of x[0, n).
template <bool kLargest>
PHI3EDGE_MULTIVERSION float extreme_of(const float* __restrict x, std::int64_t n) {
    const auto pick = [](float a, float b) { return kLargest ? std::max(a, b) : std::min(a, b); };
    const float start = kLargest ? -kInf : kInf;
    float lane[kLanes];
    for (std::int64_t j = 0; j < kLanes; ++j) {
        lane[j] = start;
    }
    std::int64_t i = 0;
    for (; i + kLanes <= n; i += kLanes) {
        for (std::int64_t j = 0; j < kLanes; ++j) {
            lane[j] = pick(lane[j], x[i + j]);
        }
    }
    float m = start;
    for (; i < n; ++i) {
        m = pick(m, x[i]);
    }
    for (const float v : lane) {
        m = pick(m, v);
    }
    return m;
}

// The sum of a group's 16 lane accumulators by a pairwise tree (lane is overwritten); the one
// summation order every group mass uses, so that masses from different passes agree bit for bit.
inline double lane_total(float* lane) {
    for (std::int64_t width = kLanes / 2; width > 0; width /= 2) {
        for (std::int64_t j = 0; j < width; ++j) {
            lane[j] += lane[j + width];
        }
    }
    return static_cast<double>(lane[0]);
}

// Sum over the row of 2^((x[i] - shift) * scale) (scale = log2(e) / temperature). With kStore,
// also writes each term to w and each group's sum to group_mass. Each group is summed in float
// lanes (16 terms each, then a pairwise tree: error ~1e-7 relative); groups add in double.
template <bool kStore>
PHI3EDGE_MULTIVERSION double exp_sum(const float* __restrict x, std::int64_t n, float shift,
                                     float scale, float* __restrict w,
                                     double* __restrict group_mass) {
    double total = 0.0;
    const std::int64_t groups = (n + kGroup - 1) / kGroup;
    for (std::int64_t g = 0; g < groups; ++g) {
        const std::int64_t base = g * kGroup;
        float lane[kLanes] = {};
        if (base + kGroup <= n) {
            for (std::int64_t r = 0; r < kGroup; r += kLanes) {
                for (std::int64_t j = 0; j < kLanes; ++j) {
                    const float e = exp2_nonpositive((x[base + r + j] - shift) * scale);
                    if constexpr (kStore) {
                        w[base + r + j] = e;
                    }
                    lane[j] += e;
                }
            }
        } else {
            for (std::int64_t i = base; i < n; ++i) {
                const float e = exp2_nonpositive((x[i] - shift) * scale);
                if constexpr (kStore) {
                    w[i] = e;
                }
                lane[i % kLanes] += e;
            }
        }
        const double sum = lane_total(lane);
        if constexpr (kStore) {
            group_mass[g] = sum;
        }
        total += sum;
    }
    return total;
}

// w[i] = 2^((x[i] - shift) * scale), for short arrays (the column maxima).
PHI3EDGE_MULTIVERSION
void exp_terms(const float* __restrict x, std::int64_t n, float shift, float scale,
               float* __restrict w) {
    for (std::int64_t i = 0; i < n; ++i) {
        w[i] = exp2_nonpositive((x[i] - shift) * scale);
    }
}

// ---------------------------------------------------------------------------------------------
// Candidates
// ---------------------------------------------------------------------------------------------

// Higher logit first, ties -> lower id, as one unsigned key (smaller key = better rank).
inline std::uint64_t rank_key(float logit, std::int32_t id) {
    const float normalized = logit + 0.0F;  // -0 -> +0, so that -0 and +0 tie as in float compare
    std::uint32_t bits = 0;
    std::memcpy(&bits, &normalized, sizeof bits);
    const std::uint32_t ascending = (bits & 0x80000000U) != 0 ? ~bits : (bits | 0x80000000U);
    return (static_cast<std::uint64_t>(~ascending) << 32U) | static_cast<std::uint32_t>(id);
}

inline std::int32_t id_of(const Candidate& c) { return static_cast<std::int32_t>(c.key); }

inline bool ranks_before(const Candidate& a, const Candidate& b) { return a.key < b.key; }

// Sum of weight(i) for i < n, in four independent chains (no serial add latency).
template <typename Weight>
double sum_of(std::size_t n, const Weight& weight) {
    double acc[4] = {};
    std::size_t i = 0;
    for (; i + 4 <= n; i += 4) {
        for (std::size_t j = 0; j < 4; ++j) {
            acc[j] += static_cast<double>(weight(i + j));
        }
    }
    for (; i < n; ++i) {
        acc[0] += static_cast<double>(weight(i));
    }
    return (acc[0] + acc[1]) + (acc[2] + acc[3]);
}

double total_weight(const Candidate* c, std::size_t n) {
    return sum_of(n, [c](std::size_t i) { return c[i].weight; });
}

// Counts and weights of tokens by distance below the row maximum, in bins of 1/kBinsPerUnit unit
// down to kUnits units (farther tokens are ignored); threshold() turns them into a gather
// threshold. kWays interleaved copies keep consecutive adds to one bin from waiting on each other.
class DistanceHistogram {
public:
    DistanceHistogram(float max, float unit)
        : max_(max), bins_per_logit_(static_cast<float>(kBinsPerUnit) / unit) {}

    // Adds values[i] with weights[i] (weight 0 when weights is null).
    void add(const float* values, const float* weights, std::int64_t n) {
        for (std::int64_t i = 0; i < n; ++i) {
            const float distance = std::min((max_ - values[i]) * bins_per_logit_, kFar);
            const auto bin = static_cast<std::size_t>(distance) * kWays + i % kWays;
            ++count_[bin];
            mass_[bin] += weights != nullptr ? static_cast<double>(weights[i]) : 0.0;
        }
    }

    // The highest bin edge above which the tokens reach min_count and min_mass; -inf if none.
    float threshold(std::size_t min_count, double min_mass) const {
        std::size_t count = 0;
        double mass = 0.0;
        for (std::size_t b = 0; b < kBins; ++b) {
            for (std::size_t way = 0; way < kWays; ++way) {
                count += count_[b * kWays + way];
                mass += mass_[b * kWays + way];
            }
            if (count >= min_count && mass >= min_mass) {
                return max_ - static_cast<float>(b + 1) / bins_per_logit_;
            }
        }
        return -kInf;
    }

private:
    static constexpr int kBinsPerUnit = 4;
    static constexpr int kUnits = 32;
    static constexpr std::size_t kBins = kBinsPerUnit * kUnits;
    static constexpr float kFar = static_cast<float>(kBins);  // the overflow bin
    static constexpr std::int64_t kWays = 4;

    float max_;
    float bins_per_logit_;
    std::array<std::uint32_t, (kBins + 1) * kWays> count_{};
    std::array<double, (kBins + 1) * kWays> mass_{};
};

// Writes the id of every x[id] >= threshold to ids, visiting only columns whose maximum reaches
// it (ids come column by column). Returns the count.
std::size_t gather_ids(const float* x, std::int64_t n, const float* column_max, float threshold,
                       std::int32_t* ids) {
    std::size_t count = 0;
    const std::int64_t columns = (n + kGroup - 1) / kGroup * kLanes;
    for (std::int64_t c = 0; c < columns; ++c) {
        if (!(column_max[c] >= threshold)) {
            continue;
        }
        const Column column = column_of(c, n);
        for (std::int64_t i = column.first; i < column.end; i += kLanes) {
            ids[count] = static_cast<std::int32_t>(i);  // branch-free: kept only if counted
            count += x[i] >= threshold ? 1 : 0;
        }
    }
    return count;
}

// The column maxima by distance below the row maximum (weighted when asked): they are tokens
// themselves, so the tokens above a threshold are at least as many and as heavy as the column
// maxima above it. Its threshold() is -inf when those lower bounds never suffice (flat rows).
DistanceHistogram column_sketch(Workspace& ws, float max, float unit, float scale, bool weighted) {
    const float* column_max = ws.column_max.data();
    const auto columns = static_cast<std::int64_t>(ws.column_max.size());
    if (weighted) {
        exp_terms(column_max, columns, max, scale, ws.column_weight.data());
    }
    DistanceHistogram sketch(max, unit);
    sketch.add(column_max, weighted ? ws.column_weight.data() : nullptr, columns);
    return sketch;
}

// Fills ws.candidates (unordered) with at least min_count tokens holding at least min_mass weight:
// every token above threshold (from column_sketch). When that is -inf, a histogram of the whole
// row gives it; when rounding at a bin edge still falls short, the whole row is taken.
std::size_t gather_candidates(Workspace& ws, std::int64_t vocab, float max, float unit,
                              const float* weights, std::size_t min_count, double min_mass,
                              float threshold) {
    const float* logits = ws.logits.data();
    const float* column_max = ws.column_max.data();
    const bool weighted = min_mass > 0.0;
    if (threshold == -kInf) {
        DistanceHistogram exact(max, unit);
        exact.add(logits, weighted ? weights : nullptr, vocab);
        threshold = exact.threshold(min_count, min_mass);
    }
    std::int32_t* ids = ws.ids.data();
    std::size_t n = gather_ids(logits, vocab, column_max, threshold, ids);
    const auto enough = [&] {
        return n >= min_count &&
               (!weighted || sum_of(n, [&](std::size_t i) { return weights[ids[i]]; }) >= min_mass);
    };
    if (!enough()) {
        n = gather_ids(logits, vocab, column_max, -kInf, ids);
    }
    ws.candidates.resize(n);
    for (std::size_t i = 0; i < n; ++i) {
        const std::int32_t id = ids[i];
        ws.candidates[i] = Candidate{rank_key(logits[id], id), logits[id],
                                     weights != nullptr ? weights[id] : 0.0F};
    }
    return n;
}

// The kept set of steps 5-6: the candidates whose key is <= last_key, and their weight.
struct Kept {
    std::uint64_t last_key;
    double mass;
};

// Step 6 on c[0, n): the smallest best-ranked prefix whose weight reaches target (c stays
// unordered). A histogram of the weights by logit (kBins bins spanning the tokens with nonzero
// weight) finds the boundary bin, and only that bin is sorted: O(n).
Kept top_p_nucleus(const Candidate* c, std::size_t n, double target,
                   std::vector<Candidate>& boundary) {
    constexpr std::size_t kBins = 1024;
    float hi = -kInf;
    float lo = kInf;
    for (std::size_t i = 0; i < n; ++i) {
        if (c[i].weight > 0.0F) {
            hi = std::max(hi, c[i].logit);
            lo = std::min(lo, c[i].logit);
        }
    }
    float per_logit = static_cast<float>(kBins) / (hi - lo);
    if (!(per_logit < FLT_MAX)) {  // a single logit carries all the weight
        per_logit = 0.0F;
    }
    const auto bin_of = [hi, per_logit](const Candidate& x) {
        return std::min(kBins - 1, static_cast<std::size_t>((hi - x.logit) * per_logit));
    };
    std::array<double, kBins> mass{};
    for (std::size_t i = 0; i < n; ++i) {
        if (c[i].weight > 0.0F) {
            mass[bin_of(c[i])] += static_cast<double>(c[i].weight);
        }
    }
    std::size_t bin = 0;
    double kept = 0.0;  // weight of the bins before `bin`
    while (bin + 1 < kBins && kept + mass[bin] < target) {
        kept += mass[bin++];
    }
    boundary.clear();
    for (std::size_t i = 0; i < n; ++i) {
        if (c[i].weight > 0.0F && bin_of(c[i]) == bin) {
            boundary.push_back(c[i]);
        }
    }
    std::sort(boundary.begin(), boundary.end(), ranks_before);
    for (const Candidate& x : boundary) {
        kept += static_cast<double>(x.weight);
        if (kept >= target) {
            return Kept{x.key, kept};
        }
    }
    return Kept{std::numeric_limits<std::uint64_t>::max(), total_weight(c, n)};  // rounding
}

// Step 7 on the candidates: inverse-CDF draw over the kept ones, in array order; never returns a
// zero-weight token.
std::int32_t draw_candidate(const Candidate* c, std::size_t n, const Kept& kept, double u) {
    const double target = u * kept.mass;
    double mass = 0.0;
    std::int32_t last = id_of(c[0]);
    for (std::size_t i = 0; i < n; ++i) {
        if (c[i].key <= kept.last_key && c[i].weight > 0.0F) {
            mass += static_cast<double>(c[i].weight);
            last = id_of(c[i]);
            if (mass > target) {
                break;
            }
        }
    }
    return last;
}

// Step 7 on the whole row: inverse-CDF draw in id order, skipping whole groups by their mass.
std::int32_t draw_full(const float* w, const double* group_mass, std::int64_t n, double total,
                       double u) {
    const double target = u * total;
    const std::int64_t groups = (n + kGroup - 1) / kGroup;
    double mass = 0.0;
    std::int64_t g = 0;
    while (g + 1 < groups && mass + group_mass[g] <= target) {
        mass += group_mass[g++];
    }
    std::int64_t last = g * kGroup;
    for (std::int64_t i = g * kGroup; i < n; ++i) {
        if (w[i] > 0.0F) {
            mass += static_cast<double>(w[i]);
            last = i;
            if (mass > target) {
                break;
            }
        }
    }
    return static_cast<std::int32_t>(last);
}

// Step 6 on a flat row (no top_k, and the column maxima cannot bound the nucleus: it spans much of
// the vocabulary). Instead of gathering and ranking most of the row as candidates, a search on the
// logit narrows an interval [lo, hi) that holds the boundary token, one vectorised pass per round
// that probes two cuts (guessed from a sample of the row, then interpolated; see row_nucleus),
// until it holds at most kBoundaryTokens tokens (or cannot be split: ties). 3-5 rounds on random
// rows of std 0.3-2 at top_p 0.5-0.95 (regula falsi on one cut took about 9). The weighted ones are ranked as in top_p_nucleus. Then the weights outside the kept set are
// zeroed and the group masses refreshed, so that draw_full samples the nucleus in id order.

constexpr std::int64_t kBoundaryTokens = 64;

// The number of the tokens with lo <= x < hi, per column (column_count, as column_max).
PHI3EDGE_MULTIVERSION
void count_columns(const float* __restrict x, std::int64_t n, float lo, float hi,
                   std::int32_t* __restrict column_count) {
    const std::int64_t groups = (n + kGroup - 1) / kGroup;
    for (std::int64_t g = 0; g < groups; ++g) {
        const std::int64_t base = g * kGroup;
        const std::int64_t end = std::min(n, base + kGroup);
        float inside[kLanes] = {};  // counts up to 16: exact in float, and one vector type
        if (end - base == kGroup) {
            for (std::int64_t r = base; r < end; r += kLanes) {
                PHI3EDGE_LANE_LOOP
                for (std::int64_t j = 0; j < kLanes; ++j) {
                    const float v = x[r + j];
                    inside[j] += v >= lo && v < hi ? 1.0F : 0.0F;
                }
            }
        } else {
            for (std::int64_t i = base; i < end; ++i) {
                inside[i % kLanes] += x[i] >= lo && x[i] < hi ? 1.0F : 0.0F;
            }
        }
        for (std::int64_t j = 0; j < kLanes; ++j) {
            column_count[g * kLanes + j] = static_cast<std::int32_t>(inside[j]);
        }
    }
}

// The weight and number of tokens in a slice of the row.
struct Slice {
    double mass = 0.0;
    std::int64_t count = 0;
};

// The slices [upper, hi) and [lower, upper) (lower <= upper), in one pass.
struct TwoSlices {
    Slice upper;
    Slice lower;
};

PHI3EDGE_MULTIVERSION
TwoSlices two_slices(const float* __restrict x, const float* __restrict w, std::int64_t n,
                     float lower, float upper, float hi) {
    TwoSlices out;
    const std::int64_t groups = (n + kGroup - 1) / kGroup;
    for (std::int64_t g = 0; g < groups; ++g) {
        const std::int64_t base = g * kGroup;
        const std::int64_t end = std::min(n, base + kGroup);
        float upper_mass[kLanes] = {};
        float lower_mass[kLanes] = {};
        float upper_count[kLanes] = {};  // counts up to 16: exact in float, and one vector type
        float lower_count[kLanes] = {};
        if (end - base == kGroup) {
            for (std::int64_t r = base; r < end; r += kLanes) {
                PHI3EDGE_LANE_LOOP
                for (std::int64_t j = 0; j < kLanes; ++j) {
                    const float v = x[r + j];
                    const float in_upper = v >= upper && v < hi ? 1.0F : 0.0F;
                    const float in_lower = v >= lower && v < upper ? 1.0F : 0.0F;
                    upper_mass[j] += in_upper * w[r + j];
                    lower_mass[j] += in_lower * w[r + j];
                    upper_count[j] += in_upper;
                    lower_count[j] += in_lower;
                }
            }
        } else {
            for (std::int64_t i = base; i < end; ++i) {
                const bool in_upper = x[i] >= upper && x[i] < hi;
                const bool in_lower = x[i] >= lower && x[i] < upper;
                upper_mass[i % kLanes] += in_upper ? w[i] : 0.0F;
                lower_mass[i % kLanes] += in_lower ? w[i] : 0.0F;
                upper_count[i % kLanes] += in_upper ? 1.0F : 0.0F;
                lower_count[i % kLanes] += in_lower ? 1.0F : 0.0F;
            }
        }
        for (std::int64_t j = 0; j < kLanes; ++j) {
            out.upper.count += static_cast<std::int64_t>(upper_count[j]);
            out.lower.count += static_cast<std::int64_t>(lower_count[j]);
        }
        out.upper.mass += lane_total(upper_mass);
        out.lower.mass += lane_total(lower_mass);
    }
    return out;
}

// Keeps the tokens ranked at or before (last_logit, last_id): zeroes the other weights, refreshes
// group_mass and returns the kept weight.
PHI3EDGE_MULTIVERSION
double keep_ranked_before(const float* __restrict x, float* __restrict w, std::int64_t n,
                          float last_logit, std::int64_t last_id, double* __restrict group_mass) {
    double total = 0.0;
    const std::int64_t groups = (n + kGroup - 1) / kGroup;
    for (std::int64_t g = 0; g < groups; ++g) {
        const std::int64_t base = g * kGroup;
        const std::int64_t end = std::min(n, base + kGroup);
        float lane[kLanes] = {};
        if (end - base == kGroup) {
            for (std::int64_t r = base; r < end; r += kLanes) {
                PHI3EDGE_LANE_LOOP
                for (std::int64_t j = 0; j < kLanes; ++j) {
                    const float v = x[r + j];
                    const float kept =
                        v > last_logit || (v == last_logit && r + j <= last_id) ? 1.0F : 0.0F;
                    w[r + j] *= kept;
                    lane[j] += w[r + j];
                }
            }
        } else {
            for (std::int64_t i = base; i < end; ++i) {
                const bool kept = x[i] > last_logit || (x[i] == last_logit && i <= last_id);
                w[i] = kept ? w[i] : 0.0F;
                lane[i % kLanes] += w[i];
            }
        }
        group_mass[g] = lane_total(lane);
        total += group_mass[g];
    }
    return total;
}

// The interval [lo, hi) of row_nucleus that holds the boundary token, narrowed by probes.
class Bracket {
public:
    Bracket(float lo, float hi, double mass, double target, std::int64_t vocab)
        : lo_(lo), hi_(hi), from_lo_(mass), inside_(vocab), target_(target) {}

    float lo() const { return lo_; }
    float hi() const { return hi_; }
    double above() const { return above_; }
    std::int64_t inside() const { return inside_; }  // tokens in [lo, hi), at most

    // Whether cut lies strictly inside, so that probing it narrows the interval.
    bool splits(float cut) const { return cut > lo_ && cut < hi_; }

    // Two cuts around where the weight above reaches target, spread around it by spread of the
    // width and kept off the ends by a sixteenth, so that every probe shrinks the interval by at
    // least that much. The estimate takes the tokens as evenly spread over a narrow interval:
    // then the weight above a cut c is linear in c's own weight 2^((c - max) * scale).
    std::pair<float, float> interpolated_cuts(float max, float scale, float spread) const {
        const double share = (from_lo_ - target_) / (from_lo_ - above_);
        const double weight_lo = std::exp2((static_cast<double>(lo_) - max) * scale);
        const double weight_hi = std::exp2((static_cast<double>(hi_) - max) * scale);
        const double weight_cut = weight_lo + (weight_hi - weight_lo) * share;
        const auto cut = static_cast<float>(max + std::log2(weight_cut) / scale);
        const float width = hi_ - lo_;
        const float margin = width / 16.0F;
        return {std::clamp(cut - width * spread, lo_ + margin, hi_ - margin),
                std::clamp(cut + width * spread, lo_ + margin, hi_ - margin)};
    }

    // One pass: the slices [upper, hi) and [lower, upper) move the ends to the cuts around the
    // boundary. Returns whether both ends moved (the boundary lay between the cuts).
    bool probe(const float* x, const float* w, std::int64_t vocab, float lower, float upper) {
        const TwoSlices slices = two_slices(x, w, vocab, lower, upper, hi_);
        const double from_upper = above_ + slices.upper.mass;
        const double from_lower = from_upper + slices.lower.mass;
        if (from_upper >= target_) {  // at or above upper
            lo_ = upper;
            from_lo_ = from_upper;
            inside_ = slices.upper.count;
            return false;
        }
        if (from_lower >= target_) {  // in [lower, upper)
            above_ = from_upper;
            from_lo_ = from_lower;
            lo_ = lower;
            hi_ = upper;
            inside_ = slices.lower.count;
            return true;
        }
        above_ = from_lower;  // below lower
        hi_ = lower;
        inside_ -= slices.upper.count + slices.lower.count;
        return false;
    }

    // Raises lo to floor if that is higher (no token lies below floor).
    void raise_lo(float floor) { lo_ = std::max(lo_, floor); }

private:
    float lo_;
    float hi_;
    double above_ = 0.0;  // weight of the tokens at or above hi
    double from_lo_;      // weight of the tokens at or above lo
    std::int64_t inside_;
    double target_;
};

// Two cuts that likely bracket the boundary of the nucleus holding share of the row's weight,
// read off a strided sample of the row (every kSampleStride-th token): where the sample's weight
// above reaches share plus and minus three standard errors. They only guide the search (they are
// probed over the whole row); NaN where the sample cannot tell.
constexpr std::int64_t kSampleStride = 16;

std::pair<float, float> sampled_cuts(const float* x, const float* w, std::int64_t n, double share) {
    constexpr std::size_t kBins = 256;
    constexpr float kNan = std::numeric_limits<float>::quiet_NaN();
    float top = -kInf;
    float bottom = kInf;
    for (std::int64_t i = 0; i < n; i += kSampleStride) {
        if (w[i] > 0.0F) {
            top = std::max(top, x[i]);
            bottom = std::min(bottom, x[i]);
        }
    }
    const float per_logit = static_cast<float>(kBins) / (top - bottom);
    if (!(top > bottom && per_logit < FLT_MAX)) {
        return {kNan, kNan};
    }
    std::array<double, kBins> mass{};  // bin b: logits in (top - (b + 1) / per_logit, top - b / ...]
    double total = 0.0;
    double squares = 0.0;
    for (std::int64_t i = 0; i < n; i += kSampleStride) {
        if (w[i] > 0.0F) {
            const auto bin = std::min(kBins - 1, static_cast<std::size_t>((top - x[i]) * per_logit));
            const auto weight = static_cast<double>(w[i]);
            mass[bin] += weight;
            total += weight;
            squares += weight * weight;
        }
    }
    // The standard error of a weighted share: sqrt(share * (1 - share) / effective sample size).
    const double error = 3.0 * std::sqrt(share * (1.0 - share) * squares) / total;
    const double low = (share - error) * total;
    const double high = (share + error) * total;
    float lower = kNan;
    float upper = kNan;
    double cumulative = 0.0;
    for (std::size_t b = 0; b < kBins; ++b) {
        if (cumulative < low && cumulative + mass[b] >= low) {  // the share passes low in bin b
            upper = top - static_cast<float>(b) / per_logit;
        }
        cumulative += mass[b];
        if (cumulative >= high) {
            lower = top - static_cast<float>(b + 1) / per_logit;
            break;
        }
    }
    return {lower, upper};
}

// Step 6 on the whole row (see above): leaves only the nucleus weighted in ws.weights and
// ws.group_mass and returns its weight (the row's, unchanged, if rounding never reaches target).
// The first probe takes its cuts from a sample of the row; the next interpolate, each pair spread
// twice as wide after a miss (the boundary fell outside it) and half as wide after a hit.
double row_nucleus(Workspace& ws, std::int64_t vocab, float max, float scale, double mass,
                   double target) {
    const float* x = ws.logits.data();
    float* w = ws.weights.data();
    // Below max - 126 / scale a weight is 0 (exp2_nonpositive), so the interval starts there.
    const float far = max - 127.0F / scale;
    Bracket bracket(far, std::nextafter(max, kInf), mass, target, vocab);
    auto [lower, upper] = sampled_cuts(x, w, vocab, target / mass);
    lower = bracket.splits(lower) ? lower : upper;  // one cut where the sample gave one
    upper = bracket.splits(upper) ? upper : lower;
    if (bracket.splits(lower) && bracket.splits(upper)) {
        bracket.probe(x, w, vocab, lower, upper);
    }
    if (bracket.lo() == far) {  // the row's minimum is likely nearer
        bracket.raise_lo(extreme_of<false>(x, vocab));
    }
    constexpr float kMinSpread = 1.0F / 64.0F;
    float spread = 1.0F / 32.0F;
    while (bracket.inside() > kBoundaryTokens) {
        const auto [lo_cut, hi_cut] = bracket.interpolated_cuts(max, scale, spread);
        if (!bracket.splits(lo_cut) || !bracket.splits(hi_cut)) {
            break;  // a few floats apart: what remains are (near) ties
        }
        const bool hit = bracket.probe(x, w, vocab, lo_cut, hi_cut);
        spread = hit ? std::max(spread * 0.5F, kMinSpread) : std::min(spread * 2.0F, 0.25F);
    }
    const float lo = bracket.lo();
    const float hi = bracket.hi();
    std::int32_t* column_count = ws.column_count.data();
    count_columns(x, vocab, lo, hi, column_count);
    std::vector<Candidate>& boundary = ws.boundary;
    boundary.clear();
    for (std::size_t c = 0; c < ws.column_count.size(); ++c) {
        if (column_count[c] == 0) {
            continue;
        }
        const Column column = column_of(static_cast<std::int64_t>(c), vocab);
        for (std::int64_t i = column.first; i < column.end; i += kLanes) {
            if (x[i] >= lo && x[i] < hi && w[i] > 0.0F) {
                boundary.push_back(Candidate{rank_key(x[i], static_cast<std::int32_t>(i)), x[i],
                                            w[i]});
            }
        }
    }
    std::sort(boundary.begin(), boundary.end(), ranks_before);
    double kept = bracket.above();
    for (const Candidate& c : boundary) {
        kept += static_cast<double>(c.weight);
        if (kept >= target) {
            return keep_ranked_before(x, w, vocab, c.logit, id_of(c), ws.group_mass.data());
        }
    }
    return mass;  // rounding: keep the whole row
}

// ---------------------------------------------------------------------------------------------
// One row
// ---------------------------------------------------------------------------------------------

struct RowOut {
    std::int32_t* token;
    float* logprob;
    std::int32_t* top_ids;  // top_slots entries
    float* top_logprobs;
    int top_slots;
};

void refresh_column_max(const Workspace& ws, std::int64_t vocab, std::int64_t id,
                        float* column_max) {
    const std::int64_t c = (id / kGroup) * kLanes + id % kLanes;
    const Column column = column_of(c, vocab);
    float m = -kInf;
    for (std::int64_t i = column.first; i < column.end; i += kLanes) {
        m = std::max(m, ws.logits[static_cast<std::size_t>(i)]);
    }
    column_max[c] = m;
}

// Step 1.
void apply_logit_bias(const SamplingParams& params, std::int64_t vocab, Workspace& ws) {
    for (const BiasEntry& entry : params.logit_bias()) {
        float& l = ws.logits[static_cast<std::size_t>(entry.id)];
        l = static_cast<float>(static_cast<double>(l) + entry.value);
        refresh_column_max(ws, vocab, entry.id, ws.column_max.data());
    }
}

// Step 2: O(#distinct generated tokens).
void apply_penalties(const SamplingParams& params, const RowState& state, std::int64_t vocab,
                     Workspace& ws) {
    const double frequency = params.frequency_penalty();
    const double presence = params.presence_penalty();
    if (frequency == 0.0 && presence == 0.0) {
        return;
    }
    const std::vector<std::uint32_t>& counts = state.counts();
    for (const std::int32_t id : state.generated_ids()) {
        const auto index = static_cast<std::size_t>(id);
        const double count = static_cast<double>(counts[index]);
        float& l = ws.logits[index];
        l = static_cast<float>(static_cast<double>(l) - (count * frequency + presence));
        refresh_column_max(ws, vocab, id, ws.column_max.data());
    }
}

struct Processed {
    float max;             // of the processed row
    std::int64_t allowed;  // tokens the mask leaves (vocab without one)
};

// Steps 1-2b into ws.logits (and ws.column_max). allowed: the row's bitmask, or null.
Processed process_row(const float* raw, std::int64_t vocab, std::int64_t row,
                      const SamplingParams& params, const RowState& state,
                      const std::uint32_t* allowed, Workspace& ws) {
    const bool finite = copy_with_column_max(raw, vocab, ws.logits.data(), ws.column_max.data());
    require(finite, [&] { return "logits row " + std::to_string(row) + " contains NaN or inf"; });
    apply_logit_bias(params, vocab, ws);
    apply_penalties(params, state, vocab, ws);
    std::int64_t count = vocab;
    if (allowed != nullptr) {
        count = apply_allowed(allowed, vocab, ws.logits.data(), ws.column_max.data());
        require(count > 0, [&] {
            return "the allowed-token mask of row " + std::to_string(row) + " allows no token";
        });
    }
    return Processed{extreme_of<true>(ws.column_max.data(), static_cast<std::int64_t>(ws.column_max.size())),
                     count};
}

struct Softmax {
    float max;
    double log_z;    // step 3: logprob(id) = logit - max - log_z (NaN: none reported)
    float scale;     // step 4: weight = 2^((logit - max) * scale), scale = log2(e) / temperature
    float* weights;  // null when greedy
    double mass;     // sum of the weights
};

// One exp pass at temperature 1 (only when logprobs are reported: log_z is NaN otherwise) and,
// unless greedy, one at the temperature; at temperature 1 one pass gives both.
Softmax softmax_passes(Workspace& ws, std::int64_t vocab, float max, double temperature,
                       bool reports_logprobs) {
    constexpr double kLog2e = 1.4426950408889634;
    const auto unit_scale = static_cast<float>(kLog2e);
    const float* logits = ws.logits.data();
    double* group_mass = ws.group_mass.data();
    float* weights = ws.weights.data();
    constexpr double kNone = std::numeric_limits<double>::quiet_NaN();
    if (temperature == 1.0) {
        const double z = exp_sum<true>(logits, vocab, max, unit_scale, weights, group_mass);
        return Softmax{max, reports_logprobs ? std::log(z) : kNone, unit_scale, weights, z};
    }
    const double log_z = reports_logprobs
                             ? std::log(exp_sum<false>(logits, vocab, max, unit_scale, nullptr,
                                                       nullptr))
                             : kNone;
    if (temperature == 0.0) {
        return Softmax{max, log_z, unit_scale, nullptr, 0.0};
    }
    const auto scale = static_cast<float>(std::min(kLog2e / temperature, double{FLT_MAX}));
    const double mass = exp_sum<true>(logits, vocab, max, scale, weights, group_mass);
    return Softmax{max, log_z, scale, weights, mass};
}

// What steps 3-6 need from the candidates.
struct Needs {
    std::size_t top_n;      // step 3: alternatives to report
    std::size_t head;       // best-ranked candidates to sort (top_n, at least 1 when greedy)
    std::int64_t top_k;     // step 5, 0 when neutral
    bool nucleus;           // step 6 is active
    std::size_t min_count;  // candidates to gather
    double min_mass;        // weight the candidates must hold (top_p alone)
};

// candidates: the tokens that can be chosen (the vocabulary, or what a mask allows).
Needs needs_of(const SamplingParams& params, std::int64_t candidates, const Softmax& softmax) {
    const bool greedy = softmax.weights == nullptr;
    Needs needs{};
    needs.top_n =
        static_cast<std::size_t>(std::min<std::int64_t>(params.top_logprobs(), candidates));
    needs.head = greedy ? std::max<std::size_t>(needs.top_n, 1) : needs.top_n;
    needs.top_k = !greedy && params.top_k() < candidates ? params.top_k() : 0;
    needs.nucleus = !greedy && params.top_p() < 1.0;
    needs.min_count = needs.head;
    if (needs.top_k > 0 || needs.nucleus) {
        needs.min_count =
            std::max<std::size_t>({needs.min_count, static_cast<std::size_t>(needs.top_k), 1});
    }
    needs.min_mass = needs.nucleus && needs.top_k == 0 ? params.top_p() * softmax.mass : 0.0;
    return needs;
}

// Steps 4-7 on candidates c[0, n) in gather order; best: the best-ranked of them, sorted.
std::int32_t choose_token(Candidate* c, std::size_t n, const Candidate* best, const Needs& needs,
                          const Softmax& softmax, const SamplingParams& params, std::int64_t vocab,
                          double u, Workspace& ws) {
    if (softmax.weights == nullptr) {  // 4: greedy takes the best-ranked, ties -> lowest id
        return id_of(best[0]);
    }
    if (needs.top_k == 0 && !needs.nucleus) {  // 7 over the whole row
        return draw_full(softmax.weights, ws.group_mass.data(), vocab, softmax.mass, u);
    }
    Kept kept{std::numeric_limits<std::uint64_t>::max(), softmax.mass};
    if (needs.top_k > 0) {  // 5
        const auto k = static_cast<std::size_t>(needs.top_k);
        if (k < n) {
            std::nth_element(c, c + k, c + n, ranks_before);
        }
        n = std::min(n, k);
        kept.mass = total_weight(c, n);
    }
    if (needs.nucleus) {  // 6
        kept = top_p_nucleus(c, n, params.top_p() * kept.mass, ws.boundary);
    }
    return draw_candidate(c, n, kept, u);  // 7
}

void sample_row(const float* raw, std::int64_t vocab, std::int64_t row,
                const SamplingParams& params, const RowState& state, const std::uint32_t* allowed,
                double u, Workspace& ws, const RowOut& out) {
    const Processed processed = process_row(raw, vocab, row, params, state, allowed, ws);  // 1-2b
    const float max = processed.max;
    const Softmax softmax =
        softmax_passes(ws, vocab, max, params.temperature(), params.reports_logprobs());
    const auto logprob = [&](std::int32_t id) {  // 3
        const double value = static_cast<double>(ws.logits[static_cast<std::size_t>(id)]) -
                             static_cast<double>(max) - softmax.log_z;
        return value < -static_cast<double>(FLT_MAX) ? -kInf : static_cast<float>(value);
    };
    Needs needs = needs_of(params, processed.allowed, softmax);
    std::size_t n = 0;
    bool flat_nucleus = false;
    if (needs.min_count > 0) {
        // Histogram bins are a quarter of this many logits wide: the temperature when sampling.
        const double temperature = params.temperature();
        const auto unit =
            static_cast<float>(temperature == 0.0 ? 1.0 : std::max(temperature, 0.25));
        const DistanceHistogram sketch =
            column_sketch(ws, max, unit, softmax.scale, needs.min_mass > 0.0);
        float threshold = sketch.threshold(needs.min_count, needs.min_mass);
        flat_nucleus = threshold == -kInf && needs.min_mass > 0.0;
        if (flat_nucleus) {  // step 6 runs over the whole row; candidates are the alternatives
            needs.min_count = needs.head;
            needs.min_mass = 0.0;
            threshold = sketch.threshold(needs.min_count, 0.0);
        }
        if (needs.min_count > 0) {
            n = gather_candidates(ws, vocab, max, unit, softmax.weights, needs.min_count,
                                  needs.min_mass, threshold);
        }
    }
    // The best-ranked candidates are sorted into a copy: the draw walks c in gather order, so
    // how many alternatives a row reports never changes the token its seed draws.
    Candidate* c = ws.candidates.data();
    ws.best.resize(std::min(needs.head, n));
    std::partial_sort_copy(c, c + n, ws.best.begin(), ws.best.end(), ranks_before);
    const Candidate* best = ws.best.data();
    for (int i = 0; i < out.top_slots; ++i) {  // 3: the alternatives
        const bool used = static_cast<std::size_t>(i) < needs.top_n;
        out.top_ids[i] = used ? id_of(best[i]) : -1;
        out.top_logprobs[i] = used ? logprob(id_of(best[i])) : -kInf;
    }
    if (flat_nucleus) {
        const double kept = row_nucleus(ws, vocab, max, softmax.scale, softmax.mass,
                                        params.top_p() * softmax.mass);
        *out.token = draw_full(softmax.weights, ws.group_mass.data(), vocab, kept, u);  // 7
    } else {
        *out.token = choose_token(c, n, best, needs, softmax, params, vocab, u, ws);
    }
    *out.logprob = logprob(*out.token);
}

void check_batch(const BatchView& batch, const std::vector<const SamplingParams*>& params,
                 const std::vector<RowState*>& states) {
    const auto rows = static_cast<std::size_t>(batch.rows);
    require(batch.rows >= 1, [] { return std::string("logits must hold at least one row"); });
    require(params.size() == rows && states.size() == rows, [&] {
        return "logits have " + std::to_string(rows) + " rows but " +
               std::to_string(params.size()) + " params and " + std::to_string(states.size()) +
               " states were given";
    });
    std::vector<std::pair<const RowState*, std::size_t>> seen;
    for (std::size_t r = 0; r < rows; ++r) {
        require(states[r]->vocab_size() == batch.vocab, [&] {
            return "states[" + std::to_string(r) + "].vocab_size is " +
                   std::to_string(states[r]->vocab_size()) + " but logits have vocab size " +
                   std::to_string(batch.vocab);
        });
        for (const BiasEntry& entry : params[r]->logit_bias()) {
            require(entry.id < batch.vocab, [&] {
                return "logit_bias id " + std::to_string(entry.id) + " (params[" +
                       std::to_string(r) + "]) is out of range for vocab size " +
                       std::to_string(batch.vocab);
            });
        }
        seen.emplace_back(states[r], r);
    }
    require(batch.allowed == nullptr || batch.allowed_words == (batch.vocab + 31) / 32, [&] {
        return "the allowed-token mask has " + std::to_string(batch.allowed_words) +
               " words per row; vocab size " + std::to_string(batch.vocab) + " needs " +
               std::to_string((batch.vocab + 31) / 32);
    });
    std::sort(seen.begin(), seen.end(), [](const auto& a, const auto& b) {
        return std::less<const RowState*>()(a.first, b.first);
    });
    for (std::size_t i = 1; i < rows; ++i) {
        require(seen[i].first != seen[i - 1].first, [&] {
            return "states[" + std::to_string(seen[i - 1].second) + "] and states[" +
                   std::to_string(seen[i].second) + "] are the same RowState";
        });
    }
}

}  // namespace

void sample_batch(const BatchView& batch, const std::vector<const SamplingParams*>& params,
                  const std::vector<RowState*>& states) {
    check_batch(batch, params, states);
    Workspace& ws = states[0]->workspace();  // rows run one after another and share it
    const auto k = static_cast<std::int64_t>(batch.top_slots);
    for (std::int64_t r = 0; r < batch.rows; ++r) {
        const RowOut out{batch.tokens + r, batch.logprobs + r, batch.top_ids + r * k,
                         batch.top_logprobs + r * k, batch.top_slots};
        const std::uint32_t* allowed =
            batch.allowed != nullptr ? batch.allowed + r * batch.allowed_words : nullptr;
        sample_row(batch.logits + r * batch.vocab, batch.vocab, r, *params[r], *states[r], allowed,
                   states[r]->peek_uniform(), ws, out);
    }
    for (std::int64_t r = 0; r < batch.rows; ++r) {  // commit only once every row succeeded
        states[r]->consume_uniform();
        states[r]->accept(batch.tokens[r]);
    }
}

void fill_forced_logits(const std::vector<std::int64_t>& tokens, std::int64_t vocab, float* out) {
    for (std::size_t r = 0; r < tokens.size(); ++r) {
        require(tokens[r] >= 0 && tokens[r] < vocab, [&] {
            return "tokens[" + std::to_string(r) + "] = " + std::to_string(tokens[r]) +
                   " is out of range for vocab_size " + std::to_string(vocab);
        });
    }
    for (std::size_t r = 0; r < tokens.size(); ++r) {
        float* row = out + static_cast<std::int64_t>(r) * vocab;
        std::fill(row, row + vocab, -FLT_MAX);
        row[tokens[r]] = 0.0F;
    }
}

}  // namespace phi3edge

