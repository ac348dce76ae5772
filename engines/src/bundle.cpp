// manifest.json reading and the file checks of actvar_export.bundle.Bundle.open, in C++.
#include <fcntl.h>
#include <openssl/evp.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>

#include "internal.h"

namespace actvar {

namespace {
constexpr int kFormat = 2;
using json = nlohmann::json;

bool file_size(const std::string& path, uint64_t& size) {
    struct stat st {};
    if (stat(path.c_str(), &st) != 0 || !S_ISREG(st.st_mode)) return false;
    size = static_cast<uint64_t>(st.st_size);
    return true;
}

TensorSpec tensor_spec(const json& j) {   // ["float32", [2, 1]]
    TensorSpec t;
    t.dtype = j.at(0).get<std::string>();
    t.shape = j.at(1).get<std::vector<int64_t>>();
    return t;
}
}  // namespace

int scale_begin(int si) {
    int a = 0;
    for (int i = 0; i < si; ++i) a += kPatchNums[i] * kPatchNums[i];
    return a;
}

std::vector<uint8_t> read_file(const std::string& path) {
    std::ifstream f(path, std::ios::binary);
    if (!f) throw Error(path + ": cannot be read");
    return std::vector<uint8_t>(std::istreambuf_iterator<char>(f), {});
}

std::string sha256_file(const std::string& path) {
    std::unique_ptr<FILE, int (*)(FILE*)> f(std::fopen(path.c_str(), "rb"), &std::fclose);
    if (!f) throw Error(path + ": cannot be read");
    std::unique_ptr<EVP_MD_CTX, void (*)(EVP_MD_CTX*)> ctx(EVP_MD_CTX_new(), &EVP_MD_CTX_free);
    if (!ctx || EVP_DigestInit_ex(ctx.get(), EVP_sha256(), nullptr) != 1) throw Error("OpenSSL: SHA-256 unavailable");
    std::vector<unsigned char> buf(1 << 20);
    size_t n;
    while ((n = std::fread(buf.data(), 1, buf.size(), f.get())) > 0) EVP_DigestUpdate(ctx.get(), buf.data(), n);
    if (std::ferror(f.get())) throw Error(path + ": read error");
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned len = 0;
    EVP_DigestFinal_ex(ctx.get(), md, &len);
    static const char* hex = "0123456789abcdef";
    std::string out;
    for (unsigned i = 0; i < len; ++i) out += {hex[md[i] >> 4], hex[md[i] & 15]};
    return out;
}

MappedFile::MappedFile(const std::string& path) {
    int fd = ::open(path.c_str(), O_RDONLY);
    if (fd < 0) throw Error(path + ": cannot be opened");
    struct stat st {};
    fstat(fd, &st);
    size_ = static_cast<size_t>(st.st_size);
    void* p = size_ ? mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0) : nullptr;
    ::close(fd);
    if (p == MAP_FAILED) throw Error(path + ": cannot be mapped");
    data_ = static_cast<uint8_t*>(p);
}

MappedFile::~MappedFile() {
    if (data_) munmap(data_, size_);
}

Bundle Bundle::open(const std::string& dir, bool verify_digests) {
    Bundle b;
    b.info.path = dir;
    struct stat st {};
    if (stat(dir.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) throw Error(dir + ": no such bundle directory");
    const std::string mpath = b.file("manifest.json");
    uint64_t size = 0;
    if (!file_size(mpath, size)) throw Error(mpath + ": missing manifest: not a bundle (or an unfinished build)");
    json m;
    try {
        std::ifstream f(mpath);
        m = json::parse(f);
    } catch (const json::exception& e) {
        throw Error(mpath + ": unreadable manifest (" + e.what() + ")");
    }
    std::string field;
    try {
        field = "format";
        if (!m.is_object() || m.at("format").get<int>() != kFormat)
            throw Error(mpath + ": not a bundle manifest of format " + std::to_string(kFormat));
        field = "batch";        b.info.batch = m.at("batch").get<int>();
        field = "precision";    b.info.precision = m.at("precision").get<std::string>();
        field = "lowering";     b.info.lowering = m.at("lowering").get<std::string>();
        field = "top_k";        b.info.top_k = m.at("top_k").get<int>();
        field = "model.depth";  b.info.depth = m.at("model").at("depth").get<int>();
        field = "graphs";
        for (auto& [name, g] : m.at("graphs").items()) {
            GraphSpec gs;
            gs.file = g.at("file").get<std::string>();
            for (auto& [n, t] : g.at("inputs").items()) gs.inputs[n] = tensor_spec(t);
            for (auto& [n, t] : g.at("outputs").items()) gs.outputs[n] = tensor_spec(t);
            b.graphs[name] = gs;
        }
        field = "files";
        const json& files = m.at("files");
        for (auto& [name, meta] : files.items()) {      // the checks of Bundle.open, in its order
            const std::string p = b.file(name);
            uint64_t got = 0;
            if (!file_size(p, got)) throw Error(p + ": file listed in the manifest is missing");
            const uint64_t want = meta.at("bytes").get<uint64_t>();
            if (got != want)
                throw Error(p + ": size " + std::to_string(got) + " differs from the manifest's " + std::to_string(want) +
                            " (truncated or modified)");
        }
        if (verify_digests)
            for (auto& [name, meta] : files.items())
                if (sha256_file(b.file(name)) != meta.at("sha256").get<std::string>())
                    throw Error(b.file(name) + ": checksum differs from the manifest (modified or corrupt)");
        field = "graphs";
        for (int si = 0; si <= kNumScales; ++si) {
            const std::string g = si < kNumScales ? "step_" + std::to_string(si) : "decoder";
            if (!b.graphs.count(g)) throw Error(mpath + ": graph " + g + " missing from 'graphs'");
            if (!files.contains(b.graphs[g].file))
                throw Error(mpath + ": graph " + g + " file " + b.graphs[g].file + " is not listed in 'files'");
        }
        if (!files.contains("weights.bin")) throw Error(mpath + ": weights.bin is not listed in 'files'");
    } catch (const json::exception& e) {
        throw Error(mpath + ": field '" + field + "' missing or malformed (" + e.what() + ")");
    }
    if (b.info.batch < 1) throw Error(mpath + ": field 'batch' must be >= 1");
    return b;
}

}  // namespace actvar
