// process_run: argv goes to the program byte for byte (no shell), exit statuses and
// signals come back, a missing program is a clear error.
#include <flashgpt/error.h>
#include <flashgpt/process.h>

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <random>

namespace flashgpt {
namespace {

TEST(Process, ArgumentsReachTheProgramUnchanged) {
  std::random_device rd;
  const auto dir = std::filesystem::temp_directory_path() / ("flashgpt proc '$(x)'; " + std::to_string(rd()));
  std::filesystem::create_directories(dir);
  const auto file = dir / "it's a \"file\"; touch pwned";
  // `touch` creates exactly the path given; a shell would have split it and run a command.
  EXPECT_EQ(process_run({"touch", file.string()}), 0);
  EXPECT_TRUE(std::filesystem::exists(file));
  EXPECT_FALSE(std::filesystem::exists("pwned"));
  EXPECT_EQ(std::distance(std::filesystem::directory_iterator(dir), std::filesystem::directory_iterator()), 1);
  std::filesystem::remove_all(dir);
}

TEST(Process, ExitStatusAndSignal) {
  EXPECT_EQ(process_run({"true"}), 0);
  EXPECT_EQ(process_run({"false"}), 1);
  EXPECT_EQ(process_run({"sh", "-c", "exit 7"}), 7);  // a shell only where the test asks for one
  EXPECT_EQ(process_run({"sh", "-c", "kill -TERM $$"}), 128 + 15);
  EXPECT_EQ(process_run({"ls", "/no/such/path"}, ChildOutput::discard), 2);
}

TEST(Process, MissingProgramIsAnError) {
  try {
    process_run({"flashgpt-no-such-program-xyz", "arg"});
    FAIL() << "no error for a missing program";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("cannot run flashgpt-no-such-program-xyz"), std::string::npos) << e.what();
  }
  EXPECT_THROW(process_run({}), Error);
  EXPECT_FALSE(process_program_exists("flashgpt-no-such-program-xyz"));
  EXPECT_TRUE(process_program_exists("sh"));
}

}  // namespace
}  // namespace flashgpt
