// The few fields of an ONNX ModelProto the runtime needs (the graph's externally stored initializers), read
// from the protobuf wire format: ModelProto.graph = 7, GraphProto.initializer = 5, TensorProto: dims = 1,
// data_type = 2, name = 8, external_data = 13 (StringStringEntryProto key = 1, value = 2), data_location = 14.
#include <string>

#include "internal.h"

namespace actvar {

namespace {
struct Reader {
    const uint8_t* p;
    const uint8_t* end;
    const std::string& file;

    bool done() const { return p >= end; }
    [[noreturn]] void bad() const { throw Error(file + ": not a readable ONNX model (truncated protobuf)"); }
    uint64_t varint() {
        uint64_t v = 0;
        for (int shift = 0; shift < 64; shift += 7) {
            if (p >= end) bad();
            const uint8_t b = *p++;
            v |= uint64_t(b & 0x7f) << shift;
            if (!(b & 0x80)) return v;
        }
        bad();
    }
    Reader sub() {   // a length-delimited field's bytes
        const uint64_t n = varint();
        if (n > uint64_t(end - p)) bad();
        Reader r{p, p + n, file};
        p += n;
        return r;
    }
    void skip(int wire) {
        switch (wire) {
            case 0: varint(); break;
            case 1: if (end - p < 8) bad(); p += 8; break;
            case 2: sub(); break;
            case 5: if (end - p < 4) bad(); p += 4; break;
            default: bad();
        }
    }
    std::string str() {
        Reader r = sub();
        return std::string(reinterpret_cast<const char*>(r.p), r.end - r.p);
    }
};

ExternalInitializer tensor(Reader r, bool& external) {
    ExternalInitializer t;
    external = false;
    while (!r.done()) {
        const uint64_t key = r.varint();
        const int field = int(key >> 3), wire = int(key & 7);
        if (field == 1 && wire == 0) t.dims.push_back(int64_t(r.varint()));
        else if (field == 1 && wire == 2) { Reader d = r.sub(); while (!d.done()) t.dims.push_back(int64_t(d.varint())); }
        else if (field == 2 && wire == 0) t.data_type = int(r.varint());
        else if (field == 8 && wire == 2) t.name = r.str();
        else if (field == 14 && wire == 0) external = r.varint() == 1;
        else if (field == 13 && wire == 2) {
            Reader e = r.sub();
            std::string k, v;
            while (!e.done()) {
                const uint64_t ek = e.varint();
                if (ek == (1 << 3 | 2)) k = e.str();
                else if (ek == (2 << 3 | 2)) v = e.str();
                else e.skip(int(ek & 7));
            }
            try {
                if (k == "location") t.location = v;
                else if (k == "offset") t.offset = std::stoull(v);
                else if (k == "length") t.length = std::stoull(v);
            } catch (const std::exception&) {
                throw Error(r.file + ": initializer " + t.name + " has a malformed external_data " + k);
            }
        } else r.skip(wire);
    }
    return t;
}
}  // namespace

std::vector<ExternalInitializer> external_initializers(const std::string& onnx_path) {
    const std::vector<uint8_t> bytes = read_file(onnx_path);
    std::vector<ExternalInitializer> out;
    Reader model{bytes.data(), bytes.data() + bytes.size(), onnx_path};
    while (!model.done()) {
        const uint64_t key = model.varint();
        if (key != (7 << 3 | 2)) { model.skip(int(key & 7)); continue; }
        Reader graph = model.sub();
        while (!graph.done()) {
            const uint64_t gk = graph.varint();
            if (gk != (5 << 3 | 2)) { graph.skip(int(gk & 7)); continue; }
            bool external = false;
            ExternalInitializer t = tensor(graph.sub(), external);
            if (external) out.push_back(std::move(t));
        }
    }
    return out;
}

}  // namespace actvar
