# Local checks, in the order CI would fail on them.
.PHONY: check fmt clippy test

check: fmt clippy test

fmt:
	cargo fmt --all -- --check

clippy:
	cargo clippy --locked --all-targets -- -D warnings

test:
	scripts/test.sh
