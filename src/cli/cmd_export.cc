// `flashgpt export --format hf RUN [--out DIR]`: a run's checkpoint as a Hugging Face
// GPT2LMHeadModel directory (config.json + model.safetensors).
#include "commands.h"

#include <flashgpt/error.h>
#include <flashgpt/train.h>

#include <fmt/core.h>

#include <filesystem>
#include <memory>
#include <string>

namespace flashgpt {
namespace {

struct ExportOptions {
  std::string run;
  std::string format = "hf";
  std::string out;  // default RUN/hf
};

void run_export(const ExportOptions& o) {
  fmt::print(stderr, "export: run={} format={} out={}\n", o.run, o.format, o.out.empty() ? "(RUN/hf)" : o.out);
  FLASHGPT_CHECK(o.format == "hf", "--format {}: the only export format is hf", o.format);
  const std::filesystem::path run = o.run;
  const std::filesystem::path checkpoint = std::filesystem::is_directory(run) ? run / "checkpoint.safetensors" : run;
  FLASHGPT_CHECK(std::filesystem::exists(checkpoint), "{}: no such checkpoint (give a run directory or its "
                 "checkpoint.safetensors)", checkpoint.string());
  const std::filesystem::path out =
      !o.out.empty() ? std::filesystem::path(o.out) : (std::filesystem::is_directory(run) ? run : run.parent_path()) / "hf";
  export_hf(checkpoint, out);
  fmt::print("exported {} to {} (config.json, model.safetensors): load with "
             "transformers.GPT2LMHeadModel.from_pretrained(\"{}\")\n", checkpoint.string(), out.string(), out.string());
}

}  // namespace

void cli_add_export(CLI::App& app) {
  auto options = std::make_shared<ExportOptions>();
  auto* e = app.add_subcommand("export", "Export a trained run for other tools (hf: transformers' GPT-2)");
  e->add_option("run", options->run, "Run directory (or its checkpoint.safetensors)")->required();
  e->add_option("--format", options->format, "Output format")->capture_default_str()->check(CLI::IsMember({"hf"}));
  e->add_option("--out", options->out, "Output directory (default: RUN/hf)");
  e->callback([options] { run_export(*options); });
}

}  // namespace flashgpt
