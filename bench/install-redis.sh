#!/usr/bin/env bash
# Sourced by the harnesses that measure against Redis: installs `redis-server` from Debian if it
# is missing, and stops the system service the package starts (they run their own instances).
if ! command -v redis-server >/dev/null 2>&1; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server
  (service redis-server stop || true) >/dev/null 2>&1
fi
