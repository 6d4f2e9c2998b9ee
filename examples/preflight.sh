#!/usr/bin/env bash
# A pre-flight for CI systems other than GitHub Actions (GitLab CI, Jenkins, Buildkite, a cron job):
# run qdoctor in the environment that will train, keep a JUnit report, the JSON and a markdown summary,
# and exit with qdoctor's code (0 ready, 1 not ready, 2 used wrongly, 3 qdoctor failed).
#
#   PYTHON=.venv/bin/python SMOKE=1 bash examples/preflight.sh
#
# Settings (environment): PYTHON (default python), SMOKE=1 to run the probes, STRICT=1 to fail on warnings,
# SELECT / IGNORE (codes or prefixes), OUT (default qdoctor-out), INSTALL=0 when qdoctor is installed already,
# QDOCTOR_PACKAGE (default qdoctor: the core install, which never changes torch/bitsandbytes/transformers/peft).
set -u
PYTHON="${PYTHON:-python}"
OUT="${OUT:-qdoctor-out}"
mkdir -p "$OUT"

if [ "${INSTALL:-1}" = "1" ]; then
  "$PYTHON" -m pip install --quiet "${QDOCTOR_PACKAGE:-qdoctor}" || exit 3
fi

opts=()
if [ "${STRICT:-0}" = "1" ]; then opts+=(--strict); fi
if [ -n "${SELECT:-}" ]; then opts+=(--select "$SELECT"); fi
if [ -n "${IGNORE:-}" ]; then opts+=(--ignore "$IGNORE"); fi

"$PYTHON" -m qdoctor check "${opts[@]}" --format text \
  --also "junit=$OUT/qdoctor-check.xml" --also "json=$OUT/qdoctor-check.json" \
  --also "markdown=$OUT/qdoctor-check.md"
rc=$?

if [ "${SMOKE:-0}" = "1" ]; then
  "$PYTHON" -m qdoctor smoke "${opts[@]}" ${SMOKE_ARGS:-} --format text \
    --also "junit=$OUT/qdoctor-smoke.xml" --also "json=$OUT/qdoctor-smoke.json" \
    --also "markdown=$OUT/qdoctor-smoke.md"
  src=$?
  # the most serious outcome wins: 3 > 2 > 1 > 0
  for c in $src; do
    if [ "$c" -ge 3 ] || { [ "$c" = 2 ] && [ "$rc" -lt 3 ]; } || { [ "$c" = 1 ] && [ "$rc" = 0 ]; }; then rc=$c; fi
  done
fi
exit "$rc"
