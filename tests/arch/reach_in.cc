// Compiled as if it were part of the data pipeline: the tokenizer's private headers stay in
// src/tokenizer, so this include must not resolve (arch_reach_in_fails_to_compile).
#include "tokenizer/bpe.h"
