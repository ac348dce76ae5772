// actvar-noise SEED FIRST_IMAGE N_IMAGES OUT.npy: the canonical uniforms u (design §3.1) as float32 .npy,
// to test the C++ noise against the Python one.
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "actvar/runtime.h"

int main(int argc, char** argv) {
    if (argc != 5) {
        std::fprintf(stderr, "Error: usage: actvar-noise SEED FIRST_IMAGE N_IMAGES OUT.npy\n");
        return 1;
    }
    const uint64_t seed = std::strtoull(argv[1], nullptr, 10), first = std::strtoull(argv[2], nullptr, 10);
    const int n = std::atoi(argv[3]);
    std::vector<float> u(size_t(n) * actvar::kTotalTokens);
    actvar::noise(seed, first, n, u.data());
    std::string header = "{'descr': '<f4', 'fortran_order': False, 'shape': (" + std::to_string(n) + ", 680), }";
    header += std::string(63 - (10 + header.size()) % 64, ' ') + "\n";
    FILE* f = std::fopen(argv[4], "wb");
    if (!f) return 1;
    const unsigned char magic[] = {0x93, 'N', 'U', 'M', 'P', 'Y', 1, 0, uint8_t(header.size() & 255), uint8_t(header.size() >> 8)};
    std::fwrite(magic, 1, sizeof magic, f);
    std::fwrite(header.data(), 1, header.size(), f);
    std::fwrite(u.data(), 4, u.size(), f);
    return std::fclose(f) == 0 ? 0 : 1;
}
