// Test helper shared by kernel_tests.cpp and fuzz_ops.cpp: an independent C++ packer of random valid disk
// arrays (docs/FORMAT.md), so the decoder, repacker and kernels can be checked against logical values.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "../kernels/kernels.h"

namespace pbs2p {
namespace test {

// Disk arrays owned by the test.
struct Disk {
  std::vector<int32_t> header = std::vector<int32_t>(kHeaderLen, 0);
  std::vector<uint8_t> mask, signs, salient_signs;
  std::vector<uint16_t> scales, alpha2;
  std::vector<int32_t> salient_cols;
  std::vector<float> bias;
  std::vector<uint16_t> col_scales;
  DiskView view() const {
    DiskView d;
    d.header = header.data();
    d.header_len = header.size();
    d.mask = mask.data();
    d.mask_len = mask.size();
    d.signs = signs.data();
    d.signs_len = signs.size();
    d.scales = scales.data();
    d.scales_len = scales.size();
    d.salient_cols = salient_cols.data();
    d.salient_cols_len = salient_cols.size();
    d.salient_signs = salient_signs.data();
    d.salient_signs_len = salient_signs.size();
    d.alpha2 = alpha2.data();
    d.alpha2_len = alpha2.size();
    d.bias = bias.data();
    d.bias_len = bias.size();
    d.col_scales = col_scales.data();
    d.col_scales_len = col_scales.size();
    return d;
  }
};

struct Case {
  int rows, k, n, m, group_size, salient, tokens;
  bool bias;
  bool col_scales = false;
  int version = kVersion;  // 1 or 2 (version 1 cannot carry col_scales)
};

inline std::string name_of(const Case& c) {
  char buf[160];
  std::snprintf(buf, sizeof buf, "rows=%d k=%d %d:%d group=%d salient=%d bias=%d col_scales=%d tokens=%d", c.rows,
                c.k, c.n, c.m, c.group_size, c.salient, int(c.bias), int(c.col_scales), c.tokens);
  return buf;
}

inline void set_bit(std::vector<uint8_t>& v, size_t i) { v[i / 8] |= uint8_t(1u << (i % 8)); }

// Random logical layer packed by this (independent) C++ packer; also returns W_hat computed from the logical
// values directly, so decode_dense() and the packer check each other, and (if asked) W_hat without the column
// scales (the weight the kernels apply to x * c).
inline Disk make_disk(const Case& c, std::mt19937& rng, std::vector<float>* w_hat, std::vector<float>* w_v1 = nullptr) {
  Disk d;
  const int G = (c.k + c.group_size - 1) / c.group_size;
  d.header = {kMagic, c.version, c.n, c.m, c.group_size, c.rows, c.k,
              (c.salient ? kFlagSalient : 0) | (c.bias ? kFlagBias : 0) | (c.col_scales ? kFlagColScales : 0),
              c.salient, G, 0, 0, 0, 0, 0, 0};
  const size_t mask_row = size_t((c.k + 7) / 8), sign_row = size_t((c.k / c.m * c.n + 7) / 8);
  d.mask.assign(size_t(c.rows) * mask_row, 0);
  d.signs.assign(size_t(c.rows) * sign_row, 0);
  std::uniform_real_distribution<float> ua(0.01f, 0.03f), um(-0.006f, 0.006f), u01(0.0f, 1.0f);
  d.scales.resize(size_t(c.rows) * G * 2);
  for (auto& s : d.scales) s = 0;
  for (size_t i = 0; i < d.scales.size(); i += 2) {
    d.scales[i] = float_to_half(ua(rng));
    d.scales[i + 1] = float_to_half(um(rng));
  }
  std::vector<int> code(size_t(c.rows) * c.k, 0);
  for (int r = 0; r < c.rows; ++r) {
    size_t kept = 0;
    for (int j0 = 0; j0 < c.k; j0 += c.m) {
      std::vector<int> idx(size_t(c.m));
      for (int i = 0; i < c.m; ++i) idx[size_t(i)] = i;
      std::shuffle(idx.begin(), idx.end(), rng);
      std::vector<bool> keep(size_t(c.m), false);
      for (int i = 0; i < c.n; ++i) keep[size_t(idx[size_t(i)])] = true;
      for (int i = 0; i < c.m; ++i) {
        if (!keep[size_t(i)]) continue;
        const int j = j0 + i;
        set_bit(d.mask, size_t(r) * mask_row * 8 + size_t(j));
        const bool plus = u01(rng) < 0.5f;
        if (plus) set_bit(d.signs, size_t(r) * sign_row * 8 + kept);
        ++kept;
        code[size_t(r) * c.k + j] = plus ? 1 : -1;
      }
    }
  }
  if (c.salient) {
    const size_t sal_row = size_t((G * c.salient + 7) / 8);
    d.salient_signs.assign(size_t(c.rows) * sal_row, 0);
    d.alpha2.resize(size_t(c.rows) * G);
    for (auto& a : d.alpha2) a = float_to_half(ua(rng) * 0.5f);
    // as in real checkpoints: many exact zeros, some fp16 subnormals (and a -0), no rng draws (cases unchanged)
    for (size_t i = 0; i < d.alpha2.size(); ++i) {
      if (i % 3 == 1) d.alpha2[i] = 0;
      if (i % 7 == 2) d.alpha2[i] = uint16_t(1 + (i * 37) % 1023);
      if (i % 11 == 5) d.alpha2[i] = 0x8000u;
    }
    for (int g = 0; g < G; ++g) {
      const int b = g * c.group_size, width = std::min(c.k, b + c.group_size) - b;
      std::vector<int> cols(static_cast<size_t>(width));
      for (int i = 0; i < width; ++i) cols[size_t(i)] = b + i;
      std::shuffle(cols.begin(), cols.end(), rng);
      for (int s = 0; s < c.salient; ++s) d.salient_cols.push_back(cols[size_t(s)]);
    }
    for (int r = 0; r < c.rows; ++r)
      for (int i = 0; i < G * c.salient; ++i)
        if (u01(rng) < 0.5f) set_bit(d.salient_signs, size_t(r) * sal_row * 8 + size_t(i));
  }
  if (c.bias) {
    std::normal_distribution<float> nb(0.0f, 0.1f);
    for (int r = 0; r < c.rows; ++r) d.bias.push_back(nb(rng));
  }
  if (c.col_scales) {  // log-uniform in [1/4, 4], some exactly 1
    std::uniform_real_distribution<float> ue(-2.0f, 2.0f);
    for (int j = 0; j < c.k; ++j) d.col_scales.push_back(float_to_half(j % 7 == 0 ? 1.0f : std::exp2(ue(rng))));
  }
  // W_hat from the logical values (same float32 operation order as the Python dense()).
  w_hat->assign(size_t(c.rows) * c.k, 0.0f);
  if (w_v1) w_v1->assign(size_t(c.rows) * c.k, 0.0f);
  const size_t sal_row = size_t((G * c.salient + 7) / 8);
  for (int r = 0; r < c.rows; ++r)
    for (int j = 0; j < c.k; ++j) {
      const int cd = code[size_t(r) * c.k + j];
      if (!cd) continue;
      const int g = j / c.group_size;
      const float a = half_to_float(d.scales[(size_t(r) * G + g) * 2]);
      float v = (cd > 0 ? a : -a) + half_to_float(d.scales[(size_t(r) * G + g) * 2 + 1]);
      for (int s = 0; s < c.salient; ++s)
        if (d.salient_cols[size_t(g) * c.salient + s] == j) {
          const float a2 = half_to_float(d.alpha2[size_t(r) * G + g]);
          const size_t bi = size_t(r) * sal_row * 8 + size_t(g) * c.salient + s;
          v += ((d.salient_signs[bi / 8] >> (bi % 8)) & 1) ? a2 : -a2;
        }
      if (w_v1) (*w_v1)[size_t(r) * c.k + j] = v;
      (*w_hat)[size_t(r) * c.k + j] = c.col_scales ? v * half_to_float(d.col_scales[size_t(j)]) : v;
    }
  return d;
}

}  // namespace test
}  // namespace pbs2p
