#!/usr/bin/env bash
# What the slow suite's browser test needs besides .venv (run by `make test-slow`):
# Playwright's Python package (the `webtest` extra) and Debian's Chromium, which Playwright drives
# through executable_path=/usr/bin/chromium. Never `playwright install`: that downloads a browser
# from a CDN, which these machines cannot reach. Idempotent; without root or apt-get it only says
# what is missing, and the test skips (CI sets LLAVAMED_REQUIRE_BROWSER=1, so there it fails).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
"$PY" -c "import playwright.sync_api" 2>/dev/null || "$PY" -m pip install -q -e ".[webtest]"
if [ ! -x /usr/bin/chromium ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "installing Debian's chromium for the browser test (apt-get, about 30 s)"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    else
        echo "note: /usr/bin/chromium is missing and this is not a root shell with apt-get:" \
            "the browser test will skip (sudo apt-get install chromium)" >&2
    fi
fi
