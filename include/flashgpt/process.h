// Child processes from an argument vector: no shell ever sees a path, so quotes, spaces
// and semicolons in arguments are just bytes.
#pragma once

#include <string>
#include <vector>

namespace flashgpt {

enum class ChildOutput { inherit, discard };  // discard: stdout and stderr to /dev/null

// Runs argv[0] (looked up in PATH when it has no '/') with `argv`, waits, and returns its
// exit status (128 + N when killed by signal N). A program that cannot be found or
// started throws flashgpt::Error naming it.
int process_run(const std::vector<std::string>& argv, ChildOutput output = ChildOutput::inherit);

// Whether `program` can be found (PATH lookup as process_run does it).
bool process_program_exists(const std::string& program);

}  // namespace flashgpt
