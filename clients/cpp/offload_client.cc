// An offload device in C++, built from protos/offload/v1/offload.proto with protoc and gRPC's
// C++ plugin: it plays task 0 itself (a synthetic 500x375 BGR frame with a green ball at a known
// place), asks the server's health service, streams each frame to ExecuteRemaining at task 1
// with a window of frames in flight, and prints one JSON line per answer with the decoded result.
//
//   make cpp-client
//   FP=$(python -m offload.server --print-fingerprint)
//   build/cpp/offload-client --server 127.0.0.1:50051 --fingerprint "$FP" --frames 10
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>
#include <google/protobuf/unknown_field_set.h>
#include <unistd.h>

#include <algorithm>
#include <charconv>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <future>
#include <iostream>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "offload/v1/offload.grpc.pb.h"

namespace {

namespace pb = offload::v1;

constexpr int kHeight = 375;  // the ball-tracking pipeline's frame: 500 wide, as task 0 resizes
constexpr int kWidth = 500;
// The names of the wire contract (offload/_wire.py, offload/_security.py).
constexpr const char* kService = "offload.v1.Offload";
constexpr const char* kHealthCheck = "/grpc.health.v1.Health/Check";
constexpr const char* kTokenHeader = "authorization";

const char* const kUsage = R"(usage: offload-client --fingerprint FP [options]

  --server HOST:PORT       the offload server (default $OFFLOAD_SERVER or 127.0.0.1:50051)
  --pipeline NAME          the server's --pipeline (default examples.ball_tracking)
  --fingerprint FP         the pipeline's fingerprint (default $OFFLOAD_FINGERPRINT):
                           python -m offload.server --print-fingerprint
  --frames N               frames to send (default 10)
  --window W               frames in flight (default 4)
  --next-task K            the first task the server runs (default 1: everything after capture)
  --device-id ID           default cpp-<hostname>
  --token TOKEN            the server's token (default $OFFLOAD_TOKEN)
  --tls                    use TLS with the system's root certificates
  --tls-ca PEM             use TLS, trusting this CA
  --connect-timeout S      seconds the health check may take (default 10)
  --max-message-bytes N    largest message sent or received (default 16777216, the server's)
  --save-frames DIR        also write each frame sent as DIR/frame-<item>.bgr (raw C-order bytes)
)";

struct Options {
  std::string server;
  std::string pipeline = "examples.ball_tracking";
  std::string fingerprint;
  long frames = 10;
  long window = 4;
  long next_task = 1;
  std::string device_id;
  std::string token;
  bool tls = false;
  std::string tls_ca;
  double connect_timeout = 10;
  long max_message_bytes = 16L * 1024 * 1024;
  std::string save_frames;
};

[[noreturn]] void usage_error(const std::string& message) {
  std::cerr << "error: " << message << " (see --help)\n";
  std::exit(2);
}

[[noreturn]] void fail(const std::string& message) {
  std::cerr << "error: " << message << "\n";
  std::exit(1);
}

std::string env_or(const char* name, const std::string& fallback) {
  const char* value = std::getenv(name);
  return value != nullptr && *value != '\0' ? value : fallback;
}

long whole_number(const std::string& option, const std::string& text, long minimum) {
  long value = 0;
  auto [end, error] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (error != std::errc() || end != text.data() + text.size() || value < minimum) {
    usage_error(option + " " + text + ": give a whole number >= " + std::to_string(minimum));
  }
  return value;
}

Options parse(int argc, char** argv) {
  Options o;
  char host[256] = "unknown";
  gethostname(host, sizeof host - 1);
  o.server = env_or("OFFLOAD_SERVER", "127.0.0.1:50051");
  o.fingerprint = env_or("OFFLOAD_FINGERPRINT", "");
  o.token = env_or("OFFLOAD_TOKEN", "");
  o.device_id = std::string("cpp-") + host;
  for (int i = 1; i < argc; ++i) {
    std::string name = argv[i];
    if (name == "--help" || name == "-h") {
      std::cout << kUsage;
      std::exit(0);
    }
    if (name == "--tls") {
      o.tls = true;
      continue;
    }
    if (i + 1 >= argc) usage_error(name + " needs a value");
    std::string value = argv[++i];
    if (name == "--server") o.server = value;
    else if (name == "--pipeline") o.pipeline = value;
    else if (name == "--fingerprint") o.fingerprint = value;
    else if (name == "--frames") o.frames = whole_number(name, value, 0);
    else if (name == "--window") o.window = whole_number(name, value, 1);
    else if (name == "--next-task") o.next_task = whole_number(name, value, 1);
    else if (name == "--device-id") o.device_id = value;
    else if (name == "--token") o.token = value;
    else if (name == "--tls-ca") o.tls_ca = value;
    else if (name == "--connect-timeout") o.connect_timeout = whole_number(name, value, 1);
    else if (name == "--max-message-bytes") o.max_message_bytes = whole_number(name, value, 1);
    else if (name == "--save-frames") o.save_frames = value;
    else usage_error("unknown option " + name);
  }
  if (o.max_message_bytes > INT32_MAX) {
    usage_error("--max-message-bytes " + std::to_string(o.max_message_bytes) +
                ": gRPC takes at most " + std::to_string(INT32_MAX));
  }
  if (o.fingerprint.empty()) {
    usage_error("--fingerprint is required: print it with "
                "`python -m offload.server --print-fingerprint`");
  }
  return o;
}

// --- task 0: the same frames as the Node.js client (clients/node/offload-client.js) ---------

// A grey, noisy background (unsaturated, so outside the green range) and a green ball of radius
// 40 whose centre moves by (30, 10) pixels per frame. BGR, C order.
std::pair<int, int> ball_centre(uint64_t item) {
  return {100 + static_cast<int>((30 * item) % 300), 150 + static_cast<int>((10 * item) % 100)};
}

std::string synthetic_frame(uint64_t item) {
  std::string data(static_cast<size_t>(kHeight) * kWidth * 3, '\0');
  auto seed = static_cast<uint32_t>((item + 1) * 2654435761ULL);
  auto [cx, cy] = ball_centre(item);
  for (int y = 0; y < kHeight; ++y) {
    for (int x = 0; x < kWidth; ++x) {
      char* pixel = &data[(static_cast<size_t>(y) * kWidth + x) * 3];
      if ((x - cx) * (x - cx) + (y - cy) * (y - cy) <= 40 * 40) {
        pixel[0] = 40;                         // blue
        pixel[1] = static_cast<char>(200);     // green
        pixel[2] = 40;                         // red
        continue;
      }
      int grey = 90 + (x + y) % 60;
      for (int c = 0; c < 3; ++c) {
        seed = seed * 1103515245u + 12345u;
        pixel[c] = static_cast<char>(grey + (seed >> 16) % 12);
      }
    }
  }
  return data;
}

// --- offload.v1.Value -> JSON, as the Python device prints results (offload/_device/report.py)

void json_string(std::ostream& out, const std::string& text) {
  out << '"';
  for (unsigned char c : text) {
    if (c == '"' || c == '\\') {
      out << '\\' << c;
    } else if (c < 0x20) {
      char escaped[8];
      std::snprintf(escaped, sizeof escaped, "\\u%04x", c);
      out << escaped;
    } else {
      out << c;
    }
  }
  out << '"';
}

// Shortest text that reads back as the same double, and as a float (41.0, not 41), like Python.
void json_double(std::ostream& out, double value) {
  if (std::isnan(value)) {
    out << "NaN";
  } else if (std::isinf(value)) {
    out << (value > 0 ? "Infinity" : "-Infinity");
  } else {
    char text[32];
    auto end = std::to_chars(text, text + sizeof text, value).ptr;
    std::string s(text, end);
    if (s.find_first_of(".e") == std::string::npos) s += ".0";
    out << s;
  }
}

std::string base64(const std::string& bytes) {
  static const char* const kAlphabet =
      "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  std::string out;
  size_t i = 0;
  for (; i + 2 < bytes.size(); i += 3) {
    uint32_t n = (uint8_t(bytes[i]) << 16) | (uint8_t(bytes[i + 1]) << 8) | uint8_t(bytes[i + 2]);
    for (int shift : {18, 12, 6, 0}) out += kAlphabet[(n >> shift) & 63];
  }
  if (i < bytes.size()) {
    uint32_t n = uint8_t(bytes[i]) << 16;
    if (i + 1 < bytes.size()) n |= uint8_t(bytes[i + 1]) << 8;
    out += kAlphabet[(n >> 18) & 63];
    out += kAlphabet[(n >> 12) & 63];
    out += i + 1 < bytes.size() ? kAlphabet[(n >> 6) & 63] : '=';
    out += '=';
  }
  return out;
}

// The element at p, stored little-endian ('<', '|') or big-endian ('>'); this machine's order is
// little-endian (x86, ARM Linux), as NumPy's '<' is.
template <typename T>
T load(const char* p, bool big) {
  char bytes[sizeof(T)];
  std::memcpy(bytes, p, sizeof bytes);
  if (big) std::reverse(bytes, bytes + sizeof bytes);
  T value;
  std::memcpy(&value, bytes, sizeof value);
  return value;
}

double half_to_double(uint16_t h) {
  int exponent = (h >> 10) & 31;
  double mantissa = h & 1023;
  double magnitude = exponent == 0    ? std::ldexp(mantissa, -24)
                     : exponent == 31 ? (mantissa != 0 ? NAN : INFINITY)
                                      : std::ldexp(mantissa + 1024, exponent - 25);
  return (h & 0x8000) != 0 ? -magnitude : magnitude;
}

// One element of an array of dtype `kind` ("u1", "f4": the type string without its byte order).
void json_element(std::ostream& out, const std::string& kind, const char* p, bool big) {
  if (kind == "b1") out << (*p != 0 ? "true" : "false");
  else if (kind == "u1") out << unsigned(load<uint8_t>(p, big));
  else if (kind == "i1") out << int(load<int8_t>(p, big));
  else if (kind == "u2") out << load<uint16_t>(p, big);
  else if (kind == "i2") out << load<int16_t>(p, big);
  else if (kind == "u4") out << load<uint32_t>(p, big);
  else if (kind == "i4") out << load<int32_t>(p, big);
  else if (kind == "u8") out << load<uint64_t>(p, big);
  else if (kind == "i8") out << load<int64_t>(p, big);
  else if (kind == "f2") json_double(out, half_to_double(load<uint16_t>(p, big)));
  else if (kind == "f4") json_double(out, load<float>(p, big));
  else if (kind == "f8") json_double(out, load<double>(p, big));
  else if (kind == "c8" || kind == "c16") {  // JSON has no complex numbers: [real, imag]
    const std::string part = kind == "c8" ? "f4" : "f8";
    out << '[';
    json_element(out, part, p, big);
    out << ',';
    json_element(out, part, p + (kind == "c8" ? 4 : 8), big);
    out << ']';
  }
}

const std::map<std::string, size_t> kItemSizes = {
    {"b1", 1}, {"u1", 1}, {"i1", 1}, {"u2", 2}, {"i2", 2},  {"u4", 4}, {"i4", 4},
    {"u8", 8}, {"i8", 8}, {"f2", 2}, {"f4", 4}, {"f8", 8}, {"c8", 8}, {"c16", 16}};

// Nested lists of the array's elements, as NumPy's tolist(); one the server should never send
// (an unknown dtype, data not matching the shape) is shown as it came.
void json_array(std::ostream& out, const pb::NDArray& array, uint64_t max_dimension) {
  const std::string& dtype = array.dtype();
  auto size = dtype.size() > 1 ? kItemSizes.find(dtype.substr(1)) : kItemSizes.end();
  // The element count, refusing a product that overflows or an (empty) array's dimension longer
  // than any message, as the Python codec does: either would make the walk below run wild.
  uint64_t count = 1;
  bool fits = true;
  for (uint64_t d : array.shape()) {
    fits = fits && d <= max_dimension && !__builtin_mul_overflow(count, d, &count);
  }
  const bool known = size != kItemSizes.end() && (dtype[0] == '<' || dtype[0] == '>' ||
                                                 (dtype[0] == '|' && size->second == 1));
  fits = fits && count <= array.data().size();  // so that the product below cannot overflow
  if (!known || !fits || count * size->second != array.data().size()) {
    out << "{\"dtype\":";
    json_string(out, dtype);
    out << ",\"shape\":[";
    for (int i = 0; i < array.shape_size(); ++i) out << (i ? "," : "") << array.shape(i);
    out << "],\"base64\":\"" << base64(array.data()) << "\"}";
    return;
  }
  const std::string kind = size->first;
  const char* p = array.data().data();
  // Walks the dimensions depth first, one element after the other in C order.
  auto build = [&](auto&& self, int dim) -> void {
    if (dim == array.shape_size()) {
      json_element(out, kind, p, dtype[0] == '>');
      p += size->second;
      return;
    }
    out << '[';
    for (uint64_t i = 0; i < array.shape(dim); ++i) {
      if (i) out << ',';
      self(self, dim + 1);
    }
    out << ']';
  };
  build(build, 0);
}

void json_value(std::ostream& out, const pb::Value& value, uint64_t max_dimension) {
  switch (value.kind_case()) {
    case pb::Value::kBoolValue:
      out << (value.bool_value() ? "true" : "false");
      break;
    case pb::Value::kIntValue:
      out << value.int_value();
      break;
    case pb::Value::kFloatValue:
      json_double(out, value.float_value());
      break;
    case pb::Value::kStrValue:
      json_string(out, value.str_value());
      break;
    case pb::Value::kBytesValue:
      out << '"' << base64(value.bytes_value()) << '"';
      break;
    case pb::Value::kArray:
      json_array(out, value.array(), max_dimension);
      break;
    case pb::Value::kListValue:
    case pb::Value::kTupleValue: {
      const auto& items = value.has_list_value() ? value.list_value() : value.tuple_value();
      out << '[';
      for (int i = 0; i < items.items_size(); ++i) {
        if (i) out << ',';
        json_value(out, items.items(i), max_dimension);
      }
      out << ']';
      break;
    }
    case pb::Value::kMapValue: {
      out << '{';
      for (int i = 0; i < value.map_value().entries_size(); ++i) {
        const auto& entry = value.map_value().entries(i);
        if (i) out << ',';
        json_string(out, entry.key());
        out << ':';
        json_value(out, entry.value(), max_dimension);
      }
      out << '}';
      break;
    }
    default:  // none, or a kind newer than this client
      out << "null";
  }
}

// --- the calls ------------------------------------------------------------------------------

const char* code_name(grpc::StatusCode code) {
  static const char* const kNames[] = {
      "OK",           "CANCELLED",         "UNKNOWN",        "INVALID_ARGUMENT",
      "DEADLINE_EXCEEDED", "NOT_FOUND",    "ALREADY_EXISTS", "PERMISSION_DENIED",
      "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE",
      "UNIMPLEMENTED", "INTERNAL",         "UNAVAILABLE",    "DATA_LOSS",
      "UNAUTHENTICATED"};
  auto index = static_cast<size_t>(code);
  return index < sizeof kNames / sizeof *kNames ? kNames[index] : "UNKNOWN";
}

std::string read_file(const std::string& path, const char* option) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail(std::string(option) + " " + path + ": cannot read the file");
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

void authorise(grpc::ClientContext& context, const Options& o) {
  if (!o.token.empty()) context.AddMetadata(kTokenHeader, "Bearer " + o.token);
}

// grpc.health.v1.Health/Check for the offload service, through gRPC's generic stub: the two
// tiny messages (HealthCheckRequest{service = 1}, HealthCheckResponse{status = 1}) are built and
// read with protobuf's UnknownFieldSet rather than a second schema. 1 is SERVING.
void check_health(const std::shared_ptr<grpc::Channel>& channel, const Options& o) {
  google::protobuf::UnknownFieldSet request_fields;
  request_fields.AddLengthDelimited(1, kService);
  std::string request_bytes;
  request_fields.SerializeToString(&request_bytes);
  grpc::Slice slice(request_bytes);
  grpc::ByteBuffer request(&slice, 1), response;

  grpc::ClientContext context;
  authorise(context, o);
  context.set_deadline(std::chrono::system_clock::now() +
                       std::chrono::milliseconds(static_cast<long>(o.connect_timeout * 1000)));
  grpc::GenericStub stub(channel);
  std::promise<grpc::Status> done;
  stub.UnaryCall(&context, kHealthCheck, grpc::StubOptions(), &request, &response,
                 [&done](grpc::Status status) { done.set_value(std::move(status)); });
  grpc::Status status = done.get_future().get();
  if (!status.ok()) {
    fail("health check of " + o.server + " failed: " + code_name(status.error_code()) + ": " +
         status.error_message());
  }
  grpc::Slice answer;
  google::protobuf::UnknownFieldSet fields;
  uint64_t serving = 0;
  if (response.DumpToSingleSlice(&answer).ok() &&
      fields.ParseFromArray(answer.begin(), static_cast<int>(answer.size()))) {
    for (int i = 0; i < fields.field_count(); ++i) {
      const auto& field = fields.field(i);
      if (field.number() == 1 && field.type() == google::protobuf::UnknownField::TYPE_VARINT) {
        serving = field.varint();
      }
    }
  }
  if (serving != 1) {
    static const char* const kStatuses[] = {"UNKNOWN", "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN"};
    fail("the server at " + o.server + " is not serving " + kService + " (health: " +
         (serving < 4 ? kStatuses[serving] : "UNKNOWN") + "): it may be stopping; check its log");
  }
}

std::shared_ptr<grpc::Channel> connect(const Options& o) {
  std::shared_ptr<grpc::ChannelCredentials> credentials = grpc::InsecureChannelCredentials();
  if (o.tls || !o.tls_ca.empty()) {
    grpc::SslCredentialsOptions ssl;
    if (!o.tls_ca.empty()) ssl.pem_root_certs = read_file(o.tls_ca, "--tls-ca");
    credentials = grpc::SslCredentials(ssl);
  }
  grpc::ChannelArguments arguments;
  arguments.SetMaxSendMessageSize(static_cast<int>(o.max_message_bytes));
  arguments.SetMaxReceiveMessageSize(static_cast<int>(o.max_message_bytes));
  return grpc::CreateCustomChannel(o.server, credentials, arguments);
}

double unix_seconds() {
  using namespace std::chrono;
  return duration<double>(system_clock::now().time_since_epoch()).count();
}

}  // namespace

int main(int argc, char** argv) {
  const Options o = parse(argc, argv);
  auto channel = connect(o);
  check_health(channel, o);

  auto stub = pb::Offload::NewStub(channel);
  grpc::ClientContext context;
  authorise(context, o);
  auto stream = stub->ExecuteRemaining(&context);
  const std::string run_id = "cpp-" + std::to_string(getpid()) + "-" +
                             std::to_string(static_cast<long long>(unix_seconds() * 1000));

  std::map<uint64_t, std::pair<std::chrono::steady_clock::time_point, double>> in_flight;
  std::map<std::string, long> counts = {{"completed", 0}, {"filtered", 0}, {"failed", 0}};
  uint64_t next = 0;
  bool open = true, writes_done = false;
  pb::TaskState state;
  state.set_pipeline(o.pipeline);
  state.set_fingerprint(o.fingerprint);
  state.set_device_id(o.device_id);
  state.set_run_id(run_id);
  state.set_next_task(static_cast<uint32_t>(o.next_task));
  pb::NDArray* array = state.mutable_args()->mutable_array();
  array->set_dtype("|u1");
  for (int d : {kHeight, kWidth, 3}) array->add_shape(d);

  // The server answers in item order, one answer per item: write up to the window, then read one.
  // The stream is half-closed after the last frame (at once when there are none).
  while (open) {
    while (open && next < static_cast<uint64_t>(o.frames) &&
           in_flight.size() < static_cast<size_t>(o.window)) {
      const uint64_t item = next++;
      array->set_data(synthetic_frame(item));
      if (!o.save_frames.empty()) {
        std::string path = o.save_frames + "/frame-" + std::to_string(item) + ".bgr";
        std::ofstream file(path, std::ios::binary);
        if (!(file << array->data())) fail("--save-frames: cannot write " + path);
      }
      state.set_item(item);
      state.set_capture_time(unix_seconds());
      in_flight[item] = {std::chrono::steady_clock::now(), state.capture_time()};
      open = stream->Write(state);  // false: the stream is over, Finish says why
    }
    if (next >= static_cast<uint64_t>(o.frames) && open && !writes_done) {
      stream->WritesDone();
      writes_done = true;
    }
    if (in_flight.empty()) break;
    pb::ItemResult answer;
    if (!stream->Read(&answer)) break;
    auto sent = in_flight.find(answer.item());
    std::string status = pb::ItemResult::Status_Name(answer.status());
    std::transform(status.begin(), status.end(), status.begin(), ::tolower);
    if (counts.count(status) == 0) status = "failed";  // unknown to this client, as in Python
    ++counts[status];
    std::ostringstream line;
    auto [cx, cy] = ball_centre(answer.item());
    line << "{\"item\":" << answer.item() << ",\"status\":\"" << status << "\",\"drawn_centre\":["
         << cx << ',' << cy << "],\"run_id\":";
    json_string(line, run_id);
    if (sent != in_flight.end()) {
      line << ",\"capture_time\":";
      json_double(line, sent->second.second);
      std::chrono::duration<double, std::milli> latency =
          std::chrono::steady_clock::now() - sent->second.first;
      line << ",\"latency_ms\":";
      json_double(line, latency.count());
      in_flight.erase(sent);
    }
    line << ",\"server_cpu_ms\":";
    json_double(line, answer.server_cpu_seconds() * 1000);
    if (answer.status() == pb::ItemResult::COMPLETED) {
      line << ",\"result\":";
      json_value(line, answer.output(), o.max_message_bytes);
    } else {
      line << ",\"task\":" << answer.task();
    }
    if (!answer.error().empty()) {
      line << ",\"error\":";
      json_string(line, answer.error());
    }
    std::cout << line.str() << "}\n" << std::flush;
  }
  grpc::Status status = stream->Finish();
  if (!status.ok()) {
    fail(std::string("server answered ") + code_name(status.error_code()) + ": " +
         status.error_message());
  }
  if (!in_flight.empty()) {
    fail("the server ended the stream with " + std::to_string(in_flight.size()) +
         " items unanswered");
  }
  std::cerr << "offload (c++): " << o.frames << " frames to " << o.server << ": "
            << counts["completed"] << " completed, " << counts["filtered"] << " filtered, "
            << counts["failed"] << " failed\n";
  return 0;
}
