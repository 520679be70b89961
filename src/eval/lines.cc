// Reading the segment files of `flashgpt eval bleu`: one segment per line, UTF-8.
#include <flashgpt/error.h>
#include <flashgpt/eval.h>
#include <flashgpt/unicode.h>

#include <algorithm>
#include <fstream>
#include <iterator>
#include <system_error>

namespace flashgpt {

std::vector<std::string> eval_read_lines(const std::filesystem::path& path) {
  std::error_code ec;
  const auto status = std::filesystem::status(path, ec);
  FLASHGPT_CHECK(std::filesystem::exists(status), "{}: no such file", path.string());
  FLASHGPT_CHECK(!std::filesystem::is_directory(status), "{}: is a directory, not a text file", path.string());
  std::ifstream in(path, std::ios::binary);
  FLASHGPT_CHECK(in, "{}: cannot open for reading", path.string());
  const std::string text{std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
  FLASHGPT_CHECK(!in.bad(), "{}: read error", path.string());
  FLASHGPT_CHECK(!text.empty(), "{}: empty file (expected one segment per line)", path.string());
  if (const auto bad = utf8_first_invalid(text)) {
    const auto line = 1 + std::count(text.begin(), text.begin() + static_cast<std::ptrdiff_t>(*bad), '\n');
    FLASHGPT_FAIL("{}: invalid UTF-8 at line {} (byte offset {})", path.string(), line, *bad);
  }
  std::vector<std::string> lines;
  size_t pos = 0;
  while (pos < text.size()) {
    size_t end = text.find('\n', pos);
    if (end == std::string::npos) end = text.size();
    lines.emplace_back(text, pos, end - pos);
    pos = end + 1;
  }
  return lines;
}

}  // namespace flashgpt
