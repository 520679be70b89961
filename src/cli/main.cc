#include "commands.h"

#include <flashgpt/error.h>

#include <fmt/core.h>

#include <cstdio>
#include <exception>

int main(int argc, char** argv) {
  CLI::App app{"flashgpt: exact FlashAttention, a tiktoken-compatible tokenizer and GPT training"};
  app.require_subcommand(1);
  app.fallthrough();
  flashgpt::cli_add_version(app);
  flashgpt::cli_add_bench(app);
  flashgpt::cli_add_data(app);
  flashgpt::cli_add_eval(app);
  flashgpt::cli_add_eval_translate(*app.get_subcommand("eval"));  // beside eval bleu
  flashgpt::cli_add_tokenize(app);
  flashgpt::cli_add_train(app);
  flashgpt::cli_add_export(app);
  flashgpt::cli_add_generate(app);
  flashgpt::cli_add_run(app);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  } catch (const flashgpt::CliExit& e) {
    return e.code;
  } catch (const flashgpt::Error& e) {
    fmt::print(stderr, "flashgpt: error: {}\n", e.what());
    return 1;
  } catch (const std::exception& e) {
    fmt::print(stderr, "flashgpt: unexpected error: {}\n", e.what());
    return 1;
  }
  return 0;
}
