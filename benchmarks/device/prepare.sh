#!/usr/bin/env bash
# Run HERE (a machine with pip access) before borrowing a GPU machine: builds our pure-Python
# wheels into .whl/ (git-ignored through .git/info/exclude) so they can travel with `carry`.
# The GPU image already has jax (CUDA), flax and pluggy; nothing else is needed there.
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir .whl
python3 -m pip wheel -q --no-deps -w .whl \
  packages/vmoe-routing packages/vmoe-layers plugins/vmoe-router-hash
ls -l .whl
