#include <flashgpt/attention.h>
#include <flashgpt/error.h>

#include <cstdio>

// Validates a deliberately bad problem through the installed library and prints the
// error, so the test sees that headers, library and its dependencies all resolve.
int main() {
  flashgpt::AttentionParams params;
  params.head_dim = 48;
  try {
    flashgpt::attention_validate(params, flashgpt::AttentionPass::forward);
  } catch (const flashgpt::Error& e) {
    std::printf("consumer caught: %s\n", e.what());
    return 0;
  }
  return 1;
}
