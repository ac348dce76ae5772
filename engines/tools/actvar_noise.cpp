// actvar-noise SEED FIRST_IMAGE N_IMAGES OUT.npy: the canonical uniforms u (design §3.1) as float32 .npy,
// to test the C++ noise against the Python one.
#include <cstdio>
#include <cstdlib>
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
    actvar::write_npy(argv[4], "<f4", 4, u.data(), {n, actvar::kTotalTokens});
    return 0;
}
