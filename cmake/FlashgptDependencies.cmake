# Required dependencies come from Debian packages (scripts/install-deps.sh installs them).
# Optional ones switch features on where present; the GPU machine lacks several of them.
find_package(fmt REQUIRED)
find_package(nlohmann_json 3.10 REQUIRED)
find_package(CLI11 CONFIG REQUIRED)
find_package(OpenMP REQUIRED COMPONENTS CXX)
find_package(Threads REQUIRED)

find_package(ZLIB)
find_package(LibLZMA)
find_package(BLAS)
# The data pipeline's `download` (libcurl) and archive unpacking (libarchive).
find_package(CURL)
find_package(LibArchive)
message(STATUS "flashgpt data: zlib=${ZLIB_FOUND} liblzma=${LIBLZMA_FOUND} curl=${CURL_FOUND} libarchive=${LibArchive_FOUND}")
