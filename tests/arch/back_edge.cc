// Compiled as if it were part of the tokenizer: the data pipeline comes after the tokenizer
// in the data flow, so its headers must not be found (arch_back_edge_fails_to_compile).
#include <flashgpt/data_loader.h>
