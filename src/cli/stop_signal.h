// SIGINT/SIGTERM for the commands that train (train, run): while a StopSignalGuard lives, the
// first signal is stored in cli_stop_flag(), which the trainer polls (TrainConfig::stop) to
// write a checkpoint at the end of its step and return; a second signal ends the process at
// once (a checkpoint on disk is always a complete one: it is renamed into place).
#pragma once

#include <atomic>
#include <csignal>

namespace flashgpt {

// The signal that asked the command to stop (0: none).
std::atomic<int>& cli_stop_flag();

class StopSignalGuard {
 public:
  // Clears cli_stop_flag() and installs the handler; the destructor puts the old ones back.
  StopSignalGuard();
  ~StopSignalGuard();
  StopSignalGuard(const StopSignalGuard&) = delete;
  StopSignalGuard& operator=(const StopSignalGuard&) = delete;

 private:
  struct sigaction old_int_ {}, old_term_ {};
};

}  // namespace flashgpt
