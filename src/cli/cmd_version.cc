#include "commands.h"

#include <flashgpt/dist.h>

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
    fmt::print("flashgpt {}\ncuda: {}\nmpi: {}\nnccl: {}\n", FLASHGPT_VERSION, kCuda, comm_have_mpi() ? "yes" : "no",
               comm_have_nccl() ? "yes" : "no");
  });
}

}  // namespace flashgpt
