// C shim over Debian's libgloo-dev (2022 snapshot) for dist-cpu's `gloo` feature.
// Every entry point catches every C++ exception and turns it into a non-zero return code with
// the message in the caller's buffer; nothing unwinds into Rust. Rendezvous goes through store
// callbacks implemented in Rust (set / get / wait), so gloo uses the job's dist-store.
//
// The full mesh is connected here rather than by gloo's rendezvous::Context::connectFullMesh,
// with the same store keys, so that the whole connect keeps one deadline: gloo waits five times
// a pair's timeout for it to connect, and connects pairs one after the other.

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include <unistd.h>

#include <gloo/allgatherv.h>
#include <gloo/allreduce.h>
#include <gloo/barrier.h>
#include <gloo/broadcast.h>
#include <gloo/context.h>
#include <gloo/rendezvous/prefix_store.h>
#include <gloo/rendezvous/store.h>
#include <gloo/transport/context.h>
#include <gloo/transport/pair.h>
#include <gloo/transport/tcp/device.h>

extern "C" {
typedef void (*dg_sink_fn)(void* sink, const char* data, size_t len);
typedef int (*dg_set_fn)(void* user, const char* key, size_t klen, const char* val, size_t vlen);
typedef int (*dg_get_fn)(void* user, const char* key, size_t klen, void* sink, dg_sink_fn put);
typedef int (*dg_wait_fn)(void* user, const char* const* keys, const size_t* klens, size_t n,
                          int64_t timeout_ms);
}

namespace {

void put_vec(void* sink, const char* data, size_t len) {
  auto* v = static_cast<std::vector<char>*>(sink);
  v->assign(data, data + len);
}

class CallbackStore : public gloo::rendezvous::Store {
 public:
  CallbackStore(void* user, dg_set_fn set, dg_get_fn get, dg_wait_fn wait, int64_t timeout_ms)
      : user_(user), set_(set), get_(get), wait_(wait), timeout_ms_(timeout_ms) {}

  void set(const std::string& key, const std::vector<char>& data) override {
    if (set_(user_, key.data(), key.size(), data.data(), data.size()) != 0) {
      throw std::runtime_error("store set of " + key + " failed");
    }
  }

  std::vector<char> get(const std::string& key) override {
    std::vector<char> out;
    if (get_(user_, key.data(), key.size(), &out, put_vec) != 0) {
      throw std::runtime_error("store get of " + key + " failed");
    }
    return out;
  }

  void wait(const std::vector<std::string>& keys) override { wait(keys, std::chrono::milliseconds(timeout_ms_)); }

  void wait(const std::vector<std::string>& keys, const std::chrono::milliseconds& timeout) override {
    std::vector<const char*> ptrs;
    std::vector<size_t> lens;
    for (const auto& k : keys) {
      ptrs.push_back(k.data());
      lens.push_back(k.size());
    }
    if (wait_(user_, ptrs.data(), lens.data(), keys.size(), timeout.count()) != 0) {
      throw std::runtime_error("store wait timed out or failed");
    }
  }

 private:
  void* user_;
  dg_set_fn set_;
  dg_get_fn get_;
  dg_wait_fn wait_;
  int64_t timeout_ms_;
};

using Clock = std::chrono::steady_clock;
using Ms = std::chrono::milliseconds;

// What dg_new reports when the deadline passed: the peer it was waiting for.
struct MeshTimeout : std::runtime_error {
  MeshTimeout(int peer, const std::string& what) : std::runtime_error(what), peer(peer) {}
  int peer;
};

// Closes the pair being connected when the deadline passes: gloo then stops waiting for it
// (a closed pair counts as settled) and the connect loop reports the timeout. `current` and
// `expired` are sequentially consistent: either the watchdog sees the pair the loop is about to
// wait for, or the loop sees `expired` before it waits.
class Watchdog {
 public:
  Watchdog(gloo::transport::Context* tctx, Clock::time_point deadline) {
    thread_ = std::thread([this, tctx, deadline] {
      std::unique_lock<std::mutex> l(m_);
      if (cv_.wait_until(l, deadline, [this] { return done_; })) return;
      expired.store(true);
      int c = current.load();
      if (c >= 0) tctx->getPair(c)->close();
    });
  }
  ~Watchdog() {
    {
      std::lock_guard<std::mutex> l(m_);
      done_ = true;
    }
    cv_.notify_all();
    thread_.join();
  }
  std::atomic<bool> expired{false};
  std::atomic<int> current{-1};

 private:
  std::mutex m_;
  std::condition_variable cv_;
  bool done_ = false;
  std::thread thread_;
};

// A gloo context whose full mesh is connected under one deadline.
class MeshContext : public gloo::Context {
 public:
  MeshContext(int rank, int size) : gloo::Context(rank, size) {}

  // gloo's connectFullMesh (same keys: "rank_<i>" holds a host name, "<i>" the addresses of
  // rank i's pairs), every wait bounded by `deadline`.
  void connectMesh(gloo::rendezvous::Store& store, std::shared_ptr<gloo::transport::Device>& dev,
                   Clock::time_point deadline) {
    auto left = [&] {
      auto d = std::chrono::duration_cast<Ms>(deadline - Clock::now());
      return d < Ms(1) ? Ms(1) : d;
    };
    char host[256] = {0};
    if (gethostname(host, sizeof(host) - 1) != 0) throw std::runtime_error("gethostname failed");
    const std::string me(host);
    store.set("rank_" + std::to_string(rank), std::vector<char>(me.begin(), me.end()));
    int localRank = 0;
    for (int i = 0; i < rank; i++) {
      waitKey(store, "rank_" + std::to_string(i), i, deadline, left);
      auto v = store.get("rank_" + std::to_string(i));
      if (std::string(v.begin(), v.end()) == me) localRank++;
    }
    auto tctx = dev->createContext(rank, size);
    // A pair waits five times its timeout to connect: make that end just after the deadline,
    // which the watchdog enforces.
    tctx->setTimeout(left() / 5 + Ms(2));
    std::vector<char> all;
    for (int i = 0; i < size; i++) {
      if (i == rank) continue;
      auto& pair = tctx->createPair(i);
      pair->setLocalRank(localRank);
      auto b = pair->address().bytes();
      all.insert(all.end(), b.begin(), b.end());
    }
    store.set(std::to_string(rank), all);
    Watchdog dog(tctx.get(), deadline);
    for (int i = 0; i < size; i++) {
      if (i == rank) continue;
      waitKey(store, std::to_string(i), i, deadline, left);
      auto peerAll = store.get(std::to_string(i));
      if (peerAll.size() % (size - 1) != 0) {
        throw std::runtime_error("rank " + std::to_string(i) + " published " +
                                 std::to_string(peerAll.size()) + " address bytes for " +
                                 std::to_string(size - 1) + " pairs");
      }
      const size_t n = peerAll.size() / (size - 1);
      const size_t at = static_cast<size_t>(rank > i ? rank - 1 : rank) * n;
      std::vector<char> addr(peerAll.begin() + at, peerAll.begin() + at + n);
      dog.current.store(i);
      if (dog.expired.load()) throw MeshTimeout(i, "the deadline passed before connecting");
      try {
        tctx->getPair(i)->connect(addr);
      } catch (const std::exception& e) {
        if (dog.expired.load() || std::string(e.what()).find("Connect timeout") != std::string::npos) {
          throw MeshTimeout(i, e.what());
        }
        throw std::runtime_error("connecting to rank " + std::to_string(i) + ": " + e.what());
      }
      if (dog.expired.load()) throw MeshTimeout(i, "the pair did not connect in time");
      dog.current.store(-1);
    }
    device_ = dev;
    transportContext_ = std::move(tctx);
  }

 private:
  template <typename Left>
  static void waitKey(gloo::rendezvous::Store& store, const std::string& key, int peer,
                      Clock::time_point deadline, Left left) {
    try {
      store.wait({key}, left());
    } catch (const std::exception& e) {
      if (Clock::now() >= deadline) throw MeshTimeout(peer, "no address from it: " + std::string(e.what()));
      throw;
    }
  }
};

struct Ctx {
  std::shared_ptr<MeshContext> ctx;
};

void write_err(char* err, size_t errlen, const char* what) {
  if (err != nullptr && errlen > 0) {
    std::snprintf(err, errlen, "%s", what);
  }
}

template <typename T>
void r_sum(void* c, const void* a, const void* b, size_t n) {
  T* o = static_cast<T*>(c);
  const T* x = static_cast<const T*>(a);
  const T* y = static_cast<const T*>(b);
  for (size_t i = 0; i < n; i++) o[i] = x[i] + y[i];
}
template <typename T>
void r_prod(void* c, const void* a, const void* b, size_t n) {
  T* o = static_cast<T*>(c);
  const T* x = static_cast<const T*>(a);
  const T* y = static_cast<const T*>(b);
  for (size_t i = 0; i < n; i++) o[i] = x[i] * y[i];
}
// Wrapping integer arithmetic, as dist-core's kernel does (no signed-overflow UB).
template <typename T, typename U>
void r_sum_wrap(void* c, const void* a, const void* b, size_t n) {
  T* o = static_cast<T*>(c);
  const T* x = static_cast<const T*>(a);
  const T* y = static_cast<const T*>(b);
  for (size_t i = 0; i < n; i++) o[i] = static_cast<T>(static_cast<U>(x[i]) + static_cast<U>(y[i]));
}
template <typename T, typename U>
void r_prod_wrap(void* c, const void* a, const void* b, size_t n) {
  T* o = static_cast<T*>(c);
  const T* x = static_cast<const T*>(a);
  const T* y = static_cast<const T*>(b);
  for (size_t i = 0; i < n; i++) o[i] = static_cast<T>(static_cast<U>(x[i]) * static_cast<U>(y[i]));
}
template <typename T>
void r_max(void* c, const void* a, const void* b, size_t n) {
  T* o = static_cast<T*>(c);
  const T* x = static_cast<const T*>(a);
  const T* y = static_cast<const T*>(b);
  for (size_t i = 0; i < n; i++) o[i] = x[i] < y[i] ? y[i] : x[i];
}
template <typename T>
void r_min(void* c, const void* a, const void* b, size_t n) {
  T* o = static_cast<T*>(c);
  const T* x = static_cast<const T*>(a);
  const T* y = static_cast<const T*>(b);
  for (size_t i = 0; i < n; i++) o[i] = y[i] < x[i] ? y[i] : x[i];
}

// op: 0 sum, 1 prod, 2 max, 3 min.
template <typename T, typename U>
gloo::AllreduceOptions::Func pick_int(int op) {
  switch (op) {
    case 0: return r_sum_wrap<T, U>;
    case 1: return r_prod_wrap<T, U>;
    case 2: return r_max<T>;
    default: return r_min<T>;
  }
}
template <typename T>
gloo::AllreduceOptions::Func pick_float(int op) {
  switch (op) {
    case 0: return r_sum<T>;
    case 1: return r_prod<T>;
    case 2: return r_max<T>;
    default: return r_min<T>;
  }
}

template <typename T>
void do_allreduce(Ctx* c, void* ptr, size_t count, gloo::AllreduceOptions::Func f, int64_t ms) {
  gloo::AllreduceOptions opts(c->ctx);
  opts.setOutput(static_cast<T*>(ptr), count);
  opts.setReduceFunction(f);
  opts.setTimeout(std::chrono::milliseconds(ms));
  gloo::allreduce(opts);
}

}  // namespace

#define DG_TRY try {
#define DG_CATCH                                      \
  }                                                   \
  catch (const std::exception& e) {                   \
    write_err(err, errlen, e.what());                 \
    return 1;                                         \
  }                                                   \
  catch (...) {                                       \
    write_err(err, errlen, "unknown C++ exception");  \
    return 1;                                         \
  }                                                   \
  return 0;

extern "C" {

// Connects the full mesh within `timeout_ms`. Returns 0, 1 (error, message in `err`) or 2 (the
// deadline passed; `*late_peer` is the rank it was waiting for).
int dg_new(int rank, int size, void* user, dg_set_fn set, dg_get_fn get, dg_wait_fn wait,
           const char* prefix, int64_t timeout_ms, const char* hostname, const char* iface, void** out,
           int* late_peer, char* err, size_t errlen) {
  *late_peer = -1;
  try {
    *out = nullptr;
    const auto deadline = Clock::now() + Ms(timeout_ms);
    gloo::transport::tcp::attr attr;
    if (hostname != nullptr && hostname[0] != 0) attr.hostname = hostname;
    if (iface != nullptr && iface[0] != 0) attr.iface = iface;
    auto dev = gloo::transport::tcp::CreateDevice(attr);
    CallbackStore store(user, set, get, wait, timeout_ms);
    gloo::rendezvous::PrefixStore pstore(prefix, store);
    auto ctx = std::make_shared<MeshContext>(rank, size);
    ctx->setTimeout(Ms(timeout_ms));
    ctx->connectMesh(pstore, dev, deadline);
    *out = new Ctx{ctx};
  } catch (const MeshTimeout& e) {
    *late_peer = e.peer;
    write_err(err, errlen, e.what());
    return 2;
  } catch (const std::exception& e) {
    write_err(err, errlen, e.what());
    return 1;
  } catch (...) {
    write_err(err, errlen, "unknown C++ exception");
    return 1;
  }
  return 0;
}

void dg_free(void* ctx) {
  try {
    delete static_cast<Ctx*>(ctx);
  } catch (...) {
  }
}

// dtype: 0 f32, 1 f64, 2 i8, 3 u8, 4 i32, 5 u32, 6 i64, 7 u64.
int dg_allreduce(void* ctx, void* ptr, size_t count, int dtype, int op, int64_t ms, char* err,
                 size_t errlen) {
  DG_TRY
  auto* c = static_cast<Ctx*>(ctx);
  switch (dtype) {
    case 0: do_allreduce<float>(c, ptr, count, pick_float<float>(op), ms); break;
    case 1: do_allreduce<double>(c, ptr, count, pick_float<double>(op), ms); break;
    case 2: do_allreduce<int8_t>(c, ptr, count, pick_int<int8_t, uint8_t>(op), ms); break;
    case 3: do_allreduce<uint8_t>(c, ptr, count, pick_int<uint8_t, uint8_t>(op), ms); break;
    case 4: do_allreduce<int32_t>(c, ptr, count, pick_int<int32_t, uint32_t>(op), ms); break;
    case 5: do_allreduce<uint32_t>(c, ptr, count, pick_int<uint32_t, uint32_t>(op), ms); break;
    case 6: do_allreduce<int64_t>(c, ptr, count, pick_int<int64_t, uint64_t>(op), ms); break;
    case 7: do_allreduce<uint64_t>(c, ptr, count, pick_int<uint64_t, uint64_t>(op), ms); break;
    default: throw std::runtime_error("dg_allreduce: unknown dtype code");
  }
  DG_CATCH
}

int dg_allgatherv(void* ctx, const void* in, size_t in_bytes, void* out, const size_t* counts, int64_t ms,
                  char* err, size_t errlen) {
  DG_TRY
  auto* c = static_cast<Ctx*>(ctx);
  gloo::AllgathervOptions opts(c->ctx);
  opts.setInput(static_cast<char*>(const_cast<void*>(in)), in_bytes);
  opts.setOutput(static_cast<char*>(out), std::vector<size_t>(counts, counts + c->ctx->size));
  opts.setTimeout(std::chrono::milliseconds(ms));
  gloo::allgatherv(opts);
  DG_CATCH
}

int dg_broadcast(void* ctx, void* ptr, size_t bytes, int root, int64_t ms, char* err, size_t errlen) {
  DG_TRY
  auto* c = static_cast<Ctx*>(ctx);
  gloo::BroadcastOptions opts(c->ctx);
  opts.setOutput(static_cast<char*>(ptr), bytes);
  opts.setRoot(root);
  opts.setTimeout(std::chrono::milliseconds(ms));
  gloo::broadcast(opts);
  DG_CATCH
}

int dg_barrier(void* ctx, int64_t ms, char* err, size_t errlen) {
  DG_TRY
  auto* c = static_cast<Ctx*>(ctx);
  gloo::BarrierOptions opts(c->ctx);
  opts.setTimeout(std::chrono::milliseconds(ms));
  gloo::barrier(opts);
  DG_CATCH
}

int dg_send(void* ctx, const void* ptr, size_t bytes, int dst, uint64_t slot, int64_t ms, char* err,
            size_t errlen) {
  DG_TRY
  auto* c = static_cast<Ctx*>(ctx);
  auto buf = c->ctx->createUnboundBuffer(const_cast<void*>(ptr), bytes);
  buf->send(dst, slot);
  if (!buf->waitSend(std::chrono::milliseconds(ms))) throw std::runtime_error("send timed out");
  DG_CATCH
}

int dg_recv(void* ctx, void* ptr, size_t bytes, int src, uint64_t slot, int64_t ms, char* err, size_t errlen) {
  DG_TRY
  auto* c = static_cast<Ctx*>(ctx);
  auto buf = c->ctx->createUnboundBuffer(ptr, bytes);
  buf->recv(src, slot);
  if (!buf->waitRecv(std::chrono::milliseconds(ms))) throw std::runtime_error("recv timed out");
  DG_CATCH
}

}  // extern "C"
