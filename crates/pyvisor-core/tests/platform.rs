//! A build for a target other than Linux stops with one clear message (issue 13, item 9). The
//! machine has no other target's standard library, so this test compiles the crate's own build
//! script for the host and runs it as cargo would for another target.

use std::path::Path;
use std::process::Command;

#[test]
fn a_non_linux_target_is_refused_with_one_clear_message() {
    let dir = std::env::temp_dir().join(format!("pyvisor-platform-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let exe = dir.join("build-script");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("build.rs");
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let built = Command::new(rustc).arg("--edition=2021").arg(&src).arg("-o").arg(&exe).status().expect("rustc runs");
    assert!(built.success(), "the build script compiles for the host");
    for os in ["macos", "windows", "freebsd"] {
        let out = Command::new(&exe).env("CARGO_CFG_TARGET_OS", os).output().expect("build script runs");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{os}: the build must stop");
        assert!(err.contains("pyvisor supports Linux only") && err.contains(&format!("`{os}`")), "{os}: {err}");
        assert_eq!(err.lines().count(), 1, "one message, not a cascade: {err}");
    }
    let linux = Command::new(&exe).env("CARGO_CFG_TARGET_OS", "linux").output().expect("build script runs");
    assert!(linux.status.success(), "{}", String::from_utf8_lossy(&linux.stderr));
    let _ = std::fs::remove_dir_all(&dir);
}
