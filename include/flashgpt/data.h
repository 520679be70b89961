// The WMT14 fr-en data pipeline, all of it: include only the header you need.
//   data_reader.h    streaming readers for plain/gz/xz text and parallel corpora
//   data_shard.h     the binary token-shard format, its writer and view
//   data_prepare.h   prepare: corpora -> documents -> token shards
//   data_analyze.h   whole-word keyword counts
//   data_loader.h    the training data loader
//   data_download.h  fetching the official archives
// UTF-8 helpers are in unicode.h and digests in digest.h (src/common).
#pragma once

#include <flashgpt/data_analyze.h>
#include <flashgpt/data_download.h>
#include <flashgpt/data_loader.h>
#include <flashgpt/data_prepare.h>
#include <flashgpt/data_reader.h>
#include <flashgpt/data_shard.h>
