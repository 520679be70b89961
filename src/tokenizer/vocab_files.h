// Finding, verifying and (where possible) downloading the .tiktoken rank files.
#pragma once

#include <filesystem>
#include <optional>
#include <string>
#include <string_view>

namespace flashgpt {

struct KnownEncoding {
  std::string_view name;
  std::string_view url;
  std::string_view sha256;  // published by tiktoken (tiktoken_ext/openai_public.py)
};
const KnownEncoding* encoding_known(std::string_view name);

// The directory the rank files are read from: `vocab_dir`, else FLASHGPT_TOKENIZER_DIR,
// else empty.
std::filesystem::path vocab_dir_resolve(const std::filesystem::path& vocab_dir);
// Our download cache: FLASHGPT_CACHE_DIR, else $XDG_CACHE_HOME/flashgpt/tokenizers, else
// ~/.cache/flashgpt/tokenizers.
std::filesystem::path vocab_cache_dir();

// The verified contents of NAME.tiktoken: from the vocab dir, else our cache, else
// tiktoken's cache (TIKTOKEN_CACHE_DIR, DATA_GYM_CACHE_DIR or $TMPDIR/data-gym-cache, file
// named sha1(url)), else downloaded into our cache (builds with libcurl only, and not when
// FLASHGPT_OFFLINE is set). Throws naming every place looked.
// A path that is a directory is an error naming it.
struct VocabFile {
  std::string contents;
  std::string path;  // where it was read from (or the URL), for error messages
};
VocabFile vocab_rank_file_read(std::string_view name, const std::filesystem::path& vocab_dir);
// NAME.meta.json beside the rank file, or nullopt when it is not there.
std::optional<VocabFile> vocab_meta_read(std::string_view name, const std::filesystem::path& vocab_dir);

}  // namespace flashgpt
