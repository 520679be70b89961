// Compiled as if it were part of the data pipeline: its own and earlier components' public
// headers resolve (the control for the two tests that must fail to compile).
#include <flashgpt/data_loader.h>
#include <flashgpt/digest.h>
#include <flashgpt/tokenizer.h>

int flashgpt_arch_forward_edge() { return static_cast<int>(sizeof(flashgpt::LoaderConfig)); }
