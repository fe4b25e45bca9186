#!/usr/bin/env bash
# System packages the tests need: a Redis server (service tests) and Debian's chromium
# (dashboard browser test). Installs only what is missing; needs root or sudo for apt.
#
# --no-install-recommends: chromium's recommends (mesa drivers, upower, a notification daemon,
# printer config, chromium-sandbox...) are ~480 MB a headless test run never uses (it runs with
# --no-sandbox --disable-gpu). What it does need comes as dependencies: fontconfig-config
# pulls fonts-dejavu-core, named here too so the page always has a font to render text with.
set -euo pipefail
need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v chromium >/dev/null 2>&1 || need+=(chromium fonts-dejavu-core)
command -v g++ >/dev/null 2>&1 || need+=(g++)
if [ ${#need[@]} -gt 0 ]; then
  sudo_cmd=""
  [ "$(id -u)" = 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -q
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -q --no-install-recommends "${need[@]}"
fi
