// .npy and PNG writers for uint8 NHWC images (PNG through zlib), each written to a temporary file beside
// the target and renamed.
#include <unistd.h>
#include <zlib.h>

#include <algorithm>

#include <cstdio>
#include <string>
#include <vector>

#include "internal.h"

namespace actvar {

namespace {
void write_atomic(const std::string& path, const std::vector<uint8_t>& bytes) {
    const std::string tmp = path + ".tmp" + std::to_string(::getpid());
    FILE* f = std::fopen(tmp.c_str(), "wb");
    if (!f) throw Error(path + ": cannot be written");
    const bool ok = std::fwrite(bytes.data(), 1, bytes.size(), f) == bytes.size();
    if (std::fclose(f) != 0 || !ok || std::rename(tmp.c_str(), path.c_str()) != 0) {
        std::remove(tmp.c_str());
        throw Error(path + ": cannot be written");
    }
}

void be32(std::vector<uint8_t>& v, uint32_t x) {
    for (int s = 24; s >= 0; s -= 8) v.push_back(uint8_t(x >> s));
}

void chunk(std::vector<uint8_t>& png, const char* type, const std::vector<uint8_t>& data) {
    be32(png, uint32_t(data.size()));
    const size_t start = png.size();
    png.insert(png.end(), type, type + 4);
    png.insert(png.end(), data.begin(), data.end());
    be32(png, uint32_t(crc32(0, png.data() + start, uInt(png.size() - start))));
}
}  // namespace

void write_npy(const std::string& path, const std::string& descr, size_t item_bytes, const void* data,
               const std::vector<int64_t>& shape) {
    std::string dims;
    size_t count = 1;
    for (int64_t d : shape) {
        dims += std::to_string(d) + ", ";
        count *= size_t(d);
    }
    std::string header = "{'descr': '" + descr + "', 'fortran_order': False, 'shape': (" + dims + "), }";
    header += std::string(63 - (10 + header.size()) % 64, ' ') + "\n";   // total header a multiple of 64
    std::vector<uint8_t> out = {0x93, 'N', 'U', 'M', 'P', 'Y', 1, 0, uint8_t(header.size() & 255), uint8_t(header.size() >> 8)};
    out.insert(out.end(), header.begin(), header.end());
    const auto* p = static_cast<const uint8_t*>(data);
    out.insert(out.end(), p, p + count * item_bytes);
    write_atomic(path, out);
}

void write_png_grid(const std::string& path, const uint8_t* nhwc, int n, int h, int w) {
    const int pad = 4, cols = std::min(n, 4), rows = (n + cols - 1) / cols;
    const int W = cols * (w + pad) + pad, H = rows * (h + pad) + pad;
    std::vector<uint8_t> raw(size_t(H) * (1 + size_t(W) * 3), 255);    // filter byte 0 + white RGB rows
    for (int y = 0; y < H; ++y) raw[size_t(y) * (1 + size_t(W) * 3)] = 0;
    for (int i = 0; i < n; ++i) {
        const int x0 = pad + (i % cols) * (w + pad), y0 = pad + (i / cols) * (h + pad);
        for (int y = 0; y < h; ++y)
            std::copy_n(nhwc + ((size_t(i) * h + y) * w) * 3, size_t(w) * 3,
                        raw.begin() + size_t(y0 + y) * (1 + size_t(W) * 3) + 1 + size_t(x0) * 3);
    }
    uLongf zlen = compressBound(uLong(raw.size()));
    std::vector<uint8_t> z(zlen);
    if (compress2(z.data(), &zlen, raw.data(), uLong(raw.size()), 6) != Z_OK) throw Error(path + ": PNG compression failed");
    z.resize(zlen);
    std::vector<uint8_t> png = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'}, ihdr;
    be32(ihdr, uint32_t(W));
    be32(ihdr, uint32_t(H));
    ihdr.insert(ihdr.end(), {8, 2, 0, 0, 0});   // 8-bit RGB, deflate, no filter method, no interlace
    chunk(png, "IHDR", ihdr);
    chunk(png, "IDAT", z);
    chunk(png, "IEND", {});
    write_atomic(path, png);
}

}  // namespace actvar
