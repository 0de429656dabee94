#!/usr/bin/env bash
# Debian's Chromium for the site's browser test (tests/test_site.py drives it through Playwright's executable_path;
# Playwright's own browser download is not used). Needs root, as on segbook's machines and CI.
set -euo pipefail
if command -v chromium >/dev/null; then echo "chromium: $(command -v chromium)"; exit 0; fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq chromium fonts-dejavu-core >/dev/null
echo "chromium: $(command -v chromium)"
