#include "stop_signal.h"

namespace flashgpt {
namespace {

std::atomic<int> g_stop_signal{0};

extern "C" void cli_on_stop_signal(int signal) {
  if (g_stop_signal.exchange(signal) != 0) {
    std::signal(signal, SIG_DFL);
    std::raise(signal);
  }
}

}  // namespace

std::atomic<int>& cli_stop_flag() { return g_stop_signal; }

StopSignalGuard::StopSignalGuard() {
  g_stop_signal.store(0);
  struct sigaction sa {};
  sa.sa_handler = cli_on_stop_signal;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGINT, &sa, &old_int_);
  sigaction(SIGTERM, &sa, &old_term_);
}

StopSignalGuard::~StopSignalGuard() {
  sigaction(SIGINT, &old_int_, nullptr);
  sigaction(SIGTERM, &old_term_, nullptr);
}

}  // namespace flashgpt
