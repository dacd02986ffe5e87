# shellcheck shell=bash
# Cargo subcommands the checks need, at pinned versions, installed once into
# $MSGHASH_TOOLS_DIR (default ~/.cache/msghash) and reused. Sourced by
# scripts/check-supply-chain and scripts/fuzz.
#
#   cargo_tool NAME VERSION PYPI_PACKAGE
#       make $TOOLS_DIR/bin/NAME the given version: the prebuilt binary that PyPI ships as
#       PYPI_PACKAGE (seconds), in a virtualenv; `cargo install NAME --version VERSION
#       --locked` from crates.io (minutes) only if that fails. Puts $TOOLS_DIR/bin first on
#       PATH, so `cargo NAME-without-cargo-` finds it.
#
# Nothing here downloads anything but PyPI and crates.io packages.

TOOLS_DIR=${MSGHASH_TOOLS_DIR:-$HOME/.cache/msghash}
export PATH="$TOOLS_DIR/bin:$PATH"

cargo_tool() {
  local name=$1 version=$2 pypi=$3
  local bin="$TOOLS_DIR/bin/$name"
  if [ -x "$bin" ] && [ "$("$bin" --version 2>/dev/null)" = "$name $version" ]; then
    return 0
  fi
  local start venv
  start=$(date +%s)
  venv="$TOOLS_DIR/$name-$version"
  mkdir -p "$TOOLS_DIR/bin"
  echo "cargo-tools: installing $name $version (PyPI: $pypi)" >&2
  rm -rf "$venv"
  if python3 -m venv "$venv" >&2 \
    && "$venv/bin/pip" install -q --disable-pip-version-check "$pypi==$version" >&2 \
    && [ "$("$venv/bin/$name" --version 2>/dev/null)" = "$name $version" ]; then
    ln -sf "$venv/bin/$name" "$bin"
  else
    echo "cargo-tools: the PyPI package did not install; building $name from crates.io" >&2
    rm -rf "$venv"
    cargo install "$name" --version "$version" --locked --root "$venv" >&2
    ln -sf "$venv/bin/$name" "$bin"
  fi
  echo "cargo-tools: $name $version installed in $(( $(date +%s) - start ))s" >&2
}
