//! The Dockerfile builds what CI checks and runs it as the image should: multi-stage, the
//! shared static build script, a distroless base with CA certificates and no shell, a
//! non-root user, and a build context limited to what the build needs.

fn read(path: &str) -> String {
    std::fs::read_to_string(
        std::path::Path::new(
            &(std::env::var("CARGO_MANIFEST_DIR")
                .expect("cargo sets CARGO_MANIFEST_DIR for tests")
                + "/../.."),
        )
        .join(path),
    )
    .unwrap()
}

#[test]
fn the_image_is_multi_stage_static_distroless_and_non_root() {
    let dockerfile = read("Dockerfile");
    let stages: Vec<&str> = dockerfile
        .lines()
        .filter(|l| l.starts_with("FROM "))
        .collect();
    assert_eq!(stages.len(), 2, "{stages:?}");
    assert!(stages[0].ends_with(" AS build"));
    assert_eq!(stages[1], "FROM gcr.io/distroless/static-debian12:nonroot");
    assert!(
        dockerfile.contains("RUN bash .ci/build-static"),
        "the image builds with the script CI runs"
    );
    assert!(dockerfile.contains("USER 65532:65532"));
    assert!(
        dockerfile.contains(r#"ENTRYPOINT ["/dpc-operator"]"#),
        "exec form: no shell needed"
    );
    let build = read(".ci/build-static");
    assert!(build.contains("+crt-static") && build.contains("--locked"));
    // Everything the build copies is in the context.
    let ignore = read(".dockerignore");
    for copied in ["Cargo.toml", "Cargo.lock", "crates/", ".ci/build-static"] {
        assert!(
            ignore.contains(&format!("!{copied}")),
            "{copied} is excluded from the build context"
        );
    }
}

#[test]
fn the_tls_stack_is_rustls_only() {
    let lock = read("Cargo.lock");
    for forbidden in [
        "name = \"openssl\"",
        "name = \"openssl-sys\"",
        "name = \"native-tls\"",
    ] {
        assert!(
            !lock.contains(forbidden),
            "{forbidden} is in the dependency tree"
        );
    }
    assert!(lock.contains("name = \"rustls\""));
}
