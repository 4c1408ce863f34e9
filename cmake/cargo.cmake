# Rust: the Tokio workload (bench/tokio) and the zkmem crate
# (bindings/rust), both built by cargo offline from Debian's packaged crates
# (each has a .cargo/config.toml), into one target directory so that tokio
# is compiled once for both.
#
# Debian's cargo comes before PATH's: the packaged crates are checked against
# Debian's rustc, and it is the toolchain CI installs. The driver reads this
# choice from the cache so that it and the build never rebuild each other's
# output with another compiler.
find_program(ZKMEM_CARGO cargo PATHS /usr/bin NO_DEFAULT_PATH)
find_program(ZKMEM_CARGO cargo)
set(ZKMEM_DEBIAN_CRATES /usr/share/cargo/registry)
set(ZKMEM_CARGO_TARGET_DIR ${CMAKE_BINARY_DIR}/cargo)
set(ZKMEM_CARGO_ENV CARGO_TARGET_DIR=${ZKMEM_CARGO_TARGET_DIR})
# The compiler and rustdoc beside that cargo, not PATH's: rustdoc reads the
# crates rustc compiled, and refuses another version's.
if(ZKMEM_CARGO)
  get_filename_component(ZKMEM_CARGO_DIR ${ZKMEM_CARGO} DIRECTORY)
  foreach(tool rustc rustdoc)
    if(EXISTS ${ZKMEM_CARGO_DIR}/${tool})
      string(TOUPPER ${tool} variable)
      list(APPEND ZKMEM_CARGO_ENV ${variable}=${ZKMEM_CARGO_DIR}/${tool})
    endif()
  endforeach()
endif()

# What is missing for the Tokio workload, and for the crate (whose build
# script needs the cc crate, and whose tests need tokio); empty: nothing.
file(GLOB ZKMEM_TOKIO_CRATES ${ZKMEM_DEBIAN_CRATES}/tokio-1.*)
file(GLOB ZKMEM_CC_CRATES ${ZKMEM_DEBIAN_CRATES}/cc-1.*)
set(ZKMEM_TOKIO_MISSING "")
if(NOT ZKMEM_CARGO)
  set(ZKMEM_TOKIO_MISSING "cargo not found")
elseif(NOT ZKMEM_TOKIO_CRATES)
  set(ZKMEM_TOKIO_MISSING "no tokio crate in ${ZKMEM_DEBIAN_CRATES}")
endif()
set(ZKMEM_CRATE_MISSING "${ZKMEM_TOKIO_MISSING}")
if(ZKMEM_CRATE_MISSING STREQUAL "" AND NOT ZKMEM_CC_CRATES)
  set(ZKMEM_CRATE_MISSING "no cc crate in ${ZKMEM_DEBIAN_CRATES}")
endif()
