#include <flashgpt/error.h>

namespace flashgpt {

[[noreturn]] void error_throw(const char* file, int line, const std::string& message) {
#ifdef NDEBUG
  (void)file;
  (void)line;
  throw Error(message);
#else
  throw Error(fmt::format("{} ({}:{})", message, file, line));
#endif
}

}  // namespace flashgpt
