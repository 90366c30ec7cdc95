//! Stops a build for any target but Linux with one clear message, before the compiler meets the
//! first Linux-only call (`src/lib.rs` has the same check as a `compile_error!`, for builds
//! that skip build scripts). Tested by `tests/platform.rs`, which runs this very file.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    if os != "linux" {
        eprintln!(
            "error: pyvisor supports Linux only (this build targets `{os}`): it relies on \
             PR_SET_PDEATHSIG, process groups, pidfds and /proc. Build for a Linux target."
        );
        std::process::exit(1);
    }
}
