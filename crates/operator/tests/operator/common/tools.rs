//! Finds the offline tools the chart and Argo CD tests run (helm, kubernetes-validate,
//! lua5.1): on PATH, or where `bash .ci/tools` installs them. A missing tool fails the test
//! with the command that installs it: these tests never pass by skipping.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

pub fn repo(path: &str) -> PathBuf {
    Path::new(
        &(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR for tests")
            + "/../.."),
    )
    .join(path)
}

/// The path of a tool.
pub fn tool(name: &str) -> PathBuf {
    let cache = std::env::var_os("DPC_OPERATOR_TOOLS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                .join(".cache/dpc-operator/tools")
        })
        .join("bin")
        .join(name);
    if cache.exists() {
        return cache;
    }
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let candidate = dir.join(name);
            if candidate.exists() {
                return candidate;
            }
        }
    }
    panic!(
        "{name} is not installed: run `bash .ci/tools` (it installs helm, kubernetes-validate and lua5.1)"
    );
}

/// Runs a tool; returns (exit code, stdout, stderr).
pub fn run(name: &str, args: &[&str]) -> (i32, String, String) {
    let output = Command::new(tool(name))
        .args(args)
        .current_dir(repo(""))
        .output()
        .unwrap_or_else(|e| panic!("running {name}: {e}"));
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Runs a tool that must succeed; returns stdout.
pub fn ok(name: &str, args: &[&str]) -> String {
    let (code, stdout, stderr) = run(name, args);
    assert_eq!(
        code,
        0,
        "{name} {} failed:\n{stderr}\n{stdout}",
        args.join(" ")
    );
    stdout
}
