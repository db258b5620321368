# Recipes mirror `cargo xtask`; `just` itself is optional (cargo install just).

# Install the Debian packages the build and the tests need.
deps:
    cargo xtask deps

# The whole test suite, strict (what .ci/run runs).
test *ARGS:
    cargo xtask test {{ARGS}}

# Every benchmark, each with its in-run baseline ratio.
bench:
    cargo xtask bench

# The fuzz targets (cargo fuzz on stable), e.g. `just fuzz --runs 10000000`.
fuzz *ARGS:
    cargo xtask fuzz {{ARGS}}

# Formatting and lints, as required before every commit.
lint:
    cargo fmt --all --check
    cargo clippy --workspace --all-targets -- -D warnings

# Build, bring up a two-cluster lab, show a cross-cluster request and the mesh status.
demo *ARGS:
    cargo xtask demo {{ARGS}}
