//! Compiles zkmem's C core into a static library linked into the crate, so
//! that `cargo build` alone is enough.
//!
//! The list of sources is read from the top-level CMakeLists.txt
//! (`ZKMEM_CORE_SOURCES`), so a file added to the core reaches the crate
//! without a second list to keep in step. src/override.c is not in that list
//! and must stay out: it exports malloc and free, and a crate must not
//! replace the allocator of every C library in the process.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};

fn core_sources(cmake_lists: &Path) -> Vec<String> {
    let text = fs::read_to_string(cmake_lists)
        .unwrap_or_else(|error| panic!("cannot read {}: {}", cmake_lists.display(), error));
    let start = text
        .find("set(ZKMEM_CORE_SOURCES")
        .unwrap_or_else(|| panic!("no ZKMEM_CORE_SOURCES in {}", cmake_lists.display()));
    let list = &text[start + "set(ZKMEM_CORE_SOURCES".len()..];
    let end = list.find(')').unwrap_or_else(|| {
        panic!(
            "unterminated ZKMEM_CORE_SOURCES in {}",
            cmake_lists.display()
        )
    });
    let sources: Vec<String> = list[..end].split_whitespace().map(str::to_string).collect();
    if sources.is_empty() || sources.iter().any(|source| !source.ends_with(".c")) {
        panic!(
            "ZKMEM_CORE_SOURCES in {} is not a plain list of .c files: {:?}",
            cmake_lists.display(),
            sources
        );
    }
    if sources.iter().any(|source| source.ends_with("override.c")) {
        panic!("ZKMEM_CORE_SOURCES lists override.c, which replaces malloc");
    }
    sources
}

fn main() {
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let root = manifest.join("..").join("..");
    let cmake_lists = root.join("CMakeLists.txt");
    let include = root.join("include");
    let src = root.join("src");

    let mut build = cc::Build::new();
    build.include(&include).include(&src);
    // The flags of ZKMEM_CORE_FLAGS in CMakeLists.txt, without -Werror (a
    // newer compiler's new warning must not break a program's build): the
    // fast paths rely on the TLS model and on the compiler not replacing
    // zkmem's own calls to malloc and free with builtins. Hidden
    // visibility leaves only the ZK_EXPORT functions visible.
    for flag in [
        "-std=gnu11",
        "-Wall",
        "-Wextra",
        "-Wshadow",
        "-Wstrict-prototypes",
        "-fno-builtin-malloc",
        "-fno-builtin-free",
        "-fno-builtin-calloc",
        "-fno-builtin-realloc",
        "-ftls-model=initial-exec",
        "-fvisibility=hidden",
        "-fno-semantic-interposition",
        "-falign-functions=64",
    ] {
        build.flag(flag);
    }
    // An allocator built at -O0 would slow a debug build of the whole
    // program; release builds get -O3, as CMake's Release.
    let opt_level = env::var("OPT_LEVEL").unwrap_or_default();
    build.opt_level(if opt_level == "3" { 3 } else { 2 });

    for source in core_sources(&cmake_lists) {
        let path = root.join(&source);
        println!("cargo:rerun-if-changed={}", path.display());
        build.file(path);
    }
    for directory in [&src, &include] {
        let entries = fs::read_dir(directory)
            .unwrap_or_else(|error| panic!("cannot list {}: {}", directory.display(), error));
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().map_or(false, |extension| extension == "h") {
                println!("cargo:rerun-if-changed={}", path.display());
            }
        }
    }
    // The crate's own C: the header's layouts, for its test.
    let layout = manifest.join("src").join("layout.c");
    println!("cargo:rerun-if-changed={}", layout.display());
    build.file(layout);
    println!("cargo:rerun-if-changed={}", cmake_lists.display());
    println!("cargo:rerun-if-changed=build.rs");

    build.compile("zkmem");
    println!("cargo:rustc-link-lib=pthread");
}
