# The two entry points of the README. Everything else is plain CMake:
#   cmake -S . -B build && cmake --build build && ctest --test-dir build
BUILD ?= build
JOBS ?= $(shell nproc)
CMAKE_ARGS ?=
# Options of `flashgpt run` (e.g. RUN_ARGS="--steps 20 --eval-sentences 10"; `flashgpt run --help`).
RUN_ARGS ?=
GENERATOR := $(shell command -v ninja >/dev/null 2>&1 && echo "-G Ninja")

.PHONY: run test build deps clean

# The whole system: prepare data, train, evaluate zero/one/few-shot translation, write
# results/run[-N]/report.md (docs/run.md).
run: build
	./$(BUILD)/flashgpt run $(RUN_ARGS)

test: build
	ctest --test-dir $(BUILD) --output-on-failure -j $(JOBS)

build: deps
	@[ -f $(BUILD)/CMakeCache.txt ] || cmake -S . -B $(BUILD) $(GENERATOR) $(CMAKE_ARGS)
	cmake --build $(BUILD) -j $(JOBS)

deps:
	@./scripts/install-deps.sh

clean:
	rm -rf $(BUILD)
