#include "commands.h"

#include <fmt/core.h>

namespace flashgpt {

void cli_add_version(CLI::App& app) {
  auto* cmd = app.add_subcommand("version", "Print the version and the backends this build has");
  cmd->callback([] {
#ifdef FLASHGPT_WITH_CUDA
    constexpr const char* kCuda = "yes";
#else
    constexpr const char* kCuda = "no";
#endif
    fmt::print("flashgpt {}\ncuda: {}\n", FLASHGPT_VERSION, kCuda);
  });
}

}  // namespace flashgpt
